"""Shared fixtures: a tiny SD 1.5-shaped model and bundles exported from it, built once per session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.helpers.tiny_models import make_tiny_sd


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def bundle_fp32(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Exported through the real CLI, as a user would."""
    out = tmp_path_factory.mktemp("engines") / "tiny-fp32"
    cmd = [sys.executable, "-m", "export.build", "--model", str(tiny_model), "--precision", "fp32", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="session")
def bundle_fp16(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.build import build

    return build(tiny_model, tmp_path_factory.mktemp("engines") / "tiny-fp16", precision="fp16", log=lambda _: None)


@pytest.fixture(scope="session")
def bundle_batch2(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.build import build

    return build(tiny_model, tmp_path_factory.mktemp("engines") / "tiny-b2", precision="fp32", batch_size=2, log=lambda _: None)
