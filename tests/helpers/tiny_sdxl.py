"""Tiny SDXL pipelines: the real diffusers/transformers classes (two CLIP text encoders of different widths,
a UNet with SDXL's `text_time` added conditioning, AutoencoderKL, the Euler scheduler as SDXL ships it),
small widths, random weights, saved with save_pretrained. `kind` picks the checkpoint's shape:

- base: StableDiffusionXLPipeline, both encoders, time_ids (original_size, crops_coords_top_left, target_size)
- turbo: the base's shape with SDXL-Turbo's trailing timesteps (run with no guidance, batch-B bundle)
- inpaint: StableDiffusionXLInpaintPipeline with a 9-channel UNet (latents, mask, masked-image latents)
- refiner: StableDiffusionXLImg2ImgPipeline with text_encoder_2/tokenizer_2 only and requires_aesthetics_score
  (time_ids: original_size, crops_coords_top_left, aesthetic_score)

vae_gain > 1 multiplies the VAE decoder's conv_in weights, so its activations pass fp16's range (65504), as
SDXL's own VAE does in fp16; force_upcast is the VAE config flag diffusers reads for that.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from reference.architecture import CLIP_DIR
from tests.helpers.tiny_models import tiny_vae

KINDS = ("base", "turbo", "inpaint", "refiner")
# SDXL's scheduler_config.json (stabilityai/stable-diffusion-xl-base-1.0), Turbo's differs in its spacing
SDXL_SCHEDULE = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
    interpolation_type="linear", prediction_type="epsilon", use_karras_sigmas=False, clip_sample=False, set_alpha_to_one=False,
)  # fmt: skip
WIDTH_1, WIDTH_2, PROJECTION, TIME_EMBED = 32, 48, 24, 8


def make_tiny_sdxl(
    out: Path, *, seed: int = 0, kind: str = "base", sample_size: int = 64, vae_gain: float = 1.0, force_upcast: bool = True
) -> Path:
    """Write a randomly initialised SDXL-shaped pipeline to `out` and return it."""
    import torch
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
    )

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")
    torch.manual_seed(seed)
    refiner = kind == "refiner"
    schedule = {**SDXL_SCHEDULE, **({"timestep_spacing": "trailing"} if kind == "turbo" else {})}
    parts: dict[str, Any] = dict(
        unet=_unet(sample_size, refiner, 9 if kind == "inpaint" else 4),
        vae=_vae(sample_size, vae_gain, force_upcast),
        text_encoder_2=_text_encoder(WIDTH_2, projection=True),
        tokenizer_2=_tokenizer("!"),
        scheduler=EulerDiscreteScheduler.from_config(schedule),
    )
    if refiner:
        pipe: Any = StableDiffusionXLImg2ImgPipeline(
            text_encoder=None, tokenizer=None, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, **parts
        )
    else:
        cls = StableDiffusionXLInpaintPipeline if kind == "inpaint" else StableDiffusionXLPipeline
        pipe = cls(text_encoder=_text_encoder(WIDTH_1), tokenizer=_tokenizer("<|endoftext|>"), **parts)
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def _unet(sample_size: int, refiner: bool, in_channels: int = 4) -> Any:
    from diffusers import UNet2DConditionModel

    context = WIDTH_2 if refiner else WIDTH_1 + WIDTH_2
    time_ids = 5 if refiner else 6  # the refiner's aesthetic score replaces target_size's two numbers
    return UNet2DConditionModel(
        sample_size=sample_size // 8,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=time_ids * TIME_EMBED + PROJECTION,
        cross_attention_dim=context,
        norm_num_groups=8,
    )


def _vae(sample_size: int, gain: float, force_upcast: bool) -> Any:
    import torch

    vae = tiny_vae(sample_size, scaling_factor=0.13025, force_upcast=force_upcast)  # SDXL's latent scale
    if gain != 1.0:
        with torch.no_grad():
            vae.decoder.conv_in.weight.mul_(gain)
    return vae


def _text_encoder(width: int, projection: bool = False) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=PROJECTION,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _tokenizer(pad: str) -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(CLIP_DIR, pad_token=pad)
