"""A bundle component's record: one engine file, its tensors, how it was built and how it verified."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's name, shape and dtype. steps: () for a static shape; else per axis 0 (static) or a step: that axis
    takes any multiple of the step up to `shape` (the UNet's context on a bundle built for prompts of several chunks)."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name: float32, float16, int32, int64
    steps: tuple[int, ...] = ()

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TensorSpec:
        shape, steps = tuple(int(s) for s in d["shape"]), tuple(int(s) for s in d.get("steps", ()))
        if steps and (len(steps) != len(shape) or any(s < 0 or (s and shape[a] % s) for a, s in enumerate(steps))):
            raise ValueError(f"tensor {d['name']!r}: steps {list(steps)} must give each axis of shape {list(shape)} 0 or a divisor")
        return cls(str(d["name"]), shape, str(d["dtype"]), steps)

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        return {**out, "steps": list(self.steps)} if self.steps else out

    @property
    def smallest(self) -> tuple[int, ...]:
        """The least shape it takes: one step on a stepped axis (one prompt chunk), the shape elsewhere."""
        return tuple(s or d for d, s in zip(self.shape, self.steps)) if self.steps else self.shape

    def accepts(self, shape: tuple[int, ...]) -> bool:
        """Whether an array of `shape` fits: the static axes equal, a stepped axis a multiple of its step up to the maximum."""
        if not self.steps:
            return shape == self.shape
        return len(shape) == len(self.shape) and all(
            d == m if not s else 0 < d <= m and d % s == 0 for d, m, s in zip(shape, self.shape, self.steps)
        )


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
