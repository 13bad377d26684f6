"""A real full disk for tests: a small tmpfs, mounted for the test and filled up, where every write fails with ENOSPC.

Mounting needs root (CI runs as root); elsewhere `small_disk` skips, naming why, and the in-process tests that inject
ENOSPC at the write still run.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_disk(where: Path, size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes mounted at `where` (made empty) for the block's length."""
    where.mkdir(parents=True, exist_ok=True)
    mount = shutil.which("mount")
    if os.geteuid() != 0 or mount is None:
        pytest.skip("a real full disk needs root to mount a small tmpfs (the ENOSPC-injection tests cover the rest)")
    done = subprocess.run([mount, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a small tmpfs is not allowed here ({done.stderr.strip()})")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def fill(folder: Path) -> None:
    """Take every free byte of `folder`'s filesystem: the next write there fails with ENOSPC."""
    try:
        with open(folder / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError as e:  # at the write, at the flush, or at the close
        assert e.errno == errno.ENOSPC, e
