"""benchmarks.sdxl: the full-size configs have SDXL base's sizes (counted on torch's meta device, no memory),
and --quick writes a loadable SDXL folder that exports."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO


def test_sdxl_configs_have_sdxl_base_sizes():
    from benchmarks import sdxl

    counts = sdxl.parameter_counts(sdxl.build_pipeline(meta=True))
    # SDXL base 1.0's published components
    assert counts == {"text_encoder": 123_060_480, "text_encoder_2": 694_659_840, "unet": 2_567_463_684, "vae": 83_653_863}
    figures = sdxl.estimate(counts, ram_bytes=24 * 2**30)
    assert figures["bundle_fp32_bytes"] == 4 * sum(counts.values())
    assert figures["export_peak_floor_bytes"] == 4 * (sum(counts.values()) + counts["unet"])
    assert figures["bundle_fp16_bytes"] == 2 * (sum(counts.values()) - counts["vae"]) + 4 * counts["vae"]


def test_sdxl_quick_writes_a_folder_the_exporter_reads(tmp_path):
    out, results, exported = tmp_path / "sdxl-quick", tmp_path / "estimate.json", tmp_path / "export.json"
    bundle = tmp_path / "bundle"
    cmd = [sys.executable, "-m", "benchmarks.sdxl", "--quick", "--out", str(out), "--results", str(results)]
    cmd += ["--export-to", str(bundle), "--export-results", str(exported)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and json.loads(results.read_text())["parameters"]["unet"] > 0
    # the export the benchmark measures: fp16 by --low-memory, txt2img only, its peak memory from the kernel
    figures = json.loads(exported.read_text())
    assert "--low-memory" in figures["command"] and figures["peak_rss_bytes"] > 2**20 and figures["export_s"] > 0
    assert figures["bundle_bytes"] == sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    assert "traced in fp16" in json.loads((bundle / "manifest.json").read_text())["components"]["unet"]["build"]["note"]
    assert not (bundle / "vae_encoder").exists()
    # per-stage times, one ONNX Runtime session at a time
    stages = tmp_path / "stages.json"
    cmd = [sys.executable, "-m", "benchmarks.sdxl", "--stage-times", str(bundle), "--export-results", str(stages)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    timed = json.loads(stages.read_text())["stages"]
    assert set(timed) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder"} and all(t["call_s"] > 0 for t in timed.values())
    from export.model import load_model

    model = load_model(out)
    assert model.family.name == "sdxl" and model.family.info(model).time_ids == 6
