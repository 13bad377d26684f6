"""The training recipe, phase by phase: data, VAE, latents, then text encoder + UNet jointly.

``run`` drives them under one optional time limit and leaves a loadable folder after every
phase that produces weights (the VAE alone, then the whole pipeline, refreshed periodically).
Given ``Setup.init`` (a saved model), it skips the VAE and continues training that model's text
encoder and UNet instead of fresh ones: the second stage of the shipped recipe.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from diffusers import DDIMScheduler

from reference.architecture import (
    CLIP_DIR,
    WEIGHT_FILES,
    build_text_encoder,
    build_unet,
    build_vae,
    scheduler_config,
    size_report,
)
from reference.calibration import write as write_calibration_prompts
from reference.caption_bank import CaptionSampler, build_caption_bank, load_tokenizer
from reference.dataset import make_dataset
from reference.ema import EMA
from reference.model_folder import save_pipeline, save_vae, weight_files, write_json
from reference.pacing import PhaseClock, Ticker, learning_rate, say
from reference.presets import Recipe
from reference.probe import probe_ids, sensitivity

LOG_NAME = "training_log.json"
LATENT_BATCH = 512
SAVE_RESERVE_S = 15.0  # kept free at the end of a time-limited run for the final save


@dataclass(frozen=True)
class Setup:
    """Where and how a run trains."""

    recipe: Recipe
    out: Path
    device: torch.device
    amp: bool
    tokenizer_dir: Path = CLIP_DIR
    init: Path | None = None  # a saved model to continue from (its VAE kept as it is)


class LossLog:
    """Per-step losses, kept on the device and fetched in batches to avoid a sync per step.

    Each fetch also appends ``(step, seconds, mean loss since the last fetch)`` to ``curve``.
    """

    def __init__(self):
        self.values: list[float] = []
        self.curve: list[tuple[int, float, float]] = []
        self._pending: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor) -> None:
        self._pending.append(loss.detach().float())

    def flush(self, step: int, seconds: float) -> float:
        """Fetch pending losses; return the mean of those fetched (nan when none)."""
        if not self._pending:
            return float("nan")
        fetched = torch.stack(self._pending).cpu().tolist()
        self._pending = []
        self.values.extend(fetched)
        mean = float(np.mean(fetched))
        self.curve.append((step, round(seconds, 2), round(mean, 6)))
        return mean


class IndexStream:
    """Fixed-size batches of dataset indices, each epoch a fresh permutation, drawn on the device."""

    def __init__(self, n: int, batch_size: int, device: torch.device):
        self.n, self.batch_size, self.device = n, batch_size, device
        self._queue = torch.empty(0, dtype=torch.long, device=device)

    def next(self) -> torch.Tensor:
        while self._queue.numel() < self.batch_size:
            self._queue = torch.cat([self._queue, torch.randperm(self.n, device=self.device)])
        batch, self._queue = self._queue[: self.batch_size], self._queue[self.batch_size :]
        return batch


def autocast(setup: Setup):
    """bf16 autocast on the training device when enabled; master weights stay fp32."""
    return torch.autocast(setup.device.type, dtype=torch.bfloat16, enabled=setup.amp)


def adamw(params: list[torch.nn.Parameter], recipe: Recipe, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW; the fused CUDA kernel where available, since small models are launch-bound there."""
    return torch.optim.AdamW(
        params, lr=lr, betas=(0.9, 0.999), weight_decay=recipe.weight_decay, fused=device.type == "cuda"
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """(n, 64, 64, 3) uint8 -> (n, 3, 64, 64) float32 in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def vae_loss(
    recon: torch.Tensor,
    target: torch.Tensor,
    kl: torch.Tensor,
    kl_weight: float,
    edge_weight: float,
    object_weight: float = 0.0,
) -> torch.Tensor:
    """L1 + L1 of image gradients (keeps shape edges crisp) + KL, weighted per pixel like SD's VAE.

    ``object_weight`` up-weights pixels unlike the image's background (the object): it covers
    5-15% of the image, and without it L1 settles for desaturated objects, losing the colour.
    """
    l1 = (recon - target).abs().mean()
    if object_weight:
        on_object = ((target - border_median(target)).abs().sum(dim=1, keepdim=True) > 0.1).float()
        l1 = l1 + object_weight * ((recon - target).abs() * on_object).mean()
    edges = (recon.diff(dim=-1) - target.diff(dim=-1)).abs().mean() + (
        recon.diff(dim=-2) - target.diff(dim=-2)
    ).abs().mean()
    kl_per_pixel = kl.float().mean() / target[0].numel()
    return l1 + edge_weight * edges + kl_weight * kl_per_pixel


def border_median(images: torch.Tensor) -> torch.Tensor:
    """(n, c, 1, 1) per-channel median of each image's one-pixel border: its background colour.

    Not a corner pixel: a large object in a corner may cover it, but never most of the border.
    """
    border = torch.cat(
        [images[..., 0, :], images[..., -1, :], images[..., 1:-1, 0], images[..., 1:-1, -1]], dim=-1
    )
    return border.median(dim=-1).values[..., None, None]


def make_images(setup: Setup) -> tuple[np.ndarray, list]:
    """The training set, generated in ``recipe.workers`` processes."""
    r = setup.recipe
    workers = r.workers or os.cpu_count() or 1
    say(f"[data] generating {r.n_images} images with {workers} workers")
    return make_dataset(r.n_images, r.seed, workers=workers)


def train_vae(setup: Setup, images: torch.Tensor, clock: PhaseClock) -> tuple[torch.nn.Module, LossLog, int]:
    """Train the AutoencoderKL on reconstruction + KL; returns it, its losses and the steps taken."""
    r, device = setup.recipe, setup.device
    vae = build_vae().to(device).train()
    optimizer = adamw(list(vae.parameters()), r, r.vae_lr, device)
    batches = IndexStream(images.shape[0], r.vae_batch_size, device)
    losses, ticker, step = LossLog(), Ticker(r.log_every_s), 0
    while not clock.done(step):
        lr = learning_rate(r.vae_lr, step, clock.progress(step), r.warmup_steps, r.min_lr_ratio)
        set_lr(optimizer, lr)
        x = to_unit_range(images[batches.next()])
        with autocast(setup):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
        loss = vae_loss(recon.float(), x, posterior.kl(), r.kl_weight, r.edge_weight, r.object_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), r.grad_clip)
        optimizer.step()
        losses.add(loss)
        step += 1
        if ticker.due():
            _progress("vae", step, clock, losses.flush(step, clock.elapsed()), lr)
    losses.flush(step, clock.elapsed())
    return vae.eval(), losses, step


@torch.no_grad()
def encode_latents(
    setup: Setup, vae: torch.nn.Module, images: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Posterior mean and std of every image (fp32, on the device) and SD's scaling factor:
    ``scale`` where given (a continued UNet learned its init's), else 1 / std(latents)."""
    means, stds = [], []
    for start in range(0, images.shape[0], LATENT_BATCH):
        posterior = vae.encode(to_unit_range(images[start : start + LATENT_BATCH])).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    mean, std = torch.cat(means), torch.cat(stds)
    if scale is not None:
        return mean, std, scale
    sample = (mean + std * torch.randn_like(mean)).double()
    return mean, std, float(1.0 / sample.std())


def train_text_unet(
    setup: Setup,
    latents: tuple[torch.Tensor, torch.Tensor, float],
    captions: CaptionSampler,
    clock: PhaseClock,
    checkpoint,
    models: tuple[torch.nn.Module, torch.nn.Module] | None = None,
) -> tuple[EMA, EMA, LossLog, int]:
    """Train text encoder + UNet jointly on DDPM noise prediction; returns their EMAs, losses, steps.

    ``models`` (text encoder, UNet) to continue training, fresh ones when None. Timesteps are
    uniform over [recipe.t_min, 1000). ``checkpoint(text_ema, unet_ema)`` is called every
    ``recipe.checkpoint_every_s`` seconds.
    """
    r, device = setup.recipe, setup.device
    mean, std, scale = latents
    text_encoder, unet = models or (build_text_encoder(), build_unet())
    text_encoder, unet = text_encoder.to(device).train(), unet.to(device).train()
    text_ema, unet_ema = EMA(text_encoder, r.ema_decay), EMA(unet, r.ema_decay)
    params = list(text_encoder.parameters()) + list(unet.parameters())
    optimizer = adamw(params, r, r.unet_lr, device)
    abar = DDIMScheduler(**scheduler_config()).alphas_cumprod.to(device=device, dtype=torch.float32)
    batches = IndexStream(mean.shape[0], r.batch_size, device)
    losses, ticker, step = LossLog(), Ticker(r.log_every_s), 0
    saver = Ticker(r.checkpoint_every_s) if r.checkpoint_every_s else None
    while not clock.done(step):
        lr = learning_rate(r.unet_lr, step, clock.progress(step), r.warmup_steps, r.min_lr_ratio)
        set_lr(optimizer, lr)
        index = batches.next()
        z0 = (mean[index] + std[index] * torch.randn_like(mean[index])) * scale
        noise = torch.randn_like(z0)
        t = torch.randint(r.t_min, abar.shape[0], (z0.shape[0],), device=device)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1.0 - a).sqrt() * noise
        with autocast(setup):
            context = text_encoder(input_ids=captions(index)).last_hidden_state
            prediction = unet(zt, t, encoder_hidden_states=context).sample
        loss = F.mse_loss(prediction.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, r.grad_clip)
        optimizer.step()
        text_ema.update()
        unet_ema.update()
        losses.add(loss)
        step += 1
        if ticker.due():
            _progress("unet", step, clock, losses.flush(step, clock.elapsed()), lr)
        if saver is not None and saver.due():
            checkpoint(text_ema, unet_ema)
            say(f"[unet] checkpoint saved at step {step}")
    losses.flush(step, clock.elapsed())
    return text_ema, unet_ema, losses, step


def run(setup: Setup, started: float) -> dict:
    """Train every phase into ``setup.out`` and return the training log (also written beside the model)."""
    r, out = setup.recipe, setup.out
    out.mkdir(parents=True, exist_ok=True)
    deadline = None if r.time_limit is None else started + r.time_limit - min(SAVE_RESERVE_S, 0.1 * r.time_limit)
    tokenizer = load_tokenizer(setup.tokenizer_dir)
    # Data first: the generator's worker processes are forked, best before CUDA is initialised.
    t = time.perf_counter()
    images_np, attributes = make_images(setup)
    bank = build_caption_bank(tokenizer, attributes, r.captions_per_combination, r.seed + 1)
    data_log = {"seconds": time.perf_counter() - t, "n_images": len(attributes), "distinct_captions": len(bank.token_ids)}
    say(f"[data] {len(attributes)} images, {len(bank.token_ids)} distinct captions in {data_log['seconds']:.1f}s")

    _configure_torch(setup)
    log = _log_header(setup)
    log["phases"]["data"] = data_log
    images = torch.from_numpy(images_np).to(setup.device)

    if setup.init is None:
        clock = PhaseClock(r.vae_steps, _seconds_left(deadline, r.vae_time_share))
        vae, vae_losses, vae_steps = train_vae(setup, images, clock)
        log["phases"]["vae"] = _phase_log(clock, vae_steps, vae_losses)
        models, init_scale = None, None
    else:
        vae, init_scale, models, log["init"] = load_init(setup.init, setup.device)
        say(f"[init] continuing from {setup.init}: its VAE kept, its text encoder and UNet trained further")
    t = time.perf_counter()
    latents = encode_latents(setup, vae, images, init_scale)
    scale = latents[2]
    del images
    save_vae(vae, scale, out)
    log["phases"]["latents"] = {"seconds": time.perf_counter() - t, "scaling_factor": scale}
    write_json(out / LOG_NAME, _finish(log, "vae saved", out, started))
    say(f"[vae] saved {out / 'vae'}; scaling_factor {scale:.4f}")

    ids, abar = probe_ids(tokenizer), DDIMScheduler(**scheduler_config()).alphas_cumprod
    probes: list[dict] = []

    def checkpoint(text_ema: EMA, unet_ema: EMA) -> None:
        save_pipeline(vae, scale, text_ema.shadow, unet_ema.shadow, out, setup.tokenizer_dir)
        write_calibration_prompts(out)  # the model's own int8 calibration prompts, as data export reads
        # whether the saved weights listen to each caption word, position above all (see reference.probe)
        with autocast(setup):
            scores = sensitivity(text_ema.shadow, unet_ema.shadow, ids, abar, tuple(latents[0].shape[1:]))
        probes.append({"seconds": round(time.perf_counter() - started, 1), "updates": unet_ema.updates, **scores})
        say("[probe] attribute sensitivity " + "  ".join(f"{k} {v:.3f}" for k, v in scores.items()))

    clock = PhaseClock(r.unet_steps, _seconds_left(deadline, 1.0))
    captions = CaptionSampler(bank, r.caption_dropout, setup.device)
    text_ema, unet_ema, unet_losses, unet_steps = train_text_unet(setup, latents, captions, clock, checkpoint, models)
    checkpoint(text_ema, unet_ema)
    log["phases"]["unet"] = {**_phase_log(clock, unet_steps, unet_losses), "attribute_sensitivity": probes}
    log = _finish(log, "complete", out, started)
    write_json(out / LOG_NAME, log)
    for name, size in log["files"].items():
        say(f"[saved] {name}: {size / 1e6:.2f} MB")
    say(f"[saved] {out}: {log['total_weight_bytes'] / 1e6:.2f} MB of weights, {log['total_seconds']:.0f}s in all")
    return log


def load_init(folder: Path, device: torch.device) -> tuple[torch.nn.Module, float, tuple[torch.nn.Module, torch.nn.Module], dict]:
    """A saved model's VAE (eval) and latent scaling factor, (text encoder, UNet) to train further,
    and what to log about it.

    The weights are loaded into this recipe's architecture, so a model of other sizes is refused
    (continuing it would not reproduce anything the README describes).
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    models = {"vae": build_vae(), "text_encoder": build_text_encoder(), "unet": build_unet()}
    for name, model in models.items():
        try:
            model.load_state_dict(load_file(folder / WEIGHT_FILES[name]))
        except RuntimeError as error:
            raise ValueError(
                f"--init {folder}: its {name} is not this recipe's architecture (reference/architecture.py): {error}"
            ) from None
    scale = float(json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"])
    previous = folder / LOG_NAME
    return models["vae"].to(device).eval(), scale, (models["text_encoder"], models["unet"]), {
        "model": str(folder),
        "training_log": json.loads(previous.read_text()) if previous.is_file() else None,
    }


def _configure_torch(setup: Setup) -> None:
    torch.manual_seed(setup.recipe.seed)
    if setup.device.type == "cuda":
        # Fixed shapes throughout, so cuDNN's autotuning pays off; TF32 for what runs outside autocast.
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")


def _seconds_left(deadline: float | None, share: float) -> float | None:
    """``share`` of the time until ``deadline`` (None without a deadline)."""
    if deadline is None:
        return None
    return max(0.0, deadline - time.perf_counter()) * share


def _progress(phase: str, step: int, clock: PhaseClock, loss: float, lr: float) -> None:
    rate = step / max(clock.elapsed(), 1e-9)
    budget = f"/{clock.seconds:.0f}s" if clock.seconds is not None else "s"
    say(
        f"[{phase}] step {step}/{clock.max_steps}  loss {loss:.4f}  lr {lr:.2e}  "
        f"{rate:.1f} it/s  {clock.elapsed():.0f}{budget}"
    )


def _phase_log(clock: PhaseClock, steps: int, losses: LossLog) -> dict:
    seconds = clock.elapsed()
    return {
        "seconds": seconds,
        "steps": steps,
        "max_steps": clock.max_steps,
        "time_budget_s": clock.seconds,
        "stopped_by": clock.stopped_by(steps),
        "steps_per_s": steps / max(seconds, 1e-9),
        "curve_step_seconds_loss": losses.curve,
        "losses": [round(v, 6) for v in losses.values],
    }


def _log_header(setup: Setup) -> dict:
    device = setup.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report = size_report()
    for line in report.lines():
        say(f"[model] {line}")
    return {
        "status": "started",
        "device": f"{device.type} ({name})",
        "amp_bf16": setup.amp,
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "recipe": setup.recipe.to_dict(),
        "parameters": report.params,
        "phases": {},
    }


def _finish(log: dict, status: str, out: Path, started: float) -> dict:
    files = weight_files(out)
    return {
        **log, "status": status, "files": files, "total_weight_bytes": sum(files.values()), "total_seconds": time.perf_counter() - started
    }
