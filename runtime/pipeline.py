"""runtime.Pipeline: a loaded bundle (runtime.session) with the four tasks (runtime.tasks) as its methods."""

from __future__ import annotations

from . import tasks
from .handoff import start_step
from .options import Progress, Prompt, Sampling
from .session import Images, Session, initial_latents

__all__ = ["Pipeline", "Images", "Progress", "Prompt", "Sampling", "initial_latents", "start_step"]


class Pipeline(Session):
    """A loaded bundle ready to generate: `Pipeline.load(bundle)`, then txt2img / img2img / inpaint / upscale.

    Each task's keywords beyond its own are the shared sampling options (runtime.options.Sampling):
    steps, guidance_scale, guidance_rescale, seed, scheduler, eta, callback.
    """

    txt2img = tasks.txt2img
    img2img = tasks.img2img
    inpaint = tasks.inpaint
    upscale = tasks.upscale
