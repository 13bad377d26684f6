"""runtime.Pipeline: a loaded bundle (runtime.session) with the four tasks (runtime.tasks) as its methods."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from . import tasks
from .handoff import start_step
from .options import Progress, Prompt, Sampling
from .session import Images, Session, initial_latents

__all__ = ["Pipeline", "Images", "Progress", "Prompt", "Sampling", "initial_latents", "start_step"]

P = ParamSpec("P")
R = TypeVar("R")


def _one_generation(task: Callable[P, R]) -> Callable[P, R]:
    """The task as one generation: LoRA adapters switched during it (another thread's set_lora) apply from the next."""

    @functools.wraps(task)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        pipe = args[0]
        assert isinstance(pipe, Session)
        with pipe.generation():
            return task(*args, **kwargs)

    return run


class Pipeline(Session):
    """A loaded bundle ready to generate: `Pipeline.load(bundle)`, then txt2img / img2img / inpaint / upscale.

    Each task's keywords beyond its own are the shared sampling options (runtime.options.Sampling):
    steps, guidance_scale, guidance_rescale, seed, scheduler, eta, callback.
    """

    txt2img = _one_generation(tasks.txt2img)
    img2img = _one_generation(tasks.img2img)
    inpaint = _one_generation(tasks.inpaint)
    upscale = _one_generation(tasks.upscale)
