"""Rebuild hints: the `python -m export.build` line that rebuilds a bundle, for every runtime refusal that says "rebuild".

A bundle records the arguments export was given (manifest `command`) and, for TensorRT engines, the builder flags
(`from_onnx_args`): the hints repeat them, with the changes a refusal asks for. Only a bundle written before that
record gets a command made from its manifest's fields, the one place the runtime spells export's flags.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from .component import Component
from .manifest import Manifest
from .records import LoraInfo

PICKLE_SUFFIXES = (".pt", ".bin", ".ckpt", ".pth")  # files that can run code when loaded: read only when allowed


def rebuild_command(bundle: Any, component: Component | None = None, *, in_place: bool = False) -> str:
    """The exact `export.build --from-onnx` line that rebuilds the bundle's engines with the flags it was built with."""
    args: Sequence[str] = component.rebuild_args if component else ()
    words = ["python", "-m", "export.build", "--from-onnx", str(bundle)]
    if in_place:
        words += ["--out", str(bundle), "--force"]
    return shlex.join([*words, *args])


def rebuild_hint(bundle: str | Path | None, manifest: Manifest, **changes: object) -> str:
    """The `python -m export.build` line that rebuilds BUNDLE in place (bundle None: a new bundle under engines/, the
    line ends without --out): the command its manifest records, with `changes`
    in place of those flags (precision="fp32", pipelines="txt2img,img2img"; None drops a flag; a list repeats one:
    lora=[FILE:SCALE, ...] replaces the fused adapters), each changed flag moved to the end. Shell-quoted."""
    words = list(manifest.command) or _from_fields(manifest)
    if manifest.backend == "tensorrt":  # the library that built it: tensorrt or tensorrt-rtx
        changes = {"backend": manifest.tensorrt.library if manifest.tensorrt else "tensorrt", **changes}
    for key, value in changes.items():
        flag = "--" + key.replace("_", "-")
        words = _without(words, flag)
        for v in value if isinstance(value, (list, tuple)) else () if value is None else (value,):
            words += [flag, str(v)]
    out = ["--out", str(bundle), "--force"] if bundle is not None else []
    return shlex.join(["python", "-m", "export.build", *words, *out])


def _without(words: list[str], flag: str) -> list[str]:
    """The arguments with every `flag` (and the value after it, where it takes one) taken out."""
    out, skip = [], False
    for i, word in enumerate(words):
        if skip:
            skip = False
        elif word == flag:
            skip = i + 1 < len(words) and not words[i + 1].startswith("--")
        else:
            out.append(word)
    return out


def _from_fields(manifest: Manifest) -> list[str]:
    """The arguments of a bundle from before export recorded them, made from what its manifest says."""
    flags: dict[str, str] = {
        "--model": manifest.model.source or "MODEL_FOLDER",
        "--precision": manifest.source_precision,
        "--height": str(manifest.height),
        "--width": str(manifest.width),
        "--batch-size": str(manifest.batch_size),
        "--guidance": manifest.guidance,
        "--pipelines": ",".join(manifest.pipelines),
    }
    lora = manifest.lora or LoraInfo()
    if lora.slot_rank:
        flags["--lora-slots"] = str(lora.slot_rank)
    flags.update(manifest.levers.rebuild_flags())
    if manifest.tokenizer.max_chunks > 1:
        flags["--max-prompt-tokens"] = str(manifest.tokenizer.max_chunks * (manifest.tokenizer.max_length - 2))
    words = [word for flag, value in flags.items() for word in (flag, value)]
    for a in lora.fused:
        words += ["--lora", f"{a.file}:{a.scale!r}"]
    for spec in manifest.tokenizer.textual_inversion:
        words += ["--textual-inversion", spec]
    if any(PurePosixPath(s.rsplit(":", 1)[0]).suffix in PICKLE_SUFFIXES for s in manifest.tokenizer.textual_inversion):
        words.append("--allow-pickle")  # the build read a pickle embedding only because it was allowed
    for name in sorted((n for n in manifest.components if n.startswith("controlnet_")), key=lambda n: int(n.rsplit("_", 1)[1])):
        onnx = manifest.components[name].source_onnx or manifest.components[name]  # a plan keeps its ONNX's record
        words += ["--controlnet", str(onnx.build.get("controlnet", {}).get("source", "CONTROLNET_FOLDER"))]
    return words


def file_rebuild_hint(bundle: Path, manifest: Manifest, rel: str) -> str:
    """A damaged TensorRT engine is rebuilt from the ONNX its bundle carries; anything else by a fresh export."""
    plan = next((c for c in manifest.components.values() if c.format == "plan" and c.file == rel), None)
    return rebuild_hint(bundle, manifest) if plan is None else rebuild_command(bundle, plan, in_place=True)
