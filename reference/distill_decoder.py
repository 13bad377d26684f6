"""Distill the reference model's VAE into a tiny one (diffusers' AutoencoderTiny, the TAESD architecture).

    python -m reference.distill_decoder --out models/shapes-ldm-taesd                 # ~20 min on the 2-core CPU
    python -m reference.distill_decoder --out /tmp/taesd --quick                      # smoke run, seconds
    python -m reference.distill_decoder --out next --init models/shapes-ldm-taesd     # train a shipped one further

The tiny decoder learns to reproduce the full decoder's images from the same latents: one posterior sample
per image of the shapes dataset, decoded once by the full VAE as the target (flipped at random). The tiny encoder
learns the full encoder's posterior mean, so img2img and inpaint can use the pair. Both take and give
latents in the diffusion model's scale (scaling_factor 1.0, as TAESD), so a pipeline swaps it in with
`vae=AutoencoderTiny.from_pretrained(out)` and `export.build --tiny-vae out` adds it to a bundle.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from reference.distill import _sha256sums
from reference.model_folder import write_json

LOG_NAME = "distill_log.json"
DEFAULT_TEACHER = Path(__file__).resolve().parent.parent / "models" / "shapes-ldm"


@dataclass(frozen=True)
class DecoderRecipe:
    """What decides a run: the tiny architecture and the optimisation."""

    steps: int
    batch_size: int
    n_images: int
    time_limit: float | None
    channels: int = 32  # every stage's width (AutoencoderTiny needs one width across its stages)
    blocks: int = 1  # AutoencoderTinyBlocks per stage
    lr: float = 2e-3
    encoder_weight: float = 0.5  # the encoder's latent loss beside the decoder's pixel loss
    seed: int = 0
    threads: int = 2


PRESETS = {
    "cpu": DecoderRecipe(steps=6000, batch_size=32, n_images=6000, time_limit=1200.0),
    "quick": DecoderRecipe(steps=4, batch_size=4, n_images=16, time_limit=None),
}


def tiny_config(vae_config: dict[str, Any], recipe: DecoderRecipe) -> dict[str, Any]:
    """AutoencoderTiny's config for the teacher's VAE: its latent channels and downscale factor."""
    stages = len(vae_config["block_out_channels"])  # factor 2 ** (stages - 1), as the full VAE's
    return {
        "in_channels": vae_config["in_channels"],
        "out_channels": vae_config["out_channels"],
        "latent_channels": vae_config["latent_channels"],
        "encoder_block_out_channels": (recipe.channels,) * stages,
        "decoder_block_out_channels": (recipe.channels,) * stages,
        "num_encoder_blocks": (recipe.blocks,) * stages,
        "num_decoder_blocks": (recipe.blocks,) * stages,
        "scaling_factor": 1.0,  # it reads and writes the diffusion model's (scaled) latents, as TAESD
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m reference.distill_decoder", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", type=Path, default=DEFAULT_TEACHER, help="diffusers model folder whose vae/ is distilled")
    p.add_argument("--out", type=Path, required=True, help="new folder for the AutoencoderTiny (must not exist or be empty)")
    p.add_argument("--quick", action="store_true", help="a few steps on a few images: a smoke run for the tests")
    p.add_argument("--time-limit", type=float, metavar="S", help="stop training after S seconds (default: the preset's)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    p.add_argument("--images", type=int, dest="n_images", help="dataset images to train on (default: the preset's)")
    p.add_argument("--batch-size", type=int, help="images per optimizer step (default: the preset's)")
    p.add_argument("--seed", type=int, help="data and initialisation seed (default 0)")
    p.add_argument("--channels", type=int, help="width of every stage (default 32; the time of a decode goes as its square)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default 2)")
    p.add_argument("--init", type=Path, metavar="DIR", help="start from this AutoencoderTiny folder (one this command wrote)")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    recipe = PRESETS["quick" if args.quick else "cpu"]
    given = ("time_limit", "steps", "seed", "n_images", "batch_size", "channels", "threads")
    overrides = {k: getattr(args, k) for k in given if getattr(args, k) is not None}
    recipe = replace(recipe, **overrides)
    sizes = (recipe.steps, recipe.n_images, recipe.batch_size, recipe.channels, recipe.threads)
    if min(sizes) < 1 or (recipe.time_limit is not None and recipe.time_limit <= 0):
        parser.error("--steps, --images, --batch-size, --channels, --threads and --time-limit must be positive")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        parser.error(f"--out {args.out} exists and is not empty; pick a new folder (nothing of yours is overwritten)")
    if not (args.teacher / "vae" / "config.json").is_file():
        parser.error(f"--teacher {args.teacher} has no vae/config.json: pass a diffusers model folder")
    if args.init is not None and not (args.init / LOG_NAME).is_file():
        parser.error(f"--init {args.init} has no {LOG_NAME}: pass a folder this command wrote")
    command = "python -m reference.distill_decoder " + shlex.join(sys.argv[1:] if argv is None else argv)
    run(recipe, args.teacher, args.out, command, args.init)


def run(recipe: DecoderRecipe, teacher: Path, out: Path, command: str, init: Path | None = None) -> dict[str, Any]:
    """Train, save `out` (config.json + safetensors + the log), return the log."""
    import diffusers
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny

    from reference.dataset import make_dataset
    from reference.pacing import PhaseClock, Ticker, learning_rate, say

    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    started = time.perf_counter()
    full = AutoencoderKL.from_pretrained(teacher / "vae").eval().requires_grad_(False)
    scale = float(full.config.scaling_factor)
    earlier: list[str] = []
    if init is None:
        tiny = AutoencoderTiny(**tiny_config(dict(full.config), recipe)).train()
    else:
        tiny = AutoencoderTiny.from_pretrained(init).train()
        earlier = json.loads((init / LOG_NAME).read_text()).get("commands", [])
    images, _ = make_dataset(recipe.n_images, seed=1000 + recipe.seed, workers=1)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():  # one posterior sample per image and the full decoder's image of it, once
        moments = torch.cat([full.encode(pixels[i : i + 256]).latent_dist.parameters for i in range(0, len(pixels), 256)])
        mean, logvar = moments.chunk(2, dim=1)
        inputs = (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn_like(mean)) * scale
        targets = torch.cat([full.decode(inputs[i : i + 256] / scale).sample for i in range(0, len(inputs), 256)])
    say(f"{len(inputs)} latents and their full-decoder images ready, {time.perf_counter() - started:.0f}s")
    optimizer = torch.optim.AdamW(tiny.parameters(), lr=recipe.lr, weight_decay=0.0)
    clock, ticker = PhaseClock(recipe.steps, recipe.time_limit), Ticker(10.0)
    rng = np.random.default_rng(recipe.seed)
    losses: list[tuple[float, float]] = []
    step = 0
    while not clock.done(step):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(recipe.lr, step, clock.progress(step), warmup_steps=100, min_ratio=0.02)
        idx = torch.from_numpy(rng.integers(0, len(pixels), recipe.batch_size))
        latents, target, image, goal = inputs[idx], targets[idx], pixels[idx], mean[idx] * scale
        if rng.random() < 0.5:  # a mirrored image has the mirrored latents: twice the data for both halves
            latents, target, image, goal = (v.flip(-1) for v in (latents, target, image, goal))
        decoded = tiny.decode(latents).sample
        encoded = tiny.encode(image).latents
        pixel_loss = torch.nn.functional.mse_loss(decoded, target) + torch.nn.functional.l1_loss(decoded, target)
        latent_loss = torch.nn.functional.mse_loss(encoded, goal)
        loss = pixel_loss + recipe.encoder_weight * latent_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append((pixel_loss.item(), latent_loss.item()))
        step += 1
        if ticker.due():
            recent = np.mean(losses[-50:], axis=0)
            say(f"step {step}: pixel loss {recent[0]:.5f}, latent loss {recent[1]:.5f}, {clock.elapsed():.0f}s")
    tiny.eval()
    held_out = held_out_error(tiny, full, scale, recipe)
    out.mkdir(parents=True, exist_ok=True)
    tiny.save_pretrained(out, safe_serialization=True)
    log = {
        "status": "complete",
        "commands": [*earlier, command],  # every run that made these weights, the first first
        "teacher": str(teacher.resolve().relative_to(Path.cwd())) if teacher.resolve().is_relative_to(Path.cwd()) else str(teacher),
        "recipe": asdict(recipe),
        "steps_done": step,
        "stopped_by": clock.stopped_by(step),
        "seconds": round(time.perf_counter() - started, 1),
        "final_losses": dict(zip(("pixel_mse_plus_l1", "latent_mse"), map(float, np.mean(losses[-50:], axis=0)))),
        "held_out": held_out,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }
    write_json(out / LOG_NAME, log)
    (out / "SHA256SUMS").write_text(_sha256sums(out))  # export.build checks a tiny VAE folder against it
    say(f"[saved] {out}: {step} steps, {log['seconds']:.0f}s; held-out decode error {held_out}")
    return log


def held_out_error(tiny: Any, full: Any, scale: float, recipe: DecoderRecipe, n: int = 64) -> dict[str, float]:
    """Mean and max absolute pixel difference (in [0, 1]) of the tiny decoder against the full one on unseen images."""
    import torch

    from reference.dataset import make_dataset

    images, _ = make_dataset(n, seed=7000 + recipe.seed, workers=1)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        latents = full.encode(pixels).latent_dist.mean * scale
        diff = (tiny.decode(latents).sample.clamp(-1, 1) - full.decode(latents / scale).sample.clamp(-1, 1)).abs() / 2
    return {"mean_abs_pixel": round(float(diff.mean()), 5), "max_abs_pixel": round(float(diff.max()), 5)}


if __name__ == "__main__":
    main()
