"""CLIP's text tokenizer for the runtime, on the `tokenizers` library alone (no torch, no transformers).

Gives the ids of transformers' ``CLIPTokenizer`` (5.x, the class a diffusers pipeline loads) called with
``padding="max_length", truncation=True``: NFC, whitespace runs to one space, lowercase; CLIP's word
pattern; byte-level BPE with the ``</w>`` end-of-word suffix; ``bos ... eos``, padded to the context.
"""

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

# CLIP's words: its two special tokens, English contractions, letter runs, single digits, other symbol runs.
CLIP_WORD_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
END_OF_WORD = "</w>"
DEFAULT_MAX_LENGTH = 77  # CLIP's context length, for a config that does not say
MAX_CONTEXT = 4096  # far beyond any CLIP text encoder: a larger model_max_length is a config error
# In the order transformers registers them: where roles share a token, the later role's flags win.
DEFAULT_SPECIAL_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized")
ADDED_TOKENS = "added_tokens.json"


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the text encoder's context and lost its tail."""


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON file's object, or {} where the file is absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-export the engine bundle's tokenizer files") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object; re-export the engine bundle's tokenizer files")
    return data


def _bad_bpe_file(folder: Path) -> Path:
    """Which of vocab.json and merges.txt made the BPE model fail to load: vocab.json unless it reads as a token map."""
    vocab = folder / "vocab.json"
    try:
        data = json.loads(vocab.read_text(encoding="utf-8"))
        if isinstance(data, dict) and all(isinstance(k, str) and isinstance(v, int) for k, v in data.items()):
            return folder / "merges.txt"
    except (OSError, ValueError):
        pass
    return vocab


def _content(value: str | dict[str, Any]) -> str:
    """A config entry's token text."""
    return value if isinstance(value, str) else value["content"]


def _special_token(value: str | dict[str, Any]) -> AddedToken:
    """An AddedToken from a config entry: a bare string is matched verbatim (not normalized), as in transformers."""
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    flags = {k: value[k] for k in TOKEN_FLAGS if k in value}
    return AddedToken(value["content"], special=True, **{"normalized": False, **flags})


def load_special_tokens(folder: Path) -> dict[str, AddedToken]:
    """Role -> token, read the way transformers reads a CLIP tokenizer folder."""
    config = _read_json(folder / "tokenizer_config.json")
    entries = dict(DEFAULT_SPECIAL_TOKENS)
    entries.update({r: config[r] for r in DEFAULT_SPECIAL_TOKENS if config.get(r) is not None})
    declared = {t["content"]: t for t in config.get("added_tokens_decoder", {}).values()}
    if declared:
        # Newer configs declare each token's flags once; special_tokens_map.json is then legacy and unread.
        entries = {r: declared.get(_content(v), v) for r, v in entries.items()}
    else:
        special_map = _read_json(folder / "special_tokens_map.json")
        entries.update({r: special_map[r] for r in DEFAULT_SPECIAL_TOKENS if special_map.get(r) is not None})
    return {role: _special_token(value) for role, value in entries.items()}


def build_clip_bpe(vocab: Path, merges: Path, specials: dict[str, AddedToken]) -> Tokenizer:
    """The CLIP pipeline, without truncation or padding (those are done per batch, to report what is cut)."""
    model = BPE.from_file(str(vocab), str(merges), unk_token=str(specials["unk_token"]), end_of_word_suffix=END_OF_WORD)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_WORD_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(specials.values()))
    bos, eos = str(specials["bos_token"]), str(specials["eos_token"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tokenizer.token_to_id(bos)), (eos, tokenizer.token_to_id(eos))]
    )
    return tokenizer


def load_added_tokens(folder: Path) -> dict[str, int]:
    """Textual-inversion tokens (added_tokens.json, transformers' record of tokens beyond vocab.json): token -> id."""
    data = _read_json(folder / ADDED_TOKENS)
    if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in data.items()):
        raise ValueError(f"{folder / ADDED_TOKENS} must map tokens to ids; re-export the engine bundle's tokenizer")
    return dict(sorted(data.items(), key=lambda kv: kv[1]))


class ClipTokenizer:
    """Prompts -> CLIP token ids, truncated and padded to the text encoder's context."""

    def __init__(
        self, tokenizer: Tokenizer, specials: dict[str, AddedToken], max_length: int = DEFAULT_MAX_LENGTH,
        added: dict[str, int] | None = None,
    ):  # fmt: skip
        if not 2 <= max_length <= MAX_CONTEXT:
            # transformers writes 1e30 where no length was set; CLIP text encoders take 77.
            raise ValueError(
                f"max_length must be between 2 (bos + eos) and {MAX_CONTEXT}, got {max_length}; "
                "set model_max_length in tokenizer_config.json to the text encoder's context (77 for CLIP)"
            )
        self._tokenizer = tokenizer
        self.max_length = max_length
        self.bos_id, self.eos_id, self.pad_id = (
            self._token_id(specials[role]) for role in ("bos_token", "eos_token", "pad_token")
        )
        self.expansions = self._add_tokens(added or {})

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> "ClipTokenizer":
        """Load vocab.json + merges.txt (+ tokenizer_config.json, special_tokens_map.json) from a folder."""
        folder = Path(path)
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"{folder / name} is missing: the tokenizer bundle is incomplete "
                    "(it needs vocab.json and merges.txt); re-export the engine bundle"
                )
        config = folder / "tokenizer_config.json"
        try:
            specials = load_special_tokens(folder)
            max_length = int(_read_json(config).get("model_max_length", DEFAULT_MAX_LENGTH))
            added = load_added_tokens(folder)
        except ValueError:
            raise
        except (AttributeError, KeyError, TypeError, OverflowError, UnicodeDecodeError) as e:
            raise ValueError(
                f"{config} (or special_tokens_map.json) is malformed ({type(e).__name__}: {e}); re-export the engine bundle's tokenizer"
            ) from None
        try:
            tokenizer = build_clip_bpe(folder / "vocab.json", folder / "merges.txt", specials)
        except Exception as e:  # the tokenizers library raises its own untyped errors for unreadable files
            raise ValueError(f"{_bad_bpe_file(folder)} is malformed ({e}); re-export the engine bundle's tokenizer") from None
        return cls(tokenizer, specials, max_length, added)

    def _token_id(self, token: AddedToken) -> int:
        # A special token outside vocab.json would get a fresh id that the text encoder cannot embed.
        token_id = self._tokenizer.token_to_id(str(token))
        if token_id is None or token_id >= self._tokenizer.get_vocab_size(with_added_tokens=False):
            raise ValueError(f"special token {str(token)!r} is not in the vocabulary; check the tokenizer config")
        return token_id

    def _add_tokens(self, added: dict[str, int]) -> dict[int, list[int]]:
        """Register textual-inversion tokens at their recorded ids; return each multi-vector token's expansion.

        Added as transformers' add_tokens adds them (matched in the normalized text, not special). A token of n vectors
        is stored as TOKEN, TOKEN_1 ... TOKEN_{n-1}, and TOKEN in a prompt stands for all of them (diffusers'
        maybe_convert_prompt).
        """
        for token, token_id in added.items():
            self._tokenizer.add_tokens([AddedToken(token, special=False, normalized=True)])
            if self._tokenizer.token_to_id(token) != token_id:
                raise ValueError(
                    f"added token {token!r} should have id {token_id} but the vocabulary gives it "
                    f"{self._tokenizer.token_to_id(token)}; re-export the engine bundle's tokenizer"
                )
        expansions = {}
        for token, token_id in added.items():
            more: list[int] = []
            while f"{token}_{len(more) + 1}" in added:
                more.append(added[f"{token}_{len(more) + 1}"])
            if more:
                expansions[token_id] = [token_id, *more]
        return expansions

    def tokens(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, without bos/eos and untruncated; a multi-vector embedding's token gives all its ids."""
        out = []
        for encoding in self._tokenizer.encode_batch(texts, add_special_tokens=False):
            ids: list[int] = []
            for i in encoding.ids:
                ids.extend(self.expansions.get(i, (i,)))
            out.append(ids)
        return out

    def decode(self, ids: list[int]) -> str:
        """Token ids back to text (for warnings that quote what was cut)."""
        return str(self._tokenizer.decode(ids)).replace(END_OF_WORD, " ").strip()

    def __call__(self, prompts: str | list[str]) -> np.ndarray:
        """Token ids, int32 (batch, max_length): bos, the prompt's tokens, eos, then padding."""
        batch = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(batch, (list, tuple)) or not all(isinstance(p, str) for p in batch):
            raise TypeError(f"prompts must be a str or a list of str, got {prompts!r:.80}")
        ids = np.full((len(batch), self.max_length), self.pad_id, dtype=np.int32)
        for row, encoding in enumerate(self._tokenizer.encode_batch(batch)):
            tokens = self._truncate(encoding.ids)
            ids[row, : len(tokens)] = tokens
        return ids

    def _truncate(self, tokens: list[int]) -> list[int]:
        """Keep bos, the first tokens that fit and eos; warn with the text that was cut."""
        if len(tokens) <= self.max_length:
            return tokens
        dropped = tokens[self.max_length - 1 : -1]
        text = self.decode(dropped)
        warnings.warn(
            f"{len(dropped)} prompt tokens were dropped: CLIP can only handle sequences up to {self.max_length} "
            f"tokens, so the following part of the input was truncated: {text!r}",
            PromptTruncatedWarning,
            stacklevel=3,
        )
        return tokens[: self.max_length - 1] + [self.eos_id]
