"""Multistep exponential-integrator samplers: DPM-Solver++(2M) and UniPC (x in variance-preserving form)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from .common import Common, Model, begin, predict_x0
from .schedule import NoiseSchedule
from .sigmas import solver_sigmas

if TYPE_CHECKING:
    from typing_extensions import Unpack

DPMPP_2M = dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint")
_NO_FLOW = dict(use_flow_sigmas=(False,), use_dynamic_shifting=(False,))


def sample_dpmpp_2m(model: Model, x: np.ndarray, schedule: NoiseSchedule, steps: int, **kw: Unpack[Common]) -> np.ndarray:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095), as diffusers' DPMSolverMultistepScheduler."""
    return _dpmpp_2m(model, x, schedule, steps, karras=False, **kw)


def sample_dpmpp_2m_karras(model: Model, x: np.ndarray, schedule: NoiseSchedule, steps: int, **kw: Unpack[Common]) -> np.ndarray:
    """DPM-Solver++(2M) on Karras et al. 2022's sigmas (arXiv:2206.00364, eq. 5)."""
    return _dpmpp_2m(model, x, schedule, steps, karras=True, **kw)


def _dpmpp_2m(model: Model, x: np.ndarray, schedule: NoiseSchedule, steps: int, *, karras: bool, **kw: Unpack[Common]) -> np.ndarray:
    """DPM-Solver++(2M), on the Karras sigmas or the config's own spacing (use_karras_sigmas forced either way)."""
    name = "dpmpp_2m_karras" if karras else "dpmpp_2m"
    s = schedule.as_class("DPMSolverMultistepScheduler", **DPMPP_2M, use_karras_sigmas=karras)
    s.require(name, variance_type=(None,), **_NO_FLOW)
    timesteps, sigmas = solver_sigmas(s, steps, name)
    n, config = len(timesteps), s.config
    alpha = 1.0 / np.sqrt(sigmas**2 + 1.0)
    x, run = begin(x, name, steps, abar=lambda i: alpha[i] ** 2, n=n, **kw)
    # diffusers' lower_order_final: a first-order last step for short runs, and always onto sigma 0
    first_order_last = config["euler_at_final"] or (config["lower_order_final"] and n < 15) or config["final_sigmas_type"] == "zero"
    previous = None
    for i in range(run.start, n):
        t = timesteps[i]
        x0 = predict_x0(model, s, x, t, alpha[i] ** 2)
        ratio = sigmas[i + 1] / sigmas[i]  # exp(-h), h the step in log-SNR/2
        update = x0
        if previous is not None and not (i == n - 1 and first_order_last):
            r = math.log(sigmas[i - 1] / sigmas[i]) / math.log(1.0 / ratio)
            update = x0 + (x0 - previous) / (2 * r)
        x = ratio * (alpha[i + 1] / alpha[i]) * x + alpha[i + 1] * (1.0 - ratio) * update
        previous = x0
        x = run.end_step(x, i, t)
    return x


def sample_unipc(model: Model, x: np.ndarray, schedule: NoiseSchedule, steps: int, **kw: Unpack[Common]) -> np.ndarray:
    """UniPC: UniP predictor + UniC corrector (Zhao et al. 2023, arXiv:2302.04867), as diffusers' UniPCMultistepScheduler."""
    s = schedule.as_class("UniPCMultistepScheduler")
    s.require("unipc", predict_x0=(True,), solver_p=(None,), solver_order=(1, 2, 3), **_NO_FLOW)
    timesteps, sigmas = solver_sigmas(s, steps, "unipc")
    n, config = len(timesteps), s.config
    order, bh2 = int(config["solver_order"]), config["solver_type"] != "bh1"  # diffusers maps DPM's types to bh2
    if sigmas[-1] == 0 and not config["lower_order_final"] and min(order, n) > 1:
        raise ValueError(
            "unipc: lower_order_final=False with final_sigmas_type='zero' divides by zero on the last step "
            "(diffusers returns inf/NaN there); set lower_order_final=True or final_sigmas_type='sigma_min'"
        )
    abar = 1.0 / (sigmas**2 + 1)
    x, run = begin(x, "unipc", steps, abar=lambda i: abar[i], n=n, **kw)
    x0s: list[np.ndarray] = []  # denoised predictions, newest last
    x_last, used = x, 1
    for i in range(run.start, n):
        t = timesteps[i]
        x0 = predict_x0(model, s, x, t, abar[i])
        if i > run.start and i - 1 not in config["disable_corrector"]:
            x = _unipc(x_last, x0s, sigmas, i - 1, used, bh2, x0)
        x0s = (x0s + [x0])[-order:]
        used = min(min(order, n - i) if config["lower_order_final"] else order, i - run.start + 1)
        x_last = x
        x = _unipc(x, x0s, sigmas, i, used, bh2)
        x = run.end_step(x, i, t)
    return x


def _unipc(
    x: np.ndarray, x0s: list[np.ndarray], sigmas: np.ndarray, k: int, order: int, bh2: bool, x0_next: np.ndarray | None = None
) -> np.ndarray:
    """UniP (x0_next None) or UniC (x0_next: the model's x0 at k + 1) from sigma k to k + 1, as diffusers' bh updates."""
    alpha = 1.0 / np.sqrt(sigmas**2 + 1.0)
    h_phi_1 = sigmas[k + 1] / sigmas[k] - 1.0  # expm1(-h), h = log(sigma_k / sigma_k+1) the step in log-SNR/2
    x_next: np.ndarray = (h_phi_1 + 1.0) * alpha[k + 1] / alpha[k] * x - alpha[k + 1] * h_phi_1 * x0s[-1]
    if x0_next is None and order == 1:
        return x_next  # also onto sigma 0, where bh1's B(h) is infinite and diffusers' 0 * inf gives NaN
    h = math.log(sigmas[k] / sigmas[k + 1])
    rks = np.array([math.log(sigmas[k] / sigmas[k - j]) / h for j in range(1, order)] + [1.0])
    diffs = [(x0s[-1 - j] - x0s[-1]) / rks[j - 1] for j in range(1, order)]
    b, b_h = _unipc_b(-h, h_phi_1, order, bh2)
    powers = np.vander(rks, increasing=True).T  # powers[i, j] = rks[j] ** i
    if x0_next is None:
        rhos = [0.5] if order == 2 else np.linalg.solve(powers[:-1, :-1], b[:-1])
    else:
        rhos = [0.5] if order == 1 else np.linalg.solve(powers, b)
        diffs = diffs + [x0_next - x0s[-1]]
    corrected: np.ndarray = x_next - alpha[k + 1] * b_h * sum(r * d for r, d in zip(rhos, diffs))
    return corrected


def _unipc_b(hh: float, h_phi_1: float, order: int, bh2: bool) -> tuple[np.ndarray, float]:
    """UniPC's right-hand side b_i = phi_{i+1}(hh) i! / B(h) for i = 1..order, and B(h) (bh1: hh, bh2: e^hh - 1)."""
    b_h = h_phi_1 if bh2 else hh
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return np.array(b), b_h
