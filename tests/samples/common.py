"""What the sample tests share: running a sample as a user would, and reading back what it wrote."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.helpers import REPO

SAMPLES = REPO / "samples"


def run_sample(script: str, *args: object, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python samples/SCRIPT ARGS...` from the repository root, as the samples' README says to run them."""
    cmd = [sys.executable, str(SAMPLES / script), *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The single `error: ...` line a sample prints for bad input (exit 2, no traceback); returns it."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def png(path: Path) -> tuple[Image.Image, dict[str, str]]:
    """A written PNG, fully decoded (a truncated file fails here), and its text chunks."""
    with Image.open(path) as im:
        assert im.format == "PNG", path
        im.load()
        return im.copy(), dict(im.text)


def files(folder: Path) -> list[str]:
    """Every file under `folder`, hidden temporary ones included, as sorted relative names."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []
