"""--precision int8 for SDXL: the base calibrates on its own txt2img runs (both text encoders, time ids) and
passes the gate; the refiner, which has no txt2img, is refused before any export."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from export.build import build, main
from export.int8 import calibration, quantize
from runtime.bundle import read_bundle
from runtime.pipeline import Pipeline

PROMPTS = "a small red circle in the top left on a black background\na large blue square on a white background\n"


@pytest.fixture()
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS)
    return path


def test_sdxl_base_exports_int8_calibrated_on_its_own_conditioning(sdxl_models, prompts_file, tmp_path, monkeypatch):
    monkeypatch.setenv(quantize.CACHE_ENV, str(tmp_path / "cache"))
    out = build(
        sdxl_models["base"], tmp_path / "int8", precision="int8", calibration_prompts=prompts_file, calibration_size=2,
        int8_float_convs=2, log=lambda _: None,
    )  # fmt: skip
    manifest, _ = read_bundle(out)
    unet = manifest.components["unet"]
    assert unet.precision == "int8" and manifest.model.family == "sdxl"
    assert {"text_embeds", "time_ids"} <= {t.name for t in unet.inputs}  # SDXL's added conditioning, calibrated as fed
    ops = [n.op_type for n in onnx.load(str(out / unet.file)).graph.node]
    assert ops.count("QuantizeLinear") > 10
    q = unet.build["quantization"]
    assert q["calibration"]["unet_inputs"] == 2 * calibration.STEPS and q["sensitivity_sweep"]["kept_float"] == 2
    assert unet.verification["passed"] is True
    with Pipeline.load(out) as pipe:
        image = pipe.txt2img(PROMPTS.splitlines()[0], steps=4, seed=1, output_type="np")
    assert image.shape == (1, pipe.height, pipe.width, 3) and np.isfinite(image).all()


def test_the_sdxl_refiner_is_refused_before_any_export(sdxl_models, tmp_path, capsys):
    code = main(["--model", str(sdxl_models["refiner"]), "--precision", "int8", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and "--precision int8 calibrates on txt2img sampling runs, and this bundle would have none" in err
    assert "runs img2img, inpaint only (an SDXL refiner continues from another model's latents)" in err
    assert "build it with --precision fp16 or fp32" in err
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b*"))
