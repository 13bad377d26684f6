"""Images in and out of the pipelines: checked sizes, [-1, 1] tensors, binary masks, composites.

Conventions follow diffusers' VaeImageProcessor so runs can be compared with it: RGB in [0, 1]
becomes 2x - 1; masks become grayscale, then 1 where >= 0.5 (repaint) and 0 elsewhere (keep).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

OUTPUT_TYPES = ("pil", "np", "latent")
Rebuild = Callable[..., str]  # rebuild(**changed flags) -> the export.build line for the caller's bundle
ImageLike = Any  # a PIL image, an (H, W, C) / (B, H, W, C) array (uint8 0-255, or float 0-1), or a list of them


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type {output_type!r}: choose one of {OUTPUT_TYPES}")


def to_images(decoded: np.ndarray) -> np.ndarray:
    """VAE output (B, 3, H, W) in [-1, 1] -> float32 (B, H, W, 3) in [0, 1], as diffusers' postprocess."""
    images: np.ndarray = np.clip(decoded.astype(np.float32) / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    return images


def to_pil(images: np.ndarray) -> list[Any]:
    from PIL import Image

    return [Image.fromarray(im) for im in (images * 255).round().astype(np.uint8)]


def _as_arrays(
    image: ImageLike, mode: str, size: tuple[int, int], resize: bool, what: str, scale: int = 1, rebuild: Rebuild | None = None,
    option: str = "resize=True (CLI: --resize)",
) -> list[np.ndarray]:
    """Each image as float32 (H, W, C) in [0, 1], at `size` (height, width): resized only when asked.

    scale: the bundle's output size over its input size (the x4 upscaler: 4), for the rebuild hint;
    rebuild(**changed flags): the command that rebuilds the caller's bundle with them (runtime.bundle.rebuild_hint).
    """
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if len(items) == 1 and isinstance(items[0], np.ndarray) and items[0].ndim == 4:
        items = list(items[0])
    out = []
    for item in items:
        pil = _to_pil(item, mode, what)
        if (pil.height, pil.width) != size:
            if not resize:
                sized = {"height": pil.height * scale, "width": pil.width * scale}
                command = rebuild(**sized) if rebuild else f"python -m export.build --height {sized['height']} --width {sized['width']}"
                raise ValueError(
                    f"{what} is {pil.width}x{pil.height} (width x height) but this bundle's engines are built for "
                    f"{size[1]}x{size[0]}; pass {option} to resize it, or rebuild the bundle with `{command}`"
                )
            from PIL import Image

            pil = pil.resize((size[1], size[0]), Image.Resampling.LANCZOS)  # diffusers' default resample
        array = np.asarray(pil, dtype=np.float32) / 255.0
        out.append(array[..., None] if array.ndim == 2 else array)
    return out


def _to_pil(item: Any, mode: str, what: str) -> Any:
    """A PIL image or array as a PIL image in `mode`, 8 bits per channel; what cannot be converted exactly is refused.

    uint8 arrays are 0-255, uint16 arrays (and 16-bit PIL images) 0-65535, bool arrays 0/1, float arrays [0, 1];
    wider integers are refused (their range is not known), as are NaN, inf and floats outside [0, 1].
    """
    from PIL import Image

    if isinstance(item, Image.Image):
        if item.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
            array = np.asarray(item)
            if item.mode == "F":
                return _to_pil(array.astype(np.float32), mode, what)
            if array.size and (array.min() < 0 or array.max() > 65535):
                raise ValueError(
                    f"{what}: a 32-bit integer ({item.mode}) image with values {array.min()} to {array.max()}, outside the "
                    "16-bit range 0-65535; convert it to 8 or 16 bits first"
                )
            return _to_pil(array.astype(np.uint16), mode, what)
        try:
            return item.convert(mode)
        except (ValueError, OSError) as e:
            raise ValueError(f"{what}: a {item.mode} image cannot be converted to {mode} ({e}); convert it to RGB first") from None
    if not isinstance(item, np.ndarray) or item.ndim not in (2, 3):
        raise ValueError(
            f"{what}: expected a PIL image or an (H, W, C) numpy array, got {type(item).__name__} {getattr(item, 'shape', '')}"
        )
    if item.ndim == 3 and item.shape[2] not in (1, 3, 4):
        raise ValueError(f"{what}: an (H, W, C) array needs 1, 3 or 4 channels, got {item.shape[2]} (shape {item.shape})")
    if item.dtype == np.bool_:
        item = item.astype(np.uint8) * 255
    elif item.dtype == np.uint16:
        item = (item.astype(np.float32) / 65535.0 * 255).round().astype(np.uint8)
    elif np.issubdtype(item.dtype, np.floating):
        if not np.isfinite(item).all():
            raise ValueError(f"{what}: the float array holds NaN or inf; pass values in [0, 1]")
        if item.size and (item.min() < 0 or item.max() > 1):
            raise ValueError(
                f"{what}: a float array must hold values in [0, 1] (got {item.min():.3g} to {item.max():.3g}); "
                "pass uint8 for 0-255"
            )
        item = (np.clip(item, 0, 1) * 255).round().astype(np.uint8)
    elif item.dtype != np.uint8:
        raise ValueError(
            f"{what}: {item.dtype} arrays are not accepted (their value range is not known); pass uint8 (0-255), "
            "uint16 (0-65535), bool, or float in [0, 1]"
        )
    if item.ndim == 3 and item.shape[2] == 1:
        item = item[..., 0]
    return Image.fromarray(item).convert(mode)


def _batch(arrays: list[np.ndarray], batch: int, what: str) -> np.ndarray:
    if len(arrays) == 1:
        arrays = arrays * batch
    if len(arrays) != batch:
        raise ValueError(f"{what}: {len(arrays)} images for a bundle built with batch size {batch}; pass one, or exactly {batch}")
    stacked: np.ndarray = np.stack(arrays).transpose(0, 3, 1, 2)
    return stacked


def image_tensor(
    image: ImageLike,
    size: tuple[int, int],
    batch: int,
    *,
    resize: bool = False,
    what: str = "image",
    scale: int = 1,
    rebuild: Rebuild | None = None,
) -> np.ndarray:
    """RGB image(s) -> float32 (B, 3, H, W) in [-1, 1], the VAE encoder's (or the upscaler's) input."""
    return _batch(_as_arrays(image, "RGB", size, resize, what, scale, rebuild), batch, what) * 2.0 - 1.0


def control_tensor(image: ImageLike, size: tuple[int, int], batch: int, *, resize: bool = False, what: str = "control_image") -> np.ndarray:
    """A ControlNet's control image(s) -> float32 (B, 3, H, W) in [0, 1]: RGB, not normalised (diffusers' control_image_processor)."""
    arrays = _as_arrays(image, "RGB", size, resize, what, option="control_resize=True (CLI: --control-resize)")
    return _batch(arrays, batch, what)


def mask_tensor(
    mask: ImageLike, size: tuple[int, int], batch: int, *, resize: bool = False, rebuild: Rebuild | None = None
) -> np.ndarray:
    """Mask image(s) -> float32 (B, 1, H, W): grayscale, then 1 (repaint) where >= 0.5 of white, else 0 (keep)."""
    gray = _batch(_as_arrays(mask, "L", size, resize, "mask_image", rebuild=rebuild), batch, "mask_image")
    return (gray >= 0.5).astype(np.float32)


def downsample_nearest(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(B, C, H, W) -> (B, C, h, w) by nearest neighbour, picking rows floor(i * H / h) as torch's interpolate does."""
    rows = np.floor(np.arange(size[0]) * (x.shape[2] / size[0])).astype(int)
    cols = np.floor(np.arange(size[1]) * (x.shape[3] / size[1])).astype(int)
    return x[:, :, rows][:, :, :, cols]


def composite(generated: np.ndarray, original: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Pixels (B, H, W, 3) in [0, 1]: generated where mask (B, 1, H, W) is 1, the original elsewhere."""
    m = mask.transpose(0, 2, 3, 1)
    pixels: np.ndarray = generated * m + original * (1.0 - m)
    return pixels


def mask_coverage(mask: np.ndarray) -> Sequence[float]:
    """The fraction of each mask marked for repainting."""
    return [float(m.mean()) for m in mask]
