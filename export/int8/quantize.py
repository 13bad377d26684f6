"""The UNet to int8 QDQ with onnxruntime.quantization, and which of its nodes stay float.

Only Conv, MatMul and Gemm are quantized (Softmax, norms and the rest stay float). The nodes kept float are
chosen two ways, both recorded in the manifest:
- rules, from where quantization is known to destroy the signal: the Conv reading the noisy latents
  (quantizing x_t loses the small low-t signal), the Conv writing the output, the time-embedding Gemms
  (the timestep's sinusoids are the whole conditioning on t), and the attention batched MatMuls
  (activation x activation: Q.K^T and softmax.V, whose ranges vary most);
- measurement: a sweep quantizes each remaining Conv alone and keeps float the most sensitive ones,
  by their UNet relative L2 error on calibration inputs; the sweep is cached by the fp32 UNet's hash
  and the calibration ranges' hash.

Calibration is our own pass (calibrate): MinMax ranges of the tensors the quantized nodes read and write,
collected with one session over the source's weights, so a full-size UNet calibrates on a 24 GB machine;
onnxruntime.quantization's quantize_static then reads them from its calibration cache and places the Q/DQ.

Quantization works on the fp32 file at `source` and writes a new file; the source is only read (the
quantizer writes a shape-inferred copy of the graph beside it, so callers hand it a copy of the bundle's).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.bundle import sha256_file

OP_TYPES = ("Conv", "MatMul", "Gemm")
SWEEP_SAMPLES = 8  # calibration inputs each one-node quantization is measured on
CACHE_ENV = "LDM_DEPLOY_CACHE"
LARGE = 1 << 30  # bytes of a single-file ONNX past which the quantizer writes external data


@dataclass(frozen=True)
class Placement:
    """How Q/DQ nodes are placed and typed for a target runtime."""

    target: str  # symmetric | asymmetric (PLACEMENTS)
    activation: str  # QUInt8 | QInt8
    weight: str
    reduce_range: bool
    extra: tuple[tuple[str, Any], ...] = ()

    def record(self) -> dict[str, Any]:
        return {
            "target": self.target, "activations": self.activation, "weights": f"{self.weight} per-channel",
            "reduce_range": self.reduce_range, **dict(self.extra),
        }  # fmt: skip


def has_vnni() -> bool:
    """x86 with VNNI (AVX512-VNNI / AVX-VNNI) multiplies u8 x s8 without the 16-bit saturation of older AVX2."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def placement(target: str) -> Placement:
    """How the Q/DQ graph for `target` is typed and placed (PLACEMENTS names every choice; see there)."""
    return PLACEMENTS[TARGET_PLACEMENT[target]]()


def symmetric() -> Placement:
    """What TensorRT (classic and for RTX) parses: S8 activations and per-channel S8 weights, zero points 0, biases
    left float (TensorRT rejects a DequantizeLinear of an int32 bias), one Q/DQ pair per consumer, as TensorRT's
    explicit-quantization fusion expects. ONNX Runtime runs the same graph."""
    extra = (("ActivationSymmetric", True), ("WeightSymmetric", True), ("DedicatedQDQPair", True), ("QuantizeBias", False))
    return Placement("symmetric", "QInt8", "QInt8", False, extra)


def asymmetric() -> Placement:
    """ONNX Runtime CPU's own choice: U8 activations with a zero point, S8 per-channel weights (its u8s8 kernels),
    7-bit weights on x86 without VNNI (ORT's documented fix for vpmaddubsw saturation). TensorRT refuses it."""
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686")
    return Placement("asymmetric", "QUInt8", "QInt8", x86 and not has_vnni())


PLACEMENTS: dict[str, Callable[[], Placement]] = {"symmetric": symmetric, "asymmetric": asymmetric}
# One int8 graph for both backends: the symmetric one. The quality gate then runs on exactly the graph TensorRT
# receives, and any int8 bundle feeds --from-onnx. Its cost on ONNX Runtime CPU, measured on the reference UNet
# (benchmarks.int8_unet --placements asymmetric,symmetric, VNNI CPU): 16% slower calls at 64x64, 7% at 256x256.
TARGET_PLACEMENT = {"tensorrt": "symmetric", "onnxruntime": "symmetric"}


# ---- which nodes stay float -------------------------------------------------------------------------------


def float_rules(model: Any) -> dict[str, str]:
    """Node name -> why it stays float, by the rules above, from the graph's structure (not its names)."""
    graph = model.graph
    weights = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    kept: dict[str, str] = {}
    for n in graph.node:
        if n.op_type == "Conv" and n.input[0] in inputs:
            kept[n.name] = "reads the noisy latents (conv_in)"
        elif n.op_type == "Conv" and _feeds_output(graph, n, outputs):
            kept[n.name] = "writes the UNet output (conv_out)"
        elif n.op_type == "Gemm":
            kept[n.name] = "time embedding (Gemm)"
        elif n.op_type == "MatMul" and not any(i in weights for i in n.input):
            kept[n.name] = "attention batched matmul (activation x activation)"
    return kept


def _feeds_output(graph: Any, node: Any, outputs: set[str]) -> bool:
    """The node's output reaches a graph output through shape-only or elementwise-free ops (or directly)."""
    passthrough = {"Identity", "Reshape", "Cast", "Transpose"}
    readers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    frontier = list(node.output)
    while frontier:
        name = frontier.pop()
        if name in outputs:
            return True
        frontier += [o for r in readers.get(name, []) if r.op_type in passthrough for o in r.output]
    return False


def candidates(model: Any, kept: dict[str, str]) -> list[str]:
    """The Convs the sensitivity sweep measures: every Conv the rules do not already keep float."""
    return [n.name for n in model.graph.node if n.op_type == "Conv" and n.name not in kept]


# ---- calibration ranges -------------------------------------------------------------------------------------


def calibration_tensors(model: Any, exclude: Sequence[str] = (), only: Sequence[str] = ()) -> list[str]:
    """The activations whose ranges the QDQ rewrite needs: inputs and outputs of the nodes it quantizes.

    Nodes kept float are left out. That is what makes a full-size UNet calibrate in bounded memory: the
    attention scores (SD 1.5 at 512x512: 2 x 8 x 4096 x 4096 floats, 1 GiB each) feed only float nodes.
    """
    graph = model.graph
    weights = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    skip, keep = set(exclude), set(only)
    names: dict[str, None] = {}
    for n in graph.node:
        if n.op_type in OP_TYPES and n.name not in skip and (not keep or n.name in keep):
            names |= {t: None for t in (*n.input, *n.output) if t and t not in weights}
    return list(names)


def calibrate(source: Path, feeds: Sequence[dict[str, np.ndarray]], names: Sequence[str], target: Path) -> None:
    """Per-tensor min/max of `names` over every feed, written as onnxruntime.quantization's calibration cache.

    Our own pass rather than quantize_static's calibrator, which holds two copies of the model beside its
    session and reduces the float-kept nodes' tensors too: on SD 1.5 it ran a 24 GB machine out of memory.
    Here the graph is read without its weights and gains a ReduceMin/ReduceMax pair per tensor. One session
    over the source's own external data runs the feeds, keeping a running min and max. The result is MinMax
    calibration, as ORT's calibrator computes it (tested equal).
    """
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData, save_tensors_data

    if not feeds:
        raise ValueError("calibration needs at least one recorded UNet input")
    model = onnx.load(str(source), load_external_data=False)
    index = {name: i for i, name in enumerate(names)}
    reduced = [f"calibration/{i}/{op}" for i in range(len(names)) for op in ("ReduceMin", "ReduceMax")]

    def pair(name: str) -> list[Any]:  # no axes: the whole tensor, every opset
        return [helper.make_node(op, [name], [f"calibration/{index[name]}/{op}"], keepdims=0) for op in ("ReduceMin", "ReduceMax")]

    # each pair right after its tensor's producer, as ORT's calibrator places them, so no tensor lives longer
    nodes = [r for i in model.graph.input if i.name in index for r in pair(i.name)]
    for node in model.graph.node:
        nodes += [node, *(r for o in node.output if o in index for r in pair(o))]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.output.extend(helper.make_tensor_value_info(r, TensorProto.FLOAT, []) for r in reduced)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # without the arena, freed activations go back to the system: SD 1.5's pass peaked at 10.0 GiB, not 12.1
    options.enable_cpu_mem_arena = False
    # the graph goes in as bytes; its weights are read from the source's folder, never copied
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(source.resolve().parent))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del model
    low = np.full(len(names), np.inf, dtype=np.float32)
    high = np.full(len(names), -np.inf, dtype=np.float32)
    for feed in feeds:
        values = np.asarray(session.run(reduced, feed), dtype=np.float32).reshape(len(names), 2)
        low, high = np.fmin(low, values[:, 0]), np.fmax(high, values[:, 1])  # fmin/fmax: NaN never wins
    ranges = {n: (low[i : i + 1].copy(), high[i : i + 1].copy()) for i, n in enumerate(names)}
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, ranges), target)


def working_copy(source: Path, folder: Path) -> Path:
    """`source` (and its external data) copied into `folder`, which is made: what quantize() and the sweep read,
    since quantize_static writes a shape-inferred model beside its input and a bundle is never written into."""
    from ..onnx_export import onnx_files

    folder.mkdir(parents=True)
    for f in onnx_files(source):
        shutil.copyfile(f, folder / f.name)
    return folder / source.name


QUANTIZER_MIN = (1, 27)  # quantize_static's calibration_cache_path, which calibrate() feeds


def check_quantizer(version: str | None = None) -> None:
    """--precision int8 needs onnxruntime 1.27 or newer; said before any model is exported, not after."""
    from .calibration import CalibrationError

    if version is None:
        import onnxruntime

        version = onnxruntime.__version__
    if tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < QUANTIZER_MIN:
        raise CalibrationError(
            f"--precision int8 needs onnxruntime >= {'.'.join(map(str, QUANTIZER_MIN))} (its quantizer reads our calibration "
            f"ranges from a cache file), found {version}: pip install -U 'onnxruntime>={'.'.join(map(str, QUANTIZER_MIN))}'"
        )


@contextmanager
def quiet_quantizer() -> Iterator[None]:
    """onnxruntime.quantization logs a pre-processing hint per call through the root logger: not for our users."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize(
    source: Path,
    target: Path,
    feeds: Sequence[dict[str, np.ndarray]],
    where: Placement,
    *,
    exclude: Sequence[str] = (),
    only: Sequence[str] = (),
    ranges: Path | None = None,
) -> None:
    """fp32 ONNX at `source` -> QDQ ONNX at `target`. `ranges`: a calibration cache file, computed from
    `feeds` when absent and reused when present (the sweep's one-node quantizations share it)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    # past protobuf's 2 GB (a full-size UNet) the quantizer's output model needs external data
    external = source.with_name(source.name + ".data").exists() or source.stat().st_size > LARGE
    with tempfile.TemporaryDirectory(prefix="int8-quantize-") as tmp:
        cache = ranges if ranges is not None else Path(tmp) / "ranges.json"
        if not cache.is_file():
            names = calibration_tensors(onnx.load(str(source), load_external_data=False), exclude, only)
            calibrate(source, feeds, names, cache)
        with quiet_quantizer():
            quantize_static(
                str(source),
                str(target),
                None,  # the ranges come from the cache, always: calibrate() made it
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(OP_TYPES),
                per_channel=True,
                reduce_range=where.reduce_range,
                activation_type=getattr(QuantType, where.activation),
                weight_type=getattr(QuantType, where.weight),
                nodes_to_quantize=list(only),
                nodes_to_exclude=list(exclude),
                calibrate_method=CalibrationMethod.MinMax,
                extra_options=dict(where.extra),
                calibration_cache_path=str(cache),
                use_external_data_format=external,
            )


# ---- measuring ----------------------------------------------------------------------------------------------


def session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_all(path: Path, feeds: Sequence[dict[str, np.ndarray]]) -> list[np.ndarray]:
    s = session(path)
    return [np.asarray(s.run(None, f)[0], dtype=np.float32) for f in feeds]


def relative_l2(got: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> float:
    """||got - ref|| / ||ref|| over all the samples together."""
    err = sum(float(np.sum((g.astype(np.float64) - r) ** 2)) for g, r in zip(got, ref))
    norm = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in ref)
    return float(np.sqrt(err / max(norm, 1e-30)))


def sweep_samples(feeds: Sequence[dict[str, np.ndarray]], n: int = SWEEP_SAMPLES) -> list[dict[str, np.ndarray]]:
    """n feeds spread evenly over the recording (so over timesteps and prompts)."""
    idx = np.linspace(0, len(feeds) - 1, min(n, len(feeds))).round().astype(int)
    return [feeds[i] for i in sorted(set(idx.tolist()))]


def cache_dir() -> Path:
    from ..staging import ENGINES

    return Path(os.environ.get(CACHE_ENV) or ENGINES / ".cache") / "int8-sensitivity"


def sweep_key(source: Path, calibration_id: str, where: Placement, names: Sequence[str]) -> str:
    """The fp32 UNet's hash, what the calibration recorded (prompts, seeds, scales, steps: not the ranges, whose last
    bits vary with ONNX Runtime's threaded reductions), the placement and the nodes measured."""
    h = hashlib.sha256()
    for part in (sha256_file(source), calibration_id, json.dumps(where.record(), sort_keys=True), *names):
        h.update(part.encode())
    return h.hexdigest()[:32]


def sensitivity(
    source: Path,
    feeds: Sequence[dict[str, np.ndarray]],
    where: Placement,
    names: Sequence[str],
    ranges: Path,
    log: Callable[[str], None] = lambda _: None,
    calibration_id: str = "",
) -> tuple[dict[str, float], dict[str, Any]]:
    """Each named node quantized alone: its UNet relative L2 error on sweep samples; cached on disk.

    Returns (errors by node, a record of the sweep: samples, cache key, whether the cache answered).
    """
    samples = sweep_samples(feeds)
    key = sweep_key(source, calibration_id or sha256_file(ranges), where, names)
    cached = cache_dir() / f"{key}.json"
    record: dict[str, Any] = {"measured": "UNet relative L2, one node quantized at a time", "samples": len(samples), "cache_key": key}
    if cached.is_file():
        try:
            errors = {str(k): float(v) for k, v in json.loads(cached.read_text())["errors"].items()}
            if set(errors) == set(names):
                log(f"  sensitivity sweep: {len(names)} convs, from the cache ({cached})")
                return errors, {**record, "cached": True}
        except (ValueError, KeyError, TypeError, AttributeError):
            pass  # a damaged cache entry is measured again and rewritten
    reference = run_all(source, samples)
    errors = {}
    with tempfile.TemporaryDirectory(prefix="int8-sweep-") as tmp:
        one = Path(tmp) / "one.onnx"
        for i, name in enumerate(names):
            quantize(source, one, feeds, where, only=[name], ranges=ranges)
            errors[name] = relative_l2(run_all(one, samples), reference)
            if (i + 1) % 10 == 0 or i + 1 == len(names):
                log(f"  sensitivity sweep: {i + 1}/{len(names)} convs measured")
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = cached.with_suffix(".tmp")
    tmp_file.write_text(json.dumps({"errors": errors, **record}, indent=1) + "\n")
    tmp_file.replace(cached)
    return errors, {**record, "cached": False}


def most_sensitive(errors: dict[str, float], count: int) -> list[str]:
    return sorted(errors, key=lambda k: -errors[k])[:count]


def tool_record() -> dict[str, str]:
    import onnxruntime

    return {"tool": "onnxruntime.quantization.quantize_static", "version": onnxruntime.__version__}
