"""The TensorRT path on a real GPU: engines built by TensorRT against the ONNX they came from.

Skipped (with the reason) where TensorRT, cuda-python or a CUDA GPU is missing. Run on a GPU
machine or a Jetson with `python -m pytest -m tensorrt -rs tests/export/test_tensorrt_gpu.py`; where
torch is not installed (a Jetson), point LDM_TEST_BUNDLE at an ONNX bundle exported elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import runtime
from export.gates import TOLERANCE, error_figures
from export.inputs import fixed_inputs
from export.tensorrt.from_onnx import build_from_onnx, onnx_component
from runtime.backends.tensorrt import tensorrt_available
from runtime.bundle import load_manifest
from runtime.dispatch import load_engine
from runtime.errors import BundleError
from runtime.pipeline import initial_latents
from tests.helpers import REPO

PROMPT = "a small red circle in the top left on a black background"


def why_skip() -> str | None:
    if not tensorrt_available():
        return "TensorRT and cuda-python are not installed (pip install tensorrt cuda-python; on a Jetson, JetPack's TensorRT)"
    from cuda.bindings import runtime as cudart

    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or not count:
        return f"no CUDA GPU here ({cudart.cudaGetErrorName(err)[1].decode()})"
    return None


REASON = why_skip()
pytestmark = [pytest.mark.tensorrt, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


@pytest.fixture(scope="module")
def onnx_bundle(request):
    """LDM_TEST_BUNDLE (any ONNX or TensorRT bundle), else the tiny fp32 bundle the suite exports with torch."""
    given = os.environ.get("LDM_TEST_BUNDLE")
    if given:
        return Path(given)
    pytest.importorskip("torch", reason="exporting the test bundle needs torch; set LDM_TEST_BUNDLE to an ONNX bundle instead")
    return request.getfixturevalue("bundle_fp32")


@pytest.fixture(scope="module")
def trt_bundle(onnx_bundle, tmp_path_factory):
    work = tmp_path_factory.mktemp("trt")
    return build_from_onnx(onnx_bundle, work / "bundle", timing_cache_root=work / "timing-cache", log=print)


def engines(bundle: Path, **options):
    manifest = load_manifest(bundle)
    return manifest, {name: load_engine(c, bundle, **options) for name, c in manifest.components.items()}


def test_manifest_records_this_machine_and_passing_figures(trt_bundle):
    from runtime.backends.tensorrt import current_device

    manifest = load_manifest(trt_bundle)
    here = current_device()
    assert manifest.tensorrt is not None and manifest.tensorrt.tensorrt == here.tensorrt and manifest.tensorrt.gpu == here.gpu
    for c in manifest.components.values():
        assert (c.build["tensorrt"], c.build["gpu"], c.build["compute_capability"]) == (here.tensorrt, here.gpu, here.compute_capability)
        assert c.verification["passed"] is True, (c.name, c.verification)


def test_engines_match_their_onnx_through_onnx_runtime(trt_bundle):
    manifest, trt_engines = engines(trt_bundle)
    for name, engine in trt_engines.items():
        src = onnx_component(manifest.components[name])
        feed = fixed_inputs(src.inputs, src.name, manifest.vae.scaling_factor, seed=1)  # not the inputs the build verified with
        reference = load_engine(src, trt_bundle, backend="onnxruntime", device="cpu")(feed)
        with engine:
            figures = error_figures(engine(feed), reference, TOLERANCE[engine.component.precision])
        assert figures["passed"], (name, figures)
        assert all(o["finite"] for o in figures["outputs"].values())


def test_cuda_graph_gives_the_plain_engines_outputs(trt_bundle):
    manifest = load_manifest(trt_bundle)
    unet = manifest.components["unet"]
    first, second = (fixed_inputs(unet.inputs, unet.name, manifest.vae.scaling_factor, seed=s) for s in (2, 3))
    with load_engine(unet, trt_bundle) as plain, load_engine(unet, trt_bundle, cuda_graph=True) as graphed:
        assert graphed.uses_cuda_graph and not plain.uses_cuda_graph
        a, b = graphed(first)["out_sample"], graphed(second)["out_sample"]
        np.testing.assert_array_equal(a, plain(first)["out_sample"])
        np.testing.assert_array_equal(b, plain(second)["out_sample"])
        assert not np.array_equal(a, b), "the graph replayed old inputs"


def test_pipeline_on_tensorrt_matches_onnx_runtime(trt_bundle, onnx_bundle):
    trt_pipe = runtime.Pipeline.load(trt_bundle)
    ort_pipe = runtime.Pipeline.load(onnx_bundle, device="cpu")
    latents = initial_latents(trt_pipe.manifest.latent_shape, seed=7)
    ours = trt_pipe.txt2img(PROMPT, steps=4, latents=latents, output_type="np")
    ref = ort_pipe.txt2img(PROMPT, steps=4, latents=latents, output_type="np")
    tolerance = 5e-3 if trt_pipe.manifest.precision == "fp32" else 5e-2
    assert ref.std() > 0.01 and np.abs(ours - ref).max() < tolerance


def test_bundle_for_another_gpu_is_refused_and_its_rebuild_command_works(trt_bundle, tmp_path):
    moved = shutil.copytree(trt_bundle, tmp_path / "from-elsewhere")
    manifest = json.loads((moved / "manifest.json").read_text())
    for c in manifest["components"].values():
        c["build"]["tensorrt"] = "9.0.0.1"  # manifest.json itself is not hashed: this is what another machine's bundle looks like
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="TensorRT 9.0.0.1 built it, this machine has TensorRT") as e:
        runtime.Pipeline.load(moved)
    command = re.search(r"`(python -m export\.build --from-onnx [^`]+)`", str(e.value))[1]
    argv = shlex.split(command)
    rebuild = [sys.executable, *argv[1:], "--out", str(tmp_path / "rebuilt")]
    done = subprocess.run(rebuild, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    runtime.Pipeline.load(tmp_path / "rebuilt")


def test_corrupt_plan_is_refused_with_the_rebuild_command(trt_bundle, tmp_path):
    broken = shutil.copytree(trt_bundle, tmp_path / "broken")
    plan = broken / "unet" / "model.plan"
    plan.write_bytes(plan.read_bytes()[: plan.stat().st_size // 2])
    with pytest.raises(BundleError, match=r"unet/model.plan was altered or corrupted.*--from-onnx"):
        runtime.Pipeline.load(broken)
    with pytest.raises(
        BundleError, match=r"model.plan could not be deserialised by TensorRT .*rebuild it with `python -m export.build --from-onnx"
    ):
        load_engine(load_manifest(broken, verify_files=False).components["unet"], broken)


def test_closed_engine_refuses_calls(trt_bundle):
    manifest = load_manifest(trt_bundle)
    unet = manifest.components["unet"]
    engine = load_engine(unet, trt_bundle)
    engine.close()
    engine.close()
    with pytest.raises(BundleError, match="was closed"):
        engine(fixed_inputs(unet.inputs, unet.name, manifest.vae.scaling_factor))


def test_lora_slots_switch_on_tensorrt_as_on_onnxruntime(tiny_model, tmp_path_factory):
    """LoRA slots are engine inputs on TensorRT too (no refit): A -> B -> A gives A's image bit for bit, and A's image
    matches the ONNX Runtime bundle the engines were built from."""
    pytest.importorskip("torch", reason="exporting the slotted test bundle needs torch")
    from export.build import build
    from tests.helpers.lora_adapters import make_adapter

    work = tmp_path_factory.mktemp("trt-lora")
    a = make_adapter(tiny_model, work / "a.safetensors", rank=4, seed=1)
    b = make_adapter(tiny_model, work / "b.safetensors", layout="kohya", rank=4, seed=2)
    onnx = build(tiny_model, work / "onnx", precision="fp32", lora_slots=8, backend="onnxruntime", log=print)
    trt = build_from_onnx(onnx, work / "trt", timing_cache_root=work / "timing-cache", log=print)
    latents = initial_latents((1, 4, 8, 8), seed=3)
    images = []
    for bundle in (onnx, trt):
        pipe = runtime.Pipeline.load(bundle, device="cpu") if bundle == onnx else runtime.Pipeline.load(bundle)
        run = []
        for adapter in (a, b, a):
            pipe.set_lora(adapter)
            run.append(pipe.txt2img(PROMPT, steps=4, latents=latents, output_type="np"))
        images.append(run)
        pipe.close()
    (ort_a, ort_b, _), (trt_a, trt_b, trt_a2) = images
    assert np.array_equal(trt_a, trt_a2) and np.abs(trt_a - trt_b).max() > 0.05
    assert np.abs(trt_a - ort_a).max() < 5e-3 and np.abs(trt_b - ort_b).max() < 5e-3  # as the plain fp32 txt2img comparison above
