"""Where a run starts and stops on its schedule: img2img's strength, and the denoising_end / denoising_start hand-off
between an SDXL base and its refiner, as diffusers computes them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


class Stopped(Exception):
    """A run stopped at its denoising_end: the latents it had reached."""

    def __init__(self, latents: np.ndarray):
        super().__init__("stopped at denoising_end")
        self.latents = latents


def handoff_cutoff(fraction: Any, what: str, config: Mapping[str, Any]) -> int:
    """The timestep where a hand-off happens, as diffusers computes it for denoising_end / denoising_start."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.integer, np.floating)) or not 0 < fraction < 1:
        raise ValueError(
            f"{what} must be a fraction strictly between 0 and 1 of the noise schedule (e.g. 0.8: the base runs the first "
            f"80% of it, the refiner the rest), got {fraction!r}"
        )
    train = int(config.get("num_train_timesteps", 1000))
    return int(round(train - float(fraction) * train))


def start_step(steps: int, strength: float) -> int:
    """How many of the schedule's first steps img2img skips, as diffusers' get_timesteps: the noise level of strength."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1] (1: start from pure noise, small: stay close to the image), got {strength}")
    kept = min(int(steps * strength), steps)
    if kept == 0:
        raise ValueError(
            f"strength {strength} with {steps} steps leaves no denoising step (int(steps * strength) = 0); "
            f"raise strength to at least {1 / steps:g} or use more steps"
        )
    return steps - kept


def end_step(ts: Sequence[float], config: Mapping[str, Any], denoising_end: float | None) -> int | None:
    """How many of the steps (timesteps `ts`) run before a denoising_end hand-off: those at or above the cutoff (diffusers)."""
    if denoising_end is None:
        return None
    cutoff = handoff_cutoff(denoising_end, "denoising_end", config)
    kept = sum(t >= cutoff for t in ts)
    if kept == 0:
        raise ValueError(
            f"denoising_end {denoising_end} stops before the first of {len(ts)} steps (its timestep {ts[0]:g} is below the "
            f"cutoff {cutoff}); raise denoising_end"
        )
    return kept


def start_at(ts: Sequence[float], config: Mapping[str, Any], denoising_start: float) -> int:
    """The step of `ts` a denoising_start hand-off resumes at: the run keeps the steps below the cutoff (diffusers)."""
    cutoff = handoff_cutoff(denoising_start, "denoising_start", config)
    kept = sum(t < cutoff for t in ts)
    if kept == 0:
        raise ValueError(
            f"denoising_start {denoising_start} leaves none of the {len(ts)} steps to run (the last timestep {ts[-1]:g} is "
            f"not below the cutoff {cutoff}); lower denoising_start or use more steps"
        )
    return len(ts) - kept
