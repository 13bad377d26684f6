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
    """Per-output max abs and relative error, the worst, and whether it is within the gate.

    NaN or inf in an output or in its reference fails the gate: no error can be measured against it, so that output's
    error figures are null, `nonfinite` names it and its counts say where (a NaN reference once passed: max(0, nan)
    is 0). Every figure is a finite number or null, so the manifest stays strict JSON.
    """
    figures: dict[str, Any] = {"tolerance": tolerance, "outputs": {}, "nonfinite": []}
    worst = 0.0
    for name, ref in reference.items():
        ref64 = np.asarray(ref, dtype=np.float64)
        out64 = np.asarray(got[name], dtype=np.float32).astype(np.float64)  # float64: out - ref cannot overflow
        counts = {"output": _nonfinite(out64), "reference": _nonfinite(ref64)}
        entry: dict[str, Any] = {"finite": not any(counts.values()), "nonfinite_values": counts}
        if entry["finite"]:
            ref_max = float(np.abs(ref64).max(initial=0.0))
            abs_err = float(np.abs(out64 - ref64).max(initial=0.0))
            rel = abs_err / max(1.0, ref_max)
            entry.update(max_abs_err=abs_err, rel_err=rel, ref_max_abs=ref_max)
            worst = max(worst, rel)
        else:
            entry.update(max_abs_err=None, rel_err=None, ref_max_abs=None)
            figures["nonfinite"].append(name)
        figures["outputs"][name] = entry
    figures["rel_err"] = None if figures["nonfinite"] else worst
    figures["passed"] = not figures["nonfinite"] and worst <= tolerance
    return figures


def describe(figures: Mapping[str, Any]) -> str:
    """The gate's verdict in words: "error 1.2e-04" or which outputs held NaN/inf, and where (output or reference)."""
    if figures["rel_err"] is not None:
        return f"error {figures['rel_err']:.2e}"
    parts = []
    for name in figures["nonfinite"]:
        counts = figures["outputs"][name]["nonfinite_values"]
        where = " and ".join(f"{n} NaN/inf in the {side}" for side, n in counts.items() if n)
        parts.append(f"{name}: {where}")
    return "no error measurable (" + "; ".join(parts) + ")"


def differs(figures: Mapping[str, Any], reference: str) -> str:
    """How a failed gate's file differs from `reference`, for its error: by how much, or where NaN/inf made it unmeasurable."""
    if figures["rel_err"] is not None:
        return f"differs from {reference} by {figures['rel_err']:.3g}"
    return f"fails its gate against {reference}: {describe(figures)}"


def _nonfinite(a: np.ndarray) -> int:
    return int(a.size - np.count_nonzero(np.isfinite(a)))
