"""What every sampler shares: the model contract, prediction-type conversions, noise, per-step reporting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..schedule import NoiseSchedule

# model(x, t) -> the network's raw output (epsilon, v or x0, per the schedule's prediction_type)
Model = Callable[[np.ndarray, float], np.ndarray]
Callback = Optional[Callable[[int, float, np.ndarray], None]]


def evaluate(model: Model, x: np.ndarray, t: float) -> np.ndarray:
    """One network call: float32 latents in, as diffusers feeds them; float64 out, so each step's arithmetic is float64."""
    return np.asarray(model(np.asarray(x, dtype=np.float32), float(t)), dtype=np.float64)


def to_x0_eps(output: np.ndarray, x: np.ndarray, abar: float, prediction_type: str) -> tuple[np.ndarray, np.ndarray]:
    """Recover (x0, epsilon) from a model output of any prediction type (Salimans & Ho 2022 for v)."""
    a, s = abar**0.5, (1.0 - abar) ** 0.5
    if prediction_type == "epsilon":
        return (x - s * output) / a, output
    if prediction_type == "v_prediction":
        return a * x - s * output, a * output + s * x
    if prediction_type == "sample":
        return output, (x - a * output) / s
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def threshold(x0: np.ndarray, ratio: float, max_value: float) -> np.ndarray:
    """Dynamic thresholding (Saharia et al. 2022, arXiv:2205.11487): clip each sample at its |x0| quantile."""
    flat = x0.reshape(len(x0), -1)
    s = np.clip(np.quantile(np.abs(flat), ratio, axis=1), 1.0, max_value)[:, None]
    return (np.clip(flat, -s, s) / s).reshape(x0.shape)


def clean_x0(x0: np.ndarray, schedule: NoiseSchedule) -> np.ndarray:
    """Thresholding, else clip_sample, wherever the scheduler class has them and the config turns them on."""
    config = schedule.config
    if config.get("thresholding"):
        return threshold(x0, float(config["dynamic_thresholding_ratio"]), float(config["sample_max_value"]))
    if config.get("clip_sample"):
        return np.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
    return x0


def require_rng(rng: np.random.Generator | None, sampler: str) -> np.random.Generator:
    if rng is None:
        raise ValueError(f"{sampler} draws noise: pass rng=np.random.default_rng(seed)")
    return rng


def noise(rng: np.random.Generator, like: np.ndarray) -> np.ndarray:
    """The one way samplers draw noise: float32 standard normal of x's shape from the caller's generator."""
    return rng.standard_normal(like.shape, dtype=np.float32)


def step_done(x: np.ndarray, i: int, t: float, callback: Callback) -> np.ndarray:
    """End of step i at timestep t: latents back to float32, then the caller hears about them."""
    x = np.asarray(x, dtype=np.float32)
    if callback is not None:
        callback(i, float(t), x)
    return x


@dataclass(frozen=True)
class Known:
    """Inpainting with an ordinary UNet: clean `latents` to keep where `mask` is 0 (1 = generate), (B or 1, 1, h, w)."""

    latents: np.ndarray
    mask: np.ndarray


def check_start(start: int, steps: int, init: np.ndarray | None, sampler: str) -> None:
    if not 0 <= start < steps:
        raise ValueError(f"{sampler}: start must be in [0, {steps}) for {steps} steps (it skips that many), got {start}")
    if start and init is None:
        raise ValueError(f"{sampler}: start={start} skips the noisiest steps, so it needs init (the latents to noise and denoise)")


def noised_vp(init: np.ndarray, noise: np.ndarray, abar: float) -> np.ndarray:
    """init at noise level abar in variance-preserving form: sqrt(abar) init + sqrt(1 - abar) noise (add_noise)."""
    return abar**0.5 * np.asarray(init, dtype=np.float64) + (1.0 - abar) ** 0.5 * noise


def noised_sigma(init: np.ndarray, noise: np.ndarray, sigma: float) -> np.ndarray:
    """init at noise level sigma in sigma space: init + sigma noise (the Karras-style samplers' add_noise)."""
    return np.asarray(init, dtype=np.float64) + sigma * noise


def reimpose(x: np.ndarray, known: Known | None, renoised: Callable[[np.ndarray], np.ndarray], final: bool = False) -> np.ndarray:
    """Reset the kept region to the known latents noised to the next step's level; after the last step, to
    the clean latents themselves (diffusers' inpaint blend)."""
    if known is None:
        return x
    return (1.0 - known.mask) * (known.latents if final else renoised(known.latents)) + known.mask * x
