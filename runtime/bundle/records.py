"""The manifest's sections as typed records, each with its from_json and to_json (the Manifest that holds them:
runtime.bundle.manifest). Version 1 manifests (written before families had a seam) are upgraded in ModelInfo.from_json.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

SCHEMA = "ldm-deploy/bundle"
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"

GUIDANCE_MODES = ("cfg", "none", "embedded")
FORMATS = ("onnx", "plan")
DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int32", "int64", "bool")


def _frozen(d: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(d or {}))


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

    @classmethod
    def from_json(cls, d: Mapping[str, Any], schema_version: int = 2) -> ModelInfo:
        model = dict(d)
        if schema_version == 1:  # v1 named the checkpoint's architecture "family"; all v1 bundles are SD-conditioned
            model["architecture"] = model.pop("family", "custom")
            model["family"] = "sd"
        omitted = model.get("omitted", [])
        if not isinstance(omitted, list):
            raise TypeError(f"model.omitted must be a list of component names, not {type(omitted).__name__}")
        return cls(
            name=str(model.get("name", "model")),
            kind=str(model.get("kind", "text2image")),
            family=str(model.get("family", "sd")),
            architecture=str(model.get("architecture", "custom")),
            prediction_type=str(model.get("prediction_type", "epsilon")),
            source=str(model.get("source", "")),
            source_hashes=_frozen(model.get("source_hashes")),
            omitted=tuple(str(c) for c in omitted),
        )


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

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> VaeInfo:
        return cls(float(d["scaling_factor"]), int(d["latent_channels"]), int(d["downscale_factor"]))

    def to_json(self) -> dict[str, Any]:
        return _fields(self)


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

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> GuidanceInfo:
        dim = d.get("embedding_dim")
        return cls(str(d["mode"]), int(d.get("unet_batch", 0)), int(dim) if dim is not None else None)


@dataclass(frozen=True)
class TokenizerInfo:
    """The (first) tokenizer's folder and context; how many chunks of max_length - 2 tokens a prompt may take
    (the UNet's context is up to max_chunks * max_length long: export.build --max-prompt-tokens); the
    textual-inversion embeddings added to the tokenizers and text encoders, as FILE:TOKEN specs."""

    dir: str
    max_length: int
    max_chunks: int = 1
    textual_inversion: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TokenizerInfo:
        embeddings = d.get("textual_inversion", [])
        if not isinstance(embeddings, list):
            raise TypeError(f"tokenizer.textual_inversion must be a list of FILE:TOKEN, not {type(embeddings).__name__}")
        return cls(str(d["dir"]), int(d["max_length"]), int(d.get("max_chunks", 1)), tuple(str(e) for e in embeddings))

    def to_json(self) -> dict[str, Any]:
        return {**_fields(self), "textual_inversion": list(self.textual_inversion)}


@dataclass(frozen=True)
class TextEncoderInfo:
    """One of SDXL's text encoders: its component, the bundle folder of its tokenizer, its context, its pad token."""

    component: str  # text_encoder | text_encoder_2
    tokenizer: str
    max_length: int
    pad_token: str  # recorded for the reader: tokenizer_2 pads with "!", the first tokenizer with <|endoftext|>

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TextEncoderInfo:
        return cls(str(d["component"]), str(d["tokenizer"]), int(d["max_length"]), str(d["pad_token"]))

    def to_json(self) -> dict[str, Any]:
        return _fields(self)


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
        return {**_fields(self), "encoders": [e.to_json() for e in self.encoders]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SdxlInfo:
        encoders = tuple(TextEncoderInfo.from_json(e) for e in d["encoders"])
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

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> UpscaleInfo:
        return cls(int(d["max_noise_level"]), SchedulerInfo.from_json(d["low_res_scheduler"]))


@dataclass(frozen=True)
class TensorRTInfo:
    """Where a TensorRT bundle's engines were built, and with which builder settings."""

    tensorrt: str  # the library's version
    gpu: str  # TensorRT for RTX built without a GPU: "none (ahead of time)"
    compute_capability: str
    builder: Mapping[str, Any] = field(default_factory=dict)
    from_onnx_args: tuple[str, ...] = ()
    library: str = "tensorrt"  # tensorrt | tensorrt-rtx: which TensorRT built the engines
    compute_capabilities: tuple[str, ...] = ()  # TensorRT for RTX: the GPUs' compute capabilities the engines target

    def to_json(self) -> dict[str, Any]:
        out = {
            "tensorrt": self.tensorrt, "gpu": self.gpu, "compute_capability": self.compute_capability,
            "builder": dict(self.builder), "from_onnx_args": list(self.from_onnx_args),
        }  # fmt: skip
        if self.library != "tensorrt":
            out |= {"library": self.library, "compute_capabilities": list(self.compute_capabilities)}
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TensorRTInfo:
        return cls(
            str(d["tensorrt"]), str(d["gpu"]), str(d["compute_capability"]), _frozen(d.get("builder")),
            tuple(str(a) for a in d.get("from_onnx_args", ())), str(d.get("library", "tensorrt")),
            tuple(str(c) for c in d.get("compute_capabilities", ())),
        )  # fmt: skip


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter fused into the weights at export: the file as given, its sha256, and the scale it was fused at."""

    file: str
    sha256: str
    scale: float

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "scale": self.scale}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LoraAdapter:
        return cls(str(d["file"]), str(d["sha256"]), float(d["scale"]))


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

    @classmethod
    def from_json(cls, t: Mapping[str, Any]) -> LoraTarget:
        return cls(
            str(t["component"]), str(t["module"]), str(t["kind"]), int(t["in_features"]), int(t["out_features"]),
            str(t["a"]), str(t["b"]), int(t["index"]),
        )  # fmt: skip


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
            fused=tuple(LoraAdapter.from_json(a) for a in d.get("fused", ())),
            slot_rank=int(slots.get("rank", 0)),
            targets=tuple(LoraTarget.from_json(t) for t in slots.get("targets", ())),
        )


def _fields(record: Any) -> dict[str, Any]:
    return dict(record.__dict__)
