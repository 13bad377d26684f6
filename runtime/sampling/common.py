"""What every sampler shares: the model contract, prediction-type conversions, noise, and a run's start and step ends.

Schedules and each step's arithmetic are float64; `evaluate` (into the network) and `step_done`
(out to the caller, after every step) are where latents are cast to float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

import numpy as np

if TYPE_CHECKING:
    from .schedule import NoiseSchedule

# model(x, t) -> the network's raw output (epsilon, v or x0, per the schedule's prediction_type)
Model = Callable[[np.ndarray, float], np.ndarray]
Callback = Callable[[int, float, np.ndarray], None] | None
Rng = np.random.Generator | None


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


def predict_x0(model: Model, s: NoiseSchedule, x: np.ndarray, t: float, abar: float) -> np.ndarray:
    """The model's clean latents for variance-preserving x at timestep t (alpha-bar abar), cleaned as the config says."""
    return clean_x0(to_x0_eps(evaluate(model, x, t), x, abar, s.prediction_type)[0], s)


def threshold(x0: np.ndarray, ratio: float, max_value: float) -> np.ndarray:
    """Dynamic thresholding (Saharia et al. 2022, arXiv:2205.11487): clip each sample at its |x0| quantile."""
    flat = x0.reshape(len(x0), -1)
    s = np.clip(np.quantile(np.abs(flat), ratio, axis=1), 1.0, max_value)[:, None]
    clipped: np.ndarray = (np.clip(flat, -s, s) / s).reshape(x0.shape)
    return clipped


def clean_x0(x0: np.ndarray, schedule: NoiseSchedule) -> np.ndarray:
    """Thresholding, else clip_sample, wherever the scheduler class has them and the config turns them on."""
    config = schedule.config
    if config.get("thresholding"):
        return threshold(x0, float(config["dynamic_thresholding_ratio"]), float(config["sample_max_value"]))
    if config.get("clip_sample"):
        clipped: np.ndarray = np.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
        return clipped
    return x0


def require_rng(rng: Rng, sampler: str) -> np.random.Generator:
    if rng is None:
        raise ValueError(f"{sampler} draws noise: pass rng=np.random.default_rng(seed)")
    return rng


def noise(rng: np.random.Generator, like: np.ndarray) -> np.ndarray:
    """The one way samplers draw noise: float32 standard normal of x's shape from the caller's generator."""
    return rng.standard_normal(like.shape, dtype=np.float32)


def noised_vp(init: np.ndarray, noise: np.ndarray, abar: float) -> np.ndarray:
    """init at noise level abar in variance-preserving form: sqrt(abar) init + sqrt(1 - abar) noise (add_noise)."""
    noised: np.ndarray = abar**0.5 * np.asarray(init, dtype=np.float64) + (1.0 - abar) ** 0.5 * noise
    return noised


def noised_sigma(init: np.ndarray, noise: np.ndarray, sigma: float) -> np.ndarray:
    """init at noise level sigma in sigma space: init + sigma noise (the Karras-style samplers' add_noise)."""
    return np.asarray(init, dtype=np.float64) + sigma * noise


@dataclass(frozen=True)
class Known:
    """Inpainting with an ordinary UNet: clean `latents` to keep where `mask` is 0 (1 = generate), (B or 1, 1, h, w)."""

    latents: np.ndarray
    mask: np.ndarray


class Common(TypedDict, total=False):
    """The keywords every sampler takes besides its own options, as `**kw: Unpack[Common]`, all passed on to begin.

    init: clean latents for img2img, noised with x to the level before step `start` (default: none, pure noise).
    start: how many of the `steps` to skip, 0 <= start < steps; more than 0 needs init (default 0).
    known: inpainting with an ordinary UNet, the region to keep (a Known; default: none).
    rng: the generator every noise draw comes from, needed only by samplers that draw noise (default: none).
    callback: callback(i, t, x) after every step, one per requested step however many model calls it took.
    resume: init is already at step `start`'s noise level (another run's latents, handed over mid-schedule as
    diffusers' denoising_end / denoising_start do): it is taken as is, not noised (default False).
    """

    init: np.ndarray | None
    start: int
    known: Known | None
    rng: Rng
    callback: Callback
    resume: bool


def step_done(x: np.ndarray, i: int, t: float, callback: Callback) -> np.ndarray:
    """End of step i at timestep t: latents back to float32, then the caller hears about them."""
    x = np.asarray(x, dtype=np.float32)
    if callback is not None:
        callback(i, float(t), x)
    return x


@dataclass(frozen=True)
class Run:
    """One sampler call's noise levels and edits, which decide how it starts and how each of its steps ends.

    level(i): the noise level before step i, float64: alpha-bar for variance-preserving latents (vp), else
    sigma. n: the steps the sampler's loop counts (after step n - 1 the known region is the clean latents).
    unit: the noise the sampler was handed, which img2img and inpainting noise their clean latents with.
    The rest are the sampler's name and its Common keywords, checked: the loop runs from step `start`.
    """

    unit: np.ndarray
    level: Callable[[int], float]
    vp: bool
    n: int
    sampler: str
    init: np.ndarray | None
    start: int
    known: Known | None
    rng: Rng
    callback: Callback

    def noise(self, like: np.ndarray) -> np.ndarray:
        """Fresh noise of like's shape from the caller's rng (a sampler that draws checks for it with require_rng
        before begin, so that its error comes where it always has)."""
        return noise(require_rng(self.rng, self.sampler), like)

    def noised(self, latents: np.ndarray, i: int) -> np.ndarray:
        """Clean latents at the noise level before step i (diffusers' add_noise)."""
        return (noised_vp if self.vp else noised_sigma)(latents, self.unit, self.level(i))

    def reimpose(self, x: np.ndarray, i: int) -> np.ndarray:
        """After step i, the kept region reset to the known latents noised to step i + 1's level; after the last
        step, to the clean latents themselves (diffusers' inpaint blend). x as it is without `known`."""
        if self.known is None:
            return x
        kept = self.known.latents if i + 1 == self.n else self.noised(self.known.latents, i + 1)
        blended: np.ndarray = (1.0 - self.known.mask) * kept + self.known.mask * x
        return blended

    def end_step(self, x: np.ndarray, i: int, t: float) -> np.ndarray:
        """End of step i at timestep t: the known region re-imposed, then step_done."""
        return step_done(self.reimpose(x, i), i, t, self.callback)


def begin(
    x: np.ndarray, sampler: str, steps: int, *, abar: Callable[[int], float] | None = None,
    sigma: Callable[[int], float] | None = None, scale: float | None = None, n: int | None = None,
    init: np.ndarray | None = None, start: int = 0, known: Known | None = None, rng: Rng = None, callback: Callback = None,
    resume: bool = False,
) -> tuple[np.ndarray, Run]:  # fmt: skip
    """A sampler's start: its Common keywords checked, then the latents step `start` begins from and the Run.

    x is unit-variance noise. From pure noise the run begins at x times `scale` (diffusers'
    init_noise_sigma, where it has one); img2img (init given) begins at init noised with x to the
    level before step `start`, as diffusers' add_noise at the begin index. The level before step i
    comes as abar(i) for variance-preserving latents or sigma(i) in sigma space: a function, so only
    the levels used are looked up (a run from step 1 never reads step 0's timestep, which may lie past
    the schedule's end). n: the steps the loop counts, where that is not `steps`. The Common keywords
    are spelled out here, so that a sampler's misspelled keyword is Python's TypeError naming it.
    """
    level = abar or sigma
    if level is None:
        raise TypeError("begin() needs the noise levels, as abar= or sigma=")
    check_start(start, steps, init, sampler)
    run = Run(x, level, sigma is None, steps if n is None else n, sampler, init, start, known, rng, callback)
    if init is not None:
        return (np.asarray(init, dtype=np.float64) if resume else run.noised(init, start)), run
    return (x if scale is None else x * scale), run


def check_start(start: int, steps: int, init: np.ndarray | None, sampler: str) -> None:
    if not 0 <= start < steps:
        raise ValueError(f"{sampler}: start must be in [0, {steps}) for {steps} steps (it skips that many), got {start}")
    if start and init is None:
        raise ValueError(f"{sampler}: start={start} skips the noisiest steps, so it needs init (the latents to noise and denoise)")
