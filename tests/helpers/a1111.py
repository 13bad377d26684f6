"""AUTOMATIC1111's published prompt algorithm, reimplemented for the tests as the webui writes it
(modules/prompt_parser.py: parse_prompt_attention; modules/sd_hijack_clip.py: tokenize_line, process_tokens,
with the "Original" emphasis and comma backtracking off), on transformers' tokenizer and torch text encoders.

It is the yardstick the runtime's own reading (runtime.prompt_weights, runtime.prompt_chunks) is checked against.
"""

from __future__ import annotations

import re
from typing import Any

RE_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[list[Any]]:
    res: list[list[Any]] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start_position: int, multiplier: float) -> None:
        for p in range(start_position, len(res)):
            res[p][1] *= multiplier

    for m in RE_ATTENTION.finditer(text):
        text = m.group(0)
        weight = m.group(1)
        if text.startswith("\\"):
            res.append([text[1:], 1.0])
        elif text == "(":
            round_brackets.append(len(res))
        elif text == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif text == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif text == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            parts = re.split(RE_BREAK, text)
            for i, part in enumerate(parts):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    if len(res) == 0:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


def tokenize_line(tokenizer: Any, line: str, chunk_length: int = 75) -> list[tuple[list[int], list[float]]]:
    """Chunks of (ids, multipliers), each bos + 75 tokens (padded) + eos; the pad token after the first eos."""
    parsed = parse_prompt_attention(line)
    tokenized = tokenizer([text for text, _ in parsed], truncation=False, add_special_tokens=False)["input_ids"]
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    multipliers: list[float] = []
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id

    def next_chunk() -> None:
        nonlocal tokens, multipliers
        to_add = chunk_length - len(tokens)
        ids = [bos, *tokens, eos] + [pad] * to_add
        chunks.append((ids, [1.0, *multipliers, 1.0] + [1.0] * to_add))
        tokens, multipliers = [], []

    for ids, (text, weight) in zip(tokenized, parsed):
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        for token in ids:
            if len(tokens) == chunk_length:
                next_chunk()
            tokens.append(token)
            multipliers.append(weight)
    if tokens or not chunks:
        next_chunk()
    return chunks


def process_tokens(encode: Any, ids: list[int], multipliers: list[float]) -> Any:
    """One chunk through `encode` (torch ids (1, 77) -> hidden (1, 77, D)), with the "Original" emphasis."""
    import torch

    z = encode(torch.tensor([ids]))
    batch_multipliers = torch.tensor([multipliers])
    original_mean = z.mean()
    z = z * batch_multipliers.reshape(batch_multipliers.shape + (1,)).expand(z.shape)
    new_mean = z.mean()
    return z * (original_mean / new_mean)


def encode_line(tokenizer: Any, encode: Any, line: str, chunks: int | None = None) -> Any:
    """A1111's conditioning for one prompt: every chunk encoded and weighted, concatenated; padded to `chunks`
    chunks with the empty prompt's (as A1111 pads the shorter of cond and uncond)."""
    import torch

    parts = tokenize_line(tokenizer, line)
    empty = tokenize_line(tokenizer, "")[0]
    parts += [empty] * ((chunks or len(parts)) - len(parts))
    return torch.cat([process_tokens(encode, ids, m) for ids, m in parts], dim=1)
