"""Edit dataset images with a shapes bundle and score the edits: inpainting and img2img.

    python -m reference.edit_demo --bundle engines/shapes-ldm-64x64-b1-fp32-onnxruntime --n 60

- inpaint: a box around the object is masked and the prompt asks for the same object in a new
  colour and shape; the checker reads the result (each attribute against the asked one) and the
  pixels outside the box are compared with the input's.
- img2img: the whole image is redrawn at a given strength with a prompt that changes only the
  colour; the checker reads each attribute against the asked ones, so shape, size and position
  show how much of the input survives.
Writes results.md, results.json and a grid per setting (input, mask, output) to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from reference import checker
from reference.dataset import (
    COLORS,
    POSITION_JITTER,
    POSITIONS,
    SHAPES,
    SIZE_JITTER,
    SIZES,
    Attributes,
    canonical_caption,
    caption_grid,
    render,
    sample_attributes,
)

NAMES = [f.name for f in fields(Attributes)]
MARGIN = 3  # pixels of anti-aliasing and slack around the largest object the jitter can draw


def edit_box(a: Attributes) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), end exclusive: every pixel the object can cover, whatever its jitter."""
    half = (SIZES[a.size] + SIZE_JITTER) / 2 + POSITION_JITTER + MARGIN
    x, y = POSITIONS[a.position]
    return max(0, int(x - half)), max(0, int(y - half)), min(64, int(np.ceil(x + half))), min(64, int(np.ceil(y + half)))


def box_mask(a: Attributes) -> np.ndarray:
    """uint8 (64, 64): 255 (repaint) in the edit box, 0 (keep) elsewhere."""
    x0, y0, x1, y1 = edit_box(a)
    mask = np.zeros((64, 64), np.uint8)
    mask[y0:y1, x0:x1] = 255
    return mask


def cases(n: int, seed: int) -> list[tuple[np.ndarray, Attributes, Attributes]]:
    """n (image, its attributes, the asked attributes): a new colour and a new shape, the rest kept."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = sample_attributes(rng)
        color = str(rng.choice([c for c in COLORS if c != a.color]))
        shape = str(rng.choice([s for s in SHAPES if s != a.shape]))
        out.append((render(a, rng), a, replace(a, color=color, shape=shape)))
    return out


def accuracy(images: list[np.ndarray], wanted: list[Attributes]) -> dict[str, float]:
    """Percent of images whose checker reading matches the asked attribute, per attribute and all five."""
    got = [checker.check(im) for im in images]
    hits = {n: [getattr(g, n) == getattr(w, n) for g, w in zip(got, wanted)] for n in NAMES}
    hits["all"] = [all(h[i] for h in hits.values()) for i in range(len(images))]
    return {n: 100.0 * float(np.mean(h)) for n, h in hits.items()}


def run_inpaint(
    pipe: Any, items: list[tuple[np.ndarray, Attributes, Attributes]], steps: int, guidance: float
) -> tuple[dict[str, float], list[np.ndarray]]:
    outputs, unchanged, t0 = [], [], time.perf_counter()
    for i, (image, _, want) in enumerate(items):
        mask = box_mask(want)
        out = np.asarray(pipe.inpaint(canonical_caption(want), image, mask, steps=steps, guidance_scale=guidance, seed=i)[0])
        keep = mask == 0
        unchanged.append(float(np.mean(np.all(out[keep] == image[keep], axis=-1))))
        outputs.append(out)
    metrics = accuracy(outputs, [w for _, _, w in items])
    metrics["unchanged_outside_mask"] = 100.0 * float(np.mean(unchanged))
    metrics["sec_per_image"] = (time.perf_counter() - t0) / len(items)
    return metrics, outputs


def run_img2img(
    pipe: Any, items: list[tuple[np.ndarray, Attributes, Attributes]], steps: int, guidance: float, strength: float
) -> tuple[dict[str, float], list[np.ndarray]]:
    wanted = [replace(a, color=w.color) for _, a, w in items]  # only the colour changes
    outputs, t0 = [], time.perf_counter()
    for i, ((image, _, _), want) in enumerate(zip(items, wanted)):
        out = pipe.img2img(canonical_caption(want), image, strength=strength, steps=steps, guidance_scale=guidance, seed=i)
        outputs.append(np.asarray(out[0]))
    metrics = accuracy(outputs, wanted)
    metrics["sec_per_image"] = (time.perf_counter() - t0) / len(items)
    return metrics, outputs


def grid(items: list[tuple[np.ndarray, Attributes, Attributes]], outputs: list[np.ndarray], inpaint: bool, k: int = 6) -> Any:
    tiles, captions = [], []
    for (image, a, want), out in list(zip(items, outputs))[:k]:
        tiles += [image, np.repeat(box_mask(want)[..., None], 3, axis=-1) if inpaint else image, out]
        ask = f"{want.color} {want.shape}" if inpaint else f"{want.color} {a.shape}"
        captions += [f"input: {a.color} {a.shape}", "mask" if inpaint else "(no mask)", f"asked: {ask}"]
    return caption_grid(np.stack(tiles), captions, scale=2, columns=6)


def table(rows: list[tuple[str, dict[str, float]]]) -> str:
    lines = [
        "| edit | background | color | shape | size | position | all five | unchanged outside mask | s/img |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in rows:
        outside = f"{m['unchanged_outside_mask']:.1f}" if "unchanged_outside_mask" in m else "n/a"
        cells = " | ".join(f"{m[n]:.1f}" for n in NAMES + ["all"])
        lines.append(f"| {name} | {cells} | {outside} | {m['sec_per_image']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m reference.edit_demo", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--bundle",
        type=Path,
        default=Path("engines/shapes-ldm-64x64-b1-fp32-onnxruntime"),
        help="a shapes bundle with img2img and inpaint (default %(default)s)",
    )
    p.add_argument("--n", type=int, default=60, help="images per edit (default %(default)s)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default %(default)s)")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="classifier-free guidance scale (default %(default)s)")
    p.add_argument("--strength", type=float, nargs="+", default=[0.5, 0.75], help="img2img strengths (default %(default)s)")
    p.add_argument("--seed", type=int, default=2026, help="which dataset images (default %(default)s)")
    p.add_argument("--out", type=Path, default=Path("results/reference-edit"), help="output folder (default %(default)s)")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be at least 1")

    from runtime import Pipeline

    pipe = Pipeline.load(args.bundle)
    items = cases(args.n, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    metrics, outputs = run_inpaint(pipe, items, args.steps, args.guidance_scale)
    rows.append(("inpaint: new colour and shape in a box", metrics))
    grid(items, outputs, inpaint=True).save(args.out / "grid_inpaint.png")
    for strength in args.strength:
        metrics, outputs = run_img2img(pipe, items, args.steps, args.guidance_scale, strength)
        rows.append((f"img2img strength {strength:g}: new colour", metrics))
        grid(items, outputs, inpaint=False).save(args.out / f"grid_img2img_{strength:g}.png")
    header = (
        f"`python -m reference.edit_demo --bundle {args.bundle} --n {args.n} --steps {args.steps} "
        f"--guidance-scale {args.guidance_scale:g}` "
        f"(DDIM, {args.n} dataset images, seed {args.seed}); accuracy in % of the asked attributes, read by reference.checker\n\n"
    )
    (args.out / "results.md").write_text(header + table(rows) + "\n")
    (args.out / "results.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": dict(rows)}, indent=2) + "\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
