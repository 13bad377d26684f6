"""TensorRT for RTX engines of an fp16 ControlNet bundle (two nets and the UNet that takes their residuals), built for
real without a GPU from the ONNX bundle: every engine's network takes and gives what the manifest says (the builder
checks it), the per-residual conditioning_scale and the float32 residuals included, and the rebuild keeps the nets.
What runs them is tested on stand-ins (tests/runtime/test_controlnet.py, the TensorRT path)."""

from __future__ import annotations

import pytest

from export.build import build
from runtime.bundle import TensorSpec, load_manifest, rebuild_hint
from runtime.control import residual_inputs
from tests.helpers.rtx import build_rtx, check_rtx_bundle, needs_rtx
from tests.helpers.tiny_controlnet import make_tiny_controlnet

pytestmark = needs_rtx


@pytest.fixture(scope="module")
def controlnet_fp16(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("rtx-controlnet")
    nets = [make_tiny_controlnet(tiny_model, root / f"net{i}", seed=i) for i in range(2)]
    source = build(tiny_model, root / "onnx", precision="fp16", pipelines="txt2img", controlnets=tuple(map(str, nets)),
                   log=lambda _: None)  # fmt: skip
    return nets, source


def test_two_controlnets_and_the_residual_unet_build(controlnet_fp16, tmp_path):
    nets, source = controlnet_fp16
    out = build_rtx(source, tmp_path / "rtx")
    check_rtx_bundle(out, source)
    manifest = load_manifest(out)
    residuals = residual_inputs(manifest)
    assert [t.name for t in residuals][-1] == "mid_block_residual" and len(residuals) == 9  # 8 down-block skips + mid
    assert {t.dtype for t in residuals} == {"float32"} and residuals[0].shape == (2, 32, 8, 8)  # the CFG batch, latent size
    for i, net in enumerate(nets):
        c = manifest.components[f"controlnet_{i}"]
        assert c.format == "plan" and c.precision == "fp16" and c.outputs == residuals
        assert c.input("conditioning_scale") == TensorSpec("conditioning_scale", (9,), "float32")  # one factor per residual
        assert c.input("controlnet_cond") == TensorSpec("controlnet_cond", (2, 3, 64, 64), "float32")  # image size, [0, 1]
        assert c.input("sample").shape == manifest.components["unet"].input("sample").shape
        assert c.source_onnx is not None and c.source_onnx.build["controlnet"]["source"] == str(net.resolve())
    hint = rebuild_hint(out, manifest)
    assert hint.count("--controlnet") == 2 and "--backend tensorrt-rtx" in hint
