"""ControlNet at run time (Zhang et al. 2023, arXiv:2302.05543): control images in, UNet residuals out.

A bundle built with `--controlnet` has one `controlnet_<i>` engine per net, and a UNet that takes their
residuals as inputs. Every task takes the keywords below with diffusers' meanings and defaults
(StableDiffusionControlNetPipeline and its img2img, inpaint and SDXL siblings): the control image is
RGB in [0, 1] (not [-1, 1]), both CFG halves see it, several nets' residuals are summed, and a net
runs only on the steps inside its [control_guidance_start, control_guidance_end] share of the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np

from . import images as img
from .bundle import Manifest, TensorSpec
from .errors import BundleError
from .protocol import Engine, cast_feed

PREFIX = "controlnet_"
RESIDUALS = ("down_block_residual_", "mid_block_residual")
BUILD_FLAG = "--controlnet CONTROLNET_FOLDER"


class ControlOptions(TypedDict, total=False):
    """The ControlNet keywords every task takes (a bundle built without --controlnet refuses them).

    control_image: one image (or a batch of B) per net: an image for a one-net bundle, a list of them for several
    (None for a net leaves it out). controlnet_conditioning_scale, control_guidance_start, control_guidance_end:
    a number, or one per net (defaults 1.0, 0.0, 1.0). guess_mode: the nets see only the prompt's half of a CFG
    batch, with residuals scaled from 0.1 (first block) to 1 (mid block), as diffusers. control_resize: resize
    control images of another size (Lanczos) instead of refusing them.
    """

    control_image: Any
    controlnet_conditioning_scale: float | Sequence[float]
    control_guidance_start: float | Sequence[float]
    control_guidance_end: float | Sequence[float]
    guess_mode: bool
    control_resize: bool


KEYWORDS = tuple(ControlOptions.__annotations__)
# diffusers' controlnet_conditioning_scale default per pipeline (1.0 elsewhere): its img2img and inpaint pipelines' own
DEFAULT_SCALE = {"img2img": 0.8, "inpaint": 0.5}


def task_options(task: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The caller's ControlNet keywords, with the task's default conditioning scale where a control image is given."""
    control = {k: v for k, v in given.items() if k in KEYWORDS}
    if control.get("control_image") is not None:
        control.setdefault("controlnet_conditioning_scale", DEFAULT_SCALE.get(task, 1.0))
    return control


def controlnets(manifest: Manifest) -> list[str]:
    """The bundle's ControlNet components, in --controlnet order."""
    return sorted((n for n in manifest.components if n.startswith(PREFIX)), key=lambda n: int(n[len(PREFIX) :]))


def residual_inputs(manifest: Manifest) -> tuple[TensorSpec, ...]:
    """The UNet inputs that take ControlNet residuals (none in a bundle without ControlNets)."""
    return tuple(t for t in manifest.components["unet"].inputs if t.name.startswith(RESIDUALS))


def _per_net(value: Any, n: int, what: str) -> list[float]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{what}: {len(values)} values for a bundle with {n} ControlNets; pass one number or {n}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v):
            raise ValueError(f"{what} must be finite numbers, got {v!r}")
    return [float(v) for v in values]


def keep(i: int, total: int, start: float, end: float) -> float:
    """1.0 where step i of `total` runs its net, as diffusers' controlnet_keep; 0.0 outside [start, end]."""
    return 1.0 - float(i / total < start or (i + 1) / total > end)


@dataclass
class Net:
    """One ControlNet as a run uses it: its engine, control image (rows, C, H, W) and settings."""

    engine: Engine
    image: np.ndarray
    scale: float
    start: float
    end: float


class Control:
    """Computes the UNet's residual inputs for one UNet feed: the sum of every active net's, zeros where none runs.

    timesteps: the schedule's timesteps; the first one a run meets is its step 0 (img2img and a denoising_start
    hand-off skip the first steps, and diffusers counts control_guidance_start/end over the steps that run).
    """

    def __init__(
        self, nets: list[Net], residuals: tuple[TensorSpec, ...], timesteps: Sequence[float], guess: bool, cfg: bool, channels: int
    ):
        self.nets, self.guess, self.cfg, self.channels = nets, guess, cfg, channels
        self.zeros = {t.name: np.zeros(t.shape, np.float32) for t in residuals}
        self.timesteps = np.asarray(timesteps, dtype=np.float64)
        self.first: int | None = None

    def step(self, t: float) -> tuple[int, int]:
        """(step of the run, steps in the run) at timestep t."""
        index = int(np.argmin(np.abs(self.timesteps - t)))
        if self.first is None:
            self.first = index
        return index - self.first, len(self.timesteps) - self.first

    def __call__(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        i, total = self.step(float(np.asarray(feed["timestep"]).flat[0]))
        out = dict(self.zeros)
        for net in self.nets:
            scale = net.scale * keep(i, total, net.start, net.end)
            if scale == 0.0:  # diffusers runs the net and multiplies by 0: the same zeros
                continue
            n = len(self.zeros)
            scales = np.logspace(-1, 0, n) * scale if self.guess else np.full(n, scale)
            given = {**feed, "sample": np.asarray(feed["sample"])[:, : self.channels]}  # an inpainting UNet's extra channels: not the net's
            inputs = {t.name: given[t.name] for t in net.engine.component.inputs if t.name in given}
            inputs.update(controlnet_cond=net.image, conditioning_scale=scales)
            result = net.engine(cast_feed(net.engine.component, inputs))
            for name in out:
                r = np.asarray(result[name], dtype=np.float32)
                if self.guess and self.cfg:  # the negative half gets no control (diffusers runs the net on the prompt's half only)
                    r = np.concatenate([np.zeros_like(r[: len(r) // 2]), r[len(r) // 2 :]])
                out[name] = out[name] + r
        return out


class Controlled:
    """The UNet engine with its residual inputs filled by a Control: the Engine protocol, unchanged for callers."""

    def __init__(self, engine: Engine, control: Control):
        self.engine, self.control, self.component = engine, control, engine.component

    def __call__(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.engine({**feed, **self.control(feed)})


def control_images(given: Any, n: int) -> list[Any]:
    """control_image as one entry per net (None: that net is left out)."""
    if n == 1:
        return [given]
    if not isinstance(given, (list, tuple)) or len(given) != n:
        got = f"a list of {len(given)}" if isinstance(given, (list, tuple)) else type(given).__name__
        raise ValueError(
            f"control_image: this bundle has {n} ControlNets, so pass a list of {n} images (None to leave a net out), got {got}"
        )
    return list(given)


def without_controlnet(keywords: Iterable[str], rebuild: str) -> BundleError:
    """The refusal of ControlNet keywords by a bundle built without --controlnet: names them and the rebuild line."""
    return BundleError(
        f"{', '.join(sorted(keywords))}: this bundle has no ControlNet; rebuild it with one: `{rebuild} {BUILD_FLAG}` "
        "(a diffusers ControlNetModel folder; repeat --controlnet for several)"
    )


def controlled_unet(
    unet: Engine,
    open_engine: Callable[[str], Engine],
    manifest: Manifest,
    given: Mapping[str, Any],
    timesteps: Callable[[], Sequence[float]],
    rebuild: str,
) -> Engine:
    """The UNet for one run: as it is for a bundle without ControlNets, else fed the residuals of the asked nets.

    given: the ControlOptions keywords the caller passed; timesteps(): the run's schedule (asked only of a ControlNet
    bundle); rebuild: the bundle's export.build line, for the refusals.
    """
    names = controlnets(manifest)
    residuals = residual_inputs(manifest)
    if not residuals:
        if given:
            raise without_controlnet(given, rebuild)
        return unet
    n = len(names)
    scales = _per_net(given.get("controlnet_conditioning_scale", 1.0), n, "controlnet_conditioning_scale")
    starts = _per_net(given.get("control_guidance_start", 0.0), n, "control_guidance_start")
    ends = _per_net(given.get("control_guidance_end", 1.0), n, "control_guidance_end")
    for s, e in zip(starts, ends):
        if not 0.0 <= s < e <= 1.0:
            raise ValueError(f"control_guidance_start {s} and control_guidance_end {e}: need 0 <= start < end <= 1")
    guess = bool(given.get("guess_mode", False))
    # a net trained with pooled conditions (global_pool_conditions, e.g. shuffle) always runs in guess mode, as in diffusers
    records = [(manifest.components[n].source_onnx or manifest.components[n]).build.get("controlnet", {}) for n in names]
    guess = guess or any(r.get("global_pool_conditions") for r in records)
    images = control_images(given.get("control_image"), n) if given.get("control_image") is not None else [None] * n
    rows = manifest.components["unet"].input("sample").shape[0]
    cfg = manifest.guidance == "cfg"
    nets = []
    for name, image, scale, start, end in zip(names, images, scales, starts, ends):
        if image is None:
            continue
        engine = open_engine(name)
        spec = engine.component.input("controlnet_cond")
        what = "control_image" if n == 1 else f"control_image[{names.index(name)}]"
        size, resize = (spec.shape[2], spec.shape[3]), bool(given.get("control_resize"))
        cond = img.control_tensor(image, size, manifest.batch_size, resize=resize, what=what)
        if rows != len(cond):  # CFG: both halves see the control image
            cond = np.concatenate([cond] * (rows // len(cond)))
        nets.append(Net(engine, cond, scale, start, end))
    control = Control(nets, residuals, timesteps(), guess, cfg, manifest.vae.latent_channels)
    return Controlled(unet, control)
