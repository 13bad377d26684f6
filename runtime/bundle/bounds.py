"""Bounds every manifest value is checked against before anything is allocated or opened, and the checked read.

`manifest_from_json` is how a manifest's JSON becomes a `Manifest`: the schema and version first, then the
records (records.Manifest.from_json), then every value that sizes an allocation or names a file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..errors import BundleError
from .records import DTYPES, FORMATS, MANIFEST, READABLE_VERSIONS, SCHEMA, LoraInfo, Manifest

# Bounds every manifest value is checked against before anything is allocated or opened.
MAX_IMAGE_SIDE = 16384  # pixels
MAX_BATCH = 64
MAX_LATENT_CHANNELS = 64
MAX_DOWNSCALE = 64
MAX_DIM = 1 << 20  # any one tensor dimension
MAX_ELEMENTS = 1 << 34  # any one tensor's element count
MAX_CONTEXT = 4096  # tokenizer max_length, as runtime.tokenizer
MAX_LORA_RANK = 1024
SHA256 = re.compile(r"[0-9a-f]{64}")


def manifest_from_json(raw: Mapping[str, Any], where: str = MANIFEST) -> Manifest:
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
        manifest = Manifest.from_json(raw)
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
