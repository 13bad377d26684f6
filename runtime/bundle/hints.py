"""Rebuild hints: the one place the runtime spells the `python -m export.build` line that rebuilds a bundle.

Every runtime refusal that says "rebuild" takes its command from here, shell-quoted.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .component import Component
from .manifest import Manifest
from .records import LoraInfo


def rebuild_command(bundle: Any, component: Component | None = None, *, in_place: bool = False) -> str:
    """The exact `export.build --from-onnx` line that rebuilds the bundle's engines with the flags it was built with."""
    args: Sequence[str] = component.rebuild_args if component else ()
    words = ["python", "-m", "export.build", "--from-onnx", str(bundle)]
    if in_place:
        words += ["--out", str(bundle), "--force"]
    return shlex.join([*words, *args])


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


def file_rebuild_hint(bundle: Path, manifest: Manifest, rel: str) -> str:
    """A damaged TensorRT engine is rebuilt from the ONNX its bundle carries; anything else by a fresh export."""
    plan = next((c for c in manifest.components.values() if c.format == "plan" and c.file == rel), None)
    return rebuild_hint(bundle, manifest) if plan is None else rebuild_command(bundle, plan, in_place=True)
