"""LoRA both ways on the tiny SD model: fused at export (`--lora FILE[:SCALE]`) and switched at run time through
slot inputs (`--lora-slots RANK` + Pipeline.set_lora), against diffusers' own load_lora_weights + fuse_lora.

Adapters: A in the diffusers/peft layout (rank 4, lora_alpha 8 in the file's lora_adapter_metadata: scale 2), B in the
kohya layout (rank 8, alpha 4, a subset of the layers, 1x1-conv proj_in included). diffusers cannot load B's kohya text
encoder keys here (its conversion raises "Could not automatically infer state dict type" with transformers 5), so
the reference loads B's peft twin: the same numbers in the peft layout (test_layouts_read_the_same proves them equal).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

import runtime
from runtime.errors import BundleError
from runtime.lora import LoraError, read_adapter
from runtime.pipeline import initial_latents
from tests.helpers import REPO
from tests.helpers.lora_adapters import make_adapter
from tests.helpers.rtx import build_rtx, check_rtx_bundle, needs_rtx

PROMPT = "a small red circle in the top left on a black background"
STEPS, GUIDANCE = 4, 7.5
SLOT_RANK = 12  # A (4) + B (8): both fit at once


def few_layers(component: str, module: str) -> bool:
    return module.endswith(("attn1.to_q", "attn2.to_v", "proj_in", "self_attn.q_proj", "mlp.fc1"))


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    b = dict(rank=8, alpha=4, seed=2, select=few_layers)
    return {
        "a": make_adapter(tiny_model, d / "a.safetensors", layout="peft", rank=4, alpha=8, seed=1),
        "b": make_adapter(tiny_model, d / "b_kohya.safetensors", layout="kohya", **b),
        "b_peft": make_adapter(tiny_model, d / "b_peft.safetensors", layout="peft", **b),
        "rank16": make_adapter(tiny_model, d / "rank16.safetensors", rank=16, seed=3, select=few_layers),
        "outside": make_adapter(tiny_model, d / "time.safetensors", seed=4, select=lambda c, m: m.startswith("time_embedding")),
    }


@pytest.fixture(scope="module")
def fused(tiny_model, adapters, tmp_path_factory):
    """A at 0.8 and B (kohya) at 0.5 fused, through the real CLI."""
    out = tmp_path_factory.mktemp("engines") / "tiny-lora"
    cmd = [sys.executable, "-m", "export.build", "--model", str(tiny_model), "--precision", "fp32", "--out", str(out)]
    cmd += ["--lora", f"{adapters['a']}:0.8", "--lora", f"{adapters['b']}:0.5"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "LoRA a.safetensors fused at scale 0.8" in done.stdout and "LoRA b_kohya.safetensors fused at scale 0.5" in done.stdout
    return out


@pytest.fixture(scope="module")
def slotted(tiny_model, tmp_path_factory):
    from export.build import build

    return build(tiny_model, tmp_path_factory.mktemp("engines") / "tiny-slots", precision="fp32", lora_slots=SLOT_RANK, log=lambda _: None)


@pytest.fixture(scope="module")
def latents():
    return initial_latents((1, 4, 8, 8), seed=5)


def generate(pipe, latents):
    return pipe.txt2img(PROMPT, steps=STEPS, guidance_scale=GUIDANCE, latents=latents, output_type="np")


@pytest.fixture(scope="module")
def reference(tiny_model, adapters, latents):
    """diffusers' images: A at 1 and B at 0.5 through its LoRA layers (set_adapters), then A at 0.8 and B at 0.5 fused
    into the weights by fuse_lora. One pipeline, both adapters loaded by load_lora_weights (B as its peft twin)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(adapters["a"]), adapter_name="a")
    with warnings.catch_warnings():  # peft notes that the model now holds two adapters: what this reference wants
        warnings.filterwarnings("ignore", "Already found a `peft_config` attribute")
        pipe.load_lora_weights(str(adapters["b_peft"]), adapter_name="b")

    def run():
        return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=torch.from_numpy(latents), output_type="np").images

    images = {}
    for name, scale in (("a", 1.0), ("b", 0.5)):
        pipe.set_adapters([name], [scale])
        images[name] = run()
    pipe.set_adapters(["a", "b"], [0.8, 0.5])
    pipe.fuse_lora(adapter_names=["a", "b"])
    pipe.unload_lora_weights()  # the fused weights stay, the LoRA layers go: the image comes from the weights alone
    images["ab_fused"] = run()
    return images


@pytest.fixture(scope="module")
def base_image(bundle_fp32, latents):
    return generate(runtime.Pipeline.load(bundle_fp32), latents)


# -- fused at export ------------------------------------------------------------------------------


def test_fused_bundle_matches_diffusers_fuse_lora(fused, reference, latents, base_image):
    ours = generate(runtime.Pipeline.load(fused), latents)
    ref = reference["ab_fused"]
    assert np.abs(ref - base_image).max() > 0.05, "the adapters barely change the image: the comparison would prove nothing"
    assert np.abs(ours - ref).max() <= 1e-3


def test_fused_manifest_records_each_adapter(fused, adapters):
    lora = runtime.load_manifest(fused).lora
    assert lora is not None and lora.slot_rank == 0 and lora.targets == ()
    recorded = [(a.file, a.sha256, a.scale) for a in lora.fused]
    expected = [(str(adapters[k].resolve()), hashlib.sha256(adapters[k].read_bytes()).hexdigest(), s) for k, s in (("a", 0.8), ("b", 0.5))]
    assert recorded == expected
    raw = json.loads((fused / "manifest.json").read_text())
    assert raw["lora"]["fused"][1] == {"file": expected[1][0], "sha256": expected[1][1], "scale": 0.5}
    hint = runtime.Pipeline.load(fused).rebuild()
    assert f"--lora {expected[0][0]}:0.8 --lora {expected[1][0]}:0.5" in hint


def test_layouts_read_the_same(tiny_model, adapters):
    """B in kohya's layout (alpha tensors, flattened names, 4-D 1x1-conv matrices) is B in peft's layout."""
    layers = model_layers(tiny_model)
    kohya, peft = read_adapter(adapters["b"], layers), read_adapter(adapters["b_peft"], layers)
    # to_q, to_v, proj_in in each of the tiny UNet's 10 attention blocks; q_proj, fc1 in its 2 text encoder layers
    assert len(kohya.updates) == len(peft.updates) == 34
    by_layer = {(u.component, u.module): u for u in peft.updates}
    assert {u.module for u in kohya.updates if u.module.endswith("proj_in")}, "the 1x1 conv layers were not read"
    for u in kohya.updates:
        twin = by_layer[(u.component, u.module)]
        assert np.array_equal(u.delta(0.5), twin.delta(0.5)) and u.alpha == twin.alpha == 4.0


# -- switched at run time ----------------------------------------------------------------------------


def test_slotted_matches_diffusers_for_each_adapter(slotted, reference, adapters, latents):
    pipe = runtime.Pipeline.load(slotted)
    pipe.set_lora(adapters["a"])
    assert np.abs(generate(pipe, latents) - reference["a"]).max() <= 1e-3
    pipe.set_lora(adapters["b"], 0.5)
    assert np.abs(generate(pipe, latents) - reference["b"]).max() <= 1e-3
    assert pipe.lora == (("b_kohya.safetensors", 0.5),)


def test_slotted_sum_with_scales_matches_the_fused_bundle(slotted, fused, adapters, latents):
    pipe = runtime.Pipeline.load(slotted)
    pipe.set_lora([(adapters["a"], 0.8), (adapters["b"], 0.5)])
    assert np.abs(generate(pipe, latents) - generate(runtime.Pipeline.load(fused), latents)).max() <= 1e-3


def test_switching_is_exact_and_zero_is_the_base_model(slotted, adapters, latents, base_image):
    pipe = runtime.Pipeline.load(slotted)
    none = generate(pipe, latents)
    assert np.abs(none - base_image).max() <= 1e-5  # zero slots: the base model (another graph, so not bit for bit)
    pipe.set_lora(adapters["a"])
    a1 = generate(pipe, latents)
    pipe.set_lora((adapters["b"], 0.7))  # one (file, scale) pair
    b = generate(pipe, latents)
    pipe.set_lora(adapters["a"])
    a2 = generate(pipe, latents)
    assert np.abs(a1 - b).max() > 0.05
    assert np.array_equal(a1, a2), "A -> B -> A must give A's image bit for bit"
    pipe.set_lora(adapters["a"], 0.0)
    assert np.array_equal(generate(pipe, latents), none)
    pipe.set_lora(None)
    assert np.array_equal(generate(pipe, latents), none) and pipe.lora == ()


def test_set_lora_refusals_name_the_rebuild(slotted, fused, bundle_fp32, adapters, latents):
    pipe = runtime.Pipeline.load(slotted)
    pipe.set_lora(adapters["a"])
    a = generate(pipe, latents)
    larger = r"rank 12; rebuild it with larger slots: `python -m export.build .*--lora-slots"
    with pytest.raises(LoraError, match=rf"need rank 16 at .*{larger} 16"):
        pipe.set_lora(adapters["rank16"])
    ranks = r"\(a.safetensors: 4 \+ b_kohya.safetensors: 8 \+ b_kohya.safetensors: 8\)"
    with pytest.raises(LoraError, match=rf"need rank 20 at .*{ranks}, .*{larger} 20"):
        pipe.set_lora([(adapters["a"], 1.0), (adapters["b"], 1.0), (adapters["b"], 0.2)])
    outside = r"unet.time_embedding.linear_1.lora_A.weight names unet layer .*LoRA slots"
    with pytest.raises(LoraError, match=rf"{outside}.*fuse it at export instead: `python -m export.build .*--lora .*time.safetensors:1.0"):
        pipe.set_lora(adapters["outside"])
    assert np.array_equal(generate(pipe, latents), a), "a refused set_lora changed the adapters in use"
    with pytest.raises(BundleError, match=r"has no LoRA slots: it was built without --lora-slots.*--lora-slots 8"):
        runtime.Pipeline.load(bundle_fp32).set_lora(adapters["a"])
    with pytest.raises(BundleError, match=r"a.safetensors, b_kohya.safetensors are fused into its weights.*--lora-slots 8 --out"):
        runtime.Pipeline.load(fused).set_lora(adapters["a"])
    with pytest.raises(TypeError, match="set_lora takes None, a file, or a list"):
        pipe.set_lora([3])


def test_slotted_manifest_records_rank_and_targets(slotted):
    m = runtime.load_manifest(slotted)
    assert m.lora is not None and m.lora.slot_rank == SLOT_RANK and m.lora.fused == ()
    unet = {t.name: t.shape for t in m.components["unet"].inputs}
    kinds = {t.kind for t in m.lora.targets}
    assert kinds == {"linear", "conv1x1"}
    for t in m.lora.targets:
        shapes = {t.name: t.shape for t in m.components[t.component].inputs}
        assert shapes[t.a][1:] == (t.in_features, SLOT_RANK) and shapes[t.b][1:] == (SLOT_RANK, t.out_features)
    assert unet["lora_a_32_32"][0] == sum(1 for t in m.lora.targets if t.component == "unet" and t.a == "lora_a_32_32")
    assert "--lora-slots 12" in runtime.Pipeline.load(slotted).rebuild()


# -- bad adapter files --------------------------------------------------------------------------------


def model_layers(model_dir):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from export.lora import layers_of

    return {
        "unet": layers_of(UNet2DConditionModel.from_pretrained(model_dir / "unet")),
        "text_encoder": layers_of(CLIPTextModel.from_pretrained(model_dir / "text_encoder")),
    }


@pytest.fixture(scope="module")
def layers(tiny_model):
    return model_layers(tiny_model)


def save(path, tensors, metadata=None):
    from safetensors.numpy import save_file

    save_file({k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def lora(name, rank=2, fin=32, fout=32):
    return {f"{name}.lora_A.weight": np.ones((rank, fin)), f"{name}.lora_B.weight": np.ones((fout, rank))}


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({**lora(Q), f"{Q}.lora_B.weight": np.ones((32, 3))}, rf"{Q}.lora_B.weight has shape \(32, 3\), but unet layer .* needs \(32, 2\)"),
        (lora(Q, fin=48), rf"{Q}.lora_A.weight has shape \(2, 48\).*made for another base model"),
        (lora("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn9.to_q"), r"names unet layer .*attn9.to_q.*does not have"),
        ({**lora(Q), "lora_unet_mid_block_x.lora_down.weight": np.ones((2, 32))}, "lora_unet_mid_block_x.lora_down.weight names unet"),
        ({**lora(Q), "unet.something_else": np.ones(2)}, r"key unet.something_else is in neither LoRA layout"),
        ({**lora(Q), f"{Q}.lora_magnitude_vector": np.ones(32)}, "DoRA"),
        ({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.ones((2, 32))}, "SDXL's second text encoder"),
        ({f"{Q}.lora_A.weight": np.ones((2, 32))}, rf"{Q}.lora_A.weight has no matching up matrix"),
        (lora("unet.conv_in", fin=4), r"unet layer conv_in, a 3x3 Conv2d; this SDK applies LoRA to Linear and 1x1 Conv2d layers only"),
    ],
    ids=["ranks-differ", "other-base-model", "unknown-layer", "unknown-kohya-layer", "not-lora", "dora", "sdxl", "no-up", "3x3-conv"],
)
def test_bad_adapter_names_the_first_bad_key(tmp_path, layers, tensors, message):
    with pytest.raises(LoraError, match=message):
        read_adapter(save(tmp_path / "bad.safetensors", tensors), layers)


def test_pickle_truncated_and_foreign_files_are_refused(tmp_path, layers, adapters):
    import torch

    torch.save({"x": torch.ones(2)}, tmp_path / "adapter.safetensors")  # a pickle behind a safetensors name
    with pytest.raises(LoraError, match=r"is a pickle \(torch.save\) file, which can run code"):
        read_adapter(tmp_path / "adapter.safetensors", layers)
    (tmp_path / "adapter.bin").write_bytes(b"PK\x03\x04")  # torch.save's zip, by its name alone
    with pytest.raises(LoraError, match="adapter.bin is a pickle"):
        read_adapter(tmp_path / "adapter.bin", layers)
    data = adapters["a"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoraError, match=r"cut.safetensors cannot be read as safetensors: .*\(truncated or damaged\?\)"):
        read_adapter(tmp_path / "cut.safetensors", layers)
    (tmp_path / "head.safetensors").write_bytes(data[:100])
    with pytest.raises(LoraError, match="not a safetensors file, or is truncated"):
        read_adapter(tmp_path / "head.safetensors", layers)
    (tmp_path / "text.safetensors").write_text("hello, I am not tensors")
    with pytest.raises(LoraError, match="not a safetensors file"):
        read_adapter(tmp_path / "text.safetensors", layers)
    with pytest.raises(LoraError, match="does not exist"):
        read_adapter(tmp_path / "missing.safetensors", layers)


def test_metadata_alpha_and_patterns(tmp_path, layers):
    meta = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 6, "unet.r": 2})}
    (u,) = read_adapter(save(tmp_path / "a.safetensors", lora(Q), meta), layers).updates
    assert u.alpha == 6.0 and np.allclose(u.delta(1.0), 3.0 * 2)  # 6 / rank 2 * (ones @ ones: 2)
    (u,) = read_adapter(save(tmp_path / "b.safetensors", lora(Q)), layers).updates
    assert u.alpha == 2.0  # no alpha anywhere: alpha = rank, as peft's default
    meta = {"lora_adapter_metadata": json.dumps({"unet.alpha_pattern": {"to_q": 3}})}
    with pytest.raises(LoraError, match="per-layer alpha_pattern"):
        read_adapter(save(tmp_path / "c.safetensors", lora(Q), meta), layers)


def test_cli_refuses_a_bad_adapter_before_writing(tiny_model, tmp_path):
    bad = save(tmp_path / "other.safetensors", lora(Q, fin=48))
    out = tmp_path / "bundle"
    cmd = [sys.executable, "-m", "export.build", "--model", str(tiny_model), "--out", str(out), "--lora", f"{bad}:0.5"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("error: LoRA file ") and "lora_A.weight has shape (2, 48)" in done.stderr
    assert "Traceback" not in done.stderr and not out.exists()
    done = subprocess.run([*cmd[:-2], "--lora", "nothing.safetensors:x"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "error: --lora nothing.safetensors:x: nothing.safetensors:x is not a file" in done.stderr


# -- TensorRT: the same slot inputs (no refit), built here with a stand-in builder -----------------------


def test_tensorrt_bundle_takes_the_same_slot_inputs(slotted, tmp_path):
    """--from-onnx keeps the slots as engine inputs and records them; the stand-in engine is the ONNX itself
    (as in test_tensorrt_offline), so the verification that fed it slot inputs is real."""
    from export.tensorrt.from_onnx import build_from_onnx, onnx_component
    from runtime.bundle.fit import Device
    from runtime.dispatch import load_engine

    built: dict[str, list[str]] = {}

    def fake_plan(name, onnx_path, inputs, precision, settings, timing_cache, outputs):
        built[name] = [t.name for t in inputs]
        return f"plan {name}".encode()

    def onnx_as_engine(component, path):
        return load_engine(onnx_component(component), path.parent.parent, backend="onnxruntime", device="cpu")

    out = build_from_onnx(
        slotted, tmp_path / "trt", build=fake_plan, open_engine=onnx_as_engine, device=Device("10.3.0.30", "Orin", "8.7"),
        timing_cache_root=tmp_path / "cache", log=lambda _: None,
    )  # fmt: skip
    source, m = runtime.load_manifest(slotted), runtime.load_manifest(out)
    assert m.lora == source.lora and m.backend == "tensorrt"
    for name in ("unet", "text_encoder"):
        slots = [t.name for t in source.components[name].inputs if t.name.startswith("lora_")]
        assert slots and set(slots) <= set(built[name]) and m.components[name].inputs == source.components[name].inputs
        assert m.components[name].format == "plan" and m.components[name].verification["passed"]
    assert "--lora-slots 12" in runtime.bundle.rebuild_hint(out, m) and "--backend tensorrt" in runtime.bundle.rebuild_hint(out, m)


@needs_rtx
@pytest.mark.parametrize("which", ["fused", "slotted"])
def test_lora_bundles_build_with_tensorrt_for_rtx(which, fused, slotted, tmp_path):
    """Real engines: the fused weights, and the slot graph (its low-rank matrices are engine inputs)."""
    source = {"fused": fused, "slotted": slotted}[which]
    out = build_rtx(source, tmp_path / which)
    check_rtx_bundle(out, source)
    m = runtime.load_manifest(out)
    assert m.lora == runtime.load_manifest(source).lora
    slots = [t.name for t in m.components["unet"].inputs if t.name.startswith("lora_")]
    assert bool(slots) == (which == "slotted")


def test_runtime_cli_feeds_adapters_through_the_slots(slotted, bundle_fp32, adapters, tmp_path):
    """`python -m runtime --lora FILE:SCALE` equals set_lora; on a bundle without slots it is one error line."""
    from PIL import Image

    def cli(bundle, *more):
        args = ["a red circle", "--bundle", str(bundle), "--steps", "2", "--seed", "3", "--quiet", *more]
        return subprocess.run([sys.executable, "-m", "runtime", *args], cwd=REPO, capture_output=True, text=True, timeout=300)

    done = cli(slotted, "--lora", f"{adapters['a']}:0.8", "--lora", str(adapters["b"]), "-o", str(tmp_path / "ab.png"))
    assert done.returncode == 0, done.stderr
    pipe = runtime.Pipeline.load(slotted)
    pipe.set_lora([(adapters["a"], 0.8), (adapters["b"], 1.0)])
    expected = pipe.txt2img("a red circle", steps=2, seed=3)[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "ab.png")), np.asarray(expected))
    done = cli(bundle_fp32, "--lora", str(adapters["a"]), "-o", str(tmp_path / "x.png"))
    assert done.returncode == 2 and done.stderr.startswith("error: bundle ") and "--lora-slots 8" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "x.png").exists()


def test_manifest_lora_round_trip_and_altered_slots(slotted, fused, tmp_path):
    from runtime.bundle import Manifest

    for bundle in (slotted, fused):
        raw = json.loads((bundle / "manifest.json").read_text())
        assert Manifest.from_json(raw).to_json() == raw
    raw = json.loads((slotted / "manifest.json").read_text())
    raw["lora"]["slots"]["targets"][0]["a"] = "lora_a_9_9"
    with pytest.raises(BundleError, match=r"malformed manifest .*names input 'lora_a_9_9', which unet lacks"):
        Manifest.from_json(raw)
    raw = json.loads((fused / "manifest.json").read_text())
    raw["lora"]["fused"][0]["sha256"] = "abc"
    with pytest.raises(BundleError, match="malformed manifest .*needs a sha256"):
        Manifest.from_json(raw)
