"""Issue 28, runtime half: every number a bundle gives is bounded before use, its manifest is strict JSON with its own
digest, and extreme-but-finite settings are refused or blamed where they come from."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import runtime
import runtime.session
from runtime.bundle import DIGEST, sealed
from runtime.errors import BundleError, NonFiniteError

PROMPT = "a blue square"
pytestmark = pytest.mark.reliability


@pytest.fixture
def bundle_copy(bundle_fp32, tmp_path):
    return shutil.copytree(bundle_fp32, tmp_path / "bundle")


def rewrite(bundle, edit, seal=True):
    m = json.loads((bundle / "manifest.json").read_text())
    edit(m)
    (bundle / "manifest.json").write_text(json.dumps(sealed(m) if seal else m))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(num_train_timesteps=10**9), r"scheduler.config.num_train_timesteps 1000000000 is out of range 1..100000"),
        (lambda c: c.update(num_train_timesteps=0), r"num_train_timesteps 0 is out of range"),
        (lambda c: c.update(steps_offset=5000), r"scheduler.config.steps_offset 5000 is out of range 0..999"),
        (lambda c: c.update(beta_end=3.0), r"scheduler.config.beta_end 3.0 is out of range"),
        (lambda c: c.update(trained_betas=[0.5] * 200_000), r"scheduler.config.trained_betas holds 200000 items, more than 100000"),
        (lambda c: c.update(solver_order=10**6), r"solver_order 1000000 is out of range 1..4"),
        (lambda c: c.update(timestep_scaling=1e300), r"scheduler.config.timestep_scaling 1e\+300 is not a finite number within"),
        (lambda c: c.update(extra={"a": {"b": {"c": {"d": {"e": 1}}}}}), r"nested deeper than a scheduler config is"),
    ],
    ids=["timesteps-1e9", "timesteps-0", "offset", "beta", "betas-list", "solver-order", "huge-number", "deep"],
)
def test_scheduler_config_is_bounded_before_any_allocation(bundle_copy, monkeypatch, edit, message):
    monkeypatch.setattr(runtime.session, "noise_schedule", lambda *a: pytest.fail("the schedule was computed"))
    rewrite(bundle_copy, lambda m: edit(m["scheduler"]["config"]))
    with pytest.raises(BundleError, match=r"malformed manifest .*" + message):
        runtime.Pipeline.load(bundle_copy)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_a_manifest_with_nan_or_infinity_is_not_json(bundle_copy, constant):
    text = (bundle_copy / "manifest.json").read_text()
    (bundle_copy / "manifest.json").write_text(text.replace('"scaling_factor": ', f'"scaling_factor": {constant}, "was": ', 1))
    with pytest.raises(BundleError, match=rf"manifest.json is not valid JSON \({constant} is not a number JSON allows\)"):
        runtime.Pipeline.load(bundle_copy)


def test_a_number_past_floats_range_is_not_json(bundle_copy):
    text = (bundle_copy / "manifest.json").read_text()
    (bundle_copy / "manifest.json").write_text(text.replace('"scaling_factor": ', '"scaling_factor": 1e400, "was": ', 1))
    with pytest.raises(BundleError, match=r"manifest.json is not valid JSON \(1e400 is past float's range\)"):
        runtime.Pipeline.load(bundle_copy)


def test_export_writes_a_sealed_strict_manifest(bundle_fp32):
    text = (bundle_fp32 / "manifest.json").read_text()
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the manifest"))
    assert doc[DIGEST] == sealed({k: v for k, v in doc.items() if k != DIGEST})[DIGEST]


def test_a_hand_edited_manifest_is_refused_by_its_digest(bundle_copy):
    rewrite(bundle_copy, lambda m: m["scheduler"]["config"].update(num_train_timesteps=999), seal=False)
    with pytest.raises(BundleError, match=r"manifest.json was altered after export \(its content does not match its manifest_sha256\)"):
        runtime.Pipeline.load(bundle_copy)


def test_extreme_guidance_is_refused_at_its_source(bundle_fp32):
    pipe = runtime.Pipeline.load(bundle_fp32)
    for scale in (1e6, -1e6, 101):
        with pytest.raises(ValueError, match=r"guidance_scale .* is far outside what any model uses \(\|scale\| <= 100"):
            pipe.txt2img(PROMPT, steps=1, guidance_scale=scale)
    with pytest.raises(ValueError, match="guidance_rescale 5 must be between 0 and 1"):
        pipe.txt2img(PROMPT, steps=1, guidance_rescale=5)


class _Nan:
    def __init__(self, engine):
        self.engine, self.component = engine, engine.component

    def __call__(self, feed):
        return {k: np.full_like(v, np.nan) for k, v in self.engine(feed).items()}


@pytest.mark.parametrize("fixture", ["bundle_fp16", "bundle_fp32"])
def test_nan_from_extreme_inputs_is_blamed_on_them_not_on_fp16(request, fixture):
    """NaN after inputs far past anything the model was trained on is not an fp16 overflow (rebuilding in fp32 fixes
    nothing), nor a broken engine: the message names the input and its size."""
    pipe = runtime.Pipeline.load(request.getfixturevalue(fixture))
    pipe.engines["unet"] = _Nan(pipe.engines["unet"])
    latents = np.full(pipe.manifest.latent_shape, 3e4, np.float32)  # finite in fp16 too; 1e5 past what a UNet ever sees
    with pytest.raises(NonFiniteError, match=r"its input sample reaches .*, far outside anything the model was trained on") as e:
        pipe.txt2img(PROMPT, steps=2, seed=0, latents=latents * 10, output_type="latent")
    assert "rebuild in fp32" not in str(e.value) and "--precision" not in str(e.value) and "fp16 overflow" not in str(e.value)
    assert "rebuilding will not help" in str(e.value) and e.value.upstream and not e.value.fp16_overflow


def test_set_lora_scale_is_bounded(bundle_fp32, tmp_path):
    from runtime.slots import _lora_list

    for scale in (1e6, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"the scale of a.safetensors must be a number from -100 to 100"):
            _lora_list("a.safetensors", scale)
