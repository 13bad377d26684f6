"""ControlNet bundles against diffusers' ControlNet pipelines (txt2img, img2img, inpaint, LCM), multi-net included,
and their refusals: wrong control image size, a net count that does not fit, a bundle without ControlNets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import runtime
from runtime.errors import BundleError
from tests.helpers.tiny_controlnet import make_tiny_controlnet
from tests.helpers.tiny_models import make_tiny_sd

PROMPT = "a small red circle in the top left on a black background"
STEPS = 6
QUIET = {"log": lambda _: None}


def silhouette(box=(10, 20, 44, 54), ellipse: bool = True) -> Image.Image:
    im = Image.new("RGB", (64, 64), 0)
    (ImageDraw.Draw(im).ellipse if ellipse else ImageDraw.Draw(im).rectangle)(box, fill=(255, 255, 255))
    return im


A, B = silhouette(), silhouette((30, 4, 60, 30), ellipse=False)


@pytest.fixture(scope="module")
def nets(tiny_model, tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("controlnets")
    return [make_tiny_controlnet(tiny_model, folder / f"net{i}", seed=i) for i in range(2)]


@pytest.fixture(scope="module")
def bundle(tiny_model, nets, tmp_path_factory) -> Path:
    from export.build import build

    out = tmp_path_factory.mktemp("engines") / "tiny-controlnet"
    return build(tiny_model, out, precision="fp32", controlnets=tuple(map(str, nets)), **QUIET)


def diffusers_pipe(cls_name: str, model: Path, nets: list[Path], scheduler: str = "DDIMScheduler"):
    import diffusers
    from diffusers import ControlNetModel

    loaded = [ControlNetModel.from_pretrained(n) for n in nets]
    pipe = getattr(diffusers, cls_name).from_pretrained(
        model, controlnet=loaded[0] if len(loaded) == 1 else loaded, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def patch_noise(monkeypatch, module, noise, encoder_noise):
    import torch
    from diffusers.models.autoencoders import vae

    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: torch.from_numpy(noise).to(k.get("dtype")))
    monkeypatch.setattr(vae, "randn_tensor", lambda *a, **k: torch.from_numpy(encoder_noise).to(k.get("dtype")))


def noises(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32)


CASES = {  # ours (per net, None: net left out), diffusers' keywords (the nets it loads: those given)
    "one net": ({"control_image": [A, None]}, {}),
    "two nets, scales and windows": (
        {"control_image": [A, B], "controlnet_conditioning_scale": [0.7, 1.3], "control_guidance_start": [0.0, 0.3],
         "control_guidance_end": [0.5, 1.0]},
        {"controlnet_conditioning_scale": [0.7, 1.3], "control_guidance_start": [0.0, 0.3], "control_guidance_end": [0.5, 1.0]},
    ),
    "guess mode": ({"control_image": [A, None], "guess_mode": True, "controlnet_conditioning_scale": 1.5},
                   {"guess_mode": True, "controlnet_conditioning_scale": 1.5}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_txt2img_matches_diffusers_controlnet_pipeline(tiny_model, nets, bundle, case):
    import torch

    ours_kw, theirs_kw = CASES[case]
    used = [n for n, im in zip(nets, ours_kw["control_image"]) if im is not None]
    images = [im for im in ours_kw["control_image"] if im is not None]
    pipe = runtime.Pipeline.load(bundle)
    latents = noises(pipe.manifest.latent_shape)[0]
    ours = pipe.txt2img(PROMPT, steps=STEPS, guidance_scale=6.0, latents=latents, output_type="np", **ours_kw)
    plain = pipe.txt2img(PROMPT, steps=STEPS, guidance_scale=6.0, latents=latents, output_type="np")
    ref = diffusers_pipe("StableDiffusionControlNetPipeline", tiny_model, used)(
        PROMPT, image=images[0] if len(images) == 1 else images, num_inference_steps=STEPS, guidance_scale=6.0,
        latents=torch.from_numpy(latents), output_type="np", **theirs_kw,
    ).images  # fmt: skip
    assert np.abs(ours - plain).max() > 0.02, "the ControlNet did not change the image: the test would prove nothing"
    assert np.abs(ours - ref).max() <= 1e-3


def test_img2img_matches_diffusers_with_its_default_scale(tiny_model, nets, bundle, monkeypatch):
    """Over the steps that run (strength 0.6), with StableDiffusionControlNetImg2ImgPipeline's default scale 0.8."""
    from diffusers.pipelines.controlnet import pipeline_controlnet_img2img as module

    pipe = runtime.Pipeline.load(bundle)
    noise, encoder_noise = noises(pipe.manifest.latent_shape, seed=1)
    window = {"control_guidance_start": [0.2, 0.0], "control_guidance_end": [1.0, 0.6]}
    ours = pipe.img2img(
        PROMPT, B, strength=0.6, steps=10, noise=noise, encoder_noise=encoder_noise, output_type="np", control_image=[A, B], **window
    )
    patch_noise(monkeypatch, module, noise, encoder_noise)
    ref = diffusers_pipe("StableDiffusionControlNetImg2ImgPipeline", tiny_model, nets)(
        PROMPT, image=B, control_image=[A, B], strength=0.6, num_inference_steps=10, output_type="np", **window
    ).images
    assert np.abs(ours - ref).max() <= 1e-3


def test_inpaint_matches_diffusers_with_its_default_scale(tiny_model, nets, bundle, monkeypatch):
    """An ordinary UNet (diffusers re-imposes the kept latents; ours without the composite), scale default 0.5."""
    from diffusers.pipelines.controlnet import pipeline_controlnet_inpaint as module

    pipe = runtime.Pipeline.load(bundle)
    noise, encoder_noise = noises(pipe.manifest.latent_shape, seed=2)
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((8, 16, 48, 60), fill=255)
    ours = pipe.inpaint(
        PROMPT, B, mask, steps=STEPS, latents=noise, encoder_noise=encoder_noise, composite=False, output_type="np",
        control_image=[A, None],
    )  # fmt: skip
    patch_noise(monkeypatch, module, noise, encoder_noise)
    ref = diffusers_pipe("StableDiffusionControlNetInpaintPipeline", tiny_model, nets[:1])(
        PROMPT, image=B, mask_image=mask, control_image=A, num_inference_steps=STEPS, output_type="np"
    ).images
    assert np.abs(ours - ref).max() <= 1e-3


def test_lcm_student_takes_a_controlnet(tmp_path, monkeypatch):
    """Guidance embedded (an LCM UNet): the ControlNet runs at the UNet's batch B, as diffusers' pipeline with LCM."""
    import torch
    from diffusers.schedulers import scheduling_lcm

    from export.build import build

    model = make_tiny_sd(tmp_path / "lcm", kind="lcm")
    net = make_tiny_controlnet(model, tmp_path / "net")
    bundle = build(model, tmp_path / "bundle", precision="fp32", pipelines="txt2img", controlnets=(str(net),), **QUIET)
    pipe = runtime.Pipeline.load(bundle)
    assert pipe.manifest.guidance == "embedded"
    assert pipe.manifest.components["controlnet_0"].input("sample").shape[0] == 1
    latents = noises(pipe.manifest.latent_shape)[0]
    ours = pipe.txt2img(PROMPT, steps=4, guidance_scale=5.0, seed=3, latents=latents, output_type="np", control_image=A)
    rng = np.random.default_rng(3)  # diffusers' LCM steps get the noise our sampler drew, in order
    draw = lambda shape, **_: torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32))  # noqa: E731
    monkeypatch.setattr(scheduling_lcm, "randn_tensor", draw)
    ref = diffusers_pipe("StableDiffusionControlNetPipeline", model, [net], "LCMScheduler")(
        PROMPT, image=A, num_inference_steps=4, guidance_scale=5.0, latents=torch.from_numpy(latents), output_type="np"
    ).images
    assert np.abs(ours - ref).max() <= 1e-3


def test_control_image_of_another_size_is_refused_with_the_resize_option(bundle):
    pipe = runtime.Pipeline.load(bundle)
    big = A.resize((96, 80))
    with pytest.raises(ValueError, match=r"control_image\[0\] is 96x80 \(width x height\).*pass control_resize=True"):
        pipe.txt2img(PROMPT, steps=2, seed=0, control_image=[big, None])
    resized = pipe.txt2img(PROMPT, steps=2, seed=0, control_image=[big, None], control_resize=True, output_type="np")
    assert resized.shape == (1, 64, 64, 3)


def test_control_settings_that_do_not_fit_are_refused(bundle):
    pipe = runtime.Pipeline.load(bundle)
    with pytest.raises(ValueError, match=r"has 2 ControlNets, so pass a list of 2 images"):
        pipe.txt2img(PROMPT, steps=2, control_image=A)
    with pytest.raises(ValueError, match=r"controlnet_conditioning_scale: 3 values for a bundle with 2 ControlNets"):
        pipe.txt2img(PROMPT, steps=2, control_image=[A, B], controlnet_conditioning_scale=[1, 1, 1])
    with pytest.raises(ValueError, match=r"need 0 <= start < end <= 1"):
        pipe.txt2img(PROMPT, steps=2, control_image=[A, B], control_guidance_start=0.8, control_guidance_end=0.2)


def test_a_bundle_without_controlnet_says_how_to_build_one(bundle_fp32):
    pipe = runtime.Pipeline.load(bundle_fp32)
    with pytest.raises(BundleError, match=r"this bundle has no ControlNet; rebuild it with one: `python -m export\.build .* --controlnet"):
        pipe.txt2img(PROMPT, steps=2, control_image=A)


def test_manifest_records_each_net_and_the_rebuild_keeps_them(bundle, nets):
    from runtime.bundle import load_manifest, rebuild_hint

    manifest = load_manifest(bundle)
    unet_inputs = [t.name for t in manifest.components["unet"].inputs]
    assert "mid_block_residual" in unet_inputs and "down_block_residual_0" in unet_inputs
    for i, net in enumerate(nets):
        c = manifest.components[f"controlnet_{i}"]
        assert c.build["controlnet"]["source"] == str(net.resolve())
        assert [t.name for t in c.outputs] == [n for n in unet_inputs if n.startswith(("down_block_residual", "mid_block"))]
        assert c.verification["passed"]
    assert rebuild_hint(bundle, manifest).count("--controlnet") == 2


def test_a_controlnet_for_another_unet_is_refused(tiny_model, nets, tmp_path):
    import json
    import shutil

    from export.build import build
    from export.model import ModelError

    other = shutil.copytree(nets[0], tmp_path / "net")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 48}))  # made for a wider text encoder
    with pytest.raises(ModelError, match=r"was made for another UNet: its cross_attention_dim is 48, the model's UNet has 32"):
        build(tiny_model, tmp_path / "b", precision="fp32", controlnets=(str(other),), **QUIET)
    assert not (tmp_path / "b").exists()


def test_tensorrt_road_builds_and_verifies_the_nets_and_the_residual_unet(bundle, tmp_path):
    """--from-onnx with the stand-in builder (tests/export/test_tensorrt_offline.py): every component, the nets included,
    is built and gated on the fixed inputs (control image in [0, 1], residuals), and keeps where it came from."""
    from runtime.bundle import load_manifest
    from tests.export.test_tensorrt_offline import offline_build

    manifest = load_manifest(offline_build(bundle, tmp_path / "trt"))
    assert {"controlnet_0", "controlnet_1", "unet"} <= set(manifest.components)
    for name in ("controlnet_0", "controlnet_1", "unet"):
        component = manifest.components[name]
        assert component.format == "plan" and component.verification["passed"]
    assert [t.name for t in manifest.components["controlnet_0"].outputs][-1] == "mid_block_residual"


def test_the_tensorrt_path_feeds_the_nets_and_the_residual_unet(bundle, tmp_path, monkeypatch):
    """The runtime's TensorRT path (pinned buffers, copies, every net's inputs, the residual inputs) on a TensorRT-for-RTX
    bundle of this one, on a machine with `tensorrt_rtx` and not `tensorrt`: stand-in engines that compute what their
    ONNX does give the ONNX bundle's image, two nets with scales and windows included."""
    import sys

    from export.tensorrt import from_onnx
    from runtime.backends import runtime_cache
    from runtime.backends.libraries import TENSORRT_RTX
    from tests.helpers import fake_tensorrt
    from tests.runtime.test_tensorrt_rtx_runtime import BUILT, fake_plan

    monkeypatch.setattr(from_onnx, "engines_can_run", lambda library: False)
    rtx = from_onnx.build_from_onnx(bundle, tmp_path / "rtx", build=fake_plan, device=BUILT, library=TENSORRT_RTX, **QUIET)
    gpu = fake_tensorrt.Gpu(name=b"NVIDIA GeForce RTX 4090", major=8, minor=9)
    fake_tensorrt.install(monkeypatch, gpu, {}, BUILT.tensorrt, "tensorrt_rtx", plans=fake_tensorrt.onnx_backed_plans(rtx))
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` fails, as where only TensorRT for RTX is installed
    monkeypatch.setenv(runtime_cache.ENV, str(tmp_path / "cache"))
    keywords = {**CASES["two nets, scales and windows"][0], "steps": 3, "seed": 1, "output_type": "np"}
    with runtime.Pipeline.load(rtx, cuda_graph=True) as engines, runtime.Pipeline.load(bundle) as onnx:
        assert {type(e).__name__ for e in engines.engines.values()} == {"TrtEngine"}
        ours, ref = engines.txt2img(PROMPT, **keywords), onnx.txt2img(PROMPT, **keywords)
        assert {"controlnet_0", "controlnet_1"} <= set(engines.engines)
    assert np.abs(ours - ref).max() <= 1e-5


def controlled_bundle(root: Path, kind: str, **options) -> tuple[Path, Path, Path]:
    """A tiny model of `kind`, a random net for it, and their fp32 txt2img bundle: (model, net, bundle)."""
    from export.build import build

    model = make_tiny_sd(root / kind, kind=kind)
    net = make_tiny_controlnet(model, root / f"{kind}-net")
    return model, net, build(model, root / f"{kind}-bundle", precision="fp32", pipelines="txt2img", controlnets=(str(net),),
                             **options, **QUIET)  # fmt: skip


def test_sd2_v_prediction_matches_diffusers_controlnet_pipeline(tmp_path):
    """SD 2.x: linear-projection attention in the net and the UNet, v-prediction, the '!'-padding tokenizer."""
    import torch

    model, net, bundle = controlled_bundle(tmp_path, "sd2")
    pipe = runtime.Pipeline.load(bundle)
    assert pipe.schedule.prediction_type == "v_prediction"
    latents = noises(pipe.manifest.latent_shape, seed=4)[0]
    ours = pipe.txt2img(PROMPT, steps=STEPS, guidance_scale=6.0, latents=latents, output_type="np", control_image=A,
                        controlnet_conditioning_scale=1.2, control_guidance_start=0.2)  # fmt: skip
    plain = pipe.txt2img(PROMPT, steps=STEPS, guidance_scale=6.0, latents=latents, output_type="np")
    ref = diffusers_pipe("StableDiffusionControlNetPipeline", model, [net])(
        PROMPT, image=A, num_inference_steps=STEPS, guidance_scale=6.0, latents=torch.from_numpy(latents), output_type="np",
        controlnet_conditioning_scale=1.2, control_guidance_start=0.2,
    ).images  # fmt: skip
    assert np.abs(ours - plain).max() > 0.02, "the ControlNet did not change the image: the test would prove nothing"
    assert np.abs(ours - ref).max() <= 1e-3


@pytest.fixture(scope="module")
def unguided(tmp_path_factory) -> tuple[Path, Path, Path]:
    """SD-Turbo's shape exported with --guidance none: UNet and net at batch B, no negative half."""
    return controlled_bundle(tmp_path_factory.mktemp("unguided"), "turbo", guidance="none")


@pytest.mark.parametrize("guess", [False, True])
def test_guidance_none_matches_diffusers_without_cfg(unguided, guess):
    """diffusers runs no CFG at guidance_scale <= 1; guess mode then only scales the residuals (no negative half to leave out)."""
    import torch

    model, net, bundle = unguided
    pipe = runtime.Pipeline.load(bundle)
    assert pipe.manifest.guidance == "none" and pipe.manifest.components["controlnet_0"].input("sample").shape[0] == 1
    latents = noises(pipe.manifest.latent_shape, seed=5)[0]
    keywords = {"guess_mode": guess, "controlnet_conditioning_scale": 1.5}
    ours = pipe.txt2img(PROMPT, steps=2, guidance_scale=0.0, latents=latents, output_type="np", control_image=A, **keywords)
    plain = pipe.txt2img(PROMPT, steps=2, guidance_scale=0.0, latents=latents, output_type="np")
    ref = diffusers_pipe("StableDiffusionControlNetPipeline", model, [net], "EulerDiscreteScheduler")(
        PROMPT, image=A, num_inference_steps=2, guidance_scale=0.0, latents=torch.from_numpy(latents), output_type="np", **keywords
    ).images
    assert np.abs(ours - plain).max() > 0.02, "the ControlNet did not change the image: the test would prove nothing"
    assert np.abs(ours - ref).max() <= 1e-3
