"""The pipelines a comparison runs, each behind one interface: load once, then `generate(request, latents)`.

- ours: runtime.Pipeline on the bundle (ONNX Runtime), instrumented by benchmarks.runtime_bench.
- diffusers-torch: diffusers' StableDiffusionPipeline on torch, from the model folder.
- diffusers-onnx: diffusers' OnnxStableDiffusionPipeline (ONNX Runtime) on the bundle's own ONNX files.

Every system reports the same figures (runtime_bench.run_figures) from the same kind of
evidence: the start and end of each text encoder, UNet and VAE decoder call, and a mark at the
end of each denoising step. Only `ours` is defined here: its process must not import torch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from .runtime_bench import instrument, run_figures

SYSTEMS = ("ours", "diffusers-torch", "diffusers-onnx")


class Ours:
    """runtime.Pipeline, engines wrapped in timing proxies."""

    def __init__(self, model: Path, bundle: Path, device: str | None = None):
        from runtime import Pipeline

        self.pipe = Pipeline.load(bundle, device=device)
        self.log = instrument(self.pipe)
        self.providers = sorted({p for e in self.pipe.engines.values() for p in getattr(e, "providers", [])})

    def generate(self, request: dict[str, Any], latents: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
        self.log.clear()
        marks: list[float] = []
        start = time.perf_counter()
        images = self.pipe.txt2img(
            request["prompt"], "", steps=request["steps"], guidance_scale=request["guidance_scale"], latents=latents,
            scheduler=request.get("scheduler"), output_type="np", callback=lambda *_: marks.append(time.perf_counter()),
        )  # fmt: skip
        return run_figures(list(self.log), marks, start, time.perf_counter(), len(images)), images


def open_system(name: str, model: Path, bundle: Path, device: str | None = None) -> Any:
    """Load one of SYSTEMS; ValueError for an unknown name."""
    if name not in SYSTEMS:
        raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")
    if name == "ours":
        return Ours(model, bundle, device)
    from . import others  # torch and diffusers load only in the processes that run them

    return {"diffusers-torch": others.DiffusersTorch, "diffusers-onnx": others.DiffusersOnnx}[name](model, bundle, device)
