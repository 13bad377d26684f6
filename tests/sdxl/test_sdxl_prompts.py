"""Long, A1111-weighted and textual-inversion prompts on a tiny SDXL bundle, against diffusers (max abs pixel
difference <= 1e-3): both text encoders chunked alike, the pooled projection from the first chunk (as compel and A1111
take it), a clip_l/clip_g embedding in both encoders, as diffusers' load_textual_inversion puts it there."""

from __future__ import annotations

import numpy as np
import pytest

import runtime
from runtime.pipeline import initial_latents
from tests.helpers import a1111

LONG = "a small red circle in the top left, a large blue square in the center, on a black background, " * 6  # 2 chunks
WEIGHTED = "a ((small)) red circle, [large] blue square, (black background:1.4), " * 4 + "BREAK (yellow:0.7) stripes"
NEGATIVE = "blurry, (low quality:1.2)"
STEPS = 3


@pytest.fixture(scope="module")
def embedding(tmp_path_factory):
    """An SDXL embedding of two vectors: clip_l for text_encoder (32 wide), clip_g for text_encoder_2 (48 wide)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(2)
    path = tmp_path_factory.mktemp("embeddings") / "sdxl-emb.safetensors"
    save_file({"clip_l": 0.3 * torch.randn(2, 32, generator=g), "clip_g": 0.3 * torch.randn(2, 48, generator=g)}, path)
    return path


@pytest.fixture(scope="module")
def bundle(sdxl_models, embedding, tmp_path_factory):
    from export.build import build

    out = tmp_path_factory.mktemp("sdxl-engines") / "base-long"
    ti = (f"{embedding}:<sdxl-tok>",)
    return build(sdxl_models["base"], out, precision="fp32", max_prompt_tokens=150, textual_inversion=ti, deepcache=1, log=lambda _: None)


@pytest.fixture(scope="module")
def ref(sdxl_models, embedding):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_models["base"], add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    state = load_file(embedding)
    pipe.load_textual_inversion(state["clip_l"], token="<sdxl-tok>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="<sdxl-tok>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    return pipe


def images(pipe, latents, **prompting):
    import torch

    with torch.no_grad():
        out = pipe(num_inference_steps=STEPS, guidance_scale=5.0, latents=torch.from_numpy(latents), output_type="np", **prompting)
    return out.images


def ours(bundle, prompt, negative, seed, **options):
    pipe = runtime.Pipeline.load(bundle)
    latents = initial_latents(pipe.manifest.latent_shape, seed=seed)
    return pipe.txt2img(prompt, negative, steps=STEPS, guidance_scale=5.0, latents=latents, output_type="np", **options), latents


@pytest.mark.parametrize("interval", [1, 2])
def test_long_prompt_matches_diffusers_with_compel(bundle, ref, interval):
    """Also with DeepCache (the bundle's --deepcache 1): its full UNet takes the stepped context, its shallow one none."""
    import torch
    from compel import Compel, ReturnedEmbeddingsType
    from compel.embeddings_provider import SplitLongTextMode
    from DeepCache import DeepCacheSDHelper

    image, latents = ours(bundle, LONG, "blurry", seed=1, cache_interval=interval)
    # one Compel per encoder (its multi-encoder padding is broken in 2.5.1), each cutting at token boundaries
    first, second = (
        Compel(
            tokenizer=tok, text_encoder=te, returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
            requires_pooled=pooled, truncate_long_prompts=False, split_long_text_mode=SplitLongTextMode.BRUTAL,
        )
        for tok, te, pooled in ((ref.tokenizer, ref.text_encoder, False), (ref.tokenizer_2, ref.text_encoder_2, True))
    )  # fmt: skip
    with torch.no_grad():
        (positive_2, pooled), (negative_2, negative_pooled) = second(LONG), second("blurry")
        positive_1, negative_1 = first.pad_conditioning_tensors_to_same_length([first(LONG), first("blurry")])
        positive_2, negative_2 = second.pad_conditioning_tensors_to_same_length([positive_2, negative_2])
        positive, negative = torch.cat([positive_1, positive_2], -1), torch.cat([negative_1, negative_2], -1)
    assert positive.shape == (1, 154, 80)
    helper = DeepCacheSDHelper(pipe=ref)
    helper.set_params(cache_interval=interval, cache_branch_id=1)
    helper.enable()
    try:
        expected = images(
            ref, latents, prompt_embeds=positive, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative,
            negative_pooled_prompt_embeds=negative_pooled,
        )  # fmt: skip
    finally:
        helper.disable()  # the module's other tests share the pipeline
    assert expected.std() > 0.01
    assert np.abs(image - expected).max() <= 1e-3
    if interval > 1:
        plain, _ = ours(bundle, LONG, "blurry", seed=1)
        assert np.abs(plain - image).max() > 1e-3, "caching changed nothing: the shallow UNet never ran"


def test_weighted_prompt_matches_a1111(bundle, ref):
    import torch

    image, latents = ours(bundle, WEIGHTED, NEGATIVE, seed=2)

    def conditioning(prompt, chunks=None):
        """A1111's SDXL conditioning: each encoder's penultimate states weighted on their own, side by side; the
        pooled projection of the first chunk."""
        hidden = [
            a1111.encode_line(tok, lambda ids, te=te: te(ids, output_hidden_states=True).hidden_states[-2], prompt, chunks)
            for tok, te in ((ref.tokenizer, ref.text_encoder), (ref.tokenizer_2, ref.text_encoder_2))
        ]
        first = a1111.tokenize_line(ref.tokenizer_2, prompt)[0][0]
        return torch.cat(hidden, dim=-1), ref.text_encoder_2(torch.tensor([first])).text_embeds

    with torch.no_grad():
        positive, pooled = conditioning(WEIGHTED)
        negative, negative_pooled = conditioning(NEGATIVE, chunks=positive.shape[1] // 77)
    assert positive.shape == (1, 154, 80)
    expected = images(
        ref, latents, prompt_embeds=positive, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative,
        negative_pooled_prompt_embeds=negative_pooled,
    )  # fmt: skip
    assert np.abs(image - expected).max() <= 1e-3
    plain, _ = ours(bundle, WEIGHTED, NEGATIVE, seed=2, prompt_weighting=False)
    assert np.abs(image - plain).max() > 0.01, "the weights made no difference: the comparison would prove nothing"


def test_textual_inversion_matches_diffusers(bundle, ref):
    prompt = "a photo of <sdxl-tok> on a black background"
    image, latents = ours(bundle, prompt, "blurry", seed=3)
    expected = images(ref, latents, prompt=prompt, negative_prompt="blurry")
    assert np.abs(image - expected).max() <= 1e-3
    without, _ = ours(bundle, "a photo of a shape on a black background", "blurry", seed=3)
    assert np.abs(image - without).max() > 0.01, "the embedding made no difference: the comparison would prove nothing"
