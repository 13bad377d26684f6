"""Train the reference ControlNet: a silhouette (white on black) puts the object where it is drawn.

    python -m reference.train_controlnet --out models/shapes-ldm-controlnet        # the shipped run
    python -m reference.train_controlnet --out /tmp/cn --quick                     # smoke run, seconds

The base model (``--base``, default models/shapes-ldm) stays frozen: its VAE encodes the
generated images, its text encoder the captions (colour, shape, background: a control image says
where and how large), its UNet takes the ControlNet's residuals. The ControlNet starts as a copy
of the UNet's encoder (``ControlNetModel.from_unet``) with zero convolutions, as in Zhang et al.
2023, "Adding Conditional Control to Text-to-Image Diffusion Models". Timesteps are drawn with
T2I-Adapter's cubic schedule (Mou et al. 2023): most draws are high-noise steps, where the layout
that a control image decides is set.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

DEFAULT_BASE = Path(__file__).resolve().parent.parent / "models" / "shapes-ldm"
# Two stride-2 convolutions: a 64x64 control image becomes the 16x16 latent grid (VAE factor 4).
CONDITIONING_CHANNELS = (16, 32, 64)
LOG_NAME = "training_log.json"
OBJECT_WEIGHT = 4.0


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a ControlNet training run, besides its folders."""

    n_images: int = 6_000
    steps: int = 20_000
    batch_size: int = 16
    lr: float = 5e-4
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    caption_dropout: float = 0.1
    time_limit: float | None = 1_800.0
    checkpoint_every_s: float | None = 300.0
    log_every_s: float = 10.0
    seed: int = 0


QUICK = Recipe(n_images=64, steps=6, batch_size=4, time_limit=None, checkpoint_every_s=None, log_every_s=1.0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m reference.train_controlnet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="new (or empty) folder for the ControlNet")
    p.add_argument("--base", type=Path, default=DEFAULT_BASE, help="the frozen base model (default models/shapes-ldm)")
    p.add_argument("--quick", action="store_true", help="a smoke run of a few steps on a few images")
    p.add_argument("--time-limit", type=float, metavar="SECONDS", help="wall-clock budget (default 1800; 0: steps only)")
    p.add_argument("--steps", type=int, help="step ceiling")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--n-images", type=int, help="generated training images")
    p.add_argument("--lr", type=float, help="peak learning rate (default 5e-4)")
    p.add_argument("--seed", type=int, help="seed for data and training (default 0)")
    p.add_argument("--init", type=Path, metavar="DIR", help="go on training this ControlNet (a folder this command wrote)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: on a shared machine two threads waiting on each "
        "other ran a step 20x slower than one)",
    )
    return p


def resolve(args: argparse.Namespace) -> Recipe:
    """The recipe the command line asks for, checked for sense."""
    recipe = QUICK if args.quick else Recipe()
    given = {k: getattr(args, k) for k in ("steps", "batch_size", "n_images", "lr", "seed") if getattr(args, k) is not None}
    if args.time_limit is not None:
        given["time_limit"] = args.time_limit or None
    recipe = replace(recipe, **given)
    for name in ("steps", "batch_size", "n_images"):
        if getattr(recipe, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(recipe, name)}")
    if recipe.time_limit is not None and recipe.time_limit < 0:
        raise ValueError(f"--time-limit must be >= 0 seconds, got {recipe.time_limit}")
    if not recipe.lr > 0:
        raise ValueError(f"--lr must be > 0, got {recipe.lr}")
    return recipe


def check_folders(out: Path, base: Path) -> None:
    """Refuse an --out that holds anything (never overwrite) and a --base that is not a diffusers model."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty folder; give a new path (nothing is overwritten)")
    missing = [part for part in ("vae", "text_encoder", "unet", "tokenizer") if not (base / part).is_dir()]
    if missing:
        raise FileNotFoundError(f"--base {base} lacks {missing}: give a diffusers model folder such as models/shapes-ldm")


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        recipe = resolve(args)
        check_folders(args.out, args.base)
        if args.init is not None and not (args.init / LOG_NAME).is_file():
            raise FileNotFoundError(f"--init {args.init} has no {LOG_NAME}: give a folder this command wrote")
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    import torch

    torch.set_num_threads(max(1, args.threads))
    command = ["python", "-m", "reference.train_controlnet", *(argv or sys.argv[1:])]
    train(recipe, args.base, args.out, started, command, args.init)


def train(recipe: Recipe, base: Path, out: Path, started: float, command: list[str], init: Path | None = None) -> dict:
    """Train on generated control data and save the ControlNet (safetensors) and its log into ``out``."""
    import diffusers
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from reference.dataset import make_control_dataset
    from reference.pacing import PhaseClock, Ticker, learning_rate, say
    from reference.phases import IndexStream, LossLog, to_unit_range

    torch.manual_seed(recipe.seed)
    say(f"[data] drawing {recipe.n_images} freely placed objects and their silhouettes")
    images, controls, attributes, _ = make_control_dataset(recipe.n_images, recipe.seed)
    vae = AutoencoderKL.from_pretrained(base / "vae").eval()
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(base / "unet").eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    scale = float(vae.config.scaling_factor)

    from reference.dataset import control_caption

    captions = [control_caption(a) for a in attributes]
    distinct = [""] + sorted(set(captions))
    row = {c: i for i, c in enumerate(distinct)}
    with torch.no_grad():
        ids = tokenizer(distinct, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
        contexts = text_encoder(input_ids=torch.tensor(ids)).last_hidden_state
        posteriors = [vae.encode(to_unit_range(torch.from_numpy(images[s : s + 512]))).latent_dist for s in range(0, len(images), 512)]
        mean = torch.cat([p.mean for p in posteriors])
        std = torch.cat([p.std for p in posteriors])
    caption_rows = torch.tensor([row[c] for c in captions])
    cond = torch.from_numpy(controls).permute(0, 3, 1, 2).float().div(255.0)
    # Errors on the object count OBJECT_WEIGHT times more. The weight depends on the control image
    # alone, so the best prediction for each input is unchanged; the placement is just learnt sooner.
    weight = 1.0 + (OBJECT_WEIGHT - 1.0) * F.avg_pool2d(cond[:, :1], images.shape[1] // mean.shape[-1])
    abar = DDIMScheduler.from_pretrained(base / "scheduler").alphas_cumprod.float()
    seconds = time.perf_counter() - started
    say(f"[data] {len(images)} images, {len(distinct) - 1} captions, latents {tuple(mean.shape[1:])} in {seconds:.0f}s")

    earlier: list[dict] = []
    if init is None:
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS).train()
    else:  # each earlier run's command and steps stay in the log, the first first
        controlnet = ControlNetModel.from_pretrained(init).train()
        before = json.loads((init / LOG_NAME).read_text())
        earlier = [*before.get("earlier_runs", []), {k: before.get(k) for k in ("command", "steps", "seconds", "recipe")}]
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=recipe.lr, weight_decay=0.01)
    deadline = None if recipe.time_limit is None else max(0.0, recipe.time_limit - (time.perf_counter() - started) - 15.0)
    clock = PhaseClock(recipe.steps, deadline)
    batches = IndexStream(len(images), recipe.batch_size, torch.device("cpu"))
    losses, ticker, step = LossLog(), Ticker(recipe.log_every_s), 0
    saver = Ticker(recipe.checkpoint_every_s) if recipe.checkpoint_every_s else None
    log = {
        "command": shlex.join(command),
        "earlier_runs": earlier,
        "base": str(base),
        "recipe": asdict(recipe),
        "conditioning_embedding_out_channels": list(CONDITIONING_CHANNELS),
        "object_weight": OBJECT_WEIGHT,
        "device": f"cpu ({platform.processor() or 'cpu'}), {torch.get_num_threads()} threads",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version()},
    }
    while not clock.done(step):
        lr = learning_rate(recipe.lr, step, clock.progress(step), recipe.warmup_steps, recipe.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = batches.next()
        z0 = (mean[index] + std[index] * torch.randn_like(mean[index])) * scale
        noise = torch.randn_like(z0)
        # cubic: t = (1 - u^3) T puts most draws at high noise
        t = ((1.0 - torch.rand(len(index)) ** 3) * len(abar)).long().clamp(max=len(abar) - 1)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1.0 - a).sqrt() * noise
        rows = torch.where(torch.rand(len(index)) < recipe.caption_dropout, 0, caption_rows[index])
        context = contexts[rows]
        down, mid = controlnet(zt, t, encoder_hidden_states=context, controlnet_cond=cond[index], return_dict=False)
        prediction = unet(
            zt, t, encoder_hidden_states=context, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
        loss = (weight[index] * (prediction - noise) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        optimizer.step()
        losses.add(loss)
        step += 1
        if ticker.due():
            loss_now, elapsed = losses.flush(step, clock.elapsed()), clock.elapsed()
            say(f"[controlnet] step {step}/{recipe.steps}  loss {loss_now:.4f}  lr {lr:.2e}  {step / elapsed:.2f} it/s  {elapsed:.0f}s")
        if saver is not None and saver.due():
            _save(controlnet, out, {**log, "status": "checkpoint", "steps": step}, losses)
            say(f"[controlnet] checkpoint saved at step {step}")
    losses.flush(step, clock.elapsed())
    log = {**log, "status": "complete", "steps": step, "stopped_by": clock.stopped_by(step), "seconds": time.perf_counter() - started}
    _save(controlnet, out, log, losses)
    say(f"[saved] {out} after {step} steps, {log['seconds']:.0f}s")
    return log


def _save(controlnet, out: Path, log: dict, losses) -> None:
    controlnet.save_pretrained(out, safe_serialization=True)
    curve = [list(point) for point in losses.curve]
    (out / LOG_NAME).write_text(json.dumps({**log, "curve_step_seconds_loss": curve}, indent=1) + "\n")


if __name__ == "__main__":
    main()
