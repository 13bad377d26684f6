"""export.textual_inversion's reading of embedding files, without a build: every layout, the token each gets,
and the refusals by message (the bundles themselves are checked against diffusers in tests/runtime/test_long_prompts.py
and tests/sdxl/test_sdxl_prompts.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.errors import ModelError
from export.textual_inversion import parse_spec, read_embedding

SD = {"text_encoder": 32}
SDXL = {"text_encoder": 32, "text_encoder_2": 48}


@pytest.fixture
def save(tmp_path):
    import torch
    from safetensors.torch import save_file

    def write(name, data):
        path = tmp_path / name
        if name.endswith(".safetensors"):
            save_file(data, path)
        else:
            torch.save(data, path)
        return path

    return write


def test_every_layout_and_its_token(save):
    import torch

    v = torch.ones(3, 32)
    diffusers = read_embedding(str(save("learned_embeds.safetensors", {"<cat-toy>": v})), SD, False)
    assert diffusers.token == "<cat-toy>" and diffusers.vectors["text_encoder"].shape == (3, 32)
    a1111 = read_embedding(str(save("easyneg.safetensors", {"emb_params": v})), SD, False)
    assert a1111.token == "easyneg"  # A1111 names an emb_params embedding after its file
    pt = read_embedding(str(save("old.pt", {"string_to_param": {"*": v[0]}, "name": "oldname"})), SD, True)
    assert pt.token == "oldname" and pt.vectors["text_encoder"].shape == (1, 32)  # one vector stored flat
    given = read_embedding(f"{save('x.safetensors', {'emb_params': v})}:mytoken", SD, False)
    assert given.token == "mytoken"
    pair = read_embedding(str(save("xl.safetensors", {"clip_l": v, "clip_g": torch.ones(3, 48)})), SDXL, False)
    assert {k: tuple(t.shape) for k, t in pair.vectors.items()} == {"text_encoder": (3, 32), "text_encoder_2": (3, 48)}
    refiner = read_embedding(str(save("xl2.safetensors", {"clip_l": v, "clip_g": torch.ones(3, 48)})), {"text_encoder_2": 48}, False)
    assert list(refiner.vectors) == ["text_encoder_2"]


def test_refusals_name_the_problem(save, tmp_path):
    import torch

    with pytest.raises(ValueError, match="old.pt is a pickle file, which can run code when loaded.*--allow-pickle"):
        read_embedding(str(save("old.pt", {"string_to_param": {"*": torch.ones(1, 32)}})), SD, False)
    with pytest.raises(ModelError, match=r"its vectors are \(2, 16\), but text_encoder takes vectors of 32"):
        read_embedding(str(save("small.safetensors", {"emb_params": torch.ones(2, 16)})), SD, False)
    with pytest.raises(ModelError, match="a single-encoder embedding, but this SDXL model has two text encoders"):
        read_embedding(str(save("one.safetensors", {"emb_params": torch.ones(2, 32)})), SDXL, False)
    with pytest.raises(ModelError, match="an SDXL embedding without clip_g"):
        read_embedding(str(save("half.safetensors", {"clip_l": torch.ones(2, 32)})), SDXL, False)
    with pytest.raises(ModelError, match="not a textual-inversion embedding this SDK reads"):
        read_embedding(str(save("lora.safetensors", {"a": torch.ones(1), "b": torch.ones(1)})), SD, False)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="junk.safetensors: could not read it as an embedding"):
        read_embedding(str(tmp_path / "junk.safetensors"), SD, False)
    with pytest.raises(ValueError, match="nowhere.safetensors is not a file"):
        read_embedding(str(tmp_path / "nowhere.safetensors"), SD, False)


def test_spec_splits_the_token_off_unless_the_path_has_the_colon(tmp_path):
    odd = tmp_path / "a:b.safetensors"
    odd.write_bytes(b"")
    assert parse_spec(str(odd)) == (odd, None)
    assert parse_spec(f"{tmp_path}/e.safetensors:<tok>") == (tmp_path / "e.safetensors", "<tok>")
    assert parse_spec("e.safetensors") == (Path("e.safetensors"), None)
