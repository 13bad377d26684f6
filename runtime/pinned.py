"""One load reads one build: the bundle folder is opened once, and every file is read through that handle.

`export.build --force` writes a new folder and swaps it into place by rename; it never writes into a published
folder. A directory handle keeps naming the folder it opened, wherever it is renamed, so reading the manifest,
hashing the files and opening the engines through it sees one build, however often the path is swapped in
between. (Once the old folder is deleted its files are gone: a read then fails, and the loader starts over.)
Linux reaches a folder by handle as /proc/self/fd/N; elsewhere the path is read and the loader's identity
checks (runtime.bundle.BundleState) are what guard it.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path

from .errors import BundleError

PROC_FD = Path("/proc/self/fd")


class PinnedFolder:
    """A folder held open: `root` reads the folder that was opened, `moved()` says whether the path now names another."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.fd: int | None = None
        self.root = folder
        if not PROC_FD.is_dir():
            return
        try:
            self.fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise BundleError(f"no engine bundle at {folder}: the folder does not exist; build one with `python -m export.build`") from None
        except NotADirectoryError:
            raise BundleError(f"{folder} is a file, not an engine bundle folder; build one with `python -m export.build`") from None
        self.root = PROC_FD / str(self.fd)
        self._finalizer = weakref.finalize(self, os.close, self.fd)

    def moved(self) -> bool:
        """True when the path no longer names the opened folder (a rebuild swapped it) or it was deleted."""
        if self.fd is None:
            return False
        try:
            here, held = os.stat(self.folder), os.fstat(self.fd)
        except OSError:
            return True
        return (here.st_dev, here.st_ino) != (held.st_dev, held.st_ino) or held.st_nlink == 0

    def close(self) -> None:
        if self.fd is not None:
            self._finalizer()
            self.fd = None
