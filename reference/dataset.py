"""The reference model's generated dataset: one coloured shape on a plain background per image.

The definition is a contract shared by training, evaluation and tests:

- 64x64 RGB uint8, one object per image, drawn at 4x and box-downsampled (anti-aliased);
- background exactly one of ``BACKGROUNDS``;
- object colour one of ``COLORS`` with each channel jittered by a uniform integer in [-10, 10];
- bounding-box side ``SIZES[size]`` jittered by a uniform integer in [-2, 2] px;
- shape: circle, axis-aligned square, or equilateral triangle pointing up whose base spans the
  bounding-box width (its height is side * sqrt(3) / 2);
- the centre of the object's bounding box at ``POSITIONS[position]`` jittered by a uniform
  integer in [-3, 3] px on each axis (coordinates are continuous: pixel i covers [i, i + 1)).

``make_dataset(n, seed)`` is deterministic: the same seed gives identical arrays, whatever the
worker count.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import os
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 64
SUPERSAMPLE = 4
COLOR_JITTER = 10
SIZE_JITTER = 2
POSITION_JITTER = 3
# Fixed so that each chunk's seed, and hence the dataset, does not depend on the worker count.
CHUNK_SIZE = 256

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 200),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, int] = {"small": 14, "large": 26}
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (16, 16),
    "top right": (48, 16),
    "bottom left": (16, 48),
    "bottom right": (48, 48),
    "center": (32, 32),
}


@dataclass(frozen=True)
class Attributes:
    """The five attributes that define one image (and its canonical caption)."""

    background: str
    color: str
    shape: str
    size: str
    position: str


def canonical_caption(a: Attributes) -> str:
    """The full caption, e.g. 'a small red circle in the top left on a black background'."""
    return f"a {a.size} {a.color} {a.shape} in the {a.position} on a {a.background} background"


def parse_caption(text: str) -> Attributes:
    """The Attributes whose canonical caption is ``text`` (the inverse of ``canonical_caption``)."""
    table = _canonical_table()
    if text not in table:
        raise ValueError(
            f"{text!r} is not a canonical caption; expected the form {canonical_caption(next(iter(table.values())))!r}"
        )
    return table[text]


@functools.cache
def _canonical_table() -> dict[str, Attributes]:
    every = itertools.product(BACKGROUNDS, COLORS, SHAPES, SIZES, POSITIONS)
    return {canonical_caption(a): a for a in (Attributes(*values) for values in every)}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _sentence_caption(a: Attributes, size: bool, position: bool, background: bool) -> str:
    noun = " ".join(([a.size] if size else []) + [a.color, a.shape])
    text = f"{_article(noun)} {noun}"
    if position:
        text += f" in the {a.position}"
    if background:
        text += f" on a {a.background} background"
    return text


def _list_caption(a: Attributes, size: bool, position: bool, background: bool) -> str:
    parts = [" ".join(([a.size] if size else []) + [a.color, a.shape])]
    if position:
        parts.append(a.position)
    if background:
        parts.append(f"{a.background} background")
    return ", ".join(parts)


def random_caption(a: Attributes, rng: np.random.Generator) -> str:
    """A training caption: canonical half the time, otherwise a shortened or reworded variant.

    Colour and shape are always named; size, position and background are each kept with
    probability 1/2 in the variants. Never empty (caption dropout is the trainer's job).
    """
    if rng.random() < 0.5:
        return canonical_caption(a)
    keep = rng.random(3) < 0.5
    form = _list_caption if rng.random() < 0.3 else _sentence_caption
    return form(a, bool(keep[0]), bool(keep[1]), bool(keep[2]))


def sample_attributes(rng: np.random.Generator) -> Attributes:
    """Draw each attribute uniformly and independently."""
    return Attributes(
        background=_choice(rng, tuple(BACKGROUNDS)),
        color=_choice(rng, tuple(COLORS)),
        shape=_choice(rng, SHAPES),
        size=_choice(rng, tuple(SIZES)),
        position=_choice(rng, tuple(POSITIONS)),
    )


def _choice(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _validate(a: Attributes) -> None:
    for field, table in (
        ("background", BACKGROUNDS),
        ("color", COLORS),
        ("shape", SHAPES),
        ("size", SIZES),
        ("position", POSITIONS),
    ):
        value = getattr(a, field)
        if value not in table:
            raise ValueError(f"unknown {field} {value!r}; choose one of {sorted(table)}")


def _shape_outline(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]]:
    """The shape's outline in supersampled pixel coordinates (corner points or bounding box)."""
    s = SUPERSAMPLE
    half = side / 2
    # PIL fills include their far edge, so right and bottom edges sit one supersampled pixel in.
    if shape == "triangle":
        half_h = side * math.sqrt(3) / 4
        return [
            (s * (cx - half), s * (cy + half_h) - 1),
            (s * (cx + half) - 1, s * (cy + half_h) - 1),
            (s * cx - 0.5, s * (cy - half_h)),
        ]
    return [(s * (cx - half), s * (cy - half)), (s * (cx + half) - 1, s * (cy + half) - 1)]


def render(a: Attributes, rng: np.random.Generator) -> np.ndarray:
    """Draw one (64, 64, 3) uint8 image of ``a``, with colour, size and position jitter from ``rng``."""
    _validate(a)
    color = _jittered_color(a.color, rng)
    side = SIZES[a.size] + int(rng.integers(-SIZE_JITTER, SIZE_JITTER + 1))
    x, y = POSITIONS[a.position]
    cx = x + int(rng.integers(-POSITION_JITTER, POSITION_JITTER + 1))
    cy = y + int(rng.integers(-POSITION_JITTER, POSITION_JITTER + 1))
    return _draw(a.shape, Placement(cx, cy, side), color, BACKGROUNDS[a.background])


def _jittered_color(name: str, rng: np.random.Generator) -> tuple[int, ...]:
    color = np.clip(np.array(COLORS[name]) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3), 0, 255)
    return tuple(int(c) for c in color)


def _draw(shape: str, at: Placement, fill: tuple[int, ...], background: tuple[int, ...]) -> np.ndarray:
    """One anti-aliased (64, 64, 3) uint8 image: ``shape`` filled with ``fill`` on ``background``."""
    big = IMAGE_SIZE * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(canvas)
    outline = _shape_outline(shape, at.cx, at.cy, at.side)
    if shape == "circle":
        draw.ellipse(outline, fill=fill)
    elif shape == "square":
        draw.rectangle(outline, fill=fill)
    else:
        draw.polygon(outline, fill=fill)
    small = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8)


# --- free placement: the ControlNet's data -------------------------------------------------------
# The five named positions and two sizes are all a caption can say; a control image can put the
# object anywhere. Sides are drawn from a continuous range and centres anywhere the bounding box
# stays inside the image, so a placement drawn for evaluation is (almost surely) one training
# never saw.
FREE_SIDE = (10.0, 40.0)


@dataclass(frozen=True)
class Placement:
    """Where an object's bounding box sits: centre (cx, cy) and side, in pixels (continuous)."""

    cx: float
    cy: float
    side: float


def sample_placement(rng: np.random.Generator) -> Placement:
    """A uniformly random side in ``FREE_SIDE`` and a centre keeping the bounding box in the image."""
    side = float(rng.uniform(*FREE_SIDE))
    cx, cy = rng.uniform(side / 2, IMAGE_SIZE - side / 2, 2)
    return Placement(float(cx), float(cy), side)


def control_caption(a: Attributes) -> str:
    """What a control image leaves to the prompt: colour, shape and background."""
    return _sentence_caption(a, size=False, position=False, background=True)


def silhouette(shape: str, at: Placement) -> np.ndarray:
    """The control image: the object white on black, (64, 64, 3) uint8, anti-aliased like the images."""
    return _draw(shape, at, (255, 255, 255), (0, 0, 0))


def render_placed(a: Attributes, at: Placement, rng: np.random.Generator) -> np.ndarray:
    """Draw ``a``'s colour, shape and background at ``at`` (its size and position are ignored)."""
    _validate(a)
    return _draw(a.shape, at, _jittered_color(a.color, rng), BACKGROUNDS[a.background])


def make_control_dataset(
    n: int, seed: int
) -> tuple[np.ndarray, np.ndarray, list[Attributes], list[Placement]]:
    """``n`` freely placed images, their silhouettes (both (n, 64, 64, 3) uint8), attributes and placements."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1 << 20,)))
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    controls = np.empty_like(images)
    attributes, placements = [], []
    for i in range(n):
        a, at = sample_attributes(rng), sample_placement(rng)
        images[i], controls[i] = render_placed(a, at, rng), silhouette(a.shape, at)
        attributes.append(a)
        placements.append(at)
    return images, controls, attributes, placements


def _make_chunk(seed: int, index: int, n: int) -> tuple[np.ndarray, list[Attributes]]:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    attributes = []
    for i in range(n):
        a = sample_attributes(rng)
        images[i] = render(a, rng)
        attributes.append(a)
    return images, attributes


def _make_chunk_args(args: tuple[int, int, int]) -> tuple[np.ndarray, list[Attributes]]:
    return _make_chunk(*args)


def make_dataset(n: int, seed: int, workers: int | None = None) -> tuple[np.ndarray, list[Attributes]]:
    """``n`` images (n, 64, 64, 3) uint8 and their attributes, deterministic from ``seed``.

    ``workers`` processes share the work (default: all CPUs); the result does not depend on it.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1 (or None for all CPUs), got {workers}")
    tasks = [(seed, i, min(CHUNK_SIZE, n - start)) for i, start in enumerate(range(0, n, CHUNK_SIZE))]
    workers = min(workers or os.cpu_count() or 1, len(tasks))
    if workers <= 1:
        chunks = [_make_chunk_args(t) for t in tasks]
    else:
        # spawn, not fork: a child forked from a process whose other threads hold locks (numpy's BLAS pool,
        # a loaded ONNX Runtime session or torch, a progress monitor) can wait on one of them forever, as a
        # dataset pool did in the test suite after export tests had run in the same process. The price:
        # spawn re-imports the caller's __main__, so a script calling this must guard its top level.
        with get_context("spawn").Pool(workers) as pool:
            chunks = pool.map(_make_chunk_args, tasks, chunksize=1)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    attributes: list[Attributes] = []
    for (chunk, attrs), (_, i, _) in zip(chunks, tasks):
        images[i * CHUNK_SIZE : i * CHUNK_SIZE + len(chunk)] = chunk
        attributes.extend(attrs)
    return images, attributes


def caption_grid(images: np.ndarray, captions: list[str], scale: int = 3, columns: int | None = None) -> Image.Image:
    """A labelled contact sheet: each image upscaled ``scale`` times with its caption beneath."""
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    if len(images) == 0:
        raise ValueError("no images to put in a grid")
    images = _to_uint8(images)
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    tile = images.shape[2] * scale
    font = ImageFont.load_default()
    chars_per_line = max(8, tile // 6)
    wrapped = [_wrap(c, chars_per_line) for c in captions]
    line_h = 11
    text_h = line_h * max(len(w) for w in wrapped) + 4
    # A grey sheet keeps white-background tiles distinguishable from the margins.
    sheet = Image.new("RGB", (columns * (tile + 4), rows * (images.shape[1] * scale + text_h + 4)), (200, 200, 200))
    draw = ImageDraw.Draw(sheet)
    for k, (image, lines) in enumerate(zip(images, wrapped)):
        x = (k % columns) * (tile + 4) + 2
        y = (k // columns) * (images.shape[1] * scale + text_h + 4) + 2
        up = Image.fromarray(image).resize((tile, images.shape[1] * scale), Image.Resampling.NEAREST)
        sheet.paste(up, (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + images.shape[1] * scale + 2 + j * line_h), line, fill="black", font=font)
    return sheet


def _to_uint8(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return (np.clip(images, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def main(argv: list[str] | None = None) -> None:
    """CLI: write a labelled sample grid of the dataset."""
    parser = argparse.ArgumentParser(
        prog="python -m reference.dataset", description="Inspect the reference model's generated dataset."
    )
    parser.add_argument("--grid", required=True, metavar="OUT.png", help="write a labelled sample grid PNG here")
    parser.add_argument("--n", type=int, default=36, help="number of samples in the grid (default 36)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    images, attributes = make_dataset(args.n, args.seed, workers=1)
    caption_grid(images, [canonical_caption(a) for a in attributes]).save(args.grid)
    print(f"wrote {args.grid} ({args.n} images, seed {args.seed})")


if __name__ == "__main__":
    main()
