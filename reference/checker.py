"""Read an image's attributes back by plain image analysis (no learned model).

Built to judge generated images too, which are blurrier and noisier than the dataset: colours
are nearest-palette guesses from medians, and shape and size come from a soft (anti-aliasing
aware) coverage mask through features that blur barely moves (area, skewness, fill ratio).
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np

from reference.dataset import BACKGROUNDS, COLORS, IMAGE_SIZE, POSITIONS, SIZES, Attributes

# Below this RGB distance from the background nothing counts as an object.
MIN_CONTRAST = 40.0
# An up-pointing triangle's mass piles up at its base: vertical skewness -0.57 when sharp, about
# -0.3 after a 1.5 px blur, while circles and squares stay near 0.
TRIANGLE_MAX_SKEW = -0.15
# Fill ratio (area / (widest row * tallest column)): circle pi/4, square 1; blur keeps both.
CIRCLE_MAX_FILL = 0.89
# Area over squared bounding-box side, to turn a blur-proof area into a side length.
IDEAL_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": np.sqrt(3) / 4}
# Half-way between the small and large bounding-box sides.
LARGE_MIN_SIDE = (min(SIZES.values()) + max(SIZES.values())) / 2
# Width in px of the border ring whose median is taken as the background.
BORDER = 2


def _as_rgb255(image) -> np.ndarray:
    """(64, 64, 3) float array in [0, 255] from uint8, or from float in [0, 1]."""
    image = np.asarray(image)
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"expected an image of shape ({IMAGE_SIZE}, {IMAGE_SIZE}, 3), got {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float64)
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"expected uint8 or float pixels, got {image.dtype}")
    return np.clip(image.astype(np.float64), 0.0, 1.0) * 255.0


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = np.linalg.norm(np.array([palette[n] for n in names], dtype=np.float64) - rgb, axis=1)
    return names[int(np.argmin(distances))]


def _background_rgb(image: np.ndarray) -> np.ndarray:
    """Median of the border ring: objects may touch the edge but never cover much of it."""
    ring = np.ones(image.shape[:2], dtype=bool)
    ring[BORDER:-BORDER, BORDER:-BORDER] = False
    return np.median(image[ring], axis=0)


def _neighbours_max(mask: np.ndarray) -> np.ndarray:
    """For each pixel, the maximum over its 3x3 neighbourhood (grayscale dilation)."""
    padded = np.pad(mask, 1)  # zeros (False) outside: nothing spreads in from the frame
    h, w = mask.shape
    out = mask.copy()
    for dy in range(3):
        for dx in range(3):
            out = np.maximum(out, padded[dy : dy + h, dx : dx + w])
    return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of ``mask`` (drops specks of generation noise)."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        spread = np.where(mask, _neighbours_max(labels), 0)
        if np.array_equal(spread, labels):
            break
        labels = spread
    ids, counts = np.unique(labels[mask], return_counts=True)
    return labels == ids[np.argmax(counts)]


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        mask = _neighbours_max(mask)
    return mask


def _soft_mask(image: np.ndarray, region: np.ndarray, bg: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """Per-pixel object coverage in [0, 1]: the pixel's place on the background-to-object line."""
    axis = fg - bg
    alpha = (image - bg) @ axis / max(float(axis @ axis), 1e-6)
    return np.where(region, np.clip(alpha, 0.0, 1.0), 0.0)


def _vertical_skewness(alpha: np.ndarray) -> float:
    """Third standardised moment of the coverage's row profile (negative: bottom-heavy)."""
    profile = alpha.sum(axis=1)
    y = np.arange(len(profile)) + 0.5
    mean = float(profile @ y / profile.sum())
    var = float(profile @ (y - mean) ** 2 / profile.sum())
    return float(profile @ (y - mean) ** 3 / profile.sum()) / max(var, 1e-6) ** 1.5


def _shape_name(alpha: np.ndarray) -> str:
    if _vertical_skewness(alpha) < TRIANGLE_MAX_SKEW:
        return "triangle"
    # Widest row and tallest column of coverage: sub-pixel accurate, and blur only moves mass
    # along them for a circle or square.
    width = float(alpha.sum(axis=1).max())
    height = float(alpha.sum(axis=0).max())
    return "circle" if alpha.sum() / max(width * height, 1e-6) < CIRCLE_MAX_FILL else "square"


def _position_name(x: float, y: float) -> str:
    names = list(POSITIONS)
    centres = np.array([POSITIONS[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(np.linalg.norm(centres - (x, y), axis=1)))]


def _object_region(distance: np.ndarray, level: float) -> np.ndarray:
    """Pixels at least half as far from the background as the object's colour is: the object's extent."""
    return _largest_component(distance > level / 2)


def object_mask(image) -> np.ndarray:
    """(64, 64) bool: the pixels ``check`` takes for the object (all False where it finds none)."""
    image = _as_rgb255(image)
    distance = np.linalg.norm(image - _background_rgb(image), axis=-1)
    level = float(np.percentile(distance, 99.5))
    if level < MIN_CONTRAST:
        return np.zeros(distance.shape, dtype=bool)
    return _object_region(distance, level)


def iou(image, control) -> float:
    """Intersection over union of the object found in ``image`` with a white-on-black silhouette."""
    found, wanted = object_mask(image), _as_rgb255(control).mean(axis=-1) >= 127.5
    union = np.count_nonzero(found | wanted)
    return np.count_nonzero(found & wanted) / union if union else 1.0


def check(image) -> Attributes:
    """Best guess of the image's attributes; color, shape, size and position are None without an object."""
    image = _as_rgb255(image)
    bg = _background_rgb(image)
    background = _nearest(bg, BACKGROUNDS)
    distance = np.linalg.norm(image - bg, axis=-1)
    # A high percentile, not the max, so a few hot noise pixels cannot set the level.
    level = float(np.percentile(distance, 99.5))
    if level < MIN_CONTRAST:
        return Attributes(background=background, color=None, shape=None, size=None, position=None)

    hard = _object_region(distance, level)
    core = hard & (distance > 0.75 * level)
    fg = np.median(image[core if core.any() else hard], axis=0)
    color = _nearest(fg, COLORS)

    alpha = _soft_mask(image, _dilate(hard, 2), bg, fg)
    shape = _shape_name(alpha)
    # Blur moves coverage around but keeps its sum, so the side comes from the area.
    side = float(np.sqrt(alpha.sum() / IDEAL_FILL[shape]))
    size = "large" if side >= LARGE_MIN_SIDE else "small"

    ys, xs = np.nonzero(hard)
    position = _position_name((xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2)
    return Attributes(background=background, color=color, shape=shape, size=size, position=position)


def score(images, expected: list[Attributes]) -> dict[str, float]:
    """Per-attribute accuracy of ``check`` against ``expected``, plus "all" (all five right)."""
    if len(images) != len(expected):
        raise ValueError(f"got {len(images)} images but {len(expected)} expected attribute sets")
    if len(expected) == 0:
        raise ValueError("cannot score an empty set of images")
    names = [f.name for f in fields(Attributes)]
    hits = {name: 0 for name in names + ["all"]}
    for image, want in zip(images, expected):
        got = check(image)
        right = [getattr(got, n) == getattr(want, n) for n in names]
        for name, ok in zip(names, right):
            hits[name] += ok
        hits["all"] += all(right)
    return {name: count / len(expected) for name, count in hits.items()}
