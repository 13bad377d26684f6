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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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
FLOAT_DTYPES = ("F16", "F32", "F64")  # safetensors' names; BF16 is named by numpy's refusal with its fix
# Bounds on what an adapter may do to a weight (Stable Diffusion's weights are of order 0.01-1): alpha / rank is
# 0.5-2 in practice, a layer's update a fraction of the weight. Far past these is a damaged file, not a style.
MAX_ALPHA_PER_RANK = 1000.0
MAX_UPDATE = 1e4
MAX_SCALE = 100.0  # an adapter's scale (set_lora, --lora FILE:SCALE); 0-2 in practice


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


def read_header(path: Path) -> dict[str, Any]:
    """A .safetensors file's header (key -> dtype, shape, offsets; "__metadata__"), read without a byte of its tensors.

    Pickles, truncated and foreign files are refused here: what a key names can then be checked before any tensor is read.
    """
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist (or is not a file)")
    size = path.stat().st_size
    what = f"LoRA file {path}"
    with open(path, "rb") as f:
        head = f.read(9)
        length = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else -1
        fits = 0 <= length <= min(MAX_HEADER, size - 8) and head[8:9] == b"{"
        # pickle protocol 2+ opens with 0x80 and the protocol number, torch.save's zip with PK\x03\x04 (a safetensors
        # header length can start with 0x80 too: the header decides first)
        pickled = (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or head[:4] == b"PK\x03\x04"
        if path.suffix.lower() in PICKLE_SUFFIXES or (pickled and not fits):
            raise LoraError(
                f"{what} is a pickle (torch.save) file, which can run code when loaded: adapters are read from .safetensors "
                "only. Convert it where you trust it (safetensors.torch.save_file(torch.load(f), 'adapter.safetensors'))"
            )
        if not fits:
            raise LoraError(f"{what} is not a safetensors file, or is truncated: its header does not fit the file ({size} bytes)")
        f.seek(8)
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict) or not all(isinstance(v, dict) for v in header.values()):
        raise LoraError(f"{what} cannot be read as safetensors: its header is not a JSON object of tensors (truncated or damaged?)")
    return header


def read_tensors(
    path: Path, check_keys: Callable[[Sequence[str]], None] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    """A .safetensors file's tensors (float32), its metadata and sha256; pickles, truncated and foreign files refused.

    check_keys: called with the tensor names from the header, before any tensor is read (a 256 MB adapter with a
    wrong key is refused having read only its header).
    """
    path = Path(path)
    header = read_header(path)
    what = f"LoRA file {path}"
    names = sorted(k for k in header if k != "__metadata__")
    bad = next((k for k in names if str(header[k].get("dtype", "")) not in FLOAT_DTYPES), None)
    if bad is not None and str(header[bad].get("dtype")) != "BF16":
        raise LoraError(f"{what}: tensor {bad} is {header[bad].get('dtype')}, not a floating-point LoRA weight")
    if check_keys is not None:
        check_keys(names)
    try:
        from safetensors.numpy import load
    except ImportError:
        raise LoraError("reading LoRA adapters needs the safetensors package (no torch): `pip install safetensors`") from None
    data = path.read_bytes()
    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises its own SafetensorError (and others for bf16 in numpy)
        detail = " ".join(str(e).split())[:200]
        hint = " (bfloat16 tensors: save the adapter in float16 or float32)" if "bf16" in detail.lower() else " (truncated or damaged?)"
        raise LoraError(f"{what} cannot be read as safetensors: {detail}{hint}") from None
    meta = header.get("__metadata__") or {}
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
    kohya = kohya_names(layers)

    def placed(key: str) -> tuple[str, str, str]:
        try:
            component, module, role, name = _place(key, kohya, layers)
        except LoraError as e:
            raise LoraError(f"LoRA file {path}: {e}") from None
        if module is None or module not in layers.get(component, {}):
            raise LoraError(
                f"LoRA file {path}: key {key} names {component} layer {module or name!r}, which {where} does not have "
                f"(an adapter for another base model, or a layer without a slot){fix}"
            )
        return component, module, role

    def check_keys(names: Sequence[str]) -> None:
        if not names:
            raise LoraError(f"LoRA file {path} holds no tensors")
        for key in names:
            placed(key)

    tensors, meta, digest = read_tensors(path, check_keys)  # every key placed from the header, before the tensors are read
    meta_alpha = _metadata_alphas(meta, path)
    grouped: dict[tuple[str, str], dict[str, tuple[str, np.ndarray]]] = {}
    for key in sorted(tensors):
        component, module, role = placed(key)
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
    # |alpha / rank * up @ down| <= |alpha| * max|up| * max|down|: a weight update past MAX_UPDATE is no trained adapter
    reach = abs(alpha) * float(np.abs(up).max(initial=0.0)) * float(np.abs(down).max(initial=0.0))
    if abs(alpha) / rank > MAX_ALPHA_PER_RANK or reach > MAX_UPDATE:
        raise LoraError(
            f"LoRA file {path}: {component} layer {module} has alpha {alpha:g} (rank {rank}), so its weight update can reach "
            f"{reach:.3g}; trained adapters stay far below {MAX_UPDATE:g} (alpha / rank <= {MAX_ALPHA_PER_RANK:g}): "
            "the file is damaged or its alpha is wrong"
        )
    return Update(component, module, np.ascontiguousarray(down), np.ascontiguousarray(up), alpha, down_key)


def file_rank(path: Path) -> int:
    """The largest rank of an adapter file's down matrices, read without placing its keys (for a rebuild hint)."""
    tensors, _, _ = read_tensors(path)
    downs = tuple("." + suffix for suffix, role in _ROLE.items() if role == "down")
    return max((int(v.shape[0]) for k, v in tensors.items() if k.endswith(downs) and v.ndim >= 2), default=0)
