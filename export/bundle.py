"""Writing an engine bundle: staged in a hidden folder, published by one rename once verified."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from runtime.manifest import MANIFEST, Manifest, sha256_file

ENGINES = Path("engines")
Log = Callable[[str], None]  # where a build reports progress, one line at a time (print by default)


def default_name(model: str, height: int, width: int, batch: int, precision: str, backend: str, guidance: str = "cfg") -> str:
    """engines/<model>-<H>x<W>-b<B>-<precision>-<backend>[-<guidance>]: what decides a bundle, at a glance.

    Classifier-free guidance is the usual case and goes unnamed; other guidance modes are named.
    """
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-") or "model"
    suffix = "" if guidance == "cfg" else f"-{guidance}"
    return f"{slug}-{height}x{width}-b{batch}-{precision}-{backend}{suffix}"


def check_target(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it, or --out to choose another folder")


@contextmanager
def staging(out: Path, force: bool) -> Iterator[Path]:
    """Yield a hidden work folder; on success it replaces `out`, on failure it is removed.

    A bundle is either complete (manifest written last, then one rename) or absent: never half-written.
    """
    check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.with_name(f".{out.name}.partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        shutil.rmtree(old)
    work.rename(out)


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
