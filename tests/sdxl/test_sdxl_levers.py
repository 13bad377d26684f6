"""SDXL with both speed levers: a tiny VAE decoder (taesdxl's place) and DeepCache, against diffusers' SDXL pipeline
with the AutoencoderTiny swapped in and the deepcache package's helper on its UNet."""

from __future__ import annotations

import numpy as np

import runtime
from runtime.pipeline import initial_latents
from tests.helpers.tiny_models import make_tiny_taesd
from tests.sdxl.test_sdxl_parity import PROMPT, reference


def test_sdxl_tiny_decoder_and_deepcache_match_diffusers(sdxl_models, tmp_path):
    import torch
    from DeepCache import DeepCacheSDHelper
    from diffusers import AutoencoderTiny

    from export.build import build

    taesd = make_tiny_taesd(tmp_path / "taesdxl")
    bundle = build(sdxl_models["base"], tmp_path / "b", precision="fp32", tiny_vae=taesd, deepcache=1, log=lambda _: None)
    pipe = runtime.Pipeline.load(bundle)
    latents = initial_latents(pipe.manifest.latent_shape, seed=8)
    ours = pipe.txt2img(PROMPT, steps=6, guidance_scale=5.0, latents=latents, output_type="np", decoder="tiny", cache_interval=3)
    ref_pipe = reference("StableDiffusionXLPipeline", sdxl_models["base"])
    ref_pipe.vae = AutoencoderTiny.from_pretrained(taesd)
    helper = DeepCacheSDHelper(pipe=ref_pipe)
    helper.set_params(cache_interval=3, cache_branch_id=1)
    helper.enable()
    ref = ref_pipe(PROMPT, num_inference_steps=6, guidance_scale=5.0, latents=torch.from_numpy(latents), output_type="np").images
    assert ref.std() > 0.01, "reference image is flat: the comparison would prove nothing"
    assert np.abs(ours - ref).max() <= 1e-3
