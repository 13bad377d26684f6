"""samples/jetson/: the setup script lints and dry-runs here (no Jetson, no TensorRT); its unit and presets match the code."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from export.tensorrt.builder import PRESETS
from tests.helpers import REPO
from tests.samples.common import SAMPLES, run_sample

SCRIPT = SAMPLES / "jetson" / "setup.sh"
UNIT = SAMPLES / "jetson" / "ldm-web.service"


def setup_sh(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=60)


def commands(done: subprocess.CompletedProcess[str]) -> list[str]:
    return [line[2:] for line in done.stdout.splitlines() if line.startswith("+ ")]


def test_the_script_parses():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_script_passes_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    done = subprocess.run(["shellcheck", "--severity=style", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_a_dry_run_prints_the_build_and_runs_nothing(tmp_path):
    bundle, out = tmp_path / "shapes-ldm-64x64-b1-fp16-onnxruntime", tmp_path / "trt"
    done = setup_sh("--dry-run", "--bundle", bundle, "--out", out, "--preset", "jetson-orin-nx")
    assert done.returncode == 0, done.stderr
    run = commands(done)
    venv_python = f"{REPO}/.venv/bin/python"
    assert f"{venv_python} -m pip install -q -e {REPO} cuda-python\\>=12.6 onnx onnxruntime" in run
    assert f"{venv_python} -m export.build --from-onnx {bundle} --device-preset jetson-orin-nx --out {out}" in run
    assert f"{venv_python} {REPO}/samples/minimal.py --bundle {out} --out {REPO}/out/samples/jetson" in run
    assert not any("systemctl" in c for c in run)  # only with --service
    assert list(tmp_path.iterdir()) == []  # nothing built, nothing written


def test_the_default_tensorrt_bundle_is_named_after_the_onnx_one():
    done = setup_sh("--dry-run", "--skip-install")
    assert done.returncode == 0, done.stderr
    build = [c for c in commands(done) if "export.build" in c]
    if "keeping engines/" in done.stdout:  # a TensorRT bundle is already there (a Jetson that ran it): nothing to build
        assert build == []
        return
    assert build == [
        f"{REPO}/.venv/bin/python -m export.build --from-onnx engines/shapes-ldm-64x64-b1-fp16-onnxruntime "
        "--device-preset jetson-orin-nano --out engines/shapes-ldm-64x64-b1-fp16-tensorrt"
    ]
    assert not any("pip install" in c for c in commands(done))


def test_with_service_the_unit_runs_the_web_sample_on_loopback(tmp_path):
    out = tmp_path / "trt"
    done = setup_sh("--dry-run", "--skip-install", "--out", out, "--service", "--user", "jetson", "--port", "8123")
    assert done.returncode == 0, done.stderr
    unit = done.stdout.split("+ write /etc/systemd/system/ldm-web.service:\n")[1]
    assert "@" not in unit  # every field filled in
    assert "    User=jetson\n" in unit and f"    WorkingDirectory={REPO}\n" in unit
    exec_start = next(line.strip() for line in unit.splitlines() if line.strip().startswith("ExecStart="))
    assert exec_start == (
        f"ExecStart={REPO}/.venv/bin/python {REPO}/samples/web/server.py --bundle {out} "
        f"--host 127.0.0.1 --port 8123 --out {REPO}/out/samples/web"
    )
    assert commands(done)[-2:] == ["systemctl daemon-reload", "systemctl enable --now ldm-web.service"] or commands(done)[-2:] == [
        "sudo systemctl daemon-reload", "sudo systemctl enable --now ldm-web.service",
    ]  # fmt: skip
    # the options ExecStart passes are the server's own
    helped = run_sample("web/server.py", "--help", timeout=60).stdout
    assert all(flag in helped for flag in ("--bundle", "--host", "--port", "--out"))


def test_the_presets_are_the_exporters_jetson_presets():
    jetson = sorted(name for name in PRESETS if name.startswith("jetson"))
    assert jetson == ["jetson-orin-nano", "jetson-orin-nx"]
    readme = (SAMPLES / "jetson" / "README.md").read_text()
    for name in jetson:
        assert setup_sh("--dry-run", "--skip-install", "--preset", name).returncode == 0
        assert name in readme
    done = setup_sh("--dry-run", "--preset", "desktop")
    assert (done.returncode, done.stderr) == (2, "error: --preset desktop: choose jetson-orin-nano or jetson-orin-nx\n")
    done = setup_sh("--no-such-option")
    assert (done.returncode, done.stderr) == (2, "error: unknown option --no-such-option (see --help)\n")


def test_the_unit_template_is_well_formed():
    sections = [line for line in UNIT.read_text().splitlines() if line.startswith("[")]
    assert sections == ["[Unit]", "[Service]", "[Install]"]
    fields = {line.split("=", 1)[0] for line in UNIT.read_text().splitlines() if "=" in line and not line.startswith("#")}
    assert {"ExecStart", "User", "WorkingDirectory", "Restart", "WantedBy"} <= fields
