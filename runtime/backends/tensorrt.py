"""TensorRT backend: one deserialised engine, buffers allocated once, one CUDA stream, optional CUDA graph.

Imports only `tensorrt` and cuda-python's cudart (`cuda.bindings.runtime`), both on first use.
Each call copies the feed into pinned host buffers, then host->device copies, `execute_async_v3`
and device->host copies run on the engine's stream; with `cuda_graph=True` that whole sequence is
captured once (static shapes and fixed buffer addresses make the capture valid for every call)
and replayed with one `cudaGraphLaunch`.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from ..bundle import Component, TensorSpec, rebuild_command
from ..bundle.fit import Device, check_compatible, device_from_properties
from ..errors import BundleError
from ..protocol import check_feed

if TYPE_CHECKING:
    import tensorrt as trt
    from cuda.bindings import runtime as cudart

INSTALL = (
    "install TensorRT's Python package and cuda-python: `pip install tensorrt cuda-python` on a desktop "
    "(CUDA 12), or on a Jetson the JetPack 6 TensorRT packages (python3-libnvinfer) plus `pip install cuda-python`"
)
# What the TensorRT path imports, named as a user would install it.
PACKAGES = (("TensorRT", "tensorrt"), ("cuda-python >= 12.6 (cuda.bindings)", "cuda.bindings.runtime"))

# numpy dtype name of each TensorRT DataType the bundles use (by member name, stable across 10.x and 11.x).
DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32", "INT64": "int64", "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}
T = TypeVar("T")


class TensorRTMissing(BundleError):
    """TensorRT or cuda-python is not installed: the TensorRT path is refused, never replaced by another backend."""


def _installed(module: str) -> bool:
    """Is `module` really installed, not just a folder of type stubs (tensorrt-stubs: a namespace package without code)?"""
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:  # find_spec imports the parent package (`cuda` for cuda.bindings)
        return False
    return spec is not None and spec.origin is not None


def _importable(module: str) -> bool:
    """Does `module` import as code? tensorrt-stubs' folder of .pyi files imports too, as a namespace package (no origin)."""
    try:
        imported = importlib.import_module(module)
    except ImportError:  # absent, or installed with libraries that do not load
        return False
    spec = imported.__spec__
    return spec is None or spec.origin is not None  # None: a module made at runtime (the tests' stand-ins)


def tensorrt_available() -> bool:
    """True where tensorrt and cuda-python's cudart are installed; asks without importing them (that loads CUDA)."""
    return _installed("tensorrt") and _installed("cuda.bindings")


def require_tensorrt(what: str, instead: str = "") -> None:
    """Raise TensorRTMissing, naming what is missing and how to install it, unless tensorrt and cudart import.

    what: the task, as the message's subject ("building TensorRT engines"); instead: an alternative to offer.
    """
    missing = [name for name, module in PACKAGES if not _importable(module)]
    if not missing:
        return
    which = "which are not installed here" if len(missing) == len(PACKAGES) else f"and {missing[0]} is not installed here"
    raise TensorRTMissing(f"{what} needs TensorRT and cuda-python, {which}: {INSTALL}" + (f"; {instead}" if instead else ""))


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


def current_device(index: int = 0) -> Device:
    """This machine's TensorRT version and GPU `index`, as a bundle records them."""
    require_tensorrt("reading this machine's GPU and TensorRT version")
    import tensorrt as trt
    from cuda.bindings import runtime as cudart

    count = value(cudart.cudaGetDeviceCount(), "looking for a CUDA GPU (cudaGetDeviceCount)")
    if index >= count:
        raise BundleError(f"GPU {index} asked for, but this machine has {count} CUDA GPU(s)")
    props = value(cudart.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    return device_from_properties(trt.__version__, {"name": props.name, "major": props.major, "minor": props.minor})


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


def capturing_logger() -> tuple[trt.ILogger, list[str]]:
    """A TensorRT logger that keeps warnings and errors, so a failure can quote TensorRT's own words."""
    import tensorrt as trt

    messages: list[str] = []

    class Capture(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            if severity <= trt.ILogger.Severity.WARNING:
                messages.append(msg)

    return Capture(), messages


@dataclass
class _Binding:
    spec: TensorSpec
    device: int  # device pointer
    host: np.ndarray  # a view of pinned host memory
    host_ptr: int

    @property
    def nbytes(self) -> int:
        return int(self.host.nbytes)


def pinned_array(ptr: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """A numpy array over `ptr` (page-locked memory from cudaMallocHost), without copying."""
    dt = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    raw = memoryview((ctypes.c_uint8 * (count * dt.itemsize)).from_address(ptr)).cast("B")
    return np.frombuffer(raw, dtype=dt, count=count).reshape(shape)


def dims(d: trt.Dims) -> tuple[int, ...]:
    """A TensorRT Dims as a tuple (Dims indexes like a tuple; -1 marks a dynamic dimension)."""
    return tuple(int(d[i]) for i in range(len(d)))


class TrtEngine:
    """A .plan behind the engine protocol; use as a context manager, or call close(), to free the GPU memory."""

    def __init__(
        self,
        component: Component,
        path: Path,
        *,
        device: str | int | None = None,
        cuda_graph: bool = False,
        bundle: Path | None = None,
        check_device: bool = True,
    ) -> None:
        self.component = component
        self.path = path
        self.bundle = bundle if bundle is not None else path.parent.parent
        self._closed = True
        require_tensorrt("this bundle holds TensorRT engines: running them")
        import tensorrt as trt
        from cuda.bindings import runtime as cudart

        index = gpu_index(device)
        if check_device:
            check_compatible(component, self.bundle, current_device(index))
        done(cudart.cudaSetDevice(index), f"selecting GPU {index} (cudaSetDevice)")
        # TensorRT keeps a raw pointer to the logger: it must live as long as the engine
        self._logger, self._messages = capturing_logger()
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._deserialize()
        context: trt.IExecutionContext | None = self._engine.create_execution_context()
        if context is None:
            raise BundleError(f"{component.name}: TensorRT could not create an execution context for {path}: {self._log_tail()}")
        self._context = context
        self._bindings: dict[str, _Binding] = {}
        self._graph: cudart.cudaGraph_t | None = None
        self._graph_exec: cudart.cudaGraphExec_t | None = None
        self._stream = value(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._closed = False
        try:
            self._bind()
            if cuda_graph:
                self._capture()
        except BaseException:
            self.close()
            raise

    # -- setup -------------------------------------------------------------

    def _rebuild(self) -> str:
        return rebuild_command(self.bundle, self.component, in_place=True)

    def _deserialize(self) -> trt.ICudaEngine:
        import tensorrt as trt

        plan = self.path.read_bytes() if self.path.is_file() else b""
        if not plan:
            raise BundleError(f"{self.path} is missing or empty: not a TensorRT engine; rebuild it with `{self._rebuild()}`")
        engine: trt.ICudaEngine | None = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise BundleError(
                f"{self.path} could not be deserialised by TensorRT {trt.__version__} (a corrupt or truncated .plan, "
                f"or one from another TensorRT version): {self._log_tail()}; rebuild it with `{self._rebuild()}`"
            )
        return engine

    def _log_tail(self) -> str:
        return " | ".join(self._messages[-3:]) or "TensorRT gave no reason"

    def _bind(self) -> None:
        """Check the engine's I/O against the manifest, allocate device + pinned host buffers, set addresses."""
        import tensorrt as trt
        from cuda.bindings import runtime as cudart

        engine, context = self._engine, self._context
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        specs = {t.name: t for t in (*self.component.inputs, *self.component.outputs)}
        if sorted(names) != sorted(specs):
            raise BundleError(
                f"{self.path}: the engine's tensors {sorted(names)} are not the manifest's {sorted(specs)}; "
                f"the bundle is inconsistent, rebuild it with `{self._rebuild()}`"
            )
        for spec in self.component.inputs:
            if -1 in dims(engine.get_tensor_shape(spec.name)):  # a dynamic ONNX built with min = opt = max
                context.set_input_shape(spec.name, trt.Dims(list(spec.shape)))
        for name in names:
            spec = specs[name]
            shape = dims(context.get_tensor_shape(name))
            dtype = DTYPES.get(engine.get_tensor_dtype(name).name, "unsupported")
            if shape != spec.shape or dtype != spec.dtype:
                raise BundleError(
                    f"{self.path}: tensor {name} is {dtype} {shape} in the engine but {spec.dtype} {spec.shape} in the manifest; "
                    f"rebuild it with `{self._rebuild()}`"
                )
            nbytes = int(np.prod(spec.shape, dtype=np.int64)) * np.dtype(spec.dtype).itemsize
            device_ptr = value(cudart.cudaMalloc(nbytes), f"allocating {nbytes} bytes of GPU memory for {name}")
            self._bindings[name] = _Binding(spec, device_ptr, np.empty(0), 0)  # registered at once, so close() frees it
            host_ptr = value(cudart.cudaMallocHost(nbytes), f"allocating {nbytes} bytes of pinned host memory for {name}")
            self._bindings[name] = _Binding(spec, device_ptr, pinned_array(host_ptr, spec.shape, spec.dtype), host_ptr)
            if not context.set_tensor_address(name, device_ptr):
                raise BundleError(f"{self.path}: TensorRT refused the buffer address of {name}: {self._log_tail()}")

    def _enqueue(self) -> None:
        """Inputs host->device, the engine, outputs device->host: all queued on the one stream."""
        from cuda.bindings import runtime as cudart

        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for spec in self.component.inputs:
            b = self._bindings[spec.name]
            done(cudart.cudaMemcpyAsync(b.device, b.host_ptr, b.nbytes, h2d, self._stream), f"copying {spec.name} to the GPU")
        if not self._context.execute_async_v3(int(self._stream)):
            raise BundleError(f"{self.component.name}: TensorRT could not run the engine: {self._log_tail()}")
        for spec in self.component.outputs:
            b = self._bindings[spec.name]
            done(cudart.cudaMemcpyAsync(b.host_ptr, b.device, b.nbytes, d2h, self._stream), f"copying {spec.name} from the GPU")

    def _capture(self) -> None:
        """Record one call into a CUDA graph, after one plain call (TensorRT finishes its setup on the first enqueue)."""
        from cuda.bindings import runtime as cudart

        self._enqueue()
        done(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        global_mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
        done(cudart.cudaStreamBeginCapture(self._stream, global_mode), "starting CUDA graph capture")
        try:
            self._enqueue()
        finally:
            # capture must end even when the enqueue failed, or the stream stays unusable
            err, graph = cudart.cudaStreamEndCapture(self._stream)
        if err != cudart.cudaError_t.cudaSuccess:
            raise BundleError(
                f"{self.component.name}: this engine cannot be captured into a CUDA graph "
                f"({cudart.cudaGetErrorName(err)[1].decode(errors='replace')}); load it with cuda_graph=False"
            )
        self._graph = graph
        self._graph_exec = value(cudart.cudaGraphInstantiate(graph, 0), "instantiating the CUDA graph")

    # -- the engine protocol ------------------------------------------------

    def __call__(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from cuda.bindings import runtime as cudart

        check_feed(self.component, feed)
        if self._closed:
            raise BundleError(f"{self.component.name}: this TensorRT engine was closed; load the bundle again")
        for spec in self.component.inputs:
            np.copyto(self._bindings[spec.name].host, feed[spec.name])
        if self._graph_exec is not None:
            done(cudart.cudaGraphLaunch(self._graph_exec, self._stream), "launching the CUDA graph")
        else:
            self._enqueue()
        done(cudart.cudaStreamSynchronize(self._stream), f"running {self.component.name} (cudaStreamSynchronize)")
        return {spec.name: self._bindings[spec.name].host.copy() for spec in self.component.outputs}

    @property
    def uses_cuda_graph(self) -> bool:
        return self._graph_exec is not None

    # -- resources ------------------------------------------------------------

    def close(self) -> None:
        """Free the graph, buffers, stream, context and engine; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        from cuda.bindings import runtime as cudart

        # best effort from here on: report nothing, free everything
        cudart.cudaStreamSynchronize(self._stream)
        if self._graph_exec is not None:
            cudart.cudaGraphExecDestroy(self._graph_exec)
        if self._graph is not None:
            cudart.cudaGraphDestroy(self._graph)
        self._graph = self._graph_exec = None
        for b in self._bindings.values():
            cudart.cudaFree(b.device)
            if b.host_ptr:
                cudart.cudaFreeHost(b.host_ptr)
        self._bindings.clear()
        cudart.cudaStreamDestroy(self._stream)
        # the context before the engine, the engine before the runtime: TensorRT's documented order
        del self._context
        del self._engine
        del self._runtime

    def __enter__(self) -> TrtEngine:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()
