"""--precision int8: a calibrated QDQ UNet that the runtime runs, its record, its gate, and its bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.build import build, main
from export.int8 import calibration, quantize
from export.int8 import gate as int8_gate
from export.int8 import unet as int8
from runtime.bundle import read_bundle, sha256_file
from runtime.pipeline import Pipeline
from tests.helpers.rtx import build_rtx, check_rtx_bundle, needs_rtx

PROMPTS = "# calibration prompts for the tiny model\na red circle\n\na blue square on a white background\na green triangle\n"
SIZE = 2  # calibration generations: 40 UNet inputs, enough for the tiny model's ranges
FLOAT_CONVS = 2
# the sweep measures the convs nearest the output here, where a full sweep of this UNet finds its two most sensitive
# (the last up block's shortcuts); a real build measures all 63, about 1 s each
SWEPT = 8


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("int8") / "prompts.txt"
    path.write_text(PROMPTS)
    return path


@pytest.fixture(scope="module")
def sweep_cache(tmp_path_factory):
    """The sensitivity sweep's cache in a temp folder, not the checkout's engines/.cache."""
    mp = pytest.MonkeyPatch()
    folder = tmp_path_factory.mktemp("int8-cache")
    mp.setenv(quantize.CACHE_ENV, str(folder))
    yield folder
    mp.undo()


@pytest.fixture(scope="module")
def bundle_int8(tiny_model, prompts_file, sweep_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engines") / "tiny-int8"
    every = quantize.candidates
    mp = pytest.MonkeyPatch()
    mp.setattr(quantize, "candidates", lambda model, kept: every(model, kept)[-SWEPT:])
    try:
        return build(
            tiny_model, out, precision="int8", calibration_prompts=prompts_file, calibration_size=SIZE,
            int8_float_convs=FLOAT_CONVS, log=lambda _: None,
        )  # fmt: skip
    finally:
        mp.undo()


def quantization(bundle: Path) -> dict:
    manifest, _ = read_bundle(bundle)
    return dict(manifest.components["unet"].build["quantization"])


def test_int8_unet_has_qdq_nodes_and_runs_through_the_runtime(bundle_int8):
    manifest, _ = read_bundle(bundle_int8)
    unet = manifest.components["unet"]
    assert manifest.precision == "int8" and unet.precision == "int8"
    assert {c.precision for n, c in manifest.components.items() if n != "unet"} == {"fp32"}
    path = bundle_int8 / unet.file
    onnx.checker.check_model(str(path), full_check=True)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    with Pipeline.load(bundle_int8) as pipe:
        images = pipe.txt2img("a red circle", steps=4, seed=3, output_type="np")
    assert images.shape == (1, pipe.height, pipe.width, 3) and np.isfinite(images).all()


def test_manifest_records_tool_calibration_float_nodes_and_gate(bundle_int8, prompts_file):
    import onnxruntime

    q = quantization(bundle_int8)
    assert q["tool"] == "onnxruntime.quantization.quantize_static" and q["version"] == onnxruntime.__version__
    assert q["format"] == "QDQ" and q["placement"]["target"] == "symmetric"  # one graph for ONNX Runtime and TensorRT
    assert q["placement"]["QuantizeBias"] is False and q["placement"]["activations"] == "QInt8"
    cal = q["calibration"]
    assert cal["source"] == "file" and cal["path"] == str(prompts_file) and cal["sha256"] == sha256_file(prompts_file)
    assert cal["prompts"] == 3 and cal["generations"] == SIZE and cal["unet_inputs"] == SIZE * calibration.STEPS
    reasons = q["float_nodes"]
    assert any("conv_in" in why for why in reasons.values()) and any("conv_out" in why for why in reasons.values())
    assert any(why.startswith("time embedding") for why in reasons.values())
    assert any(why.startswith("attention batched matmul") for why in reasons.values())
    assert sum(why.startswith("sensitive") for why in reasons.values()) == FLOAT_CONVS
    assert q["sensitivity_sweep"]["run"] and q["sensitivity_sweep"]["convs_measured"] == SWEPT
    manifest, _ = read_bundle(bundle_int8)
    gate = manifest.components["unet"].verification
    assert gate["gate"] == "int8 trajectory + image" and gate["passed"] is True
    assert gate["unet"]["worst_bucket_rel_l2"] <= gate["limits"]["worst_bucket_rel_l2"]
    assert len(gate["unet"]["buckets"]) == int8_gate.BUCKETS and 0 <= gate["pixel_mae"] <= gate["limits"]["pixel_mae"]


def test_calibration_covers_the_sampler_timesteps_and_the_cfg_batch(bundle_fp32, bundle_int8):
    with Pipeline.load(bundle_fp32) as pipe:
        visited: list[float] = []
        pipe.txt2img("a", steps=calibration.STEPS, seed=0, output_type="latent", callback=lambda _i, _n, t: visited.append(t))
        rec = calibration.record(pipe, calibration.plan(("a red circle",), 1))
        rows = pipe.manifest.guidance_info.unet_batch
    assert len(visited) == calibration.STEPS
    assert sorted(set(rec.timesteps)) == sorted(set(visited))  # every noise level the sampler visits, no other
    assert all(f["sample"].shape[0] == rows == 2 for f in rec.feeds)  # the CFG batch the engine sees
    assert sorted(quantization(bundle_int8)["calibration"]["timesteps"]) == sorted(round(t, 3) for t in visited)


def test_the_sweep_is_cached(bundle_int8, bundle_fp32, recorded, sweep_cache, tmp_path):
    key = quantization(bundle_int8)["sensitivity_sweep"]["cache_key"]
    entry = json.loads((sweep_cache / "int8-sensitivity" / f"{key}.json").read_text())
    assert len(entry["errors"]) == quantization(bundle_int8)["sensitivity_sweep"]["convs_measured"]
    # measured once, then answered from the cache for the same UNet, calibration and nodes
    manifest, _ = read_bundle(bundle_fp32)
    source, where = bundle_fp32 / manifest.components["unet"].file, quantize.placement("onnxruntime")
    names = quantize.candidates(onnx.load(str(source)), {})[-2:]
    ranges = tmp_path / "ranges.json"
    quantize.quantize(source, tmp_path / "all.onnx", recorded.feeds, where, ranges=ranges)
    first, record1 = quantize.sensitivity(source, recorded.feeds, where, names, ranges, calibration_id="run 1")
    again, record2 = quantize.sensitivity(source, recorded.feeds, where, names, ranges, calibration_id="run 1")
    assert (record1["cached"], record2["cached"]) == (False, True) and first == again and all(v > 0 for v in first.values())


@pytest.fixture(scope="module")
def recorded(bundle_fp32):
    with Pipeline.load(bundle_fp32) as pipe:
        return calibration.record(pipe, calibration.plan(("a red circle",), 1))


class Feeds:
    """onnxruntime.quantization's CalibrationDataReader protocol over recorded feeds."""

    def __init__(self, feeds):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


def test_calibration_equals_onnxruntimes_own_and_skips_float_nodes(bundle_fp32, recorded, tmp_path):
    """Our low-memory pass gives the QDQ model quantize_static's own calibrator gives (same scales and zero
    points), and reduces no tensor that only float nodes read: the attention scores are never calibrated."""
    from onnx import numpy_helper
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    manifest, _ = read_bundle(bundle_fp32)
    source = bundle_fp32 / manifest.components["unet"].file
    model = onnx.load(str(source))
    kept = quantize.float_rules(model)
    where = quantize.placement("onnxruntime")
    ranges = tmp_path / "ranges.json"
    quantize.quantize(source, tmp_path / "ours.onnx", recorded.feeds, where, exclude=sorted(kept), ranges=ranges)
    with quantize.quiet_quantizer():
        quantize_static(
            str(source), str(tmp_path / "theirs.onnx"), Feeds(recorded.feeds), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(quantize.OP_TYPES), per_channel=True, reduce_range=where.reduce_range,
            activation_type=getattr(QuantType, where.activation), weight_type=getattr(QuantType, where.weight),
            nodes_to_exclude=sorted(kept), calibrate_method=CalibrationMethod.MinMax, extra_options=dict(where.extra),
        )  # fmt: skip
    ours, theirs = (onnx.load(str(tmp_path / f"{n}.onnx")).graph for n in ("ours", "theirs"))
    assert [n.op_type for n in ours.node] == [n.op_type for n in theirs.node]
    got, want = ({t.name: numpy_helper.to_array(t) for t in g.initializer} for g in (ours, theirs))
    assert got.keys() == want.keys()
    for name, value in want.items():  # ranges agree to float32 rounding: a quantized bias may move by one step
        exact = np.issubdtype(value.dtype, np.integer)
        np.testing.assert_allclose(got[name], value, rtol=0 if exact else 1e-5, atol=1 if exact else 0, err_msg=name)
    calibrated = set(json.loads(ranges.read_text())["data"])
    scores = {n.output[0] for n in model.graph.node if n.name in kept and n.op_type == "MatMul"}
    assert scores and not scores & calibrated
    assert calibrated == set(quantize.calibration_tensors(model, exclude=sorted(kept)))


def test_the_quantizer_never_modifies_its_source(bundle_fp32, recorded, tmp_path):
    manifest, _ = read_bundle(bundle_fp32)
    source = bundle_fp32 / manifest.components["unet"].file
    before = sha256_file(source)
    quantize.quantize(source, tmp_path / "q.onnx", recorded.feeds, quantize.placement("onnxruntime"))
    assert sha256_file(source) == before == manifest.files[manifest.components["unet"].file]
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(tmp_path / "q.onnx")).graph.node)


def test_tensorrt_placement_is_symmetric_int8_with_a_qdq_pair_per_consumer(bundle_fp32, recorded, tmp_path):
    """TensorRT fuses Q/DQ into int8 kernels for symmetric signed int8 (zero point 0) only, and rejects int32 biases."""
    from onnx import TensorProto, numpy_helper

    manifest, _ = read_bundle(bundle_fp32)
    target = tmp_path / "trt.onnx"
    quantize.quantize(bundle_fp32 / manifest.components["unet"].file, target, recorded.feeds, quantize.placement("tensorrt"))
    graph = onnx.load(str(target)).graph
    inits = {t.name: t for t in graph.initializer}
    zero_points = [inits[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zero_points and all(z.data_type == TensorProto.INT8 for z in zero_points)
    assert all(not numpy_helper.to_array(z).any() for z in zero_points)
    dequantized = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    assert not [n for n in dequantized if n in inits and inits[n].data_type == TensorProto.INT32]  # biases stay float
    onnx.checker.check_model(str(target), full_check=True)


@needs_rtx
def test_the_int8_bundle_builds_with_tensorrt_for_rtx(bundle_int8, tmp_path):
    """The very Q/DQ graph the gate measured parses and builds in TensorRT for RTX (asymmetric int8 was refused)."""
    out = build_rtx(bundle_int8, tmp_path / "rtx")
    check_rtx_bundle(out, bundle_int8, precision=None)
    unet = read_bundle(out)[0].components["unet"]
    assert unet.precision == "int8" and unet.build["flags"]["strongly_typed"] is True
    assert sha256_file(out / "unet" / "model.onnx") == sha256_file(bundle_int8 / "unet" / "model.onnx")


def test_the_gate_fails_a_broken_calibration_with_its_figures(bundle_fp32, recorded, tmp_path, monkeypatch):
    """Calibrated on latents and text 1000x too small, the activation ranges clip: the gate must catch it."""
    monkeypatch.setattr(int8, "GATE_GENERATIONS", 2)
    broken = [{k: (v * 1e-3 if v.dtype == np.float32 and k != "timestep" else v) for k, v in f.items()} for f in recorded.feeds]
    manifest, _ = read_bundle(bundle_fp32)
    unet = manifest.components["unet"]
    target = tmp_path / "broken.onnx"
    quantize.quantize(bundle_fp32 / unet.file, target, broken, quantize.placement("onnxruntime"))
    with Pipeline.load(bundle_fp32) as pipe:
        held = int8.held_out(pipe, calibration.PromptSet("file", ("a red circle",)))
        figures = int8.measure(pipe, unet, target, held, lambda _: None)
    assert figures["passed"] is False
    assert figures["unet"]["worst_bucket_rel_l2"] > int8_gate.MAX_UNET_REL_L2
    with pytest.raises(int8_gate.Int8GateError, match=r"over the quality gate: UNet relative L2 worst bucket \d+\.\d+ .*pixel MAE"):
        int8.check_gate(figures, force=False, log=lambda _: None)
    said: list[str] = []
    int8.check_gate(figures, force=True, log=said.append)  # --force keeps it, and says so
    assert "FAILED" in said[0]


def test_a_build_over_the_gate_writes_nothing(tiny_model, prompts_file, sweep_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(int8_gate, "MAX_PIXEL_MAE", 0.0)
    monkeypatch.setattr(int8, "GATE_GENERATIONS", 1)
    out = tmp_path / "engines" / "b"
    with pytest.raises(int8_gate.Int8GateError, match=r"pixel MAE vs fp32 \d\.\d+ \(limit 0\).*nothing was written.*--force"):
        build(
            tiny_model, out, precision="int8", calibration_prompts=prompts_file, calibration_size=1, int8_float_convs=0,
            log=lambda _: None,
        )  # fmt: skip
    assert list((tmp_path / "engines").iterdir()) == []


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "holds no prompts"),
        (b"# only a comment\n\n   \n", "holds no prompts"),
        (b"caf\xe9 au lait\n", "is not UTF-8 text"),
    ],
)
def test_bad_prompts_files_are_refused_before_any_work(tiny_model, tmp_path, capsys, content, expected):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(content)
    out = tmp_path / "b"
    code, err = run_cli(capsys, "--model", str(tiny_model), "--out", str(out), "--precision", "int8", "--calibration-prompts", str(prompts))
    assert code == 2 and f"--calibration-prompts {prompts} {expected}" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [prompts]


def test_unreadable_prompts_are_refused(tiny_model, tmp_path, capsys):
    for path, expected in ((tmp_path / "missing.txt", "cannot be read"), (tmp_path, "is a folder")):
        code, err = run_cli(capsys, "--model", str(tiny_model), "--out", str(tmp_path / "b"), "--precision", "int8",
                            "--calibration-prompts", str(path))  # fmt: skip
        assert code == 2 and expected in err
    assert not (tmp_path / "b").exists()


def test_calibration_size_zero_is_refused(tiny_model, tmp_path, capsys):
    code, err = run_cli(capsys, "--model", str(tiny_model), "--out", str(tmp_path / "b"), "--precision", "int8", "--calibration-size", "0")
    assert code == 2 and "--calibration-size must be a whole number of generations >= 1, got 0" in err
    assert not (tmp_path / "b").exists()


def test_an_onnxruntime_too_old_for_the_quantizer_is_refused_before_any_export(tiny_model, tmp_path, capsys, monkeypatch):
    import onnxruntime

    quantize.check_quantizer("1.27.0")
    monkeypatch.setattr(onnxruntime, "__version__", "1.26.2")
    code, err = run_cli(capsys, "--model", str(tiny_model), "--out", str(tmp_path / "b"), "--precision", "int8")
    assert code == 2 and "--precision int8 needs onnxruntime >= 1.27" in err and "found 1.26.2: pip install -U" in err
    assert not (tmp_path / "b").exists()


def test_int8_without_txt2img_in_the_bundle_is_refused(tiny_model, tmp_path, capsys):
    code, err = run_cli(capsys, "--model", str(tiny_model), "--out", str(tmp_path / "b"), "--precision", "int8", "--pipelines", "img2img")
    assert code == 2 and "--pipelines img2img leaves it out; add txt2img to --pipelines, or build it with --precision fp16 or fp32" in err
    assert not (tmp_path / "b").exists()


def test_calibration_prompts_need_int8(tiny_model, prompts_file, tmp_path, capsys):
    code, err = run_cli(capsys, "--model", str(tiny_model), "--out", str(tmp_path / "b"), "--calibration-prompts", str(prompts_file))
    assert code == 2 and "--calibration-prompts is for --precision int8, not fp16" in err


def test_sd2_v_prediction_exports_int8(tmp_path_factory, prompts_file, sweep_cache, monkeypatch):
    """SD 2.x (v-prediction, linear-projection attention: proj_in/out are MatMuls) through the same road."""
    from tests.helpers.tiny_models import make_tiny_sd

    monkeypatch.setattr(int8, "GATE_GENERATIONS", 2)
    model = make_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd2", kind="sd2")
    out = build(
        model, tmp_path_factory.mktemp("engines") / "sd2-int8", precision="int8", calibration_prompts=prompts_file,
        calibration_size=1, int8_float_convs=0, log=lambda _: None,
    )  # fmt: skip
    manifest, _ = read_bundle(out)
    assert manifest.model.prediction_type == "v_prediction" and manifest.components["unet"].verification["passed"] is True
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(out / manifest.components["unet"].file)).graph.node)


def test_a_unet_past_2gb_is_quantized_and_published_with_external_data(tiny_model, prompts_file, sweep_cache, tmp_path, monkeypatch):
    """A full-size UNet (3.4 GB fp32) is stored as external data: the quantizer must read and write it so, and the
    published int8 UNet must leave no stale fp32 data file behind. The limits are lowered to make the tiny model 'large'."""
    from export import onnx_export

    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", (64 << 20) + 1024)  # every file goes to external data
    monkeypatch.setattr(quantize, "LARGE", 0)
    monkeypatch.setattr(int8, "GATE_GENERATIONS", 1)
    # force: this random UNet without the sweep sits near the gate; the storage is what is tested here
    out = build(
        tiny_model, tmp_path / "big", precision="int8", calibration_prompts=prompts_file, calibration_size=1,
        int8_float_convs=0, force=True, log=lambda _: None,
    )  # fmt: skip
    manifest, _ = read_bundle(out)  # every file's sha256 checked
    unet = manifest.components["unet"]
    assert sorted(p.name for p in (out / unet.file).parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert set(manifest.files) >= {unet.file, unet.file + ".data"}
    with Pipeline.load(out) as pipe:
        assert np.isfinite(pipe.txt2img("a red circle", steps=2, seed=0, output_type="np")).all()


def test_the_int8_benchmark_writes_its_figures_and_leaves_the_bundle_alone(bundle_fp32, tmp_path):
    """benchmarks.int8_unet on the tiny bundle: calibration, quantization (in child processes) and interleaved calls."""
    import subprocess
    import sys

    from tests.helpers import REPO

    manifest, _ = read_bundle(bundle_fp32)
    before = sorted(p.name for p in (bundle_fp32 / "unet").iterdir())
    cmd = ["-m", "benchmarks.int8_unet", "--bundle", str(bundle_fp32), "--steps", "4", "--calls", "2", "--out", str(tmp_path)]
    done = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("int8-unet-*.json")).read_text())
    assert result["calibration"]["unet_inputs"] == 4  # one generation, one UNet call per step
    q = result["quantization"]
    assert 0 < q["calibration_pass_seconds"] <= q["seconds"] and 0 < q["calibration_pass_peak_rss_bytes"] <= q["peak_rss_bytes"]
    assert all(len(v) == 2 for v in result["call_seconds"].values())
    assert 0 < result["size_ratio"] < 0.5 and result["rel_l2_mid_trajectory"] < 0.1
    assert "| UNet call (median of 2, interleaved) |" in next(tmp_path.glob("int8-unet-*.md")).read_text()
    assert sorted(p.name for p in (bundle_fp32 / "unet").iterdir()) == before
    read_bundle(bundle_fp32)  # every hash still matches
