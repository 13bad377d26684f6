"""The options a task takes, checked once before any work: sampling keywords, the family's conditioning keywords,
prompts; and the step count a few-step sampler defaults to."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

from . import control as ctl
from .bundle import SchedulerInfo
from .decoders import check_decoder
from .deepcache import check_interval
from .errors import NonFiniteError
from .families.sdxl import SdxlConditioning
from .preview import PreviewCallback, check_every
from .sampling import default_sampler

if TYPE_CHECKING:
    from .families import Family

Prompt = str | Sequence[str]
Progress = Callable[[int, int, float], bool | None] | None


class Sampling(TypedDict, total=False):
    """The options every task takes, as keywords.

    steps: denoising steps. guidance_scale: classifier-free guidance strength (<= 1 turns it off).
    guidance_rescale: Lin et al. 2023's CFG rescale (SD 2.x v-prediction models like 0.7).
    seed: one `np.random.default_rng(seed)` draws the task's noise, in the order its docstring gives,
    then any noise the sampler adds. scheduler: a sampler name (default: the one the model's
    scheduler config names). eta: DDIM's and TCD's stochasticity (an error for samplers without it).
    callback(step, total, t) runs after every step, steps numbered 1..total; returning False cancels.
    decoder: 'full' or 'tiny' (a bundle built with --tiny-vae; default: full where the bundle has it), for the final
    images and, in img2img/inpaint, the encoder too where the tiny VAE has one.
    cache_interval: DeepCache (a bundle built with --deepcache): the full UNet every that many steps, the shallow one
    reusing its deep feature in between (1, the default: every step full).
    preview(step, total, images) gets the current estimate of the final image every `preview_every` steps (and after
    the last): float32 (B, h, w, 3) in [0, 1], from the tiny decoder where the bundle has one, else from the bundle's
    linear latent-to-RGB map (an image at the latents' resolution).
    """

    steps: int
    guidance_scale: float
    guidance_rescale: float
    seed: int | None
    scheduler: str | None
    eta: float | None
    callback: Progress
    decoder: str | None
    cache_interval: int
    preview: PreviewCallback | None
    preview_every: int


FEW_STEP_SAMPLERS = ("lcm", "tcd")
MAX_GUIDANCE = 100.0  # classifier-free guidance past this only saturates: a typo (1e6), never a setting
FEW_STEPS = 4


class PromptReading(TypedDict, total=False):
    """How prompts are read, on every bundle (runtime.families.base.PROMPT_KEYWORDS): prompt_weighting=False reads
    A1111's emphasis brackets as plain text."""

    prompt_weighting: bool


class TaskOptions(Sampling, SdxlConditioning, PromptReading, ctl.ControlOptions, total=False):
    """Every keyword a task takes beyond its own arguments: the sampling options, a family's conditioning, ControlNet's."""


DEFAULTS: Sampling = {
    "steps": 50, "guidance_scale": 7.5, "guidance_rescale": 0.0, "seed": None, "scheduler": None, "eta": None, "callback": None,
    "decoder": None, "cache_interval": 1, "preview": None, "preview_every": 1,
}  # fmt: skip


def sampling_options(
    task: str, given: Mapping[str, Any], conditioning: Sequence[str] = (), control: Sequence[str] = (), **task_defaults: Any
) -> Sampling:
    """The caller's options over the task's defaults over DEFAULTS; an unknown keyword is a TypeError, as Python's.

    conditioning: the bundle family's own keywords (taken out of `given` by task_options), named in that error.
    """
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        more = f"; this bundle's conditioning options: {', '.join(conditioning)}" if conditioning else ""
        more += f"; ControlNet options (bundles built with --controlnet): {', '.join(control)}" if control else ""
        raise TypeError(f"{task}() got an unexpected keyword argument {unknown[0]!r} (sampling options: {', '.join(DEFAULTS)}{more})")
    options: Sampling = {**DEFAULTS, **task_defaults, **given}  # type: ignore[typeddict-item]
    seed = options["seed"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"seed {seed!r} is not valid: a seed is a whole number >= 0 (any size), or None for a random one")
    for name in ("guidance_scale", "guidance_rescale", "eta"):
        value = options[name]
        if value is None and name == "eta":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        if not np.isfinite(value):
            raise NonFiniteError(f"{name} is {value}: it must be a finite number (NaN/inf would turn every latent into NaN)")
    check_decoder(options["decoder"])
    check_interval(options["cache_interval"])
    check_every(options["preview_every"])
    if options["preview"] is not None and not callable(options["preview"]):
        raise TypeError(f"preview must be a callable preview(step, total, images), got {type(options['preview']).__name__}")
    if abs(options["guidance_scale"]) > MAX_GUIDANCE:
        raise ValueError(
            f"guidance_scale {options['guidance_scale']:g} is far outside what any model uses (|scale| <= {MAX_GUIDANCE:g}; "
            "Stable Diffusion takes about 3 to 15): the latents would leave every range the UNet knows"
        )
    if not 0 <= options["guidance_rescale"] <= 1:
        raise ValueError(f"guidance_rescale {options['guidance_rescale']:g} must be between 0 and 1 (Lin et al.: 0.7 is typical)")
    return options


def check_prompts(prompt: Any, what: str) -> list[str]:
    """A str or a sequence of str, each valid Unicode; anything else is named by its argument."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)) and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    else:
        empty = " (pass '' for no negative prompt)" if what == "negative_prompt" and prompt is None else ""
        raise TypeError(f"{what} must be a str or a list of str, got {type(prompt).__name__} {prompt!r:.60}{empty}")
    for i, p in enumerate(prompts):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            which = what if len(prompts) == 1 else f"{what}[{i}]"
            raise ValueError(
                f"{which} is not valid text: character {e.start} is a lone surrogate {p[e.start]!r} "
                "(bytes that were not valid UTF-8?); pass the prompt as proper Unicode"
            ) from None
    return prompts


def task_options(
    task: str, given: Mapping[str, Any], family: Family, scheduler: SchedulerInfo, **task_defaults: Any
) -> tuple[Sampling, Mapping[str, Any]]:
    """The sampling options (sampling_options) and the family's conditioning keywords (SDXL's original_size, ...)
    with ControlNet's (runtime.control), checked before any work; a keyword that is none of them is a TypeError
    naming the lists."""
    keywords = family.keywords
    conditioning = {k: v for k, v in given.items() if k in keywords}
    control = ctl.task_options(task, given)  # ControlNet's keywords, checked when the run's UNet is made
    rest = {k: v for k, v in given.items() if k not in keywords and k not in ctl.KEYWORDS}
    defaults = {**step_defaults(scheduler, rest.get("scheduler")), **task_defaults}
    options = sampling_options(task, rest, tuple(keywords), ctl.KEYWORDS, **defaults)
    return options, {**family.conditioning(conditioning), **control}


def batch_prompts(prompt: Prompt, what: str, batch_size: int) -> list[str]:
    """One prompt repeated, or exactly batch-size prompts; an empty `prompt` is refused."""
    prompts = check_prompts(prompt, what)
    if len(prompts) == 1:
        prompts = prompts * batch_size
    if what == "prompt" and any(not p.strip() for p in prompts):
        raise ValueError("prompt is empty: describe the image to generate (an empty prompt gives unconditioned noise)")
    if len(prompts) != batch_size:
        raise ValueError(
            f"{what}: {len(prompts)} prompts for a bundle built with batch size {batch_size}; "
            f"pass one prompt or exactly {batch_size} (or rebuild with --batch-size {len(prompts)})"
        )
    return prompts


def step_defaults(info: SchedulerInfo, scheduler: str | None) -> dict[str, int]:
    """Few-step samplers (LCM, TCD: a distilled UNet) default to 4 steps, the rest to DEFAULTS' 50."""
    name = scheduler or default_sampler(info.class_name, info.config)
    return {"steps": FEW_STEPS} if name in FEW_STEP_SAMPLERS else {}
