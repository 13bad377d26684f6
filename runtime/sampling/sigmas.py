"""Sigma grids for the samplers that step in sigma (x = x0 + sigma * eps, Karras et al. 2022).

Each grid is what the matching diffusers scheduler's set_timesteps builds, in float64:
(timesteps the model sees, sigmas with the final sigma appended).
"""

from __future__ import annotations

import math

import numpy as np

from .schedule import SPACINGS, NoiseSchedule, check_steps, check_timesteps, spaced_timesteps


def training_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma(t) = sqrt((1 - abar) / abar) for every training timestep, ascending in t."""
    sigmas: np.ndarray = np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)
    return sigmas


def sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of `sigmas`, interpolating linearly in log sigma."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    low = np.clip(np.searchsorted(log_train_sigmas, log_sigma, side="right") - 1, 0, len(log_train_sigmas) - 2)
    lo, hi = log_train_sigmas[low], log_train_sigmas[low + 1]
    t: np.ndarray = low + np.clip((lo - log_sigma) / (lo - hi), 0.0, 1.0)
    return t


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (arXiv:2206.00364, eq. 5): evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, n)
    sigmas: np.ndarray = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return sigmas


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def sigma_spacing(schedule: NoiseSchedule, sampler: str) -> str | None:
    """'karras' or 'exponential' where the config turns that spacing on; None keeps the training grid."""
    names = {"use_karras_sigmas": "karras", "use_exponential_sigmas": "exponential", "use_beta_sigmas": "beta"}
    on = [key for key in names if schedule.config.get(key)]
    if len(on) > 1:
        raise ValueError(f"{sampler}: scheduler config turns on {' and '.join(on)}; only one of them can be used")
    schedule.require(sampler, use_beta_sigmas=(False, None))  # needs scipy's beta quantiles; no SD config uses it
    return names[on[0]] if on else None


def _spaced(schedule: NoiseSchedule, kind: str, descending: np.ndarray, n: int) -> np.ndarray:
    # sigma_min/sigma_max: diffusers reads them wherever the config has them (a hasattr check), else the grid's ends
    lo, hi = schedule.hidden("sigma_min"), schedule.hidden("sigma_max")
    lo, hi = descending[-1] if lo is None else lo, descending[0] if hi is None else hi
    return karras_sigmas(lo, hi, n) if kind == "karras" else exponential_sigmas(lo, hi, n)


def euler_sigmas(schedule: NoiseSchedule, steps: int, sampler: str) -> tuple[np.ndarray, np.ndarray]:
    """Euler, Euler ancestral and Heun's grid (diffusers' EulerDiscreteScheduler.set_timesteps)."""
    train = training_sigmas(schedule.alphas_cumprod)
    log_train = np.log(train)
    ts = spaced_timesteps(schedule, steps, discrete=False)
    interpolation = schedule.config.get("interpolation_type", "linear")
    if interpolation == "linear":
        sigmas = np.interp(ts, np.arange(len(train)), train)
    elif interpolation == "log_linear":
        sigmas = np.exp(np.linspace(log_train[-1], log_train[0], steps + 1))  # steps + 1 of them, as diffusers
    else:
        raise ValueError(f"{sampler}: scheduler config interpolation_type {interpolation!r} is not one of 'linear', 'log_linear'")
    kind = sigma_spacing(schedule, sampler)
    if kind:
        sigmas = _spaced(schedule, kind, sigmas, steps)
        ts = sigma_to_t(sigmas, log_train)
    sigmas = np.append(sigmas, _final_sigma(schedule, train[0], sampler))
    if schedule.config.get("timestep_type", "discrete") == "continuous" and schedule.prediction_type == "v_prediction":
        ts = 0.25 * np.log(sigmas[:-1])  # EDM's c_noise, for models trained on it
    return ts.astype(np.float32), sigmas


def init_noise_sigma(schedule: NoiseSchedule, sigmas: np.ndarray) -> float:
    """Scale of the starting noise: sigma_max, or sqrt(sigma_max^2 + 1) under leading spacing (diffusers' quirk)."""
    top = float(sigmas.max())
    return top if schedule.timestep_spacing in ("linspace", "trailing") else math.sqrt(top * top + 1.0)


def _solver_grid(schedule: NoiseSchedule, steps: int, last: int) -> np.ndarray:
    """DPM-Solver and UniPC's integer timesteps: steps + 1 points up to `last`, the final one dropped."""
    n = schedule.num_train_timesteps
    spacing = schedule.timestep_spacing
    ts: np.ndarray
    if spacing == "linspace":
        ts = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ts = (np.arange(steps + 1) * (last // (steps + 1))).round()[::-1][:-1] + schedule.steps_offset
    elif spacing == "trailing":
        ts = np.arange(last, 0, -n / steps).round() - 1
    else:
        raise ValueError(f"scheduler config: timestep_spacing {spacing!r} is not one of {', '.join(SPACINGS)}")
    return ts


def solver_sigmas(schedule: NoiseSchedule, steps: int, sampler: str) -> tuple[np.ndarray, np.ndarray]:
    """DPM-Solver and UniPC's grid: integer timesteps spaced over steps + 1 points, sigmas from them."""
    check_steps(schedule, steps)
    unipc = schedule.class_name == "UniPCMultistepScheduler"
    acp, n = schedule.alphas_cumprod, schedule.num_train_timesteps
    train = training_sigmas(acp)
    log_train = np.log(train)
    last = n
    if not unipc:  # lambda_min_clipped cuts the high-noise end (DPMSolverMultistepScheduler only)
        last = n - int(np.searchsorted(-log_train[::-1], schedule.config["lambda_min_clipped"]))
    ts = _solver_grid(schedule, steps, last)
    kind = sigma_spacing(schedule, sampler) or ("lu" if schedule.config.get("use_lu_lambdas") else None)
    if kind is None:
        check_timesteps(schedule, steps, ts, lambda k: _solver_grid(schedule, k, last))
        sigmas, final = np.interp(ts, np.arange(n), train), train[0]
    else:
        if kind == "lu":  # Lu et al. 2022's steps uniform in log-SNR (DPMSolverMultistepScheduler only)
            sigmas = np.exp(np.linspace(log_train[-1], log_train[0], steps))
        else:
            sigmas = _spaced(schedule, kind, train[::-1], steps)
        ts = sigma_to_t(sigmas, log_train)
        if kind != "exponential" and (unipc or schedule.config["beta_schedule"] != "squaredcos_cap_v2"):
            ts = ts.round()
        final = sigmas[-1] if unipc else train[0]
    sigmas = np.append(sigmas, _final_sigma(schedule, final, sampler))
    return ts.astype(np.int64), sigmas  # astype truncates, as diffusers' cast to int64 does


def _final_sigma(schedule: NoiseSchedule, sigma_min: float, sampler: str) -> float:
    kind = schedule.config.get("final_sigmas_type", "zero")
    if kind not in ("zero", "sigma_min"):
        raise ValueError(f"{sampler}: scheduler config final_sigmas_type {kind!r} is not one of 'zero', 'sigma_min'")
    return 0.0 if kind == "zero" else float(sigma_min)
