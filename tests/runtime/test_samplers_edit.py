"""img2img and inpainting through every sampler against diffusers' scheduler loop, step for step.

diffusers' pipelines start an edit by slicing the scheduler's timesteps at `start * order`, setting
the begin index, noising the image latents with add_noise at the first kept timestep, and (for an
ordinary UNet inpainting) blending the known region back in, re-noised to the next timestep, after
every step (clean after the last). The loop below does exactly that on the same closure model.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from runtime.sampling import SAMPLERS, Known, get_sampler, noise_schedule
from tests.helpers.sampler_checks import (
    CONFIGS,
    NO_SAMPLE_PREDICTION,
    REFERENCE,
    SHAPE,
    assert_same_steps,
    full_step_done,
    toy_model,
    use_precise_schedule,
)

INIT = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32) * 0.8  # the image's latents
MASK = (np.random.default_rng(2).random((SHAPE[0], 1, *SHAPE[2:])) < 0.4).astype(np.float32)  # 1 = repaint


def mixing_model(x: np.ndarray, t: float) -> np.ndarray:
    """toy_model plus a neighbour's value: the kept region must reach the repainted one, as through a real UNet."""
    return (toy_model(x, t) + 0.3 * np.tanh(np.roll(x, 1, axis=-1))).astype(np.float32)


def unit_noise() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)


def run_ours(name, config, steps, start, *, img2img, inpaint, seed=7):
    states = []
    record = lambda i, t, x: states.append(x.copy())  # noqa: E731
    edits = {}
    if img2img:
        edits["init"] = INIT
    if inpaint:
        edits["known"] = Known(INIT, MASK)
    sampler, rng = get_sampler(name), np.random.default_rng(seed)
    sampler(mixing_model, unit_noise(), noise_schedule(config), steps, start=start, rng=rng, callback=record, **edits)
    return states


def run_diffusers(name, config, steps, start, monkeypatch, *, img2img, inpaint, seed=7):
    import diffusers
    import torch

    class_name, fixed = REFERENCE[name]
    ref = getattr(diffusers, class_name).from_config(config, **fixed)
    use_precise_schedule(ref, noise_schedule(config).as_class(class_name, **fixed).alphas_cumprod)
    ref.set_timesteps(steps)
    for attr in ("alphas_cumprod", "final_alpha_cumprod", "one", "sigmas"):
        if isinstance(getattr(ref, attr, None), torch.Tensor):
            setattr(ref, attr, getattr(ref, attr).double())
    rng = np.random.default_rng(seed)
    pool = [torch.from_numpy(rng.standard_normal(SHAPE, dtype=np.float32)) for _ in range(len(ref.timesteps) + 1)]
    monkeypatch.setattr(sys.modules[type(ref).__module__], "randn_tensor", lambda *a, **k: pool.pop(0).to(k["dtype"]), raising=False)
    timesteps = ref.timesteps[start * ref.order :]
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(start * ref.order)
    noise, init, mask = (torch.from_numpy(a).double() for a in (unit_noise(), INIT, MASK))
    x = ref.add_noise(init, noise, timesteps[:1]) if img2img else noise * ref.init_noise_sigma
    states = []
    for i, t in enumerate(timesteps):
        x_in = ref.scale_model_input(x, t).numpy().astype(np.float32)
        x = ref.step(torch.from_numpy(mixing_model(x_in, float(t))).double(), t, x).prev_sample
        if inpaint:  # as StableDiffusionInpaintPipeline: the clean latents after the last step
            proper = ref.add_noise(init, noise, timesteps[i + 1 : i + 2]) if i < len(timesteps) - 1 else init
            x = (1 - mask) * proper + mask * x
        if full_step_done(name, ref, steps):
            states.append(x.numpy().copy())
    return states


EDIT_CONFIGS = ("sd15-leading-eps", "linear-trailing-v", "zero-snr-trailing-v")
STARTS = {"lcm": ((4, 0), (4, 1), (4, 3)), "tcd": ((4, 0), (4, 1), (4, 3))}
CASES = [
    (name, config, steps, start)
    for name in sorted(SAMPLERS)
    for config in EDIT_CONFIGS
    for steps, start in STARTS.get(name, ((7, 0), (7, 1), (7, 2), (20, 15)))
    if not (name in NO_SAMPLE_PREDICTION and "sample" in config)
]


@pytest.mark.parametrize("name, config, steps, start", CASES)
def test_img2img_matches_diffusers(name, config, steps, start, monkeypatch):
    ours = run_ours(name, CONFIGS[config], steps, start, img2img=True, inpaint=False)
    assert len(ours) == steps - start
    theirs = run_diffusers(name, CONFIGS[config], steps, start, monkeypatch, img2img=True, inpaint=False)
    assert_same_steps(ours, theirs, f"{name}/{config}/{steps} from {start}")


@pytest.mark.parametrize("name, config, steps, start", CASES)
def test_inpainting_reimposition_matches_diffusers(name, config, steps, start, monkeypatch):
    """The known region re-noised after each step; from pure noise at start 0, from the image otherwise."""
    img2img = start > 0
    ours = run_ours(name, CONFIGS[config], steps, start, img2img=img2img, inpaint=True)
    theirs = run_diffusers(name, CONFIGS[config], steps, start, monkeypatch, img2img=img2img, inpaint=True)
    assert_same_steps(ours, theirs, f"{name}/{config}/{steps} from {start}")


def test_known_region_follows_the_image_and_the_rest_is_free():
    """Before the last step the kept latents are exactly the image's, noised; the last step denoises them too."""
    states = []
    noise = unit_noise()
    schedule = noise_schedule(CONFIGS["sd15-leading-eps"])
    get_sampler("ddim")(toy_model, noise, schedule, 5, known=Known(INIT, MASK), callback=lambda i, t, x: states.append(x))
    acp = noise_schedule(CONFIGS["sd15-leading-eps"]).as_class("DDIMScheduler").alphas_cumprod
    t_next = 601  # leading spacing, 5 steps, offset 1: 801, 601, 401, 201, 1
    expected = acp[t_next] ** 0.5 * INIT + (1 - acp[t_next]) ** 0.5 * noise
    keep = MASK == 0
    kept = np.broadcast_to(keep, SHAPE)
    np.testing.assert_allclose(np.broadcast_to(states[0], SHAPE)[kept], expected[kept], rtol=1e-5, atol=1e-6)
    assert not np.allclose(states[0][np.broadcast_to(~keep, SHAPE)], expected[np.broadcast_to(~keep, SHAPE)], atol=1e-2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(start=7), r"ddim: start must be in \[0, 7\) for 7 steps"),
        (dict(start=-1), r"ddim: start must be in \[0, 7\)"),
        (dict(start=2), r"ddim: start=2 skips the noisiest steps, so it needs init"),
    ],
)
def test_bad_starts_are_refused_by_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_sampler("ddim")(toy_model, unit_noise(), noise_schedule(CONFIGS["sd15-leading-eps"]), 7, **kwargs)


def test_pndm_runge_kutta_refuses_edits_by_message():
    config = dict(CONFIGS["sd15-leading-eps"], skip_prk_steps=False)
    with pytest.raises(ValueError, match=r"pndm: img2img and inpainting need skip_prk_steps=True"):
        get_sampler("pndm")(toy_model, unit_noise(), noise_schedule(config), 7, init=INIT, start=2)
