"""samples/batch.py: prompts file -> PNGs with their settings; bad rows reported, the rest written; resumable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np

from tests.helpers import REPO
from tests.helpers.close import assert_same_image
from tests.samples.common import SAMPLES, files, one_error_line, png, run_sample

CSV = """prompt,seed,steps,guidance,negative_prompt
a large red circle in the center on a black background,11,3,5,
a small blue square in the top left on a white background,abc,3,,
,4,3,5,
a large yellow triangle in the bottom right on a gray background,,4,,blurry
a small green circle in the top right on a black background,5,3,2.5,
"""


def pngs(folder):
    return sorted(p for p in folder.glob("*.png"))


def test_csv_rows_become_pngs_with_their_settings_and_bad_rows_are_reported(sample_bundle, sample_pipe, tmp_path):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text(CSV)
    out = tmp_path / "out"
    done = run_sample("batch.py", prompts, "--steps", 2, "--seed", 100, "--bundle", sample_bundle, "--out", out)

    assert done.returncode == 1, done.stderr  # some rows failed
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        "error: prompts.csv line 3: seed 'abc' is not a whole number",
        "error: prompts.csv line 4: the prompt is empty",
    ]
    assert done.stdout.splitlines()[-1] == f"3 written, 0 already there, 2 failed, in {out}"
    written = pngs(out)
    assert [p.name[:5] for p in written] == ["0001-", "0004-", "0005-"]
    assert files(out) == [p.name for p in written]  # no temporary files left

    rows = {p.name[:4]: png(p) for p in written}
    for image, _ in rows.values():
        assert image.size == (64, 64)
    # the row's own values, the command line's where a cell is empty (seed: --seed + row number - 1)
    _, first = rows["0001"]
    assert (first["seed"], first["steps"], first["guidance_scale"], first["negative_prompt"]) == ("11", "3", "5.0", "")
    _, fourth = rows["0004"]
    assert (fourth["seed"], fourth["steps"], fourth["guidance_scale"], fourth["negative_prompt"]) == ("103", "4", "7.5", "blurry")
    assert fourth["parameters"] == (
        "a large yellow triangle in the bottom right on a gray background\nNegative prompt: blurry\n"
        "Steps: 4, Sampler: ddim, CFG scale: 7.5, Seed: 103, Size: 64x64, Model: shapes-ldm"
    )
    expected = sample_pipe.txt2img(fourth["prompt"], "blurry", seed=103, steps=4, guidance_scale=7.5)[0]
    assert_same_image(rows["0004"][0], expected, "the batch's row 4 vs the runtime in this process")


def test_a_rerun_skips_finished_rows_and_redraws_only_what_is_missing(sample_bundle, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# shapes\na large red circle in the center on a black background\n\na small blue square\na green triangle\n")
    out = tmp_path / "out"
    args = (prompts, "--steps", 2, "--bundle", sample_bundle, "--out", out)
    first = run_sample("batch.py", *args)
    assert first.returncode == 0, first.stderr
    written = pngs(out)
    assert len(written) == 3
    kept, removed = written[:2], written[2]
    mtimes = {p: p.stat().st_mtime_ns for p in kept}
    pixels = np.asarray(png(removed)[0])
    removed.unlink()
    (out / f".{removed.name}.k3j9x2qa.tmp").write_bytes(b"\x89PNG half a file")  # what a write killed half-way leaves

    again = run_sample("batch.py", *args)
    assert again.returncode == 0, again.stderr
    assert [line.split()[0] for line in again.stdout.splitlines()[:3]] == ["skip", "skip", "wrote"]
    assert again.stdout.splitlines()[-1].startswith("1 written, 2 already there, 0 failed")
    assert {p: p.stat().st_mtime_ns for p in kept} == mtimes  # not rewritten
    assert_same_image(png(removed)[0], pixels, "the redrawn image")  # the same image again
    assert files(out) == sorted(p.name for p in written)  # the stale temporary file is gone


def test_an_interrupted_batch_resumes_where_it_stopped(sample_bundle, tmp_path):
    """Ctrl-C after the first image, deterministically: the batch's stdout is a pipe the test filled beforehand, so its
    first `wrote` line blocks until the test has sent SIGINT and starts reading. Exactly one image is finished then,
    on any machine and under any load (a timed interrupt once landed after the last image)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a large red circle, take {i}\n" for i in range(8)))
    out = tmp_path / "out"
    cmd = [sys.executable, str(SAMPLES / "batch.py"), str(prompts), "--steps", "12", "--bundle", str(sample_bundle), "--out", str(out)]
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:
        while True:
            os.write(write_end, b"#" * 4096)  # fill the pipe: the child's first print waits for the reader
    except BlockingIOError:
        pass
    os.set_blocking(write_end, True)
    # A suite started in the background by a non-interactive shell (`pytest &`) ignores SIGINT, and a child inherits
    # that: the batch would never see the Ctrl-C this test sends. Give the child Python's default.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=write_end, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
        os.close(write_end)
    try:
        waited = 0.0
        while not pngs(out):  # the first image is written before its line is printed; the print then blocks
            assert proc.poll() is None and waited < 300, "no image within 300 s"  # a hang guard, not a timing condition
            time.sleep(0.05)
            waited += 0.05
        proc.send_signal(signal.SIGINT)
        with os.fdopen(read_end, "rb") as pipe:
            stdout = pipe.read().decode().replace("#", "")  # drains the pipe: the child can flush and exit
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()  # type: ignore[union-attr]
    assert "Traceback" not in stderr and "run the same command again to finish the rest" in stderr, stderr
    before = {p.name: p.stat().st_mtime_ns for p in pngs(out)}
    assert len(before) == 1 and all(not name.startswith(".") for name in files(out)), (stdout, files(out))

    resumed = run_sample("batch.py", prompts, "--steps", 12, "--bundle", sample_bundle, "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    assert sum(line.startswith("skip") for line in resumed.stdout.splitlines()) == len(before)
    assert resumed.stdout.splitlines()[-1].startswith(f"{8 - len(before)} written, {len(before)} already there")
    assert {name: (out / name).stat().st_mtime_ns for name in before} == before
    assert len(pngs(out)) == 8


def test_a_csv_cell_past_csvs_limit_and_an_out_that_is_a_file_are_one_line(tmp_path):
    huge = tmp_path / "huge.csv"
    huge.write_text("prompt,seed\n" + "a" * 200_000 + ",1\n")
    line = one_error_line(run_sample("batch.py", huge, "--out", tmp_path / "out"))
    assert line == "error: huge.csv line 2: a cell is longer than 131072 characters (a prompt is cut to 77 tokens anyway); fix that row"
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    line = one_error_line(run_sample("batch.py", "--out", blocker))
    assert line == f"error: --out {blocker}: {blocker} is a file, not a folder; choose another --out"
    line = one_error_line(run_sample("batch.py", "--out", blocker / "images"))
    assert line == f"error: --out {blocker / 'images'}: {blocker} is a file, not a folder; choose another --out"
    assert blocker.read_text() == "mine"


def test_a_bad_prompts_file_is_one_line(tmp_path):
    line = one_error_line(run_sample("batch.py", tmp_path / "missing.txt", "--out", tmp_path))
    assert line == f"error: prompts file {tmp_path / 'missing.txt'} does not exist"
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,colour\nx,red\n")
    line = one_error_line(run_sample("batch.py", bad, "--out", tmp_path))
    assert line == "error: bad.csv: unknown column 'colour' (columns: prompt, negative_prompt, seed, steps, guidance, sampler)"
    bad.write_text("text,seed\nx,1\n")
    assert "must name the columns, one of them 'prompt'" in one_error_line(run_sample("batch.py", bad, "--out", tmp_path))
