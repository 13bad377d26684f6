"""Pipelines: tokenizer -> text encoder -> one denoise loop -> VAE, over a bundle's engines."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .engine import Engine, cast_feed, load_engine
from .errors import BundleError, Cancelled
from .guidance import MODES, classifier_free, guidance_embedding, unguided
from .manifest import Manifest, load_manifest
from .samplers import DEFAULT_FOR_CLASS, Model, default_sampler, get_sampler
from .schedule import CLASS_DEFAULTS, noise_schedule

Progress = Optional[Callable[[int, int, float], Optional[bool]]]
OUTPUT_TYPES = ("pil", "np", "latent")


def initial_latents(shape: Sequence[int], seed: int | None) -> np.ndarray:
    """The documented seed contract: float32 standard normal, the first draw of numpy's default_rng(seed) (PCG64).

    The same seed gives the same latents, hence the same image, on every backend and machine.
    """
    return np.random.default_rng(seed).standard_normal(tuple(shape), dtype=np.float32)


def to_images(decoded: np.ndarray) -> np.ndarray:
    """VAE output (B, 3, H, W) in [-1, 1] -> float32 (B, H, W, 3) in [0, 1], as diffusers' postprocess."""
    return np.clip(decoded.astype(np.float32) / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)


def to_pil(images: np.ndarray) -> list[Any]:
    from PIL import Image

    return [Image.fromarray(im) for im in (images * 255).round().astype(np.uint8)]


class Pipeline:
    """A loaded bundle: its manifest, tokenizer and engines, ready to generate."""

    def __init__(self, bundle: Path, manifest: Manifest, engines: dict[str, Engine], tokenizer: Any):
        self.bundle, self.manifest, self.engines, self.tokenizer = bundle, manifest, engines, tokenizer
        class_name = manifest.raw["scheduler"].get("class_name")
        self.schedule = noise_schedule(manifest.scheduler_config, class_name if class_name in CLASS_DEFAULTS else "DDIMScheduler")

    @classmethod
    def load(cls, bundle: str | Path, *, device: str | None = None, verify: bool = True, cuda_graph: bool = False) -> "Pipeline":
        """Open BUNDLE; the backend follows the component files (onnx -> ONNX Runtime, plan -> TensorRT).

        device: for ONNX bundles, 'cpu' | 'cuda' | 'tensorrt' execution provider (default: CUDA where
        onnxruntime-gpu is installed, else CPU). verify: check every file's sha256 first.
        cuda_graph: capture the TensorRT UNet call once and replay it every step (static shapes allow it).
        """
        from .tokenizer import ClipTokenizer

        bundle = Path(bundle)
        manifest = load_manifest(bundle, verify_files=verify)
        options = {"device": device} if device else {}
        needed = ("text_encoder", "unet", "vae_decoder")
        missing = [c for c in needed if c not in manifest.components]
        if missing:
            raise BundleError(f"bundle {bundle} has no {', '.join(missing)}; rebuild it with `python -m export.build`")
        if cuda_graph and manifest.components["unet"].format != "plan":
            raise ValueError(f"cuda_graph=True needs TensorRT engines, and {bundle} holds ONNX; build them with `python -m export.build --from-onnx {bundle}`")
        engines = {
            name: load_engine(c, bundle, **options, **({"cuda_graph": True} if cuda_graph and name == "unet" else {}))
            for name, c in manifest.components.items()
            if name in needed
        }
        tokenizer = ClipTokenizer.from_dir(bundle / manifest.raw["tokenizer"]["dir"])
        return cls(bundle, manifest, engines, tokenizer)

    def close(self) -> None:
        """Release the engines' device memory and streams (TensorRT); safe to call twice."""
        for engine in self.engines.values():
            getattr(engine, "close", lambda: None)()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def batch_size(self) -> int:
        return self.manifest.batch_size

    @property
    def height(self) -> int:
        return self.manifest.height

    @property
    def width(self) -> int:
        return self.manifest.width

    def _prompts(self, prompt: str | Sequence[str], what: str) -> list[str]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if len(prompts) == 1:
            prompts = prompts * self.batch_size
        if what == "prompt" and any(not p.strip() for p in prompts):
            raise ValueError("prompt is empty: describe the image to generate (an empty prompt gives unconditioned noise)")
        if len(prompts) != self.batch_size:
            raise ValueError(
                f"{what}: {len(prompts)} prompts for a bundle built with batch size {self.batch_size}; "
                f"pass one prompt or exactly {self.batch_size} (or rebuild with --batch-size {len(prompts)})"
            )
        return prompts

    def encode_prompt(self, prompts: Sequence[str]) -> np.ndarray:
        """Text embeddings (N, 77, D) from one text encoder call; N is the engine's static batch."""
        enc = self.engines["text_encoder"]
        hidden = enc(cast_feed(enc.component, {"input_ids": self.tokenizer(list(prompts))}))["last_hidden_state"]
        return np.asarray(hidden, dtype=np.float32)

    def guided_model(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str], guidance_scale: float, guidance_rescale: float) -> Model:
        """The UNet wrapped for the bundle's guidance mode; refuses settings the bundle cannot honour."""
        mode, unet = self.manifest.guidance, self.engines["unet"]
        prompts = self._prompts(prompt, "prompt")
        if guidance_rescale and mode != "cfg":
            raise ValueError(f"guidance_rescale needs classifier-free guidance, and this bundle was built with guidance {mode!r}")
        if mode == "cfg":
            uncond, cond = np.split(self.encode_prompt(self._prompts(negative_prompt, "negative_prompt") + prompts), 2)
            return classifier_free(unet, cond, uncond, guidance_scale, guidance_rescale)
        has_negative = any(n.strip() for n in self._prompts(negative_prompt, "negative_prompt"))
        if mode == "none":
            if guidance_scale > 1:
                raise ValueError(
                    f"guidance_scale {guidance_scale} needs classifier-free guidance, but this bundle was built without it "
                    "(batch-B UNet); use guidance_scale <= 1, or rebuild with `python -m export.build --guidance cfg`"
                )
            if has_negative:
                warnings.warn("negative_prompt has no effect without classifier-free guidance", stacklevel=3)
            return unguided(unet, self.encode_prompt(prompts))
        if mode == "embedded":
            if has_negative:
                warnings.warn("negative_prompt has no effect on a guidance-embedding (LCM) model", stacklevel=3)
            w = guidance_embedding(np.full(self.batch_size, guidance_scale - 1.0), int(self.manifest.raw["guidance"]["embedding_dim"]))
            return unguided(unet, self.encode_prompt(prompts), w)
        raise BundleError(f"bundle guidance mode {mode!r} is unknown to this runtime (known: {', '.join(MODES)}); rebuild the bundle")

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents -> float32 images (B, H, W, 3) in [0, 1]; NaN (fp16 overflow) is an error, not a black image."""
        vae = self.engines["vae_decoder"]
        out = vae(cast_feed(vae.component, {"latent_sample": latents / self.manifest.vae_scaling_factor}))["sample"]
        images = to_images(np.asarray(out))
        if not np.isfinite(images).all():
            raise FloatingPointError(
                f"the VAE decoder produced NaN/inf ({vae.component.precision} engine): fp16 overflow; "
                "rebuild with `python -m export.build --precision fp32` (or keep the VAE in fp32)"
            )
        return images

    def txt2img(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        *,
        steps: int = 50,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        seed: int | None = None,
        latents: np.ndarray | None = None,
        scheduler: str | None = None,
        eta: float | None = None,
        output_type: str = "pil",
        callback: Progress = None,
    ) -> Any:
        """Text to image. Returns a list of PIL images, or float32 (B, H, W, 3) in [0, 1] for output_type='np'.

        seed: one `np.random.default_rng(seed)` makes the initial latents (its first draw,
        `standard_normal(shape, float32)`) and then any noise the sampler adds, in order.
        latents: pass your own (B, C, H/f, W/f) instead; the sampler's noise still comes from the seed.
        scheduler: a sampler name (default: the one the model's scheduler config names).
        eta: DDIM's and TCD's stochasticity; an error for samplers without it.
        guidance_rescale: Lin et al. 2023's CFG rescale (SD 2.x v-prediction models like 0.7).
        callback(step, total, t) -> False cancels.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r}: choose one of {OUTPUT_TYPES}")
        sampler = get_sampler(scheduler or self._default_sampler())
        shape = self.manifest.latent_shape
        rng = np.random.default_rng(seed)
        if latents is None:
            latents = rng.standard_normal(shape, dtype=np.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents: shape {tuple(latents.shape)} but this bundle needs {shape} (batch, channels, H/f, W/f)")
        model = self.guided_model(prompt, negative_prompt, guidance_scale, guidance_rescale)
        x = sampler(
            model,
            np.asarray(latents, dtype=np.float32),
            self.schedule,
            steps,
            **({} if eta is None else {"eta": eta}),
            rng=rng,
            callback=_step_callback(callback, steps),
        )
        if output_type == "latent":
            return x
        images = self.decode(x)
        return images if output_type == "np" else to_pil(images)

    def _default_sampler(self) -> str:
        class_name = self.manifest.raw["scheduler"].get("class_name")
        if class_name not in DEFAULT_FOR_CLASS:
            warnings.warn(
                f"the model's scheduler is {class_name}, which this runtime does not reproduce; sampling with DDIM "
                "from the same noise schedule (pass scheduler='ddim' to silence this)",
                stacklevel=3,
            )
        return default_sampler(class_name, self.manifest.scheduler_config)


def _step_callback(progress: Progress, total: int) -> Callable[[int, float, np.ndarray], None] | None:
    if progress is None:
        return None

    def on_step(i: int, t: float, x: np.ndarray) -> None:
        if progress(i + 1, total, t) is False:
            raise Cancelled(f"generation cancelled by the progress callback after step {i + 1} of {total}")

    return on_step
