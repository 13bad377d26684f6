"""Samplers over the discrete training timesteps: DDPM, DDIM, PNDM (x in variance-preserving form)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .common import Common, Model, Run, begin, clean_x0, evaluate, predict_x0, require_rng, step_done, to_x0_eps
from .schedule import NoiseSchedule, spaced_timesteps

if TYPE_CHECKING:
    from typing_extensions import Unpack

# Adams-Bashforth weights, newest model output first (PLMS's linear multistep of order 1-4).
ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def sample_ddpm(model: Model, x: np.ndarray, schedule: NoiseSchedule, steps: int, **kw: Unpack[Common]) -> np.ndarray:
    """DDPM ancestral sampling (Ho et al. 2020, arXiv:2006.11239), step for step as diffusers' DDPMScheduler."""
    s = schedule.as_class("DDPMScheduler")
    s.require("ddpm", variance_type=("fixed_small", "fixed_small_log", "fixed_large"))
    require_rng(kw.get("rng"), "ddpm")
    acp, timesteps = s.alphas_cumprod, spaced_timesteps(s, steps)
    x, run = begin(x, "ddpm", steps, abar=lambda i: acp[timesteps[i]], **kw)
    for i in range(run.start, steps):
        t = timesteps[i]
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1  # the next listed timestep, unlike DDIM
        abar, abar_prev = acp[t], (acp[prev] if prev >= 0 else 1.0)
        beta = 1.0 - abar / abar_prev
        x0 = predict_x0(model, s, x, t, abar)
        x = (abar_prev**0.5 * beta * x0 + (1.0 - beta) ** 0.5 * (1.0 - abar_prev) * x) / (1.0 - abar)
        if t > 0:
            small = max((1.0 - abar_prev) / (1.0 - abar) * beta, 1e-20)
            x = x + (beta if s.config["variance_type"] == "fixed_large" else small) ** 0.5 * run.noise(x)
        x = run.end_step(x, i, t)
    return x


def sample_ddim(model: Model, x: np.ndarray, schedule: NoiseSchedule, steps: int, *, eta: float = 0.0, **kw: Unpack[Common]) -> np.ndarray:
    """DDIM (Song et al. 2020, arXiv:2010.02502), step for step as diffusers' DDIMScheduler."""
    s = schedule.as_class("DDIMScheduler")
    if eta < 0:
        raise ValueError(f"ddim: eta must be >= 0 (0 deterministic, 1 DDPM-like), got {eta}")
    if eta > 0:
        require_rng(kw.get("rng"), "ddim with eta > 0")
    acp, timesteps, stride = s.alphas_cumprod, spaced_timesteps(s, steps), s.num_train_timesteps // steps
    x, run = begin(x, "ddim", steps, abar=lambda i: acp[timesteps[i]], **kw)
    for i in range(run.start, steps):
        t = timesteps[i]
        prev = t - stride  # diffusers steps back by a fixed stride, not to the next listed timestep
        abar, abar_prev = acp[t], (acp[prev] if prev >= 0 else s.final_alpha_cumprod)
        x0, eps = to_x0_eps(evaluate(model, x, t), x, abar, s.prediction_type)
        x0 = clean_x0(x0, s)  # eps stays unclipped, as diffusers' default step()
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)) ** 0.5
        x = abar_prev**0.5 * x0 + (1 - abar_prev - sigma**2) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * run.noise(x)
        x = run.end_step(x, i, t)
    return x


def sample_pndm(model: Model, x: np.ndarray, schedule: NoiseSchedule, steps: int, **kw: Unpack[Common]) -> np.ndarray:
    """PNDM (Liu et al. 2022, arXiv:2202.09778): PLMS, or pseudo Runge-Kutta first where skip_prk_steps is off."""
    s = schedule.as_class("PNDMScheduler")
    s.require("pndm", prediction_type=("epsilon", "v_prediction"))
    prk = not s.config["skip_prk_steps"]
    if prk and steps < 4:
        raise ValueError(
            f"pndm with skip_prk_steps=False needs at least 4 steps (its Runge-Kutta warm-up takes 3; diffusers fails "
            f"below 4), got {steps}: use more steps, or skip_prk_steps=True in the scheduler config for PLMS"
        )
    acp, timesteps, stride = s.alphas_cumprod, spaced_timesteps(s, steps), s.num_train_timesteps // steps
    listed = timesteps if prk else np.concatenate([timesteps[:2], timesteps[1:]])  # PLMS's list: see _plms
    x, run = begin(x, "pndm", steps, abar=lambda i: acp[listed[i]], n=len(listed), **kw)
    if not prk:
        return _plms(model, s, x, run, listed, stride)
    if run.init is not None or run.known is not None:
        raise ValueError(
            "pndm: img2img and inpainting need skip_prk_steps=True in the scheduler config (PLMS, as SD 1.x ships it); "
            "the Runge-Kutta warm-up only starts from pure noise. Or pick another sampler"
        )
    history: list[np.ndarray] = []  # the first model output of every step, newest last
    for i, t in enumerate(timesteps):
        out = evaluate(model, x, t)
        if i < 3:
            x = _prk_step(model, s, x, t, timesteps[i + 1], stride // 2, out)
            history.append(out)
        else:
            history = (history + [out])[-4:]
            x = _transfer(s, x, t, t - stride, _adams_bashforth(history))
        x = run.end_step(x, i, t)
    return x


def _plms(model: Model, s: NoiseSchedule, x: np.ndarray, run: Run, listed: np.ndarray, stride: int) -> np.ndarray:
    """PLMS over diffusers' timestep list, which holds the second timestep twice ([t0, t1, t1, t2, ...]).

    Its first two entries are the warm-up: a trial step from t0, then the mean of both outputs
    taken from t1 + stride to t1. img2img skips `start` entries of that list, as diffusers does, so
    a shortened run begins with the same warm-up wherever it lands.
    """
    start = run.start
    history: list[np.ndarray] = []  # model outputs, newest last; the warm-up's second output is not kept
    for i in range(start, run.n):
        t, j = listed[i], i - start
        out = evaluate(model, x, t)
        if j == 0:
            first, x_first = out, x
            x = _transfer(s, x, t, t - stride, out)  # the trial step (the whole run when there is one step)
            history = [out]
        elif j == 1:
            x = _transfer(s, x_first, t + stride, t, (out + first) / 2)
        else:
            history = (history + [out])[-4:]
            x = _transfer(s, x, t, t - stride, _adams_bashforth(history))
        x = run.reimpose(x, i)
        if j > 0 or run.n - start == 1:  # the warm-up's two entries are one step
            x = step_done(x, start + max(j - 1, 0), t, run.callback)
    return x


def _adams_bashforth(history: list[np.ndarray]) -> np.ndarray:
    combined: np.ndarray = sum(w * e for w, e in zip(ADAMS_BASHFORTH[len(history)], reversed(history)))
    return combined


def _prk_step(model: Model, s: NoiseSchedule, x: np.ndarray, t: int, t_next: int, half: int, out: np.ndarray) -> np.ndarray:
    """One pseudo Runge-Kutta step t -> t_next with diffusers' midpoint timesteps (t - half, then t_next + half)."""
    mid = t_next + half
    e2 = evaluate(model, _transfer(s, x, t, t - half, out), mid)
    e3 = evaluate(model, _transfer(s, x, t, mid, e2), mid)
    e4 = evaluate(model, _transfer(s, x, t, t_next, e3), t_next)
    return _transfer(s, x, t, t_next, out / 6 + e2 / 3 + e3 / 3 + e4 / 6)


def _transfer(s: NoiseSchedule, x: np.ndarray, t: int, prev: int, out: np.ndarray) -> np.ndarray:
    """PNDM's transfer from t to prev given a (combined) model output (Liu et al. 2022, eq. 11)."""
    acp = s.alphas_cumprod
    a, a_prev = acp[t], (acp[prev] if prev >= 0 else s.final_alpha_cumprod)
    eps = a**0.5 * out + (1 - a) ** 0.5 * x if s.prediction_type == "v_prediction" else out
    denom = a * (1 - a_prev) ** 0.5 + (a * (1 - a) * a_prev) ** 0.5
    x_prev: np.ndarray = (a_prev / a) ** 0.5 * x - (a_prev - a) * eps / denom
    return x_prev
