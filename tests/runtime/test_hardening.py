"""Issue 19, runtime half: a bundle reads only itself, loads atomically, and every failure is named truthfully."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import runtime
import runtime.bundle.integrity
import runtime.session
from runtime.errors import BundleError, NonFiniteError
from runtime.tokenizer import ClipTokenizer

PROMPT = "a blue square"
pytestmark = pytest.mark.reliability


@pytest.fixture
def bundle_copy(bundle_fp32, tmp_path):
    return shutil.copytree(bundle_fp32, tmp_path / "bundle")


def edit_manifest(bundle, edit):
    m = json.loads((bundle / "manifest.json").read_text())
    edit(m)
    (bundle / "manifest.json").write_text(json.dumps(m))


# 1. The bundle as a boundary


@pytest.mark.parametrize(
    "edit, entry",
    [
        (lambda m: m["components"]["unet"].update(file="/etc/passwd"), "/etc/passwd"),
        (lambda m: m["components"]["vae_decoder"].update(file="../outside/model.onnx"), "../outside/model.onnx"),
        (lambda m: m["tokenizer"].update(dir="../.."), "../.."),
        (lambda m: m["files"].update({"../../etc/hostname": "0" * 64}), "../../etc/hostname"),
    ],
)
def test_paths_outside_the_bundle_are_refused_before_hashing(bundle_copy, monkeypatch, edit, entry):
    edit_manifest(bundle_copy, edit)
    monkeypatch.setattr(runtime.bundle.integrity, "_hash_one", lambda *a: pytest.fail("hashed a file"))
    with pytest.raises(BundleError, match="not a relative path inside the bundle") as e:
        runtime.Pipeline.load(bundle_copy)
    assert repr(entry) in str(e.value) and "sha256" not in str(e.value)


def test_symlink_leaving_the_bundle_is_refused(bundle_copy, tmp_path):
    outside = tmp_path / "secret.json"
    outside.write_text("{}")
    vocab = bundle_copy / "tokenizer" / "vocab.json"
    vocab.unlink()
    vocab.symlink_to(outside)
    with pytest.raises(BundleError, match=r"'tokenizer/vocab.json' is a symlink leading outside the bundle") as e:
        runtime.Pipeline.load(bundle_copy)
    assert "sha256" not in str(e.value)


def test_files_not_covered_by_the_hashes_are_refused(bundle_copy):
    (bundle_copy / "unet" / "model.onnx.data").write_bytes(b"weights nobody hashed")
    with pytest.raises(BundleError, match=r"unet/model.onnx.data \(read by component unet's external data\) is not covered"):
        runtime.Pipeline.load(bundle_copy)
    (bundle_copy / "unet" / "model.onnx.data").unlink()
    (bundle_copy / "unet" / "notes.txt").write_text("x")
    with pytest.raises(BundleError, match=r"unet/notes.txt \(read by component unet's folder\) is not covered"):
        runtime.Pipeline.load(bundle_copy)
    (bundle_copy / "unet" / "notes.txt").unlink()
    edit_manifest(bundle_copy, lambda m: m["files"].pop("tokenizer/vocab.json"))
    with pytest.raises(BundleError, match=r"tokenizer/vocab.json \(read by the tokenizer\) is not covered by the manifest's hashes"):
        runtime.Pipeline.load(bundle_copy)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["image"].update(height=10**9), r"image.height 1000000000 is out of range 1..16384"),
        (lambda m: m["image"].update(batch_size=0), r"image.batch_size 0 is out of range 1..64"),
        (lambda m: m["image"].update(width=1e400), r"OverflowError"),
        (lambda m: m["vae"].update(latent_channels=-4), r"vae.latent_channels -4"),
        (lambda m: m["vae"].update(downscale_factor=0), r"vae.downscale_factor 0"),
        (lambda m: m["components"]["unet"]["inputs"][0].update(shape=[2, -4, 8, 8]), r"every dimension must be"),
        (lambda m: m["components"]["unet"]["inputs"][0].update(shape=[2**19] * 4), r"element count"),
        (lambda m: m["components"]["unet"]["inputs"][0].update(dtype="object"), r"dtype 'object', not one of"),
        (lambda m: m["components"]["unet"].update(inputs="sample"), r"TypeError"),
        (lambda m: m["files"].update({"unet/model.onnx": 7}), r"not a sha256 hex digest"),
    ],
)
def test_manifest_values_are_bounded(bundle_copy, edit, message):
    edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError, match=r"malformed manifest .*" + message):
        runtime.Pipeline.load(bundle_copy)


def test_deeply_nested_manifest_is_malformed_not_recursion(bundle_copy):
    text = (bundle_copy / "manifest.json").read_text()
    deep = "[" * 200_000 + "]" * 200_000
    (bundle_copy / "manifest.json").write_text(text.replace('"created"', f'"deep": {deep}, "created"', 1))
    with pytest.raises(BundleError, match="malformed manifest"):
        runtime.Pipeline.load(bundle_copy)


def test_oversized_file_is_refused_without_hashing(bundle_copy, monkeypatch):
    monkeypatch.setattr(runtime.bundle.integrity, "MAX_TOKENIZER_FILE", 1000)
    monkeypatch.setattr(runtime.bundle.integrity, "_hash_one", lambda *a: pytest.fail("hashed a file"))
    with pytest.raises(BundleError, match=r"tokenizer/merges.txt is \d+ bytes, more than a tokenizer file can be \(1000 bytes\)"):
        runtime.Pipeline.load(bundle_copy)


# 2. Loading is atomic with respect to a concurrent rebuild


def _spy_sessions(monkeypatch):
    """Record the sha256 of every ONNX file as ONNX Runtime opens it."""
    import onnxruntime

    opened: dict[str, str] = {}
    real = onnxruntime.InferenceSession

    def spy(path, *a, **k):
        opened[os.path.basename(os.path.dirname(path))] = hashlib.sha256(open(path, "rb").read()).hexdigest()
        return real(path, *a, **k)

    monkeypatch.setattr(onnxruntime, "InferenceSession", spy)
    return opened


def _swap(target, source, tmp):
    """What `export.build --force` does: a new folder renamed into place, the old one removed."""
    work = tmp / f".{target.name}.partial"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(source, work)
    old = tmp / f".{target.name}.old"
    target.rename(old)
    work.rename(target)
    shutil.rmtree(old)


def _consistent(pipe, opened):
    for name in opened:
        assert opened[name] == pipe.manifest.files[f"{name}/model.onnx"], f"{name} came from another build than the manifest"


def test_rebuild_between_hashing_and_opening_is_not_mixed(bundle_fp32, bundle_fp16, tmp_path, monkeypatch):
    target = shutil.copytree(bundle_fp32, tmp_path / "bundle")
    opened = _spy_sessions(monkeypatch)
    real_load = runtime.session.load_engine
    swapped = []

    def racing_load(*a, **k):
        if not swapped:  # the rebuild lands after the files were hashed, before the first engine opens
            _swap(target, bundle_fp16, tmp_path)
            swapped.append(True)
        return real_load(*a, **k)

    monkeypatch.setattr(runtime.session, "load_engine", racing_load)
    pipe = runtime.Pipeline.load(target)
    assert pipe.manifest.precision == "fp16"  # it saw the new build, whole
    _consistent(pipe, opened)


def test_loads_racing_a_rebuild_loop_see_one_build(bundle_fp32, bundle_fp16, tmp_path, monkeypatch):
    target = shutil.copytree(bundle_fp32, tmp_path / "bundle")
    stop = threading.Event()

    def rebuild_loop():
        n = 0
        while not stop.is_set() and n < 40:
            _swap(target, (bundle_fp16, bundle_fp32)[n % 2], tmp_path)
            n += 1

    opened = _spy_sessions(monkeypatch)
    thread = threading.Thread(target=rebuild_loop)
    thread.start()
    loads, deadline = 0, time.monotonic() + 20
    try:
        while thread.is_alive() and loads < 15 and time.monotonic() < deadline:
            opened.clear()
            try:
                pipe = runtime.Pipeline.load(target)
            except BundleError as e:  # a named refusal (the folder vanished mid-read) is allowed; a mixed load is not
                assert "bundle" in str(e)
                continue
            finally:
                loads += 1
            _consistent(pipe, opened)
    finally:
        stop.set()
        thread.join()


# 3. Non-finite values caught where they arise


class _Nan:
    """An engine whose output is all NaN, standing in for an overflowing or broken one."""

    def __init__(self, engine):
        self.engine, self.component = engine, engine.component

    def __call__(self, feed):
        return {k: np.full_like(v, np.nan) for k, v in self.engine(feed).items()}


def test_nan_latents_from_the_caller_are_named(bundle_fp32):
    pipe = runtime.Pipeline.load(bundle_fp32)
    bad = np.full(pipe.manifest.latent_shape, np.nan, np.float32)
    with pytest.raises(NonFiniteError, match="latents given by the caller hold NaN/inf") as e:
        pipe.txt2img(PROMPT, latents=bad, steps=2, seed=0)
    assert "fp16" not in str(e.value) and isinstance(e.value, FloatingPointError)
    with pytest.raises(NonFiniteError, match="guidance_scale is nan"):
        pipe.txt2img(PROMPT, steps=2, seed=0, guidance_scale=float("nan"))


def test_fp32_unet_nan_is_not_called_fp16_overflow(bundle_fp32):
    pipe = runtime.Pipeline.load(bundle_fp32)
    pipe.engines["unet"] = _Nan(pipe.engines["unet"])
    with pytest.raises(NonFiniteError, match=r"step 1 of 2: the unet engine \(fp32\) produced NaN/inf at timestep 501") as e:
        pipe.txt2img(PROMPT, steps=2, seed=0, output_type="latent")
    assert "fp16 overflow" not in str(e.value) and "from finite inputs" in str(e.value)


def test_fp16_unet_nan_is_fp16_overflow_with_a_real_rebuild_line(bundle_fp16):
    pipe = runtime.Pipeline.load(bundle_fp16)
    pipe.engines["unet"] = _Nan(pipe.engines["unet"])
    with pytest.raises(NonFiniteError, match=r"step 1 of 2: the unet engine \(fp16\).*fp16 overflow") as e:
        pipe.txt2img(PROMPT, steps=2, seed=0)
    # the command the bundle was built with, its precision changed to fp32
    source = pipe.manifest.model.source
    assert f"`python -m export.build --model {source} --backend onnxruntime --precision fp32 --out {bundle_fp16} --force`" in str(e.value)


def test_fp32_decoder_nan_is_named_without_fp16(bundle_fp32):
    pipe = runtime.Pipeline.load(bundle_fp32)
    pipe.engines["vae_decoder"] = _Nan(pipe.engines["vae_decoder"])
    with pytest.raises(NonFiniteError, match=r"the vae_decoder engine \(fp32\) produced NaN/inf from finite inputs") as e:
        pipe.txt2img(PROMPT, steps=1, seed=0)
    assert "fp16 overflow" not in str(e.value)


# 4. Bad inputs named, never a traceback


def test_bad_prompts_seed_and_steps_are_named(bundle_fp32):
    pipe = runtime.Pipeline.load(bundle_fp32)
    with pytest.raises(TypeError, match="negative_prompt must be a str or a list of str, got NoneType"):
        pipe.txt2img(PROMPT, None, steps=1, seed=0)
    with pytest.raises(TypeError, match="prompt must be a str or a list of str, got int"):
        pipe.txt2img(5, steps=1, seed=0)
    with pytest.raises(TypeError, match="prompt must be a str or a list of str, got bytes"):
        pipe.txt2img(b"\xff\xfe", steps=1, seed=0)
    with pytest.raises(ValueError, match="prompt is not valid text: character 2 is a lone surrogate"):
        pipe.txt2img("ab\udcff", steps=1, seed=0)
    with pytest.raises(ValueError, match=r"seed -1 is not valid: a seed is a whole number >= 0"):
        pipe.txt2img(PROMPT, steps=1, seed=-1)
    for sampler in ("ddim", "ddpm", "pndm", "dpmpp_2m", "unipc"):
        with pytest.raises(ValueError, match=r"steps 1000 is more than this sampler supports .* at most \d+ steps"):
            pipe.txt2img(PROMPT, steps=1000, seed=0, scheduler=sampler)


def test_image_modes_and_dtypes():
    from PIL import Image

    from runtime import images as img

    sixteen = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    assert img.image_tensor(sixteen, (8, 8), 1).min() == 1.0  # white, not clipped garbage
    assert img.image_tensor(np.full((8, 8, 3), 65535, np.uint16), (8, 8), 1).min() == 1.0
    assert img.mask_tensor(np.ones((8, 8), bool), (8, 8), 1).min() == 1.0
    for mode in ("1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "HSV", "I", "F", "LA", "PA", "RGBX", "I;16", "I;16B"):
        assert img.image_tensor(Image.new(mode, (8, 8)), (8, 8), 1).shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match="int32 arrays are not accepted"):
        img.image_tensor(np.zeros((8, 8, 3), np.int32), (8, 8), 1)
    with pytest.raises(ValueError, match="holds NaN or inf"):
        img.image_tensor(np.full((8, 8, 3), np.nan), (8, 8), 1)
    with pytest.raises(ValueError, match="La image cannot be converted"):
        img.image_tensor(Image.new("La", (8, 8)), (8, 8), 1)


def test_malformed_tokenizer_files_are_named(bundle_fp32, tmp_path):
    tok = shutil.copytree(bundle_fp32 / "tokenizer", tmp_path / "tok")
    (tok / "vocab.json").write_text('["not", "a", "vocab"]')
    with pytest.raises(ValueError, match=r"vocab.json is malformed"):
        ClipTokenizer.from_dir(tok)
    shutil.copy(bundle_fp32 / "tokenizer" / "vocab.json", tok / "vocab.json")
    (tok / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"tokenizer_config.json holds a JSON list"):
        ClipTokenizer.from_dir(tok)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "runtime", *args], capture_output=True, text=True, timeout=120)


def test_cli_refuses_bad_paths_before_work(bundle_fp32, tmp_path):
    done = _cli("x", "--bundle", str(tmp_path / "none"), "-o", str(tmp_path))
    assert done.returncode == 2 and done.stderr.startswith("error: -o") and "is a folder" in done.stderr
    (tmp_path / "afile").write_text("x")
    done = _cli("x", "--bundle", str(tmp_path / "none"), "-o", str(tmp_path / "afile" / "out.png"))
    assert done.returncode == 2 and "is a file, so the folder" in done.stderr and "Traceback" not in done.stderr
    done = _cli("img2img", "x", "--bundle", str(bundle_fp32), "--image", str(tmp_path), "-o", str(tmp_path / "o.png"))
    assert done.returncode == 2 and "--image" in done.stderr and "is a folder" in done.stderr and "Traceback" not in done.stderr
    from PIL import Image

    Image.new("RGB", (64, 64), "red").save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:60])
    done = _cli("img2img", "x", "--bundle", str(bundle_fp32), "--image", str(tmp_path / "cut.png"), "-o", str(tmp_path / "o.png"))
    assert done.returncode == 2 and done.stderr.count("error:") == 1 and "Traceback" not in done.stderr
    done = _cli("x", "--bundle", str(bundle_fp32), "--seed", "-1", "--steps", "1", "-o", str(tmp_path / "o.png"))
    assert done.returncode == 2 and "seed -1 is not valid" in done.stderr


# 5. Rebuild hints built from the manifest


def test_rebuild_hint_rebuilds_this_bundle(bundle_copy):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    (bundle_copy / "unet" / "model.onnx").unlink()
    with pytest.raises(BundleError) as e:
        runtime.Pipeline.load(bundle_copy)
    # the command the bundle was built with (tests/conftest.py's), as export recorded it: the backend it resolved
    assert m["command"] == ["--model", m["model"]["source"], "--precision", "fp32", "--backend", "onnxruntime"]
    assert f"`python -m export.build {shlex.join(m['command'])} --out {bundle_copy} --force`" in str(e.value)
    # a bundle from before the record: a command made from its manifest's fields
    edit_manifest(bundle_copy, lambda m: m.pop("command"))
    with pytest.raises(BundleError) as e:
        runtime.Pipeline.load(bundle_copy)
    expected = (
        f"python -m export.build --model {m['model']['source']} --precision fp32 --height 64 --width 64 --batch-size 1 "
        f"--guidance cfg --pipelines txt2img,img2img,inpaint --out {bundle_copy} --force"
    )
    assert expected in str(e.value)
