"""python -m runtime: text to image (and img2img, inpaint, upscale) from an engine bundle, with a progress bar."""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

# the bundle `python -m export.build` makes of the reference model, in the checkout's engines/ (any working directory)
DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "engines" / "shapes-ldm-64x64-b1-fp16-onnxruntime"
SUBCOMMANDS = ("txt2img", "img2img", "inpaint", "upscale")
DESCRIPTIONS = {
    "txt2img": "Generate images from a text prompt.",
    "img2img": "Redraw an image guided by a prompt (SDEdit); --strength sets how far from the image.",
    "inpaint": "Repaint the white part of --mask guided by a prompt; the black part is kept.",
    "upscale": "Upscale an image 4x guided by a prompt; needs a bundle built from an x4 upscaler model.",
}


def parser(command: str = "txt2img") -> argparse.ArgumentParser:
    from .sampling import SAMPLERS

    upscale = command == "upscale"
    prog = "python -m runtime" + ("" if command == "txt2img" else f" {command}")
    p = argparse.ArgumentParser(
        prog=prog,
        description=f"{DESCRIPTIONS[command]} Runs an engine bundle built by `python -m export.build` on ONNX Runtime "
        "(or TensorRT), without PyTorch. Other tasks: python -m runtime {txt2img,img2img,inpaint,upscale} --help.",
        epilog='example: python -m runtime "a small red circle on a black background" --seed 0 -o circle.png'
        if command == "txt2img"
        else None,
    )
    p.add_argument("prompt", help="what to draw")
    if command != "txt2img":
        p.add_argument(
            "--image", type=Path, required=True, help="input image (PNG/JPEG)" + (", a quarter of the output size" if upscale else "")
        )
        p.add_argument(
            "--resize", action="store_true", help="resize the input to the bundle's static size (Lanczos) instead of refusing it"
        )
    if command == "inpaint":
        p.add_argument("--mask", type=Path, required=True, help="mask image: white (>= 50%% gray) is repainted, black kept")
        p.add_argument(
            "--no-composite",
            action="store_true",
            help="return the decoded image as is, without pasting it into the original through the mask",
        )
    if command in ("img2img", "inpaint"):
        default = 0.75 if command == "img2img" else 1.0
        p.add_argument(
            "--strength",
            type=float,
            default=default,
            help="noise level to start from, (0, 1]: 1 ignores the image's content (default %(default)s)",
        )
    if upscale:
        p.add_argument(
            "--noise-level",
            type=int,
            default=20,
            help="noise added to the low-resolution image first, 0 to the model's maximum (default %(default)s)",
        )
    p.add_argument(
        "--bundle",
        type=Path,
        default=None if upscale else DEFAULT_BUNDLE,
        required=upscale,
        help="engine bundle folder" + ("" if upscale else " (default: %(default)s, the reference model)"),
    )
    p.add_argument("--negative-prompt", default="", help="what to steer away from (default: empty)")
    p.add_argument(
        "--no-prompt-weighting",
        action="store_true",
        help="read brackets in the prompts as plain text, not as A1111 emphasis ((word) x1.1, [word] /1.1, (word:1.3), BREAK)",
    )
    p.add_argument(
        "--steps",
        type=int,
        help="denoising steps (default: " + ("75)" if upscale else "50, or 4 for a bundle whose sampler is lcm or tcd)"),
    )
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=9.0 if upscale else 7.5,
        help="classifier-free guidance strength; <= 1 turns it off (default %(default)s)",
    )
    p.add_argument(
        "--guidance-rescale", type=float, default=0.0, help="CFG rescale (Lin et al. 2023); SD 2.x v-prediction models like 0.7 (default 0)"
    )
    p.add_argument("--seed", type=int, help="random seed; the same seed gives the same image on every backend (default: random, printed)")
    p.add_argument(
        "--scheduler",
        choices=sorted(SAMPLERS),
        help="sampler (default: the one the model's scheduler config names; see docs/samplers.md)",
    )
    p.add_argument("--eta", type=float, help="ddim/tcd stochasticity: 0 is deterministic DDIM (ddim's default), 1 is DDPM-like")
    p.add_argument(
        "--device", choices=("cpu", "cuda", "tensorrt"), help="ONNX Runtime execution provider (default: cuda where installed, else cpu)"
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("out.png"),
        help="PNG file to write; with batch > 1, NAME-0.png, NAME-1.png, ... (default %(default)s)",
    )
    p.add_argument(
        "--lora",
        action="append",
        metavar="FILE[:SCALE]",
        help="a LoRA adapter (.safetensors) at SCALE (default 1), fed through the bundle's LoRA slots (a bundle built with "
        "--lora-slots); repeat for several",
    )
    p.add_argument(
        "--decoder", choices=("full", "tiny"), help="VAE decoder (tiny: a bundle built with --tiny-vae; default: full where present)"
    )
    p.add_argument(
        "--cache-interval",
        type=int,
        default=1,
        metavar="N",
        help="DeepCache (a bundle built with --deepcache): the full UNet every N steps, the shallow one in between (default 1: off)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    if not upscale:
        sdxl = p.add_argument_group("SDXL conditioning (SDXL bundles only; defaults as diffusers')")
        for name, (metavar, what) in SDXL_FLAGS.items():
            kind = {"nargs": 2, "type": int} if isinstance(metavar, tuple) else {"type": float}
            sdxl.add_argument("--" + name.replace("_", "-"), metavar=metavar, help=what, **kind)
    add_control_flags(p)
    return p


def add_control_flags(p: argparse.ArgumentParser) -> None:
    """ControlNet's keywords as flags (bundles built with --controlnet)."""
    control = p.add_argument_group("ControlNet (bundles built with export.build --controlnet; defaults as diffusers')")
    control.add_argument(
        "--control-image", type=Path, action="append", metavar="FILE",
        help="control image (e.g. a white-on-black silhouette for the reference ControlNet); repeat once per net, in the "
        "bundle's --controlnet order",
    )  # fmt: skip
    control.add_argument("--controlnet-scale", type=float, nargs="+", metavar="S", help="conditioning scale, one or one per net")
    control.add_argument("--control-start", type=float, nargs="+", metavar="F", help="share of the steps before a net starts (default 0)")
    control.add_argument("--control-end", type=float, nargs="+", metavar="F", help="share of the steps after which it stops (default 1)")
    control.add_argument("--guess-mode", action="store_true", help="the nets see only the prompt's half of the CFG batch")
    control.add_argument(
        "--control-resize", action="store_true", help="resize control images to the bundle's size instead of refusing them"
    )


def control_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ControlNet flags given, as the tasks' keywords (a bundle without ControlNet refuses them by name)."""
    given: dict[str, Any] = {}
    if args.control_image:
        from .image_files import open_image

        images = [open_image(path, "--control-image") for path in args.control_image]
        given["control_image"] = images[0] if len(images) == 1 else images
    for flag, key in (("controlnet_scale", "controlnet_conditioning_scale"), ("control_start", "control_guidance_start"),
                      ("control_end", "control_guidance_end")):  # fmt: skip
        values = getattr(args, flag)
        if values is not None:
            given[key] = values[0] if len(values) == 1 else values
    given.update({k: True for k in ("guess_mode", "control_resize") if getattr(args, k)})
    return given


# SDXL's conditioning keywords as flags: (metavar, help)
SDXL_FLAGS: dict[str, tuple[tuple[str, str] | str, str]] = {
    "original_size": (("H", "W"), "the size the image is said to have had before resizing (default: the bundle's)"),
    "crops_coords_top_left": (("TOP", "LEFT"), "the crop it is said to come from (default 0 0)"),
    "target_size": (("H", "W"), "the size asked for (default: the bundle's; not for the refiner)"),
    "negative_original_size": (("H", "W"), "original_size for the negative half"),
    "negative_crops_coords_top_left": (("TOP", "LEFT"), "crops_coords_top_left for the negative half"),
    "negative_target_size": (("H", "W"), "target_size for the negative half"),
    "aesthetic_score": ("SCORE", "the refiner's aesthetic conditioning (default 6.0)"),
    "negative_aesthetic_score": ("SCORE", "the refiner's negative aesthetic conditioning (default 2.5)"),
}


def progress_bar(width: int = 30, stream: Any = None) -> Callable[[int, int, float], None]:
    """The per-step callback: a bar redrawn in place on a terminal; elsewhere (a log file, a pipe)
    one line per tenth of the run, since carriage returns would pile every step into one long line."""
    out = stream or sys.stderr
    live = out.isatty()
    start = time.perf_counter()

    def show(step: int, total: int, t: float) -> None:
        elapsed = time.perf_counter() - start
        if live:
            done = int(width * step / total)
            out.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total} t={t:4.0f} {elapsed:6.1f}s")
            out.write("\n" if step == total else "")
        elif step == total or step * 10 // total != (step - 1) * 10 // total:
            out.write(f"step {step}/{total} t={t:.0f} {elapsed:.1f}s\n")
        out.flush()

    return show


def outputs(path: Path, n: int) -> list[Path]:
    if path.suffix.lower() != ".png":
        path = path.with_suffix(".png")
    return [path] if n == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def check_output(path: Path) -> None:
    """Refuse an output path that cannot be written, before any work: a folder, or a place without write access."""
    target = outputs(path, 1)[0]
    for candidate in (path, target):
        if candidate.is_dir():
            raise ValueError(f"-o {candidate} is a folder; give a file name such as {candidate / 'out.png'}")
    if target.exists() and not os.access(target, os.W_OK):
        raise ValueError(f"-o {target} exists and is not writable")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"-o {target}: {parent} is a file, so the folder {target.parent} cannot be made")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"-o {target}: the folder {parent} is not writable")


def generate(command: str, args: argparse.Namespace, seed: int) -> list[Any]:
    """Load the bundle and run the asked task with the CLI's options; PIL images back."""
    from .image_files import open_image
    from .pipeline import Pipeline, Sampling

    image = open_image(args.image, "--image") if command != "txt2img" else None  # read before the bundle: cheap checks first
    mask = open_image(args.mask, "--mask") if command == "inpaint" else None
    pipe = Pipeline.load(args.bundle, device=args.device)
    if args.lora:
        from .lora import parse_spec

        pipe.set_lora([parse_spec(spec) for spec in args.lora])
    options: Sampling = {
        "guidance_scale": args.guidance_scale, "guidance_rescale": args.guidance_rescale, "seed": seed,
        "scheduler": args.scheduler, "eta": args.eta, "callback": None if args.quiet else progress_bar(),
        "decoder": args.decoder, "cache_interval": args.cache_interval,
    }  # fmt: skip
    # the SDXL flags given, as the tasks' keywords (an SD bundle refuses them by name)
    given = {name: tuple(v) if isinstance(v, list) else v for name in SDXL_FLAGS if (v := getattr(args, name, None)) is not None}
    options = {**options, **given, **control_options(args)}  # type: ignore[typeddict-item]
    if args.steps is not None:
        options["steps"] = args.steps
    if args.no_prompt_weighting:
        options = {**options, "prompt_weighting": False}  # type: ignore[typeddict-unknown-key]
    if command == "txt2img":
        return list(pipe.txt2img(args.prompt, args.negative_prompt, **options))
    if command == "img2img":
        return list(pipe.img2img(args.prompt, image, args.negative_prompt, strength=args.strength, resize=args.resize, **options))
    if command == "inpaint":
        composite = False if args.no_composite else None
        return list(
            pipe.inpaint(
                args.prompt, image, mask, args.negative_prompt, strength=args.strength, composite=composite, resize=args.resize, **options
            )
        )
    return list(pipe.upscale(args.prompt, image, args.negative_prompt, noise_level=args.noise_level, resize=args.resize, **options))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in SUBCOMMANDS else "txt2img"
    args = parser(command).parse_args(argv)
    warnings.formatwarning = lambda msg, cat, *_: f"warning: {msg}\n"
    from .errors import BundleError, Cancelled, FeedError

    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    try:
        check_output(args.output)
        images = generate(command, args, seed)
    except (BundleError, FeedError, ValueError, TypeError, FileNotFoundError, FloatingPointError, Cancelled) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .atomic import WriteError, disk_error, write_with

    for image, path in zip(images, outputs(args.output, len(images))):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_with(path, functools.partial(image.save, format="PNG"))  # a full disk leaves the old file whole
        except OSError as e:
            print(f"error: {e if isinstance(e, WriteError) else disk_error(path, e)}", file=sys.stderr)
            return 2
        print(f"wrote {path} (seed {seed})")
    return 0
