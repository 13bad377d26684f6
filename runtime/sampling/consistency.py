"""Consistency-distilled samplers: LCM and TCD (few steps on the original_inference_steps grid)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .common import Common, Model, begin, evaluate, noised_vp, predict_x0, require_rng, to_x0_eps
from .schedule import NoiseSchedule, consistency_timesteps

if TYPE_CHECKING:
    from typing_extensions import Unpack


def boundary_scalings(t: int, timestep_scaling: float, sigma_data: float = 0.5) -> tuple[float, float]:
    """(c_skip, c_out) that make the consistency function the identity at t = 0 (Song et al. 2023, arXiv:2303.01469)."""
    scaled = t * timestep_scaling
    return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / (scaled**2 + sigma_data**2) ** 0.5


def sample_lcm(model: Model, x: np.ndarray, schedule: NoiseSchedule, steps: int, **kw: Unpack[Common]) -> np.ndarray:
    """Latent Consistency Model multistep sampling (Luo et al. 2023, arXiv:2310.04378), as diffusers' LCMScheduler."""
    s = schedule.as_class("LCMScheduler")
    require_rng(kw.get("rng"), "lcm")
    acp, timesteps = s.alphas_cumprod, consistency_timesteps(s, steps)
    x, run = begin(x, "lcm", steps, abar=lambda i: acp[timesteps[i]], **kw)
    for i, t in enumerate(timesteps[run.start :], run.start):
        c_skip, c_out = boundary_scalings(int(t), float(s.config["timestep_scaling"]))
        x = c_out * predict_x0(model, s, x, t, acp[t]) + c_skip * x
        if i + 1 < len(timesteps):  # noise back up to the next timestep; the last step returns the denoised x
            x = noised_vp(x, run.noise(x), acp[timesteps[i + 1]])
        x = run.end_step(x, i, t)
    return x


def sample_tcd(model: Model, x: np.ndarray, schedule: NoiseSchedule, steps: int, *, eta: float = 0.3, **kw: Unpack[Common]) -> np.ndarray:
    """TCD's strategic stochastic sampling, eta being the paper's gamma (Zheng et al. 2024, arXiv:2402.19159)."""
    s = schedule.as_class("TCDScheduler")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"tcd: eta (the paper's gamma) must be between 0 (deterministic) and 1, got {eta}")
    if eta > 0:
        require_rng(kw.get("rng"), "tcd with eta > 0")
    acp, timesteps = s.alphas_cumprod, consistency_timesteps(s, steps)
    x, run = begin(x, "tcd", steps, abar=lambda i: acp[timesteps[i]], **kw)
    for i, t in enumerate(timesteps[run.start :], run.start):
        t_next = int(timesteps[i + 1]) if i + 1 < len(timesteps) else 0
        # the intermediate timestep s = floor((1 - gamma) t_next), in float32 as diffusers computes it
        t_s = int(np.floor(np.float32(1 - eta) * np.float32(t_next)))
        x0, eps = to_x0_eps(evaluate(model, x, t), x, acp[t], s.prediction_type)  # TCD ignores clip_sample/thresholding
        x = acp[t_s] ** 0.5 * x0 + (1 - acp[t_s]) ** 0.5 * eps
        if eta > 0 and i + 1 < len(timesteps):
            x = noised_vp(x, run.noise(x), acp[t_next] / acp[t_s])
        x = run.end_step(x, i, t)
    return x
