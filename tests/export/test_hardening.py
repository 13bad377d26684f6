"""Issue 19, export half: --force replaces only a bundle, a rebuild never leaves --out empty, weights load strictly,
Ctrl-C leaves nothing behind."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from export import staging as bundle
from export.build import build, main
from export.staging import TargetError, exchange, publish, staging
from runtime.bundle import MANIFEST, SCHEMA, load_manifest


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.fixture
def no_export(monkeypatch):
    """Any refusal must come before the model loads: loading it fails the test."""

    def loaded(*_a, **_k):
        raise AssertionError("the model was loaded: the refusal came too late")

    monkeypatch.setattr("export.from_model.open_model", loaded)


@pytest.fixture
def model_copy(tiny_model, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


@pytest.fixture
def old_bundle(bundle_fp32, tmp_path) -> Path:
    return Path(shutil.copytree(bundle_fp32, tmp_path / "bundle"))


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# 1. --force replaces only a bundle


def test_force_refuses_the_model_folder(model_copy, capsys, no_export):
    before = listing(model_copy)
    code, err = run_cli(capsys, "--model", str(model_copy), "--out", str(model_copy), "--force", "--backend", "onnxruntime")
    assert code == 2 and err.count("\n") == 1 and f"{model_copy} is the model itself" in err
    assert listing(model_copy) == before
    inside = model_copy / "unet" / ".." / "engine"
    code, err = run_cli(capsys, "--model", str(model_copy), "--out", str(inside), "--force", "--backend", "onnxruntime")
    assert code == 2 and err.count("\n") == 1 and "is inside the model folder" in err
    assert listing(model_copy) == before


def test_force_refuses_a_file(tiny_model, tmp_path, capsys, no_export):
    target = tmp_path / "notes.txt"
    target.write_text("mine\n")
    code, err = run_cli(capsys, "--model", str(tiny_model), "--out", str(target), "--force", "--backend", "onnxruntime")
    assert code == 2 and err.count("\n") == 1 and f"{target} is a file" in err
    assert target.read_text() == "mine\n" and listing(tmp_path) == ["notes.txt"]


def test_force_refuses_a_folder_that_is_not_a_bundle(tiny_model, tmp_path, capsys, no_export):
    target = tmp_path / "photos"
    target.mkdir()
    (target / "a.jpg").write_bytes(b"x")
    code, err = run_cli(capsys, "--model", str(tiny_model), "--out", str(target), "--force", "--backend", "onnxruntime")
    assert code == 2 and err.count("\n") == 1
    assert f"{target} is a folder that is not an engine bundle (no manifest.json)" in err
    (target / MANIFEST).write_text(json.dumps({"schema": "someone/else"}))
    code, err = run_cli(capsys, "--model", str(tiny_model), "--out", str(target), "--force", "--backend", "onnxruntime")
    assert code == 2 and "not an engine bundle" in err and "someone/else" in err
    assert listing(tmp_path) == ["photos", "photos/a.jpg", "photos/manifest.json"]


def test_force_refuses_a_symlink_even_to_a_bundle(bundle_fp32, tiny_model, tmp_path, capsys, no_export):
    link = tmp_path / "link"
    link.symlink_to(bundle_fp32, target_is_directory=True)
    code, err = run_cli(capsys, "--model", str(tiny_model), "--out", str(link), "--force", "--backend", "onnxruntime")
    assert code == 2 and err.count("\n") == 1 and f"{link} is a symbolic link" in err
    assert link.is_symlink() and (bundle_fp32 / MANIFEST).is_file()


def test_the_python_api_refuses_the_same(model_copy, tmp_path, no_export):
    target = tmp_path / "file.bin"
    target.write_bytes(b"data")
    with pytest.raises(TargetError, match="is a file"):
        build(model_copy, target, precision="fp32", backend="onnxruntime", force=True, log=lambda _: None)
    with pytest.raises(TargetError, match="is the model itself"):
        build(model_copy, model_copy, precision="fp32", backend="onnxruntime", force=True, log=lambda _: None)
    assert target.read_bytes() == b"data" and (model_copy / "model_index.json").is_file()


def test_staging_checks_the_target_itself(tmp_path):
    """from_onnx and any other caller of staging get the same refusal."""
    target = tmp_path / "f"
    target.write_text("x")
    with pytest.raises(TargetError, match="is a file"), staging(target, force=True):
        pass
    assert target.read_text() == "x" and listing(tmp_path) == ["f"]


def test_an_empty_folder_and_an_old_bundle_may_be_used(old_bundle, tiny_model, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    bundle.check_target(empty, force=False, source=tiny_model)  # without --force: nothing would be lost
    bundle.check_target(old_bundle, force=True, source=tiny_model)
    with pytest.raises(FileExistsError, match="pass --force"):
        bundle.check_target(old_bundle, force=False, source=tiny_model)


# 2. a rebuild never leaves --out empty


def fake_bundle(folder: Path, label: str) -> Path:
    folder.mkdir()
    (folder / "unet").mkdir()
    (folder / "unet" / "model.onnx").write_text(label)
    (folder / MANIFEST).write_text(json.dumps({"schema": SCHEMA, "tag": label}))  # a bundle of this schema, if not a readable one
    return folder


def tag(folder: Path) -> str:
    return str(json.loads((folder / MANIFEST).read_text())["tag"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 RENAME_EXCHANGE is Linux's")
def test_the_exchange_is_atomic_and_used_on_linux(tmp_path, monkeypatch):
    a, b = fake_bundle(tmp_path / "a", "A"), fake_bundle(tmp_path / "b", "B")
    assert exchange(a, b) is True
    assert tag(a) == "B" and tag(b) == "A"
    calls = []
    monkeypatch.setattr(bundle, "exchange", lambda x, y: calls.append((x, y)) or exchange(x, y))
    publish(a, b)
    assert calls == [(a, b)] and not a.exists() and tag(b) == "B"


def test_a_crash_right_after_the_exchange_leaves_the_new_bundle(old_bundle, tiny_model, monkeypatch):
    """A real rebuild over a bundle: killed right after the swap, --out holds the complete new bundle."""
    old_created = json.loads((old_bundle / MANIFEST).read_text())["created"]
    swapped = []

    def exchange_then_crash(a: Path, b: Path) -> bool:
        swapped.append(exchange(a, b))
        raise SystemExit("killed")

    monkeypatch.setattr(bundle, "exchange", exchange_then_crash)
    with pytest.raises(SystemExit):
        main(["--model", str(tiny_model), "--out", str(old_bundle), "--force", "--precision", "fp32", "--backend", "onnxruntime"])
    assert swapped == [True]
    load_manifest(old_bundle, verify_files=True)  # complete: every file present and matching its hash
    staged = old_bundle.with_name(f".{old_bundle.name}.partial")
    assert json.loads((staged / MANIFEST).read_text())["created"] == old_created  # the old one, left to remove


def test_a_crash_before_the_exchange_leaves_the_old_bundle(tmp_path, monkeypatch):
    out = fake_bundle(tmp_path / "out", "old")

    def crash(*_a):
        raise SystemExit("killed")

    monkeypatch.setattr(bundle, "exchange", crash)
    with pytest.raises(SystemExit), staging(out, force=True) as work:
        (work / MANIFEST).write_text(json.dumps({"schema": SCHEMA, "tag": "new"}))
    assert tag(out) == "old"


def test_without_the_exchange_two_renames_still_publish(tmp_path, monkeypatch):
    """The fallback (no RENAME_EXCHANGE): it publishes; a crash between its renames leaves both bundles recoverable."""
    monkeypatch.setattr(bundle, "exchange", lambda *_a: False)
    work, out = fake_bundle(tmp_path / ".out.partial", "new"), fake_bundle(tmp_path / "out", "old")
    publish(work, out)
    assert tag(out) == "new" and listing(tmp_path) == ["out", "out/manifest.json", "out/unet", "out/unet/model.onnx"]

    work = fake_bundle(tmp_path / ".out.partial", "newer")
    real_rename = Path.rename
    renamed = []

    def rename_once(self: Path, target: Path) -> Path:
        if renamed:
            raise SystemExit("killed")
        renamed.append(self)
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename_once)
    with pytest.raises(SystemExit):
        publish(work, out)
    assert tag(tmp_path / ".out.old") == "new" and tag(work) == "newer"


# 3. strict weight loading


def test_a_config_with_a_layer_the_weights_lack_is_refused(model_copy, tmp_path, capsys):
    config = model_copy / "text_encoder" / "config.json"
    cfg = json.loads(config.read_text())
    n = cfg["num_hidden_layers"]
    config.write_text(json.dumps({**cfg, "num_hidden_layers": n + 1}))
    code, err = run_cli(capsys, "--model", str(model_copy), "--out", str(tmp_path / "b"), "--precision", "fp32", "--backend", "onnxruntime")
    assert code == 2 and err.count("\n") == 1
    # named as the module spells it (transformers 5's CLIPTextModel has no "text_model." prefix)
    assert "text_encoder" in err and "missing from the weights" in err and f"encoder.layers.{n}." in err
    assert not (tmp_path / "b").exists() and not (tmp_path / ".b.partial").exists()


@pytest.mark.parametrize(("component", "file"), [("text_encoder", "model.safetensors"), ("unet", "diffusion_pytorch_model.safetensors")])
def test_weights_the_config_does_not_use_are_refused(model_copy, tmp_path, capsys, component, file):
    import torch
    from safetensors.torch import load_file, save_file

    weights = model_copy / component / file
    tensors = load_file(weights)
    prefix = "text_model." if component == "text_encoder" else ""
    tensors[f"{prefix}stray.weight"] = torch.zeros(3)
    save_file(tensors, weights, metadata={"format": "pt"})
    code, err = run_cli(capsys, "--model", str(model_copy), "--out", str(tmp_path / "b"), "--precision", "fp32", "--backend", "onnxruntime")
    assert code == 2 and err.count("\n") == 1
    assert f"{model_copy / component}" in err and f"{prefix}stray.weight" in err and "not in the config's model" in err
    assert not (tmp_path / "b").exists()


def test_the_tiny_and_reference_models_load_strictly(tiny_model):
    """Every tensor a folder stores is loaded, as stored, into a parameter or persistent buffer the config builds
    (load_model refuses a missing or unused key; CLIP's non-persistent position_ids are neither)."""
    from safetensors.numpy import load_file

    from export.model import REFERENCE_MODEL, load_model

    for path in (tiny_model, REFERENCE_MODEL):
        model = load_model(path, hash_files=False)
        for sub, module in (("text_encoder", model.text_encoder), ("unet", model.unet), ("vae", model.vae)):
            stored = {k: v for f in sorted((path / sub).glob("*.safetensors")) for k, v in load_file(f).items()}
            state = module.state_dict()
            assert stored and set(stored) == set(state), (path, sub, sorted(set(stored) ^ set(state))[:5])
            for key, value in stored.items():
                assert np.array_equal(state[key].numpy(), value), (path, sub, key)


# 4. Ctrl-C


def interrupt(*_a, **_k):
    raise KeyboardInterrupt


def test_ctrl_c_writes_nothing(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("export.from_model.export_component", interrupt)
    out = tmp_path / "b"
    code, err = run_cli(capsys, "--model", str(tiny_model), "--out", str(out), "--precision", "fp32", "--backend", "onnxruntime")
    assert code == 130 and err == "error: interrupted; nothing was written\n"
    assert listing(tmp_path) == []


def test_ctrl_c_during_a_rebuild_keeps_the_old_bundle(old_bundle, tiny_model, tmp_path, capsys, monkeypatch):
    before = (old_bundle / MANIFEST).read_bytes()
    monkeypatch.setattr("export.from_model.write_tokenizer", interrupt)
    code, err = run_cli(
        capsys, "--model", str(tiny_model), "--out", str(old_bundle), "--force", "--precision", "fp32", "--backend", "onnxruntime"
    )
    assert code == 130 and err == "error: interrupted; nothing was written\n"
    assert (old_bundle / MANIFEST).read_bytes() == before and load_manifest(old_bundle, verify_files=True)
    assert not old_bundle.with_name(f".{old_bundle.name}.partial").exists()


def test_an_out_under_a_file_is_named(tiny_model, tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    code = main(["--model", str(tiny_model), "--out", str(blocker / "bundle")])
    err = capsys.readouterr().err
    assert code == 2 and f"{blocker} is a file, not a folder" in err and err.count("\n") == 1
    assert blocker.read_text() == "mine"
