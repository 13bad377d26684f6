"""decoder='full' | 'tiny': which VAE turns latents into pixels (and, for img2img/inpaint, pixels into latents)."""

from __future__ import annotations

from pathlib import Path

from .bundle import Manifest, rebuild_hint
from .bundle.levers import TINY_DECODER, TINY_ENCODER
from .errors import BundleError

DECODERS = ("full", "tiny")
FULL_DECODER, FULL_ENCODER = "vae_decoder", "vae_encoder"
TINY_HINT = "DIR: a diffusers AutoencoderTiny folder, e.g. taesd for SD 1.x/2.x, taesdxl for SDXL"


def check_decoder(value: object) -> None:
    if value is not None and value not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)} (or None: the full VAE where the bundle has it), got {value!r}")


def resolve(manifest: Manifest, asked: str | None) -> str:
    """'full' or 'tiny': the asked one, else the full VAE where the bundle has it, else the tiny one."""
    if asked is None:
        return "full" if FULL_DECODER in manifest.components or TINY_DECODER not in manifest.components else "tiny"
    return asked


def decoder_component(bundle: Path, manifest: Manifest, asked: str | None) -> tuple[str, float]:
    """The decoder component's name and the scaling factor its latents are divided by; a missing one is refused."""
    choice = resolve(manifest, asked)
    if choice == "tiny":
        tiny = manifest.levers.tiny_vae
        if TINY_DECODER not in manifest.components or tiny is None:
            raise BundleError(
                f"decoder='tiny': bundle {bundle} has no tiny VAE decoder; rebuild it with one: "
                f"`{rebuild_hint(bundle, manifest, tiny_vae='DIR')}` ({TINY_HINT})"
            )
        return TINY_DECODER, tiny.scaling_factor
    if FULL_DECODER not in manifest.components:
        raise BundleError(f"decoder='full': bundle {bundle} has no full VAE decoder; rebuild it with `{rebuild_hint(bundle, manifest)}`")
    return FULL_DECODER, manifest.vae.scaling_factor


def encoder_component(manifest: Manifest, asked: str | None) -> str:
    """The tiny encoder with decoder='tiny' where the bundle has one, else the full VAE encoder (the same latent space)."""
    if resolve(manifest, asked) == "tiny" and TINY_ENCODER in manifest.components:
        return TINY_ENCODER
    return FULL_ENCODER
