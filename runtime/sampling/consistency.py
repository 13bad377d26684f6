"""Consistency-distilled samplers: LCM and TCD (few steps on the original_inference_steps grid)."""

from __future__ import annotations

import numpy as np

from ..schedule import NoiseSchedule, consistency_timesteps
from .common import Callback, Known, Model, check_start, clean_x0, evaluate, noise, noised_vp, reimpose, require_rng, step_done, to_x0_eps


def boundary_scalings(t: int, timestep_scaling: float, sigma_data: float = 0.5) -> tuple[float, float]:
    """(c_skip, c_out) that make the consistency function the identity at t = 0 (Song et al. 2023, arXiv:2303.01469)."""
    scaled = t * timestep_scaling
    return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / (scaled**2 + sigma_data**2) ** 0.5


def sample_lcm(
    model: Model,
    x: np.ndarray,
    schedule: NoiseSchedule,
    steps: int,
    *,
    init: np.ndarray | None = None,
    start: int = 0,
    known: Known | None = None,
    rng: np.random.Generator | None = None,
    callback: Callback = None,
) -> np.ndarray:
    """Latent Consistency Model multistep sampling (Luo et al. 2023, arXiv:2310.04378), as diffusers' LCMScheduler."""
    s = schedule.as_class("LCMScheduler")
    rng = require_rng(rng, "lcm")
    acp, timesteps, unit = s.alphas_cumprod, consistency_timesteps(s, steps), x
    check_start(start, steps, init, "lcm")
    if init is not None:
        x = noised_vp(init, unit, acp[timesteps[start]])
    for i in range(start, len(timesteps)):
        t = timesteps[i]
        c_skip, c_out = boundary_scalings(int(t), float(s.config["timestep_scaling"]))
        x0 = clean_x0(to_x0_eps(evaluate(model, x, t), x, acp[t], s.prediction_type)[0], s)
        x = c_out * x0 + c_skip * x
        if i + 1 < len(timesteps):  # noise back up to the next timestep; the last step returns the denoised x
            abar_next = acp[timesteps[i + 1]]
            x = abar_next**0.5 * x + (1 - abar_next) ** 0.5 * noise(rng, x)
        x = reimpose(x, known, lambda z: noised_vp(z, unit, acp[timesteps[i + 1]]), final=i + 1 == len(timesteps))
        x = step_done(x, i, t, callback)
    return x


def sample_tcd(
    model: Model,
    x: np.ndarray,
    schedule: NoiseSchedule,
    steps: int,
    *,
    eta: float = 0.3,
    init: np.ndarray | None = None,
    start: int = 0,
    known: Known | None = None,
    rng: np.random.Generator | None = None,
    callback: Callback = None,
) -> np.ndarray:
    """TCD's strategic stochastic sampling, eta being the paper's gamma (Zheng et al. 2024, arXiv:2402.19159)."""
    s = schedule.as_class("TCDScheduler")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"tcd: eta (the paper's gamma) must be between 0 (deterministic) and 1, got {eta}")
    if eta > 0:
        rng = require_rng(rng, "tcd with eta > 0")
    acp, timesteps, unit = s.alphas_cumprod, consistency_timesteps(s, steps), x
    check_start(start, steps, init, "tcd")
    if init is not None:
        x = noised_vp(init, unit, acp[timesteps[start]])
    for i in range(start, len(timesteps)):
        t = timesteps[i]
        t_next = int(timesteps[i + 1]) if i + 1 < len(timesteps) else 0
        # the intermediate timestep s = floor((1 - gamma) t_next), in float32 as diffusers computes it
        t_s = int(np.floor(np.float32(1 - eta) * np.float32(t_next)))
        x0, eps = to_x0_eps(evaluate(model, x, t), x, acp[t], s.prediction_type)  # TCD ignores clip_sample/thresholding
        x = acp[t_s] ** 0.5 * x0 + (1 - acp[t_s]) ** 0.5 * eps
        if eta > 0 and i + 1 < len(timesteps):
            ratio = acp[t_next] / acp[t_s]
            x = ratio**0.5 * x + (1 - ratio) ** 0.5 * noise(rng, x)  # type: ignore[arg-type]
        x = reimpose(x, known, lambda z: noised_vp(z, unit, acp[timesteps[i + 1]]), final=i + 1 == len(timesteps))
        x = step_done(x, i, t, callback)
    return x
