"""Super-resolution with the x4 upscaler, as diffusers' StableDiffusionUpscalePipeline.

The UNet denoises latents at the low-resolution image's size, with that image (noised to
`noise_level` by the model's own low-resolution DDPM schedule) concatenated as 3 more input
channels and the noise level fed as its class label; the VAE decodes at 4x the size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .. import images as img
from ..bundle import UpscaleInfo, rebuild_hint
from ..errors import BundleError
from ..options import Prompt, TaskOptions, task_options
from ..sampling import noise_schedule
from ..sampling.common import noised_vp
from ..session import Images, Session

if TYPE_CHECKING:
    from typing_extensions import Unpack


def check_noise_level(noise_level: Any, limit: int) -> int:
    """A whole number in [0, limit] (the model's max_noise_level), else a ValueError naming the range."""
    whole = isinstance(noise_level, (int, np.integer)) and not isinstance(noise_level, bool)
    if not whole or not 0 <= noise_level <= limit:
        raise ValueError(
            f"noise_level must be a whole number from 0 to {limit} (this model's max_noise_level), got {noise_level!r}; "
            "higher adds more noise to the input image: more invented detail, less fidelity (diffusers' default: 20)"
        )
    return int(noise_level)


def low_res_alphas_cumprod(settings: UpscaleInfo) -> np.ndarray:
    """alpha-bar (float64) of the schedule that noises the input image; diffusers requires a DDPMScheduler there."""
    return noise_schedule(dict(settings.low_res_scheduler.config), "DDPMScheduler").alphas_cumprod


def upscale(
    pipe: Session,
    prompt: Prompt,
    image: img.ImageLike,
    negative_prompt: Prompt = "",
    *,
    noise_level: int = 20,
    latents: np.ndarray | None = None,
    image_noise: np.ndarray | None = None,
    resize: bool = False,
    output_type: str = "pil",
    **sampling: Unpack[TaskOptions],
) -> Images:
    """Upscale `image` 4x guided by `prompt`. Returns PIL images, or float32 (B, H, W, 3) in [0, 1] for 'np'.

    image: PIL or array at the bundle's input size, a quarter of its output size (resize=True resizes it, Lanczos).
    noise_level: how much noise is added to the input image first, 0 to the model's max_noise_level.
    seed: one `np.random.default_rng(seed)` draws, in order, `image_noise` (B, 3, h, w), the noise added to
    the input image, then `latents` (B, 4, h, w), the initial noise, then any sampler noise: the order in
    which diffusers' pipeline draws them from its generator. Pass either array to use your own.
    sampling: steps=75, guidance_scale=9.0 (diffusers' defaults, as noise_level 20), guidance_rescale=0,
    seed, scheduler, eta, callback (runtime.options.Sampling).
    """
    options, conditioning = task_options("upscale", sampling, pipe.family, pipe.manifest.scheduler, steps=75, guidance_scale=9.0)
    pipe.require("upscale")
    img.check_output_type(output_type)
    settings = pipe.manifest.upscale
    if settings is None:
        raise BundleError(
            f"bundle {pipe.bundle} runs upscale but its manifest has no 'upscale' section; "
            f"rebuild it with `{rebuild_hint(pipe.bundle, pipe.manifest)}`"
        )
    level = check_noise_level(noise_level, settings.max_noise_level)
    batch, shape = pipe.batch_size, pipe.manifest.latent_shape
    pixels = img.image_tensor(image, shape[2:], batch, resize=resize, scale=pipe.height // shape[2], rebuild=pipe.rebuild)
    rng = np.random.default_rng(options["seed"])
    noise_for_image = pipe.draw(image_noise, rng, pixels.shape, "image_noise")
    noise = pipe.draw(latents, rng, shape, "latents")
    extra: dict[str, np.ndarray] = {
        # DDPMScheduler.add_noise at the noise level, on the low-resolution schedule
        "channels": noised_vp(pixels, noise_for_image, float(low_res_alphas_cumprod(settings)[level])).astype(np.float32),
        "class_labels": np.full(batch, level, dtype=np.int64),
    }
    model = pipe.guided_model(prompt, negative_prompt, options, extra, conditioning=conditioning)
    return pipe.finish(pipe.denoise(model, noise, options, rng), output_type)
