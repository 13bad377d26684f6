"""Tiny Stable Diffusion pipelines: the real diffusers/transformers classes, small widths,
random weights, saved with save_pretrained. `kind` picks the family's shape:

- sd15: SD 1.5's block structure, epsilon, DDIM config as SD 1.x ships it (steps_offset 1)
- sd2: SD 2.x's linear-projection attention, v_prediction, "!" padding tokenizer
- turbo: SD-Turbo's Euler on trailing timesteps (run with no guidance, batch-B bundle)
- lcm: a UNet with time_cond_proj_dim (guidance embedding) and the LCM scheduler
- inpaint: SD 1.5's shape with a 9-channel UNet (latents, mask, masked-image latents), saved as an inpainting pipeline
- upscaler: the x4 upscaler's shape (StableDiffusionUpscalePipeline): a 7-channel UNet (latents and the
  low-resolution RGB image) with a noise-level class embedding, a 4x VAE with its 0.08333 scaling factor,
  v_prediction DDIM and a DDPM low_res_scheduler; `sample_size` is the output size, the input a quarter of it
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from reference.architecture import CLIP_DIR

SD1_SCHEDULE = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
)
KINDS = ("sd15", "sd2", "turbo", "lcm", "inpaint", "upscaler")
# as stabilityai/stable-diffusion-x4-upscaler ships them: the schedule that noises the low-resolution image, its limit
LOW_RES_SCHEDULE = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", clip_sample=False, variance_type="fixed_small")
MAX_NOISE_LEVEL = 350


def _scheduler(kind: str) -> Any:
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, LCMScheduler

    if kind in ("sd2", "upscaler"):
        return DDIMScheduler(**SD1_SCHEDULE, prediction_type="v_prediction")
    if kind == "turbo":
        return EulerDiscreteScheduler.from_config(SD1_SCHEDULE, timestep_spacing="trailing")
    if kind == "lcm":
        return LCMScheduler.from_config(SD1_SCHEDULE, original_inference_steps=50)
    return DDIMScheduler(**SD1_SCHEDULE)


def tiny_vae(sample_size: int, **config: Any) -> Any:
    """A random AutoencoderKL with SD's 4-level, factor-8 layout at toy widths; `config` overrides (e.g. SDXL's scale)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size,
        **config,
    )


def make_tiny_sd(out: Path, *, seed: int = 0, kind: str = "sd15", sample_size: int = 64) -> Path:
    """Write a randomly initialised pipeline of the given family's shape to `out` and return it."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")
    torch.manual_seed(seed)
    if kind == "upscaler":
        return _save_upscaler(out, sample_size)
    sd2 = kind == "sd2"
    unet = UNet2DConditionModel(
        sample_size=sample_size // 8,
        in_channels=9 if kind == "inpaint" else 4,
        out_channels=4,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        attention_head_dim=(2, 4, 8, 8) if sd2 else 8,
        use_linear_projection=sd2,
        cross_attention_dim=32,
        norm_num_groups=8,
        time_cond_proj_dim=16 if kind == "lcm" else None,
    )
    vae = tiny_vae(sample_size)
    text_encoder, tokenizer = _text_encoder(sd2), _tokenizer(sd2)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=_scheduler(kind),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    pipeline_class = {"lcm": "LatentConsistencyModelPipeline", "inpaint": "StableDiffusionInpaintPipeline"}.get(kind)
    if pipeline_class:  # as such checkpoints ship: the pipeline class that knows their UNet's inputs
        index = json.loads((out / "model_index.json").read_text())
        index["_class_name"] = pipeline_class
        (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def _text_encoder(sd2: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu" if sd2 else "quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0 if sd2 else 49407,
        )
    )


def _tokenizer(sd2: bool) -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(CLIP_DIR, pad_token="!" if sd2 else "<|endoftext|>")


def _save_upscaler(out: Path, sample_size: int) -> Path:
    """The x4 upscaler in the shape diffusers' own StableDiffusionUpscalePipeline tests use (SD 2.x text side)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=sample_size // 4,
        in_channels=7,
        out_channels=4,
        block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        attention_head_dim=8,
        use_linear_projection=True,
        only_cross_attention=(True, True, False),
        cross_attention_dim=32,
        norm_num_groups=8,
        num_class_embeds=1000,  # as the real model: every noise level up to max_noise_level has an embedding
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size,
        scaling_factor=0.08333,
    )
    pipe = StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=_text_encoder(True),
        tokenizer=_tokenizer(True),
        unet=unet,
        low_res_scheduler=DDPMScheduler(**LOW_RES_SCHEDULE),
        scheduler=_scheduler("upscaler"),
        max_noise_level=MAX_NOISE_LEVEL,
    )
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def make_tiny_taesd(out: Path, *, levels: int = 4, seed: int = 0) -> Path:
    """A random diffusers AutoencoderTiny (TAESD's architecture) at toy width; `levels` stages: factor 2 ** (levels - 1)."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    tiny = AutoencoderTiny(
        encoder_block_out_channels=(8,) * levels,
        decoder_block_out_channels=(8,) * levels,
        num_encoder_blocks=(1,) * levels,
        num_decoder_blocks=(1,) * levels,
    )
    tiny.save_pretrained(out, safe_serialization=True)
    return out
