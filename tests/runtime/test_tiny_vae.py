"""--tiny-vae and decoder='tiny': a bundle's tiny VAE gives what diffusers gives with the AutoencoderTiny swapped in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import runtime
from runtime.errors import BundleError
from runtime.pipeline import initial_latents
from tests.helpers.tiny_models import make_tiny_taesd
from tests.runtime.test_edit_pipelines import IMAGE, PROMPT, diffusers_pipe, draws, patch_diffusers_noise

STEPS = 6


@pytest.fixture(scope="module")
def taesd(tmp_path_factory) -> Path:
    return make_tiny_taesd(tmp_path_factory.mktemp("models") / "tiny-taesd")


@pytest.fixture(scope="module")
def tiny_bundle(tiny_model, taesd, tmp_path_factory) -> Path:
    from export.build import build

    return build(tiny_model, tmp_path_factory.mktemp("engines") / "tiny-taesd", precision="fp32", tiny_vae=taesd, log=lambda _: None)


def with_tiny_vae(pipe, taesd):
    from diffusers import AutoencoderTiny

    pipe.vae = AutoencoderTiny.from_pretrained(taesd)
    return pipe


def test_txt2img_with_the_tiny_decoder_matches_diffusers(tiny_model, taesd, tiny_bundle):
    import torch

    pipe = runtime.Pipeline.load(tiny_bundle)
    latents = initial_latents(pipe.manifest.latent_shape, seed=5)
    ours = pipe.txt2img(PROMPT, steps=STEPS, guidance_scale=7.5, latents=latents, output_type="np", decoder="tiny")
    ref = with_tiny_vae(diffusers_pipe("StableDiffusionPipeline", tiny_model, "DDIMScheduler"), taesd)(
        PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, latents=torch.from_numpy(latents), output_type="np"
    ).images
    assert ref.std() > 0.01, "reference image is flat: the comparison would prove nothing"
    assert np.abs(ours - ref).max() <= 1e-3
    full = pipe.txt2img(PROMPT, steps=STEPS, guidance_scale=7.5, latents=latents, output_type="np")
    assert np.abs(full - ours).max() > 0.05, "the default (full) decoder should differ from a random tiny one"


def test_img2img_with_the_tiny_vae_matches_diffusers(tiny_model, taesd, tiny_bundle, monkeypatch):
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as module

    pipe = runtime.Pipeline.load(tiny_bundle)
    assert "vae_encoder_tiny" in pipe.manifest.components
    noise, encoder_noise = draws(pipe.manifest.latent_shape)
    ours = pipe.img2img(PROMPT, IMAGE, steps=STEPS, strength=0.6, noise=noise, output_type="np", decoder="tiny")
    patch_diffusers_noise(monkeypatch, module, noise, encoder_noise)
    ref = with_tiny_vae(diffusers_pipe("StableDiffusionImg2ImgPipeline", tiny_model, "DDIMScheduler"), taesd)(
        PROMPT, image=IMAGE, strength=0.6, num_inference_steps=STEPS, output_type="np"
    ).images
    assert ref.std() > 0.01
    assert np.abs(ours - ref).max() <= 1e-3


def test_a_bundle_without_the_tiny_decoder_says_how_to_build_it(bundle_fp32):
    pipe = runtime.Pipeline.load(bundle_fp32)
    with pytest.raises(BundleError, match=r"no tiny VAE decoder; rebuild it with one: `python -m export.build .*--tiny-vae DIR"):
        pipe.txt2img(PROMPT, steps=1, decoder="tiny")
    with pytest.raises(ValueError, match="decoder must be one of full, tiny"):
        pipe.txt2img(PROMPT, steps=1, decoder="taesd")


def test_a_bundle_with_only_the_tiny_decoder_decodes_with_it(tiny_bundle, tmp_path):
    """A bundle whose manifest lists no full decoder (as a user may strip one) defaults to the tiny one."""
    import json
    import shutil

    from runtime.bundle import MANIFEST, sealed

    stripped = tmp_path / "stripped"
    shutil.copytree(tiny_bundle, stripped)
    raw = json.loads((stripped / MANIFEST).read_text())
    del raw["components"]["vae_decoder"]
    (stripped / MANIFEST).write_text(json.dumps(sealed(raw)))  # a consistent edit: the manifest digest recomputed
    both, only = runtime.Pipeline.load(tiny_bundle), runtime.Pipeline.load(stripped, verify=False)
    a = only.txt2img(PROMPT, steps=2, seed=0, output_type="np")
    b = both.txt2img(PROMPT, steps=2, seed=0, output_type="np", decoder="tiny")
    assert np.array_equal(a, b)
    with pytest.raises(BundleError, match="no full VAE decoder"):
        only.txt2img(PROMPT, steps=1, decoder="full")


def test_export_refuses_a_tiny_vae_of_another_latent_layout(tiny_model, tmp_path):
    from export.build import build
    from export.errors import ModelError

    wrong = make_tiny_taesd(tmp_path / "taesd-f4", levels=3)
    with pytest.raises(ModelError, match=r"reads 4-channel latents at 1/4 of the image, but .* makes 4-channel latents at 1/8"):
        build(tiny_model, tmp_path / "b", precision="fp32", tiny_vae=wrong, log=lambda _: None)
    with pytest.raises(ValueError, match="--tiny-vae .* is not a folder"):
        build(tiny_model, tmp_path / "b", precision="fp32", tiny_vae=tmp_path / "missing", log=lambda _: None)
    assert not (tmp_path / "b").exists()


def test_previews_come_every_k_steps_from_the_tiny_decoder_or_the_linear_map(tiny_bundle, bundle_fp32):
    seen: list[tuple[int, int, tuple[int, ...]]] = []
    pipe = runtime.Pipeline.load(tiny_bundle)
    keep = lambda s, n, im: seen.append((s, n, im))  # noqa: E731
    final = pipe.txt2img(PROMPT, steps=5, seed=3, output_type="np", decoder="tiny", preview=keep, preview_every=2)
    assert [(s, n) for s, n, _ in seen] == [(2, 5), (4, 5), (5, 5)]
    assert seen[-1][2].shape == (1, 64, 64, 3)
    assert np.abs(seen[-1][2] - final).max() < 0.05, "the last preview is the final image's estimate"
    linear: list[np.ndarray] = []
    plain = runtime.Pipeline.load(bundle_fp32)
    plain.txt2img(PROMPT, steps=3, seed=3, preview=lambda s, n, im: linear.append(im))
    assert len(linear) == 3 and linear[0].shape == (1, 8, 8, 3) and linear[0].dtype == np.float32
    assert 0 <= linear[-1].min() and linear[-1].max() <= 1
    with pytest.raises(ValueError, match="preview_every must be a whole number >= 1"):
        plain.txt2img(PROMPT, steps=1, preview=print, preview_every=0)


def test_the_decoder_benchmark_times_every_decoder_of_a_bundle(tiny_bundle, tmp_path):
    import json

    from benchmarks.levers import main

    assert main(["--bundle", str(tiny_bundle), "--rounds", "2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "decode.json").read_text())
    assert sorted(report["decoder"]) == ["full", "preview map", "tiny"]
    assert all(len(d["times_s"]) == 2 for d in report["decoder"].values())
    assert "| tiny |" in (tmp_path / "decode.md").read_text()
    args = ["--bundle", str(tiny_bundle), "--generate", "--steps", "2", "--decoder", "full", "tiny", "--rounds", "1"]
    args += ["--guidance-scale", "3", "--out", str(tmp_path)]
    assert main(args) == 0
    report = json.loads((tmp_path / "generate.json").read_text())
    assert sorted(report["generation"]) == ["2 steps, cache 1, full", "2 steps, cache 1, tiny"]
    assert report["guidance_scale"] == 3.0


def test_tensorrt_engines_are_built_for_the_tiny_vae_too(tiny_bundle, tmp_path):
    """--from-onnx builds every component the bundle has (the TensorRT builder stood in for, as in test_tensorrt_offline)."""
    from runtime.bundle import load_manifest
    from tests.export.test_tensorrt_offline import offline_build

    manifest = load_manifest(offline_build(tiny_bundle, tmp_path / "trt"))
    assert {"vae_decoder_tiny", "vae_encoder_tiny"} <= set(manifest.components)
    assert all(c.format == "plan" and c.verification["passed"] for c in manifest.components.values())
    assert manifest.levers.tiny_vae is not None and manifest.levers.preview is not None
