"""The latent side of a Session: pixels -> latents through the VAE encoder, latents -> pixels through the decoder,
and the checks on the latents and noise a caller hands in.

A mixin, apart from runtime.session so that each module does one job (issue 29: no runtime module over 400 lines);
Session inherits it, so tasks still call pipe.decode, pipe.encode_image, pipe.finish and pipe.draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import decoders
from . import images as img
from .bundle import Manifest, rebuild_hint
from .errors import NonFiniteError
from .protocol import Engine, cast_feed, check_finite

if TYPE_CHECKING:
    from PIL.Image import Image

# output_type 'pil': a list of PIL images; 'np': float32 (B, H, W, 3) in [0, 1]; 'latent': the final latents
Images = list["Image"] | np.ndarray


class Latents:
    """Encode, decode and latent checks over a loaded bundle's VAE engines (Session supplies bundle, manifest, engine)."""

    bundle: Path
    manifest: Manifest

    def engine(self, name: str) -> Engine:
        """A component's engine (Session opens it on first use)."""
        raise NotImplementedError

    def decode(self, latents: np.ndarray, decoder: str | None = None) -> np.ndarray:
        """Latents -> float32 images (B, H, W, 3) in [0, 1]; NaN (fp16 overflow) is an error, not a black image.

        decoder: 'full' or 'tiny' (see decoders.resolve for the default)."""
        self.check_latents(latents, "the latents given to the VAE decoder")
        name, scaling = decoders.decoder_component(self.bundle, self.manifest, decoder)
        vae = self.engine(name)
        feed = cast_feed(vae.component, {"latent_sample": latents / scaling})
        out = np.asarray(vae(feed)["sample"])
        try:
            check_finite(vae.component, feed, out)
        except NonFiniteError as e:
            raise self._with_hint(e) from None
        return img.to_images(out)

    def check_latents(self, latents: np.ndarray, what: str) -> None:
        """NaN/inf latents are refused where they are found, named, never decoded into a black image."""
        if not np.isfinite(latents).all():
            raise NonFiniteError(f"{what} hold NaN/inf; nothing downstream can recover an image from them")

    def _with_hint(self, e: NonFiniteError, where: str = "") -> NonFiniteError:
        """An engine's NonFiniteError with the step it happened at, and for fp16 overflow the fp32 rebuild."""
        hint = ""
        if e.fp16_overflow:
            hint = f"; rebuild in fp32 with `{rebuild_hint(self.bundle, self.manifest, precision='fp32')}`"
        return NonFiniteError(f"{where}{e}{hint}", fp16_overflow=e.fp16_overflow, upstream=e.upstream)

    def encode_image(self, image: np.ndarray, noise: np.ndarray, decoder: str | None = None) -> np.ndarray:
        """Pixels (B, 3, H, W) in [-1, 1] -> scaled latents: a sample of the VAE posterior, mean + std * noise; with
        decoder='tiny' and a tiny encoder in the bundle, its latents (deterministic: `noise` is not used)."""
        name = decoders.encoder_component(self.manifest, decoder)
        enc = self.engine(name)
        feed = cast_feed(enc.component, {"sample": image})
        if name != decoders.FULL_ENCODER:
            out = np.asarray(enc(feed)["latents"], dtype=np.float64)
            check_finite(enc.component, feed, out)
            tiny = self.manifest.levers.tiny_vae
            return (out * (tiny.scaling_factor if tiny else 1.0)).astype(np.float32)
        params = np.asarray(enc(feed)["latent_parameters"], dtype=np.float64)
        try:
            check_finite(enc.component, feed, params)
        except NonFiniteError as e:
            raise self._with_hint(e) from None
        mean, logvar = np.split(params, 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))  # diffusers' DiagonalGaussianDistribution clamps the same
        latents: np.ndarray = ((mean + std * noise) * self.manifest.vae.scaling_factor).astype(np.float32)
        return latents

    def finish(
        self, latents: np.ndarray, output_type: str, keep: tuple[np.ndarray, np.ndarray] | None = None, decoder: str | None = None
    ) -> Images:
        """Latents -> the asked output type; keep=(original pixels, pixel mask) composites the result over the original."""
        if output_type == "latent":
            self.check_latents(latents, "the final latents")
            return latents
        images = self.decode(latents, decoder)
        if keep is not None:
            images = img.composite(images, *keep)
        return images if output_type == "np" else img.to_pil(images)

    def draw(self, given: np.ndarray | None, rng: np.random.Generator, shape: Sequence[int], what: str) -> np.ndarray:
        """A caller's noise, checked, or the generator's next draw."""
        if given is None:
            return rng.standard_normal(tuple(shape), dtype=np.float32)
        if not isinstance(given, np.ndarray):
            raise TypeError(f"{what} must be a numpy array, got {type(given).__name__}")
        if tuple(given.shape) != tuple(shape):
            raise ValueError(f"{what}: shape {tuple(given.shape)} but this bundle needs {tuple(shape)}")
        out = np.asarray(given, dtype=np.float32)
        if not np.isfinite(out).all():
            raise NonFiniteError(f"{what} given by the caller hold NaN/inf (or values too large for float32)")
        return out
