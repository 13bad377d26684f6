"""int8 calibration data: UNet inputs recorded from real sampling runs of the model being exported.

The prompts come from the user's file (--calibration-prompts), else the model's own (MODEL/calibration/prompts.txt,
with MODEL/calibration/held_out.txt for the gate: the reference model ships its training captions there), else the
prompt set shipped with the project (export/int8/calibration_prompts.txt). Each prompt is generated with the runtime, from the fp32 bundle
being built, and every UNet call is recorded as the engine sees it: the CFG batch (unconditional and
conditional halves), every timestep of the schedule from pure noise to the last step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_PROMPTS = Path(__file__).resolve().parent / "calibration_prompts.txt"
MODEL_PROMPTS = Path("calibration") / "prompts.txt"  # in a model folder: the model's own prompts, as the reference model ships
MODEL_HELD_OUT = Path("calibration") / "held_out.txt"
STEPS = 20  # the sampling steps of a calibration run: the schedule's whole noise range at a common step count
GUIDANCE_SCALES = (7.5, 3.0)  # alternated over prompts: strong and mild guidance, different trajectories
HELD_OUT_SEED = 1_000_003  # held-out runs (the gate) draw prompts and noise apart from calibration


class CalibrationError(ValueError):
    """Bad calibration input (an empty or unreadable prompts file, a size below 1): nothing is written."""


@dataclass(frozen=True)
class PromptSet:
    """Where calibration prompts come from, what the manifest says of them, and the prompts."""

    source: str  # "file" | "model folder" | "shipped default"
    prompts: tuple[str, ...]
    path: str | None = None
    sha256: str | None = None
    held_out: tuple[str, ...] = ()  # the gate's prompts, where the model ships them (else the calibration prompts reversed)

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "prompts": len(self.prompts)}
        if self.path is not None:
            out |= {"path": self.path, "sha256": self.sha256}
        return out


def read_prompts(path: Path) -> PromptSet:
    """One prompt per line; blank lines and lines starting with '#' are skipped. Errors name the file and the fix."""
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise CalibrationError(f"--calibration-prompts {path} is a folder; give a text file with one prompt per line") from None
    except OSError as e:
        raise CalibrationError(f"--calibration-prompts {path} cannot be read ({e.strerror}); give a readable text file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(
            f"--calibration-prompts {path} is not UTF-8 text (byte {e.start}); save it as UTF-8, one prompt per line"
        ) from None
    prompts = tuple(s for line in text.splitlines() if (s := line.strip()) and not s.startswith("#"))
    if not prompts:
        raise CalibrationError(
            f"--calibration-prompts {path} holds no prompts (empty, or only blank and # lines); write one prompt per line"
        )
    return PromptSet("file", prompts, str(path), hashlib.sha256(raw).hexdigest())


def prompt_set(given: Path | None, model_folder: Path | None) -> PromptSet:
    """The prompts a build calibrates on: the user's file, else the model's own, else the shipped set."""
    if given is not None:
        return read_prompts(given)
    own = model_folder / MODEL_PROMPTS if model_folder is not None else None
    if own is not None and own.is_file():
        held = own.with_name(MODEL_HELD_OUT.name)
        ps, held_out = read_prompts(own), read_prompts(held).prompts if held.is_file() else ()
        return PromptSet("model folder", ps.prompts, MODEL_PROMPTS.as_posix(), ps.sha256, held_out)
    shipped = read_prompts(DEFAULT_PROMPTS)
    return PromptSet("shipped default", shipped.prompts, str(DEFAULT_PROMPTS.name), shipped.sha256)


def check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise CalibrationError(f"--calibration-size must be a whole number of generations >= 1, got {size!r}")


@dataclass
class Recording:
    """UNet feeds (as the engine received them) and its fp32 outputs, with each call's timestep."""

    feeds: list[dict[str, np.ndarray]] = field(default_factory=list)
    outputs: list[np.ndarray] = field(default_factory=list)
    timesteps: list[float] = field(default_factory=list)


class RecordingEngine:
    """Wraps the UNet engine: forwards every call and keeps a copy of its feed and output."""

    def __init__(self, inner: Any, recording: Recording):
        self.inner, self.recording = inner, recording
        self.component = inner.component

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = self.inner(feed)
        self.recording.feeds.append({k: np.array(v, copy=True) for k, v in feed.items()})
        self.recording.outputs.append(np.array(out[self.component.outputs[0].name], dtype=np.float32, copy=True))
        self.recording.timesteps.append(float(np.asarray(feed["timestep"]).reshape(-1)[0]))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@contextmanager
def unet_swapped(pipe: Any, engine: Any) -> Iterator[Any]:
    """The pipeline's UNet replaced by `engine` for the block (the guided model reads pipe.engines['unet'])."""
    old = pipe.engines["unet"]
    pipe.engines["unet"] = engine
    try:
        yield pipe
    finally:
        pipe.engines["unet"] = old


Generation = tuple[str, int, float]  # prompt, seed, guidance scale


def guidance_scales(mode: str) -> tuple[float, ...]:
    """The scales calibration alternates: a UNet built without guidance (Turbo) only takes <= 1."""
    return (1.0,) if mode == "none" else GUIDANCE_SCALES


def plan(prompts: tuple[str, ...], size: int, scales: tuple[float, ...] = GUIDANCE_SCALES, seed: int = 0) -> list[Generation]:
    """`size` generations cycling through the prompts, each with its own seed and an alternating guidance scale."""
    return [(prompts[i % len(prompts)], seed + i, scales[i % len(scales)]) for i in range(size)]


def generate(pipe: Any, runs: list[Generation], steps: int = STEPS, recording: Recording | None = None) -> np.ndarray:
    """Run txt2img for each generation (images float32 in [0, 1]); with `recording`, record every UNet call."""
    images = []
    engine = pipe.engines["unet"] if recording is None else RecordingEngine(pipe.engines["unet"], recording)
    with unet_swapped(pipe, engine):
        for prompt, seed, scale in runs:
            images.append(pipe.txt2img(prompt, steps=steps, guidance_scale=scale, seed=seed, output_type="np")[0])
    return np.stack(images)


def record(pipe: Any, runs: list[Generation], log: Callable[[str], None] = lambda _: None) -> Recording:
    """The UNet feeds of real sampling runs of `pipe` (an fp32 bundle)."""
    recording = Recording()
    generate(pipe, runs, recording=recording)
    log(f"  calibration: {len(runs)} generations x {STEPS} steps -> {len(recording.feeds)} UNet inputs")
    return recording
