"""Build verification: every exported component against its fp32 torch module on fixed inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from runtime.bundle import Component
from runtime.dispatch import load_engine

from .gates import TOLERANCE, error_figures
from .onnx_export import ComponentSpec, torch_inputs

FP16_MAX = 65504.0


class VerificationError(RuntimeError):
    """A built component's outputs are too far from the fp32 reference."""


def torch_reference(spec: ComponentSpec, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        result = spec.module(*torch_inputs(spec, feed))
    result = result if isinstance(result, (tuple, list)) else (result,)
    return {t.name: r.float().numpy() for t, r in zip(spec.outputs, result)}


def activation_peak(spec: ComponentSpec, feed: dict[str, np.ndarray]) -> float:
    """Largest |activation| anywhere in the fp32 module: above fp16's range means fp16 overflows."""
    return reference_and_peak(spec, feed)[1]


def reference_and_peak(spec: ComponentSpec, feed: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
    """torch_reference and activation_peak from one forward pass (a full-size SDXL UNet's takes minutes on a CPU)."""
    import torch

    peak = [0.0]

    def hook(_m: Any, _i: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            peak[0] = max(peak[0], float(out.detach().abs().max()))

    handles = [m.register_forward_hook(hook) for m in spec.module.modules()]
    try:
        reference = torch_reference(spec, feed)
    finally:
        for h in handles:
            h.remove()
    return reference, peak[0]


def compare(component: Component, bundle: Path, reference: dict[str, np.ndarray], feed: dict[str, np.ndarray]) -> dict[str, Any]:
    """Run the built file through the runtime's own engine and measure it against the reference."""
    engine = load_engine(component, bundle, device="cpu")
    return error_figures(engine(feed), reference, TOLERANCE[component.precision])
