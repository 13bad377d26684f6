"""The engine-bundle contract: manifest.json as typed records, the one place its JSON is read and written.

export/ builds a `Manifest` and writes it with `to_json`; runtime/ reads it with `Manifest.from_json`.
Nothing else parses the JSON. Version 1 manifests (written before families had a seam) are read
and upgraded in `from_json`; unknown future versions are refused with the command that rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import BundleError

SCHEMA = "ldm-deploy/bundle"
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"

KINDS = ("text2image", "inpainting", "upscaler")
GUIDANCE_MODES = ("cfg", "none", "embedded")
FORMATS = ("onnx", "plan")


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

    def has_input(self, name: str) -> bool:
        return any(t.name == name for t in self.inputs)

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

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "family": self.family, "architecture": self.architecture,
            "prediction_type": self.prediction_type, "source": self.source, "source_hashes": dict(self.source_hashes),
        }  # fmt: skip


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

    @property
    def guidance(self) -> str:
        return self.guidance_info.mode

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
            return _parse(raw)
        except (AttributeError, KeyError, TypeError, ValueError) as e:
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
    upscale = raw.get("upscale")
    trt = raw.get("tensorrt")
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
    )  # fmt: skip


def rebuild_command(bundle: Any, component: Component | None = None, *, in_place: bool = False) -> str:
    """The exact `export.build --from-onnx` line that rebuilds the bundle's engines with the flags it was built with."""
    args: Sequence[str] = component.rebuild_args if component else ()
    words = ["python", "-m", "export.build", "--from-onnx", str(bundle)]
    if in_place:
        words += ["--out", str(bundle), "--force"]
    return shlex.join([*words, *args])


def parse_manifest(raw: Mapping[str, Any], where: str = MANIFEST) -> Manifest:
    return Manifest.from_json(raw, where)


def write_manifest_json(path: Path, manifest: Manifest) -> None:
    path.write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=False) + "\n")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_manifest(bundle: str | Path, *, verify_files: bool = True) -> Manifest:
    """Read BUNDLE/manifest.json and check that every file it lists is present and unaltered."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BundleError(f"no engine bundle at {bundle}: the folder does not exist; build one with `python -m export.build`")
    if not path.is_file():
        raise BundleError(
            f"{bundle} has no {MANIFEST}: it is not a finished engine bundle (an interrupted build?); "
            "rebuild it with `python -m export.build --force`"
        )
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({e}); rebuild the bundle") from None
    manifest = Manifest.from_json(raw, str(path))
    if verify_files:
        verify_bundle_files(bundle, manifest)
    return manifest


def verify_bundle_files(bundle: Path, manifest: Manifest) -> None:
    """Every listed file must exist with the recorded sha256: a bundle is content-addressed."""
    for rel, digest in manifest.files.items():
        f = bundle / rel
        if not f.is_file():
            raise BundleError(f"bundle {bundle} is missing {rel}; rebuild it with `{_rebuild_hint(bundle, manifest, rel)}`")
        actual = sha256_file(f)
        if actual != digest:
            raise BundleError(
                f"bundle {bundle}: {rel} was altered or corrupted (sha256 {actual[:12]}..., manifest says {digest[:12]}...); "
                f"rebuild it with `{_rebuild_hint(bundle, manifest, rel)}`"
            )


def _rebuild_hint(bundle: Path, manifest: Manifest, rel: str) -> str:
    """A damaged TensorRT engine is rebuilt from the ONNX its bundle carries; anything else by a fresh export."""
    plan = next((c for c in manifest.components.values() if c.format == "plan" and c.file == rel), None)
    return "python -m export.build --force" if plan is None else rebuild_command(bundle, plan, in_place=True)
