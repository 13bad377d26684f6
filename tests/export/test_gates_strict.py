"""Issue 28, export half: every gate fails on NaN/inf with its figures, manifests are strict JSON, sizes and adapters
past the runtime's limits are refused before any export work."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from export.build import main
from export.gates import describe, error_figures
from export.int8 import gate as int8_gate
from runtime.lora import LoraError, read_adapter

pytestmark = pytest.mark.reliability


def strict(doc):
    return json.loads(json.dumps(doc, allow_nan=False))  # raises on NaN/inf: what a strict parser would refuse


@pytest.mark.parametrize(
    ("got", "ref", "where"),
    [
        (np.ones(4), np.array([1, 1, np.nan, 1]), {"output": 0, "reference": 1}),
        (np.array([1, np.inf, 1, 1]), np.ones(4), {"output": 1, "reference": 0}),
        (np.full(4, np.nan), np.full(4, np.nan), {"output": 4, "reference": 4}),
    ],
    ids=["nan-reference", "inf-output", "both"],
)
def test_the_fixed_input_gate_fails_on_nan_or_inf_with_its_figures(got, ref, where):
    """max(0, nan) is 0: the gate once passed a NaN reference with rel_err 0.0. The TensorRT gate is the same function."""
    figures = error_figures({"out": got, "ok": np.ones(2)}, {"ok": np.ones(2), "out": ref}, tolerance=1e-3)
    assert figures["passed"] is False and figures["rel_err"] is None and figures["nonfinite"] == ["out"]
    assert figures["outputs"]["out"]["nonfinite_values"] == where and figures["outputs"]["ok"]["rel_err"] == 0.0
    assert strict(figures) == figures
    assert describe(figures).startswith("no error measurable (out: ") and "NaN/inf in the" in describe(figures)


def test_the_fixed_input_gate_still_measures_finite_outputs():
    figures = error_figures({"out": np.array([1.0, 2.5])}, {"out": np.array([1.0, 2.0])}, tolerance=1e-3)
    assert figures["passed"] is False and math.isclose(figures["rel_err"], 0.25) and describe(figures) == "error 2.50e-01"
    # float32 extremes: the difference is taken in float64, so it cannot overflow to inf and pass as "not finite"
    big = error_figures({"out": np.array([3e38], np.float32)}, {"out": np.array([-3e38], np.float32)}, tolerance=1e-3)
    assert big["rel_err"] == pytest.approx(2.0) and big["passed"] is False


def test_the_int8_gate_fails_on_nan_in_either_run_with_its_figures():
    ts = [900.0, 100.0]
    ok = [np.ones((1, 4)), np.ones((1, 4))]
    bad = [np.ones((1, 4)), np.full((1, 4), np.nan)]
    for got, ref in ((bad, ok), (ok, bad)):
        unet = int8_gate.unet_figures(got, ref, ts, 1000)
        figures = int8_gate.gate(unet, np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 8, 3)), 1)
        assert figures["passed"] is False and unet["worst_bucket_rel_l2"] is None and strict(figures) == figures
        assert "no error can be measured, the gate fails" in int8_gate.summary(figures)
    unet = int8_gate.unet_figures(ok, ok, ts, 1000)
    figures = int8_gate.gate(unet, np.full((1, 8, 8, 3), np.nan), np.zeros((1, 8, 8, 3)), 1)
    assert figures["passed"] is False and figures["pixel_mae"] is None and figures["images_finite"] == {"int8": False, "fp32": True}


def test_the_manifest_writer_refuses_nan(tmp_path, bundle_fp32):
    from dataclasses import replace

    from export.staging import write_manifest
    from runtime.bundle import load_manifest

    manifest = load_manifest(bundle_fp32)
    unet = replace(manifest.components["unet"], verification={"rel_err": float("nan")})
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_manifest(tmp_path, replace(manifest, components={**manifest.components, "unet": unet}))
    assert not (tmp_path / "manifest.json").exists()


@pytest.fixture
def no_export(monkeypatch):
    monkeypatch.setattr("export.from_model.open_model", lambda *a, **k: pytest.fail("the model was loaded: the refusal came too late"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--height", "32768"], "--height 32768 is out of range 1..16384 pixels, the image sides the runtime loads"),
        (["--width", "0"], "--width 0 is out of range 1..16384 pixels, the image sides the runtime loads"),
        (["--batch-size", "100000"], "--batch-size 100000 is out of range 1..64, the batches the runtime loads"),
    ],
)
def test_sizes_past_the_runtimes_limits_are_refused_before_export(tmp_path, capsys, no_export, args, message):
    code = main(["--out", str(tmp_path / "b"), "--backend", "onnxruntime", *args])
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: {message}\n" and not (tmp_path / "b").exists()


def test_sizes_are_the_runtimes_own_limits():
    from export import options
    from runtime.bundle import manifest

    assert (options.MAX_IMAGE_SIDE, options.MAX_BATCH) == (manifest.MAX_IMAGE_SIDE, manifest.MAX_BATCH)


Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def save(path, tensors, metadata=None):
    from safetensors.numpy import save_file

    save_file({k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def layers(tiny_model):
    from tests.export.test_lora import model_layers

    return model_layers(tiny_model)


def test_an_adapter_alpha_of_1e38_is_refused_at_read(tmp_path, layers):
    """alpha 1e38 once built: its fused weights made the torch reference NaN, and the gate passed it."""
    tensors = {f"{Q}.lora_A.weight": np.ones((2, 32)) * 0.01, f"{Q}.lora_B.weight": np.ones((32, 2)) * 0.01, f"{Q}.alpha": 1e38}
    path = save(tmp_path / "alpha.safetensors", tensors)
    with pytest.raises(LoraError, match=r"has alpha 1e\+38 \(rank 2\), so its weight update can reach 1e\+34; .* damaged or its alpha"):
        read_adapter(path, layers)


def test_adapter_keys_are_checked_from_the_header_before_any_tensor_is_read(tmp_path, layers, monkeypatch):
    import safetensors.numpy

    big = {f"{Q}.lora_A.weight": np.ones((2, 32)), f"{Q}.lora_B.weight": np.ones((32, 2)), "unet.nowhere.lora_A.weight": np.ones(2)}
    path = save(tmp_path / "bad.safetensors", big)
    monkeypatch.setattr(safetensors.numpy, "load", lambda *a: pytest.fail("the tensors were read before the keys were checked"))
    with pytest.raises(LoraError, match=r"key unet.nowhere.lora_A.weight names unet layer 'nowhere', which this model does not have"):
        read_adapter(path, layers)
