"""Pipelines: tokenizer -> text encoder -> one denoise loop -> VAE, over a bundle's engines."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from . import images as img
from .engine import Engine, cast_feed, load_engine
from .errors import BundleError, Cancelled
from .guidance import MODES, Extra, classifier_free, guidance_embedding, unguided
from .manifest import Component, Manifest, load_manifest
from .samplers import DEFAULT_FOR_CLASS, Known, Model, default_sampler, get_sampler
from .schedule import CLASS_DEFAULTS, noise_schedule

Progress = Optional[Callable[[int, int, float], Optional[bool]]]


def initial_latents(shape: Sequence[int], seed: int | None) -> np.ndarray:
    """The documented seed contract: float32 standard normal, the first draw of numpy's default_rng(seed) (PCG64).

    The same seed gives the same latents, hence the same image, on every backend and machine.
    """
    return np.random.default_rng(seed).standard_normal(tuple(shape), dtype=np.float32)


def start_step(steps: int, strength: float) -> int:
    """How many of the schedule's first steps img2img skips, as diffusers' get_timesteps: the noise level of strength."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1] (1: start from pure noise, small: stay close to the image), got {strength}")
    kept = min(int(steps * strength), steps)
    if kept == 0:
        raise ValueError(
            f"strength {strength} with {steps} steps leaves no denoising step (int(steps * strength) = 0); "
            f"raise strength to at least {1 / steps:g} or use more steps"
        )
    return steps - kept


class Pipeline:
    """A loaded bundle: its manifest, tokenizer and engines, ready to generate."""

    def __init__(self, bundle: Path, manifest: Manifest, engines: dict[str, Engine], tokenizer: Any, options: dict[str, Any] | None = None):
        self.bundle, self.manifest, self.engines, self.tokenizer = bundle, manifest, engines, tokenizer
        self._options = dict(options or {})
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
        options: dict[str, Any] = {"device": device} if device else {}
        needed = ("text_encoder", "unet", "vae_decoder")  # the vae_encoder opens on first use
        missing = [c for c in needed if c not in manifest.components]
        if missing:
            raise BundleError(f"bundle {bundle} has no {', '.join(missing)}; rebuild it with `python -m export.build`")
        if cuda_graph and manifest.components["unet"].format != "plan":
            raise ValueError(f"cuda_graph=True needs TensorRT engines, and {bundle} holds ONNX; build them with `python -m export.build --from-onnx {bundle}`")
        engines = {
            name: load_engine(c, bundle, **_engine_options(c, options), **({"cuda_graph": True} if cuda_graph and name == "unet" else {}))
            for name, c in manifest.components.items()
            if name in needed
        }
        tokenizer = ClipTokenizer.from_dir(bundle / manifest.raw["tokenizer"]["dir"])
        return cls(bundle, manifest, engines, tokenizer, options)

    def engine(self, name: str) -> Engine:
        """A component's engine, opened on first use."""
        if name not in self.engines:
            if name not in self.manifest.components:
                raise BundleError(f"bundle {self.bundle} has no {name}; rebuild it with `python -m export.build`")
            component = self.manifest.components[name]
            self.engines[name] = load_engine(component, self.bundle, **_engine_options(component, self._options))
        return self.engines[name]

    @property
    def pipelines(self) -> tuple[str, ...]:
        """What this bundle can do: txt2img, img2img, inpaint (text-to-image models), or inpaint / upscale alone."""
        return tuple(self.manifest.raw.get("pipelines", ["txt2img"]))

    def require(self, pipeline: str) -> None:
        """Refuse a pipeline the bundle was not built for, saying why and what builds it."""
        if pipeline in self.pipelines:
            return
        kind = self.manifest.raw["model"].get("kind", "text2image")
        if kind != "text2image" or pipeline == "upscale":
            why = {
                "inpainting": "an inpainting model (its UNet takes the mask and masked image as extra channels)",
                "upscaler": "an upscaler (its UNet takes the low-resolution image)",
                "text2image": "a text-to-image model",
            }.get(kind, f"a {kind} model")
            raise BundleError(
                f"{pipeline} is not available: bundle {self.bundle} holds {why}, which runs {', '.join(self.pipelines)} only; "
                f"build a bundle from a model made for {pipeline}"
            )
        encoder = " (adds the VAE encoder)" if pipeline in ("img2img", "inpaint") else ""
        raise BundleError(
            f"{pipeline} is not available: bundle {self.bundle} was built for {', '.join(self.pipelines)} only; "
            f"rebuild it with `python -m export.build --pipelines txt2img,img2img,inpaint`{encoder}"
        )

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

    def guided_model(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str],
        guidance_scale: float,
        guidance_rescale: float = 0.0,
        extra: Extra | None = None,
    ) -> Model:
        """The UNet wrapped for the bundle's guidance mode; refuses settings the bundle cannot honour.

        extra: per-image UNet conditioning beyond latents and text (see guidance.unet_call), batch B.
        """
        mode, unet = self.manifest.guidance, self.engines["unet"]
        prompts = self._prompts(prompt, "prompt")
        if guidance_rescale and mode != "cfg":
            raise ValueError(f"guidance_rescale needs classifier-free guidance, and this bundle was built with guidance {mode!r}")
        if mode == "cfg":
            uncond, cond = np.split(self.encode_prompt(self._prompts(negative_prompt, "negative_prompt") + prompts), 2)
            return classifier_free(unet, cond, uncond, guidance_scale, guidance_rescale, extra)
        has_negative = any(n.strip() for n in self._prompts(negative_prompt, "negative_prompt"))
        if mode == "none":
            if guidance_scale > 1:
                raise ValueError(
                    f"guidance_scale {guidance_scale} needs classifier-free guidance, but this bundle was built without it "
                    "(batch-B UNet); use guidance_scale <= 1, or rebuild with `python -m export.build --guidance cfg`"
                )
            if has_negative:
                warnings.warn("negative_prompt has no effect without classifier-free guidance", stacklevel=3)
            return unguided(unet, self.encode_prompt(prompts), extra)
        if mode == "embedded":
            if has_negative:
                warnings.warn("negative_prompt has no effect on a guidance-embedding (LCM) model", stacklevel=3)
            w = guidance_embedding(np.full(self.batch_size, guidance_scale - 1.0), int(self.manifest.raw["guidance"]["embedding_dim"]))
            return unguided(unet, self.encode_prompt(prompts), {**(extra or {}), "timestep_cond": w})
        raise BundleError(f"bundle guidance mode {mode!r} is unknown to this runtime (known: {', '.join(MODES)}); rebuild the bundle")

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents -> float32 images (B, H, W, 3) in [0, 1]; NaN (fp16 overflow) is an error, not a black image."""
        vae = self.engines["vae_decoder"]
        out = vae(cast_feed(vae.component, {"latent_sample": latents / self.manifest.vae_scaling_factor}))["sample"]
        images = img.to_images(np.asarray(out))
        if not np.isfinite(images).all():
            raise FloatingPointError(
                f"the VAE decoder produced NaN/inf ({vae.component.precision} engine): fp16 overflow; "
                "rebuild with `python -m export.build --precision fp32` (or keep the VAE in fp32)"
            )
        return images

    def encode_image(self, image: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """Pixels (B, 3, H, W) in [-1, 1] -> scaled latents: a sample of the VAE posterior, mean + std * noise."""
        enc = self.engine("vae_encoder")
        params = np.asarray(enc(cast_feed(enc.component, {"sample": image}))["latent_parameters"], dtype=np.float64)
        mean, logvar = np.split(params, 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))  # diffusers' DiagonalGaussianDistribution clamps the same
        return ((mean + std * noise) * self.manifest.vae_scaling_factor).astype(np.float32)

    def denoise(
        self,
        model: Model,
        noise: np.ndarray,
        *,
        steps: int,
        scheduler: str | None,
        eta: float | None,
        rng: np.random.Generator,
        callback: Progress,
        init: np.ndarray | None = None,
        start: int = 0,
        known: Known | None = None,
    ) -> np.ndarray:
        """The one sampling loop every pipeline shares; see runtime.samplers for init, start and known."""
        sampler = get_sampler(scheduler or self._default_sampler())
        options = {} if eta is None else {"eta": eta}
        return sampler(
            model, noise, self.schedule, steps, init=init, start=start, known=known, **options, rng=rng,
            callback=_step_callback(callback, steps - start),
        )  # fmt: skip

    def finish(self, latents: np.ndarray, output_type: str, keep: tuple[np.ndarray, np.ndarray] | None = None) -> Any:
        """Latents -> the asked output type; keep=(original pixels, pixel mask) composites the result over the original."""
        if output_type == "latent":
            return latents
        images = self.decode(latents)
        if keep is not None:
            images = img.composite(images, *keep)
        return images if output_type == "np" else img.to_pil(images)

    def draw(self, given: np.ndarray | None, rng: np.random.Generator, shape: Sequence[int], what: str) -> np.ndarray:
        """A caller's noise, checked, or the generator's next draw."""
        if given is None:
            return rng.standard_normal(tuple(shape), dtype=np.float32)
        if tuple(given.shape) != tuple(shape):
            raise ValueError(f"{what}: shape {tuple(given.shape)} but this bundle needs {tuple(shape)}")
        return np.asarray(given, dtype=np.float32)

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
        self.require("txt2img")
        img.check_output_type(output_type)
        rng = np.random.default_rng(seed)
        noise = self.draw(latents, rng, self.manifest.latent_shape, "latents")
        model = self.guided_model(prompt, negative_prompt, guidance_scale, guidance_rescale)
        x = self.denoise(model, noise, steps=steps, scheduler=scheduler, eta=eta, rng=rng, callback=callback)
        return self.finish(x, output_type)

    def img2img(
        self,
        prompt: str | Sequence[str],
        image: img.ImageLike,
        negative_prompt: str | Sequence[str] = "",
        *,
        strength: float = 0.75,
        steps: int = 50,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        seed: int | None = None,
        noise: np.ndarray | None = None,
        encoder_noise: np.ndarray | None = None,
        resize: bool = False,
        scheduler: str | None = None,
        eta: float | None = None,
        output_type: str = "pil",
        callback: Progress = None,
    ) -> Any:
        """Image to image (SDEdit, Meng et al. 2021, arXiv:2108.01073), as diffusers' StableDiffusionImg2ImgPipeline.

        The image's latents are noised to the level of `strength` and denoised over the last
        int(steps * strength) steps of the schedule. The seed's generator draws, in order:
        `noise` (added at that level), `encoder_noise` (the VAE posterior sample; zeros give its
        mean), then any sampler noise. Pass either to reproduce another tool's run.
        image: PIL or array, the bundle's size (resize=True resizes it, Lanczos).
        """
        self.require("img2img")
        img.check_output_type(output_type)
        start = start_step(steps, strength)
        rng = np.random.default_rng(seed)
        shape = self.manifest.latent_shape
        noise = self.draw(noise, rng, shape, "noise")
        pixels = img.image_tensor(image, (self.height, self.width), self.batch_size, resize=resize)
        init = self.encode_image(pixels, self.draw(encoder_noise, rng, shape, "encoder_noise"))
        model = self.guided_model(prompt, negative_prompt, guidance_scale, guidance_rescale)
        x = self.denoise(model, noise, steps=steps, scheduler=scheduler, eta=eta, rng=rng, callback=callback, init=init, start=start)
        return self.finish(x, output_type)

    def inpaint(
        self,
        prompt: str | Sequence[str],
        image: img.ImageLike,
        mask_image: img.ImageLike,
        negative_prompt: str | Sequence[str] = "",
        *,
        strength: float = 1.0,
        steps: int = 50,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        seed: int | None = None,
        latents: np.ndarray | None = None,
        encoder_noise: np.ndarray | None = None,
        composite: bool | None = None,
        resize: bool = False,
        scheduler: str | None = None,
        eta: float | None = None,
        output_type: str = "pil",
        callback: Progress = None,
    ) -> Any:
        """Repaint where mask_image is white, as diffusers' StableDiffusionInpaintPipeline.

        The mask is read as grayscale and thresholded: >= 50% white is repainted, the rest kept.
        Two modes, chosen by the model: an inpainting UNet (9 channels) sees the mask and the
        masked image's latents; an ordinary UNet gets the kept region's latents re-imposed,
        noised to the current level, after every step (Lugmayr et al. 2022's RePaint without resampling).
        composite: paste the result into the original through the mask, so kept pixels stay exact
        (default: on for an ordinary UNet, whose VAE round trip would blur them; off for an
        inpainting UNet, as diffusers).
        strength < 1 starts from the image noised to that level instead of pure noise.
        The seed's generator draws `latents` (the initial noise) first, then `encoder_noise`.
        """
        self.require("inpaint")
        img.check_output_type(output_type)
        start = start_step(steps, strength)
        dedicated = self.manifest.raw["model"].get("kind") == "inpainting"
        size, batch, shape = (self.height, self.width), self.batch_size, self.manifest.latent_shape
        pixels = img.image_tensor(image, size, batch, resize=resize)
        mask = img.mask_tensor(mask_image, size, batch, resize=resize)
        if not self._mask_has_work(mask):
            return self._unchanged(pixels, output_type)
        rng = np.random.default_rng(seed)
        noise = self.draw(latents, rng, shape, "latents")
        posterior = self.draw(encoder_noise, rng, shape, "encoder_noise")
        image_latents = self.encode_image(pixels, posterior) if (strength < 1 or not dedicated) else None
        latent_mask = img.downsample_nearest(mask, shape[2:])
        extra, known = None, None
        if dedicated:
            masked = self.encode_image(pixels * (mask < 0.5), posterior)
            extra = {"channels": np.concatenate([latent_mask, masked], axis=1)}
        else:
            known = Known(image_latents, latent_mask)  # type: ignore[arg-type]
        model = self.guided_model(prompt, negative_prompt, guidance_scale, guidance_rescale, extra)
        init = image_latents if strength < 1 else None
        x = self.denoise(model, noise, steps=steps, scheduler=scheduler, eta=eta, rng=rng, callback=callback, init=init, start=start, known=known)
        paste = (not dedicated) if composite is None else composite
        return self.finish(x, output_type, ((pixels.transpose(0, 2, 3, 1) + 1) / 2, mask) if paste else None)

    def upscale(self, prompt: str | Sequence[str], image: img.ImageLike, negative_prompt: str | Sequence[str] = "", **options: Any) -> Any:
        """4x super-resolution with an x4 upscaler bundle, as diffusers' StableDiffusionUpscalePipeline (see runtime.upscale)."""
        from .upscale import upscale

        return upscale(self, prompt, image, negative_prompt, **options)

    def _unchanged(self, pixels: np.ndarray, output_type: str) -> Any:
        """The input image itself, in the asked output type (latents: the posterior mean)."""
        if output_type == "latent":
            return self.encode_image(pixels, np.zeros(self.manifest.latent_shape, np.float32))
        images = ((pixels.transpose(0, 2, 3, 1) + 1) / 2).astype(np.float32)
        return images if output_type == "np" else img.to_pil(images)

    def _mask_has_work(self, mask: np.ndarray) -> bool:
        """Warn about degenerate masks; False when there is nothing to repaint."""
        coverage = img.mask_coverage(mask)
        if max(coverage) == 0.0:
            warnings.warn("mask_image is all black (keep everything): nothing to repaint, returning the image unchanged", stacklevel=3)
            return False
        if min(coverage) == 1.0:
            warnings.warn("mask_image is all white: the whole image is repainted, as text-to-image would (or img2img at the same strength)", stacklevel=3)
        return True

    def _default_sampler(self) -> str:
        class_name = self.manifest.raw["scheduler"].get("class_name")
        if class_name not in DEFAULT_FOR_CLASS:
            warnings.warn(
                f"the model's scheduler is {class_name}, which this runtime does not reproduce; sampling with DDIM "
                "from the same noise schedule (pass scheduler='ddim' to silence this)",
                stacklevel=3,
            )
        return default_sampler(class_name, self.manifest.scheduler_config)


def _engine_options(component: Component, options: dict[str, Any]) -> dict[str, Any]:
    """ONNX Runtime's worker threads spin after a run, waiting for the next; only the UNet, called every
    step, has a next run coming. Spinning after a once-per-image call steals a core from the UNet calls
    that follow (15% of a reference-model image on 2 cores)."""
    return {**options, "spin": component.name == "unet"} if component.format == "onnx" else options


def _step_callback(progress: Progress, total: int) -> Callable[[int, float, np.ndarray], None] | None:
    if progress is None:
        return None

    def on_step(i: int, t: float, x: np.ndarray) -> None:
        if progress(i + 1, total, t) is False:
            raise Cancelled(f"generation cancelled by the progress callback after step {i + 1} of {total}")

    return on_step
