"""samples/minimal.py, and the plumbing every sample shares (samples/_common.py): the default bundle, one-line errors, PNG text."""

from __future__ import annotations

import shutil
import sys

import pytest

from tests.helpers.close import assert_same_image
from tests.samples.common import SAMPLES, one_error_line, png, run_sample

SCRIPTS = ["minimal.py", "progress_and_cancel.py", "batch.py", "edit.py", "draw.py", "web/server.py"]


def test_minimal_writes_the_runtimes_image_with_its_settings(sample_bundle, sample_pipe, tmp_path):
    done = run_sample("minimal.py", "a small (blue:1.2) square in the top left on a [white] background", "--seed", 3, "--steps", 4,
                      "--bundle", sample_bundle, "--out", tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    path = tmp_path / "minimal.png"
    assert done.stdout.startswith("wrote ") and "minimal.png" in done.stdout
    image, text = png(path)
    assert image.size == (64, 64) and image.mode == "RGB"
    assert text["prompt"] == "a small (blue:1.2) square in the top left on a [white] background"
    assert (text["seed"], text["steps"], text["guidance_scale"], text["sampler"]) == ("3", "4", "7.5", "ddim")
    assert text["bundle"] == sample_bundle.name and text["size"] == "64x64"
    # A1111's "parameters": the prompt, then the settings line other SD tools parse
    assert text["parameters"] == (
        "a small (blue:1.2) square in the top left on a [white] background\n"
        "Steps: 4, Sampler: ddim, CFG scale: 7.5, Seed: 3, Size: 64x64, Model: shapes-ldm"
    )
    expected = sample_pipe.txt2img("a small (blue:1.2) square in the top left on a [white] background", seed=3, steps=4)[0]
    assert_same_image(image, expected, "the sample vs the runtime in this process")


def test_a_missing_bundle_is_one_line_with_the_build_command(tmp_path):
    line = one_error_line(run_sample("minimal.py", "--bundle", tmp_path / "nope", "--out", tmp_path / "out"))
    assert "no engine bundle at" in line and "python -m export.build" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_sample_explains_itself_and_refuses_unknown_options_in_one_line(script):
    helped = run_sample(script, "--help", timeout=60)
    assert helped.returncode == 0 and "--bundle" in helped.stdout and "--out" in helped.stdout, helped.stderr
    line = one_error_line(run_sample(script, "--no-such-option", timeout=60))
    assert "unrecognized arguments: --no-such-option" in line


def test_the_default_bundle_is_built_on_first_use_saying_so_in_one_line(sample, sample_bundle, tmp_path, monkeypatch, capsys):
    """(The real build is what made sample_bundle, through the same _common.build_reference; here it is a copy of it.)"""
    common, minimal = sample("_common"), sample("minimal")
    default = tmp_path / "engines" / "shapes-ldm-64x64-b1-fp16-onnxruntime"
    monkeypatch.setattr(common, "DEFAULT_BUNDLE", default)
    builds = []

    def build(model, out, **options):
        builds.append((model, out, options))
        shutil.copytree(sample_bundle, out)
        return out

    monkeypatch.setattr("export.build.build", build)
    assert minimal.main(["--steps", "2", "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("building the reference bundle") and "python -m export.build" in err[0], err
    from export.build import REFERENCE_MODEL

    assert builds == [(REFERENCE_MODEL, default, {"precision": "fp16", "backend": "onnxruntime", "log": builds[0][2]["log"]})]
    assert (tmp_path / "out" / "minimal.png").is_file()

    assert minimal.main(["--steps", "2", "--out", str(tmp_path / "out")]) == 0  # built once: the second run just uses it
    assert capsys.readouterr().err == "" and len(builds) == 1


def test_with_only_the_runtime_installed_a_missing_default_bundle_names_the_build_command(sample, tmp_path, monkeypatch, capsys):
    common, minimal = sample("_common"), sample("minimal")
    monkeypatch.setattr(common, "DEFAULT_BUNDLE", tmp_path / "engines" / "shapes-ldm-64x64-b1-fp16-onnxruntime")
    for name in ("torch", "diffusers"):  # as on a device with the runtime alone: these do not import
        monkeypatch.setitem(sys.modules, name, None)

    assert minimal.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no bundle at"), err
    assert "missing torch, diffusers" in err[0] and "`python -m export.build`" in err[0] and "--bundle" in err[0]
    assert not (tmp_path / "engines").exists() and not (tmp_path / "out").exists()


def test_png_text_holds_any_prompt_and_the_write_is_atomic(sample, tmp_path, monkeypatch):
    common = sample("_common")
    from PIL import Image

    path = tmp_path / "a.png"
    settings = {"prompt": "ein Bild von Katzen, 猫", "negative_prompt": "blur", "seed": 1, "steps": 2, "guidance_scale": 5.0}
    common.save_png(Image.new("RGB", (8, 8), "red"), path, settings)
    _, text = png(path)
    assert text["prompt"] == "ein Bild von Katzen, 猫"  # iTXt where Latin-1 cannot hold it
    assert text["parameters"] == "ein Bild von Katzen, 猫\nNegative prompt: blur\nSteps: 2, CFG scale: 5.0, Seed: 1"

    # A write that fails half-way leaves the finished file as it was, and no temporary file behind.
    before = path.read_bytes()

    def broken_save(self, fp, *args, **kwargs):  # handed the temporary file's path, as PIL's save is
        with open(fp, "wb") as half:
            half.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        common.save_png(Image.new("RGB", (8, 8), "blue"), path, settings)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_samples_folder_is_what_the_readme_lists():
    readme = (SAMPLES / "README.md").read_text()
    for script in SCRIPTS:
        assert (SAMPLES / script).is_file()
        assert script.split("/")[0] in readme
    assert "jetson/README.md" in readme and (SAMPLES / "jetson" / "setup.sh").is_file()
