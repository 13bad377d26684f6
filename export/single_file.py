"""Single-file checkpoints: one .safetensors in the original LDM/CompVis key layout, as model sites distribute them.

Converted offline: the architecture is recognised from the checkpoint's keys and tensor shapes, the matching
diffusers config folder shipped in export/configs/ (SD 1.x, SD 2.x 768 v-prediction and 512 base, both
inpainting UNets) is completed with the CLIP vocabulary from assets/clip-tokenizer, and diffusers'
`from_single_file` converts the weights into a temporary diffusers folder that the export then reads like
any other. Checkpoints of other families (SDXL, SD3, FLUX, ...) and layouts the shipped configs do not
describe are refused by name before anything is converted.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from runtime.bundle import sha256_file

from .errors import ModelError
from .families import OTHER_FAMILIES

CONFIGS = Path(__file__).resolve().parent / "configs"
CLIP_VOCAB = Path(__file__).resolve().parent.parent / "assets" / "clip-tokenizer"
SHIPPED = ("sd1", "sd1-inpainting", "sd2", "sd2-base", "sd2-inpainting")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
PICKLED = (".ckpt", ".pt", ".pth", ".bin")

UNET, VAE, CLIP, OPEN_CLIP = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.", "cond_stage_model.model."
CONV_IN = UNET + "input_blocks.0.0.weight"  # (model channels, input channels, 3, 3)
CROSS_ATTN = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"  # (320, context dim)


@dataclass(frozen=True)
class Signature:
    """What a shipped config's checkpoint looks like: the shapes that tell the architectures apart."""

    text_encoder: str  # clip (cond_stage_model.transformer.*) | open_clip (cond_stage_model.model.*)
    context_dim: int
    in_channels: int
    text_layers: int  # in the checkpoint (SD 2.x's OpenCLIP has 24; diffusers keeps 23, SD 2 reads the penultimate)
    model_channels: int = 320
    input_blocks: int = 12
    vae_channels: int = 128


SIGNATURES = {
    "sd1": Signature("clip", 768, 4, 12),
    "sd1-inpainting": Signature("clip", 768, 9, 12),
    "sd2": Signature("open_clip", 1024, 4, 24),
    "sd2-base": Signature("open_clip", 1024, 4, 24),
    "sd2-inpainting": Signature("open_clip", 1024, 9, 24),
}
DESCRIPTIONS = {
    "sd1": "SD 1.x (CLIP ViT-L/14 text encoder, 512x512, epsilon)",
    "sd1-inpainting": "SD 1.x inpainting (9-channel UNet, 512x512, epsilon)",
    "sd2": "SD 2.x 768 v-prediction (OpenCLIP ViT-H text encoder, 768x768)",
    "sd2-base": "SD 2.x base (OpenCLIP ViT-H text encoder, 512x512, epsilon)",
    "sd2-inpainting": "SD 2.x inpainting (9-channel UNet, 512x512, epsilon)",
}
SD2_AMBIGUITY = (
    "SD 2.x's 768 v-prediction (2.0-v, 2.1) and 512 epsilon base (2.0-base, 2.1-base) checkpoints have the same keys "
    "and shapes, and no modelspec header or .yaml beside it says which; converted as the 768 v-prediction model, as diffusers does: "
    "pass --checkpoint-config sd2-base for a base checkpoint"
)


@dataclass(frozen=True)
class Checkpoint:
    """A single file's tensor names and shapes (read from its header: no weight is loaded) and its metadata."""

    path: Path
    shapes: Mapping[str, tuple[int, ...]]
    metadata: Mapping[str, str]


@dataclass(frozen=True)
class Recognised:
    config: Path  # the diffusers config folder to convert with
    note: str  # for the build log: what it was recognised as, and how


def read_checkpoint(path: Path, allow_pickle: bool) -> Checkpoint:
    """Names and shapes of every tensor; pickled checkpoints only with --allow-pickle (loading them can run code)."""
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ModelError(
            f"{path} is a file but not a checkpoint (.safetensors, or .ckpt with --allow-pickle); "
            "pass --model with a diffusers folder or a single-file Stable Diffusion checkpoint"
        )
    if path.suffix in PICKLED:
        if not allow_pickle:
            raise ModelError(
                f"{path} is a pickle checkpoint, which can run code when loaded; convert it to safetensors, "
                "or pass --allow-pickle if you trust this file"
            )
        from diffusers.loaders.single_file_utils import load_single_file_checkpoint

        try:
            tensors = load_single_file_checkpoint(str(path), local_files_only=True)
        except Exception as e:  # the library's errors vary by version; the user needs the file and the cause
            raise ModelError(f"could not read {path}: {e}") from e
        return Checkpoint(path, {k: tuple(v.shape) for k, v in tensors.items() if hasattr(v, "shape")}, {})
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            metadata = dict(f.metadata() or {})
    except Exception as e:  # a truncated download or another format under a .safetensors name
        raise ModelError(f"could not read {path} as safetensors ({e}); is the download complete?") from e
    return Checkpoint(path, shapes, metadata)


def recognise(ckpt: Checkpoint, asked: str | None = None) -> Recognised:
    """The config folder to convert with: detected from the keys and shapes, or the one asked for (a shipped name or a folder).

    Other families are refused by name whatever is asked; a shipped config that does not fit the checkpoint is refused too.
    """
    refuse_other_families(ckpt)
    if asked is not None and asked not in SHIPPED:
        folder = Path(asked)
        if not (folder / "model_index.json").is_file():
            raise ModelError(
                f"--checkpoint-config {asked}: neither a shipped config ({', '.join(SHIPPED)}) nor a diffusers folder "
                "with model_index.json and the components' config.json files"
            )
        return Recognised(folder, f"converted with the configs of {folder} (--checkpoint-config)")
    found = signature_of(ckpt)
    matches = [name for name, sig in SIGNATURES.items() if fits(sig, found)]
    if not matches:
        raise ModelError(f"{ckpt.path}: {describe(found)}, which none of the shipped configs describes ({SHIPPED_SHAPES}); {OWN_CONFIG}")
    if asked is not None:
        if asked not in matches:
            raise ModelError(
                f"--checkpoint-config {asked} does not fit {ckpt.path.name}: {describe(found)}, "
                f"which is {' or '.join(matches)}; nothing was written"
            )
        return Recognised(CONFIGS / asked, f"{DESCRIPTIONS[asked]}, as asked (--checkpoint-config {asked})")
    name, note = matches[0], "recognised from its keys and shapes"
    if name == "sd2":
        name, note = sd2_flavour(ckpt)
    return Recognised(CONFIGS / name, f"{DESCRIPTIONS[name]}, {note}")


SHIPPED_SHAPES = (
    "they are SD 1.x and 2.x at full size: 320 model channels in 12 input blocks, 4 or 9 input channels, a 128-channel VAE, "
    "and 768-d cross-attention with a 12-layer CLIP or 1024-d with a 24-layer OpenCLIP"
)
OWN_CONFIG = (
    "convert it to a diffusers folder yourself, or pass --checkpoint-config with a diffusers folder whose configs describe it; "
    "nothing was written"
)


def fits(expected: Signature, found: Signature) -> bool:
    """Equal shapes; an OpenCLIP encoder may also come without its last layer (SD 2.x never reads it; some files drop it)."""
    layers = {expected.text_layers} | ({expected.text_layers - 1} if expected.text_encoder == "open_clip" else set())
    return replace(found, text_layers=expected.text_layers) == expected and found.text_layers in layers


def sd2_flavour(ckpt: Checkpoint) -> tuple[str, str]:
    """768 v-prediction or 512 base: the keys cannot tell; a model-spec header (modelspec.prediction_type) can, and so
    can the original training config distributed next to the file (<name>.yaml: `parameterization: "v"` or none, epsilon)."""
    spec = ckpt.metadata.get("modelspec.prediction_type", "").lower()
    if spec in ("epsilon", "eps"):
        return "sd2-base", "recognised from its keys and its modelspec.prediction_type (epsilon)"
    if spec in ("v", "v_prediction", "v-prediction"):
        return "sd2", "recognised from its keys and its modelspec.prediction_type (v)"
    yaml = ckpt.path.with_suffix(".yaml")
    if yaml.is_file():
        v = re.search(r"""^\s*parameterization:\s*["']?v["']?\s*$""", yaml.read_text(errors="replace"), re.MULTILINE)
        return ("sd2", f"recognised from its keys and {yaml.name} (parameterization v)") if v else (
            "sd2-base", f"recognised from its keys and {yaml.name} (no v parameterization: epsilon)"
        )  # fmt: skip
    return "sd2", f"recognised from its keys. {SD2_AMBIGUITY}"


def signature_of(ckpt: Checkpoint) -> Signature:
    """The distinguishing shapes; a checkpoint missing a part is refused naming the part."""
    s = ckpt.shapes
    parts = {
        "UNet (model.diffusion_model.*)": UNET,
        "VAE (first_stage_model.*)": VAE,
        "text encoder (cond_stage_model.*)": "cond_stage_model.",
    }
    missing = [what for what, prefix in parts.items() if not any(k.startswith(prefix) for k in s)]
    if missing:
        raise ModelError(
            f"{ckpt.path} has no {' and no '.join(missing)}: a single-file checkpoint must carry UNet, VAE and text encoder "
            f"in the original layout to be converted; {OWN_CONFIG}"
        )
    if CONV_IN not in s or CROSS_ATTN not in s:
        lacks = CONV_IN if CONV_IN not in s else CROSS_ATTN
        raise ModelError(f"{ckpt.path}: its UNet lacks {lacks}, so it is no SD 1.x/2.x UNet; {OWN_CONFIG}")
    model_channels, in_channels = s[CONV_IN][0], s[CONV_IN][1]
    if in_channels == 8:
        raise ModelError(
            f"{ckpt.path} is an InstructPix2Pix checkpoint (8 UNet input channels: latents and the input image's latents), "
            "which this SDK does not export; nothing was written"
        )
    if in_channels == 7 or UNET + "label_emb.weight" in s:
        raise ModelError(
            f"{ckpt.path} is an x4 upscaler checkpoint (7 UNet input channels, noise-level embedding): export the diffusers "
            "folder of stabilityai/stable-diffusion-x4-upscaler instead; nothing was written"
        )
    if any(k.startswith(OPEN_CLIP) for k in s):
        encoder = "open_clip"
        layers = _count(s, OPEN_CLIP + "transformer.resblocks.")
    else:
        encoder = "clip"
        layers = _count(s, CLIP + "text_model.encoder.layers.")
    return Signature(
        text_encoder=encoder,
        context_dim=s[CROSS_ATTN][1],
        in_channels=in_channels,
        text_layers=layers,
        model_channels=model_channels,
        input_blocks=_count(s, UNET + "input_blocks."),
        vae_channels=s.get(VAE + "encoder.conv_in.weight", (0,))[0],
    )


def _count(shapes: Mapping[str, Any], prefix: str) -> int:
    """How many numbered blocks follow `prefix` (resblocks.0 ... resblocks.23: 24)."""
    ids = {k[len(prefix) :].split(".", 1)[0] for k in shapes if k.startswith(prefix)}
    return len({i for i in ids if i.isdigit()})


def describe(sig: Signature) -> str:
    encoder = {"clip": "a CLIP (SD 1.x-style)", "open_clip": "an OpenCLIP (SD 2.x-style)"}[sig.text_encoder]
    return (
        f"{encoder} text encoder with {sig.text_layers} layers, a UNet with {sig.in_channels} input channels, "
        f"{sig.model_channels} model channels, {sig.input_blocks} input blocks and {sig.context_dim}-d cross-attention, "
        f"a VAE with {sig.vae_channels} channels"
    )


def refuse_other_families(ckpt: Checkpoint) -> None:
    """SDXL, SD3, FLUX and other diffusers-known single files are refused by name, as families.detect refuses their folders."""
    s = ckpt.shapes
    if any(k.startswith("conditioner.embedders.") for k in s):
        raise ModelError(
            f"{ckpt.path} is an SDXL single-file checkpoint: SDXL (two text encoders; its checkpoint has conditioner.embedders.* "
            "keys). This SDK exports SDXL from diffusers folders only: save it as one first, with diffusers: "
            "StableDiffusionXLPipeline.from_single_file(path).save_pretrained(folder), then export the folder; nothing was written"
        )
    if any(".joint_blocks." in k or k.startswith("joint_blocks.") for k in s):
        _refuse(ckpt.path, "an SD3", OTHER_FAMILIES["StableDiffusion3"])
    if any(".double_blocks." in k or k.startswith("double_blocks.") for k in s):
        _refuse(ckpt.path, "a FLUX", OTHER_FAMILIES["Flux"])
    if not any(k.startswith(UNET) for k in s):
        known = diffusers_model_type(s)
        hint = f"; diffusers reads it as a {known!r} checkpoint" if known else ""
        if any(k.startswith(("down_blocks.", "unet.down_blocks.")) for k in s):
            hint += "; it looks like a diffusers-layout UNet state dict: export the diffusers folder it belongs to"
        first = ", ".join(sorted(s)[:3]) or "no tensors"
        raise ModelError(
            f"{ckpt.path} is not a Stable Diffusion checkpoint in the original (LDM) layout: no model.diffusion_model.* keys "
            f"(it has {len(s)} tensors, e.g. {first}){hint}; nothing was written"
        )


def _refuse(path: Path, what: str, family: str) -> None:
    raise ModelError(
        f"{path} is {what} single-file checkpoint: {family}. This SDK version exports the Stable Diffusion 1.x/2.x family "
        "(with its inpainting, upscaler, LCM and Turbo variants) and SDXL folders only; nothing was written"
    )


class _Shaped:
    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape


def diffusers_model_type(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """diffusers' own name for a checkpoint (infer_diffusers_model_type), None where it only falls back to "v1"."""
    try:
        from diffusers.loaders.single_file_utils import infer_diffusers_model_type

        name = str(infer_diffusers_model_type({k: _Shaped(v) for k, v in shapes.items()}))
    except Exception:  # its rules index keys it expects; a checkpoint it cannot name is simply unnamed
        return None
    return None if name == "v1" else name


def config_folder(recognised: Recognised, dest: Path) -> Path:
    """A complete diffusers config folder at dest: the chosen configs plus the CLIP vocabulary where they lack one."""
    shutil.copytree(recognised.config, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.ckpt"))
    tok = dest / "tokenizer"
    tok.mkdir(exist_ok=True)
    if not (tok / "tokenizer.json").is_file():
        for name in ("vocab.json", "merges.txt"):
            if not (tok / name).is_file():
                shutil.copy2(CLIP_VOCAB / name, tok / name)
    return dest


def convert(ckpt: Checkpoint, recognised: Recognised, work: Path) -> Path:
    """The checkpoint as a diffusers folder under `work` (float32 safetensors), converted by diffusers offline."""
    import diffusers
    import torch
    import transformers

    # their per-weight progress bars and notes would drown the build's own report
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    config = config_folder(recognised, work / "config")
    pipeline = str(json.loads((config / "model_index.json").read_text()).get("_class_name", "StableDiffusionPipeline"))
    cls = getattr(diffusers, pipeline, None)
    if cls is None or not hasattr(cls, "from_single_file"):
        raise ModelError(f"{config / 'model_index.json'}: {pipeline} is not a diffusers pipeline that loads single files")
    extra: dict[str, Any] = {}
    if sum(k.startswith("model_ema.") for k in ckpt.shapes) > 100:
        extra["extract_ema"] = True  # the EMA weights, the ones meant for inference
    try:
        pipe = cls.from_single_file(
            str(ckpt.path), config=str(config), local_files_only=True, torch_dtype=torch.float32,
            safety_checker=None, requires_safety_checker=False, **extra,
        )  # fmt: skip
    except Exception as e:  # the library's errors vary by version; the user needs the file and the cause
        detail = " ".join(str(e).split())[:400]
        raise ModelError(f"could not convert {ckpt.path} with the configs of {recognised.config}: {detail}; {OWN_CONFIG}") from e
    out = work / "model"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


@contextmanager
def converted(path: Path, *, allow_pickle: bool, checkpoint_config: str | None, log: Callable[[str], None]) -> Iterator[tuple[Path, str]]:
    """A temporary diffusers folder converted from the single file at `path`, and how it was recognised; removed afterwards."""
    ckpt = read_checkpoint(path, allow_pickle)
    recognised = recognise(ckpt, checkpoint_config)
    log(f"converting single-file checkpoint {path.name}: {recognised.note}")
    with tempfile.TemporaryDirectory(prefix="single-file-") as tmp:
        yield convert(ckpt, recognised, Path(tmp)), recognised.note


def checkpoint_hashes(path: Path) -> dict[str, str]:
    """The source hashes of a converted checkpoint: the single file itself."""
    return {path.name: sha256_file(path)}
