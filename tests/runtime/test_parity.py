"""The backbone: an exported bundle run by runtime/ gives diffusers' image, pixel for pixel."""

from __future__ import annotations

import numpy as np
import pytest

import runtime
from runtime.pipeline import initial_latents
from tests.helpers.close import assert_same_image

PROMPT = "a small red circle in the top left on a black background"


def diffusers_images(model_dir, prompt, negative, latents, steps, guidance_scale):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt,
        negative_prompt=negative,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        latents=torch.from_numpy(latents),
        output_type="np",
    )
    return out.images


@pytest.mark.parametrize(
    ("steps", "guidance_scale", "negative"), [(1, 7.5, ""), (7, 7.5, "blurry, low quality"), (20, 3.0, ""), (5, 1.0, "")]
)
def test_fp32_bundle_matches_diffusers(tiny_model, bundle_fp32, steps, guidance_scale, negative):
    pipe = runtime.Pipeline.load(bundle_fp32)
    latents = initial_latents(pipe.manifest.latent_shape, seed=123)
    ours = pipe.txt2img(PROMPT, negative_prompt=negative, steps=steps, guidance_scale=guidance_scale, latents=latents, output_type="np")
    ref = diffusers_images(tiny_model, PROMPT, negative, latents, steps, guidance_scale)
    assert ours.shape == ref.shape == (1, 64, 64, 3)
    assert ours.dtype == np.float32
    assert ref.std() > 0.01, "reference image is flat: the comparison would prove nothing"
    assert np.abs(ours - ref).max() <= 1e-3


def test_batch2_bundle_matches_diffusers(tiny_model, bundle_batch2):
    pipe = runtime.Pipeline.load(bundle_batch2)
    prompts = [PROMPT, "a large blue square in the center on a white background"]
    latents = initial_latents(pipe.manifest.latent_shape, seed=7)
    ours = pipe.txt2img(prompts, negative_prompt=["", "green"], steps=4, guidance_scale=5.0, latents=latents, output_type="np")
    ref = diffusers_images(tiny_model, prompts, ["", "green"], latents, 4, 5.0)
    assert ours.shape == (2, 64, 64, 3)
    assert np.abs(ours - ref).max() <= 1e-3
    assert np.abs(ours[0] - ours[1]).max() > 0.01, "two different prompts and latents gave one image"


def test_fp16_bundle_close_to_fp32(bundle_fp16, bundle_fp32):
    """fp16 is measured, not assumed: the manifest records each component's error, and the image stays close."""
    p16, p32 = runtime.Pipeline.load(bundle_fp16), runtime.Pipeline.load(bundle_fp32)
    for name, c in p16.manifest.components.items():
        assert c.precision == "fp16", name
        assert c.verification["passed"] and 0 < c.verification["rel_err"] <= c.verification["tolerance"]
    a = p16.txt2img(PROMPT, steps=10, seed=0, output_type="np")
    b = p32.txt2img(PROMPT, steps=10, seed=0, output_type="np")
    assert 0 < np.abs(a - b).max() < 0.02


def test_seed_contract(bundle_fp32):
    """A seed means numpy's default_rng(seed).standard_normal in float32: same seed, same image."""
    pipe = runtime.Pipeline.load(bundle_fp32)
    a = pipe.txt2img(PROMPT, steps=3, seed=42, output_type="np")
    b = pipe.txt2img(PROMPT, steps=3, seed=42, output_type="np")
    c = pipe.txt2img(PROMPT, steps=3, seed=43, output_type="np")
    seeded = np.random.default_rng(42).standard_normal((1, 4, 8, 8), dtype=np.float32)
    explicit = pipe.txt2img(PROMPT, steps=3, output_type="np", latents=seeded)
    assert_same_image(a, b, "the same seed twice")
    assert_same_image(a, explicit, "seed vs its latents")
    assert np.abs(a - c).max() > 0.01


def test_pil_output_and_latent_output(bundle_fp32):
    pipe = runtime.Pipeline.load(bundle_fp32)
    images = pipe.txt2img(PROMPT, steps=2, seed=0)
    assert len(images) == 1 and images[0].size == (64, 64) and images[0].mode == "RGB"
    latents = pipe.txt2img(PROMPT, steps=2, seed=0, output_type="latent")
    assert latents.shape == (1, 4, 8, 8)
    arr = pipe.txt2img(PROMPT, steps=2, seed=0, output_type="np")
    assert np.array_equal(np.asarray(images[0]), (arr[0] * 255).round().astype(np.uint8))
