"""A bundle component's record: one engine file, its tensors, how it was built and how it verified."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name: float32, float16, int32, int64

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(str(d["name"]), tuple(int(s) for s in d["shape"]), str(d["dtype"]))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class Component:
    """One engine file: what it is, its I/O, how it was built and how it verified.

    build: the builder's own record (exporter or TensorRT versions, flags, seconds), kept as written;
    verification: its error figures against the reference it was checked on.
    """

    name: str
    file: str
    format: str  # onnx | plan
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    build: Mapping[str, Any] = field(default_factory=dict)
    verification: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, name: str, d: Mapping[str, Any]) -> Component:
        return cls(
            name=name,
            file=str(d["file"]),
            format=str(d["format"]),
            precision=str(d["precision"]),
            inputs=tuple(TensorSpec.from_json(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in d["outputs"]),
            build=dict(d.get("build", {})),
            verification=dict(d.get("verification", {})),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "format": self.format,
            "precision": self.precision,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "build": dict(self.build),
            "verification": dict(self.verification),
        }

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    @property
    def source_onnx(self) -> Component | None:
        """For a TensorRT plan, the ONNX component it was built from (the bundle carries it); None for ONNX."""
        recorded = self.build.get("onnx")
        return Component.from_json(self.name, recorded) if isinstance(recorded, Mapping) else None

    @property
    def rebuild_args(self) -> tuple[str, ...]:
        """The export.build flags this engine was built with, for the command that rebuilds it."""
        return tuple(str(a) for a in self.build.get("from_onnx_args", ()))
