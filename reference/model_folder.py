"""Write the trained model as a diffusers Stable Diffusion folder (safetensors, fp32).

Components are written into a scratch folder inside the output and then moved into place, so
a run killed while writing never leaves a truncated weight file behind.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from reference.architecture import CLIP_DIR, TOKENIZER_FILES, scheduler_config
from reference.caption_bank import load_tokenizer

SCRATCH = ".saving"


def cpu_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A CPU copy (weights are fp32 already), so saving never depends on the training device."""
    return copy.deepcopy(module).to("cpu").eval()


def save_vae(vae: torch.nn.Module, scaling_factor: float, out: Path) -> None:
    """``out/vae`` with ``scaling_factor`` recorded in its config."""
    vae = cpu_copy(vae)
    vae.register_to_config(scaling_factor=float(scaling_factor))
    scratch = _scratch(out)
    vae.save_pretrained(scratch / "vae", safe_serialization=True)
    _move_in(scratch, out, ["vae"])


def save_pipeline(
    vae: torch.nn.Module,
    scaling_factor: float,
    text_encoder: torch.nn.Module,
    unet: torch.nn.Module,
    out: Path,
    tokenizer_dir: Path = CLIP_DIR,
) -> None:
    """The whole StableDiffusionPipeline folder, with the committed CLIP tokenizer files copied in."""
    vae = cpu_copy(vae)
    vae.register_to_config(scaling_factor=float(scaling_factor))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=cpu_copy(text_encoder),
        tokenizer=load_tokenizer(tokenizer_dir),
        unet=cpu_copy(unet),
        scheduler=DDIMScheduler(**scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    scratch = _scratch(out)
    pipe.save_pretrained(scratch, safe_serialization=True)
    # The runtime reads vocab.json + merges.txt; transformers 5 would only write tokenizer.json.
    shutil.rmtree(scratch / "tokenizer")
    (scratch / "tokenizer").mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy2(Path(tokenizer_dir) / name, scratch / "tokenizer" / name)
    _move_in(scratch, out, sorted(p.name for p in scratch.iterdir()))


def weight_files(out: Path) -> dict[str, int]:
    """Size in bytes of each saved .safetensors file, by path relative to ``out``."""
    return {str(p.relative_to(out)): p.stat().st_size for p in sorted(Path(out).rglob("*.safetensors"))}


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON via a temporary file, so readers never see half of it."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _scratch(out: Path) -> Path:
    scratch = Path(out) / SCRATCH
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    return scratch


def _move_in(scratch: Path, out: Path, names: list[str]) -> None:
    for name in names:
        target = Path(out) / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        (scratch / name).replace(target)
    shutil.rmtree(scratch)
