"""Sampling: noise schedules, sigma grids, the samplers and the table that names them.

Samplers are pure functions `sample_x(model, x, schedule, steps, *, <options>, **kw) -> x`, kw being
the keywords every sampler takes (common.Common: init=None, start=0, known=None, rng=None,
callback=None), each step for step the diffusers scheduler of the same family, reading the
model's scheduler config as `ThatScheduler.from_config(config)` would.
`model(x, t)` returns the network's raw output (epsilon, v or x0, per the config's
prediction_type) for latents x at timestep t; guidance is the model wrapper's business.
`x` comes in as unit-variance noise: the sampler scales it by diffusers' init_noise_sigma,
and scales the model's input where diffusers' scale_model_input does.
img2img: `init` (clean latents) noised with x to step `start`'s level, then only steps start..steps-1
run, as diffusers' add_noise + set_begin_index (start = steps - int(steps * strength)).
Inpainting with an ordinary UNet: `known` (a Known) resets the kept region to its latents noised
with the same x to the next step's level after every step, and to the clean latents after the last.
`callback(i, t, x)` runs after every step (one per requested step, however many model calls
it took); noise comes only from the `rng` passed in, and only where a sampler draws it.
The returned x is the final denoised latent, ready for the VAE.

Modules: schedule (a scheduler config read as one diffusers class, timestep spacings), sigmas
(the sigma-space grids), common (the model contract and what every sampler shares), the samplers
by how they step (discrete: DDPM/DDIM/PNDM, karras: Euler/Euler a/Heun, multistep: DPM-Solver++/
UniPC, consistency: LCM/TCD), and table (names, defaults, get_sampler). All of it needs only numpy;
the names below load from their module on first use, so `from runtime.sampling.common import Model`
reads no sampler.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "SAMPLERS", "TABLE", "DEFAULT_FOR_CLASS", "default_sampler", "draws_noise", "get_sampler", "sampler_grid", "sampler_options",
    "Model", "Callback", "Known", "to_x0_eps",
    "NoiseSchedule", "CLASS_DEFAULTS", "noise_schedule", "spaced_timesteps", "consistency_timesteps",
    "euler_sigmas", "solver_sigmas",
    "sample_ddpm", "sample_ddim", "sample_pndm", "sample_euler", "sample_euler_a", "sample_heun",
    "sample_dpmpp_2m", "sample_dpmpp_2m_karras", "sample_unipc", "sample_lcm", "sample_tcd",
]  # fmt: skip

if TYPE_CHECKING:
    from .common import Callback, Known, Model, to_x0_eps
    from .consistency import sample_lcm, sample_tcd
    from .discrete import sample_ddim, sample_ddpm, sample_pndm
    from .karras import sample_euler, sample_euler_a, sample_heun
    from .multistep import sample_dpmpp_2m, sample_dpmpp_2m_karras, sample_unipc
    from .schedule import CLASS_DEFAULTS, NoiseSchedule, consistency_timesteps, noise_schedule, spaced_timesteps
    from .sigmas import euler_sigmas, solver_sigmas
    from .table import DEFAULT_FOR_CLASS, SAMPLERS, TABLE, default_sampler, draws_noise, get_sampler, sampler_grid, sampler_options

# The module each name of __all__ lives in, for __getattr__ (the imports above spell them out for type checkers).
_LAZY = {
    ".table": (
        "SAMPLERS", "TABLE", "DEFAULT_FOR_CLASS", "default_sampler", "draws_noise", "get_sampler", "sampler_grid", "sampler_options",
    ),  # fmt: skip
    ".common": ("Model", "Callback", "Known", "to_x0_eps"),
    ".schedule": ("NoiseSchedule", "CLASS_DEFAULTS", "noise_schedule", "spaced_timesteps", "consistency_timesteps"),
    ".sigmas": ("euler_sigmas", "solver_sigmas"),
    ".discrete": ("sample_ddpm", "sample_ddim", "sample_pndm"),
    ".karras": ("sample_euler", "sample_euler_a", "sample_heun"),
    ".multistep": ("sample_dpmpp_2m", "sample_dpmpp_2m_karras", "sample_unipc"),
    ".consistency": ("sample_lcm", "sample_tcd"),
}
_HOME = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use (then kept here)."""
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = getattr(importlib.import_module(_HOME[name], __name__), name)
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
