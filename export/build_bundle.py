"""build_bundle: BuildOptions -> an ONNX Runtime bundle, or TensorRT engines built from a scratch ONNX bundle."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from runtime.backends.libraries import TENSORRT, TENSORRT_RTX, require
from runtime.backends.tensorrt import require_tensorrt, tensorrt_available

from . import from_onnx
from .bundle import Log, check_target
from .onnx_bundle import export_onnx_bundle
from .options import BuildOptions


def resolve_backend(asked: str, log: Log) -> str:
    """TensorRT engines where TensorRT exists; `auto` elsewhere builds the ONNX Runtime flavour, said in one line."""
    if asked == "tensorrt":
        require_tensorrt("--backend tensorrt", instead="or build the ONNX Runtime flavour with --backend onnxruntime")
        return "tensorrt"
    if asked == "tensorrt-rtx":  # builds without a GPU: only the library is needed here
        require(TENSORRT_RTX, "--backend tensorrt-rtx", cuda=False, instead="or build the ONNX Runtime flavour with --backend onnxruntime")
        return "tensorrt-rtx"
    if asked == "auto":
        if tensorrt_available():
            log("TensorRT is installed: building TensorRT engines (--backend tensorrt)")
            return "tensorrt"
        log("TensorRT is not installed here: building the ONNX Runtime flavour (--backend onnxruntime)")
    return "onnxruntime"


def build_bundle(model_path: Path, out: Path | None, options: BuildOptions, log: Log = print) -> Path:
    """Export, verify and publish a bundle; returns its folder. Raises before writing anything on bad input.

    With the tensorrt backend the verified ONNX bundle is exported to a scratch folder first, then its
    engines are built and verified as `--from-onnx` does; the TensorRT bundle keeps the ONNX files.
    """
    backend = resolve_backend(options.backend, log)
    if out is not None:
        check_target(out, options.force, model_path)  # before the model loads: a clash costs nothing to report
    if backend == "onnxruntime":
        return export_onnx_bundle(model_path, out, options, log)
    with tempfile.TemporaryDirectory(prefix="onnx-bundle-") as tmp:
        # backend named: an int8 UNet gets TensorRT's Q/DQ placement
        onnx_bundle = export_onnx_bundle(model_path, Path(tmp) / "onnx", replace(options, backend="tensorrt"), log)
        library = TENSORRT_RTX if backend == "tensorrt-rtx" else TENSORRT
        return from_onnx.build_from_onnx(
            onnx_bundle, out, precision=options.precision, settings=options.tensorrt_builder(), force=options.force, log=log,
            library=library, targets=options.targets(),
        )  # fmt: skip
