"""Guidance wraps the UNet engine into the `model(x, t)` callable samplers expect.

Three modes, recorded in the manifest at export: classifier-free guidance (one batch-2B call),
none (batch-B call, Turbo-style models), and a guidance embedding fed to the UNet (LCM).
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from .engine import Engine, cast_feed
from .samplers import Model

MODES = ("cfg", "none", "embedded")


Extra = Mapping[str, np.ndarray]


def unet_call(unet: Engine, sample: np.ndarray, t: float, context: np.ndarray, extra: Extra | None = None) -> np.ndarray:
    """One UNet engine call at timestep t for every row; the output comes back as float32.

    extra: image conditioning, per row. `channels` is concatenated to the latents (inpainting's mask and
    masked-image latents, the upscaler's low-resolution image); any other key is fed as is (class_labels,
    timestep_cond).
    """
    extra = dict(extra or {})
    channels = extra.pop("channels", None)
    if channels is not None:
        sample = np.concatenate([sample, np.asarray(channels, dtype=sample.dtype)], axis=1)
    feed = {"sample": sample, "timestep": np.full((sample.shape[0],), t, dtype=np.float64), "encoder_hidden_states": context, **extra}
    out = unet(cast_feed(unet.component, feed))
    return np.asarray(out[unet.component.outputs[0].name], dtype=np.float32)


def rescale_cfg(guided: np.ndarray, cond: np.ndarray, factor: float) -> np.ndarray:
    """guidance_rescale (Lin et al. 2023, arXiv:2305.08891, Sec. 3.4): match the conditional output's std."""
    axes = tuple(range(1, guided.ndim))
    rescaled = guided * (cond.std(axis=axes, ddof=1, keepdims=True) / guided.std(axis=axes, ddof=1, keepdims=True))
    return factor * rescaled + (1 - factor) * guided


def classifier_free(unet: Engine, cond: np.ndarray, uncond: np.ndarray, scale: float, rescale: float = 0.0, extra: Extra | None = None) -> Model:
    """Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598): one batch-2B call, split, mix."""
    context = np.concatenate([uncond, cond])
    doubled = {k: np.concatenate([v, v]) for k, v in (extra or {}).items()}  # both halves see the same image

    def model(x: np.ndarray, t: float) -> np.ndarray:
        u, c = np.split(unet_call(unet, np.concatenate([x, x]), t, context, doubled), 2)
        if scale <= 1.0:  # no guidance, as in diffusers: the conditional half alone
            return c
        guided = u + scale * (c - u)
        return rescale_cfg(guided, c, rescale) if rescale > 0 else guided

    return model


def unguided(unet: Engine, cond: np.ndarray, extra: Extra | None = None) -> Model:
    """A batch-B call on the prompt alone; extra's `timestep_cond` carries an LCM guidance embedding."""

    def model(x: np.ndarray, t: float) -> np.ndarray:
        return unet_call(unet, x, t, cond, extra)

    return model


def guidance_embedding(w: np.ndarray, dim: int) -> np.ndarray:
    """Sinusoidal embedding of the guidance weight (Luo et al. 2023, LCM, arXiv:2310.04378), as diffusers."""
    # float32 on purpose: angles reach ~1e4 rad, where float64 would drift from what the UNet was trained on
    half = dim // 2
    freqs = np.exp(np.arange(half, dtype=np.float32) * np.float32(-math.log(10000.0) / (half - 1)))
    angles = (np.asarray(w, dtype=np.float32) * np.float32(1000.0))[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32)
