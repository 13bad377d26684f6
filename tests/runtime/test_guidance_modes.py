"""Whole-pipeline parity per checkpoint family: sampler + guidance mode through exported fp32 bundles."""

from __future__ import annotations

import json

import numpy as np
import pytest

import runtime
from export.build import build
from tests.helpers.tiny_models import make_tiny_sd

PROMPT = "a large green triangle in the bottom right on a gray background"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """kind -> (model dir, fp32 bundle), built once per kind on first use."""
    built: dict[str, tuple] = {}

    def get(kind: str, **options):
        if kind not in built:
            root = tmp_path_factory.mktemp(kind)
            model = make_tiny_sd(root / f"tiny-{kind}", kind=kind)
            built[kind] = (model, build(model, root / "bundle", precision="fp32", log=lambda _: None, **options))
        return built[kind]

    return get


def reference(pipe_cls, model_dir, scheduler=None, **call):
    import torch

    pipe = pipe_cls.from_pretrained(model_dir, safety_checker=None)
    if scheduler is not None:
        pipe.scheduler = scheduler(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    call["latents"] = torch.from_numpy(call["latents"])
    return pipe(output_type="np", **call).images


def test_sd15_dpmpp_2m_karras(family):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    model, bundle = family("sd15")
    pipe = runtime.Pipeline.load(bundle)
    latents = np.random.default_rng(1).standard_normal(pipe.manifest.latent_shape, dtype=np.float32)
    ours = pipe.txt2img(PROMPT, "blue", steps=9, guidance_scale=7.5, latents=latents, scheduler="dpmpp_2m_karras", output_type="np")
    karras = lambda c: DPMSolverMultistepScheduler.from_config(c, use_karras_sigmas=True)  # noqa: E731
    ref = reference(
        StableDiffusionPipeline, model, karras,
        prompt=PROMPT, negative_prompt="blue", num_inference_steps=9, guidance_scale=7.5, latents=latents,
    )  # fmt: skip
    assert ref.std() > 0.01
    assert np.abs(ours - ref).max() <= 1e-3


def test_sd2_v_prediction_with_guidance_rescale(family):
    from diffusers import StableDiffusionPipeline

    model, bundle = family("sd2")
    pipe = runtime.Pipeline.load(bundle)
    assert pipe.family.tokenizer.pad_id == 0, "SD 2.x tokenizers pad with '!'"
    assert pipe.schedule.prediction_type == "v_prediction"
    latents = np.random.default_rng(2).standard_normal(pipe.manifest.latent_shape, dtype=np.float32)
    ours = pipe.txt2img(PROMPT, steps=6, guidance_scale=6.0, guidance_rescale=0.7, latents=latents, output_type="np")
    ref = reference(
        StableDiffusionPipeline, model, prompt=PROMPT, num_inference_steps=6, guidance_scale=6.0, guidance_rescale=0.7, latents=latents
    )
    plain = pipe.txt2img(PROMPT, steps=6, guidance_scale=6.0, latents=latents, output_type="np")
    assert np.abs(ours - ref).max() <= 1e-3
    assert np.abs(ours - plain).max() > 1e-3, "guidance_rescale changed nothing"


def test_turbo_one_step_without_guidance(family):
    from diffusers import StableDiffusionPipeline

    model, bundle = family("turbo", guidance="none")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["guidance"] == {"mode": "none", "unet_batch": 1}
    assert manifest["components"]["unet"]["inputs"][0]["shape"][0] == 1
    pipe = runtime.Pipeline.load(bundle)
    latents = np.random.default_rng(3).standard_normal(pipe.manifest.latent_shape, dtype=np.float32)
    ours = pipe.txt2img(PROMPT, steps=1, guidance_scale=0.0, latents=latents, output_type="np")
    ref = reference(StableDiffusionPipeline, model, prompt=PROMPT, num_inference_steps=1, guidance_scale=0.0, latents=latents)
    assert np.abs(ours - ref).max() <= 1e-3
    with pytest.raises(ValueError, match=r"guidance_scale 7.5 needs classifier-free guidance.*--guidance cfg"):
        pipe.txt2img(PROMPT, steps=1, guidance_scale=7.5, seed=0)
    with pytest.warns(UserWarning, match="negative_prompt has no effect"):
        pipe.txt2img(PROMPT, "red", steps=1, guidance_scale=0.0, seed=0)


def test_lcm_guidance_embedding(family, monkeypatch):
    import torch
    from diffusers import LatentConsistencyModelPipeline
    from diffusers.schedulers import scheduling_lcm

    model, bundle = family("lcm")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["guidance"] == {"mode": "embedded", "unet_batch": 1, "embedding_dim": 16}
    assert [t["name"] for t in manifest["components"]["unet"]["inputs"]][-1] == "timestep_cond"
    pipe = runtime.Pipeline.load(bundle)
    assert pipe.manifest.scheduler.class_name == "LCMScheduler"
    latents = np.random.default_rng(4).standard_normal(pipe.manifest.latent_shape, dtype=np.float32)
    ours = pipe.txt2img(PROMPT, steps=4, guidance_scale=8.0, seed=11, latents=latents, output_type="np")

    # the same noise for diffusers' LCM steps: what our sampler drew from default_rng(seed), in order
    rng = np.random.default_rng(11)
    draw = lambda shape, **_: torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32))  # noqa: E731
    monkeypatch.setattr(scheduling_lcm, "randn_tensor", draw)
    ref = reference(LatentConsistencyModelPipeline, model, prompt=PROMPT, num_inference_steps=4, guidance_scale=8.0, latents=latents)
    assert np.abs(ours - ref).max() <= 1e-3
    with pytest.warns(UserWarning, match="negative_prompt has no effect on a guidance-embedding"):
        pipe.txt2img(PROMPT, "red", steps=1, seed=0)


def test_guidance_flags_are_checked(family, tmp_path):
    model, _ = family("sd15")
    with pytest.raises(ValueError, match="--guidance embedded needs a UNet with time_cond_proj_dim"):
        build(model, tmp_path / "b", guidance="embedded", log=lambda _: None)
    _, bundle = family("sd15")
    with pytest.raises(ValueError, match="sampler 'euler' has no option eta"):
        runtime.Pipeline.load(bundle).txt2img(PROMPT, steps=2, seed=0, scheduler="euler", eta=0.5)
