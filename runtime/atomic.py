"""Writing files a user sees: all or nothing, and one lock per output folder.

A file is written to a temporary name in its own folder and renamed over the target once complete (a rename
within one filesystem is atomic), so a full disk or a kill leaves the old file whole. Errors are OSError with
a one-line message naming the file (`disk_error`); callers print it as is.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class WriteError(OSError):
    """A file could not be written; the message is one line naming it, the cause and that nothing was replaced."""


def disk_error(path: Path, e: OSError) -> WriteError:
    """`e` while writing `path` as one line: a full disk says so, anything else gives the OS's words."""
    cause = "the disk is full" if e.errno in NO_SPACE else (e.strerror or str(e))
    error = WriteError(f"could not write {path}: {cause}; nothing there was replaced (free space or choose another path)")
    error.errno = e.errno  # kept for callers; the message alone is what str() shows (no "[Errno 28]")
    return error


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; write it completely, and on leaving it replaces `path` in one rename.

    On any failure the temporary file is removed and `path` is as it was; an OSError becomes a WriteError.
    """
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise disk_error(path, e) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the bytes on disk before the name points at them (a crash after the rename)
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make a user's image unreadable to others, unlike a plain write
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise disk_error(path, e) from None
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    """`path` holds `data`, or (on failure) what it held before."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, doc: object, *, indent: int | None = 2, default: Callable[[object], object] | None = None) -> None:
    """`doc` as strict JSON (NaN or infinity: ValueError, as no strict parser reads them), written atomically."""
    write_text(path, json.dumps(doc, indent=indent, allow_nan=False, default=default) + "\n")


def write_with(path: str | Path, writer: Callable[[Path], object]) -> None:
    """`writer(tmp)` writes the whole file (PIL's save, np.save with a file name); then it replaces `path`."""
    with atomic_path(path) as tmp:
        writer(tmp)


@contextmanager
def exclusive(folder: Path, log: Callable[[str], None], *, wait: bool = True) -> Iterator[None]:
    """Hold the lock of output `folder` (a `.NAME.lock` file beside it) while the body runs.

    Another holder (a second build of the same --out) is waited for, said in one line; wait=False refuses instead
    (BlockingIOError with a message). The kernel releases the lock when its holder exits, kill -9 included. The
    holder removes the lock file before releasing it; a waiter that then gets the lock of a removed file tries again,
    so two writers never hold locks on two different files of one name.
    """
    import fcntl  # POSIX; the SDK's targets (Linux desktops, Jetson) all have it

    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = folder.with_name(f".{folder.name}.lock")
    said = False
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            message = f"another process (pid {holder}) is writing {folder}"
            if not wait:
                os.close(fd)
                raise BlockingIOError(errno.EWOULDBLOCK, f"{message}; wait for it to finish, or choose another --out") from None
            if not said:
                log(f"{message}; waiting for it to finish")
                said = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        if _same_file(fd, lock):
            break
        os.close(fd)  # the holder removed this lock file as it finished: lock the current one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)  # releases the lock


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
