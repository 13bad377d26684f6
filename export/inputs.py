"""Fixed verification inputs, one recipe for every gate (export.verify and export.tensorrt.from_onnx).

Imports only numpy and runtime: export.tensorrt.from_onnx runs on a Jetson without torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from runtime.bundle import TensorSpec
from runtime.guidance import guidance_embedding

# CLIP's <|startoftext|> and <|endoftext|> (SD 1.x pads with the latter)
START, END = 49406, 49407


def fixed_inputs(inputs: Sequence[TensorSpec], component_name: str, vae_scaling_factor: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Realistic inputs, the same for a given seed, each cast to its TensorSpec's dtype.

    Real-looking token ids, unit-normal latents, a mid-schedule timestep, the upscaler's default
    noise level, images in [-1, 1]: values the component meets in use, so the gate measures the
    error a user would see.
    """
    rng = np.random.default_rng(seed)
    return {t.name: _value(t, component_name, vae_scaling_factor, rng).astype(t.dtype) for t in inputs}


def _value(t: TensorSpec, component_name: str, vae_scaling_factor: float, rng: np.random.Generator) -> np.ndarray:
    if t.name == "input_ids":
        ids = np.full(t.shape, END, dtype=np.int64)
        ids[:, 0] = START
        ids[:, 1:6] = rng.integers(300, 40000, size=(t.shape[0], 5))
        return ids
    if t.name == "timestep_cond":  # an LCM UNet's guidance embedding, at guidance scale 7
        return guidance_embedding(np.full(t.shape[0], 7.0), t.shape[1])
    if t.name == "timestep":  # mid-way through a 1000-step schedule
        return np.full(t.shape, 499.0)
    if t.name == "time_ids":  # SDXL's micro-conditioning at 1024x1024, uncropped (the refiner's last number: aesthetic score 6)
        row = [1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0] if t.shape[1] == 6 else [1024.0, 1024.0, 0.0, 0.0, 6.0][: t.shape[1]]
        return np.tile(np.asarray(row), (t.shape[0], 1))
    if t.name == "class_labels":  # the x4 upscaler's noise level, at diffusers' default
        return np.full(t.shape, 20)
    if t.name == "latent_sample":  # what the VAE decoder meets: unit-normal latents, unscaled
        return rng.standard_normal(t.shape) / vae_scaling_factor
    if t.name == "sample" and component_name.startswith("vae_encoder"):  # an image (the full or the tiny encoder's)
        return rng.uniform(-1, 1, t.shape)
    if t.name == "controlnet_cond":  # a control image, [0, 1] as diffusers' ControlNet pipelines feed it
        return rng.uniform(0, 1, t.shape)
    if t.name == "conditioning_scale":
        return np.ones(t.shape)
    if t.name.startswith("lora_"):  # LoRA slot matrices: small, as trained adapters' updates are next to the weights
        return 0.02 * rng.standard_normal(t.shape)
    return rng.standard_normal(t.shape)
