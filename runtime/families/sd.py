"""Stable Diffusion 1.x/2.x and the UNets built on them (inpainting, x4 upscaler, LCM, Turbo).

One CLIP text encoder; its last hidden state is the UNet's cross-attention context, and an empty
negative prompt is encoded like any other prompt (the empty string's embedding), as diffusers does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..bundle import Manifest
from ..prompt_chunks import chunk_prompts, encode_chunks
from ..protocol import cast_feed
from ..tokenizer import ClipTokenizer
from .base import PROMPT_KEYWORDS, Conditioning, OpenEngine, prompt_tokens_hint, prompt_weighting


class StableDiffusion:
    keywords: Mapping[str, str] = PROMPT_KEYWORDS  # besides how prompts are read, SD's conditioning is the prompt alone

    def __init__(self, tokenizer: ClipTokenizer, engine: OpenEngine, max_chunks: int = 1, rebuild: Callable[[int], str] | None = None):
        # engines are looked up per call, not kept: the pipeline owns them (and a profiler may wrap them)
        self.tokenizer, self.engine, self.max_chunks, self.rebuild = tokenizer, engine, max_chunks, rebuild
        engine("text_encoder")  # opened now, so a broken engine fails at load, not at the first prompt

    @classmethod
    def load(cls, bundle: Path, manifest: Manifest, engine: OpenEngine) -> StableDiffusion:
        tokenizer = ClipTokenizer.from_dir(bundle / manifest.tokenizer.dir)
        return cls(tokenizer, engine, manifest.tokenizer.max_chunks, prompt_tokens_hint(bundle, manifest))

    def conditioning(self, given: Mapping[str, Any]) -> Mapping[str, Any]:
        unknown = [k for k in given if k not in self.keywords]
        if unknown:
            raise TypeError(
                f"{', '.join(unknown)}: this bundle's model family (Stable Diffusion 1.x/2.x) takes no conditioning keywords "
                f"besides {', '.join(self.keywords)}"
            )
        return {"prompt_weighting": prompt_weighting(given)}

    def encode(
        self, prompts: Sequence[str], negatives: Sequence[str] | None = None, conditioning: Mapping[str, Any] | None = None
    ) -> Conditioning:
        texts = [*(negatives or ()), *prompts]  # one text-encoder call per chunk for both halves: its batch is static
        chunks = chunk_prompts(self.tokenizer, texts, self.max_chunks, prompt_weighting(conditioning or {}), self.rebuild)
        enc = self.engine("text_encoder")
        hidden = encode_chunks(lambda ids: enc(cast_feed(enc.component, {"input_ids": ids}))["last_hidden_state"], chunks)
        return Conditioning(hidden)
