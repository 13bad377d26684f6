"""Prompts of any length as CLIP chunks, with A1111's per-token weights (the A1111 / compel long-prompt scheme).

A prompt's tokens are cut into chunks of 75 (the context less bos and eos), at token boundaries; each chunk
is bos + tokens + eos, padded with the tokenizer's own pad token, encoded on its own, and the chunks'
hidden states are concatenated along the sequence. Rows with fewer chunks (a short negative prompt) get
empty chunks, the empty prompt's encoding, up to the longest row. A bundle takes at most `max_chunks`
chunks (export.build --max-prompt-tokens): beyond that the tail is cut, with a warning that says how to
rebuild for more.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from . import prompt_weights
from .tokenizer import ClipTokenizer, PromptTruncatedWarning

EXCERPT = 60  # characters of dropped text a warning quotes


@dataclass(frozen=True)
class Chunks:
    """Token ids and weights, (rows, chunks, context): bos, up to 75 tokens, eos, padding; weight 1 off the tokens."""

    ids: np.ndarray
    weights: np.ndarray

    @property
    def count(self) -> int:
        return int(self.ids.shape[1])


def token_chunks(tokenizer: ClipTokenizer, prompt: str, weighting: bool) -> list[list[tuple[int, float]]]:
    """The prompt's (token id, weight) pairs, cut into chunks; `BREAK` (with weighting) ends a chunk early, as in A1111."""
    size = tokenizer.max_length - 2
    fragments = prompt_weights.parse(prompt) if weighting else prompt_weights.plain(prompt)
    texts = [text for text, weight in fragments if weight is not None]
    tokenized = iter(tokenizer.tokens(texts)) if texts else iter(())
    chunks: list[list[tuple[int, float]]] = [[]]
    for _, weight in fragments:
        if weight is None:
            chunks.append([])
            continue
        for token in next(tokenized):
            if len(chunks[-1]) == size:
                chunks.append([])
            chunks[-1].append((token, weight))
    if len(chunks) > 1 and not chunks[-1]:
        chunks.pop()
    return chunks


def chunk_prompts(
    tokenizer: ClipTokenizer,
    prompts: Sequence[str],
    max_chunks: int,
    weighting: bool = True,
    rebuild: Callable[[int], str] | None = None,
    *,
    at_least: int = 1,
    warn: bool = True,
) -> Chunks:
    """Every prompt as chunks, all rows padded with empty chunks to the longest (and to `at_least`); past `max_chunks`
    the tail is cut and (with `warn`) a PromptTruncatedWarning names what was dropped and `rebuild(tokens needed)`."""
    size, length = tokenizer.max_length - 2, tokenizer.max_length
    rows = [token_chunks(tokenizer, p, weighting) for p in prompts]
    for i, chunks in enumerate(rows):
        if len(chunks) > max_chunks:
            if warn:
                _warn_dropped(tokenizer, chunks, max_chunks, size, rebuild)
            rows[i] = chunks[:max_chunks]
    count = max([at_least, *(len(c) for c in rows)])
    ids = np.full((len(rows), count, length), tokenizer.pad_id, dtype=np.int32)
    weights = np.ones((len(rows), count, length), dtype=np.float32)
    ids[:, :, 0] = tokenizer.bos_id
    for r, chunks in enumerate(rows):
        for c in range(count):
            pairs = chunks[c] if c < len(chunks) else []
            n = len(pairs)
            if n:
                ids[r, c, 1 : n + 1] = [t for t, _ in pairs]
                weights[r, c, 1 : n + 1] = [w for _, w in pairs]
            ids[r, c, n + 1] = tokenizer.eos_id
    return Chunks(ids, weights)


def _warn_dropped(
    tokenizer: ClipTokenizer, chunks: list[list[tuple[int, float]]], max_chunks: int, size: int, rebuild: Callable[[int], str] | None
) -> None:
    dropped = [t for chunk in chunks[max_chunks:] for t, _ in chunk]
    # every token is at least a character, so EXCERPT tokens cover the excerpt; a 10 MB prompt is not decoded whole
    text = tokenizer.decode(dropped[:EXCERPT])
    excerpt = text if len(text) <= EXCERPT else text[:EXCERPT].rstrip() + "..."
    needed = sum(len(c) for c in chunks)
    fix = f"; to keep them, rebuild the bundle for longer prompts: `{rebuild(needed)}`" if rebuild else ""
    warnings.warn(
        f"{len(dropped)} prompt tokens were dropped: this bundle takes prompts of up to {max_chunks * size} tokens "
        f"({max_chunks} chunk{'s' if max_chunks > 1 else ''} of {size}), so the input was truncated from {excerpt!r}{fix}",
        PromptTruncatedWarning,
        stacklevel=6,
    )


def emphasize(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A1111's emphasis on one chunk: hidden states (rows, L, D) times each token's weight, then each row's mean restored.

    Rows whose weights are all 1 are returned as they are, bit for bit.
    """
    weighted = (weights != 1.0).any(axis=1)
    if not weighted.any():
        return hidden
    out: np.ndarray = hidden.copy()
    for r in np.flatnonzero(weighted):
        before = hidden[r].mean(dtype=np.float32)
        scaled = hidden[r] * weights[r][:, None]
        out[r] = scaled * (before / scaled.mean(dtype=np.float32))
    return out


def encode_chunks(encode: Callable[[np.ndarray], np.ndarray], chunks: Chunks) -> np.ndarray:
    """Each chunk through `encode` (ids (rows, context) -> hidden states (rows, context, D)), weighted, then
    concatenated along the sequence: (rows, chunks * context, D)."""
    parts = [emphasize(np.asarray(encode(chunks.ids[:, c]), dtype=np.float32), chunks.weights[:, c]) for c in range(chunks.count)]
    hidden: np.ndarray = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
    return hidden
