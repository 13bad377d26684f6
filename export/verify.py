"""Build verification: every exported component against its fp32 torch module on fixed inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from runtime.engine import load_engine
from runtime.guidance import guidance_embedding
from runtime.manifest import Component

from .onnx_export import ComponentSpec, torch_inputs

# Error = max |onnx - torch| / max(1, max |torch|), per output; gates by precision.
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}
FP16_MAX = 65504.0


class VerificationError(RuntimeError):
    """A built component's outputs are too far from the fp32 reference."""


def sample_inputs(spec: ComponentSpec, model: Any, seed: int = 0) -> dict[str, np.ndarray]:
    """Fixed, realistic inputs: real token ids, unit-normal latents, a mid-schedule timestep, noise level 20, images in [-1, 1]."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        if t.name == "input_ids":
            ids = np.full(t.shape, 49407, dtype=np.int32)  # <|endoftext|> padding, as SD 1.x
            ids[:, 0] = 49406
            ids[:, 1 : 1 + 5] = rng.integers(300, 40000, size=(t.shape[0], 5))
            out[t.name] = ids
        elif t.name == "timestep_cond":
            out[t.name] = guidance_embedding(np.full(t.shape[0], 7.0), t.shape[1])
        elif t.name == "class_labels":  # the upscaler's noise level, at diffusers' default
            out[t.name] = np.full(t.shape, 20, dtype=np.int64)
        elif t.name == "timestep":
            out[t.name] = np.full(t.shape, 499.0, dtype=np.float32)
        elif t.name == "sample" and spec.name == "vae_encoder":
            out[t.name] = rng.uniform(-1, 1, t.shape).astype(np.float32)
        elif t.name == "latent_sample":
            out[t.name] = (rng.standard_normal(t.shape) / model.vae.config.scaling_factor).astype(np.float32)
        else:
            out[t.name] = rng.standard_normal(t.shape).astype(np.float32)
    return out


def torch_reference(spec: ComponentSpec, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        result = spec.module(*torch_inputs(spec, feed))
    result = result if isinstance(result, (tuple, list)) else (result,)
    return {t.name: r.float().numpy() for t, r in zip(spec.outputs, result)}


def activation_peak(spec: ComponentSpec, feed: dict[str, np.ndarray]) -> float:
    """Largest |activation| anywhere in the fp32 module: above fp16's range means fp16 overflows."""
    import torch

    peak = [0.0]

    def hook(_m: Any, _i: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            peak[0] = max(peak[0], float(out.detach().abs().max()))

    handles = [m.register_forward_hook(hook) for m in spec.module.modules()]
    try:
        torch_reference(spec, feed)
    finally:
        for h in handles:
            h.remove()
    return peak[0]


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


def compare(component: Component, bundle: Path, reference: dict[str, np.ndarray], feed: dict[str, np.ndarray]) -> dict[str, Any]:
    """Run the built file through the runtime's own engine and measure it against the reference."""
    engine = load_engine(component, bundle, device="cpu")
    return error_figures(engine(feed), reference, TOLERANCE[component.precision])
