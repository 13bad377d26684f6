"""python -m runtime: text to image from an engine bundle, with a progress bar."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

DEFAULT_BUNDLE = Path("engines") / "shapes-ldm-64x64-b1-fp16-onnxruntime"


def parser() -> argparse.ArgumentParser:
    from .samplers import SAMPLERS

    p = argparse.ArgumentParser(
        prog="python -m runtime",
        description="Generate images from a text prompt with an engine bundle built by `python -m export.build`. "
        "Runs on ONNX Runtime (or TensorRT) without PyTorch.",
        epilog='example: python -m runtime "a small red circle on a black background" --seed 0 -o circle.png',
    )
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="engine bundle folder (default: %(default)s, the reference model)")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (default: empty)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default %(default)s)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance strength; <= 1 turns it off (default %(default)s)")
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="CFG rescale (Lin et al. 2023); SD 2.x v-prediction models like 0.7 (default 0)")
    p.add_argument("--seed", type=int, help="random seed; the same seed gives the same image on every backend (default: random, printed)")
    p.add_argument("--scheduler", choices=sorted(SAMPLERS), help="sampler (default: the one the model's scheduler config names; see the README's table)")
    p.add_argument("--eta", type=float, help="ddim/tcd stochasticity: 0 is deterministic DDIM (ddim's default), 1 is DDPM-like")
    p.add_argument("--device", choices=("cpu", "cuda", "tensorrt"), help="ONNX Runtime execution provider (default: cuda where installed, else cpu)")
    p.add_argument("-o", "--output", type=Path, default=Path("out.png"), help="PNG file to write; with batch > 1, NAME-0.png, NAME-1.png, ... (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def progress_bar(width: int = 30):
    """A one-line bar on stderr; returns the per-step callback."""
    start = time.perf_counter()

    def show(step: int, total: int, t: float) -> None:
        done = int(width * step / total)
        elapsed = time.perf_counter() - start
        sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total} t={t:4.0f} {elapsed:6.1f}s")
        if step == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def outputs(path: Path, n: int) -> list[Path]:
    if path.suffix.lower() != ".png":
        path = path.with_suffix(".png")
    return [path] if n == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    warnings.formatwarning = lambda msg, cat, *_: f"warning: {msg}\n"
    from .errors import BundleError, Cancelled, FeedError
    from .pipeline import Pipeline

    seed = args.seed if args.seed is not None else int.from_bytes(__import__("os").urandom(4), "little")
    try:
        pipe = Pipeline.load(args.bundle, device=args.device)
        images = pipe.txt2img(
            args.prompt,
            args.negative_prompt,
            steps=args.steps,
            guidance_scale=args.guidance_scale,
            guidance_rescale=args.guidance_rescale,
            seed=seed,
            scheduler=args.scheduler,
            eta=args.eta,
            callback=None if args.quiet else progress_bar(),
        )
    except (BundleError, FeedError, ValueError, FileNotFoundError, FloatingPointError, Cancelled) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for image, path in zip(images, outputs(args.output, len(images))):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        print(f"wrote {path} (seed {seed})")
    return 0
