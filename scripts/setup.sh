#!/usr/bin/env bash
# Create .venv with the runtime, the exporter, the test tools and the benchmarks' chart. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Pinned so pip takes the CPU build; an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
# tensorrt-rtx: TensorRT for RTX, whose builder runs without a GPU, so the tests build real engines (about 100 MB)
.venv/bin/python -m pip install -q -e ".[export,onnxruntime,test,bench,tensorrt-rtx]"
# Type stubs for the TensorRT code's mypy check. --no-deps: they require the real tensorrt wheel,
# which only NVIDIA's index serves.
.venv/bin/python -m pip install -q --no-deps "tensorrt-stubs==10.13.0.35.1"
# The web sample's test drives a real headless browser: Debian's Chromium (Playwright, from the test extra above,
# launches it; `playwright install` is never run: it downloads browsers). shellcheck lints samples/jetson/setup.sh.
# Installed only as root and only where missing; elsewhere those tests skip, naming what is missing.
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null && ! { command -v chromium && command -v shellcheck; } >/dev/null; then
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium shellcheck; } >/dev/null; then
    echo "error: apt-get could not install chromium and shellcheck (the samples' tests need them); install them and rerun" >&2
    exit 1
  fi
fi
# The serving environment: `python -m serving` runs Triton from it and tests/serving talks to that server.
# nvidia-pytriton ships the tritonserver binary and its Python backend, whose stub process needs numpy 1.x (with numpy 2
# it returned corrupt tensors), hence a venv of its own beside .venv (which keeps numpy 2); tritonclient talks to the
# server; kubernetes-validate checks deploy/k8s offline against the Kubernetes schemas it ships.
[ -x .venv-triton/bin/python ] || "$PY" -m venv .venv-triton
.venv-triton/bin/python -m pip install -q "numpy<2" onnxruntime tokenizers Pillow "nvidia-pytriton==0.7.0" \
  "tritonclient[http,grpc]==2.73.0" "kubernetes-validate==1.37.0"
