"""The engine-bundle contract, one small package: what export writes and the runtime reads.

- records: manifest.json as typed records, each with from_json / to_json (component: one engine file's record);
- bounds: the checked read of a manifest's JSON (schema, version, every value's bounds);
- integrity: paths kept inside the bundle, every file hashed, what one load read (BundleState);
- hints: the command that rebuilds a bundle, for every refusal that says "rebuild";
- fit: whether a TensorRT bundle fits this machine (TensorRT version, GPU, compute capability).
"""

from .bounds import manifest_from_json
from .component import Component, TensorSpec
from .hints import rebuild_command, rebuild_hint
from .integrity import BundleState, check_bundle_paths, declared_schema, load_manifest, read_bundle, sha256_file, verify_bundle_files
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
    Manifest,
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
    "check_bundle_paths", "declared_schema", "load_manifest", "manifest_from_json", "read_bundle", "rebuild_command",
    "rebuild_hint", "sha256_file", "verify_bundle_files",
]  # fmt: skip
