#!/usr/bin/env bash
# From a fresh clone to an image: set up, build the reference model's bundle, generate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Always rebuilt (a few seconds): a bundle left from older weights of the model would still load.
.venv/bin/python -m export.build --precision fp16 --force
.venv/bin/python -m runtime "a large red circle on a black background" --seed 0 -o out.png
