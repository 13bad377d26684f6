"""Test helper: a diffusers Stable Diffusion folder -> one state dict in the original LDM/CompVis key layout.

diffusers ships no saver to the original layout (its scripts/convert_diffusers_to_original_stable_diffusion.py
is not in the wheel), so this is the inverse of the key mapping in diffusers.loaders.single_file_utils
(convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint, convert_open_clip_checkpoint),
for the keys SD 1.x/2.x models have. It works on any widths, so a tiny model becomes a tiny single-file checkpoint;
`ldm_shapes` applies the same mapping to shapes alone (meta tensors), for full-size checkpoints without their weights.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}  # fmt: skip
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2", "conv_in": "input_blocks.0.0",
            "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{RESNET.get(head, head)}.{tail}"


def unet_to_ldm(sd: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """UNet2DConditionModel keys -> model.diffusion_model.* (input_blocks, middle_block, output_blocks)."""
    per = config["layers_per_block"] + 1  # LDM blocks per level: the layers, then a down/upsampler
    attn_levels = {i for i, t in enumerate(config["up_block_types"]) if t.startswith("CrossAttn")}
    out: dict[str, Any] = {}
    for key, value in sd.items():
        new = None
        for d, o in UNET_TOP.items():
            if key.startswith(d + "."):
                new = o + key[len(d) :]
        if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.0.{_resnet(m[3])}"
        elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            new = f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{1 + int(m[1]) * per + per - 1}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"output_blocks.{int(m[1]) * per + int(m[2])}.0.{_resnet(m[3])}"
        elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            new = f"output_blocks.{int(m[1]) * per + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            level = int(m[1])
            new = f"output_blocks.{level * per + per - 1}.{2 if level in attn_levels else 1}.conv.{m[2]}"
        if new is None:
            raise KeyError(f"no LDM name for UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(sd: Mapping[str, Any], config: Mapping[str, Any], reshape: Any) -> dict[str, Any]:
    """AutoencoderKL keys -> first_stage_model.*; the mid-block attention's linear weights become 1x1 convs."""
    levels = len(config["up_block_types"])
    out: dict[str, Any] = {}
    for key, value in sd.items():
        new = key.replace("conv_norm_out", "norm_out")
        if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{VAE_ATTN[m[2]]}.{m[3]}"
            if m[3] == "weight" and m[2] != "group_norm":
                value = reshape(value)
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(.+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(.+)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
        out["first_stage_model." + new.replace("conv_shortcut", "nin_shortcut")] = value
    return out


def clip_to_ldm(sd: Mapping[str, Any]) -> dict[str, Any]:
    """SD 1.x: transformers' CLIPTextModel keys under cond_stage_model.transformer.text_model."""
    return {"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v for k, v in sd.items()}


def open_clip_to_ldm(sd: Mapping[str, Any], cat: Any, projection: Any) -> dict[str, Any]:
    """SD 2.x: OpenCLIP's names (resblocks, ln_1, attn.in_proj_*: q, k and v stacked) under cond_stage_model.model."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out: dict[str, Any] = {}
    top = {"embeddings.token_embedding.weight": "token_embedding.weight", "embeddings.position_embedding.weight": "positional_embedding",
           "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}  # fmt: skip
    for key, value in sd.items():
        if key in top:
            out[top[key]] = value
            continue
        m = re.match(r"encoder\.layers\.(\d+)\.(.+)", key)
        if m is None:
            if key.endswith("position_ids"):
                continue
            raise KeyError(f"no OpenCLIP name for text encoder key {key}")
        block, rest = f"transformer.resblocks.{m[1]}", m[2]
        if q := re.match(r"self_attn\.q_proj\.(weight|bias)", rest):
            kind = q[1]
            parts = [sd[f"encoder.layers.{m[1]}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{block}.attn.in_proj_{kind}"] = cat(parts)
            continue
        if re.match(r"self_attn\.[kv]_proj\.", rest):
            continue
        rest = rest.replace("self_attn.", "attn.").replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2")
        out[f"{block}.{rest.replace('mlp.fc1', 'mlp.c_fc').replace('mlp.fc2', 'mlp.c_proj')}"] = value
    out["text_projection"] = projection
    return {"cond_stage_model.model." + k: v for k, v in out.items()}


def ldm_state_dict(folder: Path) -> dict[str, Any]:
    """The tensors of a diffusers SD folder (plain weights) in the original single-file layout."""
    import json

    import torch
    from safetensors.torch import load_file

    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    te = load_file(folder / "text_encoder" / "model.safetensors")
    state = unet_to_ldm(load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"), unet_config)
    state |= vae_to_ldm(load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"), vae_config, lambda w: w[:, :, None, None])
    if unet_config.get("use_linear_projection"):  # SD 2.x: OpenCLIP
        hidden = te["embeddings.token_embedding.weight" if "embeddings.token_embedding.weight" in te else
                    "text_model.embeddings.token_embedding.weight"].shape[1]  # fmt: skip
        state |= open_clip_to_ldm(te, lambda parts: torch.cat(parts, 0), torch.eye(hidden))
    else:
        state |= clip_to_ldm(te)
    return {k: v.contiguous() for k, v in state.items()}


def save_single_file(folder: Path, out: Path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    save_file(ldm_state_dict(folder), str(out), metadata=metadata)
    return out


def ldm_shapes(config_folder: Path, *, text_layers: int | None = None) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the full-size single-file checkpoint a diffusers config folder describes (meta tensors: no memory).

    text_layers: the checkpoint's text encoder depth where it differs from the config's (SD 2.x: 24 in the file, 23 used).
    """
    import json

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_folder / "vae"))
        te_config = CLIPTextConfig.from_dict(json.loads((config_folder / "text_encoder" / "config.json").read_text()))
        if text_layers is not None:
            te_config.num_hidden_layers = text_layers
        te = CLIPTextModel(te_config)
    state = unet_to_ldm(unet.state_dict(), unet.config)
    state |= vae_to_ldm(vae.state_dict(), vae.config, lambda w: w[:, :, None, None])
    if unet.config.use_linear_projection:
        hidden = te_config.hidden_size
        state |= open_clip_to_ldm(te.state_dict(), lambda parts: torch.cat(parts, 0), torch.empty(hidden, hidden, device="meta"))
    else:
        state |= clip_to_ldm(te.state_dict())
    return {k: tuple(v.shape) for k, v in state.items()}
