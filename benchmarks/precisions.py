"""python -m benchmarks.precisions: bundles of one model at different precisions, side by side.

Every bundle renders the same prompts from the same seeds; per bundle: same-seed pixel mean absolute
difference against the first bundle (the fp32 reference), seconds per image, UNet call time (median
over every call), UNet file size and bundle size. Quality by attributes, FID and IS is
reference.evaluate's job; this adds what only a same-seed comparison shows.

    python -m benchmarks.precisions --bundles engines/shapes-ldm-64x64-b1-fp32-onnxruntime \\
        engines/shapes-ldm-64x64-b1-fp16-onnxruntime engines/shapes-ldm-64x64-b1-int8-onnxruntime --out results/int8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


class TimedUnet:
    def __init__(self, inner: Any, times: list[float]):
        self.inner, self.times, self.component = inner, times, inner.component

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t = time.perf_counter()
        out = self.inner(feed)
        self.times.append(time.perf_counter() - t)
        return out  # type: ignore[no-any-return]


def size(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def run_bundle(bundle: Path, prompts: list[str], steps: int, guidance: float, seed: int) -> dict[str, Any]:
    from runtime.bundle import read_bundle
    from runtime.pipeline import Pipeline

    manifest, _ = read_bundle(bundle)
    unet_file = bundle / manifest.components["unet"].file
    times: list[float] = []
    images = []
    with Pipeline.load(bundle, device="cpu") as pipe:
        pipe.txt2img(prompts[0], steps=2, seed=seed, output_type="np")  # warm-up: sessions' first runs allocate
        pipe.engines["unet"] = TimedUnet(pipe.engines["unet"], times)
        t0 = time.perf_counter()
        for i, prompt in enumerate(prompts):
            images.append(pipe.txt2img(prompt, steps=steps, guidance_scale=guidance, seed=seed + i, output_type="np")[0])
        seconds = time.perf_counter() - t0
    return {
        "bundle": str(bundle),
        "precision": manifest.precision,
        "images": np.stack(images),
        "seconds_per_image": seconds / len(prompts),
        "unet_call_median_s": statistics.median(times),
        "unet_bytes": size([unet_file, unet_file.with_name(unet_file.name + ".data")]),
        "bundle_bytes": size(list(bundle.rglob("*"))),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.precisions", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundles", type=Path, nargs="+", required=True, help="bundles to compare; the first is the reference")
    p.add_argument("--n", type=int, default=32, help="images per bundle (default %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default %(default)s)")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="guidance scale (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="prompt and noise seed (default %(default)s)")
    p.add_argument("--out", type=Path, default=Path("out") / "int8", help="folder for precisions-NAME.json and .md")
    args = p.parse_args(argv)
    from reference.evaluate import prompt_set

    prompts, _ = prompt_set(args.n, args.seed)
    load = list(os.getloadavg())  # a shared machine's load: times are indicative when it is high
    rows = [run_bundle(b, prompts, args.steps, args.guidance_scale, args.seed) for b in args.bundles]
    ref = rows[0]["images"].astype(np.float64)
    for row in rows:
        diff = np.abs(row.pop("images") - ref)
        row["pixel_mae_vs_first"] = float(diff.mean())
        row["pixel_max_abs_vs_first"] = float(diff.max())
    result = {
        "command": ["python", "-m", "benchmarks.precisions", *(argv if argv is not None else sys.argv[1:])],
        "n": args.n, "steps": args.steps, "guidance_scale": args.guidance_scale, "seed": args.seed,
        "load_average_at_start": load, "rows": rows,
    }  # fmt: skip
    name = Path(args.bundles[0]).name.split("-64x64")[0].split("-512x512")[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"precisions-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# benchmarks.precisions: {name}, {args.n} images, {args.steps} steps, guidance {args.guidance_scale:g}, same seeds",
        "",
        "| precision | pixel MAE vs first | max abs | s/image | UNet call (median) | UNet file | bundle |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['precision']} | {r['pixel_mae_vs_first']:.4f} | {r['pixel_max_abs_vs_first']:.3f} | {r['seconds_per_image']:.3f} | "
            f"{r['unet_call_median_s'] * 1e3:.2f} ms | {r['unet_bytes'] / 2**20:.2f} MiB | {r['bundle_bytes'] / 2**20:.1f} MiB |"
        )
    (args.out / f"precisions-{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
