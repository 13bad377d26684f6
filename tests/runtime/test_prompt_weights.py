"""Prompt reading without a model: A1111's emphasis syntax, 75-token chunks, the emphasis arithmetic, truncation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from reference.architecture import CLIP_DIR
from runtime import prompt_weights
from runtime.prompt_chunks import chunk_prompts, emphasize, token_chunks
from runtime.tokenizer import ClipTokenizer, PromptTruncatedWarning
from tests.helpers import a1111

PROMPTS = [
    "a cat",
    "a (cat)",
    "a ((cat))",
    "a [cat]",
    "a [[cat]]",
    "a (cat:1.3) on a sofa",
    "a (cat: 0.5 ) and (dog:-1)",
    "(a (red:1.5) (cat:1.2))",
    "a \\(cat\\) and \\[dog\\] and a \\\\ slash",
    "a lone \\ backslash",
    "unbalanced (cat",
    "unbalanced [cat",
    "closes nothing ) and ] and :1.2)",
    "((cat) dog",
    "[(cat]dog)",
    "style: oil, (ratio: 16:9)",
    "a cat BREAK a dog",
    "BREAK a dog",
    "a cat BREAK",
    "a BREAKfast BREAK break",
    "",
    "()",
    "(:1.5)",
    "(((((((((((((deep)))))))))))))",
    "[[(a:1.3)]] plain (b)",
]


@pytest.fixture(scope="module")
def ours() -> ClipTokenizer:
    return ClipTokenizer.from_dir(CLIP_DIR)


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(CLIP_DIR)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_parse_matches_a1111(prompt):
    expected = [(text, None if (text, w) == ("BREAK", -1) else w) for text, w in a1111.parse_prompt_attention(prompt)]
    assert prompt_weights.parse(prompt) == expected


def test_weights_as_documented():
    parse = prompt_weights.parse
    assert parse("a (cat)") == [("a ", 1.0), ("cat", 1.1)]
    assert parse("((cat))")[0][1] == pytest.approx(1.21)
    assert parse("[cat]")[0][1] == pytest.approx(1 / 1.1)
    assert parse("(cat:1.3)") == [("cat", 1.3)]
    assert parse("\\(cat\\)") == [("(cat)", 1.0)]
    # where A1111 stumbles, we read on: it raises on a weight that is no number, and weights a BREAK in brackets
    # into a word ("BREAK" at -1.1); we read the first as a plain bracket and still break on the second
    assert parse("(cat:1.2.3)") == [("cat", 1.1)]
    assert parse("a (b BREAK c)") == [("a ", 1.0), ("b", 1.1), ("BREAK", None), ("c", 1.1)]


def test_weighting_off_reads_brackets_as_text(ours):
    weighted = token_chunks(ours, "(cat:1.3)", weighting=True)
    plain = token_chunks(ours, "(cat:1.3)", weighting=False)
    assert [w for _, w in weighted[0]] == [1.3]
    assert [t for t, _ in plain[0]] == ours.tokens(["(cat:1.3)"])[0] and all(w == 1.0 for _, w in plain[0])


@pytest.mark.parametrize(
    "prompt",
    [
        "a (red:1.3) circle and a [blue] square, " * 9,
        "cat " * 75,
        "cat " * 76,
        "first BREAK second (third) BREAK",
        "a \\(literal\\) (weighted) [less] BREAK " + "x, " * 80,
        "",
    ],
)
def test_chunks_match_a1111(ours, hf_tokenizer, prompt):
    """The token ids and weights of every chunk, against A1111's tokenize_line on transformers' tokenizer."""
    expected = a1111.tokenize_line(hf_tokenizer, prompt)
    got = chunk_prompts(ours, [prompt], max_chunks=16)
    assert got.count == len(expected)
    for c, (ids, weights) in enumerate(expected):
        assert got.ids[0, c].tolist() == ids
        np.testing.assert_allclose(got.weights[0, c], weights, rtol=1e-7)


def test_rows_are_padded_with_empty_chunks(ours):
    got = chunk_prompts(ours, ["", "cat " * 100], max_chunks=4)
    assert got.ids.shape == (2, 2, 77)
    empty = ours("")[0]
    assert got.ids[0, 0].tolist() == got.ids[0, 1].tolist() == empty.tolist()
    assert got.ids[1, 1, :27].tolist() == [ours.bos_id, *[2368] * 25, ours.eos_id]


def test_truncation_warns_with_excerpt_and_rebuild_hint(ours):
    prompt = "cat " * 150 + "on a red sofa " * 30
    with pytest.warns(PromptTruncatedWarning) as record:
        got = chunk_prompts(ours, [prompt], max_chunks=2, rebuild=lambda n: f"export.build --max-prompt-tokens {n}")
    assert got.count == 2
    message = str(record[0].message)
    assert "120 prompt tokens were dropped" in message and "up to 150 tokens (2 chunks of 75)" in message
    assert "'on a red sofa on a red sofa" in message and "...'" in message and len(message) < 400
    assert "--max-prompt-tokens 270" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        chunk_prompts(ours, ["cat " * 150], max_chunks=2)


def test_emphasis_restores_the_mean_and_leaves_unweighted_rows_alone():
    import torch

    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((2, 77, 8)).astype(np.float32) + 0.5
    weights = np.ones((2, 77), np.float32)
    weights[1, 3:6] = [1.3, 0.9, 1.21]
    out = emphasize(hidden, weights)
    assert out[0] is not hidden[0] and np.array_equal(out[0], hidden[0])
    expected = a1111.process_tokens(lambda ids: torch.from_numpy(hidden[1:]), [0] * 77, weights[1].tolist())
    np.testing.assert_allclose(out[1], expected[0].numpy(), rtol=1e-6, atol=1e-6)
    assert out[1].mean() == pytest.approx(hidden[1].mean(), rel=1e-5)
    assert emphasize(hidden, np.ones((2, 77), np.float32)) is hidden
