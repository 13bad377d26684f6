"""--low-memory: fp16 components traced from half-precision torch (no fp32 ONNX), torch weights freed once exported.

What it saves in memory is measured at full size by benchmarks.sdxl; here: the bundle it gives is an fp16 bundle
within the fp16 gate, with fp16 weights in its ONNX files and float32 I/O, and images as close to diffusers'.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import runtime
from export.build import main
from runtime.bundle import load_manifest
from tests.sdxl.test_sdxl_bundles import PROMPT


@pytest.fixture(scope="module")
def low_memory_bundle(sdxl_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl-engines") / "base-fp16-low-memory"
    args = ["--model", str(sdxl_models["base"]), "--precision", "fp16", "--low-memory", "--pipelines", "txt2img", "--out", str(out)]
    assert main(args) == 0
    return out


def initializer_bytes(path) -> dict[str, int]:
    """Data type name -> bytes of the model's weights (initializers) of that type."""
    counts: dict[str, int] = {}
    for t in onnx.load(str(path)).graph.initializer:
        name = onnx.TensorProto.DataType.Name(t.data_type)
        counts[name] = counts.get(name, 0) + len(t.raw_data)
    return counts


@pytest.mark.parametrize("name", ["text_encoder", "text_encoder_2", "unet"])
def test_the_traced_components_are_fp16_within_the_gate_with_float32_io(low_memory_bundle, name):
    component = load_manifest(low_memory_bundle).components[name]
    assert component.precision == "fp16" and "traced in fp16 (--low-memory)" in component.build["note"]
    figures = component.verification
    assert figures["passed"] and figures["rel_err"] <= figures["tolerance"], figures  # against the fp32 torch module
    path = low_memory_bundle / component.file
    weights = initializer_bytes(path)
    assert weights.get("FLOAT16", 0) > 10 * weights.get("FLOAT", 0), weights  # fp32: the LayerNorms' scales and biases
    graph = onnx.load(str(path)).graph
    io_types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)}
    assert all(t in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT32) for t in io_types.values()), io_types
    onnx.checker.check_model(str(path), full_check=True)


def test_the_shared_vae_takes_the_ordinary_road(low_memory_bundle):
    vae = load_manifest(low_memory_bundle).components["vae_decoder"]
    assert vae.precision == "fp32" and "force_upcast" in vae.build["note"]  # SDXL's VAE, kept fp32 as without the flag


def test_low_memory_images_match_diffusers(low_memory_bundle, sdxl_models):
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = runtime.Pipeline.load(low_memory_bundle)
    latents = np.random.default_rng(0).standard_normal(pipe.manifest.latent_shape, dtype=np.float32)
    ours = pipe.txt2img(PROMPT, steps=3, guidance_scale=5.0, latents=latents, output_type="np")
    ref_pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_models["base"], add_watermarker=False)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(PROMPT, num_inference_steps=3, guidance_scale=5.0, latents=torch.from_numpy(latents), output_type="np").images
    difference = float(np.abs(ours - ref).max())
    print(f"--low-memory fp16 SDXL bundle vs diffusers fp32: max abs pixel difference {difference:.2e}")
    assert np.isfinite(ours).all() and difference < 0.05
