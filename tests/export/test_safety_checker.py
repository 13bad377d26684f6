"""A folder whose model_index.json lists a safety checker (SD 1.5 as released): the bundle leaves it out and says so."""

from __future__ import annotations

import json
import shutil

import pytest

from export.build import build
from runtime.bundle import Manifest, ModelInfo, load_manifest
from runtime.errors import BundleError


def test_the_left_out_safety_checker_is_logged_and_recorded(tiny_model, tmp_path):
    folder = tmp_path / "with-checker"
    shutil.copytree(tiny_model, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index |= {
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "requires_safety_checker": True,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    (folder / "safety_checker").mkdir()
    (folder / "safety_checker" / "config.json").write_text("{}")
    (folder / "safety_checker" / "model.safetensors").write_bytes(b"not read")
    lines: list[str] = []
    out = build(folder, tmp_path / "b", precision="fp32", pipelines="txt2img", log=lines.append)
    said = [line for line in lines if "left out" in line]
    assert len(said) == 1
    assert "left out: feature_extractor, safety_checker" in said[0] and "unfiltered images" in said[0]
    assert "NSFW" in said[0] and "classifier on the output images" in said[0]
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["model"]["omitted"] == ["feature_extractor", "safety_checker"]
    assert not any(k.startswith("safety_checker/") for k in raw["model"]["source_hashes"])
    assert load_manifest(out).model.omitted == ("feature_extractor", "safety_checker")


def test_manifests_without_the_field_still_load(bundle_fp32):
    raw = json.loads((bundle_fp32 / "manifest.json").read_text())
    assert "omitted" not in raw["model"]  # nothing left out: the field is not written
    assert Manifest.from_json(raw).model.omitted == ()
    v1 = {**raw, "schema_version": 1, "model": {k: v for k, v in raw["model"].items() if k != "family"} | {"family": "sd1"}}
    assert Manifest.from_json(v1).model.omitted == ()
    info = ModelInfo("m", omitted=("safety_checker",))
    assert info.to_json()["omitted"] == ["safety_checker"]
    assert Manifest.from_json({**raw, "model": info.to_json()}).model.omitted == ("safety_checker",)
    with pytest.raises(BundleError, match="model.omitted must be a list"):
        Manifest.from_json({**raw, "model": {**raw["model"], "omitted": "safety_checker"}})
