"""Distill the reference model into a few-step student by latent consistency distillation.

    python -m reference.distill --teacher models/shapes-ldm --out models/shapes-ldm-lcm
    python -m reference.distill --teacher models/shapes-ldm --out /tmp/lcm --quick      # smoke run
    python -m reference.distill ... --resume                                            # continue a killed run

The student is the teacher's UNet with a guidance-scale embedding added (``time_cond_proj_dim``,
its projection zero-initialised, so it starts as the teacher): it takes the CFG scale w as an
input and needs no unconditioned batch. Each step teaches it to map a noisy latent at t_{n+k}
to the same point as the EMA target maps the result of one CFG-guided DDIM step of the teacher
(reference.lcd). The text encoder, tokenizer and VAE are the teacher's, byte for byte; the output
is a diffusers folder with an LCMScheduler, which LatentConsistencyModelPipeline loads.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from reference.model_folder import write_json

LOG_NAME = "distill_log.json"
CHECKPOINT = ".distill-checkpoint"
SHARED = ("text_encoder", "tokenizer", "vae")  # taken from the teacher unchanged


@dataclass(frozen=True)
class DistillRecipe:
    """Everything that decides a distillation run, besides the folders."""

    steps: int
    batch_size: int
    n_images: int
    time_limit: float | None
    lr: float = 1e-4
    solver_steps: int = 50  # DDIM timesteps of the teacher's solver: skip k = 1000 // 50 = 20
    w_min: float = 2.0  # CFG scales drawn uniformly from [w_min, w_max]
    w_max: float = 8.0
    embed_dim: int = 64  # time_cond_proj_dim of the student
    target_decay: float = 0.95  # EMA of the target network (the LCM paper's mu)
    huber_c: float = 0.001
    grad_clip: float = 1.0
    checkpoint_every_s: float | None = 600.0
    log_every_s: float = 10.0
    probe_prompts: int = 24  # generated at 4 steps and read back by reference.checker at each checkpoint
    seed: int = 0
    workers: int | None = None


PRESETS: dict[str, DistillRecipe] = {
    # One GPU: large batches, a few minutes.
    "gpu": DistillRecipe(steps=6_000, batch_size=256, n_images=20_000, time_limit=900.0, lr=2e-4, checkpoint_every_s=120.0),
    # The 2-core CPU: about two hours at ~1 step/s of batch 24 (student + target + 2 teacher passes).
    "cpu": DistillRecipe(steps=8_000, batch_size=24, n_images=8_000, time_limit=7_000.0),
    "quick": DistillRecipe(steps=6, batch_size=4, n_images=32, time_limit=None, checkpoint_every_s=None, log_every_s=1.0, probe_prompts=4),
}


def check_recipe(r: DistillRecipe) -> None:
    """Raise ValueError naming the first setting that cannot work."""
    for name in ("steps", "batch_size", "n_images", "solver_steps", "embed_dim", "probe_prompts"):
        if getattr(r, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(r, name)}")
    if not 1.0 <= r.w_min <= r.w_max:
        raise ValueError(f"guidance range must satisfy 1 <= w_min <= w_max, got [{r.w_min}, {r.w_max}]")
    if not 0.0 <= r.target_decay < 1.0:
        raise ValueError(f"target EMA decay must be in [0, 1), got {r.target_decay}")
    if r.time_limit is not None and r.time_limit <= 0:
        raise ValueError(f"time limit must be > 0 seconds, got {r.time_limit}")
    if r.embed_dim % 2:
        raise ValueError(f"embed_dim must be even (sin and cos halves), got {r.embed_dim}")


def build_parser() -> argparse.ArgumentParser:
    presets = "\n".join(
        f"  {n:>5}: {r.steps} steps x batch {r.batch_size}, time limit {r.time_limit or 'none'}" for n, r in PRESETS.items()
    )
    p = argparse.ArgumentParser(
        prog="python -m reference.distill",
        description=__doc__ + "\npresets:\n" + presets,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--teacher", type=Path, default=Path("models/shapes-ldm"), help="teacher diffusers folder (default %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="folder to write the student into (a new one, or one of ours to --resume)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="recipe (default: gpu on CUDA, cpu otherwise)")
    p.add_argument("--quick", action="store_true", help="same as --preset quick: a smoke run of seconds")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--time-limit", type=float, metavar="SECONDS", help="wall-clock budget, final save included")
    p.add_argument("--steps", type=int, metavar="N", help="step ceiling")
    p.add_argument("--batch-size", type=int, metavar="N")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    p.add_argument(
        "--link-teacher",
        action="store_true",
        help="link text_encoder, tokenizer and vae to the teacher's folders (relative symlinks) instead of copying them",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        recipe = _recipe(args)
        _check_folders(args)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    from reference.train import resolve_device

    command = "python -m reference.distill " + shlex.join(sys.argv[1:] if argv is None else argv)
    run(recipe, args.teacher, args.out, resolve_device(args.device), started, resume=args.resume, link=args.link_teacher, command=command)


def _recipe(args: argparse.Namespace) -> DistillRecipe:
    if args.quick and args.preset not in (None, "quick"):
        raise ValueError(f"--quick contradicts --preset {args.preset}; give one of them")
    import torch

    name = "quick" if args.quick else args.preset or ("gpu" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    overrides = {k: getattr(args, k) for k in ("time_limit", "steps", "batch_size", "seed") if getattr(args, k) is not None}
    recipe = replace(PRESETS[name], **overrides)
    check_recipe(recipe)
    return recipe


def _check_folders(args: argparse.Namespace) -> None:
    for part in (*SHARED, "unet", "scheduler"):
        if not (args.teacher / part).is_dir():
            raise FileNotFoundError(f"--teacher {args.teacher} has no {part}/: give a diffusers Stable Diffusion folder")
    if args.out.resolve() == args.teacher.resolve():
        raise ValueError("--out is the teacher's folder; write the student to a new one")
    if args.resume:
        if not (args.out / CHECKPOINT).is_dir():
            raise FileNotFoundError(f"--resume: {args.out} has no {CHECKPOINT}/ to continue from")
    elif args.out.exists() and any(args.out.iterdir()):
        raise ValueError(f"--out {args.out} exists and is not empty; pick a new folder, or --resume a run written there")


def run(
    recipe: DistillRecipe, teacher_dir: Path, out: Path, device, started: float, resume: bool = False, link: bool = False, command: str = ""
) -> dict:
    """Distill ``teacher_dir`` into ``out``; returns the log, also written as ``out/distill_log.json``."""
    import diffusers
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from reference import lcd
    from reference.caption_bank import CaptionSampler, build_caption_bank, load_tokenizer
    from reference.dataset import make_dataset
    from reference.pacing import PhaseClock, Ticker, say

    torch.manual_seed(recipe.seed)
    out.mkdir(parents=True, exist_ok=True)
    deadline = None if recipe.time_limit is None else started + recipe.time_limit - min(30.0, 0.1 * recipe.time_limit)
    tokenizer = load_tokenizer(teacher_dir / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(teacher_dir / "text_encoder").to(device).eval().requires_grad_(False)
    teacher = UNet2DConditionModel.from_pretrained(teacher_dir / "unet").to(device).eval().requires_grad_(False)
    scheduler = DDIMScheduler.from_pretrained(teacher_dir / "scheduler")
    prediction_type = scheduler.config.prediction_type
    solver = lcd.Solver.from_alphas(scheduler.alphas_cumprod, recipe.solver_steps).to(device)

    student = student_from(teacher, recipe.embed_dim).to(device).train()
    target = student_from(teacher, recipe.embed_dim).to(device).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=recipe.lr, weight_decay=0.0)
    step, log = 0, _log_header(recipe, teacher_dir, device, diffusers.__version__)
    if resume:
        step, log = _load_checkpoint(out / CHECKPOINT, student, target, optimizer, device)
        say(f"[resume] from step {step}")
    log.setdefault("commands", []).append({"command": command, "from_step": step})  # every run that made this student

    t0 = time.perf_counter()
    images, attributes = make_dataset(recipe.n_images, recipe.seed, workers=recipe.workers or os.cpu_count() or 1)
    latents = encode(teacher_dir, torch.from_numpy(images), device)
    bank = build_caption_bank(tokenizer, attributes, 16, recipe.seed + 1)
    captions = CaptionSampler(bank, 0.0, device)
    with torch.no_grad():
        empty_context = text_encoder(input_ids=captions.token_ids[:1]).last_hidden_state  # row 0 is ""
    say(f"[data] {len(attributes)} images encoded in {time.perf_counter() - t0:.1f}s")

    first, earlier_seconds = step, float(log.get("seconds", 0.0))
    clock = PhaseClock(max(1, recipe.steps - first), None if deadline is None else max(0.0, deadline - time.perf_counter()))
    ticker, saver = Ticker(recipe.log_every_s), Ticker(recipe.checkpoint_every_s) if recipe.checkpoint_every_s else None
    generator = torch.Generator(device="cpu").manual_seed(recipe.seed + step)
    losses: list[float] = []
    while step < recipe.steps and not clock.done(step - first):
        index = torch.randint(latents[0].shape[0], (recipe.batch_size,), generator=generator).to(device)
        mean, std, scale = latents
        z0 = (mean[index] + std[index] * torch.randn_like(mean[index])) * scale
        with torch.no_grad():
            context = text_encoder(input_ids=captions(index)).last_hidden_state
        batch = lcd.Batch(z0, context, empty_context.expand(len(index), -1, -1))
        w = torch.empty(len(index), device=device).uniform_(recipe.w_min, recipe.w_max)
        loss = lcd.lcd_loss(student, target, teacher, batch, solver, w, recipe.embed_dim, prediction_type, recipe.huber_c)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), recipe.grad_clip)
        optimizer.step()
        lcd.ema_update(target, student, recipe.target_decay)
        losses.append(float(loss.detach()))
        step += 1
        if ticker.due():
            rate, recent = (step - first) / max(clock.elapsed(), 1e-9), losses[-20:]
            say(f"[lcd] step {step}/{recipe.steps}  loss {sum(recent) / len(recent):.5f}  {rate:.2f} it/s  {clock.elapsed():.0f}s")
        if saver is not None and saver.due():
            log["seconds"] = round(earlier_seconds + time.perf_counter() - started, 1)
            _checkpoint(out, recipe, step, log, losses, student, target, optimizer, text_encoder, tokenizer, teacher_dir, device)
            say(f"[lcd] checkpoint at step {step}")
    log["stopped_by"] = "steps" if step >= recipe.steps else "time"
    log["seconds"] = round(earlier_seconds + time.perf_counter() - started, 1)
    _checkpoint(out, recipe, step, log, losses, student, target, optimizer, text_encoder, tokenizer, teacher_dir, device)
    save_student(target, teacher_dir, out, link, recipe.solver_steps)
    log["status"] = "complete"
    write_json(out / LOG_NAME, log)
    (out / "SHA256SUMS").write_text(_sha256sums(out))
    say(f"[saved] {out}: student UNet after {step} steps, {log['seconds']:.0f}s")
    return log


def student_from(teacher, embed_dim: int):
    """The teacher's UNet with a guidance embedding input whose projection starts at zero."""
    import torch
    from diffusers import UNet2DConditionModel

    student = UNet2DConditionModel.from_config({**teacher.config, "time_cond_proj_dim": embed_dim})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or sorted(missing) != ["time_embedding.cond_proj.weight"]:
        raise ValueError(f"student does not match the teacher's UNet: missing {missing}, unexpected {unexpected}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


def encode(teacher_dir: Path, images, device):
    """Posterior mean, std of every (n, 64, 64, 3) uint8 image under the teacher's VAE, and its scaling factor."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(teacher_dir / "vae").to(device).eval()
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, images.shape[0], 256):
            x = images[start : start + 256].to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
            posterior = vae.encode(x).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds), float(vae.config.scaling_factor)


def lcm_scheduler_config(teacher_dir: Path, solver_steps: int) -> dict:
    """LCMScheduler settings on the teacher's noise schedule, its origin steps the solver's."""
    from reference.lcd import TIMESTEP_SCALING

    ddim = json.loads((teacher_dir / "scheduler" / "scheduler_config.json").read_text())
    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type", "rescale_betas_zero_snr")
    return {
        "_class_name": "LCMScheduler",
        **{k: ddim[k] for k in keep if k in ddim},
        "original_inference_steps": solver_steps,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "timestep_spacing": "leading",
        "timestep_scaling": TIMESTEP_SCALING,
        "clip_sample": False,
    }


def save_student(unet, teacher_dir: Path, out: Path, link: bool, solver_steps: int) -> None:
    """``out`` as a diffusers LCM folder: the student UNet, an LCMScheduler, the teacher's other parts."""
    from reference.model_folder import cpu_copy

    scratch = out / ".saving"
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir()
    cpu_copy(unet).save_pretrained(scratch / "unet", safe_serialization=True)
    (scratch / "scheduler").mkdir()
    write_json(scratch / "scheduler" / "scheduler_config.json", lcm_scheduler_config(teacher_dir, solver_steps))
    index = json.loads((teacher_dir / "model_index.json").read_text())
    index["_class_name"] = "LatentConsistencyModelPipeline"
    index["scheduler"] = ["diffusers", "LCMScheduler"]
    write_json(scratch / "model_index.json", index)
    for name in SHARED:
        if link:
            os.symlink(os.path.relpath(teacher_dir.resolve() / name, out.resolve()), scratch / name)
        else:
            shutil.copytree(teacher_dir / name, scratch / name, copy_function=shutil.copy2)
    for item in sorted(scratch.iterdir()):
        dest = out / item.name
        if dest.is_symlink() or dest.is_file():
            dest.unlink()
        elif dest.is_dir():
            shutil.rmtree(dest)
        item.replace(dest)
    shutil.rmtree(scratch)


def _sha256sums(out: Path) -> str:
    from runtime.bundle import sha256_file

    files = sorted(p for p in out.rglob("*") if p.is_file() and CHECKPOINT not in p.parts and p.name != "SHA256SUMS")
    return "".join(f"{sha256_file(p)}  {p.relative_to(out).as_posix()}\n" for p in files)


def _log_header(recipe: DistillRecipe, teacher_dir: Path, device, diffusers_version: str) -> dict:
    import platform

    import torch

    return {
        "status": "started",
        "teacher": str(teacher_dir),
        "device": str(device),
        "versions": {"torch": torch.__version__, "diffusers": diffusers_version, "python": platform.python_version()},
        "recipe": asdict(recipe),
        "checkpoints": [],
    }


def _checkpoint(out, recipe, step, log, losses, student, target, optimizer, text_encoder, tokenizer, teacher_dir, device) -> None:
    """Weights, optimizer and log to ``out/.distill-checkpoint`` (replaced whole), with the checker's score."""
    import torch
    from safetensors.torch import save_file

    log["checkpoints"].append(
        {
            "step": step,
            "mean_loss_last_100": sum(losses[-100:]) / max(1, len(losses[-100:])),
            **probe(target, text_encoder, tokenizer, teacher_dir, recipe, device),
        }
    )
    scratch = out / (CHECKPOINT + ".tmp")
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}, scratch / "student.safetensors")
    save_file({k: v.detach().cpu().contiguous() for k, v in target.state_dict().items()}, scratch / "target.safetensors")
    torch.save(optimizer.state_dict(), scratch / "optimizer.pt")
    write_json(scratch / "state.json", {"step": step, "recipe": asdict(recipe), "log": log, "losses": losses})
    final = out / CHECKPOINT
    if final.exists():
        shutil.rmtree(final)
    scratch.replace(final)
    write_json(out / LOG_NAME, log)


def _load_checkpoint(folder: Path, student, target, optimizer, device):
    import torch
    from safetensors.torch import load_file

    student.load_state_dict(load_file(folder / "student.safetensors"))
    target.load_state_dict(load_file(folder / "target.safetensors"))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=device, weights_only=True))
    state = json.loads((folder / "state.json").read_text())
    return int(state["step"]), state["log"]


def probe(unet, text_encoder, tokenizer, teacher_dir: Path, recipe: DistillRecipe, device) -> dict:
    """The checker's accuracy on ``recipe.probe_prompts`` images of 4 LCM steps at guidance 5."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, LatentConsistencyModelPipeline, LCMScheduler

    from reference.checker import score
    from reference.evaluate import prompt_set

    prompts, expected = prompt_set(recipe.probe_prompts, seed=recipe.seed + 99)
    pipe = LatentConsistencyModelPipeline(
        vae=AutoencoderKL.from_pretrained(teacher_dir / "vae").to(device),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=LCMScheduler.from_config(lcm_scheduler_config(teacher_dir, recipe.solver_steps)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        images = pipe(prompts, num_inference_steps=4, guidance_scale=5.0, generator=generator, output_type="np").images
    accuracy = score(np.asarray(images), expected)
    return {f"accuracy_4_steps_{k}": round(v, 4) for k, v in accuracy.items()}


if __name__ == "__main__":
    main()
