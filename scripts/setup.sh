#!/usr/bin/env bash
# Create .venv with the runtime, the exporter, the test tools and the benchmarks' chart. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Pinned so pip takes the CPU build; an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[export,onnxruntime,test,bench]"
# Type stubs for the TensorRT code's mypy check. --no-deps: they require the real tensorrt wheel,
# which only NVIDIA's index serves.
.venv/bin/python -m pip install -q --no-deps "tensorrt-stubs==10.13.0.35.1"
