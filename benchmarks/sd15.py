"""python -m benchmarks.sd15: a full-size Stable Diffusion 1.5-architecture pipeline with random weights.

The component configs are SD 1.5's public ones, written out by hand (no hub access here); the
tokenizer is the real CLIP vocabulary from assets/clip-tokenizer. The weights are random, so the
images are noise, but every tensor has SD 1.5's size: what a benchmark of speed and memory needs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from reference.architecture import CLIP_DIR

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "models-generated" / "sd15-random"

UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_scale_factor=1,
)
TEXT_ENCODER = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    layer_norm_eps=1e-5,
    # SD 1.5's text_encoder/config.json carries CLIP's legacy ids (eos 2: pooled output at the argmax token)
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=512,
    scaling_factor=0.18215,
)
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
)


# TAESD's published architecture (diffusers' AutoencoderTiny defaults, as madebyollin/taesd ships it): a decoder
# of 64-wide stages with 3, 3, 3 and 1 blocks, reading and writing SD's scaled latents.
TAESD = dict(
    latent_channels=4,
    encoder_block_out_channels=(64, 64, 64, 64),
    decoder_block_out_channels=(64, 64, 64, 64),
    num_encoder_blocks=(1, 3, 3, 3),
    num_decoder_blocks=(3, 3, 3, 1),
    scaling_factor=1.0,
)


def write_tiny_vae(out: Path, seed: int = 0) -> int:
    """A TAESD-architecture AutoencoderTiny with random weights at OUT; returns its parameter count."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    tiny = AutoencoderTiny(**TAESD)
    tiny.save_pretrained(out, safe_serialization=True)
    return sum(p.numel() for p in tiny.parameters())


def build_pipeline(seed: int = 0):
    """SD 1.5's components at full size, randomly initialised (torch's default init, seeded)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    return StableDiffusionPipeline(
        unet=UNet2DConditionModel(**UNET),
        vae=AutoencoderKL(**VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER)),
        tokenizer=CLIPTokenizer.from_pretrained(CLIP_DIR, pad_token="<|endoftext|>"),
        scheduler=PNDMScheduler(**SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def parameter_counts(pipe) -> dict[str, int]:
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("text_encoder", "unet", "vae")}


def write_model(out: Path, seed: int = 0, force: bool = False) -> dict[str, int]:
    """Save the pipeline (safetensors) to OUT; returns the parameter count per component."""
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    pipe = build_pipeline(seed)
    counts = parameter_counts(pipe)
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sd15", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model folder to write (default %(default)s, gitignored)")
    p.add_argument("--seed", type=int, default=0, help="torch seed for the random weights (default 0)")
    p.add_argument("--force", action="store_true", help="replace an existing folder")
    p.add_argument(
        "--tiny-vae", type=Path, metavar="DIR", help="also write a TAESD-architecture AutoencoderTiny (random) to DIR, for --tiny-vae"
    )
    args = p.parse_args(argv)
    if args.tiny_vae is not None and args.tiny_vae.exists() and any(args.tiny_vae.iterdir()) and not args.force:
        print(f"error: {args.tiny_vae} exists; pass --force to replace it", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        counts = write_model(args.out, args.seed, args.force)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in counts.items())
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s: {total} parameters")
    if args.tiny_vae is not None:
        if args.tiny_vae.exists():
            shutil.rmtree(args.tiny_vae)
        count = write_tiny_vae(args.tiny_vae, args.seed)
        print(f"wrote {args.tiny_vae}: AutoencoderTiny (TAESD architecture), {count / 1e6:.2f} M parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
