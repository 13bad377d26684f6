"""Tiny Stable Diffusion pipelines: the real diffusers/transformers classes, small widths,
random weights, saved with save_pretrained. `kind` picks the family's shape:

- sd15: SD 1.5's block structure, epsilon, DDIM config as SD 1.x ships it (steps_offset 1)
- sd2: SD 2.x's linear-projection attention, v_prediction, "!" padding tokenizer
- turbo: SD-Turbo's Euler on trailing timesteps (run with no guidance, batch-B bundle)
- lcm: a UNet with time_cond_proj_dim (guidance embedding) and the LCM scheduler
- inpaint: SD 1.5's shape with a 9-channel UNet (latents, mask, masked-image latents), saved as an inpainting pipeline
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

CLIP_FIXTURE = Path(__file__).parent / "fixtures" / "clip"
SD1_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
KINDS = ("sd15", "sd2", "turbo", "lcm", "inpaint")


def _scheduler(kind: str) -> Any:
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, LCMScheduler

    if kind == "sd2":
        return DDIMScheduler(**SD1_SCHEDULE, prediction_type="v_prediction")
    if kind == "turbo":
        return EulerDiscreteScheduler.from_config(SD1_SCHEDULE, timestep_spacing="trailing")
    if kind == "lcm":
        return LCMScheduler.from_config(SD1_SCHEDULE, original_inference_steps=50)
    return DDIMScheduler(**SD1_SCHEDULE)


def make_tiny_sd(out: Path, *, seed: int = 0, kind: str = "sd15", sample_size: int = 64) -> Path:
    """Write a randomly initialised pipeline of the given family's shape to `out` and return it."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")
    torch.manual_seed(seed)
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
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size,
    )
    text_encoder = CLIPTextModel(
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
    tokenizer = CLIPTokenizer.from_pretrained(CLIP_FIXTURE, pad_token="!" if sd2 else "<|endoftext|>")
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
