"""Five canonical prompts through a bundle, read back by the reference checker: how the shipped models' tests
ask whether a model draws what its prompt says."""

from __future__ import annotations

from typing import Any

from reference import checker
from reference.dataset import Attributes, canonical_caption

WANTED = (
    Attributes("black", "red", "circle", "large", "center"),
    Attributes("white", "blue", "square", "large", "top left"),
    Attributes("gray", "yellow", "triangle", "large", "bottom right"),
    Attributes("white", "green", "circle", "small", "top right"),
    Attributes("black", "purple", "square", "small", "bottom left"),
)


def attribute_hits(pipe: Any, **sampling: Any) -> dict[str, int]:
    """Per attribute, how many of WANTED come back right (prompt i drawn with seed i)."""
    hits = {"background": 0, "color": 0, "shape": 0, "size": 0, "position": 0}
    for i, a in enumerate(WANTED):
        got = checker.check(pipe.txt2img(canonical_caption(a), seed=i, output_type="np", **sampling)[0])
        for k in hits:
            hits[k] += getattr(got, k) == getattr(a, k)
    return hits
