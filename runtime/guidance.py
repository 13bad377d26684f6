"""Guidance wraps the UNet engine into the `model(x, t)` callable samplers expect."""

from __future__ import annotations

import numpy as np

from .engine import Engine, cast_feed
from .samplers import Model


def unet_call(unet: Engine, sample: np.ndarray, t: float, context: np.ndarray) -> np.ndarray:
    """One UNet engine call at timestep t for every row; the output comes back as float32."""
    feed = {
        "sample": sample,
        "timestep": np.full((sample.shape[0],), t, dtype=np.float64),
        "encoder_hidden_states": context,
    }
    out = unet(cast_feed(unet.component, feed))
    return np.asarray(out[unet.component.outputs[0].name], dtype=np.float32)


def classifier_free(unet: Engine, cond: np.ndarray, uncond: np.ndarray, scale: float) -> Model:
    """Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598): one batch-2B call, split, mix."""
    context = np.concatenate([uncond, cond])

    def model(x: np.ndarray, t: float) -> np.ndarray:
        u, c = np.split(unet_call(unet, np.concatenate([x, x]), t, context), 2)
        # scale <= 1 means no guidance, as in diffusers: the conditional half alone
        return c if scale <= 1.0 else u + scale * (c - u)

    return model
