"""The evaluation harness: FID / IS maths, the classifier, and end-to-end runs with fake generators."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from reference import classifier, evaluate
from reference.dataset import Attributes, canonical_caption, make_dataset, parse_caption, render
from reference.evaluate import Setting

N = 120


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These models are tiny; on a busy 2-core machine a second thread only adds contention."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model():
    return classifier.load()


@pytest.fixture(scope="module")
def real(model):
    return evaluate.real_statistics(model, n=600)


def dataset_generator(prompts, setting, seed):
    """A perfect generator: draws each prompt's attributes with the dataset's own renderer."""
    rng = np.random.default_rng(seed)
    return np.stack([render(parse_caption(p), rng) for p in prompts]).astype(np.float32) / 255


def noise_generator(prompts, setting, seed):
    return np.random.default_rng(seed).random((len(prompts), 64, 64, 3), dtype=np.float32)


# --- metrics ---------------------------------------------------------------------------------------


def test_frechet_distance_of_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(8, 8))
    cov = a @ a.T
    assert evaluate.frechet_distance(np.ones(8), cov, np.ones(8), cov) == pytest.approx(0, abs=1e-8)


def test_frechet_distance_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    cov1, cov2 = a @ a.T, b @ b.T + np.eye(6)
    mean1, mean2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mean1 - mean2) ** 2) + np.trace(cov1 + cov2 - 2 * linalg.sqrtm(cov1 @ cov2).real)
    assert evaluate.frechet_distance(mean1, cov1, mean2, cov2) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_shifted_isotropic_gaussians():
    # Means 3 apart, variances 1 and 4 in 2 dims: 9 + 2 * (1 + 4 - 2 * 2) = 11.
    d = evaluate.frechet_distance(np.zeros(2), np.eye(2), np.array([3.0, 0.0]), 4 * np.eye(2))
    assert d == pytest.approx(11.0)


def test_inception_score_counts_confident_distinct_classes():
    one_hot = np.eye(3)
    # Four images, confidently in four distinct joint classes of two heads (3 x 3 classes).
    probs = [one_hot[[0, 1, 2, 0]], one_hot[[0, 1, 2, 1]]]
    assert evaluate.inception_score(probs) == pytest.approx(4.0, rel=1e-6)
    same = [one_hot[[0, 0, 0, 0]], one_hot[[1, 1, 1, 1]]]
    assert evaluate.inception_score(same) == pytest.approx(1.0, rel=1e-6)
    unsure = [np.full((4, 3), 1 / 3), np.full((4, 3), 1 / 3)]
    assert evaluate.inception_score(unsure) == pytest.approx(1.0, rel=1e-6)


def test_fid_needs_two_images():
    with pytest.raises(ValueError, match="at least 2 images"):
        evaluate.gaussian(np.zeros((1, 4)))


# --- classifier --------------------------------------------------------------------------------------


def test_committed_classifier_is_small_and_accurate(model):
    assert classifier.DEFAULT_WEIGHTS.stat().st_size < 1_000_000
    images, attributes = make_dataset(500, 4242)
    scores = classifier.accuracy(classifier.classify(classifier.predict(model, images)[1]), attributes)
    assert all(v >= 0.99 for v in scores.values()), scores


def test_classifier_features_have_the_documented_width(model):
    features, probs = classifier.predict(model, make_dataset(3, 5)[0])
    assert features.shape == (3, classifier.FEATURE_DIM)
    assert [p.shape[1] for p in probs] == [len(names) for names in classifier.HEADS.values()]
    np.testing.assert_allclose([p.sum(axis=1) for p in probs], 1.0, rtol=1e-6)


def test_classifier_training_lowers_the_loss():
    losses = []

    def log(line):
        losses.append(float(line.rsplit("loss ", 1)[1]))

    model = classifier.train(n=256, epochs=3, batch_size=16, log=log, log_every=12)
    assert isinstance(model, classifier.AttributeNet) and not model.training
    assert len(losses) == 4
    # Five heads start near sum(log classes) = 6.2 nats.
    assert losses[0] > 4.5 and losses[-1] < 0.6 * losses[0]


def test_classifier_round_trips_through_safetensors(model, tmp_path):
    path = tmp_path / "c.safetensors"
    classifier.save(model, path, {"note": "test"})
    again = classifier.load(path)
    x = classifier.to_tensor(make_dataset(4, 6)[0])
    np.testing.assert_allclose(again.features(x).detach().numpy(), model.features(x).detach().numpy(), atol=1e-6)


def test_classifier_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"shape \(B, 64, 64, 3\)"):
        classifier.to_tensor(np.zeros((2, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(FileNotFoundError, match="python -m reference.classifier --out"):
        classifier.load(tmp_path / "missing.safetensors")


# --- end to end ------------------------------------------------------------------------------------


def test_dataset_images_score_perfectly_and_noise_does_not(model, real, tmp_path):
    settings = [Setting("ddim", 50, 3.0)]
    (_, good), = evaluate.evaluate(dataset_generator, settings, n=N, seed=1, model=model, real=real, log=lambda _: None)
    (_, bad), = evaluate.evaluate(noise_generator, settings, n=N, seed=1, model=model, real=real, log=lambda _: None)
    for key in ("background", "color", "shape", "size", "position", "all", "classifier_all"):
        assert good[key] >= 0.99, (key, good)
    assert bad["all"] <= 0.05 and bad["classifier_all"] <= 0.05
    # Real-vs-real FID is small-sample bias only; noise is far off the feature distribution.
    assert good["fid"] < 0.1 * bad["fid"]
    assert bad["fid"] > 100
    assert good["is"] > 20 * bad["is"]


def test_evaluate_writes_table_json_and_grids(model, real, tmp_path):
    settings = [Setting("ddim", 10, 1.0), Setting("ddim", 10, 5.0)]
    lines = []
    rows = evaluate.evaluate(dataset_generator, settings, n=8, seed=2, out=tmp_path, model=model, real=real, grid_n=4, log=lines.append)
    assert [s for s, _ in rows] == settings
    assert lines[0].startswith("real-vs-real FID at n=8")
    assert "guidance=5" in lines[2]
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[2].startswith("| scheduler | steps | guidance | bg |")
    assert table[4].startswith("| ddim | 10 | 1 | 100.0 |") and table[5].startswith("| ddim | 10 | 5 |")
    summary = json.loads((tmp_path / "results.json").read_text())
    assert [r["guidance"] for r in summary["results"]] == [1.0, 5.0]
    assert summary["results"][0]["fid"] == pytest.approx(rows[0][1]["fid"])
    grid = Image.open(tmp_path / "grid_ddim_10steps_g5.png")
    assert grid.width == 2 * (64 * 3 + 4)


def test_every_setting_gets_the_same_prompts_and_seed(model, real):
    calls = []

    def recording(prompts, setting, seed):
        calls.append((tuple(prompts), seed))
        return dataset_generator(prompts, setting, seed)

    evaluate.evaluate(recording, [Setting("ddim", 5, 1), Setting("ddim", 5, 8)], n=6, seed=3, model=model, real=real, log=lambda _: None)
    assert len(calls) == 2 and calls[0] == calls[1]
    assert all(parse_caption(p) for p in calls[0][0])


def test_generator_returning_the_wrong_shape_is_reported(model, real):
    def tiny(prompts, setting, seed):
        return np.zeros((len(prompts), 32, 32, 3), dtype=np.float32)

    with pytest.raises(ValueError, match=r"shape \(4, 32, 32, 3\); expected \(4, 64, 64, 3\)"):
        evaluate.evaluate(tiny, [Setting("ddim", 5, 1)], n=4, model=model, real=real, log=lambda _: None)


class FakePipeline:
    """Stands in for runtime.Pipeline: checks batch discipline, returns dataset images."""

    batch_size = 4

    def __init__(self):
        self.calls = []

    def txt2img(self, prompts, negative_prompt, *, steps, guidance_scale, scheduler, seed, output_type):
        assert len(prompts) == self.batch_size and output_type == "np" and negative_prompt == ""
        self.calls.append((list(prompts), steps, guidance_scale, scheduler, seed))
        return dataset_generator(prompts, None, seed)


def test_pipeline_generator_batches_pads_and_trims():
    pipe = FakePipeline()
    prompts = [canonical_caption(Attributes("black", "red", "circle", "small", p)) for p in ("center", "top left")] * 5
    images = evaluate.pipeline_generator(pipe)(prompts, Setting("ddim", 20, 7.5), 100)
    assert images.shape == (10, 64, 64, 3)
    assert [c[4] for c in pipe.calls] == [100, 101, 102]
    assert pipe.calls[0][1:4] == (20, 7.5, "ddim")
    assert pipe.calls[2][0] == prompts[8:] + [prompts[9]] * 2


def test_cli_reports_a_missing_bundle(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--bundle", str(tmp_path / "nope"), "--n", "4"])
    assert exit_info.value.code == 2
    assert "nope" in capsys.readouterr().err


def test_cli_rejects_too_few_images(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--bundle", "engines/x", "--n", "1"])
    assert "--n must be at least 2" in capsys.readouterr().err


def test_cli_evaluates_a_real_bundle(bundle_batch2, tmp_path, capsys):
    # A random tiny model: this checks the runtime wiring (batching, padding, outputs), not quality.
    out = tmp_path / "eval"
    argv = ["--bundle", str(bundle_batch2), "--n", "3", "--guidance-scale", "1", "4", "--steps", "2", "--out", str(out)]
    evaluate.main(argv + ["--real-n", "50", "--grid-n", "2"])
    printed = capsys.readouterr().out
    assert "ddim steps=2 guidance=4:" in printed and f"wrote {out / 'results.md'}" in printed
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [(r["steps"], r["guidance"]) for r in rows] == [(2, 1.0), (2, 4.0)]
    assert all(0 <= r["all"] <= 1 and np.isfinite(r["fid"]) and r["sec_per_image"] > 0 for r in rows)
    assert (out / "grid_ddim_2steps_g4.png").is_file()


class LatentPipeline:
    """Stands in for a runtime.Pipeline with both levers: 'latents' are dataset images (64x64x3, in [0, 1]) that the
    full decoder returns as they are and the tiny one returns as noise, so their scores must differ."""

    batch_size = 2

    def __init__(self):
        self.levers = []

    def txt2img(self, prompts, negative_prompt, *, steps, guidance_scale, scheduler, seed, output_type, **levers):
        assert output_type == "latent"
        self.levers.append(levers)
        return dataset_generator(prompts, None, seed)

    def decode(self, latents, decoder):
        return latents if decoder == "full" else np.random.default_rng(0).random(latents.shape, dtype=np.float32)


def test_evaluate_levers_decodes_each_settings_latents_with_every_decoder(model, real, tmp_path):
    from reference.evaluate_levers import evaluate_levers

    pipe = LatentPipeline()
    settings = [Setting("ddim", 6, 5.0, "full", 1), Setting("ddim", 6, 5.0, "full", 3)]
    rows = evaluate_levers(pipe, settings, ["full", "tiny"], 6, 0, tmp_path, model, real)
    assert [(s.decoder, s.cache_interval) for s, _ in rows] == [("full", 1), ("tiny", 1), ("full", 3), ("tiny", 3)]
    assert pipe.levers == [{}] * 3 + [{"cache_interval": 3}] * 3  # one generation per interval, in batches of 2
    full, tiny = rows[0][1], rows[1][1]
    assert full["all"] == 1.0 and tiny["all"] < 0.5
    assert (rows[2][1]["unet_calls_full"], rows[2][1]["unet_calls_shallow"]) == (2, 4)
    assert "| decoder | cache |" in (tmp_path / "results.md").read_text()
    again = evaluate_levers(pipe, settings[:1], ["full"], 6, 0, tmp_path / "again", model, real, latents_from=tmp_path)
    assert len(pipe.levers) == 6, "--latents-from generated again"
    assert again[0][1]["denoise_sec_per_image"] == pytest.approx(full["denoise_sec_per_image"]) and again[0][1]["all"] == 1.0
