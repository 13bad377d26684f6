"""The reference model's training recipe: sizes, presets, pacing, captions, and real (quick) runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from reference.architecture import (
    CLIP_DIR,
    MAX_TOTAL_BYTES,
    TOKENIZER_FILES,
    build_text_encoder,
    size_report,
)
from reference.caption_bank import EMPTY, CaptionSampler, build_caption_bank, load_tokenizer
from reference.dataset import Attributes, canonical_caption
from reference.pacing import PhaseClock, learning_rate
from reference.phases import border_median, vae_loss
from reference.presets import PRESETS, resolve_recipe
from reference.train import main, pick_preset
from tests.helpers import REPO

PROMPT = "a large red circle in the top left on a black background"


def test_default_architecture_fits_the_size_budget():
    report = size_report()
    assert set(report.params) == {"vae", "text_encoder", "unet"}
    assert report.total_bytes == 4 * sum(report.params.values())
    assert report.total_bytes < MAX_TOTAL_BYTES == 25_000_000
    # The text encoder reads the real CLIP vocabulary, which dominates the size.
    assert report.params["text_encoder"] > 49408 * 64


def test_text_encoder_agrees_with_the_clip_tokenizer():
    config = build_text_encoder().config
    tokenizer = load_tokenizer()
    assert config.vocab_size == len(tokenizer) == 49408
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (49406, 49407, 49407)
    assert config.max_position_embeddings == tokenizer.model_max_length == 77


def test_missing_tokenizer_files_are_named(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        load_tokenizer(tmp_path)


def test_object_weighting_finds_the_background_even_under_a_corner_object():
    image = torch.full((1, 3, 64, 64), -1.0)
    image[:, 0, :30, :30] = 1.0  # a large red square over the top-left corner
    assert border_median(image).flatten().tolist() == [-1.0, -1.0, -1.0]
    recon = image.clone()
    recon[:, 0, 10, 10] = -1.0  # one wrong pixel on the object
    plain = vae_loss(recon, image, torch.zeros(1), kl_weight=0.0, edge_weight=0.0)
    weighted = vae_loss(recon, image, torch.zeros(1), kl_weight=0.0, edge_weight=0.0, object_weight=10.0)
    assert weighted.item() == pytest.approx(11 * plain.item())


def test_learning_rate_warms_up_then_anneals():
    lr = [learning_rate(1.0, s, s / 100, warmup_steps=10, min_ratio=0.1) for s in range(101)]
    assert lr[0] == pytest.approx(0.1)  # a tenth of the way through warmup, cosine still at 1
    assert max(lr) == pytest.approx(lr[9], rel=1e-3)
    assert lr[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lr[9:], lr[10:]))


def test_phase_clock_stops_on_steps_or_time():
    clock = PhaseClock(max_steps=10, seconds=None)
    assert not clock.done(9) and clock.done(10) and clock.stopped_by(10) == "steps"
    clock = PhaseClock(max_steps=10, seconds=5.0, start=clock.start - 6.0)
    assert clock.done(1) and clock.progress(1) == 1.0 and clock.stopped_by(1) == "time"
    # earlier phases used the whole budget: the phase is over, not unlimited
    assert PhaseClock(max_steps=10, seconds=0.0).done(0)


def test_presets_resolve_and_reject_nonsense():
    assert resolve_recipe("gpu", batch_size=64).batch_size == 64
    assert resolve_recipe("gpu", time_limit=None).time_limit is None
    assert PRESETS["quick"].time_limit is None
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        resolve_recipe("quick", batch_size=0)
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        resolve_recipe("fast")
    with pytest.raises(ValueError, match="contradicts --preset gpu"):
        pick_preset("gpu", quick=True, device_type="cpu")
    assert pick_preset(None, quick=False, device_type="cuda") == "gpu"
    assert pick_preset(None, quick=False, device_type="cpu") == "cpu"


def test_bad_command_lines_exit_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "m"), "--quick", "--time-limit", "-3"])
    assert "time limit must be > 0 seconds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "m"), "--quick", "--batch-size", "0"])
    assert "batch_size must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "m"), "--quick", "--t-min", "800"])
    assert "cannot train a model from scratch; give --init" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "m"), "--preset", "settle"])
    assert "--preset settle continues a trained model: give --init MODEL" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "m"), "--preset", "layout", "--init", str(tmp_path / "nothing")])
    assert "lacks ['vae', 'text_encoder', 'unet']" in capsys.readouterr().err
    shipped = str(REPO / "models" / "shapes-ldm")
    with pytest.raises(SystemExit):
        main(["--out", shipped, "--preset", "layout", "--init", shipped])
    assert "--out is --init" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "m"), "--quick", "--t-min", "1000", "--init", shipped])
    assert "t_min must be in [0, 1000), got 1000" in capsys.readouterr().err


def test_caption_sampler_draws_each_images_own_captions():
    a = Attributes(background="black", color="red", shape="circle", size="small", position="center")
    b = Attributes(background="white", color="blue", shape="square", size="large", position="top left")
    tokenizer = load_tokenizer()
    bank = build_caption_bank(tokenizer, [a, b, a], k=32, seed=0)
    assert bank.draws.shape == (2, 32) and list(bank.combination) == [0, 1, 0]
    ids = CaptionSampler(bank, dropout=0.0, device=torch.device("cpu"))(torch.tensor([2] * 64 + [1] * 64))
    assert ids.shape == (128, 77)
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    assert all("red circle" in t for t in texts[:64]) and all("blue square" in t for t in texts[64:])
    assert canonical_caption(a) in set(texts[:64]) and len(set(texts[:64])) > 3
    dropped = CaptionSampler(bank, dropout=0.5, device=torch.device("cpu"))(torch.zeros(2000, dtype=torch.long))
    empty = torch.from_numpy(bank.token_ids[EMPTY])
    share = (dropped == empty).all(dim=1).float().mean().item()
    assert 0.4 < share < 0.6


@pytest.fixture(scope="module")
def quick_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quick") / "shapes-ldm"
    main(["--out", str(out), "--quick", "--device", "cpu", "--workers", "1"])
    return out


@pytest.mark.slow
def test_quick_run_is_a_loadable_pipeline_that_generates(quick_model):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(quick_model, safety_checker=None)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    config = pipe.scheduler.config
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (config.steps_offset, config.set_alpha_to_one, config.clip_sample) == (1, False, False)
    assert (config.prediction_type, config.timestep_spacing) == ("epsilon", "leading")
    index = json.loads((quick_model / "model_index.json").read_text())
    assert index["requires_safety_checker"] is False and index["safety_checker"] == [None, None]
    for name in TOKENIZER_FILES:
        assert (quick_model / "tokenizer" / name).read_bytes() == (CLIP_DIR / name).read_bytes()
    log = json.loads((quick_model / "training_log.json").read_text())
    assert pipe.vae.config.scaling_factor == pytest.approx(log["phases"]["latents"]["scaling_factor"])

    images = pipe(
        PROMPT,
        num_inference_steps=2,
        guidance_scale=5.0,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all() and 0.0 <= images.min() and images.max() <= 1.0


@pytest.mark.slow
def test_quick_run_losses_fall_and_log_is_complete(quick_model):
    log = json.loads((quick_model / "training_log.json").read_text())
    assert log["status"] == "complete"
    for phase in ("vae", "unet"):
        losses = log["phases"][phase]["losses"]
        assert len(losses) == log["phases"][phase]["steps"] == getattr(PRESETS["quick"], f"{phase}_steps")
        tenth = max(1, len(losses) // 10)
        assert np.mean(losses[-tenth:]) < np.mean(losses[:tenth]), phase
    saved = sum(p.stat().st_size for p in quick_model.rglob("*.safetensors"))
    assert saved == log["total_weight_bytes"] < MAX_TOTAL_BYTES
    (probe,) = log["phases"]["unet"]["attribute_sensitivity"]  # the final checkpoint's
    assert probe["updates"] == PRESETS["quick"].unet_steps
    assert all(np.isfinite(probe[a]) and probe[a] >= 0 for a in ("background", "color", "shape", "size", "position"))


@pytest.mark.slow
def test_init_run_continues_a_model_on_high_noise_steps(quick_model, tmp_path):
    """Stage two of the recipe: the init's VAE kept byte for byte, its text encoder and UNet trained on."""
    from safetensors.torch import load_file

    out = tmp_path / "continued"
    main(["--out", str(out), "--quick", "--device", "cpu", "--workers", "1", "--init", str(quick_model), "--t-min", "800"])
    log = json.loads((out / "training_log.json").read_text())
    assert log["status"] == "complete" and log["recipe"]["t_min"] == 800 and "vae" not in log["phases"]
    assert log["init"]["model"] == str(quick_model)
    assert log["init"]["training_log"] == json.loads((quick_model / "training_log.json").read_text())
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert (out / vae).read_bytes() == (quick_model / vae).read_bytes()
    assert log["phases"]["latents"]["scaling_factor"] == log["init"]["training_log"]["phases"]["latents"]["scaling_factor"]
    assert len(log["phases"]["unet"]["losses"]) == PRESETS["quick"].unet_steps
    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        before, after = load_file(quick_model / name), load_file(out / name)
        assert before.keys() == after.keys()
        assert any(not torch.equal(before[k], after[k]) for k in before), f"{name} did not change"


def test_probe_shows_the_shipped_model_listens_to_every_attribute():
    """The shipped weights listen to all five caption attributes at high noise, position included."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from reference.caption_bank import load_tokenizer
    from reference.probe import probe_ids, sensitivity

    model = REPO / "models" / "shapes-ldm"
    text_encoder = CLIPTextModel.from_pretrained(model / "text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(model / "unet").eval()
    abar = DDIMScheduler.from_pretrained(model / "scheduler").alphas_cumprod
    with torch.no_grad():
        scores = sensitivity(text_encoder, unet, probe_ids(load_tokenizer(model / "tokenizer")), abar, (4, 16, 16))
    assert min(scores.values()) > 0.2, scores


@pytest.mark.slow
def test_time_limit_ends_phases_early_and_still_saves(tmp_path):
    out = tmp_path / "limited"
    main(
        ["--out", str(out), "--quick", "--device", "cpu", "--workers", "1", "--n-images", "64"]
        + ["--vae-steps", "100000", "--unet-steps", "100000", "--time-limit", "30"]
    )
    log = json.loads((out / "training_log.json").read_text())
    assert log["status"] == "complete"
    assert log["phases"]["vae"]["stopped_by"] == "time" and log["phases"]["unet"]["stopped_by"] == "time"
    assert {"unet", "vae", "text_encoder"} <= {p.parent.name for p in out.rglob("*.safetensors")}
