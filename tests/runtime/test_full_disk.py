"""Issue 28: a full disk is one line, and nothing that existed is lost (written atomically: a temporary file in the
same folder, renamed over the target once complete). A real tmpfs filled up where root can mount one; ENOSPC injected
at the write everywhere."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import atomic
from runtime.bundle import load_manifest
from tests.helpers import REPO
from tests.helpers.small_disk import fill, small_disk

pytestmark = pytest.mark.reliability
PROMPT = "a blue square"
FULL = "the disk is full; nothing there was replaced"


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_an_atomic_write_that_fails_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_text("old")

    def half_then_full(path: Path) -> None:
        path.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(atomic.WriteError, match=f"could not write {target}: {FULL}"):
        atomic.write_with(target, half_then_full)
    assert target.read_text() == "old" and listing(tmp_path) == ["out.json"]
    atomic.write_json(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n' and listing(tmp_path) == ["out.json"]
    with pytest.raises(ValueError, match="not JSON compliant"):
        atomic.write_json(target, {"a": float("nan")})
    assert target.read_text() == '{\n  "a": 1\n}\n' and listing(tmp_path) == ["out.json"]


def test_runtime_cli_on_a_full_disk_keeps_the_existing_image_injected(bundle_fp32, tmp_path, monkeypatch, capsys):
    from PIL import Image

    import runtime.cli

    existing = tmp_path / "existing.png"
    Image.new("RGB", (4, 4), "red").save(existing)
    before = existing.read_bytes()
    real_save = Image.Image.save

    def save_then_full(self, fp, *a, **k):
        real_save(self, fp, *a, **k)  # some bytes reach the temporary file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", save_then_full)
    code = runtime.cli.main([PROMPT, "--bundle", str(bundle_fp32), "--steps", "1", "-o", str(existing), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: could not write {existing}: {FULL} (free space or choose another path)\n"
    assert existing.read_bytes() == before and listing(tmp_path) == ["existing.png"]


def run(*args: object, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_runtime_cli_on_a_real_full_disk(bundle_fp32, tmp_path):
    with small_disk(tmp_path / "disk", 256 * 1024) as disk:
        existing = disk / "existing.png"
        existing.write_bytes((REPO / "assets" / "clip-tokenizer" / "README.md").read_bytes()[:1000])  # someone's file
        fill(disk)
        before = existing.read_bytes()
        done = run("-m", "runtime", PROMPT, "--bundle", bundle_fp32, "--steps", "1", "-o", existing, "--quiet")
        assert done.returncode == 2 and done.stderr == f"error: could not write {existing}: {FULL} (free space or choose another path)\n"
        assert existing.read_bytes() == before and listing(disk) == ["existing.png", "filler"]


def test_export_build_on_a_real_full_disk_keeps_the_old_bundle(bundle_fp32, tiny_model, tmp_path):
    size = sum(f.stat().st_size for f in bundle_fp32.rglob("*") if f.is_file())
    with small_disk(tmp_path / "disk", size + 512 * 1024) as disk:
        old = shutil.copytree(bundle_fp32, disk / "bundle")
        done = run("-m", "export.build", "--model", tiny_model, "--out", old, "--force", "--precision", "fp32", "--backend", "onnxruntime")
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: the disk is full"), done.stderr
        assert "nothing was published and an existing bundle is as it was" in lines[0]
        load_manifest(old, verify_files=True)  # whole: every file present with its sha256
        assert listing(disk) == ["bundle"]  # no staging folder, no lock file


def test_batch_sample_on_a_real_full_disk_is_one_line(bundle_fp32, tmp_path):
    with small_disk(tmp_path / "disk", 128 * 1024) as disk:
        fill(disk)
        done = run(REPO / "samples" / "batch.py", "--bundle", bundle_fp32, "--steps", "1", "--out", disk / "images")
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        assert lines[0].startswith("error: could not write") and "the disk is full" in lines[0] and "0 new images were written" in lines[0]
        assert listing(disk / "images") == []  # no temporary file left behind
