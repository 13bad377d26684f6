"""The engine-bundle contract: manifest.json, read and checked.

export/ writes it, runtime/ reads it, nothing else crosses. Everything here is plain
JSON-able data so the writer (with torch) and the reader (without) share one schema.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BundleError

SCHEMA = "ldm-deploy/bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name: float32, float16, int32, int64

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(d["name"], tuple(int(s) for s in d["shape"]), d["dtype"])

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class Component:
    name: str
    file: str
    format: str  # onnx | plan
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    build: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> "Component":
        return cls(
            name=name,
            file=d["file"],
            format=d["format"],
            precision=d["precision"],
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
            "build": self.build,
            "verification": self.verification,
        }

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest.json; `raw` keeps every field, the attributes the ones the runtime uses."""

    raw: dict[str, Any]
    components: dict[str, Component]

    @property
    def height(self) -> int:
        return int(self.raw["image"]["height"])

    @property
    def width(self) -> int:
        return int(self.raw["image"]["width"])

    @property
    def batch_size(self) -> int:
        return int(self.raw["image"]["batch_size"])

    @property
    def guidance(self) -> str:
        return str(self.raw["guidance"]["mode"])

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return dict(self.raw["scheduler"]["config"])

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.raw["vae"]["scaling_factor"])

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        vae = self.raw["vae"]
        f = int(vae["downscale_factor"])
        return (self.batch_size, int(vae["latent_channels"]), self.height // f, self.width // f)

    @property
    def backend(self) -> str:
        return str(self.raw["backend"])

    @property
    def files(self) -> dict[str, str]:
        return dict(self.raw["files"])


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def parse_manifest(raw: dict[str, Any], where: str = MANIFEST) -> Manifest:
    """Check the schema and build a Manifest; a wrong or unknown schema names what to do."""
    if raw.get("schema") != SCHEMA:
        raise BundleError(f"{where}: not an engine-bundle manifest (schema {raw.get('schema')!r}, expected {SCHEMA!r})")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{where}: manifest schema_version {version} but this runtime reads version {SCHEMA_VERSION}; "
            "rebuild the bundle with this SDK's `python -m export.build` or use the SDK version that built it"
        )
    for key in ("image", "vae", "scheduler", "guidance", "tokenizer", "components", "files", "backend"):
        if key not in raw:
            raise BundleError(f"{where}: manifest has no {key!r} section; the bundle is incomplete, rebuild it")
    components = {name: Component.from_json(name, d) for name, d in raw["components"].items()}
    return Manifest(raw=raw, components=components)


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
    except json.JSONDecodeError as e:
        raise BundleError(f"{path} is not valid JSON ({e}); rebuild the bundle") from None
    manifest = parse_manifest(raw, str(path))
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
    if plan is None:
        return "python -m export.build --force"
    from .compat import rebuild_command

    return rebuild_command(bundle, plan, in_place=True)
