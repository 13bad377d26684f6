"""Latent consistency distillation (Luo et al. 2023, arXiv:2310.04378): the pieces of one training step.

Pure functions on tensors, so each can be checked against diffusers' LCMScheduler on its own:
the skipping DDIM schedule the student learns to jump along, the consistency boundary scalings,
the guidance-scale embedding the student takes as input, and the loss of one batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SIGMA_DATA = 0.5  # LCMScheduler's boundary-condition constants
TIMESTEP_SCALING = 10.0


@dataclass(frozen=True)
class Solver:
    """The teacher's DDIM solver over ``n`` evenly skipped timesteps (skip k = 1000 // n).

    ``timesteps[i]`` is where a training pair starts, ``previous[i]`` where one DDIM step of the
    teacher lands; both as LCMScheduler's ``original_inference_steps`` schedule lays them out.
    """

    alphas_cumprod: torch.Tensor  # (1000,) float64
    timesteps: torch.Tensor  # (n,) int64, ascending: k-1, 2k-1, ..., 999
    previous: torch.Tensor  # (n,) int64: 0 below the first, else the timestep k below

    @classmethod
    def from_alphas(cls, alphas_cumprod: torch.Tensor, n: int) -> Solver:
        train = alphas_cumprod.shape[0]
        if not 1 <= n <= train:
            raise ValueError(f"DDIM solver steps must be in [1, {train}], got {n}")
        k = train // n
        timesteps = torch.arange(1, n + 1, dtype=torch.int64) * k - 1
        previous = torch.cat([torch.zeros(1, dtype=torch.int64), timesteps[:-1]])
        return cls(alphas_cumprod.double(), timesteps, previous)

    def to(self, device: torch.device) -> Solver:
        return Solver(self.alphas_cumprod.to(device), self.timesteps.to(device), self.previous.to(device))


def boundary_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip, c_out of the consistency parameterisation f(x, t) = c_skip x + c_out x0(x, t), as LCMScheduler."""
    scaled = t.double() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()
    return c_skip, c_out


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the guidance weight, as diffusers' LCM pipeline (which embeds scale - 1)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    angles = (w.float() * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def _bcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample float64 scalars cast and shaped to multiply ``like``: the one place they meet."""
    return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def x0_and_eps(output: torch.Tensor, x: torch.Tensor, abar: torch.Tensor, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean sample and the noise a UNet output implies at noise level ``abar`` (per sample)."""
    a, s = _bcast(abar.sqrt(), x), _bcast((1 - abar).sqrt(), x)
    if prediction_type == "epsilon":
        return (x - s * output) / a, output
    if prediction_type == "v_prediction":
        return a * x - s * output, a * output + s * x
    raise ValueError(f"prediction type {prediction_type!r} is not supported; expected epsilon or v_prediction")


def consistency(model_x0: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """f(x, t) = c_skip(t) x + c_out(t) x0: equals x at t = 0, the model's x0 at high t."""
    c_skip, c_out = boundary_scalings(t)
    return _bcast(c_skip, x) * x + _bcast(c_out, x) * model_x0


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, abar_prev: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2020, arXiv:2010.02502) to the level ``abar_prev``."""
    return _bcast(abar_prev.sqrt(), x0) * x0 + _bcast((1 - abar_prev).sqrt(), x0) * eps


def huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Pseudo-Huber distance, mean over the batch (LCM's choice over L2: robust to outlier pairs)."""
    return (((a.float() - b.float()) ** 2).flatten(1).mean(1) + c**2).sqrt().sub(c).mean()


@dataclass(frozen=True)
class Batch:
    """One training batch: clean latents, their caption context and the empty prompt's."""

    z0: torch.Tensor  # (B, C, H, W), scaled as the UNet sees them
    context: torch.Tensor  # (B, 77, D)
    empty: torch.Tensor  # (B, 77, D)


def lcd_loss(
    student, target, teacher, batch: Batch, solver: Solver, w: torch.Tensor, embed_dim: int, prediction_type: str, huber_c: float
) -> torch.Tensor:
    """One consistency-distillation loss: the student at t_{n+k} against the EMA target at t_n,
    where x_{t_n} comes from one CFG-guided DDIM step of the teacher (w the CFG scale, per sample)."""
    n = batch.z0.shape[0]
    index = torch.randint(len(solver.timesteps), (n,), device=batch.z0.device)
    t, t_prev = solver.timesteps[index], solver.previous[index]
    abar, abar_prev = solver.alphas_cumprod[t], solver.alphas_cumprod[t_prev]
    noise = torch.randn_like(batch.z0)
    x_t = _bcast(abar.sqrt(), batch.z0) * batch.z0 + _bcast((1 - abar).sqrt(), batch.z0) * noise
    w_emb = guidance_embedding(w - 1.0, embed_dim)  # as diffusers' pipeline: it embeds scale - 1

    out = student(x_t, t, encoder_hidden_states=batch.context, timestep_cond=w_emb).sample
    prediction = consistency(x0_and_eps(out, x_t, abar, prediction_type)[0], x_t, t)

    with torch.no_grad():
        both = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), encoder_hidden_states=torch.cat([batch.context, batch.empty])).sample
        cond, uncond = both.chunk(2)
        guided = uncond + _bcast(w.double(), uncond) * (cond - uncond)
        x0, eps = x0_and_eps(guided, x_t, abar, prediction_type)
        x_prev = ddim_step(x0, eps, abar_prev)
        out_prev = target(x_prev, t_prev, encoder_hidden_states=batch.context, timestep_cond=w_emb).sample
        aim = consistency(x0_and_eps(out_prev, x_prev, abar_prev, prediction_type)[0], x_prev, t_prev)
    return huber(prediction, aim, huber_c)


@torch.no_grad()
def ema_update(target: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """target <- decay * target + (1 - decay) * student, parameter by parameter."""
    pairs = list(zip(target.parameters(), student.parameters()))
    torch._foreach_lerp_([p for p, _ in pairs], [q.detach() for _, q in pairs], 1.0 - decay)
