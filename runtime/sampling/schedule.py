"""Noise schedules and timestep spacings, read from a diffusers scheduler_config.json.

A model ships one scheduler config, but any sampler may run on it: each sampler reads the
config as its diffusers class would (`SomeScheduler.from_config(config)`): the model's value
for every option that class has, the class's own default for the rest. Everything is
computed once per generation in float64; samplers cast at the boundary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")

_BETAS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None)
_THRESHOLDING = dict(thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0)
_SIGMA_SPACINGS = dict(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
_FLOW = dict(use_flow_sigmas=False, flow_shift=1.0, use_dynamic_shifting=False, time_shift_type="exponential")
_CONSISTENCY = dict(
    _BETAS, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", original_inference_steps=50,
    clip_sample=False, clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon",
    **_THRESHOLDING, timestep_spacing="leading", timestep_scaling=10.0, rescale_betas_zero_snr=False,
)  # fmt: skip

# Every __init__ option of each diffusers (0.42) scheduler class we follow, with its default.
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDPMScheduler": dict(
        _BETAS, variance_type="fixed_small", clip_sample=True, prediction_type="epsilon", **_THRESHOLDING,
        clip_sample_range=1.0, timestep_spacing="leading", steps_offset=0, rescale_betas_zero_snr=False,
    ),
    "DDIMScheduler": dict(
        _BETAS, clip_sample=True, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon", **_THRESHOLDING,
        clip_sample_range=1.0, timestep_spacing="leading", rescale_betas_zero_snr=False,
    ),
    "PNDMScheduler": dict(
        _BETAS, skip_prk_steps=False, set_alpha_to_one=False, prediction_type="epsilon", timestep_spacing="leading",
        steps_offset=0,
    ),
    "EulerDiscreteScheduler": dict(
        _BETAS, prediction_type="epsilon", interpolation_type="linear", **_SIGMA_SPACINGS, sigma_min=None,
        sigma_max=None, timestep_spacing="linspace", timestep_type="discrete", steps_offset=0,
        rescale_betas_zero_snr=False, final_sigmas_type="zero",
    ),
    "EulerAncestralDiscreteScheduler": dict(
        _BETAS, prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False,
    ),
    "HeunDiscreteScheduler": dict(
        _BETAS, beta_start=0.00085, beta_end=0.012, prediction_type="epsilon", **_SIGMA_SPACINGS, clip_sample=False,
        clip_sample_range=1.0, timestep_spacing="linspace", steps_offset=0,
    ),
    "DPMSolverMultistepScheduler": dict(
        _BETAS, solver_order=2, prediction_type="epsilon", **_THRESHOLDING, algorithm_type="dpmsolver++",
        solver_type="midpoint", lower_order_final=True, euler_at_final=False, **_SIGMA_SPACINGS, use_lu_lambdas=False,
        **_FLOW, final_sigmas_type="zero", lambda_min_clipped=-math.inf, variance_type=None,
        timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False,
    ),
    "UniPCMultistepScheduler": dict(
        _BETAS, solver_order=2, prediction_type="epsilon", **_THRESHOLDING, predict_x0=True, solver_type="bh2",
        lower_order_final=True, disable_corrector=[], solver_p=None, **_SIGMA_SPACINGS, **_FLOW,
        timestep_spacing="linspace", steps_offset=0, final_sigmas_type="zero", rescale_betas_zero_snr=False,
        sigma_min=None, sigma_max=None, shift_terminal=None,
    ),
    "LCMScheduler": dict(_CONSISTENCY),
    "TCDScheduler": dict(_CONSISTENCY),
}  # fmt: skip

# diffusers' sigma-space schedulers clamp the zero-SNR terminal alpha-bar to 2**-24 so sigma_max stays finite.
TERMINAL_ALPHA_FLOOR = {
    "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
}  # fmt: skip


@dataclass(frozen=True)
class NoiseSchedule:
    """A model's scheduler config as one diffusers class reads it, and its training alphas_cumprod (float64)."""

    class_name: str
    config: Mapping[str, Any]  # every option of class_name: the model's value, else the class default
    source: Mapping[str, Any]  # the model's config as given (plus overrides), to be read again by another class
    alphas_cumprod: np.ndarray = field(repr=False)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def prediction_type(self) -> str:
        kind: str = self.config["prediction_type"]
        return kind

    @property
    def timestep_spacing(self) -> str:
        spacing: str = self.config["timestep_spacing"]
        return spacing

    @property
    def steps_offset(self) -> int:
        return int(self.config["steps_offset"])

    @property
    def clip_sample_range(self) -> float:
        return float(self.config.get("clip_sample_range", 1.0))

    @property
    def final_alpha_cumprod(self) -> float:
        """The alpha-bar a step past t=0 lands on (diffusers' `set_alpha_to_one`)."""
        return 1.0 if self.config.get("set_alpha_to_one", True) else float(self.alphas_cumprod[0])

    def hidden(self, key: str) -> Any:
        """An option read the way diffusers' `hasattr(self.config, key)` does: the class's, else the model's raw one."""
        return self.config[key] if key in self.config else self.source.get(key)

    def as_class(self, class_name: str, **overrides: Any) -> NoiseSchedule:
        """This model's config as `class_name.from_config(config, **overrides)` would read it."""
        if class_name == self.class_name and all(self.config.get(k) == v for k, v in overrides.items()):
            return self
        return noise_schedule(self.source, class_name, **overrides)

    def require(self, sampler: str, **supported: tuple[Any, ...]) -> None:
        """Refuse config options this sampler does not implement, naming the option and what works."""
        for key, ok in supported.items():
            if key in self.config and self.config[key] not in ok:
                raise ValueError(
                    f"{sampler}: scheduler config {key}={self.config[key]!r} is not supported "
                    f"(supported: {', '.join(map(repr, ok))}); change it in the model's scheduler config or pick another sampler"
                )


def noise_schedule(config: Mapping[str, Any], class_name: str = "DDIMScheduler", **overrides: Any) -> NoiseSchedule:
    """What `class_name.from_config(config, **overrides)` builds: shared options kept, class defaults for the rest."""
    if class_name not in CLASS_DEFAULTS:
        raise ValueError(f"scheduler class {class_name!r} is not one of {', '.join(CLASS_DEFAULTS)}")
    source = {**{k: v for k, v in config.items() if not k.startswith("_")}, **overrides}
    defaults = CLASS_DEFAULTS[class_name]
    resolved = {k: source.get(k, default) for k, default in defaults.items()}
    prediction_type = resolved["prediction_type"]
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"scheduler config: prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")
    betas = betas_for(resolved)
    rescale = bool(resolved.get("rescale_betas_zero_snr", False))
    if rescale:
        betas = rescale_zero_terminal_snr(betas)
    alphas_cumprod = np.cumprod(1.0 - betas)
    if rescale and class_name in TERMINAL_ALPHA_FLOOR:
        alphas_cumprod[-1] = 2.0**-24
    return NoiseSchedule(class_name, MappingProxyType(resolved), MappingProxyType(source), alphas_cumprod)


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
        def f(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

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


def check_steps(schedule: NoiseSchedule, steps: int) -> None:
    n = schedule.num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise ValueError(f"steps must be a whole number, got {steps!r}")
    if not 1 <= steps <= n:
        raise ValueError(f"steps must be between 1 and the model's {n} training timesteps, got {steps}")


def spaced_timesteps(schedule: NoiseSchedule, steps: int, *, discrete: bool = True) -> np.ndarray:
    """The inference timesteps, descending, per timestep_spacing (Lin et al. 2023, Table 2).

    discrete=False keeps linspace's fractional timesteps, as diffusers' Euler and Heun do.
    """
    check_steps(schedule, steps)
    ts = _spaced(schedule, steps, discrete)
    if discrete:
        check_timesteps(schedule, steps, ts, lambda k: _spaced(schedule, k, True))
    return ts.astype(np.int64) if discrete else ts.astype(np.float64)


def _spaced(schedule: NoiseSchedule, steps: int, discrete: bool) -> np.ndarray:
    n = schedule.num_train_timesteps
    spacing = schedule.timestep_spacing
    ts: np.ndarray
    if spacing == "leading":
        ts = (np.arange(steps) * (n // steps)).round()[::-1] + schedule.steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(n, 0, -n / steps)) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, n - 1, steps)[::-1]
        if discrete:
            ts = ts.round()
    else:
        raise ValueError(f"scheduler config: timestep_spacing {spacing!r} is not one of {', '.join(SPACINGS)}")
    return ts


def check_timesteps(schedule: NoiseSchedule, steps: int, ts: np.ndarray, grid: Callable[[int], np.ndarray]) -> None:
    """Refuse a step count whose timesteps leave the training range or repeat, naming the most this spacing supports."""
    n = schedule.num_train_timesteps
    if ts.max() <= n - 1 and ts.min() >= 0 and len(np.unique(ts)) == len(ts):
        return
    limit = next((k for k in range(steps - 1, 0, -1) if _valid_grid(grid(k), n)), 1)
    raise ValueError(
        f"steps {steps} is more than this sampler supports with the model's timestep_spacing "
        f"{schedule.timestep_spacing!r} (steps_offset {schedule.steps_offset}): at most {limit} steps"
    )


def _valid_grid(ts: np.ndarray, n: int) -> bool:
    return bool(ts.max() <= n - 1 and ts.min() >= 0 and len(np.unique(ts)) == len(ts))


def consistency_timesteps(schedule: NoiseSchedule, steps: int) -> np.ndarray:
    """LCM/TCD's timesteps: `steps` evenly skipped from the original_inference_steps distillation grid."""
    check_steps(schedule, steps)
    n, original = schedule.num_train_timesteps, int(schedule.config["original_inference_steps"])
    if not 1 <= original <= n:
        raise ValueError(f"scheduler config: original_inference_steps must be between 1 and {n}, got {original}")
    if steps > original:
        raise ValueError(
            f"steps ({steps}) cannot exceed the scheduler config's original_inference_steps ({original}): "
            "the timesteps are a subset of that distillation grid"
        )
    grid = (np.arange(1, original + 1) * (n // original) - 1)[::-1]
    return grid[np.floor(np.linspace(0, original, steps, endpoint=False)).astype(np.int64)]
