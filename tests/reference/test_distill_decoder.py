"""reference.distill_decoder: a quick run writes an AutoencoderTiny folder diffusers loads and export.build takes, with
its log; an occupied --out is refused; the shipped tiny decoder follows the full one closely."""

from __future__ import annotations

import json

import pytest

from reference.distill_decoder import LOG_NAME, main
from tests.helpers import REPO

SHIPPED = REPO / "models" / "shapes-ldm-taesd"


def test_quick_run_writes_a_loadable_autoencoder_tiny_and_its_log(tmp_path):
    from diffusers import AutoencoderTiny

    out = tmp_path / "taesd"
    main(["--out", str(out), "--quick", "--channels", "8"])
    tiny = AutoencoderTiny.from_pretrained(out)
    assert tiny.config.scaling_factor == 1.0 and tiny.config.decoder_block_out_channels == [8, 8, 8]  # the teacher's factor 4
    log = json.loads((out / LOG_NAME).read_text())
    assert log["status"] == "complete" and log["steps_done"] == 4 and log["recipe"]["channels"] == 8
    assert log["commands"] == [f"python -m reference.distill_decoder --out {out} --quick --channels 8"]
    with pytest.raises(SystemExit):
        main(["--out", str(out), "--quick"])  # not empty: never overwritten


def test_the_shipped_tiny_decoder_reproduces_its_logged_held_out_error():
    from diffusers import AutoencoderKL, AutoencoderTiny

    from reference.distill_decoder import PRESETS, held_out_error

    full, tiny = AutoencoderKL.from_pretrained(REPO / "models/shapes-ldm/vae"), AutoencoderTiny.from_pretrained(SHIPPED)
    log = json.loads((SHIPPED / LOG_NAME).read_text())
    measured = held_out_error(tiny, full, float(full.config.scaling_factor), PRESETS["cpu"])
    assert measured["mean_abs_pixel"] == pytest.approx(log["held_out"]["mean_abs_pixel"], abs=2e-4)
    assert measured["mean_abs_pixel"] < 0.02  # 1.24% of the pixel range when shipped; docs/speed-levers.md has what it costs
    assert log["commands"][0].startswith("python -m reference.distill_decoder")
