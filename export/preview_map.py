"""The latent preview map: a least-squares linear map from a model's latents to RGB, fitted at export on its own VAE,
so a bundle without a tiny decoder can still show the image forming (runtime.preview)."""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime.bundle.levers import PreviewInfo

FIT_SIZE = 128  # pixels: a linear map does not depend on the image size, and the VAE encoder is fully convolutional
FIT_IMAGES = 8


def synthetic_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """(n, 3, size, size) in [-1, 1]: smooth random colour fields with a few flat rectangles, the range of colours
    and the low-frequency content a preview shows."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(-1, 1, (n, 3, 4, 4))
    images = np.kron(coarse, np.ones((1, 1, size // 4, size // 4)))
    for img in images:
        for _ in range(3):
            y, x = rng.integers(0, size // 2, 2)
            img[:, y : y + size // 3, x : x + size // 3] = rng.uniform(-1, 1, (3, 1, 1))
    return images.astype(np.float32)


def fit_preview(vae: Any, factor: int) -> PreviewInfo:
    """Fit rgb = latents @ W + b per latent pixel: latents from the VAE encoder's posterior mean (scaled as the UNet
    sees them), targets the images averaged over each latent pixel's f x f patch, in [0, 1]."""
    import torch

    size = max(FIT_SIZE // factor, 2) * factor
    images = synthetic_images(FIT_IMAGES, size)
    with torch.no_grad():
        latents = vae.encode(torch.from_numpy(images)).latent_dist.mean.numpy() * float(vae.config.scaling_factor)
    n, c, h, w = latents.shape
    targets = (images.reshape(n, 3, h, factor, w, factor).mean(axis=(3, 5)) + 1) / 2
    x = np.concatenate([latents.transpose(0, 2, 3, 1).reshape(-1, c), np.ones((n * h * w, 1))], axis=1).astype(np.float64)
    y = targets.transpose(0, 2, 3, 1).reshape(-1, 3).astype(np.float64)
    solution = np.linalg.lstsq(x, y, rcond=None)[0]
    error = float(np.abs(np.clip(x @ solution, 0, 1) - y).mean())
    weights = tuple(tuple(round(float(v), 6) for v in row) for row in solution[:c])
    return PreviewInfo(weights, tuple(round(float(v), 6) for v in solution[c]), round(error, 5))
