"""The engine-bundle contract: manifest.json as typed records, the one place its JSON is read and written.

export/ builds a `Manifest` and writes it with `to_json`; runtime/ reads it with `Manifest.from_json`.
Nothing else parses the JSON. Version 1 manifests (written before families had a seam) are read
and upgraded in `from_json`; unknown future versions are refused with the command that rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from types import MappingProxyType
from typing import Any

from .errors import BundleError

SCHEMA = "ldm-deploy/bundle"
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"

GUIDANCE_MODES = ("cfg", "none", "embedded")
FORMATS = ("onnx", "plan")
DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int32", "int64", "bool")

# Bounds every manifest value is checked against before anything is allocated or opened.
MAX_IMAGE_SIDE = 16384  # pixels
MAX_BATCH = 64
MAX_LATENT_CHANNELS = 64
MAX_DOWNSCALE = 64
MAX_DIM = 1 << 20  # any one tensor dimension
MAX_ELEMENTS = 1 << 34  # any one tensor's element count
MAX_CONTEXT = 4096  # tokenizer max_length, as runtime.tokenizer
# Size limits per file role, checked by stat before a byte is hashed: a file over its role's limit cannot be a
# file of that role, so hashing it would only spend time. An ONNX graph cannot exceed protobuf's 2 GiB (bigger
# models keep their weights in external data); tokenizer files are a few MB (CLIP's vocab is 1 MB); weights
# (external data, TensorRT plans) stop at 64 GiB, several times the largest UNet in fp32.
MAX_TOKENIZER_FILE = 64 << 20
MAX_ONNX_GRAPH = 2 << 30
MAX_WEIGHTS_FILE = 64 << 30
SHA256 = re.compile(r"[0-9a-f]{64}")


def _frozen(d: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name: float32, float16, int32, int64

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(str(d["name"]), tuple(int(s) for s in d["shape"]), str(d["dtype"]))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class Component:
    """One engine file: what it is, its I/O, how it was built and how it verified.

    build: the builder's own record (exporter or TensorRT versions, flags, seconds), kept as written;
    verification: its error figures against the reference it was checked on.
    """

    name: str
    file: str
    format: str  # onnx | plan
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    build: Mapping[str, Any] = field(default_factory=dict)
    verification: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, name: str, d: Mapping[str, Any]) -> Component:
        return cls(
            name=name,
            file=str(d["file"]),
            format=str(d["format"]),
            precision=str(d["precision"]),
            inputs=tuple(TensorSpec.from_json(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in d["outputs"]),
            build=dict(d.get("build", {})),
            verification=dict(d.get("verification", {})),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "format": self.format,
            "precision": self.precision,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "build": dict(self.build),
            "verification": dict(self.verification),
        }

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    @property
    def source_onnx(self) -> Component | None:
        """For a TensorRT plan, the ONNX component it was built from (the bundle carries it); None for ONNX."""
        recorded = self.build.get("onnx")
        return Component.from_json(self.name, recorded) if isinstance(recorded, Mapping) else None

    @property
    def rebuild_args(self) -> tuple[str, ...]:
        """The export.build flags this engine was built with, for the command that rebuilds it."""
        return tuple(str(a) for a in self.build.get("from_onnx_args", ()))


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: str = "text2image"  # text2image | inpainting | upscaler: what the UNet's inputs allow
    family: str = "sd"  # the runtime.families module that turns prompts into conditioning
    architecture: str = "custom"  # sd1 | sd2 | custom: what the checkpoint's shapes say it is
    prediction_type: str = "epsilon"
    source: str = ""
    source_hashes: Mapping[str, str] = field(default_factory=dict)
    # model_index.json components the bundle does not carry (e.g. safety_checker, feature_extractor); optional in the JSON
    omitted: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "kind": self.kind, "family": self.family, "architecture": self.architecture,
            "prediction_type": self.prediction_type, "source": self.source, "source_hashes": dict(self.source_hashes),
        }  # fmt: skip
        if self.omitted:
            out["omitted"] = list(self.omitted)
        return out


@dataclass(frozen=True)
class SchedulerInfo:
    """The model's own scheduler: its diffusers class and scheduler_config.json, copied verbatim."""

    class_name: str | None
    config: Mapping[str, Any]

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SchedulerInfo:
        return cls(d.get("class_name"), _frozen(d.get("config")))

    def to_json(self) -> dict[str, Any]:
        return {"class_name": self.class_name, "config": dict(self.config)}


@dataclass(frozen=True)
class VaeInfo:
    scaling_factor: float
    latent_channels: int
    downscale_factor: int


@dataclass(frozen=True)
class GuidanceInfo:
    """cfg: one batch-2B UNet call; none: batch B (Turbo); embedded: batch B with an LCM guidance embedding."""

    mode: str
    unet_batch: int
    embedding_dim: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "unet_batch": self.unet_batch}
        if self.embedding_dim is not None:
            out["embedding_dim"] = self.embedding_dim
        return out


@dataclass(frozen=True)
class TokenizerInfo:
    dir: str
    max_length: int


@dataclass(frozen=True)
class TextEncoderInfo:
    """One of SDXL's text encoders: its component, the bundle folder of its tokenizer, its context, its pad token."""

    component: str  # text_encoder | text_encoder_2
    tokenizer: str
    max_length: int
    pad_token: str  # recorded for the reader: tokenizer_2 pads with "!", the first tokenizer with <|endoftext|>


@dataclass(frozen=True)
class SdxlInfo:
    """SDXL's text side (family "sdxl"): the encoders whose penultimate hidden states are concatenated into the
    UNet's context, the pooled projection (`text_embeds`) and the micro-conditioning (`time_ids`) it takes.

    time_ids: 6 numbers (original_size, crops_coords_top_left, target_size), or 5 where the model was trained
    on an aesthetic score instead of target_size (requires_aesthetics_score, the refiner).
    force_zeros_for_empty_prompt: an empty negative prompt is all-zero conditioning, not the empty string's.
    """

    encoders: tuple[TextEncoderInfo, ...]
    pooled_dim: int
    time_ids: int
    addition_time_embed_dim: int
    requires_aesthetics_score: bool
    force_zeros_for_empty_prompt: bool

    def to_json(self) -> dict[str, Any]:
        return {**_fields(self), "encoders": [_fields(e) for e in self.encoders]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SdxlInfo:
        encoders = tuple(
            TextEncoderInfo(str(e["component"]), str(e["tokenizer"]), int(e["max_length"]), str(e["pad_token"])) for e in d["encoders"]
        )
        if not encoders:
            raise ValueError("sdxl.encoders is empty: an SDXL bundle has at least text_encoder_2")
        for flag in ("requires_aesthetics_score", "force_zeros_for_empty_prompt"):
            if not isinstance(d[flag], bool):
                raise TypeError(f"sdxl.{flag} must be true or false, not {d[flag]!r}")
        return cls(
            encoders, int(d["pooled_dim"]), int(d["time_ids"]), int(d["addition_time_embed_dim"]),
            d["requires_aesthetics_score"], d["force_zeros_for_empty_prompt"],
        )  # fmt: skip


@dataclass(frozen=True)
class UpscaleInfo:
    """The x4 upscaler's extra settings: the noise-level limit and the DDPM schedule that noises its input."""

    max_noise_level: int
    low_res_scheduler: SchedulerInfo

    def to_json(self) -> dict[str, Any]:
        return {"max_noise_level": self.max_noise_level, "low_res_scheduler": self.low_res_scheduler.to_json()}


@dataclass(frozen=True)
class TensorRTInfo:
    """Where a TensorRT bundle's engines were built, and with which builder settings."""

    tensorrt: str
    gpu: str
    compute_capability: str
    builder: Mapping[str, Any] = field(default_factory=dict)
    from_onnx_args: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "tensorrt": self.tensorrt, "gpu": self.gpu, "compute_capability": self.compute_capability,
            "builder": dict(self.builder), "from_onnx_args": list(self.from_onnx_args),
        }  # fmt: skip


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter fused into the weights at export: the file as given, its sha256, and the scale it was fused at."""

    file: str
    sha256: str
    scale: float

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "scale": self.scale}


@dataclass(frozen=True)
class LoraTarget:
    """One layer with a LoRA slot: `component`'s `module` computes W x + B (A x), A^T and B^T being row `index` of the
    stacked inputs `a` (L, in_features, rank) and `b` (L, rank, out_features); kind: linear | conv1x1."""

    component: str
    module: str
    kind: str
    in_features: int
    out_features: int
    a: str
    b: str
    index: int

    def to_json(self) -> dict[str, Any]:
        return _fields(self)


@dataclass(frozen=True)
class LoraInfo:
    """LoRA in a bundle: adapters fused into the weights at export, and/or low-rank slots fed as engine inputs.

    slot_rank 0: no slots (set_lora is refused); else every target takes adapters whose ranks sum to <= slot_rank.
    """

    fused: tuple[LoraAdapter, ...] = ()
    slot_rank: int = 0
    targets: tuple[LoraTarget, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"fused": [a.to_json() for a in self.fused]}
        if self.slot_rank:
            out["slots"] = {"rank": self.slot_rank, "targets": [t.to_json() for t in self.targets]}
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LoraInfo:
        slots = d.get("slots") or {}
        return cls(
            fused=tuple(LoraAdapter(str(a["file"]), str(a["sha256"]), float(a["scale"])) for a in d.get("fused", ())),
            slot_rank=int(slots.get("rank", 0)),
            targets=tuple(
                LoraTarget(
                    str(t["component"]), str(t["module"]), str(t["kind"]), int(t["in_features"]), int(t["out_features"]),
                    str(t["a"]), str(t["b"]), int(t["index"]),
                )  # fmt: skip
                for t in slots.get("targets", ())
            ),
        )


@dataclass(frozen=True)
class Manifest:
    """A bundle's manifest.json, typed. `files` maps every other file of the bundle to its sha256."""

    model: ModelInfo
    pipelines: tuple[str, ...]
    scheduler: SchedulerInfo
    vae: VaeInfo
    height: int  # the static image size and batch every engine was built for ("image" in the JSON)
    width: int
    batch_size: int
    guidance_info: GuidanceInfo
    tokenizer: TokenizerInfo
    backend: str
    precision: str
    components: Mapping[str, Component]
    files: Mapping[str, str] = field(default_factory=dict)
    onnx_precision: str | None = None  # the ONNX export's precision, where the engines were built from it
    created: str = ""
    upscale: UpscaleInfo | None = None
    tensorrt: TensorRTInfo | None = None
    lora: LoraInfo | None = None  # adapters fused at export and/or LoRA slots; None: the base model, no slots
    sdxl: SdxlInfo | None = None  # family "sdxl" only

    @property
    def guidance(self) -> str:
        return self.guidance_info.mode

    @property
    def tokenizer_dirs(self) -> tuple[str, ...]:
        """Every folder of tokenizer files the bundle carries (SDXL: one per text encoder)."""
        extra = tuple(e.tokenizer for e in self.sdxl.encoders) if self.sdxl else ()
        return tuple(dict.fromkeys((self.tokenizer.dir, *extra)))

    @property
    def source_precision(self) -> str:
        """The precision the bundle's ONNX files were exported at (fp16 keeps some components fp32)."""
        return self.onnx_precision or self.precision

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        f = self.vae.downscale_factor
        return (self.batch_size, self.vae.latent_channels, self.height // f, self.width // f)

    def with_files(self, files: Mapping[str, str]) -> Manifest:
        return replace(self, files=dict(files))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "created": self.created,
            "model": self.model.to_json(),
            "pipelines": list(self.pipelines),
            "scheduler": self.scheduler.to_json(),
            "vae": _fields(self.vae),
            "image": {"height": self.height, "width": self.width, "batch_size": self.batch_size},
            "guidance": self.guidance_info.to_json(),
            "tokenizer": _fields(self.tokenizer),
            "backend": self.backend,
            "precision": self.precision,
        }
        if self.onnx_precision is not None:
            out["onnx_precision"] = self.onnx_precision
        if self.tensorrt is not None:
            out["tensorrt"] = self.tensorrt.to_json()
        out["components"] = {name: c.to_json() for name, c in self.components.items()}
        if self.upscale is not None:
            out["upscale"] = self.upscale.to_json()
        if self.lora is not None:
            out["lora"] = self.lora.to_json()
        if self.sdxl is not None:
            out["sdxl"] = self.sdxl.to_json()
        out["files"] = dict(self.files)
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], where: str = MANIFEST) -> Manifest:
        """Check the schema and build the records; what is wrong or missing is named, with what to do."""
        if not isinstance(raw, Mapping) or raw.get("schema") != SCHEMA:
            got = raw.get("schema") if isinstance(raw, Mapping) else type(raw).__name__
            raise BundleError(f"{where}: not an engine-bundle manifest (schema {got!r}, expected {SCHEMA!r})")
        version = raw.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise BundleError(
                f"{where}: manifest schema_version {version} but this runtime reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}; rebuild the bundle with this SDK's `python -m export.build` "
                "or use the SDK version that built it"
            )
        for key in ("image", "vae", "scheduler", "guidance", "tokenizer", "components", "files", "backend"):
            if key not in raw:
                raise BundleError(f"{where}: manifest has no {key!r} section; the bundle is incomplete, rebuild it")
        try:
            manifest = _parse(raw)
            _check_values(manifest)
            return manifest
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError, RecursionError) as e:
            raise BundleError(
                f"{where}: malformed manifest ({type(e).__name__}: {e}); rebuild the bundle with `python -m export.build --force`"
            ) from None


def _fields(record: Any) -> dict[str, Any]:
    return dict(record.__dict__)


def _parse(raw: Mapping[str, Any]) -> Manifest:
    model = dict(raw.get("model", {}))
    if raw.get("schema_version") == 1:  # v1 named the checkpoint's architecture "family"; all v1 bundles are SD-conditioned
        model["architecture"] = model.pop("family", "custom")
        model["family"] = "sd"
    omitted = model.get("omitted", [])
    if not isinstance(omitted, list):
        raise TypeError(f"model.omitted must be a list of component names, not {type(omitted).__name__}")
    upscale = raw.get("upscale")
    trt = raw.get("tensorrt")
    sdxl = raw.get("sdxl")
    guidance = raw["guidance"]
    return Manifest(
        model=ModelInfo(
            name=str(model.get("name", "model")),
            kind=str(model.get("kind", "text2image")),
            family=str(model.get("family", "sd")),
            architecture=str(model.get("architecture", "custom")),
            prediction_type=str(model.get("prediction_type", "epsilon")),
            source=str(model.get("source", "")),
            source_hashes=_frozen(model.get("source_hashes")),
            omitted=tuple(str(c) for c in omitted),
        ),
        pipelines=tuple(str(p) for p in raw.get("pipelines", ["txt2img"])),
        scheduler=SchedulerInfo.from_json(raw["scheduler"]),
        vae=VaeInfo(float(raw["vae"]["scaling_factor"]), int(raw["vae"]["latent_channels"]), int(raw["vae"]["downscale_factor"])),
        height=int(raw["image"]["height"]),
        width=int(raw["image"]["width"]),
        batch_size=int(raw["image"]["batch_size"]),
        guidance_info=GuidanceInfo(
            str(guidance["mode"]),
            int(guidance.get("unet_batch", 0)),
            int(guidance["embedding_dim"]) if guidance.get("embedding_dim") is not None else None,
        ),
        tokenizer=TokenizerInfo(str(raw["tokenizer"]["dir"]), int(raw["tokenizer"]["max_length"])),
        backend=str(raw["backend"]),
        precision=str(raw.get("precision", "fp32")),
        components={name: Component.from_json(name, d) for name, d in raw["components"].items()},
        files={str(k): str(v) for k, v in raw["files"].items()},
        onnx_precision=str(raw["onnx_precision"]) if raw.get("onnx_precision") else None,
        created=str(raw.get("created", "")),
        upscale=UpscaleInfo(int(upscale["max_noise_level"]), SchedulerInfo.from_json(upscale["low_res_scheduler"])) if upscale else None,
        tensorrt=TensorRTInfo(
            str(trt["tensorrt"]), str(trt["gpu"]), str(trt["compute_capability"]), _frozen(trt.get("builder")),
            tuple(str(a) for a in trt.get("from_onnx_args", ())),
        ) if trt else None,
        lora=LoraInfo.from_json(raw["lora"]) if raw.get("lora") else None,
        sdxl=SdxlInfo.from_json(sdxl) if sdxl is not None else None,
    )  # fmt: skip


def rebuild_command(bundle: Any, component: Component | None = None, *, in_place: bool = False) -> str:
    """The exact `export.build --from-onnx` line that rebuilds the bundle's engines with the flags it was built with."""
    args: Sequence[str] = component.rebuild_args if component else ()
    words = ["python", "-m", "export.build", "--from-onnx", str(bundle)]
    if in_place:
        words += ["--out", str(bundle), "--force"]
    return shlex.join([*words, *args])


def sha256_file(path: Path) -> str:
    return _hash_one(path)[0]


def _check_values(m: Manifest) -> None:
    """Sane bounds for every value that sizes an allocation or names a file; ValueError names the first one out."""

    def bounded(what: str, value: int, low: int, high: int) -> None:
        if not low <= value <= high:
            raise ValueError(f"{what} {value} is out of range {low}..{high}")

    bounded("image.height", m.height, 1, MAX_IMAGE_SIDE)
    bounded("image.width", m.width, 1, MAX_IMAGE_SIDE)
    bounded("image.batch_size", m.batch_size, 1, MAX_BATCH)
    bounded("vae.latent_channels", m.vae.latent_channels, 1, MAX_LATENT_CHANNELS)
    bounded("vae.downscale_factor", m.vae.downscale_factor, 1, MAX_DOWNSCALE)
    if not (m.vae.scaling_factor > 0 and m.vae.scaling_factor < float("inf")):
        raise ValueError(f"vae.scaling_factor {m.vae.scaling_factor} must be a finite positive number")
    bounded("guidance.unet_batch", m.guidance_info.unet_batch, 0, 2 * MAX_BATCH)
    if m.guidance_info.embedding_dim is not None:
        bounded("guidance.embedding_dim", m.guidance_info.embedding_dim, 1, MAX_DIM)
    bounded("tokenizer.max_length", m.tokenizer.max_length, 2, MAX_CONTEXT)
    if m.sdxl is not None:
        for e in m.sdxl.encoders:
            bounded(f"sdxl encoder {e.component} max_length", e.max_length, 2, MAX_CONTEXT)
        bounded("sdxl.pooled_dim", m.sdxl.pooled_dim, 1, MAX_DIM)
        bounded("sdxl.time_ids", m.sdxl.time_ids, 1, 64)
        bounded("sdxl.addition_time_embed_dim", m.sdxl.addition_time_embed_dim, 1, MAX_DIM)
    for name, c in m.components.items():
        for comp in (c, c.source_onnx) if c.source_onnx is not None else (c,):
            if comp.format not in FORMATS:
                raise ValueError(f"components.{name}.format {comp.format!r} is not one of {', '.join(FORMATS)}")
            for t in (*comp.inputs, *comp.outputs):
                if t.dtype not in DTYPES:
                    raise ValueError(f"components.{name}: tensor {t.name!r} has dtype {t.dtype!r}, not one of {', '.join(DTYPES)}")
                if any(not 1 <= d <= MAX_DIM for d in t.shape):
                    raise ValueError(f"components.{name}: tensor {t.name!r} shape {t.shape}: every dimension must be 1..{MAX_DIM}")
                elements = 1
                for d in t.shape:
                    elements *= d
                bounded(f"components.{name}: tensor {t.name!r} element count", elements, 1, MAX_ELEMENTS)
    if m.lora is not None:
        _check_lora(m, m.lora)
    for rel, digest in m.files.items():
        if not SHA256.fullmatch(digest):
            raise ValueError(f"files[{rel!r}] is not a sha256 hex digest")


MAX_LORA_RANK = 1024


def _check_lora(m: Manifest, lora: LoraInfo) -> None:
    """Every slot target names stacked inputs of its component that fit its rank, features and index."""
    if not 0 <= lora.slot_rank <= MAX_LORA_RANK:
        raise ValueError(f"lora.slots.rank {lora.slot_rank} is out of range 0..{MAX_LORA_RANK}")
    for a in lora.fused:
        if not SHA256.fullmatch(a.sha256) or not abs(a.scale) < float("inf"):
            raise ValueError(f"lora.fused entry {a.file!r} needs a sha256 hex digest and a finite scale")
    for t in lora.targets:
        comp = m.components.get(t.component)
        if comp is None:
            continue  # a bundle without that component (txt2img-only bundles still have both LoRA components)
        names = {s.name: s.shape for s in comp.inputs}
        want = {t.a: (t.index, t.in_features, lora.slot_rank), t.b: (t.index, lora.slot_rank, t.out_features)}
        for name, (index, *dims) in want.items():
            shape = names.get(name)
            if shape is None or len(shape) != 3 or list(shape[1:]) != dims or not 0 <= index < shape[0]:
                raise ValueError(f"lora slot {t.component}:{t.module} names input {name!r}, which {t.component} lacks or has another shape")


def rebuild_hint(bundle: str | Path, manifest: Manifest, **changes: object) -> str:
    """The `python -m export.build` line that rebuilds BUNDLE in place as its manifest records it: the model it came
    from, its precision, size, batch, guidance and pipelines; `changes` override flags (precision="fp32",
    pipelines="txt2img,img2img"; None drops a flag; lora=[FILE:SCALE, ...] replaces the fused adapters).
    Every runtime hint that says "rebuild" is built here, shell-quoted."""
    flags: dict[str, str] = {
        "--model": manifest.model.source or "MODEL_FOLDER",
        "--precision": manifest.source_precision,
        "--height": str(manifest.height),
        "--width": str(manifest.width),
        "--batch-size": str(manifest.batch_size),
        "--guidance": manifest.guidance,
        "--pipelines": ",".join(manifest.pipelines),
    }
    if manifest.backend == "tensorrt":
        flags["--backend"] = "tensorrt"
    lora = manifest.lora or LoraInfo()
    if lora.slot_rank:
        flags["--lora-slots"] = str(lora.slot_rank)
    fused = [f"{a.file}:{a.scale!r}" for a in lora.fused]
    for key, value in changes.items():
        if key == "lora":  # FILE:SCALE specs in place of the fused adapters (an empty list: none)
            fused = [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        elif value is None:  # None drops a flag (lora_slots=None: no slots)
            flags.pop("--" + key.replace("_", "-"), None)
        else:
            flags["--" + key.replace("_", "-")] = str(value)
    words = ["python", "-m", "export.build"]
    for flag, value in flags.items():
        words += [flag, value]
    for spec in fused:
        words += ["--lora", spec]
    for name in sorted((n for n in manifest.components if n.startswith("controlnet_")), key=lambda n: int(n.rsplit("_", 1)[1])):
        onnx = manifest.components[name].source_onnx or manifest.components[name]  # a plan keeps its ONNX's record
        words += ["--controlnet", str(onnx.build.get("controlnet", {}).get("source", "CONTROLNET_FOLDER"))]
    return shlex.join([*words, "--out", str(bundle), "--force"])


Identity = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns: which file a path held, and which version


def _identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class BundleState:
    """What one load read: the manifest's bytes and the identity of every file it hashed.

    A `--force` rebuild writes a new folder and renames it into place, so every file of the new build is a
    new inode: if, after the engines are open, the manifest reads the same and every path still holds the
    file that was hashed, the engines came from the build the manifest describes (`current`).
    """

    bundle: Path
    manifest_bytes: bytes
    files: Mapping[str, Identity] = field(default_factory=dict)

    def current(self) -> bool:
        try:
            if (self.bundle / MANIFEST).read_bytes() != self.manifest_bytes:
                return False
            return all(_identity(os.stat(self.bundle / rel)) == ident for rel, ident in self.files.items())
        except OSError:
            return False


def declared_schema(path: Path) -> object:
    """The `schema` a manifest file declares, without checking the rest; None where it is not a readable JSON object."""
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return raw.get("schema") if isinstance(raw, dict) else None


def load_manifest(bundle: str | Path, *, verify_files: bool = True) -> Manifest:
    """Read BUNDLE/manifest.json and check that every file it lists is present and unaltered."""
    return read_bundle(bundle, verify_files=verify_files)[0]


def read_bundle(bundle: str | Path, *, verify_files: bool = True) -> tuple[Manifest, BundleState]:
    """load_manifest, plus what it read (BundleState), so a loader can check that nothing changed while it opened engines.

    Every path the manifest names is checked to stay inside the bundle before any file is opened.
    """
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BundleError(f"no engine bundle at {bundle}: the folder does not exist; build one with `python -m export.build`")
    if not path.is_file():
        raise BundleError(
            f"{bundle} has no {MANIFEST}: it is not a finished engine bundle (an interrupted build?); "
            "rebuild it with `python -m export.build --force`"
        )
    data = path.read_bytes()
    try:
        raw = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({e}); rebuild the bundle") from None
    except RecursionError:
        raise BundleError(
            f"{path}: malformed manifest (nested too deeply to read); rebuild the bundle with `python -m export.build --force`"
        ) from None
    manifest = Manifest.from_json(raw, str(path))
    check_bundle_paths(bundle, manifest)
    files: Mapping[str, Identity] = {}
    if verify_files:
        files = verify_bundle_files(bundle, manifest)
    return manifest, BundleState(bundle, data, files)


def _entries(manifest: Manifest) -> list[tuple[str, str]]:
    """Every path the manifest names, with what names it."""
    out = [(f"component {name}'s file", c.file) for name, c in manifest.components.items()]
    out += [(f"component {name}'s ONNX source", c.source_onnx.file) for name, c in manifest.components.items() if c.source_onnx]
    out += [("the tokenizer dir", tok) for tok in manifest.tokenizer_dirs]
    out += [("files entry", rel) for rel in manifest.files]
    return out


def check_bundle_paths(bundle: Path, manifest: Manifest) -> None:
    """The bundle is a boundary: every path the manifest names must resolve inside the bundle folder.

    Refused, naming the entry: absolute paths, '..', a NUL, and symlinks that lead out of the folder.
    """
    root = bundle.resolve()
    for what, rel in _entries(manifest):
        pure = PurePosixPath(rel)
        if not rel or "\x00" in rel or pure.is_absolute() or PureWindowsPath(rel).anchor or ".." in pure.parts:
            raise BundleError(
                f"bundle {bundle}: {what} {rel!r} is not a relative path inside the bundle; "
                "a manifest may name only its own bundle's files: this manifest was altered, rebuild the bundle"
            )
        try:
            resolved = (bundle / rel).resolve()
        except (OSError, RuntimeError) as e:
            raise BundleError(f"bundle {bundle}: {what} {rel!r} cannot be resolved ({e}); rebuild the bundle") from None
        if not resolved.is_relative_to(root):
            raise BundleError(
                f"bundle {bundle}: {what} {rel!r} is a symlink leading outside the bundle; "
                "a bundle may only read its own files: replace the link with the file, or rebuild the bundle"
            )


def _uncovered(bundle: Path, manifest: Manifest) -> tuple[str, str] | None:
    """The first file a component or the tokenizer would read that `files` does not hash, with who reads it."""
    listed = {PurePosixPath(rel).as_posix() for rel in manifest.files}
    needed: list[tuple[str, str]] = []
    folders: list[tuple[str, str]] = []
    for name, c in manifest.components.items():
        for comp in (c, c.source_onnx) if c.source_onnx is not None else (c,):
            needed.append((f"component {name}", comp.file))
            if comp.format == "onnx":  # ONNX external data, as export writes it
                data = f"{comp.file}.data"
                if (bundle / data).exists() or data in listed:
                    needed.append((f"component {name}'s external data", data))
            parent = PurePosixPath(comp.file).parent.as_posix()
            if parent != ".":
                folders.append((f"component {name}'s folder", parent))
    for tok in (PurePosixPath(d).as_posix() for d in manifest.tokenizer_dirs):
        needed += [("the tokenizer", f"{tok}/{name}" if tok != "." else name) for name in ("vocab.json", "merges.txt")]
        folders.append(("the tokenizer folder", tok))
    for who, rel in needed:
        if PurePosixPath(rel).as_posix() not in listed:
            return who, rel
    for who, folder in folders:
        base = bundle / folder
        if not base.is_dir():
            continue
        for f in sorted(base.rglob("*")):
            rel = f.relative_to(bundle).as_posix()
            if (f.is_file() or f.is_symlink()) and rel != MANIFEST and rel not in listed:
                return who, rel
    return None


def _size_limit(manifest: Manifest, rel: str) -> tuple[int, str]:
    for tok in (PurePosixPath(d).as_posix() for d in manifest.tokenizer_dirs):
        if tok == "." or PurePosixPath(rel).is_relative_to(tok):
            return MAX_TOKENIZER_FILE, "a tokenizer file"
    if any(c.format == "onnx" and c.file == rel for c in manifest.components.values()):
        return MAX_ONNX_GRAPH, "an ONNX graph (protobuf's limit; larger models keep weights in external data)"
    return MAX_WEIGHTS_FILE, "a bundle file"


def verify_bundle_files(bundle: Path, manifest: Manifest) -> dict[str, Identity]:
    """Every listed file must exist with the recorded sha256: a bundle is content-addressed.

    First, without reading a byte: every file a component or the tokenizer reads must be listed (else it is
    not covered by the hashes), each listed file must be a regular file within its role's size limit.
    Then each file is hashed through one handle; what that handle was (inode, size, mtime) is returned.
    The paths were checked to stay inside the bundle by read_bundle (check_bundle_paths) first.
    """
    gap = _uncovered(bundle, manifest)
    if gap is not None:
        who, rel = gap
        raise BundleError(
            f"bundle {bundle}: {rel} (read by {who}) is not covered by the manifest's hashes; a bundle's files "
            f"must all be listed in its manifest: remove the file or rebuild with `{_rebuild_hint(bundle, manifest, rel)}`"
        )
    for rel in manifest.files:
        f = bundle / rel
        if not f.is_file():
            raise BundleError(f"bundle {bundle} is missing {rel}; rebuild it with `{_rebuild_hint(bundle, manifest, rel)}`")
        limit, role = _size_limit(manifest, rel)
        size = f.stat().st_size
        if size > limit:
            raise BundleError(
                f"bundle {bundle}: {rel} is {size} bytes, more than {role} can be ({limit} bytes); "
                f"refused without hashing it: rebuild the bundle with `{_rebuild_hint(bundle, manifest, rel)}`"
            )
    seen: dict[str, Identity] = {}
    for rel, digest in manifest.files.items():
        f = bundle / rel
        try:
            actual, seen[rel] = _hash_one(f)
        except OSError as e:
            raise BundleError(
                f"bundle {bundle}: {rel} could not be read ({e.strerror or e}); rebuild it with "
                f"`{_rebuild_hint(bundle, manifest, rel)}`"
            ) from None
        if actual != digest:
            raise BundleError(
                f"bundle {bundle}: {rel} was altered or corrupted (sha256 {actual[:12]}..., manifest says {digest[:12]}...); "
                f"rebuild it with `{_rebuild_hint(bundle, manifest, rel)}`"
            )
    return seen


def _hash_one(path: Path, chunk: int = 1 << 22) -> tuple[str, Identity]:
    """sha256 of a regular file and the identity of the very file read (fstat of the same handle)."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "not a regular file")
        h = hashlib.sha256()
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest(), _identity(st)


def _rebuild_hint(bundle: Path, manifest: Manifest, rel: str) -> str:
    """A damaged TensorRT engine is rebuilt from the ONNX its bundle carries; anything else by a fresh export."""
    plan = next((c for c in manifest.components.values() if c.format == "plan" and c.file == rel), None)
    return rebuild_hint(bundle, manifest) if plan is None else rebuild_command(bundle, plan, in_place=True)
