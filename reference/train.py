"""Train the reference text-to-image latent diffusion model into a diffusers folder.

    python -m reference.train --out models/shapes-ldm                 # gpu preset on CUDA, cpu otherwise
    python -m reference.train --out /tmp/m --quick                    # smoke run, a minute or two on a CPU
    python -m reference.train --out models/shapes-ldm --time-limit 400

The shipped model is three runs, each continuing the last (``--init``: its VAE kept, its text
encoder and UNet trained further):

    python -m reference.train --out stage1 --preset gpu
    python -m reference.train --out stage2 --init stage1 --preset layout   # t >= 800 only: position
    python -m reference.train --out models/shapes-ldm --init stage2 --preset settle   # all t again

Phases: generate the shapes dataset, train the VAE (saved as soon as it is done), encode the
dataset's latents, then train the CLIP text encoder and the UNet together (EMA weights saved,
refreshed every few minutes). ``StableDiffusionPipeline.from_pretrained(out)`` loads the result.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

# Only light imports up here: where make_dataset has to spawn its workers they re-import this
# module, and should not each pay for torch and diffusers.
from reference.architecture import CLIP_DIR, WEIGHT_FILES
from reference.presets import CONTINUING, PRESETS, resolve_recipe


def _time_limit(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds or 'none', got {text!r}") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"time limit must be > 0 seconds, got {text}")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    """The command line, with every preset setting overridable."""
    presets = "\n".join(
        f"  {name:>5}: {r.n_images} images; VAE {r.vae_steps} steps x {r.vae_batch_size}; "
        f"text encoder + UNet {r.unet_steps} steps x {r.batch_size}; time limit {r.time_limit or 'none'}"
        for name, r in PRESETS.items()
    )
    p = argparse.ArgumentParser(
        prog="python -m reference.train",
        description=__doc__ + "\npresets (step counts are ceilings; a time limit may end a phase sooner):\n" + presets,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="folder to write the diffusers model into")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="training device (default auto)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="recipe preset (default: gpu on CUDA, cpu otherwise)")
    p.add_argument("--quick", action="store_true", help="same as --preset quick: a short smoke run")
    p.add_argument(
        "--time-limit",
        type=_time_limit,
        default=argparse.SUPPRESS,
        metavar="SECONDS",
        help="wall-clock budget for the whole run, final save included, or 'none' (default: the preset's)",
    )
    p.add_argument(
        "--init",
        type=Path,
        metavar="MODEL",
        help="continue from this saved model: keep its VAE, train its text encoder and UNet further",
    )
    p.add_argument("--t-min", type=int, metavar="T", help="draw training timesteps from [T, 1000) (default: the preset's)")
    p.add_argument("--vae-steps", type=int, metavar="N", help="VAE step ceiling")
    p.add_argument("--unet-steps", type=int, metavar="N", help="text encoder + UNet step ceiling")
    p.add_argument("--batch-size", type=int, metavar="N", help="text encoder + UNet batch size")
    p.add_argument("--vae-batch-size", type=int, metavar="N", help="VAE batch size")
    p.add_argument("--n-images", type=int, metavar="N", help="number of generated training images")
    p.add_argument("--seed", type=int, help="seed for data, initialisation and sampling (default 0)")
    p.add_argument("--workers", type=int, metavar="N", help="data generation processes (default: all CPUs)")
    p.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast with fp32 master weights (default: on for CUDA, off for CPU)",
    )
    p.add_argument(
        "--tokenizer-dir",
        type=Path,
        default=CLIP_DIR,
        help="folder with the CLIP vocab.json, merges.txt and tokenizer configs (default: the repository's copy)",
    )
    return p


def pick_preset(preset: str | None, quick: bool, device_type: str) -> str:
    """The preset to use: --quick, else --preset, else by device."""
    if quick and preset not in (None, "quick"):
        raise ValueError(f"--quick contradicts --preset {preset}; give one of them")
    if quick:
        return "quick"
    return preset or ("gpu" if device_type == "cuda" else "cpu")


def recipe_overrides(args: argparse.Namespace) -> dict:
    """The Recipe fields given on the command line (``--time-limit none`` included)."""
    names = ("vae_steps", "unet_steps", "batch_size", "vae_batch_size", "n_images", "seed", "workers", "t_min")
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if hasattr(args, "time_limit"):
        overrides["time_limit"] = args.time_limit
    return overrides


def resolve_device(choice: str):
    """The torch device for --device: "auto" means CUDA when torch sees one."""
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device; use --device cpu or a CUDA build of torch")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, check it, and train."""
    started = time.perf_counter()
    parser = build_parser()
    args = parser.parse_args(argv)
    # Heavy imports only now (see the note at the top).
    from reference.caption_bank import load_tokenizer
    from reference.phases import Setup, run

    try:
        device = resolve_device(args.device)
        preset = pick_preset(args.preset, args.quick, device.type)
        recipe = resolve_recipe(preset, **recipe_overrides(args))
        load_tokenizer(args.tokenizer_dir)
        if preset in CONTINUING and args.init is None:
            raise ValueError(f"--preset {preset} continues a trained model: give --init MODEL")
        if recipe.t_min > 0 and args.init is None:
            raise ValueError(
                f"timesteps from [{recipe.t_min}, 1000) alone cannot train a model from scratch; "
                "give --init with a model trained on all timesteps"
            )
        if args.init is not None:
            missing = [name for name, file in WEIGHT_FILES.items() if not (args.init / file).is_file()]
            if missing:
                raise FileNotFoundError(f"--init {args.init} lacks {missing}: give a folder written by this command")
            if args.out.resolve() == args.init.resolve():
                raise ValueError(f"--out is --init ({args.init}); write the continued model to a new folder")
        if args.out.exists() and not args.out.is_dir():
            raise ValueError(f"--out {args.out} exists and is not a folder; pick another path")
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    amp = device.type == "cuda" if args.amp is None else args.amp
    print(f"training preset {preset!r} on {device} (bf16 autocast {'on' if amp else 'off'}) into {args.out}", flush=True)
    setup = Setup(recipe=recipe, out=args.out, device=device, amp=amp, tokenizer_dir=args.tokenizer_dir, init=args.init)
    run(setup, started)


if __name__ == "__main__":
    main()
