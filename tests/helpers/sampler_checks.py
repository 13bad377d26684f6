"""What the sampler tests share: the toy network, the diffusers scheduler each sampler reproduces,
the scheduler configs they run on, and the helpers that set up and compare a diffusers loop."""

from __future__ import annotations

import numpy as np


def toy_model(x: np.ndarray, t: float) -> np.ndarray:
    """A deterministic stand-in network: any smooth function of (x, t) exercises the update rule."""
    return (np.tanh(x * 0.7) * np.cos(t / 300.0) + 0.1 * np.sin(t / 50.0)).astype(np.float32)


DPMPP_2M = dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint")
# Our sampler -> the diffusers scheduler it reproduces, and the options it fixes (from_config kwargs).
REFERENCE = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", dict(DPMPP_2M, use_karras_sigmas=False)),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", dict(DPMPP_2M, use_karras_sigmas=True)),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}

# SD 1.5's scheduler_config.json as shipped (a PNDMScheduler config saved by diffusers 0.6: no spacing key)
SD15_JSON = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None, clip_sample=False,
)  # fmt: skip
CONFIGS = {
    "sd15-leading-eps": dict(SD15_JSON, timestep_spacing="leading", prediction_type="epsilon"),
    "linear-trailing-v": dict(
        beta_schedule="linear", timestep_spacing="trailing", prediction_type="v_prediction", clip_sample=False, skip_prk_steps=True
    ),
    "zero-snr-trailing-v": dict(SD15_JSON, timestep_spacing="trailing", prediction_type="v_prediction", rescale_betas_zero_snr=True),
    "sd15-as-shipped": SD15_JSON,
    "cosine-linspace-sample": dict(
        beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace", prediction_type="sample", clip_sample=False
    ),
}

NO_SAMPLE_PREDICTION = {"pndm", "euler_a"}  # diffusers refuses prediction_type='sample' there too
SHAPE = (2, 4, 8, 8)


def use_precise_schedule(ref, alphas_cumprod):
    """Swap a diffusers scheduler's alphas_cumprod (and what its __init__ derived from it) for ours."""
    import torch

    acp = torch.from_numpy(alphas_cumprod)
    ref.alphas_cumprod = acp
    if hasattr(ref, "final_alpha_cumprod"):
        ref.final_alpha_cumprod = torch.tensor(1.0 if ref.config.set_alpha_to_one else alphas_cumprod[0], dtype=torch.float64)
    if hasattr(ref, "lambda_t"):
        ref.alpha_t, ref.sigma_t = acp.sqrt(), (1 - acp).sqrt()
        ref.lambda_t = ref.alpha_t.log() - ref.sigma_t.log()


def full_step_done(name, ref, steps):
    """Heun and PNDM take several scheduler calls per step; the others one."""
    if name == "heun":
        return ref.state_in_first_order or ref.step_index == len(ref.timesteps)
    if name == "pndm" and not ref.config.skip_prk_steps:
        return ref.counter > 12 or ref.counter % 4 == 0
    if name == "pndm":
        return ref.counter >= 2 or steps == 1  # PLMS's first step is two calls
    return True


def assert_same_steps(ours, theirs, what):
    """Equal to 1e-5 relative to the step's scale: the larger of its input and output latents (step 0: its output)."""
    assert len(ours) == len(theirs), f"{what}: {len(ours)} steps, diffusers {len(theirs)}"
    for i, (a, b) in enumerate(zip(ours, theirs)):
        scale = max(1.0, float(np.abs(b).max()), float(np.abs(theirs[i - 1]).max()) if i else 0.0)
        err = float(np.abs(a - b).max()) / scale
        assert err <= 1e-5, f"{what}: step {i} differs by {err:.2e} (relative)"
