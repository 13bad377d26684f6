"""One engine protocol for every backend: `engine(feed) -> outputs`, checked against the manifest.

The protocol and the feed checks live in runtime.feed (the backends import them from there); they
are re-exported here, so `from runtime.engine import Engine, cast_feed, check_feed` keeps working.
"""

from __future__ import annotations

from pathlib import Path

from .errors import BundleError
from .feed import Engine, cast_feed, check_feed
from .manifest import Component

__all__ = ["Engine", "cast_feed", "check_feed", "load_engine"]


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
