"""Noise schedules and timestep spacings, read from a diffusers scheduler_config.json.

Everything is computed once per generation in float64; samplers cast at the boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class NoiseSchedule:
    """The training-time schedule: alphas_cumprod over num_train_timesteps, float64."""

    alphas_cumprod: np.ndarray
    prediction_type: str
    timestep_spacing: str
    steps_offset: int
    set_alpha_to_one: bool
    clip_sample: bool
    clip_sample_range: float

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def final_alpha_cumprod(self) -> float:
        """The alpha-bar DDIM steps to past t=0 (diffusers' `set_alpha_to_one`)."""
        return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])


def betas_for(config: Mapping[str, Any]) -> np.ndarray:
    """beta_schedule: linear, scaled_linear (SD), squaredcos_cap_v2 (Nichol & Dhariwal 2021)."""
    n = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    kind = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], dtype=np.float64)
    if kind == "linear":
        return np.linspace(start, end, n, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    if kind == "squaredcos_cap_v2":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=np.float64)
    raise ValueError(f"scheduler config: beta_schedule {kind!r} is not supported (linear, scaled_linear, squaredcos_cap_v2)")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Make the last timestep pure noise (Lin et al. 2023, arXiv:2305.08891, Algorithm 1)."""
    abar_sqrt = np.sqrt(np.cumprod(1.0 - betas))
    first, last = abar_sqrt[0], abar_sqrt[-1]
    abar_sqrt = (abar_sqrt - last) * first / (first - last)
    abar = abar_sqrt**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def noise_schedule(config: Mapping[str, Any]) -> NoiseSchedule:
    """Build the schedule a diffusers scheduler would build from the same config."""
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"scheduler config: prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")
    betas = betas_for(config)
    if config.get("rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    alphas_cumprod = np.cumprod(1.0 - betas)
    return NoiseSchedule(
        alphas_cumprod=alphas_cumprod,
        prediction_type=prediction_type,
        timestep_spacing=config.get("timestep_spacing", "leading"),
        steps_offset=int(config.get("steps_offset", 0)),
        set_alpha_to_one=bool(config.get("set_alpha_to_one", True)),
        clip_sample=bool(config.get("clip_sample", False)),
        clip_sample_range=float(config.get("clip_sample_range", 1.0)),
    )


def spaced_timesteps(schedule: NoiseSchedule, steps: int) -> np.ndarray:
    """The inference timesteps, descending, per timestep_spacing (Lin et al. 2023, Table 2)."""
    n = schedule.num_train_timesteps
    if not 1 <= steps <= n:
        raise ValueError(f"steps must be between 1 and the model's {n} training timesteps, got {steps}")
    spacing = schedule.timestep_spacing
    if spacing == "leading":
        ratio = n // steps
        ts = (np.arange(steps) * ratio).round()[::-1] + schedule.steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(n, 0, -n / steps)) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, n - 1, steps).round()[::-1]
    else:
        raise ValueError(f"scheduler config: timestep_spacing {spacing!r} is not one of leading, trailing, linspace")
    return ts.astype(np.int64)
