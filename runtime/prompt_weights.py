"""A1111's prompt emphasis syntax, read as AUTOMATIC1111's webui reads it (modules/prompt_parser.py).

`(word)` x1.1, `((word))` x1.21, `[word]` /1.1, `(word:1.3)` x1.3, `\\(` a literal parenthesis, and `BREAK`
(upper case, a word of its own) to start a new 75-token chunk. Whatever does not pair up is read the way
A1111 reads it, never as an error: a `)` or `]` with nothing open is plain text, and a bracket still open
at the end weights everything after it. A lone backslash disappears, as there.
"""

from __future__ import annotations

import re

ROUND, SQUARE = 1.1, 1 / 1.1
BREAK = "BREAK"  # a fragment of weight None: the chunk ends here
# One alternative per lexeme, tried in this order: escapes, openers, an explicit weight closing a round bracket,
# closers, a run of plain text, a colon that closes nothing.
LEXEME = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")

Fragment = tuple[str, float | None]  # text and its weight; (BREAK, None) ends a chunk


def parse(prompt: str) -> list[Fragment]:
    """The prompt as (text, weight) fragments, neighbours of equal weight merged; never raises on odd brackets."""
    texts: list[str] = []
    weights: list[float | None] = []  # scaled in place as brackets close
    opened: dict[str, list[int]] = {"(": [], "[": []}

    def scale(start: int, factor: float) -> None:
        weights[start:] = [None if w is None else w * factor for w in weights[start:]]

    for m in LEXEME.finditer(prompt):
        text, weight = m.group(0), _number(m.group(1))
        if text.startswith("\\"):
            texts.append(text[1:])
            weights.append(1.0)
        elif text in opened:
            opened[text].append(len(texts))
        elif m.group(1) is not None and opened["("]:
            scale(opened["("].pop(), ROUND if weight is None else weight)  # "(a:1.2.3)": not a number, read as a plain ")"
        elif text == ")" and opened["("]:
            scale(opened["("].pop(), ROUND)
        elif text == "]" and opened["["]:
            scale(opened["["].pop(), SQUARE)
        else:
            for i, part in enumerate(BREAK_WORD.split(text)):
                if i:
                    texts.append(BREAK)
                    weights.append(None)
                texts.append(part)
                weights.append(1.0)
    for start in opened["("]:
        scale(start, ROUND)
    for start in opened["["]:
        scale(start, SQUARE)
    merged: list[Fragment] = []
    for text, w in zip(texts, weights) if texts else [("", 1.0)]:
        if merged and w is not None and merged[-1][1] == w:
            merged[-1] = (merged[-1][0] + text, w)
        else:
            merged.append((text, w))
    return merged


def plain(prompt: str) -> list[Fragment]:
    """The prompt as one fragment of weight 1: parentheses and brackets mean themselves (weighting turned off)."""
    return [(prompt, 1.0)]


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None
