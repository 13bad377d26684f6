"""The sampler table: each sampler's name, the one a model's scheduler class calls for, and get_sampler's option check."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .common import Common, Model
from .consistency import sample_lcm, sample_tcd
from .discrete import sample_ddim, sample_ddpm, sample_pndm
from .karras import sample_euler, sample_euler_a, sample_heun
from .multistep import sample_dpmpp_2m, sample_dpmpp_2m_karras, sample_unipc

__all__ = ["SAMPLERS", "DEFAULT_FOR_CLASS", "COMMON", "default_sampler", "get_sampler", "sampler_options"]

# What every sampler takes besides its own options: the keys of common.Common, in order.
COMMON: tuple[str, ...] = tuple(Common.__annotations__)

SAMPLERS: dict[str, Callable[..., np.ndarray]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "pndm": sample_pndm,
    "euler": sample_euler,
    "euler_a": sample_euler_a,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_karras": sample_dpmpp_2m_karras,
    "unipc": sample_unipc,
    "lcm": sample_lcm,
    "tcd": sample_tcd,
}

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


def _lookup(name: str) -> Callable[..., np.ndarray]:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(sorted(SAMPLERS))}") from None
