"""The reference dataset's contract (determinism, drawing, captions) and its attribute checker."""

import math

import numpy as np
import pytest
from PIL import Image, ImageFilter

from reference import checker, dataset
from reference.dataset import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    Attributes,
    canonical_caption,
    make_dataset,
    random_caption,
    render,
)

SEED = 11


@pytest.fixture(scope="module")
def sample():
    return make_dataset(300, SEED, workers=1)


class FixedJitter:
    """Stands in for a Generator: every jitter draw returns ``offset`` (clamped to its range)."""

    def __init__(self, offset: int):
        self.offset = offset

    def integers(self, low, high, size=None):
        value = min(max(self.offset, low), high - 1)
        return np.full(size, value) if size is not None else value


def coverage(image: np.ndarray, a: Attributes, color: np.ndarray) -> np.ndarray:
    """Per-pixel object coverage in [0, 1], known background and object colours."""
    bg = np.array(BACKGROUNDS[a.background], dtype=np.float64)
    axis = color - bg
    return np.clip((image.astype(np.float64) - bg) @ axis / (axis @ axis), 0, 1)


def object_pixels(image: np.ndarray, a: Attributes) -> np.ndarray:
    return np.any(image != np.array(BACKGROUNDS[a.background], dtype=np.uint8), axis=-1)


def interior(mask: np.ndarray, steps: int = 2) -> np.ndarray:
    for _ in range(steps):
        mask = mask & np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
    return mask


# --- determinism -------------------------------------------------------------------------------


def test_same_seed_gives_identical_arrays(sample):
    images, attributes = make_dataset(300, SEED, workers=1)
    np.testing.assert_array_equal(images, sample[0])
    assert attributes == sample[1]


def test_different_seed_gives_different_images(sample):
    images, attributes = make_dataset(300, SEED + 1, workers=1)
    assert not np.array_equal(images, sample[0])
    assert attributes != sample[1]


def test_worker_count_does_not_change_the_result(sample):
    # 300 images span two chunks, so two workers really split the work.
    images, attributes = make_dataset(300, SEED, workers=2)
    np.testing.assert_array_equal(images, sample[0])
    assert attributes == sample[1]


def test_prefix_of_a_larger_dataset_is_the_smaller_one(sample):
    images, attributes = make_dataset(40, SEED, workers=1)
    np.testing.assert_array_equal(images, sample[0][:40])
    assert attributes == sample[1][:40]


@pytest.mark.parametrize("kwargs, message", [({"n": -1}, "n must be >= 0"), ({"n": 4, "workers": 0}, "workers")])
def test_make_dataset_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_dataset(seed=0, **kwargs)


# --- drawing contract ----------------------------------------------------------------------------


def test_images_are_64x64_rgb_uint8(sample):
    images, attributes = sample
    assert images.shape == (300, 64, 64, 3) and images.dtype == np.uint8
    assert len(attributes) == 300


def test_attributes_cover_every_value(sample):
    attributes = sample[1]
    assert {a.background for a in attributes} == set(BACKGROUNDS)
    assert {a.color for a in attributes} == set(COLORS)
    assert {a.shape for a in attributes} == set(SHAPES)
    assert {a.size for a in attributes} == set(SIZES)
    assert {a.position for a in attributes} == set(POSITIONS)


def test_background_is_the_exact_palette_colour(sample):
    for image, a in zip(*sample):
        values, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
        assert tuple(values[np.argmax(counts)]) == BACKGROUNDS[a.background]


def test_object_interior_is_the_named_colour_within_jitter(sample):
    for image, a in zip(*sample):
        core = interior(object_pixels(image, a))
        mean = image[core].astype(np.float64).mean(axis=0)
        assert np.all(np.abs(mean - COLORS[a.color]) <= dataset.COLOR_JITTER), (a, mean)


def test_object_centre_and_side_are_within_jitter(sample):
    for image, a in zip(*sample):
        core = interior(object_pixels(image, a))
        alpha = coverage(image, a, image[core].astype(np.float64).mean(axis=0))
        ys, xs = np.nonzero(alpha > 0.5)
        # Half-level edges are exact to half a pixel; an object may also be cut by the frame by 1 px.
        x, y = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
        assert abs(x - POSITIONS[a.position][0]) <= dataset.POSITION_JITTER + 1, a
        assert abs(y - POSITIONS[a.position][1]) <= dataset.POSITION_JITTER + 1, a
        width = xs.max() - xs.min() + 1
        assert SIZES[a.size] - dataset.SIZE_JITTER - 1 <= width <= SIZES[a.size] + dataset.SIZE_JITTER, a


@pytest.mark.parametrize("size", list(SIZES))
def test_unjittered_shapes_have_exact_geometry(size):
    side = SIZES[size]
    for shape, expected_area in (("square", side**2), ("circle", math.pi * side**2 / 4), ("triangle", math.sqrt(3) / 4 * side**2)):
        a = Attributes("black", "blue", shape, size, "center")
        image = render(a, FixedJitter(0))
        alpha = coverage(image, a, np.array(COLORS["blue"], dtype=np.float64))
        ys, xs = np.nonzero(alpha > 0.5)
        assert (xs.min(), xs.max() + 1) == (32 - side // 2, 32 + side // 2), shape
        # PIL's polygon fill is a little generous at the edges, hence the looser triangle bound.
        assert alpha.sum() == pytest.approx(expected_area, rel=0.01 if shape != "triangle" else 0.04), shape
    square = render(Attributes("black", "blue", "square", size, "center"), FixedJitter(0))
    assert tuple(square[32, 32]) == COLORS["blue"]


def test_triangle_points_up():
    a = Attributes("white", "red", "triangle", "large", "center")
    rows = object_pixels(render(a, FixedJitter(0)), a).sum(axis=1)
    drawn = rows[rows > 0]
    assert drawn[0] <= 3 and drawn[-1] >= SIZES["large"] - 1
    assert np.all(np.diff(drawn) >= 0)


def test_jitter_extremes_move_grow_and_tint_the_object():
    a = Attributes("black", "green", "square", "small", "top left")
    image = render(a, FixedJitter(10))  # clamped: +10 colour, +2 side, +3 position
    ys, xs = np.nonzero(object_pixels(image, a))
    side = SIZES["small"] + dataset.SIZE_JITTER
    assert (xs.min(), xs.max() + 1) == (16 + 3 - side // 2, 16 + 3 + side // 2)
    assert (ys.min(), ys.max() + 1) == (16 + 3 - side // 2, 16 + 3 + side // 2)
    assert tuple(image[19, 19]) == tuple(c + 10 for c in COLORS["green"])


def test_render_rejects_unknown_attribute():
    with pytest.raises(ValueError, match="unknown color 'pink'"):
        render(Attributes("black", "pink", "circle", "small", "center"), np.random.default_rng(0))


def test_grid_cli_writes_a_labelled_png(tmp_path):
    out = tmp_path / "grid.png"
    dataset.main(["--grid", str(out), "--n", "4", "--seed", "3"])
    grid = Image.open(out)
    assert grid.width == 2 * (64 * 3 + 4)
    assert grid.height > 2 * 64 * 3  # room for the captions


# --- captions --------------------------------------------------------------------------------------


def test_canonical_caption_is_exact():
    a = Attributes("black", "red", "circle", "small", "top left")
    assert canonical_caption(a) == "a small red circle in the top left on a black background"


def test_parse_caption_inverts_the_canonical_caption(sample):
    for a in sample[1][:50]:
        assert dataset.parse_caption(canonical_caption(a)) == a
    with pytest.raises(ValueError, match="not a canonical caption"):
        dataset.parse_caption("a red circle")


def test_random_captions_always_name_colour_and_shape():
    rng = np.random.default_rng(0)
    a = Attributes("gray", "orange", "triangle", "large", "bottom right")
    captions = [random_caption(a, rng) for _ in range(400)]
    assert all(c and "orange" in c and "triangle" in c for c in captions)
    assert canonical_caption(a) in captions
    assert "an orange triangle" in captions
    assert "large orange triangle, bottom right, gray background" in captions
    # Variants drop size, position and background independently.
    assert len(set(captions)) >= 10


# --- checker -----------------------------------------------------------------------------------


def test_checker_reads_back_the_dataset(sample):
    accuracy = checker.score(*sample)
    assert set(accuracy) == {"background", "color", "shape", "size", "position", "all"}
    assert all(value >= 0.99 for value in accuracy.values()), accuracy


def test_checker_accepts_float_images(sample):
    images, attributes = sample
    for image, a in list(zip(images, attributes))[:20]:
        assert checker.check(image.astype(np.float32) / 255) == a


def test_checker_tolerates_blur_and_noise(sample):
    rng = np.random.default_rng(0)
    images, attributes = sample
    blurred = []
    for image in images[:100]:
        soft = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1.0)))
        blurred.append(np.clip(soft / 255 + rng.normal(0, 0.05, soft.shape), 0, 1))
    assert checker.score(blurred, attributes[:100])["all"] >= 0.95


def test_checker_finds_no_object_in_a_plain_image():
    got = checker.check(np.full((64, 64, 3), 255, dtype=np.uint8))
    assert got == Attributes("white", None, None, None, None)


def test_checker_scores_a_wrong_answer_as_wrong(sample):
    images, attributes = sample
    wrong = [Attributes(a.background, a.color, a.shape, "large" if a.size == "small" else "small", a.position) for a in attributes]
    accuracy = checker.score(images[:50], wrong[:50])
    assert accuracy["size"] == 0 and accuracy["all"] == 0 and accuracy["color"] == 1


def test_checker_rejects_bad_input():
    with pytest.raises(ValueError, match=r"shape \(64, 64, 3\)"):
        checker.check(np.zeros((32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="2 images but 1"):
        checker.score(np.zeros((2, 64, 64, 3), dtype=np.uint8), [Attributes("black", "red", "circle", "small", "center")])
