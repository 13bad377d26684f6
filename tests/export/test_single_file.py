"""Single-file checkpoints in the original LDM layout: recognised by keys and shapes, converted offline, or refused by name.

The tiny model is written in the original layout by tests/export/ldm_layout.py (the inverse of diffusers' key
mapping); its widths match no real architecture, so its export passes its own folder as --checkpoint-config.
Recognition is tested on the key shapes of full-size checkpoints, built from the shipped configs on the meta device.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from export.build import build, main
from export.model import ModelError, open_model
from export.single_file import CONFIGS, Checkpoint, recognise
from runtime.bundle import sha256_file
from tests.helpers.bundle_outputs import differences
from tests.helpers.ldm_layout import ldm_shapes, ldm_state_dict, save_single_file

# SD 2.x files carry OpenCLIP's 24 text layers (diffusers keeps 23: SD 2 reads the penultimate one)
FULL_SIZE = {"sd1": None, "sd1-inpainting": None, "sd2": 24, "sd2-inpainting": 24}
DIFFUSERS_NAMES = {"sd1": "v1", "sd1-inpainting": "inpainting", "sd2": "v2", "sd2-inpainting": "inpainting_v2"}


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_model, tmp_path_factory) -> Path:
    return save_single_file(tiny_model, tmp_path_factory.mktemp("single-file") / "tiny-sd.safetensors")


@pytest.fixture(scope="module")
def full_size_shapes() -> dict[str, dict[str, tuple[int, ...]]]:
    return {name: ldm_shapes(CONFIGS / name, text_layers=layers) for name, layers in FULL_SIZE.items()}


def test_a_tiny_single_file_exports_like_its_folder(tiny_checkpoint, tiny_model, bundle_fp32, tmp_path):
    lines: list[str] = []
    out = build(tiny_checkpoint, tmp_path / "b", precision="fp32", checkpoint_config=str(tiny_model), log=lines.append)
    assert any(line.startswith("converting single-file checkpoint tiny-sd.safetensors") for line in lines)
    model = json.loads((out / "manifest.json").read_text())["model"]
    assert model["source"] == str(tiny_checkpoint.resolve()) and model["name"] == "tiny-sd"
    assert model["source_hashes"] == {"tiny-sd.safetensors": sha256_file(tiny_checkpoint)}
    diffs = differences(bundle_fp32, out)
    assert all(abs_err <= 1e-6 for abs_err, _ in diffs.values()), diffs


def test_ema_weights_are_the_ones_converted(tiny_checkpoint, tiny_model, tmp_path):
    """A checkpoint with training and EMA weights (model_ema.*, LDM's dotless names) converts the EMA ones."""
    import torch
    from safetensors.torch import save_file

    state = ldm_state_dict(tiny_model)
    unet = {k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}
    state |= {"model_ema." + "".join(k.split(".")[1:]): v + 1.0 for k, v in unet.items()}
    both = tmp_path / "with-ema.safetensors"
    save_file(state, str(both))
    with open_model(both, checkpoint_config=str(tiny_model), log=lambda _: None) as model:
        converted = model.unet.conv_in.weight.detach()
    with open_model(tiny_checkpoint, checkpoint_config=str(tiny_model), log=lambda _: None) as model:
        plain = model.unet.conv_in.weight.detach()
    assert torch.equal(converted, plain + 1.0)


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_checkpoints_are_recognised(name, full_size_shapes):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    shapes = full_size_shapes[name]
    found = recognise(Checkpoint(Path(f"{name}.safetensors"), shapes, {}))
    assert found.config == CONFIGS / name
    # diffusers' own key-based inference agrees (it only needs .shape)
    assert infer_diffusers_model_type({k: type("T", (), {"shape": v})() for k, v in shapes.items()}) == DIFFUSERS_NAMES[name]


def test_sd2_768_or_base_is_said_and_can_be_chosen(full_size_shapes, tmp_path):
    shapes = full_size_shapes["sd2"]
    default = recognise(Checkpoint(Path("v2.safetensors"), shapes, {}))
    assert default.config.name == "sd2" and "--checkpoint-config sd2-base" in default.note and "same keys" in default.note
    spec = recognise(Checkpoint(Path("v2.safetensors"), shapes, {"modelspec.prediction_type": "epsilon"}))
    assert spec.config.name == "sd2-base"
    assert recognise(Checkpoint(Path("v2.safetensors"), shapes, {}), "sd2-base").config.name == "sd2-base"
    # the original training config beside the file, as web UIs keep it: v-prediction says so, the base config does not
    (tmp_path / "v2.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert recognise(Checkpoint(tmp_path / "v2.safetensors", shapes, {})).config.name == "sd2"
    (tmp_path / "v2.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert recognise(Checkpoint(tmp_path / "v2.safetensors", shapes, {})).config.name == "sd2-base"
    pruned = {k: v for k, v in shapes.items() if "resblocks.23." not in k}  # without the unused 24th text layer
    assert recognise(Checkpoint(Path("v2.safetensors"), pruned, {})).config.name == "sd2"
    with pytest.raises(ModelError, match=r"--checkpoint-config sd1 does not fit v2.safetensors: an OpenCLIP .* which is sd2 or sd2-base"):
        recognise(Checkpoint(Path("v2.safetensors"), shapes, {}), "sd1")


def _write(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({k: torch.zeros(v) for k, v in shapes.items()}, str(path))
    return path


SDXL = {"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (4,), "model.diffusion_model.out.2.bias": (4,)}
SD3 = {"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (4,)}
FLUX = {"double_blocks.0.img_attn.norm.key_norm.scale": (4,)}
NO_TEXT_ENCODER = {"model.diffusion_model.out.2.bias": (4,), "first_stage_model.decoder.conv_in.bias": (4,)}


@pytest.mark.parametrize(
    "shapes, said",
    [
        (SDXL, "is an SDXL single-file checkpoint: SDXL (two text encoders"),
        (SD3, "is an SD3 single-file checkpoint: SD3 (an MMDiT transformer"),
        (FLUX, "is a FLUX single-file checkpoint: FLUX (a flow transformer)"),
        ({"down_blocks.0.resnets.0.conv1.weight": (4,)}, "not a Stable Diffusion checkpoint in the original (LDM) layout"),
        (NO_TEXT_ENCODER, "has no text encoder (cond_stage_model.*)"),
    ],
)
def test_other_checkpoints_are_refused_by_name(shapes, said, tmp_path, capsys):
    ckpt = _write(tmp_path / "other.safetensors", shapes)
    code = main(["--model", str(ckpt), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and said in err, err
    assert not (tmp_path / "b").exists()


def test_a_checkpoint_no_shipped_config_describes_is_refused_naming_what_it_has(tiny_checkpoint, tmp_path, capsys):
    code = main(["--model", str(tiny_checkpoint), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "a CLIP (SD 1.x-style) text encoder with 2 layers" in err and "32-d cross-attention" in err
    assert "none of the shipped configs" in err and "--checkpoint-config" in err and not (tmp_path / "b").exists()


def test_single_file_options_are_checked(tiny_checkpoint, tiny_model, tmp_path, capsys):
    pickled = tmp_path / "model.ckpt"
    shutil.copy2(tiny_checkpoint, pickled)
    cases = [
        (["--model", str(pickled)], "is a pickle checkpoint, which can run code when loaded"),
        (["--model", str(tiny_checkpoint), "--variant", "fp16"], "--variant applies to diffusers folders"),
        (["--model", str(tiny_model), "--checkpoint-config", "sd1"], "--checkpoint-config applies to single-file checkpoints"),
        (["--model", str(tiny_checkpoint), "--checkpoint-config", "nope"], "neither a shipped config"),
        (["--model", str(tmp_path / "missing.safetensors")], "does not exist"),
    ]
    for args, said in cases:
        code = main([*args, "--out", str(tmp_path / "b")])
        err = capsys.readouterr().err
        assert code == 2 and said in err and err.count("\n") == 1, (args, err)
    assert not (tmp_path / "b").exists()
