"""samples/progress_and_cancel.py: the bar follows the steps; a deadline or Ctrl-C cancels and nothing is written."""

from __future__ import annotations

import signal

from tests.samples.common import files, one_error_line, png, run_sample


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


def test_ctrl_c_cancels_after_the_step_under_way_and_writes_nothing(sample, sample_bundle, tmp_path, monkeypatch, capsys):
    """A real SIGINT, raised while step 3 of 400 is being drawn (the sample's own Bar.draw, called by its step callback):
    the sample's handler notes it, the runtime stops after that step, nothing is written, and Python's handler is back.
    Raised from inside the step rather than sent after a sleep, so the step is known whatever the machine's load."""
    progress = sample("progress_and_cancel")
    draw = progress.Bar.draw

    def draw_then_ctrl_c(bar, step: int, total: int) -> None:
        draw(bar, step, total)
        if step == 3:
            signal.raise_signal(signal.SIGINT)  # its Python handler runs before raise_signal returns

    monkeypatch.setattr(progress.Bar, "draw", draw_then_ctrl_c)
    before = signal.getsignal(signal.SIGINT)
    status = progress.main(["--steps", "400", "--bundle", str(sample_bundle), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 130, err
    assert err.strip().splitlines()[-1] == "cancelled by Ctrl-C after step 3 of 400: nothing written", err
    assert "Traceback" not in err
    assert files(tmp_path) == []
    assert signal.getsignal(signal.SIGINT) is before  # the sample's handler was only there while generating


def test_a_negative_deadline_is_one_line(tmp_path):
    line = one_error_line(run_sample("progress_and_cancel.py", "--deadline", "-1", "--out", tmp_path))
    assert line == "error: --deadline must be 0 or more seconds, got -1"
