"""One engine protocol for every backend: `engine(feed) -> outputs`, checked against the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Protocol

import numpy as np

from .errors import BundleError, FeedError
from .manifest import Component, TensorSpec


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
    if tuple(value.shape) != spec.shape:
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


def load_engine(component: Component, bundle: Path, backend: str | None = None, **options: object) -> Engine:
    """Open one component with the backend its file format implies (or the one asked for)."""
    path = bundle / component.file
    kind = backend or {"onnx": "onnxruntime", "plan": "tensorrt"}.get(component.format)
    if kind == "onnxruntime":
        if component.format != "onnx":
            raise BundleError(f"{component.name}: ONNX Runtime cannot open a {component.format} file ({path.name})")
        from .backends.onnxruntime import OrtEngine

        return OrtEngine(component, path, **options)  # type: ignore[arg-type]
    if kind == "tensorrt":
        if component.format != "plan":
            raise BundleError(
                f"{component.name}: TensorRT runs .plan engines and {path.name} is {component.format}; open it with ONNX Runtime "
                "(device='tensorrt' picks its TensorRT provider), or build engines with `python -m export.build --from-onnx BUNDLE`"
            )
        from .backends.tensorrt import TrtEngine

        return TrtEngine(component, path, bundle=bundle, **options)  # type: ignore[arg-type]
    raise BundleError(f"{component.name}: unknown backend {kind!r} for format {component.format!r}")
