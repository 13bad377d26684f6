"""Tiny ControlNets for the tiny pipelines: diffusers' ControlNetModel.from_unet with random weights.

from_unet starts the zero convolutions at zero, so a fresh net changes nothing; here they get random
weights, so that parity tests see residuals that move the image.
"""

from __future__ import annotations

from pathlib import Path


def make_tiny_controlnet(model: Path, out: Path, *, seed: int = 0, gain: float = 0.3) -> Path:
    """A random ControlNet for the pipeline folder `model` (its UNet's shape, its VAE's factor), saved at `out`."""
    import json

    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    levels = len(json.loads((model / "vae" / "config.json").read_text())["block_out_channels"])
    # an LCM UNet's guidance embedding has no counterpart in a ControlNet: start it fresh rather than copy the UNet
    copy = unet.config.time_cond_proj_dim is None
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8,) * levels, load_weights_from_unet=copy)
    with torch.no_grad():
        # torch's default init shrinks the signal at each of the embedding's convs, so that, left as it is, the control
        # image moved the residuals by 1e-5 of their size and a test could not tell one control image from another
        embedding = net.controlnet_cond_embedding
        for conv in (embedding.conv_in, *embedding.blocks):
            conv.weight.normal_(0.0, (2.0 / conv.weight[0].numel()) ** 0.5)  # He et al. 2015: the image's signal survives
        zero = [*net.controlnet_down_blocks, net.controlnet_mid_block, embedding.conv_out]
        for conv in zero:
            conv.weight.normal_(0.0, gain / conv.weight[0].numel() ** 0.5)
            conv.bias.normal_(0.0, 0.1 * gain)
        embedding.conv_out.weight.mul_(4.0)  # the drawn image's share of what the net adds to the latents: as large as the rest
    net.save_pretrained(out, safe_serialization=True)
    return out
