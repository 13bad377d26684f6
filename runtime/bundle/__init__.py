"""The engine-bundle contract, one small package: what export writes and the runtime reads.

- manifest: manifest.json as the typed Manifest, its checked read (schema, version, every value's bounds) and its write;
- records: the manifest's sections, each with from_json / to_json (component: one engine file's record);
- integrity: paths kept inside the bundle, every file hashed, what one load read (BundleState);
- hints: the command that rebuilds a bundle, for every refusal that says "rebuild";
- fit: whether a TensorRT bundle fits this machine (TensorRT version, GPU, compute capability).
"""

from .component import Component, TensorSpec
from .hints import rebuild_command, rebuild_hint
from .integrity import BundleState, check_bundle_paths, declared_schema, load_manifest, read_bundle, sha256_file, verify_bundle_files
from .manifest import Manifest
from .records import (
    DTYPES,
    FORMATS,
    GUIDANCE_MODES,
    MANIFEST,
    READABLE_VERSIONS,
    SCHEMA,
    SCHEMA_VERSION,
    GuidanceInfo,
    LoraAdapter,
    LoraInfo,
    LoraTarget,
    ModelInfo,
    SchedulerInfo,
    SdxlInfo,
    TensorRTInfo,
    TextEncoderInfo,
    TokenizerInfo,
    UpscaleInfo,
    VaeInfo,
)

__all__ = [
    "DTYPES", "FORMATS", "GUIDANCE_MODES", "MANIFEST", "READABLE_VERSIONS", "SCHEMA", "SCHEMA_VERSION",
    "BundleState", "Component", "GuidanceInfo", "LoraAdapter", "LoraInfo", "LoraTarget", "Manifest", "ModelInfo",
    "SchedulerInfo", "SdxlInfo", "TensorRTInfo", "TensorSpec", "TextEncoderInfo", "TokenizerInfo", "UpscaleInfo", "VaeInfo",
    "check_bundle_paths", "declared_schema", "load_manifest", "read_bundle", "rebuild_command",
    "rebuild_hint", "sha256_file", "verify_bundle_files",
]  # fmt: skip
