"""Training captions as token ids, drawn on the training device without Python per sample.

``random_caption`` is drawn ahead of time, many times for each attribute combination (the
dataset has a few hundred), and every distinct caption is tokenized once. A training step then
picks one of its image's pre-drawn captions uniformly at random, so each use of an image gets
a fresh draw from (a large sample of) the caption distribution, and the empty caption with
probability ``dropout`` for classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPTokenizer

from reference.architecture import CLIP_BOS_ID, CLIP_DIR, CLIP_EOS_ID, CLIP_PAD_ID, MAX_TOKENS, TOKENIZER_FILES
from reference.dataset import Attributes, random_caption

EMPTY = 0  # row of the empty caption in CaptionBank.token_ids


def load_tokenizer(directory: Path = CLIP_DIR) -> CLIPTokenizer:
    """transformers' CLIPTokenizer from the committed CLIP vocabulary, checked against the model's ids."""
    missing = [name for name in TOKENIZER_FILES if not (Path(directory) / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CLIP tokenizer files {missing} not found in {directory}; pass the folder holding the real "
            f"CLIP vocab.json and merges.txt (the repository keeps them in assets/clip-tokenizer)"
        )
    tokenizer = CLIPTokenizer.from_pretrained(str(directory))
    found = (tokenizer.model_max_length, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    wanted = (MAX_TOKENS, CLIP_BOS_ID, CLIP_EOS_ID, CLIP_PAD_ID)
    if found != wanted:
        raise ValueError(
            f"tokenizer in {directory} has (model_max_length, bos, eos, pad) = {found}, expected {wanted}: "
            "it is not SD 1.x's CLIP tokenizer"
        )
    return tokenizer


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> np.ndarray:
    """(n, 77) int64 ids, padded as StableDiffusionPipeline pads its prompts."""
    ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True).input_ids
    return np.asarray(ids, dtype=np.int64)


@dataclass(frozen=True)
class CaptionBank:
    """Token ids of every pre-drawn caption, and which of them belong to each image."""

    token_ids: np.ndarray  # (n_captions, 77) int64; row EMPTY is ""
    draws: np.ndarray  # (n_combinations, k) int32 rows of token_ids
    combination: np.ndarray  # (n_images,) int32 row of draws


def build_caption_bank(tokenizer: CLIPTokenizer, attributes: list[Attributes], k: int, seed: int) -> CaptionBank:
    """Draw ``k`` captions per distinct attribute combination and tokenize each distinct one."""
    if k < 1:
        raise ValueError(f"need at least one caption per combination, got k={k}")
    rng = np.random.default_rng(seed)
    combos = sorted(set(attributes), key=lambda a: tuple(vars(a).values()))
    combo_row = {a: i for i, a in enumerate(combos)}
    caption_row = {"": EMPTY}
    draws = np.empty((len(combos), k), dtype=np.int32)
    for i, a in enumerate(combos):
        for j in range(k):
            draws[i, j] = caption_row.setdefault(random_caption(a, rng), len(caption_row))
    return CaptionBank(
        token_ids=tokenize(tokenizer, list(caption_row)),
        draws=draws,
        combination=np.array([combo_row[a] for a in attributes], dtype=np.int32),
    )


class CaptionSampler:
    """Draws token ids for a batch of image indices on ``device``."""

    def __init__(self, bank: CaptionBank, dropout: float, device: torch.device):
        self.token_ids = torch.from_numpy(bank.token_ids).to(device)
        self.draws = torch.from_numpy(bank.draws.astype(np.int64)).to(device)
        self.combination = torch.from_numpy(bank.combination.astype(np.int64)).to(device)
        self.dropout = dropout

    def __call__(self, image_index: torch.Tensor) -> torch.Tensor:
        """(batch, 77) ids: one random pre-drawn caption per image, or "" with the dropout probability."""
        n = image_index.shape[0]
        pick = torch.randint(self.draws.shape[1], (n,), device=image_index.device)
        rows = self.draws[self.combination[image_index], pick]
        dropped = torch.rand(n, device=image_index.device) < self.dropout
        rows = torch.where(dropped, torch.full_like(rows, EMPTY), rows)
        return self.token_ids[rows]
