"""load_engine: one component opened with the backend its file format implies (or the one asked for).

The Engine protocol and its feed checks are runtime.protocol's; the backends import that module, never this
one, whose load_engine imports them: so the backends and their dispatcher do not import each other.
"""

from __future__ import annotations

from pathlib import Path

from .bundle import Component
from .errors import BundleError
from .protocol import Engine

__all__ = ["load_engine"]


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
