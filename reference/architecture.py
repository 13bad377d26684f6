"""The reference model's architecture: Stable Diffusion 1.x classes at toy widths.

64x64 RGB images, a 3-level VAE (downscale 4, 16x16x4 latents), a CLIP text encoder that
reads the real CLIP vocabulary, and an SD 1.x-shaped UNet. The sizes are chosen so the saved
fp32 weights stay under ``MAX_TOTAL_BYTES``; the 49408-row token embedding alone is half of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_SIZE = 64
LATENT_CHANNELS = 4
VAE_WIDTHS = (32, 64, 64)
LATENT_SIZE = IMAGE_SIZE // 2 ** (len(VAE_WIDTHS) - 1)

# The CLIP tokenizer's vocabulary and special ids; the text encoder must agree with them.
CLIP_VOCAB_SIZE = 49408
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407
CLIP_PAD_ID = 49407
MAX_TOKENS = 77
TEXT_HIDDEN = 64
# The real CLIP vocabulary (assets/clip-tokenizer at the repository root; tests and benchmarks read it
# from here too); copied into every saved model.
CLIP_DIR = Path(__file__).resolve().parent.parent / "assets" / "clip-tokenizer"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")

# Where a saved model (python -m reference.train) keeps each component's weights.
WEIGHT_FILES = {
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
    "unet": "unet/diffusion_pytorch_model.safetensors",
}

MAX_TOTAL_BYTES = 25_000_000
BYTES_PER_PARAM = 4  # fp32


def vae_config() -> dict:
    """AutoencoderKL config: 3 levels (32, 64, 64), one resnet per level, 4 latent channels."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_WIDTHS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_WIDTHS),
        block_out_channels=VAE_WIDTHS,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=32,
        sample_size=IMAGE_SIZE,
    )


def text_encoder_config() -> dict:
    """CLIPTextConfig kwargs: the real CLIP vocabulary and ids, 2 narrow layers."""
    return dict(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="quick_gelu",
        projection_dim=TEXT_HIDDEN,
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=CLIP_PAD_ID,
    )


def unet_config() -> dict:
    """UNet2DConditionModel config: SD 1.x block types over 3 levels (16, 8, 4 latent pixels)."""
    widths = (48, 64, 64)
    return dict(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D",) * (len(widths) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(widths) - 1),
        block_out_channels=widths,
        layers_per_block=1,
        # 48 channels are not divisible by SD's 32 groups.
        norm_num_groups=16,
        # diffusers reads this as heads per level (an SD 1.x naming quirk): 16-dim heads
        # everywhere, a multiple of 8 so CUDA's fused attention kernels apply.
        attention_head_dim=tuple(w // 16 for w in widths),
        cross_attention_dim=TEXT_HIDDEN,
    )


def scheduler_config() -> dict:
    """DDIMScheduler config with Stable Diffusion 1.x's settings (also the training noise schedule)."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
        timestep_spacing="leading",
    )


def build_vae():
    """A freshly initialised AutoencoderKL."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**vae_config())


def build_text_encoder():
    """A freshly initialised CLIPTextModel."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**text_encoder_config()))


def build_unet():
    """A freshly initialised UNet2DConditionModel."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_config())


def parameter_count(module) -> int:
    """Number of parameters (what the saved state holds, buffers aside)."""
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class SizeReport:
    """Parameter counts per component and the fp32 bytes they take."""

    params: dict[str, int]

    @property
    def total_bytes(self) -> int:
        return BYTES_PER_PARAM * sum(self.params.values())

    def lines(self) -> list[str]:
        """Human-readable rows, one per component plus the total."""
        rows = [f"{name:>12}: {n / 1e6:6.3f} M params, {BYTES_PER_PARAM * n / 1e6:6.2f} MB" for name, n in self.params.items()]
        rows.append(f"{'total':>12}: {sum(self.params.values()) / 1e6:6.3f} M params, {self.total_bytes / 1e6:6.2f} MB")
        return rows


def size_report(vae=None, text_encoder=None, unet=None) -> SizeReport:
    """Parameter counts of the given models (the default architecture where one is omitted)."""
    models = {
        "vae": vae if vae is not None else build_vae(),
        "text_encoder": text_encoder if text_encoder is not None else build_text_encoder(),
        "unet": unet if unet is not None else build_unet(),
    }
    return SizeReport({name: parameter_count(m) for name, m in models.items()})
