"""The runtime's TensorRT-for-RTX path on stand-ins for `tensorrt_rtx` and cudart (no GPU here): the runtime cache
per engine and GPU (written after the first run, read by the next load), the library's own CUDA graph, its
engine-validity check, the version check, and the one-line refusal without a GPU driver."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from export.tensorrt import from_onnx
from runtime.backends import runtime_cache
from runtime.backends.libraries import TENSORRT_RTX
from runtime.bundle import load_manifest
from runtime.bundle.fit import Device
from runtime.dispatch import load_engine
from runtime.errors import BundleError
from tests.helpers import fake_tensorrt

BUILT = Device("1.7.1.116", "none (ahead of time)", "8.0,8.6,8.9,12.0,12.1", "tensorrt-rtx")


def fake_plan(name, onnx_path, inputs, precision, settings, timing_cache, outputs):
    return fake_tensorrt.FAKE_PLAN + name.encode()


@pytest.fixture(scope="module")
def rtx_bundle(bundle_fp16, tmp_path_factory):
    """The tiny fp16 bundle as a TensorRT-for-RTX bundle whose engines are the stand-in's, built as on a machine
    without a GPU (the engines are not run at build time)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(from_onnx, "engines_can_run", lambda library: False)
        out = tmp_path_factory.mktemp("rtx") / "b"
        return from_onnx.build_from_onnx(bundle_fp16, out, build=fake_plan, device=BUILT, library=TENSORRT_RTX, log=lambda _: None)


@pytest.fixture
def rtx(rtx_bundle, tmp_path, monkeypatch):
    bundle = shutil.copytree(rtx_bundle, tmp_path / "b")
    unet = load_manifest(bundle).components["unet"]
    gpu = fake_tensorrt.Gpu(name=b"NVIDIA GeForce RTX 4090", major=8, minor=9)
    fake_tensorrt.install(
        monkeypatch, gpu, {t.name: (t.shape, t.dtype) for t in (*unet.inputs, *unet.outputs)}, "1.7.1.116", "tensorrt_rtx"
    )
    monkeypatch.setenv(runtime_cache.ENV, str(tmp_path / "cache"))
    return gpu, unet, bundle, tmp_path / "cache"


def feed(unet, seed=0):
    rng = np.random.default_rng(seed)
    return {t.name: rng.standard_normal(t.shape).astype(t.dtype) for t in unet.inputs}


def test_the_first_run_fills_the_runtime_cache_and_the_next_load_reads_it(rtx):
    gpu, unet, bundle, cache = rtx
    with load_engine(unet, bundle) as engine:
        assert engine.runtime_cache_file is not None and not engine.runtime_cache_file.exists()  # nothing compiled yet
        f = feed(unet)
        np.testing.assert_array_equal(engine(f)["out_sample"], 2 * f["sample"] + f["timestep"][:, None, None, None])
        path = engine.runtime_cache_file
    assert path.parent == cache / "nvidia-geforce-rtx-4090-sm89-rtx1.7.1.116" and path.suffix == ".cache"
    assert path.read_bytes() == b"KERNELS for this GPU"
    with load_engine(unet, bundle) as again:
        assert again.runtime_cache_file == path
    assert gpu.runtime_configs[-1].cache.loaded == b"KERNELS for this GPU"  # the second load started from the cache
    path.write_bytes(b"garbage")  # a damaged cache is dropped, the engine still loads, and the cache is rewritten
    with load_engine(unet, bundle) as third:
        third(feed(unet))
    assert path.read_bytes() == b"KERNELS for this GPU"


def test_cuda_graph_is_the_librarys_whole_graph_capture(rtx):
    gpu, unet, bundle, _ = rtx
    with load_engine(unet, bundle, cuda_graph=True) as engine:
        assert engine.uses_cuda_graph and gpu.runtime_configs[-1].cuda_graph_strategy == "WHOLE_GRAPH_CAPTURE"
        engine(feed(unet))
    assert gpu.launches == 0  # no graph of ours: TensorRT for RTX captures and replays its own


def test_an_engine_the_library_calls_invalid_here_is_refused_with_the_fix(rtx):
    gpu, unet, bundle, _ = rtx
    gpu.invalid = ("UNSUPPORTED_CC",)
    with pytest.raises(
        BundleError, match=r"TensorRT for RTX says this engine cannot run on this GPU \(UNSUPPORTED_CC.*--compute-capability current"
    ):
        load_engine(unet, bundle)
    gpu.invalid = ("OLD_CUDA_DRIVER",)
    with pytest.raises(BundleError, match="update the NVIDIA driver"):
        load_engine(unet, bundle)
    assert gpu.memory == {}


def test_another_library_version_is_refused_with_the_install_and_the_rebuild(rtx, monkeypatch):
    gpu, unet, bundle, _ = rtx
    fake_tensorrt.install(monkeypatch, gpu, {t.name: (t.shape, t.dtype) for t in (*unet.inputs, *unet.outputs)}, "1.8.0.1", "tensorrt_rtx")
    with pytest.raises(BundleError) as e:
        load_engine(unet, bundle)
    msg = str(e.value)
    assert "TensorRT for RTX 1.7.1.116 built it, this machine has TensorRT for RTX 1.8.0.1" in msg
    assert "tensorrt-rtx-cu13==1.7.1.116" in msg and "--from-onnx" in msg and "--backend tensorrt-rtx" in msg


def test_no_driver_is_one_line_naming_what_is_needed(rtx):
    gpu, unet, bundle, _ = rtx
    gpu.count_error = fake_tensorrt.cudaError_t.cudaErrorInsufficientDriver
    with pytest.raises(BundleError) as e:
        load_engine(unet, bundle)
    msg = str(e.value)
    assert msg.startswith(f"{bundle} holds TensorRT for RTX engines, which run on an NVIDIA GPU of compute capability 8.0, 8.6")
    assert "this machine has no CUDA GPU (cudaErrorInsufficientDriver)" in msg and "--backend onnxruntime`" in msg
    assert "\n" not in msg


def deep_unet(bound):
    """The stand-in full UNet: the plain stand-in's out_sample, and a deep feature made from the sample."""
    return {**fake_tensorrt.unet_stand_in(bound), "deep_feature": 3 * bound["sample"].sum(axis=1, keepdims=True)}


def shallow_unet(bound):
    """The stand-in shallow UNet: the plain stand-in's out_sample plus the fed feature's first channels."""
    out = fake_tensorrt.unet_stand_in(bound)["out_sample"]
    return {"out_sample": out + bound["deep_feature"][:, : out.shape[1]]}


def test_deepcache_pair_takes_the_cached_feature_and_each_prompts_length(rtx, monkeypatch):
    """DeepCache on TensorRT-for-RTX engines of a long-prompt bundle: the full UNet's deep feature reaches the shallow
    UNet on the steps between, and each engine is told the context length of each call (TensorRT for RTX's own Dims:
    `tensorrt` is not installed beside it)."""
    from dataclasses import replace

    from runtime.bundle import TensorSpec
    from runtime.bundle.levers import DEEP_FEATURE, DEEP_UNET, SHALLOW_UNET
    from runtime.deepcache import CachedUNet

    gpu, unet, bundle, _ = rtx
    sample, timestep, context = unet.inputs
    rows, seq, dim = context.shape
    stepped = TensorSpec(context.name, (rows, 2 * seq, dim), context.dtype, (0, seq, 0))
    feature = TensorSpec(DEEP_FEATURE, (rows, 8, *sample.shape[2:]), "float32")
    plain = replace(unet, inputs=(sample, timestep, stepped))
    deep = replace(plain, name=DEEP_UNET, file=f"{DEEP_UNET}/model.plan", outputs=(*unet.outputs, feature))
    shallow = replace(plain, name=SHALLOW_UNET, file=f"{SHALLOW_UNET}/model.plan", inputs=(*plain.inputs, feature))
    plans = {}
    for c, compute in ((deep, deep_unet), (shallow, shallow_unet)):
        (bundle / c.file).parent.mkdir()
        (bundle / c.file).write_bytes(fake_tensorrt.FAKE_PLAN + c.name.encode())
        tensors = {t.name: ((rows, -1, dim) if t is stepped else t.shape, t.dtype) for t in (*c.inputs, *c.outputs)}
        plans[fake_tensorrt.FAKE_PLAN + c.name.encode()] = (tensors, compute)
    fake_tensorrt.install(monkeypatch, gpu, {}, "1.7.1.116", "tensorrt_rtx", plans)
    with load_engine(deep, bundle) as full, load_engine(shallow, bundle) as part:
        cached = CachedUNet(plain, full, part, interval=2)
        rng = np.random.default_rng(0)
        cache = None
        for step, chunks in enumerate((2, 1, 1, 2)):
            f = {t.name: rng.standard_normal(t.shape).astype(t.dtype) for t in (sample, timestep)}
            f[context.name] = rng.standard_normal((rows, chunks * seq, dim)).astype(np.float32)
            expected = 2 * f["sample"] + f["timestep"][:, None, None, None]
            if step % 2 == 0:
                cache = 3 * f["sample"].sum(axis=1, keepdims=True)  # what the stand-in full UNet returns as the feature
            else:
                expected = expected + cache[:, : sample.shape[1]]
            np.testing.assert_allclose(cached(f)["out_sample"], expected, rtol=1e-6)
            engine = full if step % 2 == 0 else part
            assert engine._context.shape_calls[-1] == (context.name, (rows, chunks * seq, dim))
            cached.step_done()
    assert cached.calls == {"full": 2, "shallow": 2}
    assert gpu.memory == {}
