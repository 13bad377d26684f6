"""Each sampler's grid, as data: the timestep of every one of its `steps` steps, computed from the schedule.

The same timesteps the sampler's callback reports, step by step (tests/runtime/test_samplers.py checks each against a
run), so a hand-off (denoising_end / denoising_start) is placed on the schedule without running anything.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .multistep import DPMPP_2M
from .schedule import NoiseSchedule, consistency_timesteps, spaced_timesteps
from .sigmas import euler_sigmas, solver_sigmas

Grid = Callable[[NoiseSchedule, int], np.ndarray]


def discrete_grid(class_name: str) -> Grid:
    def grid(schedule: NoiseSchedule, steps: int) -> np.ndarray:
        return spaced_timesteps(schedule.as_class(class_name), steps)

    return grid


def pndm_grid(schedule: NoiseSchedule, steps: int) -> np.ndarray:
    """PLMS's list holds the second timestep twice and reports from its second entry on: [t1, t1, t2, ...]."""
    s = schedule.as_class("PNDMScheduler")
    ts = spaced_timesteps(s, steps)
    if s.config["skip_prk_steps"] and steps > 1:
        return np.concatenate([ts[1:2], ts[1:]])
    return ts


def euler_grid(class_name: str, sampler: str) -> Grid:
    def grid(schedule: NoiseSchedule, steps: int) -> np.ndarray:
        return euler_sigmas(schedule.as_class(class_name), steps, sampler)[0][:steps]

    return grid


def dpmpp_grid(karras: bool) -> Grid:
    name = "dpmpp_2m_karras" if karras else "dpmpp_2m"

    def grid(schedule: NoiseSchedule, steps: int) -> np.ndarray:
        return solver_sigmas(schedule.as_class("DPMSolverMultistepScheduler", **DPMPP_2M, use_karras_sigmas=karras), steps, name)[0]

    return grid


def unipc_grid(schedule: NoiseSchedule, steps: int) -> np.ndarray:
    return solver_sigmas(schedule.as_class("UniPCMultistepScheduler"), steps, "unipc")[0]


def consistency_grid(class_name: str) -> Grid:
    def grid(schedule: NoiseSchedule, steps: int) -> np.ndarray:
        return consistency_timesteps(schedule.as_class(class_name), steps)

    return grid
