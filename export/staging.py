"""Writing an engine bundle: staged in a hidden folder, published by one rename once verified."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from runtime.bundle import MANIFEST, SCHEMA, Manifest, declared_schema, sha256_file

# The checkout's engines/ folder, wherever the command runs from (as --model's default, the shipped model, is)
ENGINES = Path(__file__).resolve().parent.parent / "engines"
Log = Callable[[str], None]  # where a build reports progress, one line at a time (print by default)


def default_name(model: str, height: int, width: int, batch: int, precision: str, backend: str, guidance: str = "cfg") -> str:
    """engines/<model>-<H>x<W>-b<B>-<precision>-<backend>[-<guidance>]: what decides a bundle, at a glance.

    Classifier-free guidance is the usual case and goes unnamed; other guidance modes are named.
    """
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-") or "model"
    suffix = "" if guidance == "cfg" else f"-{guidance}"
    return f"{slug}-{height}x{width}-b{batch}-{precision}-{backend}{suffix}"


class TargetError(FileExistsError):
    """`--out` names something export must not replace: a file, a link, a folder that is no bundle, the model itself."""


def check_target(out: Path, force: bool, source: Path | None = None) -> None:
    """Refuse, before any export work, an `out` that this build may not write or replace.

    A missing path or an empty folder is fine; an existing bundle (a folder with an export-written manifest.json)
    needs `force`; anything else is never replaced. `source` (the model folder or checkpoint) must not be `out` nor
    contain it. (--from-onnx passes none: rebuilding a bundle in place from its own ONNX files is supported.)
    """
    if source is not None:
        src, dest = Path(source).resolve(), out.resolve()
        if dest == src or src in dest.parents:
            where = "is the model itself" if dest == src else f"is inside the model folder {source}"
            raise TargetError(f"{out} {where}: write the bundle elsewhere (--out), never over its source")
    if out.is_symlink():
        raise TargetError(
            f"{out} is a symbolic link (to {os.readlink(out)}), not a bundle folder: export does not replace it; choose another --out"
        )
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise TargetError(f"{out} cannot be made: {blocking} is a file, not a folder; choose another --out")
    if not out.exists():
        return
    if out.is_dir() and not any(out.iterdir()):
        return  # an empty folder made for the bundle
    if not out.is_dir():
        raise TargetError(f"{out} is a file, not a bundle folder: export does not replace it; choose another --out")
    problem = not_a_bundle(out)
    if problem:
        raise TargetError(f"{out} is a folder that is not an engine bundle ({problem}): export does not replace it; choose another --out")
    if not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it, or --out to choose another folder")


def not_a_bundle(folder: Path) -> str:
    """Why `folder` is not a bundle export wrote ("" when it is one): a manifest.json of the bundle schema."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST}"
    # a bundle of another schema version, or a damaged one, is still export's to rebuild: the schema name decides
    schema = declared_schema(manifest)
    return "" if schema == SCHEMA else f"its {MANIFEST} declares schema {schema!r}, not {SCHEMA!r}"


@contextmanager
def staging(out: Path, force: bool, source: Path | None = None) -> Iterator[Path]:
    """Yield a hidden work folder; on success it replaces `out`, on failure (Ctrl-C included) it is removed.

    A bundle is either complete (manifest written last, then published at once) or absent: never half-written.
    """
    check_target(out, force, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.with_name(f".{out.name}.partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    publish(work, out)


def publish(work: Path, out: Path) -> None:
    """Move the finished bundle `work` to `out`; an existing `out` (a bundle, or an empty folder) is replaced.

    Where the OS can swap two paths atomically (Linux renameat2 RENAME_EXCHANGE), `out` always holds a complete
    bundle, old or new: after the swap the old one sits at `work` and is removed.
    """
    if not out.exists():
        work.rename(out)
        return
    if exchange(work, out):
        shutil.rmtree(work)  # the old bundle
        return
    # Fallback (no RENAME_EXCHANGE: another OS, an old kernel, a filesystem without it): two renames. A crash
    # between them leaves `out` absent, with the old bundle at .<name>.old and the new one at .<name>.partial.
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    work.rename(out)
    shutil.rmtree(old)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> bool:
    """Swap paths `a` and `b` atomically; False where this system cannot (then nothing was changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc 2.28+
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # the kernel or filesystem has no RENAME_EXCHANGE
        return False
    raise OSError(err, os.strerror(err), str(a), str(b))


def now() -> str:
    """The manifest's `created` stamp: UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def file_hashes(bundle: Path) -> dict[str, str]:
    return {str(f.relative_to(bundle)): sha256_file(f) for f in sorted(bundle.rglob("*")) if f.is_file() and f.name != MANIFEST}


def write_manifest(bundle: Path, manifest: Manifest) -> None:
    """Written last, with the sha256 of every other file; read back through the runtime's parser before it counts."""
    doc = manifest.with_files(file_hashes(bundle)).to_json()
    Manifest.from_json(json.loads(json.dumps(doc)), str(bundle / MANIFEST))
    (bundle / MANIFEST).write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
