#!/usr/bin/env bash
# From a fresh clone to an image: set up, build the reference model's bundle, generate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ -f engines/shapes-ldm-64x64-b1-fp16-onnxruntime/manifest.json ] || .venv/bin/python -m export.build --precision fp16
.venv/bin/python -m runtime "a large red circle on a black background" --seed 0 -o out.png
