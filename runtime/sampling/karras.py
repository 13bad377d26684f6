"""Samplers in sigma space (x = x0 + sigma * eps, Karras et al. 2022): Euler, Euler ancestral, Heun."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from .common import Common, Model, begin, clean_x0, evaluate, require_rng
from .schedule import NoiseSchedule
from .sigmas import euler_sigmas, init_noise_sigma

if TYPE_CHECKING:
    from typing_extensions import Unpack


def model_input(x: np.ndarray, sigma: float) -> np.ndarray:
    """x / sqrt(sigma^2 + 1): the variance-preserving latents the network was trained on (scale_model_input)."""
    return x / math.sqrt(sigma * sigma + 1.0)


def denoised(output: np.ndarray, x: np.ndarray, sigma: float, prediction_type: str) -> np.ndarray:
    """x0 from the network's raw output for sigma-space latents x."""
    if prediction_type == "epsilon":
        return x - sigma * output
    if prediction_type == "v_prediction":
        return output * (-sigma / math.sqrt(sigma * sigma + 1.0)) + x / (sigma * sigma + 1.0)
    if prediction_type == "sample":
        return output
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def sample_euler(
    model: Model, x: np.ndarray, schedule: NoiseSchedule, steps: int, *,
    s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0, **kw: Unpack[Common],
) -> np.ndarray:  # fmt: skip
    """Euler on the probability-flow ODE, churn optional (Karras et al. 2022, arXiv:2206.00364, Alg. 2)."""
    s = schedule.as_class("EulerDiscreteScheduler")
    if s_churn > 0:
        require_rng(kw.get("rng"), "euler with s_churn > 0")
    timesteps, sigmas = euler_sigmas(s, steps, "euler")
    scale = init_noise_sigma(s, sigmas)
    x, run = begin(x, "euler", steps, sigma=lambda i: sigmas[i], scale=scale, **kw)
    for i in range(run.start, steps):
        t, sigma = timesteps[i], sigmas[i]
        out = evaluate(model, model_input(x, sigma), t)
        gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:  # diffusers churns after the model call, and converts v with the unchurned sigma
            x = x + run.noise(x) * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
        x0 = denoised(out, x, sigma_hat if s.prediction_type == "epsilon" else sigma, s.prediction_type)
        x = x + (x - x0) / sigma_hat * (sigmas[i + 1] - sigma_hat)
        x = run.end_step(x, i, t)
    return x


def sample_euler_a(model: Model, x: np.ndarray, schedule: NoiseSchedule, steps: int, **kw: Unpack[Common]) -> np.ndarray:
    """Euler ancestral: an Euler step down to sigma_down, fresh noise up to sigma_next (Karras et al. 2022; k-diffusion)."""
    s = schedule.as_class("EulerAncestralDiscreteScheduler")
    s.require("euler_a", prediction_type=("epsilon", "v_prediction"))
    require_rng(kw.get("rng"), "euler_a")
    timesteps, sigmas = euler_sigmas(s, steps, "euler_a")
    scale = init_noise_sigma(s, sigmas)
    x, run = begin(x, "euler_a", steps, sigma=lambda i: sigmas[i], scale=scale, **kw)
    for i in range(run.start, steps):
        t, sigma, sigma_next = timesteps[i], sigmas[i], sigmas[i + 1]
        x0 = denoised(evaluate(model, model_input(x, sigma), t), x, sigma, s.prediction_type)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x = x + (x - x0) / sigma * (sigma_down - sigma)
        if sigma_up > 0:  # diffusers also draws on the last step, where sigma_up is 0
            x = x + sigma_up * run.noise(x)
        x = run.end_step(x, i, t)
    return x


def sample_heun(model: Model, x: np.ndarray, schedule: NoiseSchedule, steps: int, **kw: Unpack[Common]) -> np.ndarray:
    """Heun's 2nd-order method, Euler on the last step (Karras et al. 2022, arXiv:2206.00364, Alg. 1)."""
    s = schedule.as_class("HeunDiscreteScheduler")
    timesteps, sigmas = euler_sigmas(s, steps, "heun")
    scale = init_noise_sigma(s, sigmas)
    x, run = begin(x, "heun", steps, sigma=lambda i: sigmas[i], scale=scale, **kw)

    def slope(x: np.ndarray, i: int) -> np.ndarray:
        x0 = denoised(evaluate(model, model_input(x, sigmas[i]), timesteps[i]), x, sigmas[i], s.prediction_type)
        d: np.ndarray = (x - clean_x0(x0, s)) / sigmas[i]
        return d

    for i in range(run.start, steps):
        t, dt = timesteps[i], sigmas[i + 1] - sigmas[i]
        d = slope(x, i)
        if i + 1 < steps:  # diffusers re-imposes the known region on the Euler half-step too, before the second slope
            x = x + (d + slope(run.reimpose(x + d * dt, i), i + 1)) / 2 * dt
        else:
            x = x + d * dt
        x = run.end_step(x, i, t)
    return x
