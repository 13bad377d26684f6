"""DeepCache (Ma et al. CVPR 2024, arXiv:2312.00858) at run time: a UNet engine that runs the full UNet (which also
returns its deep feature) on the schedule's full steps and the shallow UNet, fed the cached feature, in between.

Uniform schedule, as the paper's: counting the steps a run takes from its first, step k is full when
k % cache_interval == 0; every model call of a full step (Heun's two) is a full one.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .bundle import Component
from .bundle.levers import DEEP_FEATURE
from .protocol import Engine
from .sampling.common import Model


def check_interval(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"cache_interval must be a whole number >= 1 (1: every step runs the full UNet), got {value!r}")
    return int(value)


class CachedUNet:
    """The bundle's UNet as an Engine: full or shallow per step, the deep feature kept between them."""

    def __init__(self, component: Component, deep: Engine, shallow: Engine, interval: int):
        self.component = component  # the plain UNet's: same inputs and output, so guidance feeds it unchanged
        self.deep, self.shallow, self.interval = deep, shallow, interval
        self.feature: np.ndarray | None = None
        self.steps_done = 0
        self.calls = {"full": 0, "shallow": 0}

    def __call__(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out_name = self.component.outputs[0].name
        if self.feature is None or self.steps_done % self.interval == 0:
            out = self.deep(feed)
            self.feature = np.asarray(out[DEEP_FEATURE])
            self.calls["full"] += 1
            return {out_name: out[out_name]}
        self.calls["shallow"] += 1
        wanted = {t.name for t in self.shallow.component.inputs}  # SDXL's shallow UNet reads no text context
        shallow_feed = {k: v for k, v in {**feed, DEEP_FEATURE: self.feature}.items() if k in wanted}
        return {out_name: self.shallow(shallow_feed)[out_name]}

    def step_done(self) -> None:
        self.steps_done += 1


class StepAware:
    """A guided model that hears when each sampler step ends (Core.denoise calls step_done)."""

    def __init__(self, model: Model, unet: CachedUNet):
        self.model, self.unet = model, unet

    def __call__(self, x: np.ndarray, t: float) -> np.ndarray:
        return self.model(x, t)

    def step_done(self) -> None:
        self.unet.step_done()

