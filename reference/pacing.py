"""Phase pacing: when a training phase stops, its learning rate, and its progress lines.

A phase ends at a step ceiling or at a time budget, whichever comes first; the learning rate
follows warmup + cosine over the same "progress" so it anneals in either case.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field


@dataclass
class PhaseClock:
    """Progress of a phase bounded by ``max_steps`` and, optionally, ``seconds`` of wall time."""

    max_steps: int
    seconds: float | None = None
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def progress(self, step: int) -> float:
        """Fraction of the phase done, in [0, 1]: the larger of the step and time fractions."""
        if self.seconds is None:
            by_time = 0.0
        else:  # a zero budget (earlier phases used the time up) means done, not unlimited
            by_time = self.elapsed() / self.seconds if self.seconds > 0 else 1.0
        return min(1.0, max(step / self.max_steps, by_time))

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0

    def stopped_by(self, step: int) -> str:
        """What ended the phase: "steps" or "time"."""
        return "steps" if step >= self.max_steps else "time"


def learning_rate(base: float, step: int, progress: float, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``base`` to ``min_ratio * base`` over progress."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    cosine = min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base * warm * cosine


class Ticker:
    """Says when ``every_s`` seconds have passed since it last said so."""

    def __init__(self, every_s: float):
        self.every_s = every_s
        self.last = time.perf_counter()

    def due(self) -> bool:
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            return True
        return False


def say(message: str) -> None:
    """A progress line, flushed at once so logs of long runs stay live."""
    print(message, file=sys.stdout, flush=True)
