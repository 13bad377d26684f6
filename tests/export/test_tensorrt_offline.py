"""The TensorRT path without TensorRT or a GPU: everything around the builder and the engine.

Manifest compatibility checks against other GPUs and TensorRT versions, the --from-onnx flow
(with a stand-in builder whose "engine" is the ONNX itself, so every figure is real), trtexec
command lines, CMake configure with and without trtexec, the refusal when TensorRT is missing,
and mypy --strict over the TensorRT/CUDA modules against tensorrt-stubs and the cudart stubs.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import tomllib

import runtime
from export.inputs import fixed_inputs
from export.tensorrt import from_onnx as from_onnx_mod
from export.tensorrt import trtexec as profile
from export.tensorrt.builder import (
    BuilderSettings,
    EngineBuildError,
    Precision,
    build_failure,
    builder_settings,
    check_network_inputs,
    choose_precision,
    dynamic_inputs,
    has_qdq,
)
from export.tensorrt.from_onnx import VerificationFailed, build_from_onnx, onnx_component
from runtime.backends.tensorrt import gpu_index, tensorrt_available
from runtime.bundle import load_manifest
from runtime.bundle.fit import Device, check_compatible, device_from_properties, differences, rebuild_command, recorded_device
from runtime.dispatch import load_engine
from runtime.errors import BundleError
from tests.helpers import REPO
from tests.helpers.qdq import qdq_onnx

ORIN = Device("10.3.0.30", "Orin", "8.7")
RTX = Device("10.13.0.35", "NVIDIA GeForce RTX 4090", "8.9")
needs_no_tensorrt = pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed here: the missing-TensorRT errors cannot happen")


def onnx_as_engine(component, path):
    """Stand-in for the TensorRT engine: the component's own ONNX through ONNX Runtime (error 0 by construction)."""
    return load_engine(onnx_component(component), path.parent.parent, backend="onnxruntime", device="cpu")


def fake_plan(name, onnx_path, inputs, precision, settings, timing_cache, outputs=()):
    return f"plan {name} {precision.name} strongly_typed={precision.strongly_typed}".encode()


def offline_build(source, out, **kwargs):
    kwargs.setdefault("device", ORIN)
    kwargs.setdefault("timing_cache_root", Path("engines/.timing-cache"))
    kwargs.setdefault("log", lambda _: None)
    return build_from_onnx(source, out, build=fake_plan, open_engine=onnx_as_engine, **kwargs)


@pytest.fixture(scope="module")
def trt_bundle(bundle_fp32, tmp_path_factory):
    return offline_build(bundle_fp32, tmp_path_factory.mktemp("trt") / "tiny-trt")


@pytest.fixture
def trt_copy(trt_bundle, tmp_path):
    return shutil.copytree(trt_bundle, tmp_path / "trt")


# -- device compatibility -------------------------------------------------------------


def test_device_from_cuda_properties():
    dev = device_from_properties("10.3.0.30", {"name": b"Orin\0\0\0garbage", "major": 8, "minor": 7})
    assert dev == ORIN
    assert dev.key == "orin-sm87-trt10.3.0.30"
    assert RTX.key == "nvidia-geforce-rtx-4090-sm89-trt10.13.0.35"


def test_differences_name_each_mismatch():
    assert differences(ORIN, ORIN) == []
    said = differences(ORIN, RTX)
    assert said == [
        "TensorRT 10.3.0.30 built it, this machine has TensorRT 10.13.0.35",
        "it was built for compute capability 8.7, this GPU is 8.9",
        "it was built on a Orin, this GPU is a NVIDIA GeForce RTX 4090",
    ]
    assert differences(ORIN, Device("10.3.0.31", "Orin", "8.7")) == ["TensorRT 10.3.0.30 built it, this machine has TensorRT 10.3.0.31"]


def test_bundle_from_another_gpu_is_refused_with_the_rebuild_command(trt_bundle):
    unet = load_manifest(trt_bundle).components["unet"]
    check_compatible(unet, trt_bundle, ORIN)  # the machine it was built for
    with pytest.raises(BundleError) as e:
        check_compatible(unet, trt_bundle, RTX)
    msg = str(e.value)
    assert "the unet engine does not fit this machine" in msg
    assert "TensorRT 10.3.0.30 built it, this machine has TensorRT 10.13.0.35" in msg
    assert "compute capability 8.7, this GPU is 8.9" in msg
    assert f"`python -m export.build --from-onnx {trt_bundle} --precision fp32 --builder-optimization-level 3`" in msg


def test_bundle_without_device_record_is_refused(trt_bundle):
    unet = load_manifest(trt_bundle).components["unet"]
    stripped = type(unet)(**{**unet.__dict__, "build": {k: v for k, v in unet.build.items() if k != "gpu"}})
    with pytest.raises(BundleError, match="does not say gpu.*--from-onnx"):
        recorded_device(stripped, trt_bundle)


def test_rebuild_command_in_place_quotes_paths(tmp_path):
    odd = tmp_path / "my bundle"
    assert rebuild_command(odd, in_place=True) == f"python -m export.build --from-onnx '{odd}' --out '{odd}' --force"


# -- --from-onnx: everything around TensorRT --------------------------------------------


def test_from_onnx_bundle_layout_and_manifest(trt_bundle, bundle_fp32):
    manifest = load_manifest(trt_bundle)  # every sha256 checks out
    source = load_manifest(bundle_fp32)
    assert manifest.backend == "tensorrt" and manifest.precision == "fp32" and manifest.onnx_precision == "fp32"
    assert manifest.tensorrt is not None and manifest.tensorrt.gpu == "Orin" and manifest.tensorrt.compute_capability == "8.7"
    assert manifest.scheduler == source.scheduler and manifest.latent_shape == source.latent_shape
    assert (trt_bundle / "tokenizer" / "vocab.json").is_file()
    for name, c in manifest.components.items():
        assert c.format == "plan" and c.file == f"{name}/model.plan"
        assert (trt_bundle / c.file).read_bytes() == f"plan {name} fp32 strongly_typed=True".encode()
        assert (trt_bundle / name / "model.onnx").read_bytes() == (bundle_fp32 / name / "model.onnx").read_bytes()
        assert c.inputs == source.components[name].inputs and c.outputs == source.components[name].outputs
        b = c.build
        assert (b["tensorrt"], b["gpu"], b["compute_capability"]) == ("10.3.0.30", "Orin", "8.7")
        assert b["flags"] == {
            "strongly_typed": True, "fp16": False, "tf32": False, "optimization_level": 3,
            "workspace_mib": None, "max_aux_streams": None, "preset": None,
        }  # fmt: skip
        assert b["from_onnx_args"] == ["--precision", "fp32", "--builder-optimization-level", "3"]
        assert b["timing_cache"] == "engines/.timing-cache/orin-sm87-trt10.3.0.30.cache"
        assert onnx_component(c) == source.components[name]
        v = c.verification
        assert v["passed"] is True and v["rel_err"] == 0.0 and v["tolerance"] == 1e-3
        assert v["onnx_vs_fp32_torch"] == source.components[name].verification["rel_err"]


def test_from_onnx_default_name_says_gpu_and_tensorrt(bundle_fp32, tmp_path, monkeypatch):
    monkeypatch.setattr(from_onnx_mod, "ENGINES", tmp_path / "engines")  # the checkout's engines/ otherwise
    out = offline_build(bundle_fp32, None)
    assert out == tmp_path / "engines/tiny-sd-64x64-b1-fp32-tensorrt-orin-sm87-trt10.3.0.30"
    assert (out / "manifest.json").is_file()


def test_lcm_bundle_feeds_the_guidance_embedding(tmp_path, monkeypatch):
    from export.build import build
    from tests.helpers.tiny_models import make_tiny_sd

    model = make_tiny_sd(tmp_path / "tiny-lcm", kind="lcm")
    lcm = build(model, tmp_path / "onnx", precision="fp32", backend="onnxruntime", log=lambda _: None)
    monkeypatch.setattr(from_onnx_mod, "ENGINES", tmp_path / "engines")
    out = offline_build(lcm, None)
    assert out == tmp_path / "engines/tiny-lcm-64x64-b1-fp32-tensorrt-orin-sm87-trt10.3.0.30-embedded"
    unet = load_manifest(out).components["unet"]
    assert "timestep_cond" in {t.name for t in unet.inputs} and unet.verification["passed"] is True


def test_engine_over_its_gate_is_refused_unless_forced(bundle_fp32, tmp_path):
    def off_by_a_bit(component, path):
        engine = onnx_as_engine(component, path)
        return lambda feed: {k: v + 0.01 * np.abs(v).max() + 0.01 for k, v in engine(feed).items()}

    out = tmp_path / "b"
    with pytest.raises(
        VerificationFailed, match=r"text_encoder: the fp32 engine differs from its ONNX by 0\.0\d+ .*gate is 0\.001.*--force"
    ):
        build_from_onnx(bundle_fp32, out, build=fake_plan, open_engine=off_by_a_bit, device=ORIN, log=lambda _: None)
    assert not out.exists() and not (tmp_path / ".b.partial").exists()
    build_from_onnx(bundle_fp32, out, build=fake_plan, open_engine=off_by_a_bit, device=ORIN, force=True, log=lambda _: None)
    v = load_manifest(out).components["unet"].verification
    assert v["passed"] is False and 0.01 < v["rel_err"] < 0.05


def test_rebuild_in_place_from_the_bundles_own_onnx(trt_copy):
    (trt_copy / "unet" / "model.plan").write_bytes(b"truncat")  # a damaged engine does not block its rebuild
    with pytest.raises(BundleError, match=r"unet/model.plan was altered or corrupted.*--from-onnx .* --out .* --force --precision fp32"):
        load_manifest(trt_copy)
    offline_build(trt_copy, trt_copy, force=True, device=RTX)
    manifest = load_manifest(trt_copy)
    assert manifest.components["unet"].build["gpu"] == RTX.gpu
    assert (trt_copy / "unet" / "model.plan").read_bytes().startswith(b"plan unet fp32")


def test_altered_source_onnx_is_refused(bundle_fp32, tmp_path):
    src = shutil.copytree(bundle_fp32, tmp_path / "src")
    with open(src / "unet" / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="unet/model.onnx was altered or corrupted"):
        offline_build(src, tmp_path / "out")


def test_fp16_bundle_builds_strongly_typed(bundle_fp16, tmp_path):
    out = offline_build(bundle_fp16, tmp_path / "b")
    manifest = load_manifest(out)
    assert manifest.precision == "fp16"
    for c in manifest.components.values():
        assert c.build["flags"]["strongly_typed"] is True and c.build["flags"]["fp16"] is False
        assert c.precision == load_manifest(bundle_fp16).components[c.name].precision  # kept-fp32 components stay fp32
        assert c.verification["tolerance"] == (5e-2 if c.precision == "fp16" else 1e-3)


def test_fp16_engines_from_fp32_onnx_use_the_fp16_flag_on_tensorrt_10_only(bundle_fp32, tmp_path):
    out = offline_build(bundle_fp32, tmp_path / "b", precision="fp16")
    unet = load_manifest(out).components["unet"]
    assert unet.precision == "fp16" and unet.build["flags"]["fp16"] is True and unet.build["flags"]["strongly_typed"] is False
    with pytest.raises(EngineBuildError, match="TensorRT 11 builds strongly typed networks only.*--precision fp16"):
        offline_build(bundle_fp32, tmp_path / "c", precision="fp16", device=Device("11.1.0.5", "NVIDIA H100", "9.0"))


def test_backend_tensorrt_exports_then_builds_from_the_onnx(tiny_model, tmp_path, monkeypatch):
    from export import build as build_mod

    monkeypatch.setattr(build_mod, "tensorrt_available", lambda: True)
    monkeypatch.setattr(from_onnx_mod, "build_from_onnx", lambda src, out, **kw: offline_build(src, out, **kw))
    said = []
    out = build_mod.build(tiny_model, tmp_path / "b", precision="fp32", backend="auto", device_preset="jetson-orin-nx", log=said.append)
    assert said[0] == "TensorRT is installed: building TensorRT engines (--backend tensorrt)"
    manifest = load_manifest(out)
    assert manifest.backend == "tensorrt" and {c.format for c in manifest.components.values()} == {"plan"}
    unet = manifest.components["unet"]
    assert unet.build["from_onnx_args"] == [
        "--precision", "fp32", "--device-preset", "jetson-orin-nx", "--builder-optimization-level", "3", "--workspace", "2048",
    ]  # fmt: skip
    assert unet.build["onnx"]["verification"]["passed"] is True  # the ONNX was verified against torch on the way
    assert (out / "unet" / "model.onnx").is_file()


@needs_no_tensorrt
def test_int8_without_qdq_is_refused_before_tensorrt_is_needed(bundle_fp32, tmp_path):
    with pytest.raises(EngineBuildError, match=r"int8 needs a UNet ONNX with Q/DQ .*--precision int8 --backend tensorrt.*--precision fp16"):
        build_from_onnx(bundle_fp32, tmp_path / "b", precision="int8", log=lambda _: None)


@needs_no_tensorrt
def test_from_onnx_cli_needs_no_torch_and_names_the_tensorrt_packages(bundle_fp32, tmp_path):
    code = (
        "import sys\n"
        "for m in ('torch', 'diffusers', 'transformers'): sys.modules[m] = None  # importing them now fails\n"
        "from export.build import main\n"
        f"raise SystemExit(main(['--from-onnx', {str(bundle_fp32)!r}, '--out', {str(tmp_path / 'b')!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert re.search(r"building TensorRT engines needs TensorRT and cuda-python, (which are|and \S+ is) not installed here", done.stderr)
    assert "pip install tensorrt cuda-python" in done.stderr and "python3-libnvinfer" in done.stderr
    assert not (tmp_path / "b").exists()


def test_from_onnx_cli_refuses_shape_flags(bundle_fp32, capsys):
    from export.build import main

    assert main(["--from-onnx", str(bundle_fp32), "--height", "128"]) == 2
    assert "--from-onnx builds the bundle's own shapes" in capsys.readouterr().err


def test_fixed_inputs_follow_the_manifest(bundle_fp32):
    manifest = load_manifest(bundle_fp32)
    text_encoder, unet_spec = manifest.components["text_encoder"], manifest.components["unet"]
    feed = fixed_inputs(text_encoder.inputs, text_encoder.name, manifest.vae.scaling_factor)
    ids = feed["input_ids"]
    assert ids.dtype == np.int32 and ids.shape == (2, 77) and (ids[:, 0] == 49406).all() and (ids[:, 6:] == 49407).all()
    unet = fixed_inputs(unet_spec.inputs, unet_spec.name, manifest.vae.scaling_factor)
    assert {k: (v.dtype.name, v.shape) for k, v in unet.items()} == {t.name: (t.dtype, t.shape) for t in unet_spec.inputs}
    assert (unet["timestep"] == 499).all()
    again = fixed_inputs(unet_spec.inputs, unet_spec.name, manifest.vae.scaling_factor)
    assert all(np.array_equal(unet[k], again[k]) for k in unet)


# -- the runtime refuses without TensorRT, never falls back ------------------------------


@needs_no_tensorrt
def test_loading_a_tensorrt_bundle_without_tensorrt_names_the_packages(trt_bundle):
    with pytest.raises(
        BundleError,
        match=(
            r"holds TensorRT engines: running them needs TensorRT and cuda-python, "
            r".*not installed here: install .*pip install tensorrt cuda-python"
        ),
    ):
        runtime.Pipeline.load(trt_bundle)


def test_plan_engines_run_on_a_gpu_only():
    assert gpu_index(None) == gpu_index("cuda") == gpu_index("tensorrt") == 0
    assert gpu_index("cuda:1") == gpu_index(1) == 1
    with pytest.raises(BundleError, match="runs on an NVIDIA GPU.*--backend onnxruntime"):
        gpu_index("cpu")


def test_onnx_component_cannot_be_forced_onto_tensorrt(bundle_fp32):
    unet = load_manifest(bundle_fp32).components["unet"]
    with pytest.raises(BundleError, match="TensorRT runs .plan engines and model.onnx is onnx"):
        load_engine(unet, bundle_fp32, backend="tensorrt")


# -- the runtime engine's data path, on stand-ins for tensorrt and cudart --------------------


@pytest.fixture
def fake_gpu(trt_copy, monkeypatch):
    """The TensorRT bundle's UNet with a fake engine behind it, on a fake Orin with TensorRT 10.3.0.30."""
    from tests.helpers import fake_tensorrt

    unet = load_manifest(trt_copy, verify_files=False).components["unet"]
    (trt_copy / unet.file).write_bytes(fake_tensorrt.FAKE_PLAN)
    gpu = fake_tensorrt.Gpu()
    tensors = {t.name: (t.shape, t.dtype) for t in (*unet.inputs, *unet.outputs)}
    fake_tensorrt.install(monkeypatch, gpu, tensors)
    return gpu, unet, trt_copy, tensors


def unet_feed(unet, seed):
    rng = np.random.default_rng(seed)
    return {t.name: rng.standard_normal(t.shape).astype(t.dtype) for t in unet.inputs}


def expected_unet(feed):
    return 2 * feed["sample"] + feed["timestep"][:, None, None, None]


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_engine_copies_in_runs_and_copies_out(fake_gpu, cuda_graph):
    from runtime.backends.tensorrt import TrtEngine

    gpu, unet, bundle, _ = fake_gpu
    with TrtEngine(unet, bundle / unet.file, bundle=bundle, cuda_graph=cuda_graph) as engine:
        assert engine.uses_cuda_graph is cuda_graph
        assert len(gpu.memory) == 2 * 4  # a device and a pinned host buffer per tensor, once
        for seed in (1, 2):  # a new feed each call: a graph must replay copies from the same buffers
            feed = unet_feed(unet, seed)
            out = engine(feed)["out_sample"]
            np.testing.assert_array_equal(out, expected_unet(feed))
        out[...] = 0  # results are copies, not views of the pinned buffers
        np.testing.assert_array_equal(engine(feed)["out_sample"], expected_unet(feed))
        assert gpu.launches == (3 if cuda_graph else 0)
        with pytest.raises(runtime.errors.FeedError, match="unet.timestep: dtype float64"):
            engine({**feed, "timestep": feed["timestep"].astype(np.float64)})
    assert gpu.memory == {}  # the context manager freed every buffer
    with pytest.raises(BundleError, match="unet: this TensorRT engine was closed"):
        engine(feed)
    engine.close()


def test_engine_through_load_engine_checks_the_device(fake_gpu):
    gpu, unet, bundle, _ = fake_gpu
    with load_engine(unet, bundle) as engine:
        np.testing.assert_array_equal(engine(unet_feed(unet, 0))["out_sample"], expected_unet(unet_feed(unet, 0)))
    gpu.name = b"NVIDIA GeForce RTX 4090"
    with pytest.raises(BundleError, match=r"built on a Orin, this GPU is a NVIDIA GeForce RTX 4090.*`python -m export.build --from-onnx"):
        load_engine(unet, bundle)
    assert gpu.memory == {}


def test_corrupt_and_empty_plans_name_the_file_and_the_rebuild(fake_gpu):
    from runtime.backends.tensorrt import TrtEngine

    _, unet, bundle, _ = fake_gpu
    plan = bundle / unet.file
    plan.write_bytes(b"\x00garbage")
    with pytest.raises(BundleError) as e:
        TrtEngine(unet, plan, bundle=bundle)
    assert f"{plan} could not be deserialised by TensorRT 10.3.0.30 (a corrupt or truncated .plan" in str(e.value)
    assert "magic tag does not match" in str(e.value)
    rebuild = f"`python -m export.build --from-onnx {bundle} --out {bundle} --force --precision fp32 --builder-optimization-level 3`"
    assert rebuild in str(e.value)
    plan.write_bytes(b"")
    with pytest.raises(
        BundleError, match="model.plan is missing or empty: not a TensorRT engine; rebuild it with `python -m export.build --from-onnx"
    ):
        TrtEngine(unet, plan, bundle=bundle)


def test_engine_that_disagrees_with_the_manifest_is_refused(fake_gpu, monkeypatch):
    from runtime.backends.tensorrt import TrtEngine
    from tests.helpers import fake_tensorrt

    gpu, unet, bundle, tensors = fake_gpu
    fake_tensorrt.install(monkeypatch, gpu, {**tensors, "sample": ((2, 4, 8, 8), "float16")})
    with pytest.raises(
        BundleError, match=r"tensor sample is float16 \(2, 4, 8, 8\) in the engine but float32 \(2, 4, 8, 8\) in the manifest"
    ):
        TrtEngine(unet, bundle / unet.file, bundle=bundle)
    assert gpu.memory == {}


def test_out_of_gpu_memory_frees_what_was_allocated(fake_gpu):
    from runtime.backends.tensorrt import CudaError, TrtEngine

    gpu, unet, bundle, _ = fake_gpu
    gpu.fail_malloc_after = 3
    with pytest.raises(CudaError, match="allocating .* failed: cudaErrorMemoryAllocation; free GPU memory"):
        TrtEngine(unet, bundle / unet.file, bundle=bundle)
    assert gpu.memory == {}


# -- builder settings, precision policy, ONNX inspection -----------------------------------


def test_builder_settings_presets_and_overrides():
    assert builder_settings() == BuilderSettings(3, None, None, None)
    nano = builder_settings("jetson-orin-nano")
    assert (nano.workspace_mib, nano.max_aux_streams, nano.optimization_level) == (1024, 0, 3)
    assert builder_settings("jetson-orin-nano", 1, 512) == BuilderSettings(1, 512, 0, "jetson-orin-nano")
    with pytest.raises(ValueError, match="0 \\(fastest build\\) to 5"):
        builder_settings(optimization_level=6)
    with pytest.raises(ValueError, match="at least 1"):
        builder_settings(workspace_mib=0)
    with pytest.raises(ValueError, match="unknown --device-preset 'jetson-tx2'"):
        builder_settings("jetson-tx2")


@pytest.mark.parametrize(
    ("asked", "onnx", "qdq", "major", "kept", "expected"),
    [
        ("fp32", "fp32", False, 10, False, Precision("fp32", True, False, False)),
        ("fp16", "fp16", False, 10, False, Precision("fp16", True, False, True)),
        ("fp16", "fp16", False, 11, False, Precision("fp16", True, False, True)),
        ("fp16", "fp32", False, 10, False, Precision("fp16", False, True, True)),
        ("fp16", "fp32", False, 10, True, Precision("fp32", True, False, False)),
        ("int8", "fp32", True, 10, False, Precision("int8", True, False, True)),
        ("fp16", "fp16", True, 11, False, Precision("int8", True, False, True)),
    ],
)
def test_choose_precision(asked, onnx, qdq, major, kept, expected):
    assert choose_precision(asked, "unet", onnx, qdq, major, kept_fp32=kept) == expected


def test_choose_precision_refusals():
    with pytest.raises(EngineBuildError, match="Q/DQ"):
        choose_precision("int8", "unet", "fp16", False, 10)
    assert choose_precision("int8", "vae_decoder", "fp16", False, 10).name == "fp16"  # only the UNet is quantized
    with pytest.raises(EngineBuildError, match="its ONNX is fp16; an fp32 engine needs the fp32 ONNX bundle"):
        choose_precision("fp32", "unet", "fp16", False, 10)
    with pytest.raises(EngineBuildError, match="quantized.*fp32 ONNX"):
        choose_precision("fp32", "unet", "fp32", True, 10)


def test_out_of_memory_build_says_which_limit_to_lower():
    oom = [
        "[defaultAllocator.cpp::allocate] Error Code 1: Cuda Runtime (out of memory)",
        "Requested amount of GPU memory (4294967296 bytes) could not be allocated.",
    ]
    msg = str(build_failure("unet", oom, builder_settings(workspace_mib=1024)))
    assert "ran out of device memory" in msg and "--workspace 512 (now 1024 MiB)" in msg and "--device-preset jetson-orin-nano" in msg
    assert "--workspace 1024 (now unlimited)" in str(build_failure("unet", oom, BuilderSettings()))
    other = str(build_failure("unet", ["Error Code 4: unsupported operator Foo"], BuilderSettings()))
    assert other == "unet: TensorRT could not build the engine: Error Code 4: unsupported operator Foo"


def test_network_inputs_must_take_the_bundle_shapes(bundle_fp32):
    specs = load_manifest(bundle_fp32).components["unet"].inputs
    shapes = {t.name: t.shape for t in specs}
    assert check_network_inputs("unet", shapes, specs) == []
    assert check_network_inputs("unet", {**shapes, "sample": (-1, 4, 8, 8)}, specs) == ["sample"]
    with pytest.raises(
        EngineBuildError, match=r"ONNX input sample has shape \(2, 4, 16, 16\), which cannot take the bundle's \(2, 4, 8, 8\)"
    ):
        check_network_inputs("unet", {**shapes, "sample": (2, 4, 16, 16)}, specs)
    with pytest.raises(EngineBuildError, match="not the manifest's"):
        check_network_inputs("unet", {"x": (1,)}, specs)


def test_qdq_detection(bundle_fp32, tmp_path):
    assert has_qdq(qdq_onnx(tmp_path / "q.onnx"))
    assert not has_qdq(bundle_fp32 / "unet" / "model.onnx")


def dynamic_copy(bundle: Path, dest: Path) -> Path:
    """The bundle with its UNet's `sample` input given a symbolic batch dimension."""
    import onnx

    out = shutil.copytree(bundle, dest)
    proto = onnx.load(str(out / "unet" / "model.onnx"))
    sample = next(i for i in proto.graph.input if i.name == "sample")
    sample.type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.save(proto, str(out / "unet" / "model.onnx"))
    return out


def test_dynamic_inputs(bundle_fp32, tmp_path):
    assert dynamic_inputs(bundle_fp32 / "unet" / "model.onnx") == []
    assert dynamic_inputs(dynamic_copy(bundle_fp32, tmp_path / "dyn") / "unet" / "model.onnx") == ["sample"]


# -- trtexec lines --------------------------------------------------------------------


UNET_SHAPES = "sample:2x4x8x8,timestep:2,encoder_hidden_states:2x77x32"


def test_trtexec_lines_for_a_tensorrt_bundle(trt_bundle, tmp_path):
    commands = {c.component: c for c in profile.bundle_commands(trt_bundle, engine_dir=tmp_path / "e")}
    assert list(commands) == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    unet = commands["unet"]
    assert unet.build == [
        "trtexec",
        f"--onnx={trt_bundle}/unet/model.onnx",
        f"--saveEngine={tmp_path}/e/unet.plan",
        "--stronglyTyped",
        "--noTF32",
        "--builderOptimizationLevel=3",
        "--timingCacheFile=engines/.timing-cache/orin-sm87-trt10.3.0.30.cache",
        "--skipInference",
    ]
    assert unet.time == [
        "trtexec",
        f"--loadEngine={trt_bundle}/unet/model.plan",
        f"--shapes={UNET_SHAPES}",
        "--useCudaGraph",
        "--noDataTransfers",
        "--useSpinWait",
    ]
    assert commands["vae_decoder"].time[2] == "--shapes=latent_sample:1x4x8x8"
    assert commands["text_encoder"].time[2] == "--shapes=input_ids:2x77"


def test_trtexec_lines_for_an_onnx_bundle_with_a_jetson_preset(bundle_fp16, tmp_path):
    unet = profile.bundle_commands(bundle_fp16, engine_dir=tmp_path, settings=builder_settings("jetson-orin-nano"))[1]
    assert shlex.join(unet.build) == (
        f"trtexec --onnx={bundle_fp16}/unet/model.onnx --saveEngine={tmp_path}/unet.plan --stronglyTyped "
        "--builderOptimizationLevel=3 --memPoolSize=workspace:1024 --maxAuxStreams=0 "
        "--timingCacheFile=engines/.timing-cache/trtexec.cache --skipInference"
    )
    assert unet.time[1] == f"--loadEngine={tmp_path}/unet.plan"  # no engine in the bundle: time the rebuilt one


def test_trtexec_fp16_flag_from_an_fp32_onnx(bundle_fp32, tmp_path):
    unet = profile.bundle_commands(bundle_fp32, engine_dir=tmp_path, precision="fp16", timing_cache=tmp_path / "t.cache")[1]
    assert unet.build[3:] == ["--fp16", "--builderOptimizationLevel=3", f"--timingCacheFile={tmp_path}/t.cache", "--skipInference"]


def test_trtexec_profile_shapes_only_for_dynamic_inputs(bundle_fp32, tmp_path):
    dyn = dynamic_copy(bundle_fp32, tmp_path / "dyn")
    unet = profile.bundle_commands(dyn, engine_dir=tmp_path)[1]
    assert unet.build[3:6] == ["--minShapes=sample:2x4x8x8", "--optShapes=sample:2x4x8x8", "--maxShapes=sample:2x4x8x8"]
    static = profile.bundle_commands(bundle_fp32, engine_dir=tmp_path)[1]
    assert not any("Shapes=" in a for a in static.build)  # trtexec rejects shape flags for a static ONNX


def fake_trtexec(bin_dir: Path) -> Path:
    """A trtexec that logs its argv and writes the --saveEngine file."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "trtexec"
    exe.write_text(
        "#!/bin/sh\n"
        'printf "%s\\n" "$*" >> "$(dirname "$0")/calls.log"\n'
        'for a in "$@"; do case "$a" in --saveEngine=*) printf plan > "${a#--saveEngine=}";; esac; done\n'
    )
    exe.chmod(0o755)
    return exe


def test_profile_cli_prints_runs_and_explains(trt_bundle, tmp_path):
    base = [sys.executable, "-m", "export.tensorrt.trtexec", str(trt_bundle), "--engine-dir", str(tmp_path / "e")]
    printed = subprocess.run(base, cwd=REPO, capture_output=True, text=True, check=True).stdout.splitlines()
    commands = profile.bundle_commands(trt_bundle, engine_dir=tmp_path / "e")
    assert printed[:3] == [
        f"# text_encoder: rebuild from {trt_bundle}/text_encoder/model.onnx, then time",
        shlex.join(commands[0].build),
        shlex.join(commands[0].time),
    ]
    assert len(printed) == 12
    as_json = json.loads(subprocess.run([*base, "--json"], cwd=REPO, capture_output=True, text=True, check=True).stdout)
    assert as_json[1]["build"] == commands[1].build and as_json[1]["timed"] == f"{trt_bundle}/unet/model.plan"

    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    missing = subprocess.run([*base, "--run"], cwd=REPO, capture_output=True, text=True, env=env)
    assert missing.returncode == 2 and "trtexec not found" in missing.stderr and "/usr/src/tensorrt/bin/trtexec" in missing.stderr

    exe = fake_trtexec(tmp_path / "bin")
    env["PATH"] = f"{exe.parent}:/usr/bin:/bin"
    ran = subprocess.run([*base, "--run"], cwd=tmp_path, capture_output=True, text=True, env={**env, "PYTHONPATH": str(REPO)})
    assert ran.returncode == 0, ran.stderr
    calls = (tmp_path / "bin" / "calls.log").read_text().splitlines()
    assert calls == [shlex.join(argv[1:]) for c in commands for argv in (c.build, c.time)]
    assert (tmp_path / "e" / "unet.plan").read_text() == "plan"
    assert (tmp_path / "engines" / ".timing-cache").is_dir()  # created for trtexec, which does not


# -- CMake ---------------------------------------------------------------------------------


needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")


def cmake_configure(build_dir: Path, bundle: Path, path: str) -> str:
    cache = build_dir / "timing.cache"
    cmd = ["cmake", "-S", str(REPO), "-B", str(build_dir), f"-DBUNDLE={bundle}", f"-DTIMING_CACHE={cache}"]
    cmd.append(f"-DPython3_EXECUTABLE={sys.executable}")
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PATH": path})
    assert done.returncode == 0, done.stderr
    return done.stdout


TRTEXEC_PLACES = [
    os.environ.get("TENSORRT_ROOT", "/nonexistent") + "/bin", "/usr/src/tensorrt/bin", "/usr/local/tensorrt/bin", "/opt/tensorrt/bin",
]  # fmt: skip


@needs_cmake
@pytest.mark.skipif(
    any(Path(d, "trtexec").exists() for d in TRTEXEC_PLACES), reason="trtexec is installed where CMakeLists.txt looks for it"
)
def test_cmake_configure_without_trtexec_says_what_is_unavailable(bundle_fp16, tmp_path):
    out = cmake_configure(tmp_path / "build", bundle_fp16, "/usr/bin:/bin")
    assert "-- unavailable: engines, profile (trtexec not found: it ships with TensorRT" in out
    if not tensorrt_available():
        assert "-- unavailable: bundle (TensorRT's Python package and cuda-python are not importable" in out
    assert "-- available: ctest: pytest, pytest-tensorrt" in out
    tests = subprocess.run(["ctest", "-N", "--test-dir", str(tmp_path / "build")], capture_output=True, text=True, check=True).stdout
    assert "Test #1: pytest" in tests and "Test #2: pytest-tensorrt" in tests


@needs_cmake
def test_cmake_builds_the_engines_with_trtexec(bundle_fp16, tmp_path):
    exe = fake_trtexec(tmp_path / "bin")
    path = f"{exe.parent}:/usr/bin:/bin"
    out = cmake_configure(tmp_path / "build", bundle_fp16, path)
    assert "-- available: engines" in out and "-- available: profile-unet" in out
    built = subprocess.run(["cmake", "--build", str(tmp_path / "build")], capture_output=True, text=True, env={**os.environ, "PATH": path})
    assert built.returncode == 0, built.stdout + built.stderr
    build = tmp_path / "build"
    expected = profile.bundle_commands(bundle_fp16, trtexec=str(exe), engine_dir=build / "engines", timing_cache=build / "timing.cache")
    calls = (exe.parent / "calls.log").read_text().splitlines()
    assert sorted(calls) == sorted(shlex.join(c.build[1:]) for c in expected)
    plans = sorted(p.name for p in (build / "engines").glob("*.plan"))
    assert plans == ["text_encoder.plan", "unet.plan", "vae_decoder.plan", "vae_encoder.plan"]
    timed = subprocess.run(
        ["cmake", "--build", str(build), "-t", "profile-unet"], capture_output=True, text=True, env={**os.environ, "PATH": path}
    )
    assert timed.returncode == 0, timed.stdout
    assert (exe.parent / "calls.log").read_text().splitlines()[-1] == shlex.join(expected[1].time[1:])


# -- static typing -------------------------------------------------------------------------


def typecheck_paths(tmp: Path) -> Path:
    """tensorrt-stubs' files, with its few syntax defects (a parameter named `in`, a non-default after defaults) repaired.

    The package installs them as a bare `tensorrt/` folder without py.typed, and every release so far
    has lines Python cannot parse; the repaired copy goes on MYPYPATH. Returns that folder.
    """
    site = Path(sysconfig.get_paths()["purelib"])
    if not (site / "tensorrt" / "__init__.pyi").is_file():
        pytest.fail(
            "tensorrt-stubs is not installed: `pip install --no-deps tensorrt-stubs==10.13.0.35.1`"
            " (its tensorrt dependency cannot install without NVIDIA's index)"
        )
    for package in ("tensorrt", "tensorrt_bindings"):
        (tmp / package).mkdir(parents=True)
        for stub in (site / package).glob("*.pyi"):
            text = re.sub(r"(?m)^(\s*def \w+\(.*?)\bin: ", r"\1in_: ", stub.read_text())
            text = re.sub(r"(?m)^(\s*def \w+\()(.*)(\) -> .*:)$", lambda m: m[1] + _defaults_after_defaults(m[2]) + m[3], text)
            ast.parse(text, str(stub))
            (tmp / package / stub.name).write_text(text)
    return tmp


def _defaults_after_defaults(params: str) -> str:
    out, seen_default = [], False
    for p in re.split(r", (?=\w+:)", params):
        seen_default = seen_default or "=" in p
        out.append(p + " = ..." if seen_default and "=" not in p else p)
    return ", ".join(out)


def run_mypy(tmp: Path, *files: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MYPYPATH": f"{typecheck_paths(tmp / 'stubs')}:{REPO / 'stubs'}"}
    cmd = [sys.executable, "-m", "mypy", "--cache-dir", str(tmp / "cache"), *files]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)


def test_tensorrt_modules_pass_mypy_strict(tmp_path):
    done = run_mypy(tmp_path)  # files and --strict come from [tool.mypy] in pyproject.toml
    assert done.returncode == 0, done.stdout + done.stderr
    # every module of the packages [tool.mypy] names (runtime/, export/, serving/), strict: the count follows the tree
    checked = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]["files"]
    expected = len([f for package in checked for f in (REPO / package).rglob("*.py")])
    assert f"Success: no issues found in {expected} source files" in done.stdout


def test_mypy_setup_catches_misuse_of_tensorrt_and_cudart(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text(
        "import tensorrt as trt\n"
        "from cuda.bindings import runtime as cudart\n\n\n"
        "def probe(context: trt.IExecutionContext, stream: cudart.cudaStream_t) -> None:\n"
        "    context.execute_async_v3(stream)\n"
        "    cudart.cudaMalloc('1 MiB')\n"
        "    trt.Builder(trt.Logger()).create_network().num_input\n"
    )
    done = run_mypy(tmp_path, str(bad))
    assert done.returncode == 1
    assert 'Argument 1 to "execute_async_v3" of "IExecutionContext" has incompatible type "cudaStream_t"; expected "int"' in done.stdout
    assert 'Argument 1 to "cudaMalloc" has incompatible type "str"; expected "int"' in done.stdout
    assert '"INetworkDefinition" has no attribute "num_input"' in done.stdout


def test_cudart_stubs_match_the_installed_cuda_python():
    from cuda.bindings import runtime as cudart

    stub = ast.parse((REPO / "stubs" / "cuda" / "bindings" / "runtime.pyi").read_text())
    checked = 0
    for node in stub.body:
        if isinstance(node, ast.FunctionDef):
            real = inspect.signature(getattr(cudart, node.name))
            assert [a.arg for a in node.args.args] == list(real.parameters), node.name
            checked += 1
        elif isinstance(node, ast.ClassDef):
            cls = getattr(cudart, node.name)
            for item in node.body:
                if isinstance(item, ast.Assign):  # enum members: same name, same value
                    name, value = item.targets[0].id, ast.literal_eval(item.value)
                    assert int(getattr(cls, name)) == value, f"{node.name}.{name}"
                elif isinstance(item, ast.AnnAssign):
                    assert hasattr(cls(), item.target.id), f"{node.name}.{item.target.id}"
    assert checked >= 20


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_stepped_context_is_fed_at_each_prompts_length(fake_gpu, monkeypatch, cuda_graph):
    """A bundle built with --max-prompt-tokens: the engine's context axis is dynamic (-1), its buffer the maximum;
    each call tells TensorRT its length, and a CUDA graph is recorded again when the length changes."""
    from dataclasses import replace

    from runtime.backends.tensorrt import TrtEngine
    from runtime.bundle import TensorSpec
    from tests.helpers import fake_tensorrt

    gpu, unet, bundle, tensors = fake_gpu
    context = unet.input("encoder_hidden_states")
    rows, seq, dim = context.shape
    stepped = TensorSpec(context.name, (rows, 3 * seq, dim), context.dtype, (0, seq, 0))
    unet = replace(unet, inputs=tuple(stepped if t.name == context.name else t for t in unet.inputs))
    fake_tensorrt.install(monkeypatch, gpu, {**tensors, context.name: ((rows, -1, dim), context.dtype)})
    with TrtEngine(unet, bundle / unet.file, bundle=bundle, cuda_graph=cuda_graph) as engine:
        calls = engine._context.shape_calls
        assert calls == [(context.name, (rows, 3 * seq, dim))]  # bound at the maximum
        for chunks in (1, 2, 2, 1):
            feed = {**unet_feed(replace(unet, inputs=tuple(t for t in unet.inputs if t.name != context.name)), chunks)}
            feed[context.name] = np.ones((rows, chunks * seq, dim), np.float32)
            np.testing.assert_array_equal(engine(feed)["out_sample"], expected_unet(feed))
            assert calls[-1] == (context.name, (rows, chunks * seq, dim))
        assert len(calls) == 4  # the maximum, then 1, 2 and 1 chunks: an unchanged length is not set again
        with pytest.raises(runtime.errors.FeedError, match=r"encoder_hidden_states: shape \(2, 100, 32\) but the bundle takes"):
            engine({**feed, context.name: np.ones((rows, 100, dim), np.float32)})
