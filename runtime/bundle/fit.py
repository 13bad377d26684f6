"""Does a TensorRT bundle fit this machine? Its recorded library, version and GPU against the current ones.

A classic TensorRT engine only runs on the TensorRT version and the GPU model it was built for,
so a bundle records both (per component, in `build`) and is refused elsewhere, with the
command that rebuilds it here from the ONNX files it carries. A TensorRT-for-RTX engine is built
for a set of compute capabilities, on any machine: it runs on any GPU of that set with the same
TensorRT-for-RTX version (the library itself says whether this GPU is one: runtime.backends.tensorrt).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BundleError
from .component import Component
from .hints import rebuild_command

DEVICE_FIELDS = ("tensorrt", "gpu", "compute_capability")


@dataclass(frozen=True)
class Device:
    """What a TensorRT engine is tied to: the TensorRT version, the GPU model and its compute capability."""

    tensorrt: str  # the library's version
    gpu: str
    compute_capability: str  # "8.7"
    library: str = "tensorrt"  # tensorrt | tensorrt-rtx

    def to_json(self) -> dict[str, str]:
        out = {"tensorrt": self.tensorrt, "gpu": self.gpu, "compute_capability": self.compute_capability}
        return out if self.library == "tensorrt" else {"library": self.library, **out}

    @property
    def key(self) -> str:
        """A file-name-safe key, e.g. for the timing cache: orin-sm87-trt10.3.0.30 (TensorRT for RTX: ...-rtx1.7.1.116)."""
        slug = "-".join("".join(c if c.isalnum() else " " for c in self.gpu.lower()).split()) or "gpu"
        tag = "rtx" if self.library == "tensorrt-rtx" else "trt"
        return f"{slug}-sm{self.compute_capability.replace('.', '')}-{tag}{self.tensorrt}"

    def __str__(self) -> str:
        title = "TensorRT for RTX" if self.library == "tensorrt-rtx" else "TensorRT"
        return f"{self.gpu} (compute capability {self.compute_capability}) with {title} {self.tensorrt}"


def recorded_device(component: Component, bundle: Path) -> Device:
    """The device a plan component was built for, from its manifest entry."""
    missing = [f for f in DEVICE_FIELDS if not component.build.get(f)]
    if missing:
        raise BundleError(
            f"{bundle}: {component.name} is a TensorRT engine whose manifest does not say {', '.join(missing)}, "
            f"so it cannot be checked against this machine; rebuild it with `{rebuild_command(bundle, component)}`"
        )
    return Device(*(str(component.build[f]) for f in DEVICE_FIELDS))


def differences(built: Device, here: Device) -> list[str]:
    """Each way the two devices differ, in words; empty when an engine built for one runs on the other."""
    out = []
    if built.tensorrt != here.tensorrt:
        out.append(f"TensorRT {built.tensorrt} built it, this machine has TensorRT {here.tensorrt}")
    if built.compute_capability != here.compute_capability:
        out.append(f"it was built for compute capability {built.compute_capability}, this GPU is {here.compute_capability}")
    if built.gpu != here.gpu:
        out.append(f"it was built on a {built.gpu}, this GPU is a {here.gpu}")
    return out


def check_compatible(component: Component, bundle: Path, here: Device) -> None:
    """Refuse a plan built for another GPU or TensorRT version, saying what differs and how to rebuild.

    A TensorRT-for-RTX engine is checked on its library version only: it was built for compute
    capabilities, not for a GPU, and TensorRT for RTX itself says whether this GPU is one of them."""
    if component.build.get("library") == "tensorrt-rtx":
        built_version = str(component.build.get("tensorrt", "an unrecorded version"))
        if built_version != here.tensorrt:
            raise BundleError(
                f"{bundle}: the {component.name} engine does not fit this machine: TensorRT for RTX {built_version} built it, "
                f"this machine has TensorRT for RTX {here.tensorrt}. Install tensorrt-rtx-cu13=={built_version}, or rebuild the "
                f"engines for this version from the bundle's ONNX files with `{rebuild_command(bundle, component)}`"
            )
        return
    built = recorded_device(component, bundle)
    diff = differences(built, here)
    if diff:
        raise BundleError(
            f"{bundle}: the {component.name} engine does not fit this machine: {'; '.join(diff)}. "
            f"TensorRT engines only run where they were built; rebuild them here from the bundle's ONNX files with "
            f"`{rebuild_command(bundle, component)}`"
        )


def device_from_properties(tensorrt_version: str, props: Mapping[str, Any], library: str = "tensorrt") -> Device:
    """Device from cudaGetDeviceProperties' name (bytes or str), major and minor."""
    name = props["name"]
    name = name.split(b"\0", 1)[0].decode(errors="replace") if isinstance(name, bytes) else str(name)
    return Device(tensorrt_version, name.strip(), f"{int(props['major'])}.{int(props['minor'])}", library)
