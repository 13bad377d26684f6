"""Folders saved with save_pretrained(variant=...) (model.fp16.safetensors): the variant is detected, loaded, and named in the log.

Tolerance of the fp16-weights comparison: the fp16 variant holds the plain model's weights rounded to fp16
(relative rounding error up to 2**-11, about 4.9e-4 per weight). Exported and run in fp32, its outputs differ
from the plain model's by what those rounded weights change: measured on the tiny model (seed 1 inputs) at
4.1e-4 (text encoder pooled output) to 9.2e-4 (VAE decoder) of each output's largest value. The test allows
5e-3 of the output range: about five times the measurement, ten times under the 5e-2 gate of an fp16 bundle,
and far below what a wrong or missing weight causes (errors of order 1).
"""

from __future__ import annotations

import json
import shutil

import pytest

from export.build import build, main
from export.model import ModelError, check_layout
from tests.helpers.bundle_outputs import differences

FP16_WEIGHTS_REL_TOL = 5e-3


def _save(tiny_model, out, variant, dtype):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True, dtype=torch.float32)
    pipe.to(dtype).save_pretrained(out, safe_serialization=True, variant=variant)
    return out


@pytest.fixture(scope="module")
def fp16_variant(tiny_model, tmp_path_factory):
    """As a real fp16 variant: the tiny model's weights in float16, under *.fp16.safetensors names only."""
    import torch

    return _save(tiny_model, tmp_path_factory.mktemp("variants") / "tiny-fp16-variant", "fp16", torch.float16)


def test_an_fp16_variant_folder_exports_and_says_which_files(fp16_variant, bundle_fp32, tmp_path):
    names = sorted(f.name for f in fp16_variant.rglob("*.safetensors"))
    assert names == ["diffusion_pytorch_model.fp16.safetensors"] * 2 + ["model.fp16.safetensors"]
    lines: list[str] = []
    out = build(fp16_variant, tmp_path / "b", precision="fp32", log=lines.append)
    weights = next(line for line in lines if line.strip().startswith("weights:"))
    for f in ("text_encoder/model", "unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model"):
        assert f"{f}.fp16.safetensors" in weights
    assert "(variant fp16)" in weights
    assert any("stored in float16" in line for line in lines)
    hashes = json.loads((out / "manifest.json").read_text())["model"]["source_hashes"]
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in hashes
    diffs = differences(bundle_fp32, out)
    print({k: f"{rel:.2e}" for k, (_, rel) in diffs.items()})
    assert all(rel < FP16_WEIGHTS_REL_TOL for _, rel in diffs.values()), diffs
    assert any(rel > 1e-5 for _, rel in diffs.values())  # the fp16 weights were used, not some plain copy


def test_a_same_dtype_variant_matches_the_plain_export(tiny_model, bundle_fp32, tmp_path):
    import torch

    folder = _save(tiny_model, tmp_path / "tiny-ema", "ema", torch.float32)
    out = build(folder, tmp_path / "b", precision="fp32", log=lambda _: None)
    diffs = differences(bundle_fp32, out)
    assert all(abs_err <= 1e-6 for abs_err, _ in diffs.values()), diffs


def test_several_variants_without_plain_weights_are_refused(fp16_variant, tmp_path, capsys):
    both = tmp_path / "both"
    shutil.copytree(fp16_variant, both)
    for f in list(both.rglob("*.fp16.safetensors")):
        shutil.copy2(f, f.with_name(f.name.replace(".fp16.", ".ema.")))
    with pytest.raises(ModelError, match=r"several weight variants \(ema, fp16\) and no plain weights; pass --variant"):
        check_layout(both, allow_pickle=False)
    chosen = check_layout(both, allow_pickle=False, variant="ema")
    assert {w.variant for w in chosen.values()} == {"ema"}
    assert chosen["unet"].files == ("unet/diffusion_pytorch_model.ema.safetensors",)
    code = main(["--model", str(both), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "several weight variants" in err and not (tmp_path / "b").exists()


def test_plain_weights_win_and_a_missing_variant_is_named(tiny_model, tmp_path, capsys):
    assert {w.variant for w in check_layout(tiny_model, allow_pickle=False).values()} == {None}
    code = main(["--model", str(tiny_model), "--out", str(tmp_path / "b"), "--variant", "fp16"])
    err = capsys.readouterr().err
    assert code == 2 and "has no 'fp16' variant weights (it has: plain)" in err and not (tmp_path / "b").exists()
