"""Tiny SDXL-shaped models (tests.helpers.tiny_sdxl) and the bundles exported from them, built once per session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.helpers.tiny_sdxl import make_tiny_sdxl

QUIET = {"log": lambda _: None}


@pytest.fixture(scope="session")
def sdxl_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sdxl-models")
    return {kind: make_tiny_sdxl(root / kind, kind=kind) for kind in ("base", "turbo", "refiner")}


@pytest.fixture(scope="session")
def sdxl_base_bundle(sdxl_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Exported through the real CLI, as a user would."""
    out = tmp_path_factory.mktemp("sdxl-engines") / "base-fp32"
    cmd = [sys.executable, "-m", "export.build", "--model", str(sdxl_models["base"]), "--precision", "fp32", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="session")
def sdxl_refiner_bundle(sdxl_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.build import build

    return build(sdxl_models["refiner"], tmp_path_factory.mktemp("sdxl-engines") / "refiner-fp32", precision="fp32", **QUIET)


@pytest.fixture(scope="session")
def sdxl_turbo_bundle(sdxl_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.build import build

    out = tmp_path_factory.mktemp("sdxl-engines") / "turbo-none"
    return build(sdxl_models["turbo"], out, precision="fp32", guidance="none", pipelines="txt2img", **QUIET)


@pytest.fixture(scope="session")
def sdxl_inpaint_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The 9-channel SDXL inpainting UNet's folder and its bundle."""
    from export.build import build

    model = make_tiny_sdxl(tmp_path_factory.mktemp("sdxl-models") / "inpaint", kind="inpaint")
    return model, build(model, tmp_path_factory.mktemp("sdxl-engines") / "inpaint-fp32", precision="fp32", **QUIET)
