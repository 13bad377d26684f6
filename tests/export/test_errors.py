"""export.build refuses bad input with a message that names the problem, and never half-writes a bundle."""

from __future__ import annotations

import json
import shutil

import pytest

from export import gates
from export.build import build, main
from export.model import ModelError
from export.verify import VerificationError
from runtime.backends.tensorrt import TensorRTMissing, tensorrt_available
from tests.helpers import REPO


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def test_missing_model_folder(capsys, tmp_path):
    code, err = run_cli(capsys, "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "b"))
    assert code == 2 and "does not exist" in err and "--model" in err


def test_incomplete_model_folder(tiny_model, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    shutil.rmtree(broken / "unet")
    code, err = run_cli(capsys, "--model", str(broken), "--out", str(tmp_path / "b"))
    assert code == 2 and "incomplete" in err and "unet/" in err
    (broken / "model_index.json").unlink()
    code, err = run_cli(capsys, "--model", str(broken), "--out", str(tmp_path / "b"))
    assert code == 2 and "model_index.json" in err


@pytest.mark.parametrize(
    ("pipeline", "what"),
    [
        ("StableDiffusion3Pipeline", "SD3 (an MMDiT transformer"),
        ("StableDiffusionXLControlNetPipeline", "an SDXL variant this SDK does not export"),
    ],
)
def test_a_folder_of_another_family_is_refused_by_name(tiny_model, tmp_path, capsys, pipeline, what):
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": pipeline}))
    code, err = run_cli(capsys, "--model", str(other), "--out", str(tmp_path / "b"))
    assert code == 2 and err.count("\n") == 1
    assert f"is a {pipeline} folder: {what}" in err and "exports the Stable Diffusion 1.x/2.x family" in err
    assert not (tmp_path / "b").exists()


def test_a_second_text_encoder_under_an_sd_pipeline_is_refused(tiny_model, tmp_path, capsys):
    """SDXL used to export text_encoder, ignore text_encoder_2 and end in a diffusers traceback: text_encoder_2/ under
    a pipeline class that has none is a folder whose index is wrong, said so."""
    odd = tmp_path / "odd"
    shutil.copytree(tiny_model, odd)
    shutil.copytree(odd / "text_encoder", odd / "text_encoder_2")
    code, err = run_cli(capsys, "--model", str(odd), "--out", str(tmp_path / "b"))
    assert code == 2 and err.count("\n") == 1
    assert "has text_encoder_2/ but model_index.json names StableDiffusionPipeline" in err and "_class_name" in err


def test_pickle_weights_need_allow_pickle(tiny_model, tmp_path):
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model, pickled)
    weights = pickled / "vae" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), pickled / "vae" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ModelError, match="only pickle weights.*--allow-pickle"):
        build(pickled, tmp_path / "b", precision="fp32", log=lambda _: None)
    assert not (tmp_path / "b").exists()
    out = build(pickled, tmp_path / "b", precision="fp32", allow_pickle=True, log=lambda _: None)
    assert (out / "manifest.json").is_file()


def test_size_must_fit_the_vae_and_unet(tiny_model, tmp_path, capsys):
    code, err = run_cli(capsys, "--model", str(tiny_model), "--out", str(tmp_path / "b"), "--height", "100")
    assert code == 2 and "--height 100 is not a positive multiple of 64" in err
    assert not (tmp_path / "b").exists()


def test_unknown_precision(tiny_model, tmp_path, capsys):
    code, err = run_cli(capsys, "--model", str(tiny_model), "--out", str(tmp_path / "b"), "--precision", "fp8")
    assert code == 2 and "unknown precision 'fp8'" in err and "fp32, fp16" in err


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed here")
def test_tensorrt_backend_missing_is_refused(tiny_model, tmp_path):
    with pytest.raises(TensorRTMissing, match="--backend tensorrt needs TensorRT.*pip install tensorrt.*--backend onnxruntime"):
        build(tiny_model, tmp_path / "b", backend="tensorrt", log=lambda _: None)


def test_existing_output_needs_force(bundle_fp32, tiny_model, capsys):
    before = (bundle_fp32 / "manifest.json").read_text()
    code, err = run_cli(capsys, "--model", str(tiny_model), "--out", str(bundle_fp32))
    assert code == 2 and "already exists" in err and "--force" in err
    assert (bundle_fp32 / "manifest.json").read_text() == before


def test_failed_verification_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    """A build over its gate raises and leaves neither a bundle nor a staging folder behind."""
    monkeypatch.setitem(gates.TOLERANCE, "fp32", 0.0)
    out = tmp_path / "engines" / "b"
    with pytest.raises(VerificationError, match="text_encoder: the fp32 ONNX differs"):
        build(tiny_model, out, precision="fp32", log=lambda _: None)
    assert list((tmp_path / "engines").iterdir()) == []


def test_force_replaces_a_bundle(tiny_model, bundle_fp32, tmp_path):
    out = shutil.copytree(bundle_fp32, tmp_path / "b")  # only a bundle is replaced (tests/export/test_hardening.py)
    (out / "stale.txt").write_text("old")
    build(tiny_model, out, precision="fp32", force=True, log=lambda _: None)
    assert not (out / "stale.txt").exists() and (out / "manifest.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_manifest_contract(bundle_fp32, tiny_model):
    m = json.loads((bundle_fp32 / "manifest.json").read_text())
    assert m["schema"] == "ldm-deploy/bundle" and m["schema_version"] == 2
    assert (m["model"]["family"], m["model"]["architecture"], m["model"]["kind"]) == ("sd", "custom", "text2image")
    assert m["image"] == {"height": 64, "width": 64, "batch_size": 1}
    assert m["guidance"] == {"mode": "cfg", "unet_batch": 2}
    assert m["scheduler"]["class_name"] == "DDIMScheduler" and m["scheduler"]["config"]["steps_offset"] == 1
    assert m["vae"]["downscale_factor"] == 8 and m["vae"]["latent_channels"] == 4
    assert m["tokenizer"]["max_length"] == 77
    unet = m["components"]["unet"]
    assert [(t["name"], t["shape"]) for t in unet["inputs"]] == [
        ("sample", [2, 4, 8, 8]),
        ("timestep", [2]),
        ("encoder_hidden_states", [2, 77, 32]),
    ]
    assert set(m["components"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    for name, c in m["components"].items():
        assert c["verification"]["passed"] and c["verification"]["rel_err"] < 1e-4, name
        assert c["file"] in m["files"]
    assert {"tokenizer/vocab.json", "tokenizer/merges.txt"} <= set(m["files"])
    assert "unet/diffusion_pytorch_model.safetensors" in m["model"]["source_hashes"]


def test_default_bundle_name(tiny_model, tmp_path, monkeypatch):
    """The checkout's engines/ folder, whatever the working directory: runtime's default --bundle looks there too."""
    from export import from_model as onnx_bundle
    from runtime.cli import DEFAULT_BUNDLE

    monkeypatch.setattr(onnx_bundle, "ENGINES", tmp_path / "engines")
    monkeypatch.chdir(tmp_path)
    out = build(tiny_model, precision="fp16", log=lambda _: None)
    assert out == tmp_path / "engines" / "tiny-sd-64x64-b1-fp16-onnxruntime"
    assert DEFAULT_BUNDLE.parent == REPO / "engines" and DEFAULT_BUNDLE.is_absolute()


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda m: (m / "model_index.json").write_text("{not json"), "model_index.json is not valid JSON"),
        (lambda m: (m / "scheduler" / "scheduler_config.json").write_text("[1, 2]"), "scheduler_config.json holds a JSON list"),
        (lambda m: (m / "SHA256SUMS").write_text("deadbeef unet/config.json\n"), "SHA256SUMS line 1 is not `<sha256> <file>`"),
    ],
)
def test_broken_model_files_are_named(tiny_model, tmp_path, capsys, damage, named):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    damage(model)
    code, err = run_cli(capsys, "--model", str(model), "--out", str(tmp_path / "b"))
    assert code == 2 and err.count("\n") == 1 and named in err and "Traceback" not in err
