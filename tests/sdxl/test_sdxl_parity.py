"""SDXL bundles run by runtime/ against diffusers' own StableDiffusionXL pipelines, from the same noise.

Base (classifier-free guidance, empty and non-empty negatives, the size/crop keywords), SDXL-Turbo
(batch-B bundle, 1 step), img2img on the base and the refiner (aesthetic scores), and the base + refiner
hand-off in latent space (denoising_end / denoising_start). fp32 bundles: max abs pixel difference <= 1e-3.
"""

from __future__ import annotations

import numpy as np
import pytest

import runtime
from runtime.pipeline import initial_latents
from tests.runtime.test_edit_pipelines import IMAGE, MASK, draws, patch_diffusers_noise

PROMPT = "a small red circle in the top left on a black background"


def reference(cls_name, model_dir):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(model_dir, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def base_ref(sdxl_models):
    return reference("StableDiffusionXLPipeline", sdxl_models["base"])


@pytest.fixture(scope="module")
def refiner_ref(sdxl_models):
    return reference("StableDiffusionXLImg2ImgPipeline", sdxl_models["refiner"])


@pytest.mark.parametrize(
    ("negative", "conditioning"),
    [
        ("", {}),
        ("blurry, low quality", {}),
        ("", {"original_size": (32, 48), "crops_coords_top_left": (8, 4), "target_size": (64, 64)}),
        ("blurry", {"negative_original_size": (16, 16), "negative_target_size": (32, 32)}),
    ],
)
def test_txt2img_matches_diffusers(sdxl_base_bundle, base_ref, negative, conditioning):
    import torch

    pipe = runtime.Pipeline.load(sdxl_base_bundle)
    latents = initial_latents(pipe.manifest.latent_shape, seed=3)
    ours = pipe.txt2img(PROMPT, negative, steps=4, guidance_scale=5.0, latents=latents, output_type="np", **conditioning)
    # diffusers zeroes the negative half only for negative_prompt=None (force_zeros_for_empty_prompt); ours for ""
    ref = base_ref(
        PROMPT, negative_prompt=negative or None, num_inference_steps=4, guidance_scale=5.0, latents=torch.from_numpy(latents),
        output_type="np", **conditioning,
    ).images  # fmt: skip
    assert ours.shape == ref.shape == (1, 64, 64, 3)
    assert ref.std() > 0.01, "reference image is flat: the comparison would prove nothing"
    assert np.abs(ours - ref).max() <= 1e-3
    if conditioning:  # the keywords reach the UNet: without them the image differs
        plain = pipe.txt2img(PROMPT, negative, steps=4, guidance_scale=5.0, latents=latents, output_type="np")
        assert np.abs(plain - ours).max() > 1e-3


def test_empty_negative_prompt_is_zero_conditioning(sdxl_base_bundle, base_ref):
    """force_zeros_for_empty_prompt: "" is not the empty string's embedding (what diffusers gives for negative_prompt="")."""
    import torch

    pipe = runtime.Pipeline.load(sdxl_base_bundle)
    assert pipe.manifest.sdxl.force_zeros_for_empty_prompt
    cond = pipe.family.encode([PROMPT], [""])
    assert not cond.context[0].any() and not cond.extra["text_embeds"][0].any() and cond.context[1].any()
    latents = initial_latents(pipe.manifest.latent_shape, seed=3)
    ours = pipe.txt2img(PROMPT, steps=3, guidance_scale=5.0, latents=latents, output_type="np")
    encoded = base_ref(
        PROMPT, negative_prompt="", num_inference_steps=3, guidance_scale=5.0, latents=torch.from_numpy(latents), output_type="np"
    ).images
    assert np.abs(ours - encoded).max() > 1e-3


def test_turbo_batch_b_bundle_one_step_matches_diffusers(sdxl_models, sdxl_turbo_bundle):
    import torch

    pipe = runtime.Pipeline.load(sdxl_turbo_bundle)
    assert pipe.manifest.guidance_info.unet_batch == 1 and pipe.manifest.components["unet"].inputs[0].shape[0] == 1
    latents = initial_latents(pipe.manifest.latent_shape, seed=5)
    ours = pipe.txt2img(PROMPT, steps=1, guidance_scale=0.0, latents=latents, output_type="np")
    ref = reference("StableDiffusionXLPipeline", sdxl_models["turbo"])(
        PROMPT, num_inference_steps=1, guidance_scale=0.0, latents=torch.from_numpy(latents), output_type="np"
    ).images
    assert ref.std() > 0.01
    assert np.abs(ours - ref).max() <= 1e-3


def test_img2img_on_the_base_matches_diffusers(sdxl_base_bundle, base_ref, monkeypatch):
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as module

    pipe = runtime.Pipeline.load(sdxl_base_bundle)
    noise, encoder_noise = draws(pipe.manifest.latent_shape, seed=4)
    ours = pipe.img2img(
        PROMPT, IMAGE, strength=0.6, steps=10, guidance_scale=5.0, noise=noise, encoder_noise=encoder_noise, output_type="np"
    )
    patch_diffusers_noise(monkeypatch, module, noise, encoder_noise)
    ref_pipe = StableDiffusionXLImg2ImgPipeline(**base_ref.components)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(PROMPT, image=IMAGE, strength=0.6, num_inference_steps=10, guidance_scale=5.0, output_type="np").images
    assert np.abs(ours - ref).max() <= 1e-3


def test_refiner_img2img_with_aesthetic_scores_matches_diffusers(sdxl_refiner_bundle, refiner_ref, monkeypatch):
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as module

    pipe = runtime.Pipeline.load(sdxl_refiner_bundle)
    assert pipe.manifest.sdxl.requires_aesthetics_score and pipe.manifest.sdxl.time_ids == 5
    assert [e.component for e in pipe.manifest.sdxl.encoders] == ["text_encoder_2"]
    noise, encoder_noise = draws(pipe.manifest.latent_shape, seed=6)
    scores = {"aesthetic_score": 7.5, "negative_aesthetic_score": 1.0}
    common = dict(strength=0.5, guidance_scale=5.0)
    ours = pipe.img2img(PROMPT, IMAGE, "ugly", steps=10, noise=noise, encoder_noise=encoder_noise, output_type="np", **common, **scores)
    default = pipe.img2img(PROMPT, IMAGE, "ugly", steps=10, noise=noise, encoder_noise=encoder_noise, output_type="np", **common)
    patch_diffusers_noise(monkeypatch, module, noise, encoder_noise)
    ref = refiner_ref(PROMPT, image=IMAGE, negative_prompt="ugly", num_inference_steps=10, output_type="np", **common, **scores).images
    ref_default = refiner_ref(PROMPT, image=IMAGE, negative_prompt="ugly", num_inference_steps=10, output_type="np", **common).images
    assert np.abs(ours - ref).max() <= 1e-3
    assert np.abs(default - ref_default).max() <= 1e-3  # diffusers' defaults, 6.0 and 2.5, are ours
    assert np.abs(ours - default).max() > 1e-4


@pytest.mark.parametrize("fraction", [0.8, 0.5])
def test_base_then_refiner_handoff_matches_diffusers(sdxl_base_bundle, sdxl_refiner_bundle, base_ref, refiner_ref, fraction):
    import torch

    base, refiner = runtime.Pipeline.load(sdxl_base_bundle), runtime.Pipeline.load(sdxl_refiner_bundle)
    latents = initial_latents(base.manifest.latent_shape, seed=7)
    steps = []
    handed = base.txt2img(
        PROMPT, steps=10, guidance_scale=5.0, latents=latents, denoising_end=fraction, output_type="latent",
        callback=lambda i, n, t: steps.append((i, n)),
    )  # fmt: skip
    ours = refiner.img2img(PROMPT, handed, steps=10, guidance_scale=5.0, denoising_start=fraction, output_type="np")
    ref_latents = base_ref(
        PROMPT, num_inference_steps=10, guidance_scale=5.0, latents=torch.from_numpy(latents), denoising_end=fraction,
        output_type="latent",
    ).images  # fmt: skip
    ref = refiner_ref(
        PROMPT, image=ref_latents, num_inference_steps=10, guidance_scale=5.0, denoising_start=fraction, output_type="np"
    ).images
    assert steps[-1][0] == steps[-1][1] == round(10 * fraction)  # the base ran only its share, and said so
    assert np.abs(handed - ref_latents.numpy()).max() <= 1e-3
    assert np.abs(ours - ref).max() <= 1e-3


def test_inpaint_with_the_ordinary_unet_keeps_the_unmasked_pixels(sdxl_base_bundle):
    pipe = runtime.Pipeline.load(sdxl_base_bundle)
    out = pipe.inpaint(PROMPT, IMAGE, MASK, steps=4, guidance_scale=5.0, seed=0, output_type="np", original_size=(128, 128))
    original = np.asarray(IMAGE, dtype=np.float32) / 255
    keep = np.asarray(MASK) < 128
    assert np.isfinite(out).all()
    assert np.abs(out[0][keep] - original[keep]).max() <= 1 / 255 + 1e-6
    assert np.abs(out[0][~keep] - original[~keep]).max() > 0.05


def test_the_sdxl_inpainting_unet_matches_diffusers(sdxl_inpaint_bundle, monkeypatch):
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_inpaint as module

    model, bundle = sdxl_inpaint_bundle
    pipe = runtime.Pipeline.load(bundle)
    assert pipe.manifest.model.kind == "inpainting" and pipe.manifest.pipelines == ("inpaint",)
    noise, encoder_noise = draws(pipe.manifest.latent_shape, seed=8)
    ours = pipe.inpaint(PROMPT, IMAGE, MASK, steps=6, guidance_scale=5.0, latents=noise, encoder_noise=encoder_noise, output_type="np")
    patch_diffusers_noise(monkeypatch, module, noise, encoder_noise)
    ref = reference("StableDiffusionXLInpaintPipeline", model)(
        PROMPT, image=IMAGE, mask_image=MASK, strength=1.0, num_inference_steps=6, guidance_scale=5.0, output_type="np"
    ).images
    assert ref.std() > 0.01
    assert np.abs(ours - ref).max() <= 1e-3
