"""The shipped reference model: it loads, exports, verifies, and draws what its prompts say."""

from __future__ import annotations

import shutil

import pytest

import runtime
from export.build import REFERENCE_MODEL, build
from export.model import ModelError
from tests.helpers.attribute_checks import WANTED, attribute_hits


@pytest.fixture(scope="module")
def reference_bundle(tmp_path_factory):
    return build(REFERENCE_MODEL, tmp_path_factory.mktemp("ref") / "bundle", precision="fp32", log=lambda _: None)


def test_shipped_weights_are_small_and_export(reference_bundle):
    size = sum(f.stat().st_size for f in REFERENCE_MODEL.rglob("*.safetensors"))
    assert size <= 25 * 2**20
    manifest = runtime.load_manifest(reference_bundle)
    assert (manifest.height, manifest.width, manifest.batch_size) == (64, 64, 1)
    assert manifest.vae.downscale_factor == 4
    assert all(c.verification["passed"] for c in manifest.components.values())


def test_it_draws_what_the_prompt_says(reference_bundle):
    """A few canonical prompts through export + runtime, read back by the attribute checker."""
    hits = attribute_hits(runtime.Pipeline.load(reference_bundle), steps=20, guidance_scale=5.0)
    assert hits["background"] == len(WANTED) and min(hits.values()) >= len(WANTED) - 1, hits


def test_corrupt_weights_are_refused_by_hash(tmp_path):
    copy = shutil.copytree(REFERENCE_MODEL, tmp_path / "shapes-ldm")
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"diffusion_pytorch_model.safetensors is corrupt: its sha256 differs"):
        build(copy, tmp_path / "b", log=lambda _: None)
    assert not (tmp_path / "b").exists()
