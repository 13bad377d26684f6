"""Load a local diffusers Stable Diffusion folder: checked layout, safetensors unless pickle is allowed."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.bundle import sha256_file

from .errors import ModelError, read_json_object
from .families import ExportFamily, StableDiffusion, detect

__all__ = ["REFERENCE_MODEL", "ModelError", "SourceModel", "load_model", "open_model", "write_tokenizer"]

# The small model shipped in the repository: the default --model, and what the tests export.
REFERENCE_MODEL = Path(__file__).resolve().parent.parent / "models" / "shapes-ldm"
REQUIRED = ("unet", "vae", "scheduler")  # besides the family's text encoders and tokenizers
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
WEIGHTED = ("unet", "vae")  # besides the text encoders
# the transformers class each text encoder folder loads as
TEXT_CLASSES = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}
# What a model can do follows from its UNet's input channels (diffusers' pipelines check the same).
PIPELINES = {"text2image": ("txt2img", "img2img", "inpaint"), "inpainting": ("inpaint",), "upscaler": ("upscale",)}
# The model_index.json entries a bundle is built from; any other component a folder lists is left out, and said so
EXPORTED = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "unet", "vae", "scheduler", "low_res_scheduler")
# diffusers/transformers weight names: model.safetensors, diffusion_pytorch_model.fp16.safetensors (save_pretrained's
# variant=), model-00001-of-00002.safetensors or model.fp16-00001-of-00002.safetensors (sharded)
WEIGHT_FILE = re.compile(r"^(?P<stem>[A-Za-z_]+)(?:\.(?P<variant>[A-Za-z0-9_]+))?(?:-\d+-of-\d+)?\.(?P<ext>safetensors|bin|pt|pth|ckpt)$")
SAFETY_NOTE = (
    "the bundle returns unfiltered images; if you need an NSFW filter, run your own classifier on the output images "
    "(e.g. the same CLIP-based StableDiffusionSafetyChecker, with diffusers)"
)


@dataclass(frozen=True)
class Weights:
    """The weight files one component loads: its variant (None: the plain files) and whether they are safetensors."""

    variant: str | None
    safetensors: bool
    files: tuple[str, ...]  # relative to the model folder

    def describe(self) -> str:
        return self.files[0] + (f" (+{len(self.files) - 1} more shards)" if len(self.files) > 1 else "")


@dataclass
class SourceModel:
    path: Path
    text_encoder: Any  # None for the SDXL refiner, which has text_encoder_2 only
    unet: Any
    vae: Any
    scheduler_class: str
    scheduler_config: dict[str, Any]
    tokenizer_dir: Path
    hashes: dict[str, str]
    index: dict[str, Any]  # model_index.json: the pipeline class and its extra settings (e.g. max_noise_level)
    low_res_scheduler: dict[str, Any] | None = None  # the upscaler's: {"class_name", "config"} of the schedule noising its input
    family: ExportFamily = field(default_factory=StableDiffusion)  # detected from the folder by load_model
    weights: dict[str, Weights] = field(default_factory=dict)  # per weighted component, the files loaded
    stored_dtypes: dict[str, str] = field(default_factory=dict)  # per weighted component, the dtype its files hold
    omitted: tuple[str, ...] = ()  # model_index.json components the bundle leaves out (e.g. safety_checker)
    origin: Path | None = None  # the single-file checkpoint `path` was converted from, if any
    origin_note: str = ""  # how that checkpoint was recognised (the config it was converted with)
    text_encoder_2: Any = None  # SDXL's second encoder (CLIPTextModelWithProjection)

    @property
    def name(self) -> str:
        return self.origin.stem if self.origin is not None else self.path.resolve().name

    @property
    def source(self) -> Path:
        """What the bundle was built from, as the user named it: the folder, or the single-file checkpoint."""
        return (self.origin or self.path).resolve()

    def report(self) -> list[str]:
        """The build log's lines about the source: which weight files were used, what was left out."""
        lines = []
        if self.origin is None:  # a converted checkpoint's file was named when it was converted
            used = ", ".join(w.describe() for w in self.weights.values())
            variants = sorted({w.variant for w in self.weights.values() if w.variant})
            lines.append(f"  weights: {used}" + (f" (variant {', '.join(variants)})" if variants else ""))
        low = sorted({d for d in self.stored_dtypes.values() if d and d != "float32"})
        if low:
            lines.append(f"  the weights are stored in {', '.join(low)}: upcast to float32 for the export and its verification")
        if self.omitted:
            why = SAFETY_NOTE if "safety_checker" in self.omitted else "the bundle's pipelines do not use them"
            lines.append(f"  left out: {', '.join(self.omitted)} (not exported: {why})")
        return lines

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
        return self.family.pipelines(self, PIPELINES[self.kind])

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


def check_layout(path: Path, allow_pickle: bool, variant: str | None = None) -> dict[str, Weights]:
    """Validate the folder; return, per weighted component, the weight files to load."""
    if path.is_file():
        raise ModelError(f"{path} is a file: single-file checkpoints are converted by export.single_file, not loaded here")
    if not path.is_dir():
        raise ModelError(
            f"model folder {path} does not exist; pass --model with a local diffusers Stable Diffusion folder "
            "or a single-file checkpoint (.safetensors)"
        )
    if not (path / "model_index.json").is_file():
        raise ModelError(f"{path} has no model_index.json: not a diffusers pipeline folder (save one with pipe.save_pretrained)")
    index = read_json_object(path / "model_index.json")
    family = detect(path, index)  # a folder of another family is refused by name before its parts are checked
    text = family.text_components(index)
    required = (*text, *REQUIRED)
    missing = [c for c in required if not (path / c).is_dir()]
    if missing:
        what = f"an SDXL {index.get('_class_name')}" if family.name == "sdxl" else "a Stable Diffusion"
        raise ModelError(f"{path} is incomplete: missing {', '.join(missing)}/ ({what} folder has {', '.join(required)})")
    return {c: component_weights(path, c, allow_pickle, variant) for c in (*(t for t in text if t in TEXT_CLASSES), *WEIGHTED)}


def component_weights(path: Path, component: str, allow_pickle: bool, variant: str | None) -> Weights:
    """The files one component loads: the asked variant, else the plain weights, else the only variant there is."""
    folder = path / component
    by_variant: dict[str | None, list[Path]] = {}
    for f in sorted(folder.iterdir()):
        m = WEIGHT_FILE.match(f.name)
        if f.is_file() and m:
            by_variant.setdefault(m["variant"], []).append(f)
    if not by_variant:
        raise ModelError(f"{folder} has no weights (*.safetensors); the model folder is incomplete")
    names = ", ".join(v or "plain" for v in sorted(by_variant, key=lambda v: v or ""))
    if variant is not None:
        if variant not in by_variant:
            raise ModelError(f"{folder} has no {variant!r} variant weights (it has: {names}); pass --variant with one of those")
        chosen: str | None = variant
    elif None in by_variant:
        chosen = None
    elif len(by_variant) == 1:
        chosen = next(iter(by_variant))
    else:
        raise ModelError(f"{folder} holds several weight variants ({names}) and no plain weights; pass --variant with the one to export")
    files = by_variant[chosen]
    safe = [f for f in files if f.name.endswith(".safetensors")]
    pickled = [f for f in files if f.name.endswith(PICKLE_SUFFIXES)]
    if not safe and not allow_pickle:
        raise ModelError(
            f"{folder} has only pickle weights ({pickled[0].name}), which can run code when loaded; "
            "convert them to safetensors, or pass --allow-pickle if you trust this file"
        )
    return Weights(chosen, bool(safe), tuple(str(f.relative_to(path)) for f in (safe or pickled)))


def stored_dtype(path: Path, weights: Weights) -> str:
    """The floating dtype a component's safetensors hold (read from the header: no tensor is loaded); "" for pickles."""
    return safetensors_dtype([path / rel for rel in weights.files]) if weights.safetensors else ""


def safetensors_dtype(files: list[Path]) -> str:
    """The floating dtypes the safetensors files hold, from their headers ("float16", "float32, float16", ...)."""
    from safetensors import safe_open

    dtypes = set()
    for file in files:
        with safe_open(str(file), framework="np") as f:
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
    floats = sorted(d for d in dtypes if d.startswith(("F", "BF")))
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
    return ", ".join(names.get(d, d) for d in floats)


def omitted_components(index: dict[str, Any]) -> tuple[str, ...]:
    """The components model_index.json lists (with a class) that the bundle does not carry, e.g. safety_checker."""
    return tuple(
        k for k, v in index.items()
        if not k.startswith("_") and k not in EXPORTED and isinstance(v, list) and len(v) == 2 and v[0] is not None
    )  # fmt: skip


def source_hashes(path: Path, weights: dict[str, Weights] | None = None, omitted: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every config and weight file the bundle was built from (unused variants and left-out parts excluded)."""
    used = {f for w in (weights or {}).values() for f in w.files}
    files = []
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if not f.is_file() or f.suffix not in (".json", ".txt", ".safetensors") + PICKLE_SUFFIXES or rel.parts[0] in omitted:
            continue
        if weights is not None and f.suffix not in (".json", ".txt") and str(rel) not in used:
            continue
        files.append(f)
    return {str(f.relative_to(path)): sha256_file(f) for f in files}


def check_checksums(path: Path) -> None:
    """Where a model ships a SHA256SUMS file (the reference model does), every file must match it."""
    sums = path / "SHA256SUMS"
    if not sums.is_file():
        return
    for number, line in enumerate(sums.read_text(errors="replace").splitlines(), 1):
        words = line.split(maxsplit=1)
        if not line.strip():
            continue
        if len(words) != 2 or len(words[0]) != 64 or any(c not in "0123456789abcdef" for c in words[0].lower()):
            raise ModelError(f"{sums} line {number} is not `<sha256> <file>`: {line[:80]!r}; restore the file")
        digest, name = words
        f = path / name.lstrip("*")
        if not f.is_file():
            raise ModelError(f"{f} is missing (listed in {sums}); restore the model folder")
        if sha256_file(f) != digest:
            raise ModelError(
                f"{f} is corrupt: its sha256 differs from {sums.name}; restore it (e.g. `git checkout -- {path}`) "
                "or remake it with the commands its training log records (reference.train, reference.distill)"
            )


@contextmanager
def open_model(
    path: str | Path,
    *,
    allow_pickle: bool = False,
    variant: str | None = None,
    checkpoint_config: str | None = None,
    log: Callable[[str], None] = print,
) -> Iterator[SourceModel]:
    """The model at `path`: a diffusers folder as load_model reads it, or a single-file checkpoint converted to a
    temporary diffusers folder first (export.single_file), which is removed when the block ends."""
    path = Path(path)
    if not path.is_file():
        if checkpoint_config is not None:
            raise ValueError(f"--checkpoint-config applies to single-file checkpoints; {path} is not a file")
        yield load_model(path, allow_pickle=allow_pickle, variant=variant)
        return
    if variant is not None:
        raise ValueError(f"--variant applies to diffusers folders; {path} is a single-file checkpoint")
    from .single_file import checkpoint_hashes, converted

    with converted(path, allow_pickle=allow_pickle, checkpoint_config=checkpoint_config, log=log) as (folder, note):
        model = load_model(folder, hash_files=False)
        model.origin, model.origin_note, model.hashes = path, note, checkpoint_hashes(path)
        model.stored_dtypes = {"checkpoint": safetensors_dtype([path]) if path.suffix == ".safetensors" else ""}
        yield model


def load_model(path: str | Path, *, allow_pickle: bool = False, variant: str | None = None, hash_files: bool = True) -> SourceModel:
    """Load text encoder, UNet and VAE in float32 eval mode from a local folder only.

    variant: the weight variant to load (save_pretrained's variant=, e.g. fp16); None picks the plain weights,
    or the only variant a component has. hash_files: compute the source hashes (the manifest's record of the inputs).
    """
    path = Path(path)
    weights = check_layout(path, allow_pickle, variant)
    check_checksums(path)
    import diffusers
    import torch
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    # their per-weight progress bars and dtype notes would drown the build's own report
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    def load(cls: Any, sub: str, **kw: Any) -> Any:
        w = weights[sub]
        try:
            m, info = cls.from_pretrained(
                path / sub, use_safetensors=w.safetensors, variant=w.variant, local_files_only=True, output_loading_info=True, **kw
            )
        except Exception as e:  # library errors vary by version; the user needs the file and the cause
            raise ModelError(f"could not load {path / sub}: {e}") from e
        check_loading_info(path, sub, w, m, info)
        return m.to(torch.float32).eval()

    texts = {sub: load(getattr(transformers, TEXT_CLASSES[sub]), sub, dtype=torch.float32) for sub in TEXT_CLASSES if sub in weights}
    unet = load(UNet2DConditionModel, "unet", torch_dtype=torch.float32)
    vae = load(AutoencoderKL, "vae", torch_dtype=torch.float32)
    sched = read_scheduler(path / "scheduler")
    index = read_json_object(path / "model_index.json")
    family = detect(path, index)
    for sub in family.text_components(index):
        tok = path / sub
        has_bpe_files = all((tok / f).is_file() for f in ("vocab.json", "merges.txt"))
        if sub.startswith("tokenizer") and not has_bpe_files and not (tok / "tokenizer.json").is_file():
            raise ModelError(f"{tok} has neither vocab.json + merges.txt nor tokenizer.json: the CLIP tokenizer is missing")
    low_res = path / "low_res_scheduler"
    omitted = omitted_components(index)
    model = SourceModel(
        family=family,
        path=path,
        text_encoder=texts.get("text_encoder"),
        text_encoder_2=texts.get("text_encoder_2"),
        unet=unet,
        vae=vae,
        scheduler_class=sched["class_name"],
        scheduler_config=sched["config"],
        tokenizer_dir=path / "tokenizer",
        hashes=source_hashes(path, weights, omitted) if hash_files else {},
        index=index,
        low_res_scheduler=read_scheduler(low_res) if low_res.is_dir() else None,
        weights=weights,
        stored_dtypes={c: stored_dtype(path, w) for c, w in weights.items()},
        omitted=omitted,
    )
    model.pipelines  # noqa: B018 - a family's configs that disagree (SDXL's time ids) are refused here, before the export
    if model.unet.config.num_class_embeds and model.kind == "upscaler":
        model.upscale_settings()  # a broken upscaler is refused before the export, not after it
    return model


def check_loading_info(path: Path, component: str, weights: Weights, module: Any, info: dict[str, Any]) -> None:
    """Strict loading: every parameter the config builds comes from the weights, and every weight is used.

    transformers and diffusers initialise a missing layer randomly and drop an unused tensor with only a log line
    (which the verbosity setting above hides); the export would then verify the wrong module against itself.
    Non-persistent buffers (e.g. CLIP's position_ids) are not in the report, so they never trip this.
    """
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    mismatched = [str(k[0] if isinstance(k, (tuple, list)) else k) for k in info.get("mismatched_keys") or ()]
    if not (missing or unexpected or mismatched):
        return
    # the libraries report keys relative to the base model (CLIP's "text_model." is dropped): name them as stored
    expected = list(module.state_dict())
    stored = stored_keys(path, weights)
    problems = []
    for what, keys, names in (
        ("missing from the weights (the config builds them)", missing, expected),
        ("in the weights but not in the config's model", unexpected, stored),
        ("of another shape than the config's", mismatched, expected),
    ):
        if keys:
            full = [full_key(k, names) for k in keys]
            more = f" and {len(full) - 3} more" if len(full) > 3 else ""
            problems.append(f"{len(full)} {'key' if len(full) == 1 else 'keys'} {what}: {', '.join(full[:3])}{more}")
    raise ModelError(
        f"{path / component}: its config.json does not match its weights ({weights.describe()}): {'; '.join(problems)}; "
        "export needs the exact model: fix the config or the weights"
    )


def stored_keys(path: Path, weights: Weights) -> list[str]:
    """The tensor names a component's safetensors hold (from the headers); [] for pickles."""
    if not weights.safetensors:
        return []
    from safetensors import safe_open

    names: list[str] = []
    for rel in weights.files:
        with safe_open(str(path / rel), framework="np") as f:
            names.extend(f.keys())
    return names


def full_key(key: str, names: list[str]) -> str:
    """`key` as `names` spell it (with the prefix the loader stripped), or as given where none matches."""
    if key in names:
        return key
    return next((n for n in names if n.endswith("." + key)), key)


def read_scheduler(folder: Path) -> dict[str, Any]:
    """A scheduler_config.json as {"class_name", "config"}, the config without diffusers' private keys."""
    f = folder / "scheduler_config.json"
    if not f.is_file():
        raise ModelError(f"{f} is missing; the model folder is incomplete")
    raw = read_json_object(f)
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
