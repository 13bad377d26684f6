"""Load a local diffusers Stable Diffusion folder: checked layout, safetensors unless pickle is allowed."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.manifest import sha256_file

from .errors import ModelError
from .families import ExportFamily, StableDiffusion, detect

__all__ = ["REFERENCE_MODEL", "ModelError", "SourceModel", "load_model", "write_tokenizer"]

# The small model shipped in the repository: the default --model, and what the tests export.
REFERENCE_MODEL = Path(__file__).resolve().parent.parent / "models" / "shapes-ldm"
REQUIRED = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
WEIGHTED = ("text_encoder", "unet", "vae")
# What a model can do follows from its UNet's input channels (diffusers' pipelines check the same).
PIPELINES = {"text2image": ("txt2img", "img2img", "inpaint"), "inpainting": ("inpaint",), "upscaler": ("upscale",)}


@dataclass
class SourceModel:
    path: Path
    text_encoder: Any
    unet: Any
    vae: Any
    scheduler_class: str
    scheduler_config: dict[str, Any]
    tokenizer_dir: Path
    hashes: dict[str, str]
    index: dict[str, Any]  # model_index.json: the pipeline class and its extra settings (e.g. max_noise_level)
    low_res_scheduler: dict[str, Any] | None = None  # the upscaler's: {"class_name", "config"} of the schedule noising its input
    family: ExportFamily = field(default_factory=StableDiffusion)  # detected from the folder by load_model

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def vae_factor(self) -> int:
        factor: int = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return factor

    @property
    def kind(self) -> str:
        """text2image (latents in), inpainting (latents + mask + masked-image latents), upscaler (latents + RGB)."""
        c, lc = self.unet.config.in_channels, self.vae.config.latent_channels
        if c == lc:
            return "text2image"
        if c == 2 * lc + 1:
            return "inpainting"
        if c == lc + 3 and self.unet.config.num_class_embeds:
            return "upscaler"
        raise ModelError(
            f"{self.path}: a UNet with {c} input channels and a VAE with {lc} latent channels is none of the kinds this "
            f"SDK exports: text-to-image ({lc}), inpainting ({2 * lc + 1}: latents, mask, masked-image latents) or the "
            f"x4 upscaler ({lc + 3}: latents and the low-resolution image, with a noise-level class embedding)"
        )

    @property
    def pipelines(self) -> tuple[str, ...]:
        return PIPELINES[self.kind]

    def upscale_settings(self) -> dict[str, Any]:
        """The upscaler's manifest section: the noise-level limit and the schedule that noises the low-resolution image."""
        # diffusers' StableDiffusionUpscalePipeline defaults max_noise_level to 350 where the index omits it
        limit = int(self.index.get("max_noise_level", 350))
        classes = self.unet.config.num_class_embeds
        if not 0 <= limit < classes:
            raise ModelError(
                f"{self.path / 'model_index.json'}: max_noise_level {limit} has no class embedding in the UNet, which has "
                f"{classes} (noise levels 0 to {classes - 1}); lower max_noise_level"
            )
        if self.low_res_scheduler is None:
            raise ModelError(f"{self.path} has no low_res_scheduler/: the upscaler needs that DDPM schedule to noise its input image")
        return {"max_noise_level": limit, "low_res_scheduler": self.low_res_scheduler}


def check_layout(path: Path, allow_pickle: bool) -> dict[str, bool]:
    """Validate the folder; return, per weighted component, whether to load safetensors."""
    if not path.is_dir():
        raise ModelError(f"model folder {path} does not exist; pass --model with a local diffusers Stable Diffusion folder")
    if not (path / "model_index.json").is_file():
        raise ModelError(f"{path} has no model_index.json: not a diffusers pipeline folder (save one with pipe.save_pretrained)")
    detect(path)  # a folder of another family is refused by name before its parts are checked
    missing = [c for c in REQUIRED if not (path / c).is_dir()]
    if missing:
        raise ModelError(f"{path} is incomplete: missing {', '.join(missing)}/ (a Stable Diffusion folder has {', '.join(REQUIRED)})")
    use_safetensors = {}
    for c in WEIGHTED:
        files = [f for f in (path / c).iterdir() if f.is_file()]
        safe = [f for f in files if f.name.endswith(".safetensors")]
        pickled = [f for f in files if f.name.endswith(PICKLE_SUFFIXES)]
        if not safe and not pickled:
            raise ModelError(f"{path / c} has no weights (*.safetensors); the model folder is incomplete")
        if not safe and not allow_pickle:
            raise ModelError(
                f"{path / c} has only pickle weights ({pickled[0].name}), which can run code when loaded; "
                "convert them to safetensors, or pass --allow-pickle if you trust this file"
            )
        use_safetensors[c] = bool(safe)
    return use_safetensors


def source_hashes(path: Path) -> dict[str, str]:
    """sha256 of every config and weight file: what the bundle was built from."""
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in (".json", ".txt", ".safetensors") + PICKLE_SUFFIXES)
    return {str(f.relative_to(path)): sha256_file(f) for f in files}


def check_checksums(path: Path) -> None:
    """Where a model ships a SHA256SUMS file (the reference model does), every file must match it."""
    sums = path / "SHA256SUMS"
    if not sums.is_file():
        return
    for line in sums.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        f = path / name.lstrip("*")
        if not f.is_file():
            raise ModelError(f"{f} is missing (listed in {sums}); restore the model folder")
        if sha256_file(f) != digest:
            raise ModelError(
                f"{f} is corrupt: its sha256 differs from {sums.name}; restore it (e.g. `git checkout -- {path}`) "
                "or retrain it with `python -m reference.train`"
            )


def load_model(path: str | Path, *, allow_pickle: bool = False) -> SourceModel:
    """Load text encoder, UNet and VAE in float32 eval mode from a local folder only."""
    path = Path(path)
    use_safetensors = check_layout(path, allow_pickle)
    check_checksums(path)
    import diffusers
    import torch
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    # their per-weight progress bars and dtype notes would drown the build's own report
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    def load(cls: Any, sub: str, **kw: Any) -> Any:
        try:
            m = cls.from_pretrained(path / sub, use_safetensors=use_safetensors[sub], local_files_only=True, **kw)
        except Exception as e:  # library errors vary by version; the user needs the file and the cause
            raise ModelError(f"could not load {path / sub}: {e}") from e
        return m.to(torch.float32).eval()

    text_encoder = load(CLIPTextModel, "text_encoder", dtype=torch.float32)
    unet = load(UNet2DConditionModel, "unet", torch_dtype=torch.float32)
    vae = load(AutoencoderKL, "vae", torch_dtype=torch.float32)
    sched = read_scheduler(path / "scheduler")
    tok = path / "tokenizer"
    has_bpe_files = all((tok / f).is_file() for f in ("vocab.json", "merges.txt"))
    if not has_bpe_files and not (tok / "tokenizer.json").is_file():
        raise ModelError(f"{tok} has neither vocab.json + merges.txt nor tokenizer.json: the CLIP tokenizer is missing")
    low_res = path / "low_res_scheduler"
    model = SourceModel(
        family=detect(path),
        path=path,
        text_encoder=text_encoder,
        unet=unet,
        vae=vae,
        scheduler_class=sched["class_name"],
        scheduler_config=sched["config"],
        tokenizer_dir=tok,
        hashes=source_hashes(path),
        index=json.loads((path / "model_index.json").read_text()),
        low_res_scheduler=read_scheduler(low_res) if low_res.is_dir() else None,
    )
    if model.unet.config.num_class_embeds and model.kind == "upscaler":
        model.upscale_settings()  # a broken upscaler is refused before the export, not after it
    return model


def read_scheduler(folder: Path) -> dict[str, Any]:
    """A scheduler_config.json as {"class_name", "config"}, the config without diffusers' private keys."""
    f = folder / "scheduler_config.json"
    if not f.is_file():
        raise ModelError(f"{f} is missing; the model folder is incomplete")
    raw = json.loads(f.read_text())
    return {"class_name": raw.get("_class_name", ""), "config": {k: v for k, v in raw.items() if not k.startswith("_")}}


TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def write_tokenizer(src: Path, dest: Path) -> None:
    """Copy the CLIP BPE files the runtime reads; derive them from tokenizer.json where only that exists
    (transformers 5 saves CLIP tokenizers that way)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)
    if (dest / "vocab.json").is_file() and (dest / "merges.txt").is_file():
        return
    bpe = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    if bpe.get("type") != "BPE":
        raise ModelError(f"{src / 'tokenizer.json'} is a {bpe.get('type')} tokenizer, not CLIP's BPE")
    (dest / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (dest / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
