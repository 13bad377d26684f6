"""Text to image."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import images as img
from ..handoff import end_step
from ..options import Prompt, TaskOptions, task_options
from ..session import Images, Session

if TYPE_CHECKING:
    from typing_extensions import Unpack


def txt2img(
    pipe: Session,
    prompt: Prompt,
    negative_prompt: Prompt = "",
    *,
    latents: np.ndarray | None = None,
    denoising_end: float | None = None,
    output_type: str = "pil",
    **sampling: Unpack[TaskOptions],
) -> Images:
    """Text to image. Returns a list of PIL images, or float32 (B, H, W, 3) in [0, 1] for output_type='np'.

    seed: one `np.random.default_rng(seed)` makes the initial latents (its first draw,
    `standard_normal(shape, float32)`) and then any noise the sampler adds, in order.
    latents: pass your own (B, C, H/f, W/f) instead; the sampler's noise still comes from the seed.
    denoising_end: stop that fraction of the way through the noise schedule (diffusers' denoising_end), to hand
    the latents (output_type='latent') to a refiner's img2img(..., denoising_start=the same fraction).
    sampling: steps=50 (4 for LCM/TCD), guidance_scale=7.5, guidance_rescale=0, seed, scheduler, eta, callback (runtime.options.Sampling).
    SDXL bundles also take original_size, crops_coords_top_left, target_size, their negative_* twins and the
    refiner's aesthetic_score / negative_aesthetic_score (see runtime.families.sdxl; diffusers' defaults).
    """
    options, conditioning = task_options("txt2img", sampling, pipe.family, pipe.manifest.scheduler)
    pipe.require("txt2img")
    img.check_output_type(output_type)
    rng = np.random.default_rng(options["seed"])
    noise = pipe.draw(latents, rng, pipe.manifest.latent_shape, "latents")
    end = end_step(pipe.timesteps(options), pipe.manifest.scheduler.config, denoising_end)
    model = pipe.guided_model(prompt, negative_prompt, options, conditioning=conditioning)
    return pipe.finish(pipe.denoise(model, noise, options, rng, end=end), output_type)
