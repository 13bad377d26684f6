"""benchmarks.gpu without a GPU: every system is a row saying why it did not run, the files are written, exit 2;
and its table from measured figures (the per-image ratio against diffusers fp16)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks import gpu
from tests.helpers import REPO


@pytest.mark.skipif(not gpu.why_not("diffusers-fp16", REPO), reason="this machine has an NVIDIA GPU: the benchmark would run")
def test_without_a_gpu_every_row_says_why_and_nothing_is_timed(bundle_fp16, tiny_model, tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--rtx-bundle", str(bundle_fp16), "--model", str(tiny_model), "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: nothing ran: ") and done.stderr.count("\n") == 1
    table = (tmp_path / f"gpu-{bundle_fp16.name}.md").read_text()
    assert "| TensorRT for RTX, first load (empty runtime cache) | no NVIDIA GPU here" in table
    assert "| ONNX Runtime, CUDA provider | not asked for (--onnx-bundle not given) |" in table
    result = json.loads((tmp_path / f"gpu-{bundle_fp16.name}.json").read_text())
    assert result["settings"]["steps"] == 20 and result["settings"]["guidance_scale"] == 7.5
    assert all("skipped" in r for r in result["systems"].values())


def test_table_from_figures():
    rows = {
        "tensorrt-rtx": {"image_s": 0.9, "unet_call_s": 0.0123, "load_s": 40.0, "gpu_memory_bytes": 3 * 2**30},
        "tensorrt-rtx-cached": {"image_s": 0.8, "unet_call_s": 0.012, "load_s": 4.0, "gpu_memory_bytes": None},
        "onnxruntime-cuda": {"error": "onnxruntime has no CUDA provider here: pip install onnxruntime-gpu"},
        "diffusers-fp16": {"image_s": 2.0, "unet_call_s": 0.04, "load_s": 6.0, "gpu_memory_bytes": 2**31},
    }
    lines = gpu.table(rows)
    assert lines[2] == "| TensorRT for RTX, first load (empty runtime cache) | 900.0 ms | 12.3 ms | 3.00 GiB | 40.00 s | 0.45x |"
    assert lines[3] == "| TensorRT for RTX, second load (runtime cache) | 800.0 ms | 12.0 ms | - | 4.00 s | 0.40x |"
    assert lines[4] == "| ONNX Runtime, CUDA provider | onnxruntime has no CUDA provider here: pip install onnxruntime-gpu | | | | |"
    assert lines[5].endswith("| 2.00 s | 40.0 ms | 2.00 GiB | 6.00 s | 1.00x |")
