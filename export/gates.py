"""The verification gates: one tolerance per precision, and the error figures a gate compares with it.

Every gate uses the same figure, per output: error = max |out - ref| / max(1, max |ref|), the worst
output deciding. The reference is what the checked file was made from: the fp32 torch module for an
exported ONNX (export.verify), the ONNX run by ONNX Runtime on the CPU for a TensorRT engine
(export.tensorrt.from_onnx). Dividing by the output's range (at least 1) keeps large activations from failing
on rounding alone and small ones from passing on absolute error alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

# fp32: only reordered arithmetic (fusions, other kernels) separates file and reference.
# fp16: a 10-bit mantissa through a deep network. int8: quantized weights and activations.
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2, "int8": 1e-1}


def error_figures(got: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], tolerance: float) -> dict[str, Any]:
    """Per-output max abs and relative error, the worst, and whether it is within the gate."""
    figures: dict[str, Any] = {"tolerance": tolerance, "outputs": {}}
    worst = 0.0
    for name, ref in reference.items():
        ref = np.asarray(ref, dtype=np.float32)
        out = np.asarray(got[name], dtype=np.float32)
        finite = bool(np.isfinite(out).all())
        abs_err = float(np.abs(out - ref).max()) if finite else float("inf")
        rel = abs_err / max(1.0, float(np.abs(ref).max()))
        figures["outputs"][name] = {"max_abs_err": abs_err, "rel_err": rel, "ref_max_abs": float(np.abs(ref).max()), "finite": finite}
        worst = max(worst, rel)
    figures["rel_err"] = worst
    figures["passed"] = worst <= tolerance
    return figures
