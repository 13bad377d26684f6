"""The numpy schedule and DDIM sampler against diffusers' DDIMScheduler, step for step."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.sampling import noise_schedule, sample_ddim, spaced_timesteps
from tests.helpers.sampler_checks import toy_model

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
CONFIGS = {
    "sd15-leading-eps": SD15,
    "linear-trailing-v": dict(beta_schedule="linear", timestep_spacing="trailing", prediction_type="v_prediction", clip_sample=False),
    "zero-snr-trailing-v": dict(SD15, timestep_spacing="trailing", prediction_type="v_prediction", rescale_betas_zero_snr=True),
    "cosine-linspace-clipped": dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace", clip_sample=True),
    "sample-prediction": dict(SD15, prediction_type="sample"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("steps", [1, 4, 7, 50])
def test_ddim_matches_diffusers_step_for_step(name, steps):
    import torch
    from diffusers import DDIMScheduler

    config = CONFIGS[name]
    ref = DDIMScheduler(**config)
    ref.set_timesteps(steps)
    schedule = noise_schedule(ref.config)
    assert np.array_equal(spaced_timesteps(schedule, steps), ref.timesteps.numpy())
    # diffusers computes in float32
    np.testing.assert_allclose(schedule.alphas_cumprod, ref.alphas_cumprod.double().numpy(), rtol=2e-6, atol=1e-9)

    x0 = np.random.default_rng(0).standard_normal((2, 4, 8, 8), dtype=np.float32)
    ours = []
    sample_ddim(toy_model, x0.copy(), schedule, steps, callback=lambda i, t, x: ours.append(x.copy()))
    x = torch.from_numpy(x0.copy())
    for i, t in enumerate(ref.timesteps):
        out = torch.from_numpy(toy_model(x.numpy(), float(t)))
        x = ref.step(out, t, x).prev_sample
        scale = max(1.0, float(x.abs().max()))
        assert np.abs(ours[i] - x.numpy()).max() / scale <= 1e-5, f"step {i} (t={int(t)})"


def test_eta_needs_rng_and_adds_noise():
    schedule = noise_schedule(SD15)
    x = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(ValueError, match="eta > 0 draws noise"):
        sample_ddim(toy_model, x, schedule, 3, eta=1.0)
    a = sample_ddim(toy_model, x, schedule, 3, eta=1.0, rng=np.random.default_rng(0))
    b = sample_ddim(toy_model, x, schedule, 3, eta=1.0, rng=np.random.default_rng(0))
    c = sample_ddim(toy_model, x, schedule, 3, eta=0.0)
    assert np.array_equal(a, b) and np.abs(a - c).max() > 1e-3


def test_bad_schedule_configs():
    with pytest.raises(ValueError, match="beta_schedule 'exp'"):
        noise_schedule({"beta_schedule": "exp"})
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        noise_schedule({"prediction_type": "flow"})
    with pytest.raises(ValueError, match="timestep_spacing 'karras'"):
        spaced_timesteps(noise_schedule({"timestep_spacing": "karras"}), 10)
    with pytest.raises(ValueError, match="between 1 and the model's 1000"):
        spaced_timesteps(noise_schedule({}), 1001)
