"""--tiny-vae: a diffusers AutoencoderTiny folder (TAESD, Bohan 2023) exported beside the full VAE, as
vae_decoder_tiny and, for the pipelines that encode an image, vae_encoder_tiny."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime.bundle import TensorSpec
from runtime.bundle.levers import TINY_DECODER, TINY_ENCODER, TinyVaeInfo

from .errors import ModelError, read_json_object
from .model import check_checksums
from .onnx_export import ComponentSpec, wrap


def load_tiny_vae(path: Path, model: Any) -> Any:
    """The AutoencoderTiny at `path` in float32 eval mode, checked to read and write this model's latents."""
    config = path / "config.json"
    if not config.is_file():
        raise ModelError(f"--tiny-vae {path}: no config.json there; pass a diffusers AutoencoderTiny folder (e.g. madebyollin/taesd)")
    cls = read_json_object(config).get("_class_name")
    if cls != "AutoencoderTiny":
        raise ModelError(f"--tiny-vae {path}: its config.json is a {cls}, not an AutoencoderTiny (TAESD) folder")
    if not any(path.glob("*.safetensors")):
        raise ModelError(f"--tiny-vae {path} has no .safetensors weights; convert them to safetensors first")
    check_checksums(path)  # where the folder ships a SHA256SUMS (the reference model's does)
    import torch
    from diffusers import AutoencoderTiny

    try:
        tiny = AutoencoderTiny.from_pretrained(path, use_safetensors=True, local_files_only=True)
    except Exception as e:  # library errors vary by version; the user needs the folder and the cause
        raise ModelError(f"--tiny-vae {path}: could not load it: {e}") from e
    tiny = tiny.to(torch.float32).eval()
    c = tiny.config
    factor = int(c.upsampling_scaling_factor) ** (len(c.decoder_block_out_channels) - 1)
    if int(c.latent_channels) != int(model.vae.config.latent_channels) or factor != model.vae_factor:
        raise ModelError(
            f"--tiny-vae {path} reads {c.latent_channels}-channel latents at 1/{factor} of the image, but {model.source}'s VAE "
            f"makes {model.vae.config.latent_channels}-channel latents at 1/{model.vae_factor}: use the tiny VAE made for "
            "this model family (taesd for SD 1.x/2.x, taesdxl for SDXL)"
        )
    return tiny


def tiny_vae_specs(tiny: Any, *, height: int, width: int, batch: int, factor: int, encoder: bool) -> list[ComponentSpec]:
    """The tiny decoder (scaled latents / its scaling_factor -> pixels in [-1, 1]) and, with `encoder`, the tiny encoder
    (pixels in [-1, 1] -> latents, deterministic: AutoencoderTiny has no posterior to sample)."""
    lc, h, w = int(tiny.config.latent_channels), height // factor, width // factor
    latents = TensorSpec("latent_sample", (batch, lc, h, w), "float32")
    pixels = TensorSpec("sample", (batch, int(tiny.config.out_channels), height, width), "float32")
    scale = float(tiny.config.scaling_factor)
    specs = [ComponentSpec(TINY_DECODER, wrap(tiny, lambda m, z: m.decode(z, return_dict=False)[0]), (latents,), (pixels,), scale)]
    if encoder:
        image = TensorSpec("sample", (batch, int(tiny.config.in_channels), height, width), "float32")
        out = TensorSpec("latents", (batch, lc, h, w), "float32")
        specs.append(ComponentSpec(TINY_ENCODER, wrap(tiny, lambda m, x: m.encode(x, return_dict=False)[0]), (image,), (out,), scale))
    return specs


def tiny_vae_info(path: Path, tiny: Any) -> TinyVaeInfo:
    return TinyVaeInfo(str(path.resolve()), float(tiny.config.scaling_factor))
