"""Image to image (SDEdit, Meng et al. 2021, arXiv:2108.01073), as diffusers' StableDiffusionImg2ImgPipeline."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import images as img
from ..core import Core, Images, Prompt, Sampling, sampling_options, start_step

if TYPE_CHECKING:
    from typing_extensions import Unpack


def img2img(
    pipe: Core,
    prompt: Prompt,
    image: img.ImageLike,
    negative_prompt: Prompt = "",
    *,
    strength: float = 0.75,
    noise: np.ndarray | None = None,
    encoder_noise: np.ndarray | None = None,
    resize: bool = False,
    output_type: str = "pil",
    **sampling: Unpack[Sampling],
) -> Images:
    """Redraw `image` guided by `prompt`: its latents are noised to the level of `strength` and denoised
    over the last int(steps * strength) steps of the schedule.

    The seed's generator draws, in order: `noise` (added at that level), `encoder_noise` (the VAE
    posterior sample; zeros give its mean), then any sampler noise. Pass either to reproduce another tool's run.
    image: PIL or array, the bundle's size (resize=True resizes it, Lanczos).
    sampling: steps=50 (4 for LCM/TCD), guidance_scale=7.5, guidance_rescale=0, seed, scheduler, eta, callback (see core.Sampling).
    """
    options = sampling_options("img2img", sampling, **pipe.step_defaults(sampling.get("scheduler")))
    pipe.require("img2img")
    img.check_output_type(output_type)
    start = start_step(options["steps"], strength)
    rng = np.random.default_rng(options["seed"])
    shape = pipe.manifest.latent_shape
    noise = pipe.draw(noise, rng, shape, "noise")
    pixels = img.image_tensor(image, (pipe.height, pipe.width), pipe.batch_size, resize=resize, rebuild=pipe.rebuild)
    init = pipe.encode_image(pixels, pipe.draw(encoder_noise, rng, shape, "encoder_noise"))
    model = pipe.guided_model(prompt, negative_prompt, options)
    return pipe.finish(pipe.denoise(model, noise, options, rng, init=init, start=start), output_type)
