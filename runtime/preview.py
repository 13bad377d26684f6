"""Live previews: the sampler's current estimate of the clean latents, made visible every k steps, cheaply.

The estimate is x0 from the last model call of the step (its output converted by the prediction type); it becomes
an image through the tiny VAE decoder where the bundle has one, else through the linear latent-to-RGB map fitted at
export (one small matmul per latent pixel: an image at the latents' resolution).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .bundle.levers import PreviewInfo
from .sampling.common import to_x0_eps

# preview(step, total, images): images float32 (B, h, w, 3) in [0, 1]
PreviewCallback = Callable[[int, int, np.ndarray], None]


def check_every(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"preview_every must be a whole number >= 1 (a preview every that many steps), got {value!r}")
    return int(value)


def linear_preview(latents: np.ndarray, info: PreviewInfo) -> np.ndarray:
    """(B, C, h, w) scaled latents -> (B, h, w, 3) float32 in [0, 1] through the fitted map."""
    weights, bias = np.asarray(info.weights, dtype=np.float32), np.asarray(info.bias, dtype=np.float32)
    rgb = np.einsum("bchw,cr->bhwr", latents.astype(np.float32), weights) + bias
    clipped: np.ndarray = np.clip(rgb, 0.0, 1.0).astype(np.float32)
    return clipped


class Recorder:
    """Wraps the guided model to keep its last call, from which a step's x0 estimate is made."""

    def __init__(self, model: Callable[[np.ndarray, float], np.ndarray]):
        self.model = model
        self.last: tuple[np.ndarray, float, np.ndarray] | None = None

    def __call__(self, x: np.ndarray, t: float) -> np.ndarray:
        out = self.model(x, t)
        self.last = (x, t, out)
        return out

    def estimate(self, alphas_cumprod: np.ndarray, prediction_type: str) -> np.ndarray | None:
        """x0 as the last call saw it (alpha-bar at the nearest training timestep), float32."""
        if self.last is None:
            return None
        x, t, out = self.last
        abar = float(alphas_cumprod[int(np.clip(round(t), 0, len(alphas_cumprod) - 1))])
        x0 = to_x0_eps(np.asarray(out, np.float64), np.asarray(x, np.float64), abar, prediction_type)[0]
        return np.asarray(x0, dtype=np.float32)
