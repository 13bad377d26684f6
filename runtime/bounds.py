"""Bounds on the numbers a bundle gives the runtime that size allocations or loops, checked before either.

A manifest is data from disk: a hand edit or a corrupted copy must be refused by message, never become a
23 GB schedule table. The limits are far above any released model (every Stable Diffusion scheduler trains
on 1000 timesteps) and far below what would exhaust a machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

MAX_TRAIN_TIMESTEPS = 100_000  # the schedule tables are float64 arrays of this length
MAX_SCHEDULER_LIST = MAX_TRAIN_TIMESTEPS  # trained_betas, disable_corrector
MAX_SOLVER_ORDER = 4  # diffusers' multistep solvers implement orders 1..3
MAX_CONFIG_NUMBER = 1e9  # any other number in a scheduler config (thresholds, scalings, ratios)
MAX_CONFIG_DEPTH = 4


def check_scheduler_config(config: Mapping[str, Any], where: str) -> None:
    """ValueError naming the first value of a scheduler config that is non-finite, oversized or out of range."""
    _check_numbers(config, where, 0)
    n = _integer(config, "num_train_timesteps", 1000, 1, MAX_TRAIN_TIMESTEPS, where)
    _integer(config, "steps_offset", 0, 0, n - 1, where)
    _integer(config, "original_inference_steps", 50, 1, n, where)
    _integer(config, "solver_order", 2, 1, MAX_SOLVER_ORDER, where)
    for key in ("beta_start", "beta_end"):
        value = config.get(key)
        if value is not None and not 0 < float(value) < 1:
            raise ValueError(f"{where}.{key} {value!r} is out of range: a beta is a probability in (0, 1)")
    betas = config.get("trained_betas")
    if betas is not None:
        if not isinstance(betas, (list, tuple)) or not 1 <= len(betas) <= MAX_SCHEDULER_LIST:
            raise ValueError(f"{where}.trained_betas must be a list of 1..{MAX_SCHEDULER_LIST} numbers")
        if any(isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < 1 for b in betas):
            raise ValueError(f"{where}.trained_betas holds a value outside (0, 1)")


def _integer(config: Mapping[str, Any], key: str, default: int, low: int, high: int, where: str) -> int:
    value = config.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or not low <= value <= high:
        raise ValueError(f"{where}.{key} {value!r} is out of range {low}..{high}")
    return int(value)


def _check_numbers(value: Any, where: str, depth: int) -> None:
    """Every number finite and within MAX_CONFIG_NUMBER (lists within MAX_SCHEDULER_LIST), nesting shallow."""
    if depth > MAX_CONFIG_DEPTH:
        raise ValueError(f"{where} is nested deeper than a scheduler config is ({MAX_CONFIG_DEPTH} levels)")
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or abs(value) > MAX_CONFIG_NUMBER:
            raise ValueError(f"{where} {value!r} is not a finite number within ±{MAX_CONFIG_NUMBER:g}")
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_numbers(v, f"{where}.{k}", depth + 1)
        return
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_SCHEDULER_LIST:
            raise ValueError(f"{where} holds {len(value)} items, more than {MAX_SCHEDULER_LIST}")
        for i, v in enumerate(value):
            _check_numbers(v, f"{where}[{i}]", depth + 1)
        return
    raise ValueError(f"{where} holds a {type(value).__name__}, which no scheduler config does")


def port(text: str, *, any_free: bool = False) -> int:
    """A TCP port from a command line: 1..65535, or 0 (any free port, printed) where the server can say which it took.

    ValueError names the range; argparse turns it into a one-line usage error (use `port_argument`).
    """
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a port number") from None
    low = 0 if any_free else 1
    if not low <= value <= 65535:
        zero = " (0: any free port)" if any_free else " (this server cannot report a port picked for it: name one)"
        raise ValueError(f"port {value} is out of range {low}..65535{zero}")
    return value


def port_argument(*, any_free: bool = False) -> Callable[[str], int]:
    """`port` as an argparse type: a bad value is a usage error naming the range, not a traceback."""
    import argparse

    def parse(text: str) -> int:
        try:
            return port(text, any_free=any_free)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse
