"""How much each caption attribute moves the UNet's prediction: a cheap training-time check.

For one attribute at a time, the same noisy latents are denoised under captions that differ only
in that attribute (the other four held at a base value); the spread of the predictions across
its values, relative to the spread between the base caption and the empty one, says whether the
model listens to that word at all. A model that ignores position words scores ~0 there, long
before sampling and the checker could say so.

    python -m reference.probe --model models/shapes-ldm
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from reference.caption_bank import load_tokenizer, tokenize
from reference.dataset import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, Attributes, canonical_caption

BASE = Attributes(background="black", color="red", shape="circle", size="large", position="center")
VALUES = {"background": tuple(BACKGROUNDS), "color": tuple(COLORS), "shape": SHAPES, "size": tuple(SIZES), "position": tuple(POSITIONS)}
PROBE_T = 800  # high noise: where the layout of the image is decided


def probe_ids(tokenizer) -> dict[str, torch.Tensor]:
    """Token ids per attribute: one caption per value of it, the rest at BASE; '' for the unconditioned row."""
    ids = {name: tokenize(tokenizer, [canonical_caption(replace(BASE, **{name: v})) for v in values]) for name, values in VALUES.items()}
    ids["base"] = tokenize(tokenizer, [canonical_caption(BASE), ""])
    return {k: torch.from_numpy(v) for k, v in ids.items()}


@torch.no_grad()
def sensitivity(
    text_encoder, unet, ids: dict[str, torch.Tensor], abar: torch.Tensor, latent_shape: tuple[int, int, int], seed: int = 0, n: int = 8
) -> dict[str, float]:
    """Per attribute: mean over n noisy latents of the prediction's std across the attribute's values,
    divided by the mean |prediction(base caption) - prediction('')|."""
    device = next(unet.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    x0 = torch.randn(n, *latent_shape, generator=generator).to(device)
    noise = torch.randn(n, *latent_shape, generator=generator).to(device)
    a = abar[PROBE_T].to(device)
    zt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    t = torch.full((n,), PROBE_T, device=device)

    def predict(token_ids: torch.Tensor) -> torch.Tensor:
        """(captions, n, C, H, W): every caption on every latent."""
        context = text_encoder(input_ids=token_ids.to(device)).last_hidden_state
        return torch.stack([unet(zt, t, encoder_hidden_states=c.expand(n, -1, -1)).sample.float() for c in context])

    base, empty = predict(ids["base"])
    guidance = (base - empty).abs().mean().clamp_min(1e-12)
    return {name: float(predict(ids[name]).std(dim=0).mean() / guidance) for name in VALUES}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m reference.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("models/shapes-ldm"), help="diffusers model folder (default %(default)s)")
    args = p.parse_args(argv)
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel.from_pretrained(args.model / "text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(args.model / "unet").eval()
    abar = DDIMScheduler.from_pretrained(args.model / "scheduler").alphas_cumprod
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    scores = sensitivity(text_encoder, unet, probe_ids(load_tokenizer(args.model / "tokenizer")), abar, shape)
    for name, value in scores.items():
        print(f"{name:>10}: {value:.4f}")


if __name__ == "__main__":
    main()
