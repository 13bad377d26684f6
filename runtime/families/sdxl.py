"""SDXL (base, SDXL-Turbo, the refiner), as diffusers' StableDiffusionXL pipelines encode prompts.

Each text encoder's penultimate hidden state, concatenated (text_encoder first), is the UNet's context;
text_encoder_2's pooled projection is its `text_embeds`; `time_ids` carry the micro-conditioning:
original_size + crops_coords_top_left + target_size, or, for a model trained on aesthetic scores (the
refiner), original_size + crops_coords_top_left + aesthetic_score. With force_zeros_for_empty_prompt
(the base's default), an empty negative prompt is all-zero conditioning rather than the empty string's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, TypedDict, get_type_hints

import numpy as np

from ..bundle import Manifest, SdxlInfo, rebuild_hint
from ..errors import BundleError
from ..prompt_chunks import Chunks, chunk_prompts, encode_chunks
from ..protocol import cast_feed
from ..tokenizer import ClipTokenizer
from .base import PROMPT_KEYWORDS, Conditioning, OpenEngine, prompt_tokens_hint, prompt_weighting

Pair = tuple[int, int]


class SdxlConditioning(TypedDict, total=False):
    """The conditioning keywords every task takes on an SDXL bundle, with diffusers' defaults: the one place they are
    named (KEYWORDS and the tasks' keyword types come from here); an SD bundle refuses them by name."""

    original_size: Annotated[Pair, "(height, width) the image is said to have been before resizing; default: the bundle's size"]
    crops_coords_top_left: Annotated[Pair, "(top, left) of the crop it is said to come from; default (0, 0)"]
    target_size: Annotated[Pair, "(height, width) asked for; default: the bundle's size (not for aesthetic-score models)"]
    negative_original_size: Annotated[Pair, "original_size for the negative half; default: original_size"]
    negative_crops_coords_top_left: Annotated[Pair, "crops_coords_top_left for the negative half; default (0, 0)"]
    negative_target_size: Annotated[Pair, "target_size for the negative half; default: target_size"]
    aesthetic_score: Annotated[float, "the refiner's aesthetic conditioning; default 6.0"]
    negative_aesthetic_score: Annotated[float, "the refiner's aesthetic conditioning for the negative half; default 2.5"]


KEYWORDS: dict[str, str] = {
    **{name: hint.__metadata__[0] for name, hint in get_type_hints(SdxlConditioning, include_extras=True).items()},
    **PROMPT_KEYWORDS,
}
AESTHETIC_ONLY = ("aesthetic_score", "negative_aesthetic_score")
TARGET_ONLY = ("target_size", "negative_target_size")


class StableDiffusionXL:
    keywords = KEYWORDS

    def __init__(
        self, info: SdxlInfo, tokenizers: dict[str, ClipTokenizer], engine: OpenEngine, size: tuple[int, int], hint: str,
        max_chunks: int = 1, rebuild: Callable[[int], str] | None = None,
    ):  # fmt: skip
        self.info, self.tokenizers, self.engine, self.size, self.hint = info, tokenizers, engine, size, hint
        self.max_chunks, self.rebuild = max_chunks, rebuild
        for e in info.encoders:
            engine(e.component)  # opened now, so a missing or broken encoder fails at load, not at the first prompt

    @classmethod
    def load(cls, bundle: Path, manifest: Manifest, engine: OpenEngine) -> StableDiffusionXL:
        if manifest.sdxl is None:
            hint = rebuild_hint(bundle, manifest)
            raise BundleError(f"bundle {bundle} is of family 'sdxl' but its manifest has no 'sdxl' section; rebuild it with `{hint}`")
        tokenizers = {e.component: ClipTokenizer.from_dir(bundle / e.tokenizer) for e in manifest.sdxl.encoders}
        hint = rebuild_hint(bundle, manifest)
        size = (manifest.height, manifest.width)
        return cls(manifest.sdxl, tokenizers, engine, size, hint, manifest.tokenizer.max_chunks, prompt_tokens_hint(bundle, manifest))

    def conditioning(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The keywords checked and completed with diffusers' defaults; what this model cannot honour is refused."""
        aesthetic = self.info.requires_aesthetics_score
        for name in given:
            if aesthetic and name in TARGET_ONLY:
                raise ValueError(
                    f"{name} is not used by this bundle's model: it was trained on an aesthetic score instead of target_size "
                    "(an SDXL refiner); pass aesthetic_score / negative_aesthetic_score"
                )
            if not aesthetic and name in AESTHETIC_ONLY:
                raise ValueError(
                    f"{name} needs a model trained on aesthetic scores (requires_aesthetics_score, the SDXL refiner); "
                    "this bundle's model conditions on target_size instead"
                )
        out: dict[str, Any] = {"prompt_weighting": prompt_weighting(given)}
        for name, value in given.items():
            if name not in PROMPT_KEYWORDS:
                out[name] = _score(name, value) if name in AESTHETIC_ONLY else _pair(name, value)
        size = self.size
        out.setdefault("original_size", size)
        out.setdefault("crops_coords_top_left", (0, 0))
        negatives_given = any(k.startswith("negative_") and k not in AESTHETIC_ONLY for k in given)
        out["negative_given"] = negatives_given
        if aesthetic:
            out.setdefault("aesthetic_score", 6.0)
            out.setdefault("negative_aesthetic_score", 2.5)
        else:
            out.setdefault("target_size", size)
        out.setdefault("negative_original_size", out["original_size"])
        out.setdefault("negative_crops_coords_top_left", (0, 0))
        if not aesthetic:
            out.setdefault("negative_target_size", out["target_size"])
        return out

    def time_ids(self, options: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """The positive and negative rows of time_ids, as diffusers' _get_add_time_ids."""
        o = options
        if self.info.requires_aesthetics_score:
            pos = [*o["original_size"], *o["crops_coords_top_left"], o["aesthetic_score"]]
            neg = [*o["negative_original_size"], *o["negative_crops_coords_top_left"], o["negative_aesthetic_score"]]
        else:
            pos = [*o["original_size"], *o["crops_coords_top_left"], *o["target_size"]]
            # diffusers' text-to-image pipeline reuses the positive ids unless negative sizes are given
            neg = (
                [*o["negative_original_size"], *o["negative_crops_coords_top_left"], *o["negative_target_size"]]
                if o["negative_given"]
                else pos
            )
        if len(pos) != self.info.time_ids:
            raise BundleError(
                f"this bundle's UNet takes {self.info.time_ids} time ids, the conditioning gives {len(pos)}; rebuild it with `{self.hint}`"
            )
        return np.asarray(pos, np.float32), np.asarray(neg, np.float32)

    def encode(
        self, prompts: Sequence[str], negatives: Sequence[str] | None = None, conditioning: Mapping[str, Any] | None = None
    ) -> Conditioning:
        checked = self.conditioning({}) if conditioning is None else conditioning
        pos_ids, neg_ids = self.time_ids(checked)
        texts = [*(negatives or ()), *prompts]  # one call per encoder and chunk for both halves: its batch is static
        context, pooled = self._embed(texts, prompt_weighting(checked))
        n = len(negatives or ())
        if n and self.info.force_zeros_for_empty_prompt:
            empty = np.array([not t.strip() for t in negatives or ()] + [False] * len(prompts))
            context[empty] = 0.0
            pooled[empty] = 0.0
        time_ids = np.concatenate([np.tile(neg_ids, (n, 1)), np.tile(pos_ids, (len(prompts), 1))])
        return Conditioning(context, {"text_embeds": pooled, "time_ids": time_ids})

    def _embed(self, texts: list[str], weighting: bool) -> tuple[np.ndarray, np.ndarray]:
        """Each encoder's chunks weighted and concatenated along the sequence, the encoders side by side; the pooled
        projection from the first chunk, as compel and A1111 take it."""
        chunks = self._chunks(texts, weighting)
        hidden, pooled = [], []
        for e in self.info.encoders:
            enc = self.engine(e.component)

            def run(ids: np.ndarray, enc: Any = enc) -> np.ndarray:
                out = enc(cast_feed(enc.component, {"input_ids": ids}))
                if "text_embeds" in out:
                    pooled.append(np.asarray(out["text_embeds"], dtype=np.float32))
                return np.asarray(out["penultimate_hidden_state"], dtype=np.float32)

            hidden.append(encode_chunks(run, chunks[e.component]))
        if not pooled:
            raise BundleError(f"no text encoder of this bundle gives text_embeds (SDXL's pooled projection); rebuild it with `{self.hint}`")
        return np.concatenate(hidden, axis=-1), pooled[0].copy()

    def _chunks(self, texts: list[str], weighting: bool) -> dict[str, Chunks]:
        """Every encoder's chunks, as many for each (its tokenizer may cut a prompt into fewer); one warning per prompt."""
        names = [e.component for e in self.info.encoders]
        out = {
            n: chunk_prompts(self.tokenizers[n], texts, self.max_chunks, weighting, self.rebuild, warn=i == 0) for i, n in enumerate(names)
        }
        count = max(c.count for c in out.values())
        for n in names:
            if out[n].count < count:
                out[n] = chunk_prompts(self.tokenizers[n], texts, self.max_chunks, weighting, at_least=count, warn=False)
        return out


def _pair(name: str, value: Any) -> tuple[int, int]:
    ok = (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v <= 1 << 20 for v in value)
    )
    if not ok:
        raise ValueError(f"{name} must be a pair of whole numbers >= 0, (height, width) or (top, left), got {value!r}")
    return (int(value[0]), int(value[1]))


def _score(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(value):
        raise ValueError(
            f"{name} must be a finite number (diffusers' defaults: aesthetic_score 6.0, negative_aesthetic_score 2.5), got {value!r}"
        )
    return float(value)
