"""samples/edit.py: img2img and inpainting of a rectangle; the rectangle and the image are checked in one line."""

from __future__ import annotations

import numpy as np
from PIL import Image

from tests.helpers.close import assert_same_image
from tests.samples.common import one_error_line, png, run_sample


def test_with_no_image_it_draws_one_then_edits_it_both_ways(sample_bundle, sample_pipe, tmp_path):
    done = run_sample("edit.py", "--steps", 4, "--bundle", sample_bundle, "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit-img2img.png", "edit-inpaint.png", "edit-input.png", "edit-mask.png"]
    source, source_text = png(tmp_path / "edit-input.png")
    redrawn, redrawn_text = png(tmp_path / "edit-img2img.png")
    painted, painted_text = png(tmp_path / "edit-inpaint.png")
    mask, _ = png(tmp_path / "edit-mask.png")
    assert source.size == redrawn.size == painted.size == mask.size == (64, 64)
    assert source_text["prompt"] == "a large red circle in the center on a black background"
    assert (redrawn_text["task"], redrawn_text["strength"]) == ("img2img", "0.75")
    assert "Denoising strength: 0.75" in redrawn_text["parameters"]
    assert (painted_text["task"], painted_text["rect"], painted_text["prompt"]) == (
        "inpaint", "16,16,48,48", "a large blue square in the center on a black background",
    )  # fmt: skip

    # the mask: white exactly inside the default rectangle (the middle half), black outside
    inside = np.zeros((64, 64), bool)
    inside[16:48, 16:48] = True
    assert np.array_equal(np.asarray(mask) == 255, inside) and not np.asarray(mask)[~inside].any()
    # inpainting keeps every pixel outside the rectangle exactly, and changes the inside
    before, after = np.asarray(source), np.asarray(painted)
    assert np.array_equal(after[~inside], before[~inside]) and not np.array_equal(after[inside], before[inside])
    # img2img is the runtime's own on the same input
    expected = sample_pipe.img2img(redrawn_text["prompt"], source, strength=0.75, steps=4, seed=0)[0]
    assert_same_image(redrawn, expected, "the sample vs the runtime in this process")


def test_a_users_image_inpainted_in_a_given_rectangle(sample_bundle, tmp_path):
    image = tmp_path / "in.png"
    Image.new("RGBA", (64, 64), (128, 128, 128, 255)).save(image)  # RGBA: the sample converts to RGB
    out = tmp_path / "out"
    done = run_sample("edit.py", "a small green square in the top left on a gray background", "--image", image, "--rect", "0,0,20,24",
                      "--only", "inpaint", "--steps", 3, "--bundle", sample_bundle, "--out", out)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["edit-inpaint.png", "edit-mask.png"]
    painted, text = png(out / "edit-inpaint.png")
    assert text["rect"] == "0,0,20,24"
    keep = np.ones((64, 64), bool)
    keep[0:24, 0:20] = False
    assert (np.asarray(painted)[keep] == 128).all()


def test_a_rectangle_outside_the_image_is_one_line_before_anything_loads(tmp_path):
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 48)).save(image)
    line = one_error_line(run_sample("edit.py", "--image", image, "--rect", "10,10,70,40", "--bundle", tmp_path / "no-bundle"))
    assert line == "error: --rect 10,10,70,40 is not inside the 64x48 image: it needs 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 48"
    line = one_error_line(run_sample("edit.py", "--image", image, "--rect", "30,10,20,40", "--bundle", tmp_path / "no-bundle"))
    assert "is not inside the 64x48 image" in line  # x1 before x0
    line = one_error_line(run_sample("edit.py", "--rect", "1,2,3"))
    assert line == (
        "error: argument --rect: expected x0,y0,x1,y1 in pixels (four whole numbers), got '1,2,3' (see python samples/edit.py --help)"
    )


def test_a_bad_image_is_one_line(sample_bundle, tmp_path):
    line = one_error_line(run_sample("edit.py", "--image", tmp_path / "nope.png", "--bundle", sample_bundle, "--out", tmp_path / "o"))
    assert line == f"error: --image {tmp_path / 'nope.png'} does not exist"
    (tmp_path / "notes.png").write_text("not an image")
    line = one_error_line(run_sample("edit.py", "--image", tmp_path / "notes.png", "--bundle", sample_bundle, "--out", tmp_path / "o"))
    assert line.endswith("is not an image file PIL can read")
    big = tmp_path / "big.png"
    Image.new("RGB", (100, 80)).save(big)
    line = one_error_line(run_sample("edit.py", "--image", big, "--only", "img2img", "--bundle", sample_bundle, "--out", tmp_path / "o"))
    assert "is 100x80" in line and "64x64" in line and "--resize" in line  # the runtime's own message
    done = run_sample("edit.py", "--image", big, "--resize", "--steps", 2, "--bundle", sample_bundle, "--out", tmp_path / "o")
    assert done.returncode == 0, done.stderr
    assert png(tmp_path / "o" / "edit-inpaint.png")[0].size == (64, 64)
