"""TensorRT backend: one deserialised engine, buffers allocated once, one CUDA stream, optional CUDA graph.

Imports only the TensorRT library that built the engine (`tensorrt`, or `tensorrt_rtx` for TensorRT for RTX:
runtime.backends.libraries) and cuda-python's cudart (`cuda.bindings.runtime`), both on first use. A
TensorRT-for-RTX engine is compiled for this GPU at load, with a runtime cache on disk (runtime_cache).
Each call copies the feed into pinned host buffers, then host->device copies, `execute_async_v3`
and device->host copies run on the engine's stream; with `cuda_graph=True` that whole sequence is
captured once (static shapes and fixed buffer addresses make the capture valid for every call)
and replayed with one `cudaGraphLaunch` (TensorRT for RTX: its own whole-graph capture of the engine run).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from ..bundle import Component, TensorSpec, load_manifest, rebuild_command, rebuild_hint
from ..bundle.fit import Device, check_compatible
from ..errors import BundleError
from ..protocol import check_feed
from . import runtime_cache
from .cuda import CudaError, NoGpu, current_device, done, gpu_count, gpu_index, pinned_array, value
from .libraries import TENSORRT, Library, TensorRTMissing, _installed, library, require

# the CUDA helpers (runtime.backends.cuda) are named here too: export/ and the tests import them from this module
__all__ = [
    "CudaError", "NoGpu", "TensorRTMissing", "TrtEngine", "current_device", "gpu_count", "gpu_index", "require_tensorrt",
    "tensorrt_available",
]  # fmt: skip

if TYPE_CHECKING:
    import tensorrt as trt
    from cuda.bindings import runtime as cudart

# numpy dtype name of each TensorRT DataType the bundles use (by member name, stable across 10.x and 11.x).
DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32", "INT64": "int64", "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


def tensorrt_available(lib: Library = TENSORRT) -> bool:
    """True where the library and cuda-python's cudart are installed; asks without importing them (that loads CUDA)."""
    return lib.installed() and _installed("cuda.bindings")


def require_tensorrt(what: str, instead: str = "", lib: Library = TENSORRT) -> None:
    """Raise TensorRTMissing, naming what is missing and how to install it, unless the library and cudart import.

    what: the task, as the message's subject ("building TensorRT engines"); instead: an alternative to offer.
    """
    require(lib, what, instead=instead)


def capturing_logger(lib: Library = TENSORRT) -> tuple[Any, list[str]]:
    """A TensorRT logger that keeps warnings and errors, so a failure can quote TensorRT's own words."""
    lib_module = lib.load()
    messages: list[str] = []

    class Capture(lib_module.ILogger):  # type: ignore[name-defined]  # the library is picked at run time
        def __init__(self) -> None:
            lib_module.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            if severity <= lib_module.ILogger.Severity.WARNING:
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
        self._lib = library(component.build.get("library"))
        try:
            require(self._lib, f"this bundle holds {self._lib.title} engines: running them")
        except TensorRTMissing as e:
            raise TensorRTMissing(f"{e}; {self._onnxruntime_hint()}") from None
        trt = self._lib.load()
        from cuda.bindings import runtime as cudart

        index = gpu_index(device)
        here = self._device(index)
        if check_device:
            check_compatible(component, self.bundle, here)
        done(cudart.cudaSetDevice(index), f"selecting GPU {index} (cudaSetDevice)")
        # TensorRT keeps a raw pointer to the logger: it must live as long as the engine
        self._logger, self._messages = capturing_logger(self._lib)
        self._runtime = trt.Runtime(self._logger)
        plan = self._read_plan()
        self._engine = self._deserialize(plan)
        self._cache: tuple[Path, Any] | None = None  # TensorRT for RTX: (file, IRuntimeCache), saved after the first run
        context = self._context_for(plan, here, cuda_graph)
        if context is None:
            raise BundleError(f"{component.name}: TensorRT could not create an execution context for {path}: {self._log_tail()}")
        self._context = context
        self._bindings: dict[str, _Binding] = {}
        self._graph: cudart.cudaGraph_t | None = None
        self._graph_exec: cudart.cudaGraphExec_t | None = None
        self._stream = value(cudart.cudaStreamCreate(), "cudaStreamCreate")
        # TensorRT for RTX captures its own CUDA graph (its runtime config's strategy, set above); classic TensorRT's is ours
        self._library_graph = cuda_graph and self._lib.ahead_of_time
        self._closed = False
        try:
            self._bind()
            if cuda_graph and not self._library_graph:
                self._capture()
        except BaseException:
            self.close()
            raise

    # -- setup -------------------------------------------------------------

    def _rebuild(self) -> str:
        return rebuild_command(self.bundle, self.component, in_place=True)

    def _onnxruntime_hint(self) -> str:
        """The alternative where this bundle's engines cannot run: an ONNX Runtime bundle of the same model."""
        try:
            manifest = load_manifest(self.bundle, verify_files=False)
        except (BundleError, OSError, ValueError):
            return "or run an ONNX Runtime bundle (`python -m export.build --backend onnxruntime`) instead"
        command = rebuild_hint(None, manifest, backend="onnxruntime", compute_capability=None)
        return f"or build and run an ONNX Runtime bundle instead: `{command}`"

    def _device(self, index: int) -> Device:
        """This machine's GPU, or one line saying what this bundle needs and what runs here instead."""
        try:
            return current_device(index, self._lib)
        except NoGpu as e:
            where = "an NVIDIA GPU"
            targets = self.component.build.get("compute_capabilities")
            if self._lib.ahead_of_time and targets:
                where = f"an NVIDIA GPU of compute capability {', '.join(map(str, targets))} (RTX-class) with a CUDA 13 driver"
            raise NoGpu(
                f"{self.bundle} holds {self._lib.title} engines, which run on {where}, and {e}; "
                f"{self._onnxruntime_hint().removeprefix('or ')}"
            ) from None

    def _read_plan(self) -> bytes:
        plan = self.path.read_bytes() if self.path.is_file() else b""
        if not plan:
            raise BundleError(f"{self.path} is missing or empty: not a TensorRT engine; rebuild it with `{self._rebuild()}`")
        return plan

    def _deserialize(self, plan: bytes) -> trt.ICudaEngine:
        if self._lib.ahead_of_time:
            self._check_validity(plan)
        engine: trt.ICudaEngine | None = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise BundleError(
                f"{self.path} could not be deserialised by {self._lib.title} {self._lib.load().__version__} (a corrupt or truncated .plan, "
                f"or one from another {self._lib.title} version): {self._log_tail()}; rebuild it with `{self._rebuild()}`"
            )
        return engine

    def _check_validity(self, plan: bytes) -> None:
        """TensorRT for RTX reads an engine's header and says whether it can run on this GPU, and if not, why."""
        trt = self._lib.load()
        validity, diagnostics = self._runtime.get_engine_validity(plan)
        if validity != trt.EngineValidity.INVALID:
            return
        flags = trt.EngineInvalidityDiagnostics.__members__
        why = [name for name, flag in flags.items() if int(diagnostics) & int(flag)] or ["no diagnostics"]
        fix = f"rebuild it for this GPU with `{self._rebuild()} --compute-capability current`"
        if "OLD_CUDA_DRIVER" in why:
            fix = "update the NVIDIA driver (TensorRT for RTX cu13 needs a CUDA 13 driver)"
        raise BundleError(
            f"{self.path}: {self._lib.title} says this engine cannot run on this GPU ({', '.join(why)}; {self._log_tail()}); {fix}"
        )

    def _context_for(self, plan: bytes, here: Device, cuda_graph: bool) -> Any:
        """An execution context; for TensorRT for RTX with its runtime cache (and its own CUDA graph capture)."""
        if not self._lib.ahead_of_time:
            return self._engine.create_execution_context()
        rtx = self._lib.load()
        config: Any = self._engine.create_runtime_config()  # TensorRT for RTX's IRuntimeConfig: not in tensorrt-stubs
        cache = config.create_runtime_cache()
        path = runtime_cache.cache_file(here, hashlib.sha256(plan).hexdigest())
        saved = runtime_cache.read(path)
        if saved and not cache.deserialize(saved):
            cache = config.create_runtime_cache()  # a damaged or foreign cache is dropped and rebuilt
        config.set_runtime_cache(cache)
        if cuda_graph:
            config.cuda_graph_strategy = rtx.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        self._cache = (path, cache)
        return self._engine.create_execution_context(config)

    @property
    def runtime_cache_file(self) -> Path | None:
        """Where this engine's just-in-time kernels are kept (TensorRT for RTX only)."""
        return self._cache[0] if self._cache else None

    def _save_runtime_cache(self) -> None:
        """After the first run, what TensorRT for RTX compiled for this GPU goes to disk (once per load)."""
        if self._cache is None:
            return
        path, cache = self._cache
        self._cache = (path, None)
        if cache is not None:
            try:
                runtime_cache.write(path, bytes(memoryview(cache.serialize())))
            except OSError:
                pass  # a read-only home: the next load compiles again, nothing is lost

    def _log_tail(self) -> str:
        return " | ".join(self._messages[-3:]) or "TensorRT gave no reason"

    def _bind(self) -> None:
        """Check the engine's I/O against the manifest, allocate device + pinned host buffers, set addresses."""
        from cuda.bindings import runtime as cudart

        trt = self._lib.load()  # TensorRT for RTX's Dims are its own: `tensorrt` may not be installed beside it
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
            if spec.steps:
                self._reshape(spec.name, tuple(feed[spec.name].shape))
            np.copyto(self._bindings[spec.name].host, feed[spec.name])
        if self._graph_exec is not None:
            done(cudart.cudaGraphLaunch(self._graph_exec, self._stream), "launching the CUDA graph")
        else:
            self._enqueue()
        done(cudart.cudaStreamSynchronize(self._stream), f"running {self.component.name} (cudaStreamSynchronize)")
        self._save_runtime_cache()
        return {spec.name: self._bindings[spec.name].host.copy() for spec in self.component.outputs}

    def _reshape(self, name: str, shape: tuple[int, ...]) -> None:
        """A stepped input (the UNet's context, in prompt chunks) at another length: the engine is told the new shape and
        reads that much of the buffer, allocated at the maximum; a CUDA graph, recorded for one shape, is recorded again."""
        b = self._bindings[name]
        if b.host.shape == shape:
            return
        trt = self._lib.load()
        if not self._context.set_input_shape(name, trt.Dims(list(shape))):
            raise BundleError(f"{self.component.name}: TensorRT refused shape {shape} for {name}: {self._log_tail()}")
        self._bindings[name] = _Binding(b.spec, b.device, pinned_array(b.host_ptr, shape, b.spec.dtype), b.host_ptr)
        if self._graph_exec is not None:
            self._free_graph()
            self._capture()

    @property
    def uses_cuda_graph(self) -> bool:
        return self._graph_exec is not None or self._library_graph

    # -- resources ------------------------------------------------------------

    def _free_graph(self) -> None:
        from cuda.bindings import runtime as cudart

        if self._graph_exec is not None:
            cudart.cudaGraphExecDestroy(self._graph_exec)
        if self._graph is not None:
            cudart.cudaGraphDestroy(self._graph)
        self._graph = self._graph_exec = None

    def close(self) -> None:
        """Free the graph, buffers, stream, context and engine; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        from cuda.bindings import runtime as cudart

        # best effort from here on: report nothing, free everything
        cudart.cudaStreamSynchronize(self._stream)
        self._free_graph()
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
