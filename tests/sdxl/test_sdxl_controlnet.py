"""An SDXL ControlNet bundle (the net takes text_embeds and time_ids too) against StableDiffusionXLControlNetPipeline."""

from __future__ import annotations

import numpy as np
import pytest

import runtime
from runtime.pipeline import initial_latents
from tests.helpers.tiny_controlnet import make_tiny_controlnet
from tests.runtime.test_controlnet import A

PROMPT = "a small red circle in the top left on a black background"


@pytest.fixture(scope="module")
def controlled(sdxl_models, tmp_path_factory):
    from export.build import build

    net = make_tiny_controlnet(sdxl_models["base"], tmp_path_factory.mktemp("sdxl-controlnet") / "net")
    out = tmp_path_factory.mktemp("sdxl-engines") / "base-controlnet"
    return net, build(sdxl_models["base"], out, precision="fp32", pipelines="txt2img", controlnets=(str(net),), log=lambda _: None)


@pytest.mark.parametrize("keywords", [{}, {"controlnet_conditioning_scale": 0.6, "control_guidance_end": 0.5, "original_size": (32, 48)}])
def test_sdxl_controlnet_matches_diffusers(sdxl_models, controlled, keywords):
    import torch
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    net, bundle = controlled
    pipe = runtime.Pipeline.load(bundle)
    assert [t.name for t in pipe.manifest.components["controlnet_0"].inputs][:5] == [
        "sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"
    ]  # fmt: skip
    latents = initial_latents(pipe.manifest.latent_shape, seed=5)
    ours = pipe.txt2img(PROMPT, steps=4, guidance_scale=5.0, latents=latents, output_type="np", control_image=A, **keywords)
    plain = pipe.txt2img(PROMPT, steps=4, guidance_scale=5.0, latents=latents, output_type="np")
    reference = StableDiffusionXLControlNetPipeline.from_pretrained(
        sdxl_models["base"], controlnet=ControlNetModel.from_pretrained(net), add_watermarker=False
    )
    reference.set_progress_bar_config(disable=True)
    ref = reference(
        PROMPT, image=A, num_inference_steps=4, guidance_scale=5.0, latents=torch.from_numpy(latents), output_type="np", **keywords
    ).images
    assert np.abs(ours - plain).max() > 0.02, "the ControlNet did not change the image: the test would prove nothing"
    assert np.abs(ours - ref).max() <= 1e-3
