"""Guidance wraps the UNet engine into the `model(x, t)` callable samplers expect.

Three modes, recorded in the manifest at export: classifier-free guidance (one batch-2B call),
none (batch-B call, Turbo-style models), and a guidance embedding fed to the UNet (LCM).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .bundle import GUIDANCE_MODES, GuidanceInfo
from .errors import BundleError, NonFiniteError
from .families import Conditioning, Family
from .protocol import Engine, cast_feed, check_finite
from .sampling.common import Model

MODES = GUIDANCE_MODES


Extra = Mapping[str, np.ndarray]


def unet_call(unet: Engine, sample: np.ndarray, t: float, text: Conditioning, image: Extra | None = None) -> np.ndarray:
    """One UNet engine call at timestep t for every row; the output comes back as float32.

    text: the prompts' context and the family's extra inputs. image: conditioning per row beyond the
    prompts: `channels` is concatenated to the latents (inpainting's mask and masked-image latents,
    the upscaler's low-resolution image); any other key is fed as is (class_labels, timestep_cond).
    """
    image = dict(image or {})
    channels = image.pop("channels", None)
    if channels is not None:
        sample = np.concatenate([sample, np.asarray(channels, dtype=sample.dtype)], axis=1)
    feed = {
        "sample": sample, "timestep": np.full((sample.shape[0],), t, dtype=np.float64),
        "encoder_hidden_states": text.context, **text.extra, **image,
    }  # fmt: skip
    cast = cast_feed(unet.component, feed)
    out = np.asarray(unet(cast)[unet.component.outputs[0].name], dtype=np.float32)
    check_finite(unet.component, cast, out, f" at timestep {t:g}")
    return out


def rescale_cfg(guided: np.ndarray, cond: np.ndarray, factor: float) -> np.ndarray:
    """guidance_rescale (Lin et al. 2023, arXiv:2305.08891, Sec. 3.4): match the conditional output's std."""
    axes = tuple(range(1, guided.ndim))
    rescaled = guided * (cond.std(axis=axes, ddof=1, keepdims=True) / guided.std(axis=axes, ddof=1, keepdims=True))
    mixed: np.ndarray = factor * rescaled + (1 - factor) * guided
    return mixed


def classifier_free(unet: Engine, text: Conditioning, scale: float, rescale: float = 0.0, image: Extra | None = None) -> Model:
    """Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598): one batch-2B call, split, mix.

    text: 2B rows, the negative prompts' half first.
    """
    doubled = {k: np.concatenate([v, v]) for k, v in (image or {}).items()}  # both halves see the same image

    def model(x: np.ndarray, t: float) -> np.ndarray:
        u, c = np.split(unet_call(unet, np.concatenate([x, x]), t, text, doubled), 2)
        if scale <= 1.0:  # no guidance, as in diffusers: the conditional half alone
            return c
        guided: np.ndarray = u + scale * (c - u)
        if rescale > 0:
            guided = rescale_cfg(guided, c, rescale)
        if not np.isfinite(guided).all():  # the UNet's halves were finite (unet_call checked): the mix overflowed
            raise NonFiniteError(
                f"guidance turned finite UNet outputs into NaN/inf (guidance_scale {scale}, guidance_rescale {rescale})"
            )
        return guided

    return model


def unguided(unet: Engine, text: Conditioning, image: Extra | None = None) -> Model:
    """A batch-B call on the prompts alone; image's `timestep_cond` carries an LCM guidance embedding."""

    def model(x: np.ndarray, t: float) -> np.ndarray:
        return unet_call(unet, x, t, text, image)

    return model


def guided(
    unet: Engine,
    family: Family,
    guidance: GuidanceInfo,
    prompts: Sequence[str],
    negatives: Sequence[str],
    scale: float,
    rescale: float,
    image: Extra | None,
    rebuild: Callable[..., str],
    conditioning: Mapping[str, Any] | None = None,
) -> Model:
    """The UNet wrapped for the bundle's guidance mode; refuses settings that mode cannot honour.

    rebuild(**changed flags): the export.build line that rebuilds the bundle with them, for the refusals.
    conditioning: the family's keywords (SDXL's sizes and scores) as its `conditioning` completed them.
    """
    mode = guidance.mode
    if rescale and mode != "cfg":
        raise ValueError(f"guidance_rescale needs classifier-free guidance, and this bundle was built with guidance {mode!r}")
    if mode == "cfg":
        return classifier_free(unet, family.encode(prompts, negatives, conditioning), scale, rescale, image)
    has_negative = any(n.strip() for n in negatives)
    if mode == "none":
        if scale > 1:
            raise ValueError(
                f"guidance_scale {scale} needs classifier-free guidance, but this bundle was built without it "
                f"(batch-B UNet); use guidance_scale <= 1, or rebuild with `{rebuild(guidance='cfg')}`"
            )
        if has_negative:
            warnings.warn("negative_prompt has no effect without classifier-free guidance", stacklevel=4)
        return unguided(unet, family.encode(prompts, None, conditioning), image)
    if mode == "embedded":
        if has_negative:
            warnings.warn("negative_prompt has no effect on a guidance-embedding (LCM) model", stacklevel=4)
        if guidance.embedding_dim is None:
            raise BundleError("the bundle's guidance mode is 'embedded' but its manifest gives no embedding_dim; rebuild the bundle")
        w = guidance_embedding(np.full(len(prompts), scale - 1.0), guidance.embedding_dim)
        return unguided(unet, family.encode(prompts, None, conditioning), {**(image or {}), "timestep_cond": w})
    raise BundleError(f"bundle guidance mode {mode!r} is unknown to this runtime (known: {', '.join(MODES)}); rebuild the bundle")


def guidance_embedding(w: np.ndarray, dim: int) -> np.ndarray:
    """Sinusoidal embedding of the guidance weight (Luo et al. 2023, LCM, arXiv:2310.04378), as diffusers."""
    # float32 on purpose: angles reach ~1e4 rad, where float64 would drift from what the UNet was trained on
    half = dim // 2
    freqs = np.exp(np.arange(half, dtype=np.float32) * np.float32(-math.log(10000.0) / (half - 1)))
    angles = (np.asarray(w, dtype=np.float32) * np.float32(1000.0))[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32)
