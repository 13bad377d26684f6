"""LoRA adapter files, read without torch: safetensors only, two key layouts, every key accounted for.

Layouts (what model sites and diffusers write):
- diffusers/peft: `unet.<module>.lora_A.weight` / `.lora_B.weight` (or `.lora.down.weight` / `.lora.up.weight`),
  `text_encoder.[text_model.]<module>...`; optional `<module>.alpha` tensors, else the file's
  `lora_adapter_metadata` (diffusers' save_lora_weights) `lora_alpha`, else alpha = rank.
- kohya/A1111: `lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`, `lora_te_<...>`.

Each layer's update is scale * alpha / rank * up @ down, as diffusers' fuse_lora and peft compute it.
Supported layers: Linear and 1x1 Conv2d (kohya's proj_in/proj_out in SD 1.x). Anything else, and any key this
module cannot place (DoRA, LyCORIS, another model's layers), is an error naming the first such key.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import LoraTarget

COMPONENTS = ("unet", "text_encoder")
KINDS = ("linear", "conv1x1")  # the layer kinds a LoRA update is applied to (fused and in slots)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header

_DIFFUSERS = re.compile(r"^(unet|text_encoder)\.(.+)\.(lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight|alpha)$")
_KOHYA = re.compile(r"^lora_(unet|te|te1|te2)_([A-Za-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_ROLE = {
    "lora_A.weight": "down", "lora.down.weight": "down", "lora_down.weight": "down",
    "lora_B.weight": "up", "lora.up.weight": "up", "lora_up.weight": "up", "alpha": "alpha",
}  # fmt: skip
_KOHYA_COMPONENT = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder"}
# keys of other adapter kinds, named so the error says what the file is
_OTHER_KINDS = (
    ("dora_scale", "DoRA (weight-decomposed LoRA)"),
    ("lora_magnitude_vector", "DoRA (weight-decomposed LoRA)"),
    ("hada_", "LyCORIS LoHa"),
    ("lokr_", "LyCORIS LoKr"),
    (".diff", "a full weight difference (LyCORIS 'full')"),
    ("lora_mid", "LyCORIS LoCon with a Tucker mid tensor"),
)


class LoraError(ValueError):
    """A LoRA adapter file that cannot be applied: the message names the file, the first bad key, and the fix."""


@dataclass(frozen=True)
class Layer:
    """What a LoRA update must fit: the layer's kind and its input and output features."""

    kind: str  # linear | conv1x1 | any other: named in the refusal
    in_features: int
    out_features: int


Layers = Mapping[str, Mapping[str, Layer]]  # component -> module name -> layer
Shapes = Mapping[tuple[str, str], tuple[int, ...]]  # (component, input name) -> the slot input's shape


@dataclass(frozen=True)
class Update:
    """One layer's low-rank update: delta W = alpha / rank * up @ down (times the adapter's scale)."""

    component: str
    module: str
    down: np.ndarray  # (rank, in_features), float32
    up: np.ndarray  # (out_features, rank), float32
    alpha: float
    key: str  # the file's key for `down`, for messages

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, scale: float) -> np.ndarray:
        """scale * alpha / rank * up @ down, (out, in) in float32."""
        out: np.ndarray = ((scale * self.alpha / self.rank) * (self.up.astype(np.float64) @ self.down.astype(np.float64))).astype(
            np.float32
        )
        return out


@dataclass(frozen=True)
class Adapter:
    path: Path
    sha256: str
    updates: tuple[Update, ...]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def rank(self) -> int:
        return max((u.rank for u in self.updates), default=0)


def parse_spec(spec: str) -> tuple[Path, float]:
    """`FILE[:SCALE]` -> (path, scale); the scale defaults to 1 (a Windows drive's colon is no scale)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", tail):
        return Path(head), float(tail)
    return Path(spec), 1.0


def read_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    """A .safetensors file's tensors (float32), its metadata and sha256; pickles, truncated and foreign files refused."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist (or is not a file)")
    data = path.read_bytes()
    what = f"LoRA file {path}"
    header = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else -1
    fits = 0 <= header <= min(MAX_HEADER, len(data) - 8) and data[8:9] == b"{"
    # pickle protocol 2+ opens with 0x80 and the protocol number, torch.save's zip with PK\x03\x04 (a safetensors
    # header length can start with 0x80 too: the header decides first)
    pickled = (data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or data[:4] == b"PK\x03\x04"
    if path.suffix.lower() in PICKLE_SUFFIXES or (pickled and not fits):
        raise LoraError(
            f"{what} is a pickle (torch.save) file, which can run code when loaded: adapters are read from .safetensors "
            "only. Convert it where you trust it (safetensors.torch.save_file(torch.load(f), 'adapter.safetensors'))"
        )
    if not fits:
        raise LoraError(f"{what} is not a safetensors file, or is truncated: its header does not fit the file ({len(data)} bytes)")
    try:
        from safetensors.numpy import load
    except ImportError:
        raise LoraError("reading LoRA adapters needs the safetensors package (no torch): `pip install safetensors`") from None
    try:
        tensors = load(data)
        meta = json.loads(data[8 : 8 + header]).get("__metadata__") or {}
    except Exception as e:  # safetensors raises its own SafetensorError (and others for bf16 in numpy)
        detail = " ".join(str(e).split())[:200]
        hint = " (bfloat16 tensors: save the adapter in float16 or float32)" if "bf16" in detail.lower() else " (truncated or damaged?)"
        raise LoraError(f"{what} cannot be read as safetensors: {detail}{hint}") from None
    bad = next((k for k, v in sorted(tensors.items()) if not np.issubdtype(v.dtype, np.floating)), None)
    if bad is not None:
        raise LoraError(f"{what}: tensor {bad} is {tensors[bad].dtype}, not a floating-point LoRA weight")
    floats = {k: v.astype(np.float32) for k, v in tensors.items()}
    return floats, {str(k): str(v) for k, v in meta.items()}, hashlib.sha256(data).hexdigest()


def kohya_names(layers: Layers) -> dict[str, tuple[str, str]]:
    """kohya's flattened names (`lora_unet_down_blocks_0_..._to_q`) -> (component, module), for every known layer.

    Text encoder layers are known as `text_model.<module>` too (transformers 4's CLIPTextModel naming, kohya's `lora_te_`).
    """
    out: dict[str, tuple[str, str]] = {}
    for component, modules in layers.items():
        prefix = "lora_unet_" if component == "unet" else "lora_te_"
        for module in modules:
            flat = module.replace(".", "_")
            out[prefix + flat] = (component, module)
            if component == "text_encoder":
                out[prefix + "text_model_" + flat] = (component, module)
    return out


def _place(key: str, kohya: Mapping[str, tuple[str, str]], layers: Layers) -> tuple[str, str | None, str, str]:
    """A key -> (component, module or None where no known layer has that name, role, the layer's name in the file)."""
    for marker, kind in _OTHER_KINDS:
        if marker in key:
            raise LoraError(f"key {key} is {kind}; this SDK applies plain LoRA (down/up matrices and alpha) only")
    m = _DIFFUSERS.match(key)
    if m:
        component, module, role = m[1], m[2], _ROLE[m[3]]
        if component == "text_encoder" and module.startswith("text_model.") and module not in layers.get(component, {}):
            module = module[len("text_model.") :]
        return component, module, role, f"{m[1]}.{m[2]}"
    m = _KOHYA.match(key)
    if m:
        if m[1] == "te2":
            raise LoraError(f"key {key} is for SDXL's second text encoder; this SDK exports SD 1.x/2.x (one text encoder)")
        name = key.split(".", 1)[0]
        placed = kohya.get(name)
        component = _KOHYA_COMPONENT[m[1]]
        return component, placed[1] if placed else None, _ROLE[m[3]], name
    raise LoraError(
        f"key {key} is in neither LoRA layout this SDK reads (diffusers/peft `unet.<layer>.lora_A.weight`, "
        "kohya `lora_unet_<layer>.lora_down.weight`); unknown keys are not skipped"
    )


def _metadata_alphas(meta: Mapping[str, str], path: Path) -> dict[str, float]:
    """diffusers' save_lora_weights keeps each component's peft LoraConfig in `lora_adapter_metadata`: its lora_alpha."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError:
        raise LoraError(f"LoRA file {path}: its lora_adapter_metadata is not JSON") from None
    alphas: dict[str, float] = {}
    for component in COMPONENTS:
        for field, value in config.items() if isinstance(config, dict) else ():
            if not field.startswith(component + "."):
                continue
            name = field[len(component) + 1 :]
            if name == "lora_alpha":
                alphas[component] = float(value)
            elif name in ("alpha_pattern", "rank_pattern") and value:
                raise LoraError(f"LoRA file {path}: per-layer {name} in its metadata is not supported; fuse such adapters with peft")
            elif name == "use_dora" and value:
                raise LoraError(f"LoRA file {path} is a DoRA adapter (use_dora); this SDK applies plain LoRA only")
            elif name == "use_rslora" and value:
                raise LoraError(f"LoRA file {path} uses rank-stabilised scaling (use_rslora: alpha / sqrt(rank)); not supported")
    return alphas


def read_adapter(path: str | Path, layers: Layers, *, where: str = "this model", fix: str = "") -> Adapter:
    """Read and check an adapter against `layers` (component -> module -> Layer): every key placed, every shape fitting.

    where: what `layers` are, for messages ("this model", "this bundle's LoRA slots"); fix: appended to the error
    for a key that names no layer of `layers` (e.g. the command that fuses the adapter at export instead).
    """
    path = Path(path)
    tensors, meta, digest = read_tensors(path)
    if not tensors:
        raise LoraError(f"LoRA file {path} holds no tensors")
    kohya = kohya_names(layers)
    meta_alpha = _metadata_alphas(meta, path)
    grouped: dict[tuple[str, str], dict[str, tuple[str, np.ndarray]]] = {}
    for key in sorted(tensors):
        try:
            component, module, role, name = _place(key, kohya, layers)
        except LoraError as e:
            raise LoraError(f"LoRA file {path}: {e}") from None
        if module is None or module not in layers.get(component, {}):
            shown = module or name
            raise LoraError(
                f"LoRA file {path}: key {key} names {component} layer {shown!r}, which {where} does not have "
                f"(an adapter for another base model, or a layer without a slot){fix}"
            )
        grouped.setdefault((component, module), {})[role] = (key, tensors[key])
    updates = tuple(
        _update(path, component, module, parts, layers[component][module], meta_alpha) for (component, module), parts in grouped.items()
    )
    return Adapter(path.resolve(), digest, updates)


def _update(
    path: Path, component: str, module: str, parts: Mapping[str, tuple[str, np.ndarray]], layer: Layer, alphas: Mapping[str, float]
) -> Update:
    """One layer's down/up/alpha, checked against the layer's kind and features."""
    some_key = next(iter(parts.values()))[0]
    for role in ("down", "up"):
        if role not in parts:
            raise LoraError(f"LoRA file {path}: {some_key} has no matching {role} matrix for {component} layer {module}")
    (down_key, down), (up_key, up) = parts["down"], parts["up"]
    if layer.kind not in KINDS:
        raise LoraError(
            f"LoRA file {path}: {down_key} targets {component} layer {module}, a {layer.kind}; this SDK applies LoRA to "
            "Linear and 1x1 Conv2d layers only (no LoCon on 3x3 convolutions)"
        )
    if down.ndim == 4 and down.shape[2:] == (1, 1) and up.ndim == 4 and up.shape[2:] == (1, 1):
        down, up = down[:, :, 0, 0], up[:, :, 0, 0]  # a 1x1 convolution's update, or a Linear's saved as one
    rank = down.shape[0] if down.ndim == 2 else -1
    expected = {down_key: (down, (rank, layer.in_features)), up_key: (up, (layer.out_features, rank))}
    for key, (value, shape) in expected.items():
        if value.shape != shape or rank < 1:
            raise LoraError(
                f"LoRA file {path}: {key} has shape {tuple(value.shape)}, but {component} layer {module} "
                f"({layer.kind}, {layer.in_features} -> {layer.out_features} features) needs {shape if rank >= 1 else '(rank, in)'}: "
                "the adapter was made for another base model, or its down/up ranks differ"
            )
    alpha = float(rank)
    if "alpha" in parts:
        value = parts["alpha"][1]
        if value.size != 1:
            raise LoraError(f"LoRA file {path}: {parts['alpha'][0]} has shape {tuple(value.shape)}; alpha is one number")
        alpha = float(value.reshape(()))
    elif component in alphas:
        alpha = alphas[component]
    if not np.isfinite(alpha) or not (np.isfinite(down).all() and np.isfinite(up).all()):
        raise LoraError(f"LoRA file {path}: {down_key} (or its up matrix or alpha) holds NaN/inf")
    return Update(component, module, np.ascontiguousarray(down), np.ascontiguousarray(up), alpha, down_key)


# ---- slots: several adapters, each with its scale, stacked along the rank of one bundle's LoRA slots


def slot_layers(targets: Sequence[LoraTarget]) -> dict[str, dict[str, Layer]]:
    """The layers a slotted bundle takes adapters for, as read_adapter checks them."""
    out: dict[str, dict[str, Layer]] = {}
    for t in targets:
        out.setdefault(t.component, {})[t.module] = Layer(t.kind, t.in_features, t.out_features)
    return out


def rank_needed(adapters: Sequence[tuple[Adapter, float]]) -> tuple[int, str]:
    """The largest sum of ranks any one layer gets, and that layer ("" without adapters)."""
    per_layer: dict[tuple[str, str], int] = {}
    for adapter, _ in adapters:
        for u in adapter.updates:
            per_layer[(u.component, u.module)] = per_layer.get((u.component, u.module), 0) + u.rank
    if not per_layer:
        return 0, ""
    (component, module), rank = max(per_layer.items(), key=lambda kv: kv[1])
    return rank, f"{component} layer {module}"


def slot_feeds(
    targets: Sequence[LoraTarget], rank: int, shapes: Shapes, adapters: Sequence[tuple[Adapter, float]]
) -> dict[str, dict[str, np.ndarray]]:
    """The slot inputs per component: A^T (in, rank) holds the adapters' down matrices side by side along the rank,
    B^T (rank, out) their up matrices times scale * alpha / rank; the rest zeros (the base model). Ranks must fit `rank`."""
    feeds: dict[str, dict[str, np.ndarray]] = {}
    for t in targets:
        for name in (t.a, t.b):
            feeds.setdefault(t.component, {}).setdefault(name, np.zeros(shapes[(t.component, name)], dtype=np.float32))
    by_layer: dict[tuple[str, str], list[tuple[Update, float]]] = {}
    for adapter, scale in adapters:
        for u in adapter.updates:
            by_layer.setdefault((u.component, u.module), []).append((u, scale))
    index = {(t.component, t.module): t for t in targets}
    for key, updates in by_layer.items():
        t = index[key]
        a, b = feeds[t.component][t.a], feeds[t.component][t.b]
        offset = 0
        for u, scale in updates:
            if offset + u.rank > rank:
                raise LoraError(f"{t.component} layer {t.module}: the adapters' ranks exceed the slot rank {rank}")
            a[t.index, :, offset : offset + u.rank] = u.down.T
            b[t.index, offset : offset + u.rank, :] = (u.up.astype(np.float64) * (scale * u.alpha / u.rank)).astype(np.float32).T
            offset += u.rank
    return feeds


def file_rank(path: Path) -> int:
    """The largest rank of an adapter file's down matrices, read without placing its keys (for a rebuild hint)."""
    tensors, _, _ = read_tensors(path)
    downs = tuple("." + suffix for suffix, role in _ROLE.items() if role == "down")
    return max((int(v.shape[0]) for k, v in tensors.items() if k.endswith(downs) and v.ndim >= 2), default=0)


class SlotState:
    """The slot inputs a slotted bundle's engines are fed on every call: zeros (the base model) until set."""

    def __init__(self, targets: Sequence[LoraTarget], rank: int, shapes: Shapes):
        self.targets, self.rank, self.shapes = tuple(targets), rank, dict(shapes)
        self.layers = slot_layers(self.targets)
        self.active: tuple[tuple[Adapter, float], ...] = ()
        self.feeds = slot_feeds(self.targets, rank, self.shapes, ())

    def set(self, adapters: Sequence[tuple[Adapter, float]]) -> None:
        """New feeds built from scratch (never updated in place: A -> B -> A feeds A's very arrays again)."""
        self.feeds = slot_feeds(self.targets, self.rank, self.shapes, adapters)
        self.active = tuple(adapters)


class SlotFed:
    """An engine whose calls also get its component's current slot inputs: the Engine protocol, unchanged for callers."""

    def __init__(self, engine: Any, state: SlotState):
        self.engine, self.state, self.component = engine, state, engine.component

    def __call__(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = self.engine({**feed, **self.state.feeds.get(self.component.name, {})})
        return out

    def close(self) -> None:
        getattr(self.engine, "close", lambda: None)()
