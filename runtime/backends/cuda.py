"""CUDA runtime helpers for the TensorRT backend: cudart's (error, value) results checked, the GPUs this machine has,
and numpy views of pinned host memory.

cuda-python's cudart (`cuda.bindings.runtime`) is imported on first use only: `import runtime` loads no CUDA. Apart
from runtime.backends.tensorrt so that the engine class reads as the engine's life (issue 29: no runtime module over
400 lines); runtime.backends.tensorrt re-exports these names, where export/ and the tests import them from.
"""

from __future__ import annotations

import ctypes
import re
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from ..bundle.fit import Device, device_from_properties
from ..errors import BundleError
from .libraries import TENSORRT, Library, require

if TYPE_CHECKING:
    from cuda.bindings import runtime as cudart

T = TypeVar("T")


class CudaError(BundleError):
    """A CUDA runtime call failed."""


def _raise_for(err: cudart.cudaError_t, what: str) -> None:
    from cuda.bindings import runtime as cudart

    if err != cudart.cudaError_t.cudaSuccess:
        name = cudart.cudaGetErrorName(err)[1].decode(errors="replace")
        oom = err == cudart.cudaError_t.cudaErrorMemoryAllocation
        raise CudaError(f"{what} failed: {name}" + ("; free GPU memory (close other GPU programs) or use a smaller bundle" if oom else ""))


def value(result: tuple[cudart.cudaError_t, T], what: str) -> T:
    """The one output of a cudart call that returns (error, output), or a CudaError."""
    _raise_for(result[0], what)
    return result[1]


def done(result: tuple[cudart.cudaError_t], what: str) -> None:
    """Check a cudart call that returns only (error,)."""
    _raise_for(result[0], what)


class NoGpu(CudaError):
    """This machine has no CUDA GPU the driver can reach (none, or no NVIDIA driver)."""


def gpu_count() -> tuple[int, str]:
    """How many CUDA GPUs cudart sees, and why none when there are none (cudart's error name, or "")."""
    from cuda.bindings import runtime as cudart

    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess:
        return 0, cudart.cudaGetErrorName(err)[1].decode(errors="replace")
    return int(count), ""


def current_device(index: int = 0, lib: Library = TENSORRT) -> Device:
    """This machine's library version and GPU `index`, as a bundle records them."""
    require(lib, f"reading this machine's GPU and {lib.title} version")
    from cuda.bindings import runtime as cudart

    count, why = gpu_count()
    if count == 0:
        raise NoGpu(f"this machine has no CUDA GPU ({why or 'cudaGetDeviceCount found none'})")
    if index >= count:
        raise BundleError(f"GPU {index} asked for, but this machine has {count} CUDA GPU(s)")
    props = value(cudart.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    version = str(lib.load().__version__)
    return device_from_properties(version, {"name": props.name, "major": props.major, "minor": props.minor}, lib.key)


def gpu_index(device: str | int | None) -> int:
    """None, 'cuda', 'tensorrt', 'cuda:N' or N -> a GPU index; 'cpu' is refused (plans run on the GPU only)."""
    if device is None or device in ("cuda", "tensorrt"):
        return 0
    if isinstance(device, int) and device >= 0:
        return device
    match = re.fullmatch(r"cuda:(\d+)", str(device))
    if match:
        return int(match.group(1))
    raise BundleError(
        f"device {device!r}: a TensorRT bundle runs on an NVIDIA GPU ('cuda' or 'cuda:N'); "
        "to run on the CPU, build an ONNX Runtime bundle with `python -m export.build --backend onnxruntime`"
    )


def pinned_array(ptr: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """A numpy array over `ptr` (page-locked memory from cudaMallocHost), without copying."""
    dt = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    raw = memoryview((ctypes.c_uint8 * (count * dt.itemsize)).from_address(ptr)).cast("B")
    return np.frombuffer(raw, dtype=dt, count=count).reshape(shape)
