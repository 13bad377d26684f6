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

from ..bundle import Manifest
from ..protocol import Engine

OpenEngine = Callable[[str], Engine]


@dataclass(frozen=True)
class Conditioning:
    """The UNet's view of a batch of prompts: cross-attention context (N, L, D) and extra per-row inputs.

    extra: further UNet inputs by name (SDXL's text_embeds and time_ids), each with N rows.
    """

    context: np.ndarray
    extra: Mapping[str, np.ndarray] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(self.context.shape[0])


class Family(Protocol):
    """One model family's text side, opened over a bundle.

    keywords: the conditioning keywords its tasks take besides the sampling options (SDXL's original_size, ...),
    each with what it means and its default; {} for a family that takes none.
    """

    keywords: Mapping[str, str]

    def conditioning(self, given: Mapping[str, Any]) -> Mapping[str, Any]:
        """The keywords checked and completed with their defaults; a value the bundle cannot honour is a ValueError."""
        ...

    def encode(
        self, prompts: Sequence[str], negatives: Sequence[str] | None = None, options: Mapping[str, Any] | None = None
    ) -> Conditioning:
        """Conditioning for `prompts`; with `negatives`, the 2N rows [negatives; prompts] classifier-free guidance uses.

        The family decides how an empty negative prompt is encoded (SD: the empty string's embedding; SDXL with
        force_zeros_for_empty_prompt: zeros). options: the caller's conditioning keywords (see `keywords`).
        """
        ...


class FamilyLoader(Protocol):
    def __call__(self, bundle: Path, manifest: Manifest, engine: OpenEngine) -> Family: ...
