"""Stand-ins for `tensorrt` and cuda-python's cudart, for driving the TensorRT code paths on a CPU.

Only the calls export/tensorrt/builder.py and runtime/backends/tensorrt.py make, with the documented
shapes of their results (cudart: (error, *values) tuples). "Device memory" is host memory here;
a stream records nothing and runs at once, except while capturing, when copies and engine runs
are recorded into the "graph" and replayed by cudaGraphLaunch, as CUDA does. The fake engine
computes out = 2 * sample + timestep (per batch item) for a UNet-shaped component, or, given `plans`
(each plan's tensors and a function of its inputs), what that function computes: a whole bundle can
run through the runtime's TensorRT path that way. As `tensorrt_rtx` it also has TensorRT for RTX's
engine validity, runtime config and runtime cache.
"""

from __future__ import annotations

import ctypes
import enum
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FAKE_PLAN = b"FAKEPLAN"
DTYPE_NAMES = {"float32": "FLOAT", "float16": "HALF", "int32": "INT32", "int64": "INT64"}
Tensors = dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype), inputs and outputs
Compute = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]  # every bound tensor -> the outputs


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorStreamCaptureInvalidated = 901


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class cudaStreamCaptureMode(enum.IntEnum):
    cudaStreamCaptureModeGlobal = 0


@dataclass
class Gpu:
    """The fake machine: its name, its memory, what is captured, and knobs to make calls fail."""

    name: bytes = b"Orin"
    major: int = 8
    minor: int = 7
    memory: dict[int, Any] = field(default_factory=dict)
    capturing: list[Callable[[], None]] | None = None
    fail_malloc_after: int | None = None
    launches: int = 0
    count_error: cudaError_t = cudaError_t.cudaSuccess  # what cudaGetDeviceCount says (no driver: an error)
    invalid: tuple[str, ...] = ()  # TensorRT for RTX's engine-validity diagnostics for this GPU (empty: valid)
    runtime_configs: list[Any] = field(default_factory=list)  # TensorRT for RTX: every runtime config made

    def alloc(self, size: int) -> tuple[cudaError_t, int]:
        if self.fail_malloc_after is not None and len(self.memory) >= self.fail_malloc_after:
            return cudaError_t.cudaErrorMemoryAllocation, 0
        buf = ctypes.create_string_buffer(size)
        self.memory[ctypes.addressof(buf)] = buf
        return cudaError_t.cudaSuccess, ctypes.addressof(buf)

    def free(self, ptr: int) -> tuple[cudaError_t]:
        return (cudaError_t.cudaSuccess if self.memory.pop(ptr, None) is not None else cudaError_t.cudaErrorInvalidValue,)

    def run(self, op: Callable[[], None]) -> None:
        if self.capturing is not None:
            self.capturing.append(op)
        else:
            op()


def view(ptr: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_uint8 * n).from_address(ptr), dtype=dtype).reshape(shape)


def make_cudart(gpu: Gpu) -> types.ModuleType:
    ok = cudaError_t.cudaSuccess
    m = types.ModuleType("cuda.bindings.runtime")
    m.cudaError_t, m.cudaMemcpyKind, m.cudaStreamCaptureMode = cudaError_t, cudaMemcpyKind, cudaStreamCaptureMode
    m.cudaGetErrorName = lambda err: (ok, cudaError_t(err).name.encode())
    m.cudaGetDeviceCount = lambda: (gpu.count_error, 1 if gpu.count_error == ok else None)
    m.cudaSetDevice = lambda index: (ok,)
    m.cudaGetDeviceProperties = lambda index: (ok, types.SimpleNamespace(name=gpu.name, major=gpu.major, minor=gpu.minor))
    m.cudaStreamCreate = lambda: (ok, Stream())
    m.cudaStreamDestroy = lambda stream: (ok,)
    m.cudaStreamSynchronize = lambda stream: (ok,)
    m.cudaMalloc = gpu.alloc
    m.cudaMallocHost = gpu.alloc
    m.cudaFree = gpu.free
    m.cudaFreeHost = gpu.free

    def memcpy(dst: int, src: int, count: int, kind: cudaMemcpyKind, stream: Any) -> tuple[cudaError_t]:
        gpu.run(lambda: ctypes.memmove(dst, src, count))
        return (ok,)

    def begin(stream: Any, mode: cudaStreamCaptureMode) -> tuple[cudaError_t]:
        gpu.capturing = []
        return (ok,)

    def end(stream: Any) -> tuple[cudaError_t, list[Callable[[], None]]]:
        graph, gpu.capturing = gpu.capturing or [], None
        return ok, graph

    def launch(graph: list[Callable[[], None]], stream: Any) -> tuple[cudaError_t]:
        gpu.launches += 1
        for op in graph:
            op()
        return (ok,)

    m.cudaMemcpyAsync = memcpy
    m.cudaStreamBeginCapture, m.cudaStreamEndCapture = begin, end
    m.cudaGraphInstantiate = lambda graph, flags: (ok, graph)
    m.cudaGraphLaunch = launch
    m.cudaGraphExecDestroy = m.cudaGraphDestroy = lambda graph: (ok,)
    return m


class Stream:
    def __int__(self) -> int:
        return 1234


class DataType:
    def __init__(self, name: str) -> None:
        self.name = name


def unet_stand_in(bound: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a UNet-shaped engine without a computation of its own gives: out_sample = 2 * sample + timestep per item."""
    return {"out_sample": 2 * bound["sample"] + bound["timestep"][:, None, None, None]}


class FakeEngine:
    """An engine over the manifest's tensors: `compute`'s outputs, by default unet_stand_in's."""

    def __init__(self, gpu: Gpu, tensors: Tensors, compute: Compute = unet_stand_in) -> None:
        self.gpu, self.tensors, self.compute = gpu, tensors, compute
        self.num_io_tensors = len(tensors)

    def get_tensor_name(self, i: int) -> str:
        return list(self.tensors)[i]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][0]

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType(DTYPE_NAMES[self.tensors[name][1]])

    def create_execution_context(self, config: Any = None) -> FakeContext:
        return FakeContext(self)

    def create_runtime_config(self) -> RuntimeConfig:  # TensorRT for RTX
        config = RuntimeConfig()
        self.gpu.runtime_configs.append(config)
        return config


class RuntimeCache:
    """TensorRT for RTX's IRuntimeCache: what it was given, and what it hands back (its kernels, here a marker)."""

    def __init__(self) -> None:
        self.loaded = b""

    def deserialize(self, data: bytes) -> bool:
        self.loaded = data
        return data.startswith(b"KERNELS")

    def serialize(self) -> bytes:
        return b"KERNELS for this GPU"


class RuntimeConfig:
    def __init__(self) -> None:
        self.cache: RuntimeCache | None = None
        self.cuda_graph_strategy = "DISABLED"

    def create_runtime_cache(self) -> RuntimeCache:
        return RuntimeCache()

    def set_runtime_cache(self, cache: RuntimeCache) -> bool:
        self.cache = cache
        return True


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.addresses = engine, {}
        self.shapes: dict[str, tuple[int, ...]] = {}  # set_input_shape's, for an engine's dynamic (-1) axes
        self.shape_calls: list[tuple[str, tuple[int, ...]]] = []

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shapes.get(name, self.engine.tensors[name][0])

    def set_input_shape(self, name: str, shape: Any) -> bool:
        declared = self.engine.tensors[name][0]
        if len(shape) != len(declared) or any(d not in (-1, s) for d, s in zip(declared, shape)):
            return False
        self.shapes[name] = tuple(shape)
        self.shape_calls.append((name, tuple(shape)))
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream: int) -> bool:
        t, a, compute = self.engine.tensors, self.addresses, self.engine.compute

        def run() -> None:  # the views are made when it runs: a captured graph's replay reads the memory of then
            bound = {name: view(a[name], self.get_tensor_shape(name), t[name][1]) for name in t if name in a}
            for name, value in compute(bound).items():
                bound[name][...] = value

        self.engine.gpu.run(run)
        return True


def make_tensorrt(
    gpu: Gpu,
    tensors: Tensors,
    version: str = "10.3.0.30",
    name: str = "tensorrt",
    plans: dict[bytes, tuple[Tensors, Compute]] | None = None,
) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__version__ = version

    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3

    class ILogger:
        def __init__(self) -> None:
            pass

    ILogger.Severity = Severity

    class Runtime:
        def __init__(self, logger: ILogger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, plan: bytes) -> FakeEngine | None:
            if not plan.startswith(FAKE_PLAN):
                self.logger.log(Severity.ERROR, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (magic tag does not match)")
                return None
            if plans is not None:
                return FakeEngine(gpu, *plans[plan])
            return FakeEngine(gpu, tensors)

        def get_engine_validity(self, plan: bytes) -> tuple[EngineValidity, int]:  # TensorRT for RTX
            flags = 0
            for why in gpu.invalid:
                flags |= int(EngineInvalidityDiagnostics[why])
            return (EngineValidity.INVALID if gpu.invalid else EngineValidity.VALID), flags

    class EngineValidity(enum.IntEnum):
        VALID = 0
        SUBOPTIMAL = 1
        INVALID = 2

    class EngineInvalidityDiagnostics(enum.IntFlag):
        VERSION_MISMATCH = 1
        UNSUPPORTED_CC = 2
        OLD_CUDA_DRIVER = 4

    m.ILogger, m.Runtime = ILogger, Runtime
    m.EngineValidity, m.EngineInvalidityDiagnostics = EngineValidity, EngineInvalidityDiagnostics
    m.CudaGraphStrategy = types.SimpleNamespace(DISABLED="DISABLED", WHOLE_GRAPH_CAPTURE="WHOLE_GRAPH_CAPTURE")
    m.Dims = tuple
    return m


def install(
    monkeypatch: Any,
    gpu: Gpu,
    tensors: Tensors,
    version: str = "10.3.0.30",
    module: str = "tensorrt",
    plans: dict[bytes, tuple[Tensors, Compute]] | None = None,
) -> None:
    """Make `import tensorrt` (or `tensorrt_rtx`) and `from cuda.bindings import runtime` return the fakes for one test.

    plans: each plan file's bytes -> its engine's tensors and what it computes (else every plan is the UNet-shaped
    engine over `tensors`)."""
    cudart = make_cudart(gpu)
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart
    cuda = types.ModuleType("cuda")
    cuda.bindings = bindings
    monkeypatch.setitem(sys.modules, module, make_tensorrt(gpu, tensors, version, module, plans))
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)


def onnx_backed_plans(bundle: Any) -> dict[bytes, tuple[Tensors, Compute]]:
    """For a TensorRT bundle whose plans are FAKE_PLAN + the component's name: each engine computes what the ONNX it was
    built from computes (ONNX Runtime, CPU), so a whole run through the runtime's TensorRT path can be compared with
    the ONNX bundle's."""
    from pathlib import Path

    from export.tensorrt.from_onnx import onnx_component
    from runtime.bundle import load_manifest
    from runtime.dispatch import load_engine

    plans: dict[bytes, tuple[Tensors, Compute]] = {}
    for name, c in load_manifest(Path(bundle)).components.items():
        ort = load_engine(onnx_component(c), Path(bundle), backend="onnxruntime", device="cpu")
        inputs = [t.name for t in c.inputs]

        def compute(bound: dict[str, np.ndarray], ort: Any = ort, inputs: list[str] = inputs) -> dict[str, np.ndarray]:
            return dict(ort({n: bound[n].copy() for n in inputs}))

        plans[FAKE_PLAN + name.encode()] = ({t.name: (t.shape, t.dtype) for t in (*c.inputs, *c.outputs)}, compute)
    return plans
