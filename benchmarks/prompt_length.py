"""python -m benchmarks.prompt_length: time per image for a prompt of two 75-token chunks against one of one chunk.

Builds two bundles of one model (txt2img only): a standard one (prompts of one chunk) and one built with
`--max-prompt-tokens 150`. Then generates whole images, end to end, interleaved round by round (so a shared
machine's load falls on every case alike): a one-chunk prompt on the standard bundle, the same prompt on the
long-prompt bundle (whose images are bit-identical to the standard one's), and a two-chunk prompt there. The
first image of each case is a warm-up (the two-chunk case opens its UNet session then). Prints a table and writes
prompt-length-<model>-<H>x<W>.json/.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .runtime_bench import DEFAULT_OUT, fmt_seconds, machine, machine_line, publish, spread

SHORT = "a large red circle on a white background"
LONG = "a large red circle on a white background, next to a small blue square in the top left corner, " * 4


def build_pair(model: Path, work: Path, log: Callable[[str], None]) -> tuple[Path, Path]:
    from export.build import build

    common: dict[str, Any] = dict(precision="fp32", pipelines="txt2img", backend="onnxruntime", force=True, log=log)
    return build(model, work / "standard", **common), build(model, work / "long", max_prompt_tokens=150, **common)


def measure(model: Path, rounds: int, warmup: int, steps: int, work: Path) -> dict[str, Any]:
    import runtime

    t0 = time.perf_counter()
    standard_dir, long_dir = build_pair(model, work, log=lambda line: print(line, file=sys.stderr))
    build_s = time.perf_counter() - t0
    standard, long = runtime.Pipeline.load(standard_dir, device="cpu"), runtime.Pipeline.load(long_dir, device="cpu")
    chunks = {p: long.family.encode([p], [""]).context.shape[1] // 77 for p in (SHORT, LONG)}
    cases = {"standard, 1 chunk": (standard, SHORT), "long bundle, 1 chunk": (long, SHORT), "long bundle, 2 chunks": (long, LONG)}
    latents = runtime.pipeline.initial_latents(standard.manifest.latent_shape, seed=0)
    times: dict[str, list[float]] = {name: [] for name in cases}
    images: dict[str, np.ndarray] = {}
    for r in range(warmup + rounds):
        for name, (pipe, prompt) in cases.items():
            start = time.perf_counter()
            images[name] = pipe.txt2img(prompt, steps=steps, latents=latents, output_type="np")
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(v) for name, v in times.items()}
    return {
        "model": str(model),
        "image": {"height": standard.height, "width": standard.width, "unet_batch": standard.manifest.guidance_info.unet_batch},
        "settings": {"rounds": rounds, "warmup": warmup, "steps": steps, "precision": "fp32", "provider": "CPUExecutionProvider"},
        "prompts": {"1 chunk": SHORT, "2 chunks": LONG},
        "chunks": {"1 chunk": chunks[SHORT], "2 chunks": chunks[LONG]},
        "per_image": {name: spread(v) for name, v in times.items()},
        "two_chunk_cost": medians["long bundle, 2 chunks"] / medians["long bundle, 1 chunk"] - 1,
        "long_bundle_cost_for_short_prompts": medians["long bundle, 1 chunk"] / medians["standard, 1 chunk"] - 1,
        "short_prompt_identical": bool(np.array_equal(images["standard, 1 chunk"], images["long bundle, 1 chunk"])),
        "build_s": build_s,
        "machine": machine(),
    }


def markdown(r: dict[str, Any]) -> str:
    img, s = r["image"], r["settings"]
    rows = ["| case | per image, median | min | max | spread |", "|---|---|---|---|---|"]
    for name, t in r["per_image"].items():
        cells = (fmt_seconds(t["median"]), fmt_seconds(t["min"]), fmt_seconds(t["max"]), f"{100 * t['rel_spread']:.1f}%")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join([
        f"# benchmarks.prompt_length: {Path(r['model']).name}",
        "",
        f"{img['height']}x{img['width']}, UNet batch {img['unet_batch']}, fp32, ONNX Runtime CPU, {s['steps']} steps per image; "
        f"{s['rounds']} images per case, interleaved, after {s['warmup']} warm-up image(s) each.",
        "",
        *rows,
        "",
        f"- a 2-chunk prompt costs **{100 * r['two_chunk_cost']:+.1f}%** per image against a 1-chunk prompt on the same bundle (medians)",
        f"- a 1-chunk prompt on the long-prompt bundle: {100 * r['long_bundle_cost_for_short_prompts']:+.1f}% against the standard "
        f"bundle, and the images are {'bit-identical' if r['short_prompt_identical'] else 'NOT identical'}",
        f"- both bundles built in {r['build_s']:.0f} s",
        "",
        machine_line(r["machine"]),
    ]) + "\n"  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from export.model import REFERENCE_MODEL

    p = argparse.ArgumentParser(prog="python -m benchmarks.prompt_length", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=REFERENCE_MODEL, help="diffusers model folder (default: the reference model)")
    p.add_argument("--rounds", type=int, default=15, help="timed images per case (default 15)")
    p.add_argument("--warmup", type=int, default=1, help="untimed images per case first (default 1)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps per image (default 20)")
    p.add_argument("--work", type=Path, help="where the two bundles are built (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT}; published: results/bench)")
    p.add_argument("--quick", action="store_true", help="2 rounds, 1 warm-up, 2 steps: checks the benchmark runs")
    args = p.parse_args(argv)
    rounds, warmup, steps = (2, 1, 2) if args.quick else (args.rounds, args.warmup, args.steps)
    with tempfile.TemporaryDirectory(prefix="prompt-length-") as tmp:
        result = measure(args.model.resolve(), rounds, warmup, steps, args.work or Path(tmp))
    img = result["image"]
    stem = f"prompt-length-{Path(result['model']).name}-{img['height']}x{img['width']}"
    publish(result, markdown(result), args.out, stem)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
