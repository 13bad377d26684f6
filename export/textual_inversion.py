"""Textual-inversion embeddings (export.build --textual-inversion FILE[:TOKEN]): new tokens in the bundle's tokenizer,
their vectors in the text encoder's token embedding, as diffusers' load_textual_inversion adds them.

Files: diffusers' learned_embeds.safetensors ({token: vectors}), A1111's .pt ({"name", "string_to_param": {"*": ...}})
and .safetensors ({"emb_params": vectors}), SDXL's {"clip_l", "clip_g"} pairs (one per text encoder). A file of n
vectors adds TOKEN, TOKEN_1 ... TOKEN_{n-1}; the runtime reads TOKEN in a prompt as all of them (diffusers does the
same). The tokens go to the bundle's tokenizer folders as added_tokens.json (token -> id), which the runtime reads.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.bundle import sha256_file
from runtime.bundle.hints import PICKLE_SUFFIXES as PICKLES
from runtime.tokenizer import ADDED_TOKENS

from .errors import ModelError

SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}  # the encoder each SDXL embedding half belongs to


@dataclass(frozen=True)
class Embedding:
    """One file's vectors per text encoder (SD: the one; SDXL: clip_l -> text_encoder, clip_g -> text_encoder_2)."""

    path: Path
    token: str
    vectors: dict[str, Any]  # text encoder -> torch tensor (n, hidden)


def parse_spec(spec: str) -> tuple[Path, str | None]:
    """FILE[:TOKEN]; a FILE that exists as written (a path with a colon) takes no TOKEN."""
    if Path(spec).is_file() or ":" not in spec:
        return Path(spec), None
    file, token = spec.rsplit(":", 1)
    return Path(file), token or None


def check_spec(spec: str, allow_pickle: bool) -> None:
    """The file exists, is a kind we read, and a pickle is allowed; before any model loads."""
    path, token = parse_spec(spec)
    if not path.is_file():
        raise ValueError(
            f"--textual-inversion {spec}: {path} is not a file (pass FILE[:TOKEN], e.g. --textual-inversion easynegative.safetensors)"
        )
    if path.suffix not in (".safetensors", *PICKLES):
        raise ValueError(f"--textual-inversion {spec}: {path.name} is neither .safetensors nor a .pt/.bin embedding")
    if path.suffix in PICKLES and not allow_pickle:
        raise ValueError(
            f"--textual-inversion {spec}: {path.name} is a pickle file, which can run code when loaded; convert it to "
            "safetensors, or pass --allow-pickle if you trust this file"
        )
    if token is not None and (not token.strip() or any(c.isspace() for c in token)):
        raise ValueError(f"--textual-inversion {spec}: the token {token!r} must be one word without spaces")


def read_embedding(spec: str, encoders: dict[str, int], allow_pickle: bool) -> Embedding:
    """The file's token and vectors per encoder (encoders: text encoder -> its hidden size), checked against the model."""
    check_spec(spec, allow_pickle)
    path, token = parse_spec(spec)
    data = _load(path)
    named: str | None = None
    if any(k in data for k in SDXL_KEYS.values()):
        wanted = {enc: SDXL_KEYS[enc] for enc in encoders}
        missing = [key for key in wanted.values() if key not in data]
        if missing:
            raise ModelError(f"{path}: an SDXL embedding without {', '.join(missing)}, which this model's text encoders need")
        raw = {enc: data[key] for enc, key in wanted.items()}
    else:
        if "string_to_param" in data:  # A1111's .pt
            named, vectors = str(data.get("name") or "") or None, data["string_to_param"]["*"]
        elif "emb_params" in data:  # A1111's .safetensors: the file's name is the token there
            vectors = data["emb_params"]
        elif len(data) == 1:  # diffusers' learned_embeds: {token: vectors}
            named, vectors = next(iter(data.items()))
        else:
            raise ModelError(
                f"{path}: not a textual-inversion embedding this SDK reads (keys {', '.join(sorted(data)[:5])}); expected diffusers' "
                "{token: vectors}, A1111's string_to_param or emb_params, or SDXL's clip_l/clip_g"
            )
        if len(encoders) > 1:
            raise ModelError(f"{path}: a single-encoder embedding, but this SDXL model has two text encoders; use a clip_l/clip_g file")
        raw = {next(iter(encoders)): vectors}
    out = {}
    for enc, vectors in raw.items():
        v = vectors.reshape(1, -1) if vectors.ndim == 1 else vectors
        if v.ndim != 2 or v.shape[1] != encoders[enc]:
            raise ModelError(
                f"{path}: its vectors are {tuple(vectors.shape)}, but {enc} takes vectors of {encoders[enc]}; the embedding was "
                "trained for another model"
            )
        out[enc] = v.float()
    return Embedding(path, token or named or path.stem, out)


def _load(path: Path) -> dict[str, Any]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        import torch

        data = torch.load(str(path), map_location="cpu", weights_only=True)  # even an allowed pickle loads as data only
    except Exception as e:  # the readers raise their own untyped errors for files that are not theirs
        raise ModelError(f"{path}: could not read it as an embedding ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: holds a {type(data).__name__}, not an embedding's dictionary")
    return data


def apply(model: Any, specs: tuple[str, ...], allow_pickle: bool, log: Callable[[str], None]) -> dict[str, dict[str, int]]:
    """Add every embedding's tokens to the model's tokenizers and vectors to its text encoders (in place);
    returns, per bundle tokenizer folder, the added tokens and their ids (for added_tokens.json)."""
    if not specs:
        return {}
    from transformers import CLIPTokenizer

    folders = dict(zip(("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2")))
    modules = {n: m for n, m in (("text_encoder", model.text_encoder), ("text_encoder_2", model.text_encoder_2)) if m is not None}
    tokenizers = {n: CLIPTokenizer.from_pretrained(model.path / folders[n]) for n in modules}
    sizes = {n: int(m.get_input_embeddings().weight.shape[1]) for n, m in modules.items()}
    added: dict[str, dict[str, int]] = {folders[n]: {} for n in modules}
    for spec in specs:
        emb = read_embedding(spec, sizes, allow_pickle)
        for enc, vectors in emb.vectors.items():
            tokens = [emb.token, *(f"{emb.token}_{i}" for i in range(1, vectors.shape[0]))]
            ids = _add(tokenizers[enc], modules[enc], tokens, vectors, emb.path)
            added[folders[enc]].update(zip(tokens, ids))
        model.hashes[f"textual_inversion/{emb.path.name}"] = sha256_file(emb.path)
        n = next(iter(emb.vectors.values())).shape[0]
        log(f"  textual inversion: {emb.token} ({n} vector{'s' if n > 1 else ''}) from {emb.path}")
    return added


def _add(tokenizer: Any, encoder: Any, tokens: list[str], vectors: Any, path: Path) -> list[int]:
    """As diffusers' load_textual_inversion: new tokens, the embedding matrix grown to the tokenizer, the rows set."""
    import torch

    taken = [t for t in tokens if t in tokenizer.get_vocab()]
    if taken:
        raise ModelError(f"{path}: the token {taken[0]!r} is already in the tokenizer; pass another as FILE:TOKEN")
    tokenizer.add_tokens(tokens)
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(tokens)]
    encoder.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        weight = encoder.get_input_embeddings().weight
        for token_id, vector in zip(ids, vectors):
            weight[token_id] = vector.to(weight.dtype)
    return ids


def write_added_tokens(folder: Path, tokens: dict[str, int]) -> None:
    """The bundle tokenizer folder's added_tokens.json: the tokens the source folder already listed, and ours."""
    if not tokens:
        return
    file = folder / ADDED_TOKENS
    known = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    file.write_text(json.dumps({**known, **tokens}, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
