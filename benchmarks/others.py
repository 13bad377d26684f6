"""The other pipelines a comparison runs (torch and diffusers; see systems.py for the interface)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from diffusers import OnnxRuntimeModel

from runtime import load_manifest
from runtime.backends.onnxruntime import resolve_providers

from .runtime_bench import Call, run_figures

SD_VAE_SCALING = 0.18215  # what OnnxStableDiffusionPipeline divides latents by, whatever the model


def _timed(log: list[Call], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        log.append(Call(name, start, time.perf_counter()))
        return out

    return call


class DiffusersTorch:
    """StableDiffusionPipeline (fp32, or fp16 on a GPU; torch CPU or CUDA), its modules' calls timed from outside."""

    def __init__(self, model: Path, bundle: Path, device: str | None = None, half: bool = False):
        import torch
        from diffusers import StableDiffusionPipeline

        self.torch = torch
        self.device = "cuda" if device in ("cuda", "tensorrt") else "cpu"
        dtype = torch.float16 if half else torch.float32
        pipe = StableDiffusionPipeline.from_pretrained(
            model, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False, local_files_only=True
        )
        self.pipe = pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.log: list[Call] = []
        self._wrap_forward("text_encoder", self.pipe.text_encoder)
        self._wrap_forward("unet", self.pipe.unet)
        self.pipe.vae.decode = _timed(self.log, "vae_decoder", self._synced(self.pipe.vae.decode))
        self.providers = [f"torch {torch.__version__} ({self.device}, {torch.get_num_threads()} threads)"]

    def _synced(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Wait for the GPU before the clock stops, so a call's time is its own."""
        if self.device == "cpu":
            return fn

        def call(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            self.torch.cuda.synchronize()
            return out

        return call

    def _wrap_forward(self, name: str, module: Any) -> None:
        module.forward = _timed(self.log, name, self._synced(module.forward))

    def generate(self, request: dict[str, Any], latents: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
        self.log.clear()
        marks: list[float] = []

        def on_step(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if self.device != "cpu":
                self.torch.cuda.synchronize()
            marks.append(time.perf_counter())
            return kwargs

        start = time.perf_counter()
        images = self.pipe(
            request["prompt"], negative_prompt="", num_inference_steps=request["steps"], guidance_scale=request["guidance_scale"],
            latents=self.torch.from_numpy(latents).to(self.device, self.pipe.unet.dtype), output_type="np", callback_on_step_end=on_step,
        ).images  # fmt: skip
        return run_figures(list(self.log), marks, start, time.perf_counter(), len(images)), np.asarray(images, dtype=np.float32)


class DiffusersOnnx:
    """OnnxStableDiffusionPipeline on the bundle's ONNX files, sessions made as our runtime makes them.

    The bundle's files have static shapes: the text encoder takes the CFG batch 2B at once and the
    UNet a timestep per row, while this pipeline encodes each prompt alone and passes one timestep.
    Two adapters bridge that (rows repeated up to the static batch and sliced back; the timestep
    broadcast), so its text encoder stage does twice the work ours does; the UNet and VAE calls
    are the same work. It also assumes SD's VAE (8x, scaling 0.18215): for other VAEs the size
    it is given is the one whose latents these are, and the decoder's input is rescaled to the
    model's own factor.
    """

    def __init__(self, model: Path, bundle: Path, device: str | None = None):
        import diffusers
        from diffusers import OnnxStableDiffusionPipeline
        from transformers import CLIPTokenizer

        manifest = load_manifest(bundle, verify_files=False)
        self.providers = resolve_providers(device)
        self.log: list[Call] = []
        models = {
            name: StaticBatchModel(self._session(bundle / manifest.components[name].file), name, self.log)
            for name in ("text_encoder", "unet", "vae_decoder")
        }
        models["vae_decoder"].rescale = SD_VAE_SCALING / manifest.vae.scaling_factor
        scheduler_class = getattr(diffusers, manifest.scheduler.class_name)
        self.pipe = OnnxStableDiffusionPipeline(
            vae_encoder=None,
            vae_decoder=models["vae_decoder"],
            text_encoder=models["text_encoder"],
            tokenizer=CLIPTokenizer.from_pretrained(model / "tokenizer"),
            unet=models["unet"],
            scheduler=scheduler_class.from_pretrained(model / "scheduler"),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        self.pipe.set_progress_bar_config(disable=True)

    def _session(self, path: Path) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        return ort.InferenceSession(str(path), options, providers=self.providers)

    def generate(self, request: dict[str, Any], latents: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
        self.log.clear()
        marks: list[float] = []
        start = time.perf_counter()
        images = self.pipe(
            request["prompt"], negative_prompt="", num_inference_steps=request["steps"], guidance_scale=request["guidance_scale"],
            latents=latents.copy(), output_type="np", callback=lambda *_: marks.append(time.perf_counter()), callback_steps=1,
            # this pipeline assumes an 8x VAE (latents of height // 8): name the size whose latents these are
            height=8 * latents.shape[2], width=8 * latents.shape[3],
        ).images  # fmt: skip
        return run_figures(list(self.log), marks, start, time.perf_counter(), len(images)), np.asarray(images, dtype=np.float32)


class StaticBatchModel(OnnxRuntimeModel):  # type: ignore[misc]
    """diffusers' OnnxRuntimeModel over a static-shape session: pads a short batch, times each call."""

    def __init__(self, session: Any, name: str, log: list[Call]):
        super().__init__(model=session)
        self.name, self.log = name, log
        self.shapes = {i.name: tuple(i.shape) for i in session.get_inputs()}
        self.rescale = 1.0  # latent_sample factor: the pipeline divides by SD's 0.18215 whatever the model's

    def __call__(self, **kwargs: Any) -> list[np.ndarray]:
        start = time.perf_counter()
        rows = self._rows(kwargs)
        feed = {k: self._fit(k, np.asarray(v)) for k, v in kwargs.items()}
        if self.rescale != 1.0 and "latent_sample" in feed:
            feed["latent_sample"] = (feed["latent_sample"] * self.rescale).astype(np.float32)
        out = [o[:rows] for o in self.model.run(None, feed)]
        self.log.append(Call(self.name, start, time.perf_counter()))
        return out

    def _rows(self, kwargs: dict[str, Any]) -> int:
        first = next(k for k in kwargs if k != "timestep")
        return int(np.asarray(kwargs[first]).shape[0])

    def _fit(self, name: str, value: np.ndarray) -> np.ndarray:
        want = self.shapes[name][0]
        if value.shape[0] == want:
            return value
        if name == "timestep":
            return np.broadcast_to(value, (want,)).copy()
        return np.concatenate([value] * (want // value.shape[0]))
