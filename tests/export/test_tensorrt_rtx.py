"""TensorRT for RTX, for real, on a machine without a GPU: engines built for every kind of bundle the SDK exports,
int8 that TensorRT's parser accepts, the compute-capability targets, and the runtime's one-line refusal without a GPU.

The engines cannot run here (no GPU): each network's inputs and outputs are checked against the manifest's by the
builder, and what runs them is tested on stand-ins (test_tensorrt_offline.py, tests/helpers/fake_tensorrt.py).
Text encoders: TensorRT for RTX 1.7's ahead-of-time build stops with an internal Myelin error on a CLIP text
encoder of hidden size 40 (4 heads); the tiny models use 32 and 48 (SDXL), which build, as 24 and 64 did.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import runtime
from export.build import build
from export.tensorrt.builder import PORTABLE, BuilderSettings, EngineBuildError, Precision, build_engine, compute_capabilities
from runtime.backends.libraries import TENSORRT_RTX
from runtime.backends.tensorrt import NoGpu, gpu_count
from runtime.bundle import TensorSpec, load_manifest
from tests.helpers import REPO
from tests.helpers.qdq import qdq_onnx
from tests.helpers.rtx import build_rtx, check_rtx_bundle, needs_rtx
from tests.helpers.tiny_models import make_tiny_sd, make_tiny_taesd

pytestmark = needs_rtx
QUIET = {"log": lambda _: None}
FP16 = Precision("fp16", strongly_typed=True, fp16_flag=False, tf32=True)


def has_gpu() -> bool:
    try:
        return gpu_count()[0] > 0
    except ImportError:
        return False


without_gpu = pytest.mark.skipif(has_gpu(), reason="this machine has a CUDA GPU: the no-GPU paths cannot happen")


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    """fp16 ONNX bundles of the tiny SD 2.x, LCM (guidance embedding), 9-channel inpainting and x4 upscaler models
    (txt2img alone where the model has more: the VAE encoder is the same network as in the SD 1.5 bundle)."""
    root = tmp_path_factory.mktemp("rtx-kinds")
    out = {}
    for kind in ("sd2", "lcm", "inpaint", "upscaler"):
        model = make_tiny_sd(root / f"model-{kind}", kind=kind, sample_size=128 if kind == "upscaler" else 64)
        pipelines = {"inpaint": "inpaint", "upscaler": "upscale"}.get(kind, "txt2img")
        out[kind] = build(model, root / kind, precision="fp16", backend="onnxruntime", pipelines=pipelines, **QUIET)
    return out


@pytest.fixture(scope="module")
def sd15_rtx(bundle_fp16, tmp_path_factory):
    return build_rtx(bundle_fp16, tmp_path_factory.mktemp("rtx") / "sd15-fp16")


def test_sd15_fp16_bundle_builds_portable_engines(sd15_rtx, bundle_fp16):
    check_rtx_bundle(sd15_rtx, bundle_fp16)
    manifest = load_manifest(sd15_rtx)
    assert manifest.tensorrt.compute_capabilities == PORTABLE and manifest.tensorrt.gpu == "none (ahead of time)"
    assert manifest.components["unet"].build["from_onnx_args"][:2] == ["--backend", "tensorrt-rtx"]
    assert manifest.components["unet"].build["timing_cache"] is None  # nothing is timed without a GPU
    for c in manifest.components.values():
        assert c.build["flags"]["strongly_typed"] is True and c.build["flags"]["fp16"] is False


@pytest.mark.parametrize("kind", ["sd2", "lcm", "inpaint", "upscaler"])
def test_every_bundle_kind_builds(kinds, kind, tmp_path):
    out = build_rtx(kinds[kind], tmp_path / kind)
    check_rtx_bundle(out, kinds[kind])
    names = {t.name for t in load_manifest(out).components["unet"].inputs}
    extra = {"lcm": "timestep_cond", "upscaler": "class_labels"}.get(kind)
    assert extra is None or extra in names
    if kind in ("inpaint", "upscaler"):
        sample = next(t for t in load_manifest(out).components["unet"].inputs if t.name == "sample")
        assert sample.shape[1] == {"inpaint": 9, "upscaler": 7}[kind]


def test_speed_lever_components_build(tiny_model, tmp_path):
    """--tiny-vae and --deepcache on a long-prompt bundle: the tiny VAE's encoder and decoder, DeepCache's full UNet
    (its deep feature a float32 output beside out_sample) and shallow UNet (that feature an input) build as engines,
    the DeepCache pair with the UNet's stepped context axis (one profile: one chunk up to the maximum)."""
    from runtime.bundle.levers import DEEP_FEATURE

    taesd = make_tiny_taesd(tmp_path / "taesd")
    source = build(tiny_model, tmp_path / "onnx", precision="fp16", tiny_vae=taesd, deepcache=0, max_prompt_tokens=150,
                   pipelines="txt2img,img2img", **QUIET)  # fmt: skip
    out = build_rtx(source, tmp_path / "rtx")
    check_rtx_bundle(out, source)
    c = load_manifest(out).components
    assert {"vae_decoder_tiny", "vae_encoder_tiny", "unet_deepcache", "unet_shallow"} <= set(c)
    [feature] = [t for t in c["unet_deepcache"].outputs if t.name == DEEP_FEATURE]
    assert feature in c["unet_shallow"].inputs and feature.dtype == "float32" and feature.shape[0] == 2
    for name in ("unet", "unet_deepcache", "unet_shallow"):
        assert c[name].input("encoder_hidden_states").steps == (0, 77, 0), name


def test_the_reference_model_builds_through_the_cli(tmp_path):
    """export.build --backend tensorrt-rtx from the shipped model: ONNX export, verification against torch, engines."""
    out = tmp_path / "ref"
    cmd = [sys.executable, "-m", "export.build", "--backend", "tensorrt-rtx", "--precision", "fp16", "--out", str(out)]
    cmd += ["--builder-optimization-level", "0"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "TensorRT for RTX" in done.stdout and "not run: no GPU here" in done.stdout
    manifest = load_manifest(out)
    assert {c.precision for c in manifest.components.values()} <= {"fp16", "fp32"}
    assert manifest.tensorrt.library == "tensorrt-rtx"
    assert all(c.build["onnx"]["verification"]["passed"] for c in manifest.components.values())  # ONNX vs torch, on the way


def test_turing_on_request(bundle_fp16, tmp_path):
    out = build_rtx(bundle_fp16, tmp_path / "turing", targets=compute_capabilities("7.5"))
    manifest = load_manifest(out)
    assert manifest.tensorrt.compute_capabilities == ("7.5",)
    assert out.name == "turing"
    assert manifest.components["unet"].build["from_onnx_args"][:4] == ["--backend", "tensorrt-rtx", "--compute-capability", "7.5"]


def test_compute_capability_choices_are_checked():
    assert compute_capabilities(None) == () == compute_capabilities("portable")
    assert compute_capabilities("8.6, 8.9,8.6") == ("8.6", "8.9")
    with pytest.raises(ValueError, match=r"--compute-capability 9\.0: TensorRT for RTX targets 7\.5, 8\.0, 8\.6, 8\.9, 12\.0, 12\.1"):
        compute_capabilities("9.0")


@without_gpu
def test_current_compute_capability_needs_a_gpu(bundle_fp16, tmp_path):
    with pytest.raises(
        EngineBuildError, match="--compute-capability current builds for this machine's GPU, and this machine has no CUDA GPU"
    ):
        build_rtx(bundle_fp16, tmp_path / "b", targets=("current",))
    assert not (tmp_path / "b").exists()


def test_network_outputs_must_be_the_manifests(bundle_fp16, tmp_path):
    unet = load_manifest(bundle_fp16).components["unet"]
    wrong = [TensorSpec("out_sample", (2, 4, 8, 16), "float32")]
    with pytest.raises(
        EngineBuildError, match=r"unet: output out_sample is float32 \(2, 4, 8, 8\) in the network but float32 \(2, 4, 8, 16\)"
    ):
        build_engine("unet", bundle_fp16 / unet.file, unet.inputs, FP16, BuilderSettings(), None, wrong, library=TENSORRT_RTX)


def test_from_onnx_cli_default_name_and_refusals(bundle_fp16, tmp_path, monkeypatch):
    from export.build import main
    from export.tensorrt import from_onnx

    monkeypatch.setattr(from_onnx, "ENGINES", tmp_path / "engines")
    assert main(["--from-onnx", str(bundle_fp16), "--backend", "tensorrt-rtx"]) == 0
    import tensorrt_rtx

    [out] = (tmp_path / "engines").iterdir()
    assert out.name == f"tiny-sd-64x64-b1-fp16-tensorrt-rtx{tensorrt_rtx.__version__}-portable"
    assert main(["--from-onnx", str(bundle_fp16), "--compute-capability", "8.6"]) == 2  # classic TensorRT targets no CC


@without_gpu
def test_loading_without_a_gpu_is_one_line_naming_the_onnxruntime_bundle(sd15_rtx, tiny_model):
    with pytest.raises(NoGpu) as e:
        runtime.Pipeline.load(sd15_rtx)
    msg = str(e.value)
    assert "holds TensorRT for RTX engines, which run on an NVIDIA GPU of compute capability 8.0, 8.6, 8.9, 12.0, 12.1" in msg
    assert "this machine has no CUDA GPU (cuda" in msg
    assert f"build and run an ONNX Runtime bundle instead: `python -m export.build --model {tiny_model}" in msg
    assert "--backend onnxruntime`" in msg and "\n" not in msg
    cmd = [sys.executable, "-m", "runtime", "--bundle", str(sd15_rtx), "a red circle", "-o", "x.png"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert "Traceback" not in done.stderr


def test_an_asymmetric_int8_onnx_is_refused_with_the_fix(tmp_path):
    """An int8 UNet quantized with zero points (the exporter's graph before it became symmetric) does not parse."""
    qdq_onnx(tmp_path / "q.onnx", zero_point=128)
    with pytest.raises(EngineBuildError, match=r"(?i)zero point.*symmetric int8 only.*--precision int8"):
        build_engine(
            "unet",
            tmp_path / "q.onnx",
            [TensorSpec("x", (1, 4), "float32")],
            Precision("int8", True, False, True),
            BuilderSettings(),
            library=TENSORRT_RTX,
        )


def test_manifest_records_the_library(sd15_rtx):
    raw = json.loads((sd15_rtx / "manifest.json").read_text())
    assert raw["tensorrt"]["library"] == "tensorrt-rtx" and raw["tensorrt"]["compute_capabilities"] == list(PORTABLE)


def test_profile_says_there_is_no_command_line_tool_for_rtx_engines(sd15_rtx):
    done = subprocess.run([sys.executable, "-m", "export.tensorrt.trtexec", str(sd15_rtx)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "TensorRT for RTX's pip wheel ships no command-line tool" in done.stderr
    assert f"python -m benchmarks.gpu --bundle {sd15_rtx}" in done.stderr


def test_verify_engines_where_they_land(sd15_rtx, bundle_fp16):
    """On the GPU: each engine against its carried ONNX, the build's gates; here the stand-in engine is that ONNX."""
    from export.tensorrt.from_onnx import onnx_component
    from export.tensorrt.verify import main, verify_bundle
    from runtime.dispatch import load_engine

    def onnx_as_engine(component, path):
        return load_engine(onnx_component(component), sd15_rtx, backend="onnxruntime", device="cpu")

    said: list[str] = []
    figures = verify_bundle(sd15_rtx, onnx_as_engine, said.append)
    assert set(figures) == set(load_manifest(sd15_rtx).components) and all(f["passed"] and f["rel_err"] == 0 for f in figures.values())
    assert said[1].startswith("  unet          fp16  error 0.00e+00 (gate 5e-02)  ok")
    if not has_gpu():
        assert main([str(sd15_rtx)]) == 2  # without a GPU: the runtime's one-line refusal
    assert main([str(bundle_fp16)]) == 2  # no engines in an ONNX bundle


def test_engine_build_benchmark_measures_each_engine_in_its_own_process(bundle_fp16, tmp_path):
    cmd = ["-m", "benchmarks.engine_build", "--bundle", str(bundle_fp16), "--components", "vae_decoder"]
    cmd += ["--builder-optimization-level", "0"]
    done = subprocess.run([sys.executable, *cmd, "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / f"engine-build-{bundle_fp16.name}-tensorrt-rtx.json").read_text())
    row = result["engines"]["vae_decoder"]
    assert row["bytes"] > 100_000 and row["seconds"] > 0 and row["peak_rss_bytes"] > 50 * 2**20 and row["precision"] == "fp16"
    assert "| vae_decoder | fp16 |" in (tmp_path / f"engine-build-{bundle_fp16.name}-tensorrt-rtx.md").read_text()


def test_build_for_turing_from_the_model_records_the_command(tiny_model, tmp_path):
    """export.build --backend tensorrt-rtx --compute-capability 7.5: the targets reach the builder and the rebuild hint."""
    from runtime.bundle import rebuild_hint

    out = build(tiny_model, tmp_path / "t", precision="fp16", backend="tensorrt-rtx", compute_capability="7.5",
                builder_optimization_level=0, pipelines="txt2img", **QUIET)  # fmt: skip
    m = load_manifest(out)
    assert m.tensorrt.compute_capabilities == ("7.5",)
    hint = rebuild_hint(out, m)
    assert "--backend tensorrt-rtx" in hint and "--compute-capability 7.5" in hint
