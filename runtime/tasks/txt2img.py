"""Text to image."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import images as img
from ..core import Core, Images, Prompt, Sampling, sampling_options

if TYPE_CHECKING:
    from typing_extensions import Unpack


def txt2img(
    pipe: Core,
    prompt: Prompt,
    negative_prompt: Prompt = "",
    *,
    latents: np.ndarray | None = None,
    output_type: str = "pil",
    **sampling: Unpack[Sampling],
) -> Images:
    """Text to image. Returns a list of PIL images, or float32 (B, H, W, 3) in [0, 1] for output_type='np'.

    seed: one `np.random.default_rng(seed)` makes the initial latents (its first draw,
    `standard_normal(shape, float32)`) and then any noise the sampler adds, in order.
    latents: pass your own (B, C, H/f, W/f) instead; the sampler's noise still comes from the seed.
    sampling: steps=50 (4 for LCM/TCD), guidance_scale=7.5, guidance_rescale=0, seed, scheduler, eta, callback (see core.Sampling).
    """
    options = sampling_options("txt2img", sampling, **pipe.step_defaults(sampling.get("scheduler")))
    pipe.require("txt2img")
    img.check_output_type(output_type)
    rng = np.random.default_rng(options["seed"])
    noise = pipe.draw(latents, rng, pipe.manifest.latent_shape, "latents")
    model = pipe.guided_model(prompt, negative_prompt, options)
    return pipe.finish(pipe.denoise(model, noise, options, rng), output_type)
