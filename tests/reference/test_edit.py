"""The reference model's edit demo: its mask covers the object it replaces, and the command writes its results."""

from __future__ import annotations

import json

import numpy as np

from reference import edit_demo
from reference.dataset import BACKGROUNDS, render, sample_attributes


def test_edit_box_covers_every_object_the_dataset_draws():
    rng = np.random.default_rng(0)
    for _ in range(300):
        a = sample_attributes(rng)
        image = render(a, rng).astype(int)
        drawn = np.abs(image - np.array(BACKGROUNDS[a.background])).sum(axis=-1) > 0
        outside = edit_demo.box_mask(a) == 0
        assert not (drawn & outside).any(), f"{a}: object pixels outside the edit box"


def test_cases_ask_for_a_new_colour_and_shape_and_are_deterministic():
    first, again = edit_demo.cases(20, seed=3), edit_demo.cases(20, seed=3)
    for (image, a, want), (image2, _, _) in zip(first, again):
        np.testing.assert_array_equal(image, image2)
        assert want.color != a.color and want.shape != a.shape
        assert (want.background, want.size, want.position) == (a.background, a.size, a.position)


def test_demo_writes_table_json_and_grids(bundle_fp32, tmp_path):
    edit_demo.main(["--bundle", str(bundle_fp32), "--n", "2", "--steps", "2", "--strength", "0.5", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert list(rows) == ["inpaint: new colour and shape in a box", "img2img strength 0.5: new colour"]
    assert rows["inpaint: new colour and shape in a box"]["unchanged_outside_mask"] == 100.0
    assert all(0 <= v <= 100 for m in rows.values() for k, v in m.items() if k != "sec_per_image")
    assert (tmp_path / "results.md").read_text().count("\n| ") == 3
    assert (tmp_path / "grid_inpaint.png").is_file() and (tmp_path / "grid_img2img_0.5.png").is_file()
