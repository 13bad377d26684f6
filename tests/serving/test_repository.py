"""`python -m serving.write_repository`: the model repository it writes, checked against Triton's own ModelConfig schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.bundle import load_manifest
from tests.helpers import REPO
from tests.serving.common import serving_python

# Parses config.pbtxt as Triton does (protobuf text format of inference.ModelConfig, from tritonclient's copy of
# model_config.proto) and prints what the tests check, as JSON.
PARSE = """
import json, sys
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2
config = text_format.Parse(open(sys.argv[1]).read(), model_config_pb2.ModelConfig())
print(json_format.MessageToJson(config, preserving_proto_field_name=True))
"""


def export_triton(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "serving.write_repository", *args], cwd=REPO, capture_output=True, text=True)


def parsed_config(path: Path) -> dict:
    done = subprocess.run([str(serving_python()), "-c", PARSE, str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def repository(bundle_batch2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "model_repository"
    done = export_triton(str(bundle_batch2), "--out", str(out), "--instances", "3", "--max-queue-delay-us", "5000")
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    return out


def test_config_is_a_valid_model_config_with_typed_io_and_batching_up_to_the_bundle(repository: Path) -> None:
    config = parsed_config(repository / "ldm" / "config.pbtxt")
    assert config["name"] == "ldm" and config["backend"] == "python"
    assert config["max_batch_size"] == 2  # the bundle's static batch
    assert config["dynamic_batching"] == {"preferred_batch_size": [2], "max_queue_delay_microseconds": "5000"}
    assert config["instance_group"] == [{"count": 3, "kind": "KIND_CPU"}]
    inputs = {i["name"]: (i["data_type"], i["dims"], i.get("optional", False)) for i in config["input"]}
    assert inputs == {
        "prompt": ("TYPE_STRING", ["1"], False),
        "negative_prompt": ("TYPE_STRING", ["1"], True),
        "seed": ("TYPE_INT64", ["1"], True),
        "steps": ("TYPE_INT32", ["1"], True),
        "guidance_scale": ("TYPE_FP32", ["1"], True),
        "scheduler": ("TYPE_STRING", ["1"], True),
    }
    outputs = {o["name"]: (o["data_type"], o["dims"]) for o in config["output"]}
    assert outputs == {"image": ("TYPE_UINT8", ["64", "64", "3"]), "seed_used": ("TYPE_INT64", ["1"])}
    assert config["parameters"]["bundle"] == {"string_value": "bundle"}


def test_repository_holds_the_model_a_runtime_copy_the_bundle_and_a_readme(repository: Path, bundle_batch2: Path) -> None:
    version = repository / "ldm" / "1"
    assert (version / "model.py").read_text() == (REPO / "serving" / "model.py").read_text()
    assert (version / "runtime" / "pipeline.py").read_text() == (REPO / "runtime" / "pipeline.py").read_text()
    assert (version / "serving" / "handler.py").read_text() == (REPO / "serving" / "handler.py").read_text()
    # only what a model process needs: no launcher, no command line, nothing else of serving/
    assert sorted(p.name for p in (version / "serving").iterdir()) == ["__init__.py", "handler.py"]
    assert not (version / "runtime" / "cli.py").exists() and not (version / "runtime" / "serve").exists()
    assert not list(version.rglob("__pycache__"))
    copied = load_manifest(version / "bundle")  # every file's sha256 checked against the manifest
    assert copied == load_manifest(bundle_batch2)
    readme = (repository / "README.md").read_text()
    assert "nvcr.io/nvidia/tritonserver" in readme and "tritonserver --model-repository=/models" in readme
    assert "'numpy<2'" in readme and "python -m serving" in readme


def test_link_references_the_bundle_instead_of_copying_it(bundle_batch2: Path, tmp_path: Path) -> None:
    out = tmp_path / "repo"
    assert export_triton(str(bundle_batch2), "--out", str(out), "--link", "--name", "shapes").returncode == 0
    assert not (out / "shapes" / "1" / "bundle").exists()
    config = parsed_config(out / "shapes" / "config.pbtxt")
    assert config["name"] == "shapes" and config["parameters"]["bundle"] == {"string_value": str(bundle_batch2.resolve())}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--instances", "0"], "--instances is 0: it must be 1 or more"),
        (["--max-queue-delay-us", "-1"], "--max-queue-delay-us is -1"),
        (["--name", "my model"], "--name 'my model'"),
    ],
)
def test_bad_options_are_named(bundle_batch2: Path, tmp_path: Path, args: list[str], message: str) -> None:
    done = export_triton(str(bundle_batch2), "--out", str(tmp_path / "repo"), *args)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and message in done.stderr, done.stderr
    assert not (tmp_path / "repo").exists()


def test_an_existing_folder_is_refused_and_left_as_it_was(bundle_batch2: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    done = export_triton(str(bundle_batch2), "--out", str(out))
    assert done.returncode == 2 and "exists and is not an empty folder" in done.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no staging folder left beside it


def test_a_damaged_bundle_is_refused(bundle_batch2: Path, tmp_path: Path) -> None:
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_batch2, bundle)
    with open(bundle / "manifest.json") as f:
        unet = json.load(f)["components"]["unet"]["file"]
    with open(bundle / unet, "r+b") as f:
        f.seek(100)
        f.write(b"\0\1\2\3")
    done = export_triton(str(bundle), "--out", str(tmp_path / "repo"))
    assert done.returncode == 2 and "sha256" in done.stderr, done.stderr
    assert not (tmp_path / "repo").exists()


def test_serve_without_its_environment_says_how_to_make_it(bundle_batch2: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "serving", str(bundle_batch2), "--triton-env", str(tmp_path / "nowhere")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: no serving environment at {tmp_path / 'nowhere'}") and "bash scripts/setup.sh" in done.stderr


def test_instance_kind_follows_the_bundles_backend(bundle_batch2: Path, tmp_path: Path) -> None:
    """ONNX bundles: CPU unless --kind gpu (CUDA execution provider); TensorRT engines: GPU only."""
    from dataclasses import replace

    from serving.repository import RepositoryOptions, config_pbtxt

    onnx = load_manifest(bundle_batch2)
    tensorrt = replace(onnx, backend="tensorrt")
    kinds = {
        (m.backend, kind): parsed_kind(tmp_path, config_pbtxt(m, "bundle", RepositoryOptions(kind=kind)))
        for m in (onnx, tensorrt)
        for kind in ("auto", "gpu")
    }
    assert kinds == {
        ("onnxruntime", "auto"): "KIND_CPU",
        ("onnxruntime", "gpu"): "KIND_GPU",
        ("tensorrt", "auto"): "KIND_GPU",
        ("tensorrt", "gpu"): "KIND_GPU",
    }
    with pytest.raises(ValueError, match="TensorRT engines, which run on an NVIDIA GPU only; use --kind gpu"):
        config_pbtxt(tensorrt, "bundle", RepositoryOptions(kind="cpu"))


def parsed_kind(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.pbtxt"
    path.write_text(text)
    return parsed_config(path)["instance_group"][0]["kind"]
