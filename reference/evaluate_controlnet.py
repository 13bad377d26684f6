"""Score a shapes bundle with the reference ControlNet: does the object land on the drawn silhouette?

    python -m reference.evaluate_controlnet --bundle engines/shapes-controlnet --n 200 --steps 50 --out results/controlnet/teacher

Each of the n cases draws attributes and a free placement (``reference.dataset.sample_placement``) from
``--seed``; training drew its continuous placements from seed 0's stream, so these are placements it never
saw. The prompt names colour, shape and background (``control_caption``); the control image is the
silhouette. Metrics: IoU of the object ``reference.checker`` finds with the silhouette (mean, median, share
>= 0.8), the checker's colour / shape / background accuracy, and seconds per image with the ControlNet and,
on ``--plain-bundle`` (the same model built without it), without.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from reference import checker
from reference.dataset import caption_grid, control_caption, make_control_dataset

EVAL_SEED = 1
ATTRIBUTES = ("color", "shape", "background")


def generate(
    pipe: Any, prompts: list[str], controls: np.ndarray | None, options: dict[str, Any], scale: float = 1.0
) -> tuple[np.ndarray, float]:
    """One image per prompt (seed = its index), with its control image where given; (images, seconds per image)."""
    images = []
    started = time.perf_counter()
    for i, prompt in enumerate(prompts):
        control = {} if controls is None else {"control_image": controls[i], "controlnet_conditioning_scale": scale}
        images.append(pipe.txt2img(prompt, seed=i, output_type="np", **control, **options)[0])
    return np.stack(images), (time.perf_counter() - started) / max(1, len(prompts))


def score(images: np.ndarray, controls: np.ndarray, attributes: list) -> dict[str, float]:
    """IoU with the silhouettes and the checker's accuracy on what the prompt names."""
    ious = np.array([checker.iou(im, c) for im, c in zip(images, controls)])
    found = [checker.check(im) for im in images]
    out = {"iou_mean": float(ious.mean()), "iou_median": float(np.median(ious)), "iou_at_least_0.8": float((ious >= 0.8).mean())}
    for name in ATTRIBUTES:
        out[name] = float(np.mean([getattr(f, name) == getattr(a, name) for f, a in zip(found, attributes)]))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m reference.evaluate_controlnet", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--bundle", type=Path, required=True, help="a shapes bundle built with --controlnet")
    p.add_argument("--plain-bundle", type=Path, help="the same model without ControlNet, to time against")
    p.add_argument("--n", type=int, default=200, help="cases (default 200)")
    p.add_argument("--time-n", type=int, default=20, help="images timed on --plain-bundle (default 20)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scheduler", default=None, help="sampler (default: the bundle's)")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--controlnet-scale", type=float, default=1.0, help="controlnet_conditioning_scale (default 1)")
    p.add_argument("--seed", type=int, default=EVAL_SEED, help=f"case seed (default {EVAL_SEED}; training used 0)")
    p.add_argument("--out", type=Path, required=True, help="folder for results.json, results.md and grid.png")
    args = p.parse_args(argv)
    if args.n < 1 or args.time_n < 0:
        p.error("--n must be >= 1 and --time-n >= 0")
    import runtime

    _, controls, attributes, placements = make_control_dataset(args.n, args.seed)
    prompts = [control_caption(a) for a in attributes]
    options = {"steps": args.steps, "guidance_scale": args.guidance_scale, "scheduler": args.scheduler}
    with runtime.Pipeline.load(args.bundle) as pipe:
        images, seconds = generate(pipe, prompts, controls, options, args.controlnet_scale)
    metrics: dict[str, Any] = {**score(images, controls, attributes), "sec_per_image": seconds}
    if args.plain_bundle is not None and args.time_n:
        with runtime.Pipeline.load(args.plain_bundle) as plain:
            _, metrics["sec_per_image_without_controlnet"] = generate(plain, prompts[: args.time_n], None, options)
    args.out.mkdir(parents=True, exist_ok=True)
    setting = {k: v for k, v in vars(args).items() if k != "out"}
    sides = [pl.side for pl in placements]
    record = {"setting": {k: str(v) if isinstance(v, Path) else v for k, v in setting.items()}, "metrics": metrics,
              "placements": {"side_min": min(sides), "side_max": max(sides)}}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in metrics.items())
    head = f"{args.bundle.name}: n={args.n}, {args.steps} steps, guidance {args.guidance_scale:g}"
    head += f", controlnet scale {args.controlnet_scale:g}"
    (args.out / "results.md").write_text(f"{head}\n\n| metric | value |\n|---|---|\n{rows}\n")
    k = min(12, args.n)
    pairs = np.stack([x for i in range(k) for x in (controls[i].astype(np.float32) / 255, images[i])])
    captions = [c for i in range(k) for c in ("control", f"{prompts[i]} (IoU {checker.iou(images[i], controls[i]):.2f})")]
    caption_grid(pairs, captions, columns=6).save(args.out / "grid.png")
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
