"""ONNX -> TensorRT engine (.plan) with TensorRT's own builder API, from either library behind it.

NVIDIA TensorRT (`tensorrt`) builds on the GPU the engine will run on; TensorRT for RTX (`tensorrt_rtx`,
the same API) builds ahead of time on any machine, GPU or not, for a set of compute capabilities
(--compute-capability; default the library's portable set), and the engine is finished for the GPU at
load. runtime.backends.libraries names both. Static shapes (a dynamic ONNX gets one profile with min = opt = max = the bundle's shapes),
precision taken from the ONNX where it carries one (fp16 weights, Q/DQ nodes: a strongly
typed network), a persistent timing cache per GPU and TensorRT version, the builder
optimization level, and a workspace limit for small-memory devices.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.backends.libraries import TENSORRT, Library, require
from runtime.backends.tensorrt import DTYPES, capturing_logger
from runtime.bundle import TensorSpec
from runtime.bundle.fit import Device

if TYPE_CHECKING:
    import tensorrt as trt

TIMING_CACHE_DIR = Path("engines") / ".timing-cache"
OPTIMIZATION_LEVELS = range(0, 6)
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
INT8_HINT = (
    "export an int8 bundle, its UNet calibrated on real sampling runs and gated on image quality "
    "(`python -m export.build --model MODEL --precision int8 --backend tensorrt`, or `--backend onnxruntime` "
    "and then --from-onnx that bundle); or build fp16 with --precision fp16"
)


class EngineBuildError(RuntimeError):
    """An engine could not be built; the message says which input or limit to change."""


# -- builder settings ----------------------------------------------------------


@dataclass(frozen=True)
class BuilderSettings:
    """How hard and with how much memory TensorRT builds; None keeps TensorRT's own default."""

    optimization_level: int = 3
    workspace_mib: int | None = None  # IBuilderConfig memory pool WORKSPACE; None: the whole device
    max_aux_streams: int | None = None  # 0: one stream, the least activation memory
    preset: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# Jetson Orin Nano / NX share 4-16 GB between CPU and GPU: cap the tactic workspace and run single-stream.
PRESETS = {
    "desktop": BuilderSettings(preset="desktop"),
    "jetson-orin-nano": BuilderSettings(workspace_mib=1024, max_aux_streams=0, preset="jetson-orin-nano"),
    "jetson-orin-nx": BuilderSettings(workspace_mib=2048, max_aux_streams=0, preset="jetson-orin-nx"),
}


def builder_settings(preset: str | None = None, optimization_level: int | None = None, workspace_mib: int | None = None) -> BuilderSettings:
    """A preset (default: TensorRT's defaults), with explicit --builder-optimization-level / --workspace on top."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown --device-preset {preset!r}: choose one of {', '.join(PRESETS)}")
    base = PRESETS[preset] if preset else BuilderSettings()
    if optimization_level is not None and optimization_level not in OPTIMIZATION_LEVELS:
        raise ValueError(
            f"--builder-optimization-level {optimization_level}: TensorRT takes 0 (fastest build) to 5 (most search); 3 is its default"
        )
    if workspace_mib is not None and workspace_mib < 1:
        raise ValueError(f"--workspace {workspace_mib}: give the workspace memory limit in MiB, at least 1 (e.g. 1024)")
    return BuilderSettings(
        optimization_level=base.optimization_level if optimization_level is None else optimization_level,
        workspace_mib=base.workspace_mib if workspace_mib is None else workspace_mib,
        max_aux_streams=base.max_aux_streams,
        preset=base.preset,
    )


# -- precision ----------------------------------------------------------------


@dataclass(frozen=True)
class Precision:
    """What an engine computes in and the network/builder flags that get it there."""

    name: str  # fp32 | fp16 | int8
    strongly_typed: bool  # types come from the ONNX (fp16 weights, Q/DQ nodes); TensorRT 11 knows nothing else
    fp16_flag: bool  # TensorRT 10's weak typing: BuilderFlag.FP16 lets it pick fp16 kernels for an fp32 ONNX
    tf32: bool  # fp32 engines are verified at 1e-3, so TF32's 10-bit mantissas stay off there

    def flags(self) -> dict[str, bool]:
        return {"strongly_typed": self.strongly_typed, "fp16": self.fp16_flag, "tf32": self.tf32}


def choose_precision(
    asked: str,
    component: str,
    onnx_precision: str,
    has_qdq: bool,
    tensorrt_major: int,
    kept_fp32: bool = False,
    library: Library = TENSORRT,
) -> Precision:
    """The engine precision for one component, or an EngineBuildError saying how to get the ONNX it needs.

    kept_fp32: the exporter kept this component in fp32 on purpose (fp16 overflows): it stays fp32.
    TensorRT for RTX, like TensorRT 11, builds strongly typed networks only: the types come from the ONNX.
    """
    if asked not in ("fp32", "fp16", "int8"):
        raise ValueError(f"unknown precision {asked!r}: choose fp32, fp16 or int8")
    if has_qdq:
        if asked == "fp32":
            raise EngineBuildError(
                f"{component}: the ONNX is quantized (Q/DQ nodes); "
                "an fp32 engine needs the fp32 ONNX bundle (`python -m export.build --precision fp32`)"
            )
        return Precision("int8", strongly_typed=True, fp16_flag=False, tf32=True)
    if asked == "int8" and component == "unet":
        raise EngineBuildError(
            f"int8 needs a UNet ONNX with Q/DQ (QuantizeLinear/DequantizeLinear) nodes: TensorRT 10+ builds int8 "
            f"only from explicitly quantized ONNX, and this bundle's unet has none. To get one, {INT8_HINT}"
        )
    if asked == "fp32" or kept_fp32:
        if onnx_precision != "fp32":
            raise EngineBuildError(
                f"{component}: its ONNX is {onnx_precision}; "
                "an fp32 engine needs the fp32 ONNX bundle (`python -m export.build --precision fp32`)"
            )
        return Precision("fp32", strongly_typed=True, fp16_flag=False, tf32=False)
    if onnx_precision == "fp16":
        return Precision("fp16", strongly_typed=True, fp16_flag=False, tf32=True)
    if tensorrt_major >= 11 or library.ahead_of_time:
        which = library.title if library.ahead_of_time else f"TensorRT {tensorrt_major}"
        raise EngineBuildError(
            f"{component}: {which} builds strongly typed networks only, so an fp16 engine needs an fp16 "
            "ONNX: build the bundle with `python -m export.build --precision fp16` first"
        )
    return Precision("fp16", strongly_typed=False, fp16_flag=True, tf32=True)


# -- compute capabilities (TensorRT for RTX) -------------------------------------------

# What TensorRT for RTX 1.7's builder can target (its ComputeCapability enum), by compute capability.
TARGETS = {"7.5": "SM75", "8.0": "SM80", "8.6": "SM86", "8.9": "SM89", "12.0": "SM120", "12.1": "SM121"}
# Its default, with no target set: portable across Ampere and later RTX-class GPUs, without Turing (NVIDIA's docs:
# "8.0, 8.6, 8.9, 12.0, and later"; Turing only on request, since a portable engine with it runs slower elsewhere).
PORTABLE = ("8.0", "8.6", "8.9", "12.0", "12.1")


def compute_capabilities(asked: str | None) -> tuple[str, ...]:
    """--compute-capability LIST -> the targets to set; () is the library's portable default, ("current",) this GPU."""
    if asked is None or asked.strip() in ("", "portable"):
        return ()
    wanted = tuple(dict.fromkeys(part.strip() for part in asked.split(",") if part.strip()))
    if wanted == ("current",):
        return wanted
    unknown = [cc for cc in wanted if cc not in TARGETS]
    if unknown or not wanted:
        raise ValueError(
            f"--compute-capability {asked}: TensorRT for RTX targets {', '.join(TARGETS)} (comma-separated), "
            "'portable' (its default: 8.0 to 12.x, no Turing) or 'current' (the GPU of this machine)"
        )
    return wanted


def recorded_targets(targets: tuple[str, ...], device: Device | None = None) -> tuple[str, ...]:
    """The compute capabilities a manifest records: the set asked for, the portable set, or this GPU's."""
    if targets == ("current",):
        return (device.compute_capability,) if device else targets
    return targets or PORTABLE


# -- ONNX inspection ------------------------------------------------------------


def onnx_graph(path: Path) -> Any:
    """The ONNX graph without its weights (enough for op types and input shapes)."""
    try:
        import onnx
    except ImportError:
        raise EngineBuildError("reading the ONNX files needs the onnx package: `pip install onnx`") from None
    return onnx.load(str(path), load_external_data=False).graph


def has_qdq(path: Path) -> bool:
    """Does the ONNX carry explicit quantization (QuantizeLinear/DequantizeLinear nodes)?"""
    graph = onnx_graph(path)
    return any(node.op_type in QDQ_OPS for node in graph.node)


def dynamic_inputs(path: Path) -> list[str]:
    """Names of the ONNX inputs with a symbolic or unknown dimension (these need an optimization profile)."""
    graph = onnx_graph(path)
    initializers = {t.name for t in graph.initializer}
    dynamic = []
    for value in graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") or d.dim_value <= 0 for d in dims):
            dynamic.append(str(value.name))
    return dynamic


# -- timing cache -----------------------------------------------------------------


def timing_cache_path(device: Device, root: Path = TIMING_CACHE_DIR) -> Path:
    """One cache per GPU model and TensorRT version: its timings mean nothing elsewhere."""
    return root / f"{device.key}.cache"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


# -- the build ------------------------------------------------------------------

OOM_PATTERNS = re.compile(
    r"out of memory|could not be allocated|cudaErrorMemoryAllocation|insufficient memory|OutOfMemory|failed to allocate", re.I
)


def build_failure(name: str, messages: Sequence[str], settings: BuilderSettings) -> EngineBuildError:
    """Explain a failed build; out of memory says which limit to lower."""
    said = " | ".join(messages[-4:]) or "TensorRT gave no reason"
    if any(OOM_PATTERNS.search(m) for m in messages):
        now = f"now {settings.workspace_mib} MiB" if settings.workspace_mib else "now unlimited"
        smaller = max(256, (settings.workspace_mib or 2048) // 2)
        return EngineBuildError(
            f"{name}: TensorRT ran out of device memory while building ({said}). Lower the builder's workspace limit "
            f"with --workspace {smaller} ({now}), or use --device-preset jetson-orin-nano (1024 MiB, one stream); "
            "close other programs using the GPU, and on a Jetson add swap"
        )
    return EngineBuildError(f"{name}: TensorRT could not build the engine: {said}")


def check_network_inputs(name: str, network_inputs: dict[str, tuple[int, ...]], specs: Sequence[TensorSpec]) -> list[str]:
    """The ONNX must take the bundle's inputs with its shapes; returns the dynamic ones (they get a profile)."""
    expected = {t.name: t.shape for t in specs}
    if sorted(network_inputs) != sorted(expected):
        raise EngineBuildError(
            f"{name}: the ONNX inputs {sorted(network_inputs)} are not the manifest's {sorted(expected)}; rebuild the ONNX bundle"
        )
    dynamic = []
    for input_name, shape in network_inputs.items():
        want = expected[input_name]
        if len(shape) != len(want) or any(d not in (-1, w) for d, w in zip(shape, want)):
            raise EngineBuildError(f"{name}: ONNX input {input_name} has shape {shape}, which cannot take the bundle's {want}")
        if -1 in shape:
            dynamic.append(input_name)
    return dynamic


def build_engine(
    name: str,
    onnx_path: Path,
    inputs: Sequence[TensorSpec],
    precision: Precision,
    settings: BuilderSettings,
    timing_cache: Path | None = None,
    outputs: Sequence[TensorSpec] = (),
    *,
    library: Library = TENSORRT,
    targets: tuple[str, ...] = (),
) -> bytes:
    """Parse the ONNX, build a serialized engine for exactly the bundle's shapes, and update the timing cache.

    library: which TensorRT builds it; targets: TensorRT for RTX's compute capabilities (() its portable default);
    outputs: the manifest's outputs, which the network must produce with the same names, shapes and types.
    """
    require(library, f"building {library.title} engines", cuda=not library.ahead_of_time)
    trt = library.load()
    logger, messages = capturing_logger(library)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if precision.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        said = " | ".join(errors) or " | ".join(messages[-3:])
        hint = ""
        if "zero point" in said.lower():  # an int8 ONNX from before the exporter's Q/DQ became symmetric
            hint = (
                "; TensorRT takes symmetric int8 only (zero points 0): re-export the int8 bundle with "
                "`python -m export.build --precision int8`"
            )
        raise EngineBuildError(f"{name}: {library.title}'s ONNX parser rejected {onnx_path}: {said}{hint}")
    shapes = {network.get_input(i).name: _dims(network.get_input(i).shape) for i in range(network.num_inputs)}
    dynamic = check_network_inputs(name, shapes, inputs)
    if outputs:
        produced = [network.get_output(i) for i in range(network.num_outputs)]
        check_network_outputs(name, {t.name: (_dims(t.shape), DTYPES.get(t.dtype.name, t.dtype.name)) for t in produced}, outputs)
    config = _config(builder, precision, settings, library, targets)
    if dynamic:
        profile = builder.create_optimization_profile()
        for spec in inputs:
            fixed = trt.Dims(list(spec.shape))
            # a stepped axis (the UNet's context in prompt chunks) runs from one step to the bundle's maximum, tuned at
            # one step: most prompts fit one chunk
            low = trt.Dims(list(spec.smallest))
            profile.set_shape(spec.name, low, low, fixed)
        config.add_optimization_profile(profile)
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise build_failure(name, messages, settings)
    if timing_cache is not None:
        _write_atomic(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(plan))


def check_network_outputs(name: str, produced: dict[str, tuple[tuple[int, ...], str]], specs: Sequence[TensorSpec]) -> None:
    """The network must produce the manifest's outputs: the same names, static shapes and dtypes."""
    expected = {t.name: (t.shape, t.dtype) for t in specs}
    if sorted(produced) != sorted(expected):
        raise EngineBuildError(
            f"{name}: the network's outputs {sorted(produced)} are not the manifest's {sorted(expected)}; rebuild the ONNX bundle"
        )
    for out, (shape, dtype) in produced.items():
        if (shape, dtype) != expected[out]:
            want_shape, want_dtype = expected[out]
            raise EngineBuildError(
                f"{name}: output {out} is {dtype} {shape} in the network but {want_dtype} {want_shape} in the manifest; "
                "rebuild the ONNX bundle"
            )


def _config(
    builder: trt.Builder, precision: Precision, settings: BuilderSettings, library: Library, targets: tuple[str, ...]
) -> trt.IBuilderConfig:
    trt = library.load()
    config = builder.create_builder_config()
    config.builder_optimization_level = settings.optimization_level
    if settings.workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    if settings.max_aux_streams is not None:
        config.max_aux_streams = settings.max_aux_streams
    if precision.fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    if not precision.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    if targets:
        rtx: Any = config  # TensorRT for RTX's IBuilderConfig: its compute-capability calls are not in tensorrt-stubs
        rtx.num_compute_capabilities = len(targets)
        for i, cc in enumerate(targets):
            member = "CURRENT" if cc == "current" else TARGETS[cc]
            rtx.set_compute_capability(getattr(trt.ComputeCapability, member), i)
    return config


def _dims(d: trt.Dims) -> tuple[int, ...]:
    return tuple(int(d[i]) for i in range(len(d)))
