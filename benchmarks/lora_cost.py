"""python -m benchmarks.lora_cost: what LoRA slots cost per UNet call, against the same adapter fused at export.

Builds two bundles of one model (txt2img only): one with a random rank-R adapter fused into the weights
(`--lora`; its UNet is the base model's graph) and one with rank-R slots (`--lora-slots R`) with that adapter set by
`Pipeline.set_lora`. Then times UNet engine calls on the same inputs, the two bundles alternating round by round
(so a shared machine's load falls on both alike), through the pipelines' own engines: the slotted one feeds its
slot inputs with every call, as generation does. Prints a table and writes lora-slots-<model>-<H>x<W>-r<R>.json/.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .runtime_bench import DEFAULT_OUT, fmt_seconds, machine, machine_line, publish, spread


def random_adapter(model: Path, out: Path, rank: int, seed: int = 0) -> Path:
    """A random rank-`rank` adapter (diffusers/peft layout) for every layer the slots cover: the speed does not
    depend on the numbers, only on the layers and the rank."""
    from diffusers import UNet2DConditionModel
    from safetensors.numpy import save_file
    from transformers import CLIPTextModel

    from export.lora import SLOT_SCOPES, layers_of

    rng = np.random.default_rng(seed)
    tensors = {}
    unet, text_encoder = UNet2DConditionModel.from_pretrained(model / "unet"), CLIPTextModel.from_pretrained(model / "text_encoder")
    modules = {"unet": unet, "text_encoder": text_encoder}
    for component, module in modules.items():
        for name, layer in layers_of(module).items():
            if layer.kind in ("linear", "conv1x1") and any(scope in name for scope in SLOT_SCOPES[component]):
                tensors[f"{component}.{name}.lora_A.weight"] = (0.02 * rng.standard_normal((rank, layer.in_features))).astype(np.float32)
                tensors[f"{component}.{name}.lora_B.weight"] = (0.02 * rng.standard_normal((layer.out_features, rank))).astype(np.float32)
    save_file(tensors, str(out))
    return out


def build_pair(model: Path, rank: int, work: Path, height: int | None, log: Any) -> tuple[Path, Path, Path]:
    """The adapter, the fused bundle and the slotted bundle, under `work` (kept when it is given)."""
    from export.build import build

    work.mkdir(parents=True, exist_ok=True)
    adapter = random_adapter(model, work / f"adapter-r{rank}.safetensors", rank)
    common = dict(precision="fp32", pipelines="txt2img", backend="onnxruntime", height=height, width=height, force=True, log=log)
    fused = build(model, work / "fused", lora=(str(adapter),), **common)
    slotted = build(model, work / "slotted", lora_slots=rank, **common)
    return adapter, fused, slotted


def unet_feed(unet: Any, seed: int = 0) -> dict[str, np.ndarray]:
    """Unit-normal inputs for the UNet's own inputs (not its slots: the slotted engine adds those itself)."""
    rng = np.random.default_rng(seed)
    feed = {t.name: rng.standard_normal(t.shape).astype(t.dtype) for t in unet.component.inputs if not t.name.startswith("lora_")}
    feed["timestep"] = np.full(feed["timestep"].shape, 499.0, dtype=feed["timestep"].dtype)
    return feed


def time_calls(engines: Mapping[str, Any], feeds: Mapping[str, dict[str, np.ndarray]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each engine, alternating engines round by round; warm-up rounds not kept."""
    times: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(warmup + rounds):
        for name, engine in engines.items():
            start = time.perf_counter()
            engine(feeds[name])
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def slot_bytes(pipe: Any) -> int:
    """Bytes of slot inputs fed with every UNet call."""
    return sum(int(a.nbytes) for a in pipe._slots.feeds.get("unet", {}).values())


def measure(model: Path, rank: int, rounds: int, warmup: int, work: Path, height: int | None) -> dict[str, Any]:
    import runtime

    t0 = time.perf_counter()
    adapter, fused_dir, slotted_dir = build_pair(model, rank, work, height, log=lambda line: print(line, file=sys.stderr))
    build_s = time.perf_counter() - t0
    fused, slotted = runtime.Pipeline.load(fused_dir, device="cpu"), runtime.Pipeline.load(slotted_dir, device="cpu")
    slotted.set_lora(adapter)
    engines = {"fused": fused.engines["unet"], "slotted": slotted.engines["unet"]}
    feed = unet_feed(engines["fused"])
    outs = {name: e(feed)[e.component.outputs[0].name] for name, e in engines.items()}
    times = time_calls(engines, {"fused": feed, "slotted": feed}, rounds, warmup)
    unet = slotted.manifest.components["unet"]
    sizes = {name: sum(f.stat().st_size for f in (d / "unet").iterdir()) for name, d in (("fused", fused_dir), ("slotted", slotted_dir))}
    lora = slotted.manifest.lora
    assert lora is not None
    return {
        "model": str(model),
        "rank": rank,
        "image": {"height": fused.height, "width": fused.width, "unet_batch": fused.manifest.guidance_info.unet_batch},
        "settings": {"rounds": rounds, "warmup": warmup, "precision": "fp32", "provider": "CPUExecutionProvider"},
        "unet_call": {name: spread(v) for name, v in times.items()},
        "slot_overhead": statistics.median(times["slotted"]) / statistics.median(times["fused"]) - 1,
        "slot_overhead_min": min(times["slotted"]) / min(times["fused"]) - 1,  # the least disturbed calls of a shared machine
        "slot_targets": {c: sum(1 for t in lora.targets if t.component == c) for c in ("unet", "text_encoder")},
        "unet_inputs": {"fused": len(fused.manifest.components["unet"].inputs), "slotted": len(unet.inputs)},
        "slot_bytes_per_call": slot_bytes(slotted),
        "unet_file_bytes": sizes,
        "max_abs_diff_fused_vs_slotted": float(np.abs(outs["fused"] - outs["slotted"]).max()),
        "build_s": build_s,
        "machine": machine(),
    }


def markdown(r: Mapping[str, Any]) -> str:
    img, calls = r["image"], r["unet_call"]
    rows = ["| bundle | UNet call, median | min | max | spread | UNet inputs | UNet file |", "|---|---|---|---|---|---|---|"]
    labels = {"fused": "adapter fused (`--lora`)", "slotted": f"rank-{r['rank']} slots (`--lora-slots {r['rank']}` + set_lora)"}
    for name, label in labels.items():
        s = calls[name]
        rows.append(
            f"| {label} | {fmt_seconds(s['median'])} | {fmt_seconds(s['min'])} | {fmt_seconds(s['max'])} | {100 * s['rel_spread']:.1f}% | "
            f"{r['unet_inputs'][name]} | {r['unet_file_bytes'][name] / 2**20:.1f} MiB |"
        )
    targets = r["slot_targets"]
    return "\n".join([
        f"# benchmarks.lora_cost: {Path(r['model']).name}, rank {r['rank']}",
        "",
        f"{img['height']}x{img['width']}, UNet batch {img['unet_batch']}, fp32, ONNX Runtime CPU; {r['settings']['rounds']} calls per "
        f"bundle, alternating, after {r['settings']['warmup']} warm-up calls each.",
        "",
        *rows,
        "",
        f"- slots cost **{100 * r['slot_overhead']:+.1f}%** per UNet call against the fused adapter (medians; "
        f"{100 * r['slot_overhead_min']:+.1f}% between the fastest calls)",
        f"- slot layers: {targets['unet']} in the UNet, {targets['text_encoder']} in the text encoder; "
        f"{r['slot_bytes_per_call'] / 2**20:.2f} MiB of slot matrices fed with every UNet call",
        f"- same adapter, same inputs: fused and slotted UNet outputs differ by at most {r['max_abs_diff_fused_vs_slotted']:.2e}",
        f"- both bundles built in {r['build_s']:.0f} s",
        "",
        machine_line(r["machine"]),
    ]) + "\n"  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from export.model import REFERENCE_MODEL

    p = argparse.ArgumentParser(prog="python -m benchmarks.lora_cost", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=REFERENCE_MODEL, help="diffusers model folder (default: the reference model)")
    p.add_argument("--rank", type=int, default=8, help="adapter and slot rank (default 8)")
    p.add_argument("--rounds", type=int, default=50, help="timed UNet calls per bundle (default 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per bundle first (default 5)")
    p.add_argument("--height", type=int, help="image size, square (default: the model's native size)")
    p.add_argument("--work", type=Path, help="where the adapter and the two bundles are built (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT}; published: results/bench)")
    p.add_argument("--quick", action="store_true", help="5 rounds, 1 warm-up: checks the benchmark runs")
    args = p.parse_args(argv)
    rounds, warmup = (5, 1) if args.quick else (args.rounds, args.warmup)
    with tempfile.TemporaryDirectory(prefix="lora-cost-") as tmp:
        result = measure(args.model.resolve(), args.rank, rounds, warmup, args.work or Path(tmp), args.height)
    img = result["image"]
    stem = f"lora-slots-{Path(result['model']).name}-{img['height']}x{img['width']}-r{args.rank}"
    publish(result, markdown(result), args.out, stem)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
