"""Benchmarks: the commands complete in --quick mode and write well-formed results; their arithmetic is right.

No timing is asserted: speed is measured by the benchmarks, never tested.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from benchmarks.runtime_bench import STAGES, Call, TimedEngine, run_figures, spread, summarise
from tests.helpers import REPO


def run(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_run_figures_splits_each_step_into_unet_and_host_time():
    calls = [Call("text_encoder", 0.0, 0.5), Call("unet", 1.0, 3.0), Call("unet", 4.0, 5.0), Call("vae_decoder", 6.0, 6.25)]
    figures = run_figures(calls, step_ends=[3.5, 5.25], start=0.0, end=7.0)
    # step 1: 0.5 -> 3.5 holds a 2 s UNet call; step 2: 3.5 -> 5.25 holds a 1 s call
    assert figures["host_per_step_all"] == pytest.approx([1.0, 0.75])
    assert figures["host_total"] == pytest.approx(1.75)
    assert figures["unet_call"] == pytest.approx(1.5) and figures["unet_calls"] == 2 and figures["unet_total"] == pytest.approx(3.0)
    assert figures["text_encoder"] == pytest.approx(0.5) and figures["vae_decode"] == pytest.approx(0.25)
    assert figures["total"] == pytest.approx(7.0) and figures["images_per_s"] == pytest.approx(1 / 7)


def test_spread_and_summary_over_runs():
    assert spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "rel_spread": 1.0, "n": 3}
    with pytest.raises(ValueError, match="--runs 1 or more"):
        spread([])
    runs = [run_figures([Call("unet", 0.0, u)], [u + h], 0.0, u + h + 0.1) for u, h in ((1.0, 0.01), (2.0, 0.01), (3.0, 0.03))]
    summary = summarise(runs)
    assert summary["unet_call"]["median"] == pytest.approx(2.0)
    assert summary["host_per_step"]["median"] == pytest.approx(0.01)
    assert summary["host_share_of_unet_call"]["median"] == pytest.approx(0.01)


def test_timed_engine_keeps_the_engine_protocol():
    class Engine:
        component = type("C", (), {"name": "unet"})()

        def __call__(self, feed):
            return {"out_sample": feed["sample"] * 2}

        def close(self):
            return "closed"

    log: list[Call] = []
    timed = TimedEngine(Engine(), log)
    out = timed({"sample": np.ones(3)})
    assert out["out_sample"].tolist() == [2.0, 2.0, 2.0]
    assert timed.component.name == "unet" and timed.close() == "closed"
    assert [c.name for c in log] == ["unet"] and log[0].seconds >= 0


def test_runtime_bench_imports_no_torch():
    probe = "import sys, benchmarks.runtime_bench; print([m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])"
    assert run("benchmarks.runtime_bench", "--help").stdout.startswith("usage: python -m benchmarks.runtime_bench")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_runtime_bench_quick(bundle_fp32, tmp_path):
    run("benchmarks.runtime_bench", "--bundle", str(bundle_fp32), "--quick", "--out", str(tmp_path), "--name", "tiny")
    result = json.loads((tmp_path / "tiny.json").read_text())
    assert len(result["runs"]) == 2 and result["settings"]["steps"] == 2
    for stage in STAGES:
        assert result["summary"][stage]["median"] > 0, stage
    assert result["summary"]["unet_calls_per_run"] == 2
    assert result["peak_rss_bytes"] >= result["peak_rss_after_load_bytes"] > 0
    assert result["device_memory_bytes"] is None  # no GPU on the test machine
    assert result["import"]["import runtime"]["median"] > 0
    assert result["machine"]["cores"] >= 1 and "onnxruntime" in result["machine"]["packages"]
    table = (tmp_path / "tiny.md").read_text()
    assert "| UNet call (each) |" in table and "| images/s |" in table and "device memory: not measured" in table


def test_compare_quick_runs_all_three_and_the_images_agree(tiny_model, bundle_fp32, tmp_path):
    done = run(
        "benchmarks.compare", "--model", str(tiny_model), "--bundle", str(bundle_fp32), "--quick", "--out", str(tmp_path), "--name", "tiny"
    )
    result = json.loads((tmp_path / "tiny.json").read_text())
    assert list(result["systems"]) == ["ours", "diffusers-torch", "diffusers-onnx"] and result["failed"] == {}
    for name, system in result["systems"].items():
        assert system["summary"]["total"]["median"] > 0 and system["summary"]["unet_calls_per_run"] == 2, name
        assert system["peak_rss_bytes"] > 0, name
    assert set(result["ratios"]) == {"diffusers-torch", "diffusers-onnx"}
    assert all(r["total"] > 0 for r in result["ratios"].values())
    assert result["agreement"]["all_agree"] and len(result["agreement"]["pairs"]) == 3
    assert all(p["max_abs_diff"] <= 1e-3 for p in result["agreement"]["pairs"].values())
    assert result["footprint"]["runtime"]["total_bytes"] < result["footprint"]["diffusers_torch"]["total_bytes"]
    assert "| ours / diffusers-torch |" in done.stdout


def test_chart_draws_a_comparison(tmp_path):
    pytest.importorskip("matplotlib", reason="the chart needs the bench extra: pip install -e '.[bench]'")
    runs = [run_figures([Call("text_encoder", 0, 0.1), Call("unet", 0.2, 1.2), Call("vae_decoder", 1.5, 1.7)], [1.3], 0.0, 1.8)]
    system = {"summary": summarise(runs)}
    result = {
        "model": "models/x", "image": {"height": 64, "width": 64}, "settings": {"steps": 1, "runs": 1}, "scheduler": "DDIMScheduler",
        "precision": "fp32", "systems": {"ours": system, "diffusers-torch": system}, "machine": {"cpu": "test", "cores": 2},
    }  # fmt: skip
    (tmp_path / "c.json").write_text(json.dumps(result))
    run("benchmarks.chart", str(tmp_path / "c.json"), "-o", str(tmp_path / "stages.png"))
    assert (tmp_path / "stages.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chart_refuses_a_file_that_is_not_a_comparison(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    done = subprocess.run([sys.executable, "-m", "benchmarks.chart", str(bad)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "no systems in" in done.stderr


def test_compare_names_the_export_command_when_the_bundle_is_missing(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare", "--model", str(tmp_path / "nowhere"), "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "python -m export.build --model" in done.stderr


def test_sd15_configs_have_sd15_sizes():
    """The full-size model's configs give SD 1.5's parameter counts (built on the meta device: no memory, no time)."""
    import torch

    from benchmarks import sd15

    with torch.device("meta"):
        counts = sd15.parameter_counts(sd15.build_pipeline())
    assert round(counts["unet"] / 1e6) == 860
    assert round(counts["text_encoder"] / 1e6) == 123
    assert round(counts["vae"] / 1e6) == 84


def test_sd15_tiny_vae_has_taesds_size():
    """The random stand-in for TAESD has its published size: 1.22 M parameters in each of the decoder and encoder."""
    import torch
    from diffusers import AutoencoderTiny

    from benchmarks import sd15

    with torch.device("meta"):
        tiny = AutoencoderTiny(**sd15.TAESD)
    assert round(sum(p.numel() for p in tiny.decoder.parameters()) / 1e4) == 122
    assert round(sum(p.numel() for p in tiny.encoder.parameters()) / 1e4) == 122


def test_footprint_follows_requirements():
    from benchmarks.footprint import closure, footprint

    found = closure(["onnxruntime"])
    assert {"onnxruntime", "numpy"} <= set(found)
    sizes = footprint(["numpy"])
    assert sizes["packages"]["numpy"] > 1_000_000 and sizes["total_bytes"] >= sizes["packages"]["numpy"]


def test_benchmarks_publish_to_results_only_when_asked():
    """A plain run writes to the gitignored out/bench/; the committed results/bench/ needs --out."""
    from benchmarks import compare, runtime_bench

    assert runtime_bench.parser().parse_args(["--bundle", "b"]).out.parts[-2:] == ("out", "bench")
    assert compare.parser().parse_args([]).out.parts[-2:] == ("out", "bench")
    assert "/out/" in (REPO / ".gitignore").read_text().splitlines()


def test_soak_quick_records_memory_threads_and_files(bundle_fp32, tmp_path):
    """benchmarks.soak --quick: readings for both phases; growth is reported, never asserted."""
    cmd = [sys.executable, "-m", "benchmarks.soak", "--bundle", str(bundle_fp32), "--quick", "--steps", "2", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "soak.json").read_text())
    for phase, count in (("generations", 20), ("load_close_cycles", 10)):
        readings = result[phase]["readings"]
        assert result[phase]["count"] == count and readings[-1]["done"] == count
        assert all(r["rss_mib"] > 0 and r["threads"] >= 1 and r["fds"] >= 3 for r in readings)
        assert set(result[phase]["second_half_growth"]) == {"rss_mib", "threads", "fds"}
    assert "| generations | 20 |" in (tmp_path / "soak.md").read_text()


def test_prompt_length_quick(tiny_model, tmp_path):
    """benchmarks.prompt_length --quick: three cases timed, and the short prompt's images identical on both bundles."""
    run("benchmarks.prompt_length", "--model", str(tiny_model), "--quick", "--out", str(tmp_path))
    result = json.loads((tmp_path / "prompt-length-tiny-sd-64x64.json").read_text())
    assert result["chunks"] == {"1 chunk": 1, "2 chunks": 2}
    assert set(result["per_image"]) == {"standard, 1 chunk", "long bundle, 1 chunk", "long bundle, 2 chunks"}
    assert result["short_prompt_identical"] is True
    assert "a 2-chunk prompt costs" in (tmp_path / "prompt-length-tiny-sd-64x64.md").read_text()
