"""Stable Diffusion 1.x/2.x and the UNets built on them (inpainting, x4 upscaler, LCM, Turbo).

One CLIP text encoder; its last hidden state is the UNet's cross-attention context, and an empty
negative prompt is encoded like any other prompt (the empty string's embedding), as diffusers does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Manifest
from ..protocol import cast_feed
from ..tokenizer import ClipTokenizer
from .base import Conditioning, OpenEngine


class StableDiffusion:
    keywords: Mapping[str, str] = {}  # SD's conditioning is the prompt alone

    def __init__(self, tokenizer: ClipTokenizer, engine: OpenEngine):
        # engines are looked up per call, not kept: the pipeline owns them (and a profiler may wrap them)
        self.tokenizer, self.engine = tokenizer, engine
        engine("text_encoder")  # opened now, so a broken engine fails at load, not at the first prompt

    @classmethod
    def load(cls, bundle: Path, manifest: Manifest, engine: OpenEngine) -> StableDiffusion:
        return cls(ClipTokenizer.from_dir(bundle / manifest.tokenizer.dir), engine)

    def conditioning(self, given: Mapping[str, Any]) -> Mapping[str, Any]:
        if given:
            raise TypeError(f"{', '.join(given)}: this bundle's model family (Stable Diffusion 1.x/2.x) takes no conditioning keywords")
        return {}

    def encode(
        self, prompts: Sequence[str], negatives: Sequence[str] | None = None, conditioning: Mapping[str, Any] | None = None
    ) -> Conditioning:
        texts = [*(negatives or ()), *prompts]  # one text-encoder call for both halves: its batch is static
        enc = self.engine("text_encoder")
        hidden = enc(cast_feed(enc.component, {"input_ids": self.tokenizer(texts)}))["last_hidden_state"]
        return Conditioning(np.asarray(hidden, dtype=np.float32))
