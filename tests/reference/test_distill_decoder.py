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
    main(["--out", str(out), "--quick"])
    tiny = AutoencoderTiny.from_pretrained(out)
    assert tiny.config.scaling_factor == 1.0 and len(tiny.config.decoder_block_out_channels) == 3  # the teacher's factor 4
    log = json.loads((out / LOG_NAME).read_text())
    assert log["status"] == "complete" and log["steps_done"] == 4
    assert log["commands"] == [f"python -m reference.distill_decoder --out {out} --quick"]
    with pytest.raises(SystemExit):
        main(["--out", str(out), "--quick"])  # not empty: never overwritten


def test_the_shipped_tiny_decoder_follows_the_full_one():
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny

    from reference.dataset import make_dataset

    full, tiny = AutoencoderKL.from_pretrained(REPO / "models/shapes-ldm/vae"), AutoencoderTiny.from_pretrained(SHIPPED)
    images, _ = make_dataset(8, seed=4242, workers=1)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        latents = full.encode(pixels).latent_dist.mean * full.config.scaling_factor
        ours = tiny.decode(latents).sample.clamp(-1, 1)
        ref = full.decode(latents / full.config.scaling_factor).sample.clamp(-1, 1)
    error = float((ours - ref).abs().mean()) / 2
    assert error < 0.03, f"mean abs pixel error {error:.4f}"
    assert json.loads((SHIPPED / LOG_NAME).read_text())["commands"][0].startswith("python -m reference.distill_decoder")
