"""The sampler table: each sampler's name, its grid as data, whether it draws noise, the one a model's scheduler class
calls for, and get_sampler's option check."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .common import Common, Model
from .consistency import sample_lcm, sample_tcd
from .discrete import sample_ddim, sample_ddpm, sample_pndm
from .grids import Grid, consistency_grid, discrete_grid, dpmpp_grid, euler_grid, pndm_grid, unipc_grid
from .karras import sample_euler, sample_euler_a, sample_heun
from .multistep import sample_dpmpp_2m, sample_dpmpp_2m_karras, sample_unipc
from .schedule import NoiseSchedule

__all__ = [
    "TABLE", "SAMPLERS", "DEFAULT_FOR_CLASS", "COMMON", "default_sampler", "draws_noise", "get_sampler", "sampler_grid", "sampler_options",
]  # fmt: skip

# What every sampler takes besides its own options: the keys of common.Common, in order.
COMMON: tuple[str, ...] = tuple(Common.__annotations__)


@dataclass(frozen=True)
class Sampler:
    """One entry: the sampler, its grid (the timestep of each step, from the schedule and the step count), and whether
    it draws noise while it samples, given the options a run passes (eta=..., s_churn=...; an option left out: its default).
    A run that draws noise makes an image depend on the generator's state, so a server cannot batch it with others."""

    sample: Callable[..., np.ndarray]
    grid: Grid
    noisy: Callable[[Mapping[str, Any]], bool]


def _always(options: Mapping[str, Any]) -> bool:
    return True


def _never(options: Mapping[str, Any]) -> bool:
    return False


def _positive(option: str, default: float) -> Callable[[Mapping[str, Any]], bool]:
    def noisy(options: Mapping[str, Any]) -> bool:
        value = options.get(option)
        return float(default if value is None else value) > 0

    return noisy


TABLE: dict[str, Sampler] = {
    "ddpm": Sampler(sample_ddpm, discrete_grid("DDPMScheduler"), _always),
    "ddim": Sampler(sample_ddim, discrete_grid("DDIMScheduler"), _positive("eta", 0.0)),
    "pndm": Sampler(sample_pndm, pndm_grid, _never),
    "euler": Sampler(sample_euler, euler_grid("EulerDiscreteScheduler", "euler"), _positive("s_churn", 0.0)),
    "euler_a": Sampler(sample_euler_a, euler_grid("EulerAncestralDiscreteScheduler", "euler_a"), _always),
    "heun": Sampler(sample_heun, euler_grid("HeunDiscreteScheduler", "heun"), _never),
    "dpmpp_2m": Sampler(sample_dpmpp_2m, dpmpp_grid(karras=False), _never),
    "dpmpp_2m_karras": Sampler(sample_dpmpp_2m_karras, dpmpp_grid(karras=True), _never),
    "unipc": Sampler(sample_unipc, unipc_grid, _never),
    "lcm": Sampler(sample_lcm, consistency_grid("LCMScheduler"), _always),
    "tcd": Sampler(sample_tcd, consistency_grid("TCDScheduler"), _positive("eta", 0.3)),
}
SAMPLERS: dict[str, Callable[..., np.ndarray]] = {name: entry.sample for name, entry in TABLE.items()}

# The diffusers scheduler class a model's config names -> the sampler that reproduces it.
DEFAULT_FOR_CLASS = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "PNDMScheduler": "pndm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "HeunDiscreteScheduler": "heun",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "UniPCMultistepScheduler": "unipc",
    "LCMScheduler": "lcm",
    "TCDScheduler": "tcd",
}


def default_sampler(class_name: str | None, config: Mapping[str, Any] | None = None) -> str:
    """The sampler a model's scheduler_config names; DDIM for classes we do not reproduce."""
    name = DEFAULT_FOR_CLASS.get(class_name or "", "ddim")
    if name == "dpmpp_2m" and (config or {}).get("use_karras_sigmas"):
        return "dpmpp_2m_karras"
    return name


def sampler_options(name: str) -> tuple[str, ...]:
    """The keyword options a sampler takes besides the COMMON ones every sampler takes (e.g. ddim: eta)."""
    params = inspect.signature(_lookup(name)).parameters.values()
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in COMMON)


def get_sampler(name: str) -> Callable[..., np.ndarray]:
    """The sampler called `name`, refusing options it does not have with a ValueError that lists its own."""
    sampler, options = _lookup(name), sampler_options(name)

    @functools.wraps(sampler)
    def checked(model: Model, x: np.ndarray, schedule: Any, steps: int, **kwargs: Any) -> np.ndarray:
        unknown = sorted(set(kwargs) - set(options) - set(COMMON))
        if unknown:
            have = f"its options are {', '.join(options)}" if options else "it takes no options"
            raise ValueError(f"sampler {name!r} has no option {', '.join(unknown)}; {have} (plus {', '.join(COMMON)})")
        return sampler(model, x, schedule, steps, **kwargs)

    return checked


def sampler_grid(name: str, schedule: NoiseSchedule, steps: int) -> list[float]:
    """The timestep of each of the `steps` steps `name` runs on this schedule, as its callback will report them."""
    _lookup(name)
    return [float(t) for t in TABLE[name].grid(schedule, steps)]


def draws_noise(name: str, options: Mapping[str, Any] | None = None) -> bool:
    """Whether `name`, run with `options`, draws noise from the generator while it samples (not only the initial latents)."""
    _lookup(name)
    return TABLE[name].noisy(options or {})


def _lookup(name: str) -> Callable[..., np.ndarray]:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(sorted(SAMPLERS))}") from None
