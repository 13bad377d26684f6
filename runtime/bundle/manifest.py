"""The engine-bundle contract: manifest.json as the typed Manifest, the one place its JSON is read and written.

export/ builds a `Manifest` and writes it with `to_json`; runtime/ reads it with `Manifest.from_json`, which checks
the schema and version, builds the records (runtime.bundle.records, component) and checks every value that sizes an
allocation or names a file against the bounds here. Nothing else parses the JSON.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..bounds import MAX_TRAIN_TIMESTEPS, check_scheduler_config
from ..errors import BundleError
from .component import Component
from .levers import Levers
from .records import (
    DTYPES,
    FORMATS,
    MANIFEST,
    READABLE_VERSIONS,
    SCHEMA,
    SCHEMA_VERSION,
    GuidanceInfo,
    LoraInfo,
    ModelInfo,
    SchedulerInfo,
    SdxlInfo,
    TensorRTInfo,
    TokenizerInfo,
    UpscaleInfo,
    VaeInfo,
)

# Bounds every manifest value is checked against before anything is allocated or opened.
MAX_IMAGE_SIDE = 16384  # pixels
MAX_BATCH = 64
MAX_LATENT_CHANNELS = 64
MAX_DOWNSCALE = 64
MAX_DIM = 1 << 20  # any one tensor dimension
MAX_ELEMENTS = 1 << 34  # any one tensor's element count
MAX_CONTEXT = 4096  # tokenizer max_length, as runtime.tokenizer
MAX_CHUNKS = 16  # prompt chunks a bundle takes (1200 CLIP tokens)
MAX_LORA_RANK = 1024
SHA256 = re.compile(r"[0-9a-f]{64}")


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
    levers: Levers = field(default_factory=Levers)  # tiny VAE, preview map, DeepCache (bundle.levers)
    # the export.build arguments that built the bundle, as export recorded them (without --out and --force): the
    # rebuild hints repeat them; () in bundles written before the record
    command: tuple[str, ...] = ()

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
            "vae": self.vae.to_json(),
            "image": {"height": self.height, "width": self.width, "batch_size": self.batch_size},
            "guidance": self.guidance_info.to_json(),
            "tokenizer": self.tokenizer.to_json(),
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
        if levers := self.levers.to_json():
            out["levers"] = levers
        if self.command:
            out["command"] = list(self.command)
        out["files"] = dict(self.files)
        return out

    @classmethod
    def _records(cls, raw: Mapping[str, Any]) -> Manifest:
        image, upscale, trt, lora, sdxl = raw["image"], raw.get("upscale"), raw.get("tensorrt"), raw.get("lora"), raw.get("sdxl")
        command = raw.get("command", [])
        if not isinstance(command, list):
            raise TypeError(f"command must be a list of the export.build arguments, not {type(command).__name__}")
        return cls(
            model=ModelInfo.from_json(raw.get("model", {}), raw.get("schema_version", SCHEMA_VERSION)),
            pipelines=tuple(str(p) for p in raw.get("pipelines", ["txt2img"])),
            scheduler=SchedulerInfo.from_json(raw["scheduler"]),
            vae=VaeInfo.from_json(raw["vae"]),
            height=int(image["height"]),
            width=int(image["width"]),
            batch_size=int(image["batch_size"]),
            guidance_info=GuidanceInfo.from_json(raw["guidance"]),
            tokenizer=TokenizerInfo.from_json(raw["tokenizer"]),
            backend=str(raw["backend"]),
            precision=str(raw.get("precision", "fp32")),
            components={name: Component.from_json(name, d) for name, d in raw["components"].items()},
            files={str(k): str(v) for k, v in raw["files"].items()},
            onnx_precision=str(raw["onnx_precision"]) if raw.get("onnx_precision") else None,
            created=str(raw.get("created", "")),
            upscale=UpscaleInfo.from_json(upscale) if upscale else None,
            tensorrt=TensorRTInfo.from_json(trt) if trt else None,
            lora=LoraInfo.from_json(lora) if lora else None,
            sdxl=SdxlInfo.from_json(sdxl) if sdxl is not None else None,
            levers=Levers.from_json(raw.get("levers")),
            command=tuple(str(word) for word in command),
        )

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
            manifest = cls._records(raw)
            check_values(manifest)
            return manifest
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError, RecursionError) as e:
            raise BundleError(
                f"{where}: malformed manifest ({type(e).__name__}: {e}); rebuild the bundle with `python -m export.build --force`"
            ) from None


def check_values(m: Manifest) -> None:
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
    bounded("tokenizer.max_chunks", m.tokenizer.max_chunks, 1, MAX_CHUNKS)
    check_scheduler_config(m.scheduler.config, "scheduler.config")
    if m.upscale is not None:
        check_scheduler_config(m.upscale.low_res_scheduler.config, "upscale.low_res_scheduler.config")
        bounded("upscale.max_noise_level", m.upscale.max_noise_level, 0, MAX_TRAIN_TIMESTEPS)
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
