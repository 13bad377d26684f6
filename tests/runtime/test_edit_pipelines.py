"""img2img and inpainting through exported bundles against diffusers' own pipelines, plus their bad input.

diffusers draws the VAE posterior's noise and the starting noise from its generator; the tests hand
both pipelines the same arrays (ours as arguments, diffusers' through its `randn_tensor`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import runtime
from runtime.errors import BundleError
from tests.helpers import REPO
from tests.helpers.close import assert_same_image
from tests.helpers.tiny_models import make_tiny_sd

PROMPT = "a large blue square in the center on a white background"
STEPS = 10


def picture(size: int = 64) -> Image.Image:
    """A red disc on a gray field with a gradient: structure for the VAE to keep."""
    x = np.linspace(0, 1, size, dtype=np.float32)
    base = np.stack([np.outer(x, np.ones(size)) * 0.5 + 0.25] * 3, axis=-1)
    im = Image.fromarray((base * 255).astype(np.uint8))
    ImageDraw.Draw(im).ellipse((12, 12, 40, 40), fill=(220, 30, 30))
    return im


def box_mask(size: int = 64, box=(32, 8, 60, 56), fill: int = 255) -> Image.Image:
    """White (repaint) inside the box, black (keep) elsewhere."""
    m = Image.new("L", (size, size), 0)
    ImageDraw.Draw(m).rectangle(box, fill=fill)
    return m


IMAGE, MASK = picture(), box_mask()


def draws(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32)


def patch_diffusers_noise(monkeypatch, module, noise, encoder_noise):
    """diffusers' pipeline-level draw gets `noise`, its VAE posterior draw `encoder_noise`."""
    import torch
    from diffusers.models.autoencoders import vae

    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: torch.from_numpy(noise).to(k.get("dtype")))
    monkeypatch.setattr(vae, "randn_tensor", lambda *a, **k: torch.from_numpy(encoder_noise).to(k.get("dtype")))


def diffusers_pipe(cls_name, model_dir, scheduler):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def inpaint_model(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-inpaint", kind="inpaint")


@pytest.fixture(scope="module")
def inpaint_bundle(inpaint_model, tmp_path_factory) -> Path:
    from export.build import build

    return build(inpaint_model, tmp_path_factory.mktemp("engines") / "tiny-inpaint-fp32", precision="fp32", log=lambda _: None)


SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


@pytest.mark.parametrize(
    "strength, sampler, guidance",
    [(0.3, "ddim", 7.5), (0.75, "ddim", 7.5), (1.0, "ddim", 7.5), (0.75, "euler", 3.0), (0.5, "dpmpp_2m", 1.0), (0.62, "unipc", 7.5)],
)
def test_img2img_matches_diffusers(tiny_model, bundle_fp32, strength, sampler, guidance, monkeypatch):
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as module

    pipe = runtime.Pipeline.load(bundle_fp32)
    noise, encoder_noise = draws(pipe.manifest.latent_shape)
    kwargs = dict(strength=strength, guidance_scale=guidance)
    ours = pipe.img2img(PROMPT, IMAGE, steps=STEPS, scheduler=sampler, noise=noise, encoder_noise=encoder_noise, output_type="np", **kwargs)
    patch_diffusers_noise(monkeypatch, module, noise, encoder_noise)
    ref = diffusers_pipe("StableDiffusionImg2ImgPipeline", tiny_model, SCHEDULERS[sampler])(
        PROMPT, image=IMAGE, num_inference_steps=STEPS, output_type="np", **kwargs
    ).images
    assert ours.shape == ref.shape == (1, 64, 64, 3)
    assert ref.std() > 0.01
    assert np.abs(ours - ref).max() <= 1e-3


def test_img2img_strength_sets_how_far_from_the_image(bundle_fp32):
    pipe = runtime.Pipeline.load(bundle_fp32)
    start = pipe.img2img(PROMPT, IMAGE, strength=0.1, steps=STEPS, seed=3, output_type="np")  # one step from the image
    far = pipe.img2img(PROMPT, IMAGE, strength=1.0, steps=STEPS, seed=3, output_type="np")
    original = np.asarray(IMAGE, dtype=np.float32) / 255
    assert np.abs(start[0] - original).mean() < np.abs(far[0] - original).mean()
    again = pipe.img2img(PROMPT, IMAGE, strength=0.1, steps=STEPS, seed=3, output_type="np")
    assert_same_image(start, again, "the same img2img twice")


@pytest.mark.parametrize("strength, sampler", [(1.0, "ddim"), (0.6, "ddim"), (1.0, "euler")])
def test_dedicated_inpainting_unet_matches_diffusers(inpaint_model, inpaint_bundle, strength, sampler, monkeypatch):
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as module

    pipe = runtime.Pipeline.load(inpaint_bundle)
    assert pipe.pipelines == ("inpaint",)
    noise, encoder_noise = draws(pipe.manifest.latent_shape, seed=1)
    ours = pipe.inpaint(
        PROMPT, IMAGE, MASK, strength=strength, steps=STEPS, scheduler=sampler, latents=noise, encoder_noise=encoder_noise, output_type="np"
    )
    patch_diffusers_noise(monkeypatch, module, noise, encoder_noise)
    ref = diffusers_pipe("StableDiffusionInpaintPipeline", inpaint_model, SCHEDULERS[sampler])(
        PROMPT, image=IMAGE, mask_image=MASK, strength=strength, num_inference_steps=STEPS, output_type="np"
    ).images
    assert ref.std() > 0.01
    assert np.abs(ours - ref).max() <= 1e-3


@pytest.mark.parametrize("strength, sampler", [(1.0, "ddim"), (0.75, "ddim"), (1.0, "dpmpp_2m")])
def test_ordinary_unet_inpainting_matches_diffusers(tiny_model, bundle_fp32, strength, sampler, monkeypatch):
    """diffusers' inpaint pipeline on a 4-channel UNet re-imposes the kept latents; without our composite, the same image."""
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as module

    pipe = runtime.Pipeline.load(bundle_fp32)
    noise, encoder_noise = draws(pipe.manifest.latent_shape, seed=2)
    ours = pipe.inpaint(
        PROMPT, IMAGE, MASK, strength=strength, steps=STEPS, scheduler=sampler, latents=noise, encoder_noise=encoder_noise,
        composite=False, output_type="np",
    )  # fmt: skip
    patch_diffusers_noise(monkeypatch, module, noise, encoder_noise)
    ref = diffusers_pipe("StableDiffusionInpaintPipeline", tiny_model, SCHEDULERS[sampler])(
        PROMPT, image=IMAGE, mask_image=MASK, strength=strength, num_inference_steps=STEPS, output_type="np"
    ).images
    assert np.abs(ours - ref).max() <= 1e-3


def test_ordinary_unet_inpainting_keeps_unmasked_pixels_and_changes_the_masked_ones(bundle_fp32):
    pipe = runtime.Pipeline.load(bundle_fp32)
    out = np.asarray(pipe.inpaint(PROMPT, IMAGE, MASK, steps=STEPS, seed=0)[0])
    original = np.asarray(IMAGE)
    keep = np.asarray(MASK) < 128
    np.testing.assert_array_equal(out[keep], original[keep])
    assert np.abs(out[~keep].astype(int) - original[~keep]).mean() > 10, "the masked region was not repainted"
    raw = pipe.inpaint(PROMPT, IMAGE, MASK, steps=STEPS, seed=0, composite=False, output_type="np")[0]
    assert np.abs(raw[keep] * 255 - original[keep]).max() > 1, "without the composite the VAE round trip shows"


def test_soft_masks_are_thresholded_at_half(bundle_fp32):
    """A mask's gray levels: >= 50% white repaints, below keeps, as diffusers binarizes."""
    pipe = runtime.Pipeline.load(bundle_fp32)
    soft = np.asarray(MASK, dtype=np.float32) / 255 * 0.7  # 0.7 inside the box: repaint
    soft[:, :8] = 0.45  # below half: keep
    a = pipe.inpaint(PROMPT, IMAGE, soft, steps=3, seed=5, output_type="np")
    b = pipe.inpaint(PROMPT, IMAGE, MASK, steps=3, seed=5, output_type="np")
    assert_same_image(a, b, "a soft mask vs its binary twin")


def test_degenerate_masks_warn_and_do_the_sensible_thing(bundle_fp32):
    pipe = runtime.Pipeline.load(bundle_fp32)
    with pytest.warns(UserWarning, match=r"mask_image is all black \(keep everything\): nothing to repaint"):
        out = pipe.inpaint(PROMPT, IMAGE, Image.new("L", (64, 64), 0), steps=3, seed=0)
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(IMAGE))
    with pytest.warns(UserWarning, match=r"mask_image is all white: the whole image is repainted"):
        full = pipe.inpaint(PROMPT, IMAGE, Image.new("L", (64, 64), 255), steps=3, seed=0, output_type="np")
    assert np.abs(full[0] - np.asarray(IMAGE, dtype=np.float32) / 255).mean() > 0.05


def test_wrong_image_size_is_refused_and_resize_offered(bundle_fp32):
    pipe = runtime.Pipeline.load(bundle_fp32)
    big = IMAGE.resize((96, 80))
    with pytest.raises(
        ValueError, match=r"image is 96x80 \(width x height\) but this bundle's engines are built for 64x64; pass resize=True"
    ):
        pipe.img2img(PROMPT, big, steps=3, seed=0)
    with pytest.raises(ValueError, match=r"mask_image is 96x80"):
        pipe.inpaint(PROMPT, IMAGE, MASK.resize((96, 80)), steps=3, seed=0)
    out = pipe.img2img(PROMPT, big, steps=3, seed=0, resize=True)
    assert out[0].size == (64, 64)


@pytest.mark.parametrize(
    "strength, message",
    [(0.0, r"strength must be in \(0, 1\]"), (1.5, r"strength must be in \(0, 1\]"), (0.05, r"leaves no denoising step")],
)
def test_bad_strength_is_refused_by_message(bundle_fp32, strength, message):
    pipe = runtime.Pipeline.load(bundle_fp32)
    with pytest.raises(ValueError, match=message):
        pipe.img2img(PROMPT, IMAGE, strength=strength, steps=STEPS, seed=0)


def test_bad_noise_shape_is_refused_by_message(bundle_fp32):
    pipe = runtime.Pipeline.load(bundle_fp32)
    with pytest.raises(ValueError, match=r"noise: shape \(1, 4, 16, 16\) but this bundle needs \(1, 4, 8, 8\)"):
        pipe.img2img(PROMPT, IMAGE, steps=3, noise=np.zeros((1, 4, 16, 16), np.float32))
    with pytest.raises(ValueError, match=r"encoder_noise: shape \(2, 4, 8, 8\)"):
        pipe.inpaint(PROMPT, IMAGE, MASK, steps=3, encoder_noise=np.zeros((2, 4, 8, 8), np.float32))


def test_pipelines_a_bundle_was_not_built_for_are_refused_with_the_flag(tiny_model, tmp_path, inpaint_bundle):
    out = tmp_path / "txt2img-only"
    done = subprocess.run(
        [sys.executable, "-m", "export.build", "--model", str(tiny_model), "--precision", "fp32", "--pipelines", "txt2img",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    pipe = runtime.Pipeline.load(out)
    assert pipe.pipelines == ("txt2img",) and "vae_encoder" not in pipe.manifest.components
    with pytest.raises(
        BundleError,
        match=(
            r"img2img is not available: .* built for txt2img only; "
            r"rebuild it with `python -m export.build --model \S+ --precision fp32 .* --pipelines txt2img,img2img,inpaint "
            rf"--out {out} --force`"
        ),
    ):
        pipe.img2img(PROMPT, IMAGE, steps=3)
    inpainter = runtime.Pipeline.load(inpaint_bundle)
    with pytest.raises(BundleError, match=r"txt2img is not available: .* holds an inpainting model .* runs inpaint only"):
        inpainter.txt2img(PROMPT, steps=3)


def test_export_refuses_pipelines_the_model_cannot_run(inpaint_model):
    from export.build import build

    with pytest.raises(ValueError, match=r"--pipelines 'txt2img': tiny-inpaint \(inpainting model\) runs inpaint; it cannot run txt2img"):
        build(inpaint_model, precision="fp32", pipelines="txt2img", log=lambda _: None)


def test_manifest_records_kind_and_pipelines(bundle_fp32, inpaint_bundle):
    for bundle, kind, pipelines in (
        (bundle_fp32, "text2image", ("txt2img", "img2img", "inpaint")),
        (inpaint_bundle, "inpainting", ("inpaint",)),
    ):
        pipe = runtime.Pipeline.load(bundle)
        assert pipe.manifest.model.kind == kind and pipe.pipelines == pipelines
        assert "vae_encoder" in pipe.manifest.components


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "runtime", *map(str, args)], cwd=cwd, capture_output=True, text=True)


def test_cli_img2img_and_inpaint_write_images(bundle_fp32, tmp_path):
    IMAGE.save(tmp_path / "in.png")
    MASK.save(tmp_path / "mask.png")
    common = ("--bundle", bundle_fp32, "--steps", 4, "--seed", 3, "--quiet")
    done = run_cli("img2img", PROMPT, "--image", tmp_path / "in.png", "--strength", 0.5, "-o", tmp_path / "a.png", *common)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and Image.open(tmp_path / "a.png").size == (64, 64)
    done = run_cli("inpaint", PROMPT, "--image", tmp_path / "in.png", "--mask", tmp_path / "mask.png", "-o", tmp_path / "b.png", *common)
    assert done.returncode == 0, done.stderr
    out, keep = np.asarray(Image.open(tmp_path / "b.png")), np.asarray(MASK) < 128
    np.testing.assert_array_equal(out[keep], np.asarray(IMAGE)[keep])
    api = runtime.Pipeline.load(bundle_fp32).inpaint(PROMPT, IMAGE, MASK, steps=4, seed=3)[0]
    assert_same_image(out, api, "the CLI vs the API with the same seed")  # another process


def test_cli_edit_errors_are_one_line_messages(bundle_fp32, tmp_path):
    IMAGE.resize((32, 32)).save(tmp_path / "small.png")
    done = run_cli("img2img", PROMPT, "--bundle", bundle_fp32, "--image", tmp_path / "small.png", "--steps", 3)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    refusal = "error: image is 32x32 (width x height) but this bundle's engines are built for 64x64; pass resize=True (CLI: --resize)"
    assert refusal in done.stderr
    done = run_cli("img2img", PROMPT, "--bundle", bundle_fp32, "--image", tmp_path / "nope.png")
    assert done.returncode == 2 and f"error: --image {tmp_path / 'nope.png'} does not exist" in done.stderr
    (tmp_path / "text.png").write_text("not an image")
    done = run_cli("inpaint", PROMPT, "--bundle", bundle_fp32, "--image", tmp_path / "text.png", "--mask", tmp_path / "text.png")
    assert done.returncode == 2 and "is not an image file PIL can read" in done.stderr
    done = run_cli("upscale", PROMPT, "--bundle", bundle_fp32, "--image", tmp_path / "small.png")
    assert done.returncode == 2 and "error: upscale is not available" in done.stderr
