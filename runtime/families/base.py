"""What a model family gives the denoise loop: prompts in, UNet conditioning out.

Families differ in their text encoders, in how prompts become the UNet's conditioning and in
the extra inputs that UNet takes; the loop, samplers, guidance and tasks see only `Conditioning`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..bundle import Manifest, rebuild_hint
from ..protocol import Engine

OpenEngine = Callable[[str], Engine]

# The keywords every family takes: how prompts are read (runtime.prompt_weights, runtime.prompt_chunks)
PROMPT_KEYWORDS: dict[str, str] = {
    "prompt_weighting": "read A1111 emphasis in prompts: (word) x1.1, [word] /1.1, (word:1.3), \\( literal, BREAK; "
    "default True; False reads brackets as plain text",
}


def prompt_weighting(given: Mapping[str, Any]) -> bool:
    """The prompt_weighting keyword, checked: True (the default) or False."""
    value = given.get("prompt_weighting", True)
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"prompt_weighting must be True or False, got {value!r}")
    return bool(value)


def prompt_tokens_hint(bundle: Path, manifest: Manifest) -> Callable[[int], str]:
    """tokens a prompt needs -> the export.build line that rebuilds the bundle to take them (whole chunks)."""
    size = manifest.tokenizer.max_length - 2
    return lambda tokens: rebuild_hint(bundle, manifest, max_prompt_tokens=-(-tokens // size) * size)


@dataclass(frozen=True)
class Conditioning:
    """The UNet's view of a batch of prompts: cross-attention context (N, L, D) and extra per-row inputs.

    extra: further UNet inputs by name (SDXL's text_embeds and time_ids), each with N rows.
    """

    context: np.ndarray
    extra: Mapping[str, np.ndarray] = field(default_factory=dict)


class Family(Protocol):
    """One model family's text side, opened over a bundle.

    keywords: the conditioning keywords its tasks take besides the sampling options (SDXL's original_size, ...),
    each with what it means and its default; {} for a family that takes none.
    """

    keywords: Mapping[str, str]

    def conditioning(self, given: Mapping[str, Any]) -> Mapping[str, Any]:
        """The keywords checked and completed with their defaults, once per task (runtime.options.task_options);
        a keyword the family does not take is a TypeError, a value the bundle cannot honour a ValueError."""
        ...

    def encode(
        self, prompts: Sequence[str], negatives: Sequence[str] | None = None, conditioning: Mapping[str, Any] | None = None
    ) -> Conditioning:
        """Conditioning for `prompts`; with `negatives`, the 2N rows [negatives; prompts] classifier-free guidance uses.

        The family decides how an empty negative prompt is encoded (SD: the empty string's embedding; SDXL with
        force_zeros_for_empty_prompt: zeros). conditioning: the keywords as `conditioning` completed them (None: defaults).
        """
        ...
