"""Prompts as users write them, on tiny SD bundles, against diffusers (fp32: max abs pixel difference <= 1e-3).

Long prompts against diffusers fed compel's chunked embeddings (truncate_long_prompts=False, split at token
boundaries); A1111-weighted prompts against A1111's algorithm (tests/helpers/a1111.py); textual-inversion tokens
against diffusers' load_textual_inversion; a short prompt on a long-prompt bundle against a standard bundle, bit for bit.

The model is the tiny SD with one change: its text encoder's final LayerNorm has a bias, as trained CLIP's does.
With the freshly initialised one (bias 0) every token's hidden state has mean 0, and A1111's mean restoration
divides rounding noise by rounding noise.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import runtime
from runtime.pipeline import initial_latents
from runtime.tokenizer import PromptTruncatedWarning
from tests.helpers import REPO, a1111
from tests.helpers.tiny_models import make_tiny_sd

SHORT = "a small (red:1.3) circle in the top left on a [black] background"
LONG = "a small red circle in the top left, a large blue square in the center, on a black background, " * 6  # 2 chunks
WEIGHTED = "a ((small)) red circle, [large] blue square, (black background:1.4), " * 4 + "BREAK (yellow:0.7) stripes"
STEPS = 3


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    import torch
    from transformers import CLIPTextModel

    folder = make_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd-biased")
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    with torch.no_grad():
        encoder.get_submodule("final_layer_norm").bias.normal_(0.3, 0.2, generator=torch.Generator().manual_seed(0))
    encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    """A diffusers learned_embeds.safetensors of two vectors, and an A1111 .pt (a pickle) of one."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("embeddings")
    g = torch.Generator().manual_seed(1)
    save_file({"<shape>": 0.3 * torch.randn(2, 32, generator=g)}, folder / "learned_embeds.safetensors")
    torch.save({"string_to_param": {"*": 0.3 * torch.randn(1, 32, generator=g)}, "name": "oldstyle", "step": 500}, folder / "oldstyle.pt")
    return folder / "learned_embeds.safetensors", folder / "oldstyle.pt"


def export(model, out, *flags):
    cmd = [sys.executable, "-m", "export.build", "--model", str(model), "--precision", "fp32", "--out", str(out), *flags]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def bundle_std(model, tmp_path_factory):
    return export(model, tmp_path_factory.mktemp("engines") / "std")


@pytest.fixture(scope="module")
def bundle_long(model, embeddings, tmp_path_factory):
    """Built through the CLI for prompts of up to 150 tokens (2 chunks), with both embeddings."""
    new, old = embeddings
    flags = ["--max-prompt-tokens", "150", "--textual-inversion", str(new), "--textual-inversion", f"{old}:oldstyle", "--allow-pickle"]
    return export(model, tmp_path_factory.mktemp("engines") / "long", *flags)


@pytest.fixture(scope="module")
def reference_pipe(model, embeddings):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(embeddings[0]))
    pipe.load_textual_inversion(str(embeddings[1]), token="oldstyle")
    return pipe


def diffusers_image(pipe, latents, **prompting):
    import torch

    with torch.no_grad():
        out = pipe(num_inference_steps=STEPS, guidance_scale=7.5, latents=torch.from_numpy(latents), output_type="np", **prompting)
    return out.images


def test_long_prompt_bundle_records_its_chunks(bundle_long):
    manifest = runtime.Pipeline.load(bundle_long).manifest
    assert manifest.tokenizer.max_chunks == 2
    context = manifest.components["unet"].input("encoder_hidden_states")
    assert context.shape == (2, 154, 32) and context.steps == (0, 77, 0)


def test_short_prompt_on_long_bundle_is_bit_identical(bundle_std, bundle_long):
    """No effect from the chunks a prompt does not use: they are never made, so they never enter attention (the UNet
    sees a 77-long context), and ONNX Runtime runs that length with the one-chunk graph's own optimizations."""
    std, long = runtime.Pipeline.load(bundle_std), runtime.Pipeline.load(bundle_long)
    assert long.family.encode([SHORT], [""]).context.shape == (2, 77, 32)
    latents = initial_latents(std.manifest.latent_shape, seed=5)
    a = std.txt2img(SHORT, "blurry", steps=STEPS, latents=latents, output_type="np")
    b = long.txt2img(SHORT, "blurry", steps=STEPS, latents=latents, output_type="np")
    assert np.array_equal(a, b)
    c = long.txt2img(LONG, "blurry", steps=STEPS, latents=latents, output_type="np")
    assert np.abs(a - c).max() > 0.01, "a different prompt gave the same image: the comparison would prove nothing"


def test_long_prompt_matches_diffusers_with_compel(bundle_long, reference_pipe):
    import torch
    from compel import Compel
    from compel.embeddings_provider import SplitLongTextMode

    pipe = runtime.Pipeline.load(bundle_long)
    latents = initial_latents(pipe.manifest.latent_shape, seed=1)
    ours = pipe.txt2img(LONG, steps=STEPS, latents=latents, output_type="np")
    compel = Compel(
        tokenizer=reference_pipe.tokenizer, text_encoder=reference_pipe.text_encoder, truncate_long_prompts=False,
        split_long_text_mode=SplitLongTextMode.BRUTAL,  # chunks at token boundaries, as A1111 and this SDK cut them
    )  # fmt: skip
    with torch.no_grad():
        positive, negative = compel.pad_conditioning_tensors_to_same_length([compel(LONG), compel("")])
    assert positive.shape == (1, 154, 32)
    ref = diffusers_image(reference_pipe, latents, prompt_embeds=positive, negative_prompt_embeds=negative)
    assert ref.std() > 0.01
    assert np.abs(ours - ref).max() <= 1e-3
    truncated = diffusers_image(reference_pipe, latents, prompt=LONG)  # diffusers alone cuts the prompt at 77 tokens
    assert np.abs(ours - truncated).max() > 0.01


def test_weighted_prompt_matches_a1111(bundle_long, reference_pipe):
    import torch

    pipe = runtime.Pipeline.load(bundle_long)
    latents = initial_latents(pipe.manifest.latent_shape, seed=2)
    negative = "blurry, (low quality:1.2)"
    ours = pipe.txt2img(WEIGHTED, negative, steps=STEPS, latents=latents, output_type="np")

    def encode(ids):
        return reference_pipe.text_encoder(ids)[0]

    with torch.no_grad():
        positive = a1111.encode_line(reference_pipe.tokenizer, encode, WEIGHTED)
        uncond = a1111.encode_line(reference_pipe.tokenizer, encode, negative, chunks=positive.shape[1] // 77)
    assert positive.shape == (1, 154, 32)
    ref = diffusers_image(reference_pipe, latents, prompt_embeds=positive, negative_prompt_embeds=uncond)
    assert np.abs(ours - ref).max() <= 1e-3
    plain = pipe.txt2img(WEIGHTED, negative, steps=STEPS, latents=latents, output_type="np", prompt_weighting=False)
    assert np.abs(ours - plain).max() > 0.01, "the weights made no difference: the comparison would prove nothing"


def test_weighting_off_reads_parentheses_as_diffusers_does(bundle_std, reference_pipe):
    pipe = runtime.Pipeline.load(bundle_std)
    latents = initial_latents(pipe.manifest.latent_shape, seed=3)
    ours = pipe.txt2img(SHORT, steps=STEPS, latents=latents, output_type="np", prompt_weighting=False)
    ref = diffusers_image(reference_pipe, latents, prompt=SHORT, negative_prompt="")
    assert np.abs(ours - ref).max() <= 1e-3
    with pytest.raises(TypeError, match="prompt_weighting must be True or False"):
        pipe.txt2img(SHORT, steps=1, prompt_weighting="no")


def test_prompt_over_the_bundle_limit_is_cut_with_a_rebuild_hint(bundle_long):
    pipe = runtime.Pipeline.load(bundle_long)
    with pytest.warns(PromptTruncatedWarning) as record:
        cond = pipe.family.encode([LONG * 2], [""])
    assert cond.context.shape == (2, 154, 32)
    message = str(record[0].message)
    assert "up to 150 tokens (2 chunks of 75)" in message
    assert "--max-prompt-tokens 300" in message and f"--out {bundle_long}" in message


def test_textual_inversion_matches_diffusers(bundle_long, reference_pipe, embeddings):
    """A two-vector diffusers embedding and a one-vector A1111 .pt, as diffusers' load_textual_inversion reads them."""
    pipe = runtime.Pipeline.load(bundle_long)
    prompt = "a photo of <shape> in the style of oldstyle"
    latents = initial_latents(pipe.manifest.latent_shape, seed=4)
    ours = pipe.txt2img(prompt, steps=STEPS, latents=latents, output_type="np")
    ref = diffusers_image(reference_pipe, latents, prompt=prompt, negative_prompt="")
    assert np.abs(ours - ref).max() <= 1e-3
    without = pipe.txt2img("a photo of a shape in the style of old", steps=STEPS, latents=latents, output_type="np")
    assert np.abs(ours - without).max() > 0.01, "the embeddings made no difference: the comparison would prove nothing"
    tokens = pipe.family.tokenizer.tokens(["<shape> oldstyle"])[0]
    assert tokens == [49408, 49409, 49410]  # <shape>, <shape>_1, oldstyle: the vectors the text encoder holds
    rebuild = pipe.rebuild()  # the embeddings are part of what the bundle was built from
    assert f"--textual-inversion {embeddings[0].resolve()} --textual-inversion {embeddings[1].resolve()}:oldstyle" in rebuild
    assert "--allow-pickle" in rebuild


def test_pickle_embedding_refused_without_allow_pickle(embeddings, tmp_path, capsys):
    from export.build import main

    assert main(["--textual-inversion", str(embeddings[1]), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "oldstyle.pt is a pickle file, which can run code when loaded" in err and "--allow-pickle" in err
    assert main(["--textual-inversion", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "b")]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_cli_reads_weights_unless_told_not_to(bundle_std, tmp_path, capsys):
    from PIL import Image

    from runtime.cli import main

    pipe = runtime.Pipeline.load(bundle_std)
    for flags, weighting in (([], True), (["--no-prompt-weighting"], False)):
        out = tmp_path / f"{weighting}.png"
        assert main([SHORT, "--bundle", str(bundle_std), "--steps", "2", "--seed", "0", "-o", str(out), *flags]) == 0
        expected = pipe.txt2img(SHORT, steps=2, seed=0, prompt_weighting=weighting)[0]
        with Image.open(out) as written:
            assert np.array_equal(np.asarray(written), np.asarray(expected))
    with Image.open(tmp_path / "True.png") as a, Image.open(tmp_path / "False.png") as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))
