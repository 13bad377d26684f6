"""--precision int8: the staged fp32 bundle's UNet -> a calibrated int8 QDQ UNet, gated on image quality.

Called by export.from_model once every component is exported in fp32 and the fp32 manifest is staged:
1. record UNet inputs from real sampling runs of that fp32 bundle (export.int8.calibration);
2. choose the nodes kept float: rules, plus the most sensitive convs from a cached sweep (export.int8.quantize);
3. quantize a copy of the fp32 UNet (the staged file is only read);
4. gate it on held-out generations (export.int8.gate); over the gate the build fails unless --force;
5. put the int8 UNet in the bundle with its record: tool and version, calibration set, float nodes, gate figures.
"""

from __future__ import annotations

import ctypes
import gc
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from runtime.bundle import Component

from ..onnx_export import check_onnx, onnx_files, save_onnx
from . import calibration, quantize
from . import gate as int8_gate
from .calibration import PromptSet

GATE_GENERATIONS = 4
GATE_GUIDANCE = 5.0


@dataclass(frozen=True)
class Int8Choices:
    """What the user chose for int8 (BuildOptions' int8 fields, resolved)."""

    prompts: PromptSet
    size: int  # calibration generations
    float_convs: int  # most sensitive convs kept float (0: no sweep)
    target: str  # onnxruntime | tensorrt: the Q/DQ placement
    force: bool  # keep a UNet over the gate


def quantize_unet(work: Path, unet: Component, choices: Int8Choices, log: Callable[[str], None]) -> Component:
    """The staged fp32 bundle at `work` -> its UNet replaced by the int8 one; returns the UNet's new record."""
    from runtime.pipeline import Pipeline

    where = quantize.placement(choices.target)
    staged = work / unet.file
    with tempfile.TemporaryDirectory(prefix="int8-") as tmp_name:
        tmp = Path(tmp_name)
        source = quantize.working_copy(staged, tmp / "fp32")
        (tmp / "int8").mkdir()
        target = tmp / "int8" / staged.name
        with Pipeline.load(work, device="cpu", verify=False) as pipe:
            t0 = time.perf_counter()
            scales = calibration.guidance_scales(pipe.manifest.guidance_info.mode)
            runs = calibration.plan(choices.prompts.prompts, choices.size, scales)
            rec = calibration.record(pipe, runs, log)
            calibration_s = time.perf_counter() - t0
            held = held_out(pipe, choices.prompts)
        # the fp32 pipeline is closed first: the calibration session and the quantizer each hold the UNet's
        # weights, and beside SD 1.5's pipeline they would not fit a 24 GB machine together
        give_back_memory()
        calibration_id = json.dumps([runs, calibration.STEPS])
        floats, sweep_record = float_nodes(source, rec.feeds, where, choices.float_convs, tmp / "ranges.json", log, calibration_id)
        t1 = time.perf_counter()
        quantize.quantize(source, target, rec.feeds, where, exclude=sorted(floats), ranges=tmp / "ranges.json")
        quantize_s = time.perf_counter() - t1
        give_back_memory()  # the quantizer's copies of the model, before the gate loads the pipeline again
        with Pipeline.load(work, device="cpu", verify=False) as pipe:
            figures = measure(pipe, unet, target, held, log)
        check_gate(figures, choices.force, log)
        publish_unet(target, staged)
    record = {
        **quantize.tool_record(),
        "format": "QDQ",
        "op_types": list(quantize.OP_TYPES),
        "calibration_method": "MinMax, per tensor, over every recorded UNet input (export.int8.quantize.calibrate)",
        "placement": where.record(),
        "calibration": {
            **choices.prompts.record(),
            "generations": len(runs),
            "steps": calibration.STEPS,
            "guidance_scales": list(scales),
            "unet_inputs": len(rec.feeds),
            "timesteps": sorted({round(t, 3) for t in rec.timesteps}, reverse=True),
            "seconds": round(calibration_s, 2),
        },
        "float_nodes": floats,
        "sensitivity_sweep": sweep_record,
        "quantize_seconds": round(quantize_s, 2),
    }
    return replace(unet, precision="int8", build={**unet.build, "quantization": record}, verification=figures)


def give_back_memory() -> None:
    """Return freed memory to the system between the stages: glibc keeps GBs of a full-size UNet's freed buffers
    (SD 1.5: 1.6 GiB after its pipeline closed, all of it back after malloc_trim)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def publish_unet(target: Path, staged: Path) -> None:
    """The int8 UNet replaces the staged fp32 one: one file, or external data past 2 GB, as every export;
    the fp32 files go first so no stale external data stays behind to be hashed into the manifest."""
    import onnx

    proto = onnx.load(str(target), load_external_data=True)
    for f in onnx_files(staged):
        f.unlink()
    save_onnx(proto, staged)
    check_onnx(staged, "unet (int8)")


def float_nodes(
    source: Path,
    feeds: list[Any],
    where: quantize.Placement,
    count: int,
    ranges: Path,
    log: Callable[[str], None],
    calibration_id: str = "",
) -> tuple[dict[str, str], dict[str, Any]]:
    """Node name -> why it stays float: the rules, then the `count` most sensitive convs by the sweep."""
    import onnx

    model = onnx.load(str(source), load_external_data=False)  # the graph: a full-size UNet's weights stay on disk
    kept = quantize.float_rules(model)
    if count <= 0:
        # the ranges are computed by the final quantization itself
        return kept, {"run": False, "why": "--int8-float-convs 0"}
    names = quantize.candidates(model, kept)
    t0 = time.perf_counter()
    if not ranges.exists():  # one calibration pass; the one-node quantizations and the final one reuse its ranges
        quantize.calibrate(source, feeds, quantize.calibration_tensors(model, exclude=sorted(kept)), ranges)
    errors, record = quantize.sensitivity(source, feeds, where, names, ranges, log, calibration_id)
    for name in quantize.most_sensitive(errors, count):
        kept[name] = f"sensitive: relative L2 {errors[name]:.4f} when quantized alone"
    record = {**record, "run": True, "convs_measured": len(names), "kept_float": count, "seconds": round(time.perf_counter() - t0, 2)}
    return kept, record


@dataclass(frozen=True)
class HeldOut:
    """The gate's fp32 side: generations apart from calibration (other prompts and seeds), their images and UNet calls."""

    runs: list[calibration.Generation]
    images: Any  # float32 [N, H, W, 3]
    recording: calibration.Recording
    guidance_scale: float


def held_out(pipe: Any, prompts: PromptSet) -> HeldOut:
    """GATE_GENERATIONS fp32 generations of `pipe`, every UNet call recorded."""
    held_prompts = prompts.held_out or tuple(reversed(prompts.prompts))
    scale = GATE_GUIDANCE if pipe.manifest.guidance_info.mode != "none" else 1.0
    runs = [(held_prompts[i % len(held_prompts)], calibration.HELD_OUT_SEED + i, scale) for i in range(GATE_GENERATIONS)]
    recording = calibration.Recording()
    images = calibration.generate(pipe, runs, recording=recording)
    return HeldOut(runs, images, recording, scale)


def measure(pipe: Any, unet: Component, int8_file: Path, held: HeldOut, log: Callable[[str], None]) -> dict[str, Any]:
    """The gate's figures: the held-out fp32 UNet inputs replayed on int8, then the same generations made with
    the int8 UNet in `pipe` (the fp32 bundle)."""
    from runtime.backends.onnxruntime import OrtEngine

    engine = OrtEngine(replace(unet, precision="int8"), int8_file, device="cpu")
    got = [engine(feed)[unet.outputs[0].name] for feed in held.recording.feeds]
    train_steps = int(pipe.manifest.scheduler.config.get("num_train_timesteps", 1000))
    unet_figures = int8_gate.unet_figures(got, held.recording.outputs, held.recording.timesteps, train_steps)
    with calibration.unet_swapped(pipe, engine):
        int8_images = calibration.generate(pipe, held.runs)
    figures = int8_gate.gate(unet_figures, int8_images, held.images, len(held.runs))
    figures["held_out"] = {"seeds_from": calibration.HELD_OUT_SEED, "steps": calibration.STEPS, "guidance_scale": held.guidance_scale}
    log(f"  int8 gate: {int8_gate.summary(figures)}")
    return figures


def check_gate(figures: dict[str, Any], force: bool, log: Callable[[str], None]) -> None:
    if figures["passed"]:
        return
    if force:
        log("  int8 gate FAILED; kept anyway (--force): the manifest records passed=false with the figures")
        return
    raise int8_gate.Int8GateError(
        f"unet: the int8 UNet is over the quality gate: {int8_gate.summary(figures)}; nothing was written. "
        "Calibrate on prompts closer to your use (--calibration-prompts FILE, --calibration-size N), keep more convs "
        "float (--int8-float-convs N), build fp16 or fp32 instead, or pass --force to keep it anyway"
    )
