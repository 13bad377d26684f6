"""What more than one test file uses: the repository's root here; tiny models, a fake TensorRT and the
sampler checks in this package's modules (tiny_models, fake_tensorrt, sampler_checks), tiny LoRA adapter files
(lora_adapters)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # tests/helpers/__init__.py -> the repository
