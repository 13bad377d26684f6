"""One Triton `execute` call: a batch of requests in, one answer per request out.

Each request row is an item (prompt, negative prompt, seed, steps, guidance scale, sampler). A request
with a bad row is answered with an error naming the input and the fix; the others still run.
Items with equal (steps, guidance scale, sampler) share pipeline calls of the bundle's static batch
(padded with a copy of their first item), each row starting from its own seed's latents
(`initial_latents((1, C, h, w), seed)`, the first draw of `default_rng(seed)`). Items whose sampler
draws noise while it samples (DDPM, Euler a, LCM...) run apart, one per call with `seed=seed`: that
noise comes from one generator per call, so sharing a call would make an image depend on its batch mates.
Either way a request's image is the one `Pipeline.txt2img(prompt, negative_prompt, seed=seed, ...)`
returns first for the same options: what the runtime gives in one process, whatever else was queued.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.pipeline import Pipeline
from runtime.sampling import SAMPLERS, default_sampler, draws_noise
from runtime.session import initial_latents

INPUTS = ("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "scheduler")
DEFAULT_STEPS = 50  # runtime.options.DEFAULTS
DEFAULT_GUIDANCE = 7.5


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: a serving limit, so that one request cannot hold an instance for hours."""

    max_prompt_chars: int = 2000  # CLIP reads 77 tokens (~300 characters); past this it is not a prompt
    max_steps: int = 200


@dataclass(frozen=True)
class Item:
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    scheduler: str  # resolved: the bundle's default sampler where the request named none

    @property
    def options(self) -> tuple[int, float, str]:
        """What must be equal for two items to share a pipeline call."""
        return (self.steps, self.guidance_scale, self.scheduler)


@dataclass(frozen=True)
class Answer:
    """A request's images (n, H, W, 3) uint8 and the seeds they came from (n, 1) int64, or its error."""

    images: np.ndarray | None = None
    seeds: np.ndarray | None = None
    error: str | None = None


class RequestError(ValueError):
    """A request the server refuses; the message goes back to the client."""


def parse_request(inputs: Mapping[str, np.ndarray | None], limits: Limits, default_scheduler: str) -> list[Item]:
    """A request's input tensors (batch-first, as Triton gives them; None where not sent) -> its items."""
    prompt = inputs.get("prompt")
    if prompt is None:
        raise RequestError("input 'prompt' is missing: send the text to draw as a BYTES tensor named 'prompt', shape [1, 1]")
    rows = int(np.asarray(prompt).shape[0]) if np.asarray(prompt).ndim else 1
    prompts = [_text(v, "prompt", limits) for v in _column(prompt, "prompt", rows)]
    for p in prompts:
        if not p.strip():
            raise RequestError("input 'prompt' is empty: describe the image to generate")
    negatives = _optional(inputs, "negative_prompt", rows, lambda v: _text(v, "negative_prompt", limits), "")
    seeds = _optional(inputs, "seed", rows, _seed, None)
    steps = _optional(inputs, "steps", rows, lambda v: _steps(v, limits), DEFAULT_STEPS)
    scales = _optional(inputs, "guidance_scale", rows, _guidance, DEFAULT_GUIDANCE)
    samplers = _optional(inputs, "scheduler", rows, _scheduler, "")
    return [
        Item(p, n, secrets.randbelow(2**63) if s is None else s, st, g, sc or default_scheduler)
        for p, n, s, st, g, sc in zip(prompts, negatives, seeds, steps, scales, samplers)
    ]


def _column(value: Any, name: str, rows: int) -> list[Any]:
    """A [rows, 1] tensor as its `rows` values; any other shape is named."""
    arr = np.asarray(value)
    if arr.size != rows or (arr.ndim and arr.shape[0] != rows):
        raise RequestError(f"input {name!r} has shape {list(arr.shape)}; expected [{rows}, 1] (one value per prompt)")
    return list(arr.reshape(-1))


def _optional(inputs: Mapping[str, np.ndarray | None], name: str, rows: int, parse: Callable[[Any], Any], default: Any) -> list[Any]:
    value = inputs.get(name)
    return [default] * rows if value is None else [parse(v) for v in _column(value, name, rows)]


def _text(value: Any, name: str, limits: Limits) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError(f"input {name!r} is not valid UTF-8 (byte {e.start}): send the text UTF-8 encoded") from None
    if not isinstance(value, str):
        raise RequestError(f"input {name!r} must be BYTES (UTF-8 text), got {type(value).__name__}")
    if len(value) > limits.max_prompt_chars:
        raise RequestError(
            f"input {name!r} is {len(value)} characters; this server takes at most {limits.max_prompt_chars} "
            "(the text encoder reads the first 77 tokens, about 300 characters); shorten it"
        )
    return value


def _seed(value: Any) -> int:
    seed = int(value)
    if seed < 0:
        raise RequestError(f"input 'seed' is {seed}: a seed is a whole number >= 0")
    return seed


def _steps(value: Any, limits: Limits) -> int:
    steps = int(value)
    if not 1 <= steps <= limits.max_steps:
        raise RequestError(f"input 'steps' is {steps}: it must be between 1 and {limits.max_steps} (denoising steps per image)")
    return steps


def _guidance(value: Any) -> float:
    scale = float(value)
    if not math.isfinite(scale) or scale < 0:
        raise RequestError(f"input 'guidance_scale' is {scale}: it must be a finite number >= 0 (<= 1 turns guidance off)")
    return scale


def _scheduler(value: Any) -> str:
    name = _text(value, "scheduler", Limits(max_prompt_chars=100))
    if name and name not in SAMPLERS:
        raise RequestError(f"input 'scheduler' is {name!r}, which this server does not know; choose one of: {', '.join(sorted(SAMPLERS))}")
    return name


class Handler:
    """Answers batches of requests with one loaded pipeline (one per Triton model instance)."""

    def __init__(self, pipe: Pipeline, limits: Limits = Limits()):
        self.pipe, self.limits = pipe, limits
        scheduler = pipe.manifest.scheduler
        self.default_scheduler = default_sampler(scheduler.class_name, scheduler.config)
        self.noisy = {name: draws_noise(name) for name in SAMPLERS}  # the table's flags, for the options a request can set

    def handle(self, requests: Sequence[Mapping[str, np.ndarray | None]]) -> list[Answer]:
        """One answer per request, in order: its images, or the error that refused it or failed its run."""
        answers: list[Answer | None] = [None] * len(requests)
        items: list[tuple[int, int, Item]] = []  # (request, row, item)
        for r, inputs in enumerate(requests):
            try:
                items += [(r, i, item) for i, item in enumerate(parse_request(inputs, self.limits, self.default_scheduler))]
            except RequestError as e:
                answers[r] = Answer(error=str(e))
            except (TypeError, ValueError, OverflowError) as e:  # a value numpy could not read as its type
                answers[r] = Answer(error=f"bad request: {e}")
        images: dict[tuple[int, int], np.ndarray] = {}
        for chunk in self.plan([item for _, _, item in items]):
            try:
                for k, image in zip(chunk, self.run([items[k][2] for k in chunk])):
                    images[items[k][:2]] = image
            except Exception as e:  # a failed run answers its own requests, and the instance keeps serving
                for k in chunk:
                    answers[items[k][0]] = Answer(error=f"generation failed: {type(e).__name__}: {e}")
        for r in range(len(requests)):
            if answers[r] is None:
                mine = sorted(((row, item) for (rr, row, item) in items if rr == r), key=lambda m: m[0])
                answers[r] = Answer(
                    images=np.stack([images[(r, row)] for row, _ in mine]),
                    seeds=np.array([[item.seed] for _, item in mine], dtype=np.int64),
                )
        return [a for a in answers if a is not None]

    def plan(self, items: Sequence[Item]) -> list[list[int]]:
        """Indices of `items` in pipeline calls: equal options together, up to the bundle's batch; noisy samplers apart."""
        groups: dict[tuple[int, float, str], list[int]] = {}
        for k, item in enumerate(items):
            groups.setdefault(item.options, []).append(k)
        size = self.pipe.batch_size
        calls: list[list[int]] = []
        for (_, _, sampler), members in groups.items():
            step = 1 if self.noisy[sampler] else size
            calls += [members[i : i + step] for i in range(0, len(members), step)]
        return calls

    def run(self, items: Sequence[Item]) -> list[np.ndarray]:
        """One pipeline call for items of equal options (one item for a noisy sampler): their uint8 (H, W, 3) images."""
        first = items[0]
        options: dict[str, Any] = {"steps": first.steps, "guidance_scale": first.guidance_scale, "scheduler": first.scheduler}
        if len(items) == 1:  # exactly the runtime's own call: the noise and any sampler noise from default_rng(seed)
            pil = self.pipe.txt2img(first.prompt, first.negative_prompt, seed=first.seed, **options)
        else:
            rows = [*items, *[first] * (self.pipe.batch_size - len(items))]
            latents = np.concatenate([initial_latents((1, *self.pipe.manifest.latent_shape[1:]), it.seed) for it in rows])
            pil = self.pipe.txt2img(
                [it.prompt for it in rows], [it.negative_prompt for it in rows], latents=latents, seed=first.seed, **options
            )
        return [np.asarray(im, dtype=np.uint8) for im in pil[: len(items)]]
