"""Samplers: pure functions `sample_x(model, x, schedule, steps, ...) -> x`.

`model(x, t)` returns the network's raw output (epsilon, v or x0, per the schedule's
prediction_type); guidance is the model wrapper's business, not the sampler's.
`callback(i, t, x)` runs after every step. Noise comes only from the `rng` passed in.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from .schedule import NoiseSchedule, spaced_timesteps

Model = Callable[[np.ndarray, float], np.ndarray]
Callback = Optional[Callable[[int, float, np.ndarray], None]]


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


def sample_ddim(
    model: Model,
    x: np.ndarray,
    schedule: NoiseSchedule,
    steps: int,
    *,
    eta: float = 0.0,
    rng: np.random.Generator | None = None,
    callback: Callback = None,
) -> np.ndarray:
    """DDIM (Song et al. 2020, arXiv:2010.02502), step for step as diffusers' DDIMScheduler."""
    if eta and rng is None:
        raise ValueError("ddim with eta > 0 draws noise: pass rng=np.random.default_rng(seed)")
    acp = schedule.alphas_cumprod
    timesteps = spaced_timesteps(schedule, steps)
    stride = schedule.num_train_timesteps // steps
    for i, t in enumerate(timesteps):
        # diffusers steps back by a fixed stride, not to the next listed timestep
        prev = t - stride
        abar, abar_prev = acp[t], (acp[prev] if prev >= 0 else schedule.final_alpha_cumprod)
        x0, eps = to_x0_eps(model(x, float(t)), x, abar, schedule.prediction_type)
        if schedule.clip_sample:
            r = schedule.clip_sample_range
            x0 = np.clip(x0, -r, r)  # eps stays unclipped, as diffusers' default step()
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)) ** 0.5
        x = abar_prev**0.5 * x0 + (1 - abar_prev - sigma**2) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * rng.standard_normal(x.shape, dtype=np.float32)  # type: ignore[union-attr]
        x = x.astype(np.float32, copy=False)
        if callback is not None:
            callback(i, float(t), x)
    return x


SAMPLERS: dict[str, Callable[..., np.ndarray]] = {"ddim": sample_ddim}

# The diffusers scheduler class a model's config names -> our sampler for it.
DEFAULT_FOR_CLASS = {"DDIMScheduler": "ddim"}


def default_sampler(class_name: str | None) -> str:
    """The sampler a model's scheduler_config names; DDIM where we have no exact match yet."""
    return DEFAULT_FOR_CLASS.get(class_name or "", "ddim")


def get_sampler(name: str) -> Callable[..., np.ndarray]:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(sorted(SAMPLERS))}") from None
