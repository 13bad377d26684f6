"""TensorRT for RTX engines for the tiny SDXL base (two text encoders, time ids) and refiner (no first encoder,
aesthetic score), built for real without a GPU from the session's ONNX bundles. The second text encoder is 48 wide
with 4 heads; a width of 40 (4 heads) stops TensorRT for RTX 1.7's ahead-of-time build with a Myelin error."""

from __future__ import annotations

import pytest

from runtime.bundle import load_manifest
from tests.helpers.rtx import build_rtx, check_rtx_bundle, needs_rtx

pytestmark = needs_rtx


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_sdxl_bundles_build_with_tensorrt_for_rtx(which, sdxl_base_bundle, sdxl_refiner_bundle, tmp_path):
    source = {"base": sdxl_base_bundle, "refiner": sdxl_refiner_bundle}[which]
    out = build_rtx(source, tmp_path / which)
    check_rtx_bundle(out, source)
    m = load_manifest(out)
    assert ("text_encoder" in m.components) == (which == "base") and "text_encoder_2" in m.components
    unet_inputs = {t.name for t in m.components["unet"].inputs}
    assert {"text_embeds", "time_ids"} <= unet_inputs


def test_sdxl_speed_levers_build_with_tensorrt_for_rtx(sdxl_models, tmp_path):
    """--tiny-vae (taesdxl's place) and --deepcache 1: the tiny VAE's engines and DeepCache's pair; SDXL's shallow UNet
    reads no text context, only the pooled embedding and time ids beside the cached feature."""
    from export.build import build
    from runtime.bundle.levers import DEEP_FEATURE
    from tests.helpers.tiny_models import make_tiny_taesd

    taesd = make_tiny_taesd(tmp_path / "taesdxl")
    source = build(sdxl_models["base"], tmp_path / "onnx", precision="fp32", tiny_vae=taesd, deepcache=1,
                   pipelines="txt2img,img2img", log=lambda _: None)  # fmt: skip
    out = build_rtx(source, tmp_path / "rtx")
    check_rtx_bundle(out, source)
    c = load_manifest(out).components
    assert {"vae_decoder_tiny", "vae_encoder_tiny", "unet_deepcache", "unet_shallow"} <= set(c)
    shallow = [t.name for t in c["unet_shallow"].inputs]
    assert shallow == ["sample", "timestep", "text_embeds", "time_ids", DEEP_FEATURE]
    assert c["unet_shallow"].input(DEEP_FEATURE) == c["unet_deepcache"].outputs[1]


def test_an_sdxl_controlnet_bundle_builds_with_tensorrt_for_rtx(sdxl_models, tmp_path):
    """The net takes the UNet's text_embeds and time_ids too; its residuals are the UNet's inputs."""
    from export.build import build
    from runtime.control import residual_inputs
    from tests.helpers.tiny_controlnet import make_tiny_controlnet

    net = make_tiny_controlnet(sdxl_models["base"], tmp_path / "net")
    source = build(sdxl_models["base"], tmp_path / "onnx", precision="fp32", pipelines="txt2img", controlnets=(str(net),),
                   log=lambda _: None)  # fmt: skip
    out = build_rtx(source, tmp_path / "rtx")
    check_rtx_bundle(out, source)
    m = load_manifest(out)
    names = [t.name for t in m.components["controlnet_0"].inputs]
    assert names == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids", "controlnet_cond", "conditioning_scale"]
    assert m.components["controlnet_0"].outputs == residual_inputs(m)
