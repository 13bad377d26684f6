"""What every engine is and takes: the Engine protocol and the feed checks against the manifest.

Backends (runtime/backends/) import this module, never runtime.dispatch, whose load_engine imports them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from .bundle import Component, TensorSpec
from .errors import FeedError, NonFiniteError


class Engine(Protocol):
    component: Component

    def __call__(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def check_feed(component: Component, feed: Mapping[str, np.ndarray]) -> None:
    """Raise FeedError naming the tensor whose name, shape or dtype differs from the bundle's."""
    expected = {t.name for t in component.inputs}
    missing, unknown = expected - feed.keys(), feed.keys() - expected
    if missing or unknown:
        raise FeedError(
            f"{component.name}: inputs {sorted(feed)} do not match the bundle's {sorted(expected)}"
            + (f"; missing {sorted(missing)}" if missing else "")
            + (f"; unexpected {sorted(unknown)}" if unknown else "")
        )
    for spec in component.inputs:
        _check_tensor(component.name, spec, feed[spec.name])


def _check_tensor(where: str, spec: TensorSpec, value: np.ndarray) -> None:
    if not isinstance(value, np.ndarray):
        raise FeedError(f"{where}.{spec.name}: expected a numpy array, got {type(value).__name__}")
    if not spec.accepts(tuple(value.shape)):
        if spec.steps:
            raise FeedError(
                f"{where}.{spec.name}: shape {tuple(value.shape)} but the bundle takes {spec.shape}, the axes with steps "
                f"{spec.steps} in whole steps up to that"
            )
        raise FeedError(
            f"{where}.{spec.name}: shape {tuple(value.shape)} but the bundle was built for static shape {spec.shape}; "
            "rebuild the bundle for this size/batch with `python -m export.build --height/--width/--batch-size`"
        )
    if value.dtype != np.dtype(spec.dtype):
        raise FeedError(f"{where}.{spec.name}: dtype {value.dtype} but the bundle expects {spec.dtype}")


def cast_feed(component: Component, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The one boundary where the pipeline's float64/float32 arrays meet an engine's dtypes."""
    out = {}
    for spec in component.inputs:
        if spec.name in feed:
            out[spec.name] = np.ascontiguousarray(feed[spec.name], dtype=spec.dtype)
    return out


def check_finite(component: Component, feed: Mapping[str, np.ndarray], output: np.ndarray, where: str = "") -> None:
    """One reduction over an engine's output; if it holds NaN/inf, a NonFiniteError naming the engine, its precision
    and the likely cause: an input that was already not finite, else fp16 overflow (fp16 engines), else the engine."""
    if np.isfinite(output).all():
        return
    head = f"the {component.name} engine ({component.precision}) produced NaN/inf{where}"
    bad = [n for n, v in feed.items() if np.issubdtype(np.asarray(v).dtype, np.floating) and not np.isfinite(v).all()]
    if bad:
        raise NonFiniteError(f"{head}: its input {', '.join(bad)} already held NaN/inf, so the cause is upstream of the engine")
    if component.precision == "fp16":
        raise NonFiniteError(f"{head} from finite inputs: fp16 overflow", fp16_overflow=True)
    raise NonFiniteError(
        f"{head} from finite inputs; a {component.precision} engine does not overflow like fp16 does, "
        "so the engine file or its export is broken: re-export the bundle"
    )
