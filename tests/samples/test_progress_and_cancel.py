"""samples/progress_and_cancel.py: the bar follows the steps; a deadline or Ctrl-C cancels and nothing is written."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

from tests.helpers import REPO
from tests.samples.common import SAMPLES, files, one_error_line, png, run_sample


def test_a_finished_run_draws_every_step_and_writes_the_image(sample_bundle, tmp_path):
    done = run_sample("progress_and_cancel.py", "--steps", 5, "--seed", 2, "--bundle", sample_bundle, "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    bars = [line for line in done.stderr.splitlines() if line.startswith("[")]
    assert bars[-1].startswith("[" + "#" * 30 + "] 5/5"), done.stderr  # not a terminal: one line per tenth, and the last
    image, text = png(tmp_path / "progress_and_cancel.png")
    assert image.size == (64, 64) and (text["steps"], text["seed"]) == ("5", "2")


def test_previews_are_written_every_k_steps(sample_bundle, tmp_path):
    done = run_sample("progress_and_cancel.py", "--steps", 4, "--previews", 2, "--bundle", sample_bundle, "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in sorted(tmp_path.glob("progress_preview_*.png"))] == ["progress_preview_0002.png", "progress_preview_0004.png"]
    image, _ = png(tmp_path / "progress_preview_0004.png")
    assert image.size == (64, 64)
    bad = run_sample("progress_and_cancel.py", "--previews", 0, "--bundle", sample_bundle, "--out", tmp_path)
    assert bad.returncode == 2 and one_error_line(bad) == "error: --previews must be 1 or more steps, got 0"


def test_a_passed_deadline_cancels_after_the_step_and_writes_nothing(sample_bundle, tmp_path):
    done = run_sample("progress_and_cancel.py", "--steps", 20, "--deadline", 0, "--bundle", sample_bundle, "--out", tmp_path)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "cancelled by deadline of 0 s after step 1 of 20: nothing written"
    assert files(tmp_path) == []


def test_ctrl_c_cancels_between_steps_and_writes_nothing(sample_bundle, tmp_path):
    script = SAMPLES / "progress_and_cancel.py"
    cmd = [sys.executable, str(script), "--steps", "400", "--bundle", str(sample_bundle), "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    first_bar = threading.Event()

    def read() -> None:  # stderr is read on a thread, so every wait below has a timeout
        for line in proc.stderr:  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith("["):
                first_bar.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert first_bar.wait(60), "no progress within 60 s: " + "".join(lines)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    last = lines[-1].strip()
    assert last.startswith("cancelled by Ctrl-C after step ") and last.endswith("of 400: nothing written"), "".join(lines)
    assert int(last.split("after step ")[1].split()[0]) < 400
    assert "Traceback" not in "".join(lines)
    assert files(tmp_path) == []


def test_a_negative_deadline_is_one_line(tmp_path):
    line = one_error_line(run_sample("progress_and_cancel.py", "--deadline", "-1", "--out", tmp_path))
    assert line == "error: --deadline must be 0 or more seconds, got -1"
