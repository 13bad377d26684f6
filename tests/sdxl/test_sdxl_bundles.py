"""SDXL bundles: what the manifest records, the fp16 VAE decision, and bad input refused by message."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import runtime
from export.build import main
from runtime.bundle import Manifest
from runtime.errors import BundleError
from tests.helpers import REPO
from tests.helpers.tiny_sdxl import make_tiny_sdxl
from tests.runtime.test_edit_pipelines import IMAGE

PROMPT = "a small red circle in the top left on a black background"
OVERFLOW_GAIN = 1e5  # the tiny VAE decoder's activations then reach ~7.9e5, past fp16's 65504


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def test_manifest_records_the_sdxl_text_side(sdxl_base_bundle, sdxl_refiner_bundle):
    base = runtime.Pipeline.load(sdxl_base_bundle).manifest
    assert base.model.family == "sdxl" and base.pipelines == ("txt2img", "img2img", "inpaint")
    assert [(e.component, e.tokenizer, e.pad_token) for e in base.sdxl.encoders] == [
        ("text_encoder", "tokenizer", "<|endoftext|>"),
        ("text_encoder_2", "tokenizer_2", "!"),
    ]
    assert (base.sdxl.pooled_dim, base.sdxl.time_ids, base.sdxl.addition_time_embed_dim) == (24, 6, 8)
    assert base.sdxl.force_zeros_for_empty_prompt and not base.sdxl.requires_aesthetics_score
    unet = {t.name: t.shape for t in base.components["unet"].inputs}
    assert unet["encoder_hidden_states"] == (2, 77, 32 + 48) and unet["text_embeds"] == (2, 24) and unet["time_ids"] == (2, 6)
    assert Manifest.from_json(base.to_json()) == base
    refiner = runtime.Pipeline.load(sdxl_refiner_bundle).manifest
    assert refiner.pipelines == ("img2img", "inpaint") and "text_encoder" not in refiner.components
    assert refiner.tokenizer.dir == "tokenizer_2" and refiner.sdxl.time_ids == 5 and not refiner.sdxl.force_zeros_for_empty_prompt


def test_the_runtime_imports_no_torch_while_generating(sdxl_base_bundle):
    code = (
        "import sys, runtime\n"
        f"p = runtime.Pipeline.load({str(sdxl_base_bundle)!r})\n"
        "p.txt2img('a cat', steps=2, seed=0, output_type='np', original_size=(32, 32))\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("force_upcast", [True, False])
def test_fp16_bundle_keeps_an_overflowing_vae_fp32_and_gives_finite_images(tmp_path, force_upcast):
    """SDXL's VAE overflows fp16 (diffusers upcasts it: force_upcast). A VAE whose activations pass 65504 is proven
    to give NaN/inf in fp16, and the fp16 bundle keeps it fp32 (by its config, else by its measured activations)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    from export.build import build

    model_dir = make_tiny_sdxl(tmp_path / "model", vae_gain=OVERFLOW_GAIN, force_upcast=force_upcast)
    # in fp16 (torch's, as a GPU runs it: ONNX Runtime's CPU provider computes fp16 convolutions in fp32) it overflows
    vae = AutoencoderKL.from_pretrained(model_dir / "vae")
    z = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 4, 8, 8), dtype=np.float32))
    with torch.no_grad():
        assert torch.isfinite(vae.decode(z).sample).all()
        assert not torch.isfinite(vae.half().decode(z.half()).sample).all(), "the fp16 VAE did not overflow: the test proves nothing"

    bundle = build(model_dir, tmp_path / "bundle", precision="fp16", pipelines="txt2img", log=lambda _: None)
    pipe = runtime.Pipeline.load(bundle)
    vae = pipe.manifest.components["vae_decoder"]
    assert vae.precision == "fp32" and pipe.manifest.components["unet"].precision == "fp16"
    assert ("force_upcast" in vae.build["note"]) if force_upcast else ("activations reach" in vae.build["note"])
    latents = np.random.default_rng(0).standard_normal(pipe.manifest.latent_shape, dtype=np.float32)
    ours = pipe.txt2img(PROMPT, steps=3, guidance_scale=5.0, latents=latents, output_type="np")
    assert np.isfinite(ours).all() and ours.std() > 0.01
    ref_pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, add_watermarker=False)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(PROMPT, num_inference_steps=3, guidance_scale=5.0, latents=torch.from_numpy(latents), output_type="np").images
    difference = float(np.abs(ours - ref).max())
    print(f"fp16 SDXL bundle (VAE fp32, force_upcast={force_upcast}) vs diffusers fp32: max abs pixel difference {difference:.2e}")
    assert difference < 0.05


def test_a_folder_missing_text_encoder_2_or_tokenizer_2_is_refused(sdxl_models, tmp_path, capsys):
    for part in ("text_encoder_2", "tokenizer_2"):
        broken = tmp_path / part
        shutil.copytree(sdxl_models["base"], broken)
        shutil.rmtree(broken / part)
        code, err = run_cli(capsys, "--model", str(broken), "--out", str(tmp_path / "b"))
        assert code == 2 and err.count("\n") == 1, err
        assert f"is incomplete: missing {part}/ (an SDXL StableDiffusionXLPipeline folder has" in err
        assert not (tmp_path / "b").exists()


def test_a_unet_whose_time_ids_do_not_fit_is_refused(sdxl_models, tmp_path, capsys):
    """A refiner folder whose index lost requires_aesthetics_score would feed 6 time ids to a UNet made for 5."""
    odd = tmp_path / "refiner"
    shutil.copytree(sdxl_models["refiner"], odd)
    index = json.loads((odd / "model_index.json").read_text())
    (odd / "model_index.json").write_text(json.dumps({**index, "requires_aesthetics_score": False}))
    code, err = run_cli(capsys, "--model", str(odd), "--out", str(tmp_path / "b"))
    assert code == 2 and "projection_class_embeddings_input_dim 64 does not fit" in err and "requires_aesthetics_score is false" in err


def test_the_refiner_refuses_txt2img_naming_the_handoff(sdxl_refiner_bundle):
    pipe = runtime.Pipeline.load(sdxl_refiner_bundle)
    with pytest.raises(BundleError, match=r"holds an SDXL refiner .* runs img2img, inpaint only.*denoising_end=0.8.*denoising_start=0.8"):
        pipe.txt2img(PROMPT, steps=2)


def test_unknown_and_unhonourable_conditioning_keywords_are_refused(sdxl_base_bundle, sdxl_refiner_bundle, bundle_fp32):
    base, refiner, sd = (runtime.Pipeline.load(b) for b in (sdxl_base_bundle, sdxl_refiner_bundle, bundle_fp32))
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'orignal_size'.*conditioning options: original_size"):
        base.txt2img(PROMPT, steps=2, orignal_size=(64, 64))
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'original_size' \(sampling options: steps"):
        sd.txt2img(PROMPT, steps=2, original_size=(64, 64))
    with pytest.raises(ValueError, match=r"aesthetic_score needs a model trained on aesthetic scores"):
        base.txt2img(PROMPT, steps=2, aesthetic_score=7.0)
    with pytest.raises(ValueError, match=r"target_size is not used by this bundle's model: .* aesthetic score"):
        refiner.img2img(PROMPT, IMAGE, steps=4, target_size=(64, 64))
    with pytest.raises(ValueError, match=r"original_size must be a pair of whole numbers >= 0"):
        base.txt2img(PROMPT, steps=2, original_size=(64,))
    with pytest.raises(ValueError, match=r"negative_aesthetic_score must be a finite number"):
        refiner.img2img(PROMPT, IMAGE, steps=4, negative_aesthetic_score=float("nan"))


def test_handoff_fractions_are_checked(sdxl_base_bundle, sdxl_refiner_bundle):
    base, refiner = runtime.Pipeline.load(sdxl_base_bundle), runtime.Pipeline.load(sdxl_refiner_bundle)
    with pytest.raises(ValueError, match=r"denoising_end must be a fraction strictly between 0 and 1"):
        base.txt2img(PROMPT, steps=4, denoising_end=1.5)
    with pytest.raises(
        ValueError, match=r"denoising_end 0.1 stops before the first of 4 steps \(its timestep 751 is below the cutoff 900\)"
    ):
        base.txt2img(PROMPT, steps=4, denoising_end=0.1)
    with pytest.raises(ValueError, match=r"denoising_start 0.9996 leaves none of the 4 steps to run"):
        refiner.img2img(PROMPT, np.zeros(refiner.manifest.latent_shape, np.float32), steps=4, denoising_start=0.9996)


def test_sizes_are_the_bundles_own(sdxl_models, sdxl_base_bundle, tmp_path, capsys):
    """An aspect bucket is just --height/--width (recorded, and the size keywords' default); a size the VAE and UNet
    cannot divide is refused at export, an image of another size at run time."""
    from export.build import build

    code, err = run_cli(capsys, "--model", str(sdxl_models["base"]), "--height", "40", "--out", str(tmp_path / "b"))
    assert code == 2 and "--height 40 is not a positive multiple of 16" in err
    wide = build(
        sdxl_models["turbo"],
        tmp_path / "wide",
        precision="fp32",
        height=48,
        width=80,
        guidance="none",
        pipelines="txt2img",
        log=lambda _: None,
    )
    pipe = runtime.Pipeline.load(wide)
    assert (pipe.manifest.height, pipe.manifest.width) == (48, 80)
    assert pipe.family.conditioning({})["original_size"] == (48, 80)
    assert pipe.txt2img(PROMPT, steps=1, guidance_scale=0.0, seed=0, output_type="np").shape == (1, 48, 80, 3)
    with pytest.raises(ValueError, match=r"32x32.*64x64|64x64.*32x32"):
        runtime.Pipeline.load(sdxl_base_bundle).img2img(PROMPT, IMAGE.resize((32, 32)), steps=4)


def test_cli_takes_the_sdxl_conditioning_flags(sdxl_base_bundle, bundle_fp32, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "runtime", *args, "--quiet"], cwd=REPO, capture_output=True, text=True)

    flags = ["--steps", "2", "--seed", "0", "--original-size", "512", "512", "--crops-coords-top-left", "0", "16"]
    done = run("a cat", "--bundle", str(sdxl_base_bundle), *flags, "-o", str(tmp_path / "x.png"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "x.png").is_file()
    refused = run("a cat", "--bundle", str(bundle_fp32), *flags, "-o", str(tmp_path / "y.png"))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "unexpected keyword argument 'crops_coords_top_left'" in refused.stderr or "'original_size'" in refused.stderr


def test_tensorrt_engines_from_an_sdxl_onnx_bundle_carry_both_tokenizers(sdxl_base_bundle, tmp_path):
    """--from-onnx (with the offline tests' stand-in builder): every SDXL component built and verified, tokenizer_2
    and the manifest's sdxl section carried, the whole bundle hashed."""
    from runtime.bundle import load_manifest
    from tests.export.test_tensorrt_offline import offline_build

    out = offline_build(sdxl_base_bundle, tmp_path / "trt")
    manifest, source = load_manifest(out), load_manifest(sdxl_base_bundle)
    assert manifest.backend == "tensorrt" and manifest.sdxl == source.sdxl
    assert set(manifest.components) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
    assert all(c.format == "plan" and c.verification["passed"] for c in manifest.components.values())
    assert (out / "tokenizer_2" / "vocab.json").read_bytes() == (sdxl_base_bundle / "tokenizer_2" / "vocab.json").read_bytes()
    assert {"tokenizer_2/vocab.json", "tokenizer_2/tokenizer_config.json"} <= set(manifest.files)
