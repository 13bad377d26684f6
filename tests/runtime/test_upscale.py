"""x4 super-resolution: an exported upscaler bundle gives diffusers' StableDiffusionUpscalePipeline image."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import runtime
from runtime.errors import BundleError
from tests.helpers import REPO
from tests.helpers.close import assert_same_image
from tests.helpers.tiny_models import MAX_NOISE_LEVEL, make_tiny_sd

PROMPT = "a small red circle in the top left on a black background"
LOW, HIGH = 16, 64  # input and output size


@pytest.fixture(scope="module")
def upscaler_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-upscaler", kind="upscaler", sample_size=HIGH)


@pytest.fixture(scope="module")
def upscaler_bundle(upscaler_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Exported through the real CLI; --height/--width are the output size."""
    out = tmp_path_factory.mktemp("engines") / "tiny-upscaler-fp32"
    cmd = [sys.executable, "-m", "export.build", "--model", str(upscaler_model), "--precision", "fp32"]
    cmd += ["--height", str(HIGH), "--width", str(HIGH), "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def pipe(upscaler_bundle: Path) -> runtime.Pipeline:
    return runtime.Pipeline.load(upscaler_bundle)


@pytest.fixture(scope="module")
def low_res() -> np.ndarray:
    return (np.random.default_rng(5).uniform(0, 1, (LOW, LOW, 3)) * 255).astype(np.uint8)


def diffusers_upscale(model_dir, monkeypatch, image, latents, image_noise, **kwargs):
    """diffusers' pipeline on the same noise: latents= as given, its image-noise draw patched to ours."""
    import torch
    from diffusers import StableDiffusionUpscalePipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_upscale as module

    draws = []

    def randn_tensor(shape, **k):
        draws.append(tuple(shape))
        return torch.from_numpy(image_noise).to(k["dtype"])

    monkeypatch.setattr(module, "randn_tensor", randn_tensor)
    ref = StableDiffusionUpscalePipeline.from_pretrained(model_dir)
    ref.set_progress_bar_config(disable=True)
    images = ref(PROMPT, image=image, latents=torch.from_numpy(latents), output_type="np", **kwargs).images
    assert draws == [image_noise.shape], "diffusers drew other noise than the image noise: the comparison would be unfair"
    return images


@pytest.mark.parametrize(
    ("noise_level", "guidance_scale", "steps", "negative"), [(20, 9.0, 4, ""), (300, 1.0, 3, ""), (0, 4.0, 3, "blurry")]
)
def test_fp32_bundle_matches_diffusers(upscaler_model, pipe, low_res, monkeypatch, noise_level, guidance_scale, steps, negative):
    rng = np.random.default_rng(noise_level)
    latents = rng.standard_normal((1, 4, LOW, LOW), dtype=np.float32)
    image_noise = rng.standard_normal((1, 3, LOW, LOW), dtype=np.float32)
    settings = dict(noise_level=noise_level, guidance_scale=guidance_scale, negative_prompt=negative)
    ours = pipe.upscale(PROMPT, low_res, **settings, steps=steps, latents=latents, image_noise=image_noise, output_type="np")
    from PIL import Image

    low_res_image = Image.fromarray(low_res)
    ref = diffusers_upscale(upscaler_model, monkeypatch, low_res_image, latents, image_noise, **settings, num_inference_steps=steps)
    assert ours.shape == ref.shape == (1, HIGH, HIGH, 3)
    assert ref.std() > 0.01, "reference image is flat: the comparison would prove nothing"
    assert np.abs(ours - ref).max() <= 1e-3


def test_noise_level_and_image_steer_the_result(pipe, low_res):
    """Both conditioning inputs reach the UNet: changing either changes the image."""
    noise = dict(latents=np.zeros((1, 4, LOW, LOW), np.float32), image_noise=np.zeros((1, 3, LOW, LOW), np.float32))
    base = pipe.upscale(PROMPT, low_res, steps=2, noise_level=20, output_type="np", **noise)
    other_level = pipe.upscale(PROMPT, low_res, steps=2, noise_level=21, output_type="np", **noise)
    other_image = pipe.upscale(PROMPT, 255 - low_res, steps=2, noise_level=20, output_type="np", **noise)
    assert np.abs(base - other_level).max() > 1e-3
    assert np.abs(base - other_image).max() > 1e-2


def test_seed_draws_image_noise_then_latents(pipe, low_res):
    """The documented order, diffusers' own: the seed's generator gives the image noise first, then the latents."""
    rng = np.random.default_rng(3)
    first, second = rng.standard_normal((1, 3, LOW, LOW), dtype=np.float32), rng.standard_normal((1, 4, LOW, LOW), dtype=np.float32)
    seeded = pipe.upscale(PROMPT, low_res, steps=2, seed=3, output_type="np")
    explicit = pipe.upscale(PROMPT, low_res, steps=2, image_noise=first, latents=second, output_type="np")
    swapped_rng = np.random.default_rng(3)
    lat = swapped_rng.standard_normal((1, 4, LOW, LOW), dtype=np.float32)
    img = swapped_rng.standard_normal((1, 3, LOW, LOW), dtype=np.float32)
    swapped = pipe.upscale(PROMPT, low_res, steps=2, image_noise=img, latents=lat, output_type="np")
    assert_same_image(seeded, explicit, "seeded vs explicit noise")
    assert np.abs(seeded - swapped).max() > 1e-2


def test_manifest_records_the_upscaler(pipe):
    manifest = pipe.manifest
    assert manifest.pipelines == ("upscale",)
    assert manifest.model.kind == "upscaler"
    assert manifest.upscale is not None and manifest.upscale.max_noise_level == MAX_NOISE_LEVEL
    low_res_scheduler = manifest.upscale.low_res_scheduler
    assert low_res_scheduler.class_name == "DDPMScheduler" and low_res_scheduler.config["beta_schedule"] == "scaled_linear"
    assert (manifest.vae.scaling_factor, manifest.vae.latent_channels, manifest.vae.downscale_factor) == (0.08333, 4, 4)
    components = pipe.manifest.components
    assert sorted(components) == ["text_encoder", "unet", "vae_decoder"]
    unet = {t.name: (t.shape, t.dtype) for t in components["unet"].inputs}
    assert unet["sample"] == ((2, 7, LOW, LOW), "float32") and unet["class_labels"] == ((2,), "int64")
    assert components["vae_decoder"].outputs[0].shape == (1, 3, HIGH, HIGH)


def test_other_pipelines_are_refused(pipe):
    with pytest.raises(BundleError, match=r"txt2img is not available: .* an upscaler .* runs upscale only"):
        pipe.txt2img(PROMPT, steps=1)


@pytest.mark.parametrize("level", [MAX_NOISE_LEVEL + 1, -1, 20.5, True])
def test_bad_noise_level(pipe, low_res, level):
    with pytest.raises(ValueError, match=f"noise_level must be a whole number from 0 to {MAX_NOISE_LEVEL}"):
        pipe.upscale(PROMPT, low_res, noise_level=level, steps=1)


def test_image_size_must_match_unless_resized(pipe, low_res):
    big = np.repeat(np.repeat(low_res, 2, axis=0), 2, axis=1)
    wanted = rf"image is {2 * LOW}x{2 * LOW} .* built for {LOW}x{LOW}; pass resize=True.*"
    wanted += rf"--height {8 * LOW} --width {8 * LOW} .*--out .* --force`"
    with pytest.raises(ValueError, match=wanted):
        pipe.upscale(PROMPT, big, steps=1)
    images = pipe.upscale(PROMPT, big, steps=1, seed=0, resize=True)
    assert len(images) == 1 and images[0].size == (HIGH, HIGH)


def test_noise_shapes_are_checked(pipe, low_res):
    with pytest.raises(ValueError, match=r"image_noise: shape \(1, 3, 64, 64\) but this bundle needs \(1, 3, 16, 16\)"):
        pipe.upscale(PROMPT, low_res, steps=1, image_noise=np.zeros((1, 3, HIGH, HIGH), np.float32))


def test_broken_upscaler_folders_are_refused(upscaler_model, tmp_path):
    from export.model import ModelError, load_model

    too_many = shutil.copytree(upscaler_model, tmp_path / "too-many-levels")
    index = json.loads((too_many / "model_index.json").read_text())
    (too_many / "model_index.json").write_text(json.dumps({**index, "max_noise_level": 1000}))
    with pytest.raises(ModelError, match="max_noise_level 1000 has no class embedding in the UNet, which has 1000"):
        load_model(too_many)
    no_schedule = shutil.copytree(upscaler_model, tmp_path / "no-low-res-scheduler")
    shutil.rmtree(no_schedule / "low_res_scheduler")
    with pytest.raises(ModelError, match="no low_res_scheduler/"):
        load_model(no_schedule)


def test_cli_upscale_writes_the_api_image(upscaler_bundle, pipe, low_res, tmp_path):
    from PIL import Image

    Image.fromarray(low_res).save(tmp_path / "low.png")
    cmd = [sys.executable, "-m", "runtime", "upscale", PROMPT, "--bundle", str(upscaler_bundle), "--image", str(tmp_path / "low.png")]
    args = ["--steps", "3", "--noise-level", "40", "--seed", "2", "--quiet", "-o", str(tmp_path / "up.png")]
    done = subprocess.run(cmd + args, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    api = pipe.upscale(PROMPT, low_res, steps=3, noise_level=40, seed=2)[0]
    assert_same_image(Image.open(tmp_path / "up.png"), api, "the CLI vs the API")
    done = subprocess.run(cmd + ["--noise-level", "351"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "error: noise_level must be a whole number from 0 to 350" in done.stderr
