"""Image to image (SDEdit, Meng et al. 2021, arXiv:2108.01073), as diffusers' StableDiffusionImg2ImgPipeline."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import images as img
from ..handoff import start_at, start_step
from ..options import Prompt, TaskOptions, task_options
from ..session import Images, Session

if TYPE_CHECKING:
    from typing_extensions import Unpack


def img2img(
    pipe: Session,
    prompt: Prompt,
    image: img.ImageLike,
    negative_prompt: Prompt = "",
    *,
    strength: float = 0.75,
    noise: np.ndarray | None = None,
    encoder_noise: np.ndarray | None = None,
    resize: bool = False,
    denoising_start: float | None = None,
    output_type: str = "pil",
    **sampling: Unpack[TaskOptions],
) -> Images:
    """Redraw `image` guided by `prompt`: its latents are noised to the level of `strength` and denoised
    over the last int(steps * strength) steps of the schedule.

    The seed's generator draws, in order: `noise` (added at that level), `encoder_noise` (the VAE
    posterior sample; zeros give its mean), then any sampler noise. Pass either to reproduce another tool's run.
    image: PIL or array, the bundle's size (resize=True resizes it, Lanczos).
    denoising_start: continue another run from that fraction of the noise schedule (diffusers' denoising_start):
    `image` is then the latents a base's txt2img(..., denoising_end=the same fraction, output_type='latent')
    returned, (B, C, H/f, W/f), taken as they are; strength is not used (an image given instead is encoded, not noised).
    sampling: steps=50 (4 for LCM/TCD), guidance_scale=7.5, guidance_rescale=0, seed, scheduler, eta, callback (runtime.options.Sampling).
    SDXL bundles also take original_size, crops_coords_top_left, target_size, their negative_* twins and the
    refiner's aesthetic_score / negative_aesthetic_score (see runtime.families.sdxl; diffusers' defaults).
    """
    options, conditioning = task_options("img2img", sampling, pipe.family, pipe.manifest.scheduler)
    pipe.require("img2img")
    img.check_output_type(output_type)
    handoff = denoising_start is not None
    if denoising_start is not None:
        start = start_at(pipe.timesteps(options), pipe.manifest.scheduler.config, denoising_start)
    else:
        start = start_step(options["steps"], strength)
    rng = np.random.default_rng(options["seed"])
    shape = pipe.manifest.latent_shape
    noise = pipe.draw(noise, rng, shape, "noise")
    if handoff and isinstance(image, np.ndarray) and image.ndim == 4 and image.shape[1] == shape[1]:
        init = pipe.draw(image, rng, shape, "image (latents handed over for denoising_start)")
    else:
        pixels = img.image_tensor(image, (pipe.height, pipe.width), pipe.batch_size, resize=resize, rebuild=pipe.rebuild)
        init = pipe.encode_image(pixels, pipe.draw(encoder_noise, rng, shape, "encoder_noise"))
    model = pipe.guided_model(prompt, negative_prompt, options, conditioning=conditioning)
    return pipe.finish(pipe.denoise(model, noise, options, rng, init=init, start=start, resume=handoff), output_type)
