"""Inpainting, as diffusers' StableDiffusionInpaintPipeline: with an inpainting UNet, or any UNet by re-imposition."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

from .. import images as img
from ..handoff import start_step
from ..options import Prompt, TaskOptions, task_options
from ..sampling import Known
from ..session import Images, Session

if TYPE_CHECKING:
    from typing_extensions import Unpack


def inpaint(
    pipe: Session,
    prompt: Prompt,
    image: img.ImageLike,
    mask_image: img.ImageLike,
    negative_prompt: Prompt = "",
    *,
    strength: float = 1.0,
    latents: np.ndarray | None = None,
    encoder_noise: np.ndarray | None = None,
    composite: bool | None = None,
    resize: bool = False,
    output_type: str = "pil",
    **sampling: Unpack[TaskOptions],
) -> Images:
    """Repaint where mask_image is white.

    The mask is read as grayscale and thresholded: >= 50% white is repainted, the rest kept.
    Two modes, chosen by the model: an inpainting UNet (9 channels) sees the mask and the
    masked image's latents; an ordinary UNet gets the kept region's latents re-imposed,
    noised to the current level, after every step (Lugmayr et al. 2022's RePaint without resampling).
    composite: paste the result into the original through the mask, so kept pixels stay exact
    (default: on for an ordinary UNet, whose VAE round trip would blur them; off for an
    inpainting UNet, as diffusers).
    strength < 1 starts from the image noised to that level instead of pure noise.
    The seed's generator draws `latents` (the initial noise) first, then `encoder_noise`.
    sampling: steps=50 (4 for LCM/TCD), guidance_scale=7.5, guidance_rescale=0, seed, scheduler, eta, callback (runtime.options.Sampling).
    SDXL bundles also take original_size, crops_coords_top_left, target_size, their negative_* twins and the
    refiner's aesthetic_score / negative_aesthetic_score (see runtime.families.sdxl; diffusers' defaults).
    """
    options, conditioning = task_options("inpaint", sampling, pipe.family, pipe.manifest.scheduler)
    pipe.require("inpaint")
    img.check_output_type(output_type)
    start = start_step(options["steps"], strength)
    dedicated = pipe.manifest.model.kind == "inpainting"
    size, batch, shape = (pipe.height, pipe.width), pipe.batch_size, pipe.manifest.latent_shape
    pixels = img.image_tensor(image, size, batch, resize=resize, rebuild=pipe.rebuild)
    mask = img.mask_tensor(mask_image, size, batch, resize=resize, rebuild=pipe.rebuild)
    if not _has_work(mask):
        return _unchanged(pipe, pixels, output_type)
    rng = np.random.default_rng(options["seed"])
    noise = pipe.draw(latents, rng, shape, "latents")
    posterior = pipe.draw(encoder_noise, rng, shape, "encoder_noise")
    image_latents = pipe.encode_image(pixels, posterior) if (strength < 1 or not dedicated) else None
    latent_mask = img.downsample_nearest(mask, shape[2:])
    extra, known = None, None
    if dedicated:
        masked = pipe.encode_image(pixels * (mask < 0.5), posterior)
        extra = {"channels": np.concatenate([latent_mask, masked], axis=1)}
    else:
        known = Known(image_latents, latent_mask)  # type: ignore[arg-type]
    model = pipe.guided_model(prompt, negative_prompt, options, extra, conditioning=conditioning)
    init = image_latents if strength < 1 else None
    x = pipe.denoise(model, noise, options, rng, init=init, start=start, known=known)
    paste = (not dedicated) if composite is None else composite
    return pipe.finish(x, output_type, ((pixels.transpose(0, 2, 3, 1) + 1) / 2, mask) if paste else None)


def _unchanged(pipe: Session, pixels: np.ndarray, output_type: str) -> Images:
    """The input image itself, in the asked output type (latents: the posterior mean)."""
    if output_type == "latent":
        return pipe.encode_image(pixels, np.zeros(pipe.manifest.latent_shape, np.float32))
    images = ((pixels.transpose(0, 2, 3, 1) + 1) / 2).astype(np.float32)
    return images if output_type == "np" else img.to_pil(images)


def _has_work(mask: np.ndarray) -> bool:
    """Warn about degenerate masks; False when there is nothing to repaint."""
    coverage = img.mask_coverage(mask)
    if max(coverage) == 0.0:
        warnings.warn("mask_image is all black (keep everything): nothing to repaint, returning the image unchanged", stacklevel=3)
        return False
    if min(coverage) == 1.0:
        warnings.warn(
            "mask_image is all white: the whole image is repainted, as text-to-image would (or img2img at the same strength)", stacklevel=3
        )
    return True
