"""Real TensorRT-for-RTX builds of an ONNX bundle (no GPU needed), and the checks every built bundle gets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from runtime.backends.libraries import TENSORRT_RTX

needs_rtx = pytest.mark.skipif(
    not TENSORRT_RTX.installed(), reason="TensorRT for RTX is not installed: `pip install tensorrt-rtx-cu13` (scripts/setup.sh does)"
)


def build_rtx(source: Path, out: Path, **options: Any) -> Path:
    """`--from-onnx SOURCE --backend tensorrt-rtx`, the real builder; on a machine without a GPU the engines are not run.

    Builder optimization level 0 unless asked: the tests check what is built, not how fast it runs (level 3 took
    1.5-3x longer to build the tiny UNets)."""
    from export.tensorrt.builder import builder_settings
    from export.tensorrt.from_onnx import build_from_onnx

    options.setdefault("settings", builder_settings(optimization_level=0))
    return build_from_onnx(source, out, library=TENSORRT_RTX, log=lambda _: None, **options)


def check_rtx_bundle(out: Path, source: Path, precision: str | None = None) -> None:
    """Every component is a TensorRT-for-RTX engine whose I/O is the source's (the builder checked each network against
    them), its build recorded (library, version, targets, seconds, bytes), and its ONNX carried for a rebuild."""
    import tensorrt_rtx

    from runtime.bundle import load_manifest

    manifest, onnx = load_manifest(out), load_manifest(source)  # load_manifest checks every file's sha256
    assert manifest.backend == "tensorrt" and manifest.tensorrt is not None
    assert (manifest.tensorrt.library, manifest.tensorrt.tensorrt) == ("tensorrt-rtx", tensorrt_rtx.__version__)
    assert list(manifest.components) == list(onnx.components)
    for name, c in manifest.components.items():
        src = onnx.components[name]
        assert c.format == "plan" and (c.inputs, c.outputs) == (src.inputs, src.outputs), name
        assert c.precision == (precision or src.precision), name
        b = c.build
        assert b["library"] == "tensorrt-rtx" and b["compute_capabilities"] == list(manifest.tensorrt.compute_capabilities)
        assert b["bytes"] == (out / c.file).stat().st_size > 100_000 and b["seconds"] > 0
        assert (out / src.file).is_file()  # the ONNX it was built from, for a rebuild
        assert c.verification["passed"] is None and "without a GPU" in c.verification["not_run"]
