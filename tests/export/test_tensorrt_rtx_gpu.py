"""TensorRT for RTX on a real GPU: engines built ahead of time (as on a machine without a GPU) run through the
runtime's one API, match the ONNX bundle, and leave a runtime cache the next load reads.

Skipped (with the reason) where TensorRT for RTX, cuda-python or a CUDA GPU is missing, or where TensorRT for RTX
says the engine cannot run on this GPU (its support matrix lists RTX-class compute capabilities). Run on a GPU
machine with `python -m pytest -rs tests/export/test_tensorrt_rtx_gpu.py`.
"""

from __future__ import annotations

import numpy as np
import pytest

import runtime
from export.tensorrt import from_onnx
from runtime.backends import runtime_cache
from runtime.backends.libraries import TENSORRT_RTX
from tests.helpers.rtx import build_rtx


def why_skip() -> str | None:
    if not TENSORRT_RTX.installed():
        return "TensorRT for RTX is not installed (pip install tensorrt-rtx-cu13 cuda-python)"
    try:
        from runtime.backends.tensorrt import gpu_count
    except ImportError:
        return "cuda-python is not installed"
    count, why = gpu_count()
    return None if count else f"no CUDA GPU here ({why})"


REASON = why_skip()
pytestmark = [pytest.mark.tensorrt, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


@pytest.fixture(scope="module")
def rtx_bundle(bundle_fp16, tmp_path_factory):
    """Built as a machine without a GPU builds it: portable targets, engines not run at build time."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(from_onnx, "engines_can_run", lambda library: False)
        return build_rtx(bundle_fp16, tmp_path_factory.mktemp("rtx-gpu") / "b")


def test_a_portable_bundle_runs_and_matches_the_onnx_bundle(rtx_bundle, bundle_fp16, tmp_path, monkeypatch):
    monkeypatch.setenv(runtime_cache.ENV, str(tmp_path / "cache"))
    try:
        pipe = runtime.Pipeline.load(rtx_bundle, cuda_graph=True)
    except runtime.errors.BundleError as e:
        if "cannot run on this GPU" in str(e):
            pytest.skip(f"TensorRT for RTX refuses this GPU: {e}")
        raise
    with pipe:
        got = pipe.txt2img("a red circle", steps=4, seed=1, output_type="np")
    with runtime.Pipeline.load(bundle_fp16, device="cpu") as ref_pipe:
        want = ref_pipe.txt2img("a red circle", steps=4, seed=1, output_type="np")
    assert np.abs(got - want).max() < 0.05  # fp16 engines against fp16 ONNX on the CPU
    caches = list((tmp_path / "cache").rglob("*.cache"))
    assert len(caches) >= 1  # the first load compiled kernels and kept them
    with runtime.Pipeline.load(rtx_bundle) as again:
        again.txt2img("a red circle", steps=1, seed=1, output_type="np")
