"""The runtime refuses broken bundles and bad requests with messages that name the problem and the fix."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import runtime
from runtime.bundle import SCHEMA_VERSION, Manifest
from runtime.errors import BundleError, Cancelled, FeedError
from runtime.tokenizer import PromptTruncatedWarning

PROMPT = "a blue square"


@pytest.fixture
def bundle_copy(bundle_fp32, tmp_path):
    return shutil.copytree(bundle_fp32, tmp_path / "bundle")


def test_missing_file(bundle_copy):
    (bundle_copy / "unet" / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"missing unet/model.onnx.*--force"):
        runtime.Pipeline.load(bundle_copy)


def test_altered_file(bundle_copy):
    f = bundle_copy / "vae_decoder" / "model.onnx"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"vae_decoder/model.onnx was altered or corrupted \(sha256"):
        runtime.Pipeline.load(bundle_copy)


def test_missing_manifest_means_unfinished(bundle_copy):
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json: it is not a finished engine bundle"):
        runtime.Pipeline.load(bundle_copy)


def test_newer_schema_is_refused(bundle_copy):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["schema_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="schema_version 99 but this runtime reads versions 1, 2; rebuild the bundle"):
        runtime.Pipeline.load(bundle_copy)


def test_manifest_round_trips_through_the_schema(bundle_fp32):
    raw = json.loads((bundle_fp32 / "manifest.json").read_text())
    manifest = Manifest.from_json(raw)
    assert manifest.to_json() == raw
    assert manifest.model.family == "sd" and raw["schema_version"] == SCHEMA_VERSION


def test_version_1_manifest_still_loads(bundle_copy):
    """Bundles written before the family seam: model.family held the architecture, and no onnx_precision for ONNX bundles."""
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["schema_version"] = 1
    architecture = m["model"]["family"] = m["model"].pop("architecture")
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    pipe = runtime.Pipeline.load(bundle_copy)
    assert (pipe.manifest.model.family, pipe.manifest.model.architecture) == ("sd", architecture)
    assert pipe.txt2img(PROMPT, steps=2, seed=0, output_type="np").shape == (1, pipe.height, pipe.width, 3)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["image"].pop("height"), r"malformed manifest \(KeyError: 'height'\).*export.build --force"),
        (lambda m: m["vae"].update(scaling_factor="big"), r"malformed manifest \(ValueError"),
        (lambda m: m.update(components=[]), r"malformed manifest \(AttributeError: 'list' object"),
        (lambda m: m["model"].update(family="dit"), r"model family 'dit', which this runtime does not know \(known: sd, sdxl\)"),
    ],
)
def test_malformed_manifest_is_named(bundle_copy, edit, message):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    edit(m)
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=message):
        runtime.Pipeline.load(bundle_copy)


def test_feed_shape_and_dtype_name_the_tensor(bundle_fp32):
    unet = runtime.Pipeline.load(bundle_fp32).engines["unet"]
    good = {
        "sample": np.zeros((2, 4, 8, 8), np.float32),
        "timestep": np.zeros((2,), np.float32),
        "encoder_hidden_states": np.zeros((2, 77, 32), np.float32),
    }
    assert unet(good)["out_sample"].shape == (2, 4, 8, 8)
    with pytest.raises(FeedError, match=r"unet.sample: shape \(2, 4, 16, 16\) but the bundle was built for static shape \(2, 4, 8, 8\)"):
        unet({**good, "sample": np.zeros((2, 4, 16, 16), np.float32)})
    with pytest.raises(FeedError, match="unet.timestep: dtype int64 but the bundle expects float32"):
        unet({**good, "timestep": np.zeros((2,), np.int64)})
    with pytest.raises(FeedError, match=r"missing \['encoder_hidden_states'\]"):
        unet({k: v for k, v in good.items() if k != "encoder_hidden_states"})


def test_prompt_errors(bundle_fp32):
    pipe = runtime.Pipeline.load(bundle_fp32)
    with pytest.raises(ValueError, match="prompt is empty"):
        pipe.txt2img("   ", steps=1, seed=0)
    with pytest.raises(ValueError, match="2 prompts for a bundle built with batch size 1"):
        pipe.txt2img(["a", "b"], steps=1, seed=0)
    with pytest.warns(PromptTruncatedWarning, match="were dropped"):
        pipe.txt2img("a red circle " * 40, steps=1, seed=0)


def test_request_errors(bundle_fp32):
    pipe = runtime.Pipeline.load(bundle_fp32)
    with pytest.raises(ValueError, match=r"latents: shape \(1, 4, 16, 16\) but this bundle needs \(1, 4, 8, 8\)"):
        pipe.txt2img(PROMPT, latents=np.zeros((1, 4, 16, 16), np.float32))
    with pytest.raises(ValueError, match="unknown sampler 'plms'; choose one of: ddim"):
        pipe.txt2img(PROMPT, steps=2, seed=0, scheduler="plms")
    with pytest.raises(ValueError, match="steps must be between 1 and the model's 1000"):
        pipe.txt2img(PROMPT, steps=0, seed=0)
    with pytest.raises(ValueError, match="output_type 'tensor'"):
        pipe.txt2img(PROMPT, steps=1, seed=0, output_type="tensor")


def test_progress_callback_and_cancel(bundle_fp32):
    pipe = runtime.Pipeline.load(bundle_fp32)
    seen = []
    pipe.txt2img(PROMPT, steps=4, seed=0, callback=lambda i, n, t: seen.append((i, n, t)))
    assert seen == [(1, 4, 751.0), (2, 4, 501.0), (3, 4, 251.0), (4, 4, 1.0)]
    with pytest.raises(Cancelled, match="after step 2 of 4"):
        pipe.txt2img(PROMPT, steps=4, seed=0, callback=lambda i, n, t: i < 2)


def test_generation_never_imports_torch(bundle_fp32, tmp_path):
    """A whole generation in a fresh interpreter: torch, diffusers and transformers never load."""
    code = f"""
import sys, runtime
images = runtime.Pipeline.load({str(bundle_fp32)!r}).txt2img("a red circle", steps=2, seed=0)
images[0].save({str(tmp_path / "x.png")!r})
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers"))
print("HEAVY", heavy)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in done.stdout
    assert (tmp_path / "x.png").stat().st_size > 0


def test_cli_writes_png(bundle_fp32, tmp_path):
    out = tmp_path / "img.png"
    cmd = [sys.executable, "-m", "runtime", "a red circle", "--bundle", str(bundle_fp32), "--steps", "3", "--seed", "1", "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out} (seed 1)" in done.stdout and "3/3" in done.stderr
    from PIL import Image

    assert Image.open(out).size == (64, 64)


def test_cli_bad_bundle_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "runtime", "x", "--bundle", str(tmp_path / "none")], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: no engine bundle at") and "Traceback" not in done.stderr


def test_cuda_graph_needs_tensorrt_engines(bundle_fp32):
    with pytest.raises(ValueError, match="cuda_graph=True needs TensorRT engines.*--from-onnx"):
        runtime.Pipeline.load(bundle_fp32, cuda_graph=True)
    with runtime.Pipeline.load(bundle_fp32) as pipe:
        assert pipe.txt2img(PROMPT, steps=1, seed=0, output_type="latent").shape == (1, 4, 8, 8)
