"""SDXL with both speed levers: a tiny VAE decoder (taesdxl's place) and DeepCache, against diffusers' SDXL pipelines
with the AutoencoderTiny swapped in and the deepcache package's helper on its UNet."""

from __future__ import annotations

import numpy as np
import pytest

import runtime
from runtime.pipeline import initial_latents
from tests.helpers.tiny_models import make_tiny_taesd
from tests.runtime.test_edit_pipelines import IMAGE, MASK, draws, patch_diffusers_noise
from tests.sdxl.test_sdxl_parity import PROMPT, reference


@pytest.fixture(scope="module")
def taesd(tmp_path_factory):
    return make_tiny_taesd(tmp_path_factory.mktemp("models") / "taesdxl")


@pytest.fixture(scope="module")
def levers_bundle(sdxl_models, taesd, tmp_path_factory):
    from export.build import build

    out = tmp_path_factory.mktemp("sdxl-engines") / "levers"
    return build(sdxl_models["base"], out, precision="fp32", tiny_vae=taesd, deepcache=1, log=lambda _: None)


def deepcached(pipe, interval):
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=1)
    helper.enable()
    return pipe


def test_sdxl_tiny_decoder_and_deepcache_match_diffusers(sdxl_models, taesd, levers_bundle):
    import torch
    from diffusers import AutoencoderTiny

    pipe = runtime.Pipeline.load(levers_bundle)
    latents = initial_latents(pipe.manifest.latent_shape, seed=8)
    ours = pipe.txt2img(PROMPT, steps=6, guidance_scale=5.0, latents=latents, output_type="np", decoder="tiny", cache_interval=3)
    ref_pipe = reference("StableDiffusionXLPipeline", sdxl_models["base"])
    ref_pipe.vae = AutoencoderTiny.from_pretrained(taesd)
    ref = deepcached(ref_pipe, 3)(
        PROMPT, num_inference_steps=6, guidance_scale=5.0, latents=torch.from_numpy(latents), output_type="np"
    ).images
    assert ref.std() > 0.01, "reference image is flat: the comparison would prove nothing"
    assert np.abs(ours - ref).max() <= 1e-3


def test_sdxl_img2img_and_inpaint_with_deepcache_match_diffusers(sdxl_models, levers_bundle, monkeypatch):
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as img2img_module
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_inpaint as inpaint_module

    pipe = runtime.Pipeline.load(levers_bundle)
    noise, encoder_noise = draws(pipe.manifest.latent_shape, seed=4)
    common = dict(guidance_scale=5.0, encoder_noise=encoder_noise, output_type="np")
    ours = pipe.img2img(PROMPT, IMAGE, strength=0.7, steps=8, noise=noise, cache_interval=2, **common)
    patch_diffusers_noise(monkeypatch, img2img_module, noise, encoder_noise)
    ref = deepcached(reference("StableDiffusionXLImg2ImgPipeline", sdxl_models["base"]), 2)(
        PROMPT, image=IMAGE, strength=0.7, num_inference_steps=8, guidance_scale=5.0, output_type="np"
    ).images
    assert ref.std() > 0.01
    assert np.abs(ours - ref).max() <= 1e-3
    plain = pipe.img2img(PROMPT, IMAGE, strength=0.7, steps=8, noise=noise, **common)
    assert np.abs(plain - ours).max() > 1e-3, "caching changed nothing: the shallow UNet never ran"
    ours = pipe.inpaint(PROMPT, IMAGE, MASK, steps=6, latents=noise, cache_interval=3, composite=False, **common)
    patch_diffusers_noise(monkeypatch, inpaint_module, noise, encoder_noise)
    ref = deepcached(reference("StableDiffusionXLInpaintPipeline", sdxl_models["base"]), 3)(
        PROMPT, image=IMAGE, mask_image=MASK, strength=1.0, num_inference_steps=6, guidance_scale=5.0, output_type="np"
    ).images
    assert np.abs(ours - ref).max() <= 1e-3
