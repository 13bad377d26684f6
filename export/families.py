"""Model families on the export side: which text encoders a folder has and how their output reaches the UNet.

The counterpart of runtime.families: a bundle's `model.family` names the runtime module that
reads what the family here exported. Two families: `sd` (SD 1.x/2.x and the UNets built on
them: inpainting, x4 upscaler, LCM, Turbo) and `sdxl` (SDXL base, SDXL-Turbo, the refiner);
a folder of another family is refused by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from runtime.bundle import SdxlInfo, TensorSpec, TextEncoderInfo

from .errors import ModelError, read_json_object
from .onnx_export import ComponentSpec, wrap

# cross_attention_dim -> the checkpoint architecture it belongs to; the reference model and others are "custom"
ARCHITECTURES = {768: "sd1", 1024: "sd2"}
SDXL_ARCHITECTURES = {2048: "sdxl", 1280: "sdxl-refiner"}
# The SDXL pipelines this SDK exports; other StableDiffusionXL* pipelines (ControlNet, adapters, instruct-pix2pix) are refused
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
# Pipelines of families this SDK does not export yet, with what sets them apart
OTHER_FAMILIES = {
    "StableDiffusion3": "SD3 (an MMDiT transformer, three text encoders)",
    "Flux": "FLUX (a flow transformer)",
    "PixArt": "PixArt (a DiT with a T5 text encoder)",
}


class ExportFamily(Protocol):
    name: str

    def architecture(self, model: Any) -> str: ...

    def text_specs(self, model: Any, rows: int) -> list[ComponentSpec]:
        """The text encoder components, each with `rows` prompts per call (2B with classifier-free guidance)."""
        ...

    def unet_text_inputs(self, model: Any, rows: int) -> tuple[TensorSpec, ...]:
        """The UNet inputs that carry the prompts, after sample and timestep."""
        ...

    def text_components(self, index: dict[str, Any]) -> tuple[str, ...]:
        """The text encoder and tokenizer folders a model of this family has, from its model_index.json."""
        ...

    def tokenizers(self, model: Any) -> dict[str, Any]:
        """Bundle folder -> the model's tokenizer folder to copy there; the first is the manifest's `tokenizer`."""
        ...

    def max_length(self, model: Any) -> int:
        """The first tokenizer's context, for the manifest's `tokenizer` record."""
        ...

    def precision_note(self, model: Any, component: str) -> str:
        """Why a component must stay fp32 whatever its measured activations say ("" when nothing does)."""
        ...

    def pipelines(self, model: Any, kind_pipelines: tuple[str, ...]) -> tuple[str, ...]:
        """What the model can run, from what its UNet's kind allows."""
        ...


class StableDiffusion:
    """One CLIP text encoder; its last hidden state is the UNet's encoder_hidden_states."""

    name = "sd"

    def architecture(self, model: Any) -> str:
        return ARCHITECTURES.get(model.unet.config.cross_attention_dim, "custom")

    def text_specs(self, model: Any, rows: int) -> list[ComponentSpec]:
        te = model.text_encoder
        seq, dim = te.config.max_position_embeddings, te.config.hidden_size
        return [
            ComponentSpec(
                "text_encoder",
                wrap(te, lambda m, ids: m(ids, return_dict=False)[:2]),
                (TensorSpec("input_ids", (rows, seq), "int32"),),
                (TensorSpec("last_hidden_state", (rows, seq, dim), "float32"), TensorSpec("pooler_output", (rows, dim), "float32")),
            )
        ]

    def unet_text_inputs(self, model: Any, rows: int) -> tuple[TensorSpec, ...]:
        seq = model.text_encoder.config.max_position_embeddings
        return (TensorSpec("encoder_hidden_states", (rows, seq, model.unet.config.cross_attention_dim), "float32"),)

    def text_components(self, index: dict[str, Any]) -> tuple[str, ...]:
        return ("text_encoder", "tokenizer")

    def tokenizers(self, model: Any) -> dict[str, Any]:
        return {"tokenizer": model.tokenizer_dir}

    def max_length(self, model: Any) -> int:
        return int(model.text_encoder.config.max_position_embeddings)

    def precision_note(self, model: Any, component: str) -> str:
        return ""

    def pipelines(self, model: Any, kind_pipelines: tuple[str, ...]) -> tuple[str, ...]:
        return kind_pipelines


class StableDiffusionXL:
    """SDXL: text_encoder (CLIP ViT-L, absent from the refiner) and text_encoder_2 (OpenCLIP bigG, with projection).

    Each encoder's penultimate hidden state is exported; the runtime concatenates them (text_encoder first) into
    the UNet's encoder_hidden_states, as diffusers' encode_prompt. text_encoder_2 also gives the pooled projection,
    the UNet's `text_embeds`; `time_ids` carry the size and crop micro-conditioning (and the refiner's aesthetic score).
    """

    name = "sdxl"

    def architecture(self, model: Any) -> str:
        return SDXL_ARCHITECTURES.get(model.unet.config.cross_attention_dim, "custom")

    def encoders(self, model: Any) -> list[tuple[str, Any]]:
        return [(n, m) for n, m in (("text_encoder", model.text_encoder), ("text_encoder_2", model.text_encoder_2)) if m is not None]

    def text_specs(self, model: Any, rows: int) -> list[ComponentSpec]:
        specs = []
        for name, te in self.encoders(model):
            seq, dim = te.config.max_position_embeddings, te.config.hidden_size
            outputs: tuple[TensorSpec, ...] = (TensorSpec("penultimate_hidden_state", (rows, seq, dim), "float32"),)
            if name == "text_encoder_2":  # the pooled projection first, named as Optimum's SDXL exports name it
                outputs = (TensorSpec("text_embeds", (rows, te.config.projection_dim), "float32"), *outputs)
            module = wrap(te, _penultimate_with_projection if name == "text_encoder_2" else _penultimate)
            specs.append(ComponentSpec(name, module, (TensorSpec("input_ids", (rows, seq), "int32"),), outputs))
        return specs

    def unet_text_inputs(self, model: Any, rows: int) -> tuple[TensorSpec, ...]:
        info = self.info(model)
        seq = model.text_encoder_2.config.max_position_embeddings
        return (
            TensorSpec("encoder_hidden_states", (rows, seq, model.unet.config.cross_attention_dim), "float32"),
            TensorSpec("text_embeds", (rows, info.pooled_dim), "float32"),
            TensorSpec("time_ids", (rows, info.time_ids), "float32"),
        )

    def text_components(self, index: dict[str, Any]) -> tuple[str, ...]:
        listed = index.get("text_encoder")
        first = isinstance(listed, list) and len(listed) == 2 and listed[0] is not None  # the refiner lists [null, null]
        return ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2") if first else ("text_encoder_2", "tokenizer_2")

    def tokenizers(self, model: Any) -> dict[str, Any]:
        names = ["tokenizer"] if model.text_encoder is not None else []
        return {n: model.path / n for n in (*names, "tokenizer_2")}

    def max_length(self, model: Any) -> int:
        return int(self.encoders(model)[0][1].config.max_position_embeddings)

    def precision_note(self, model: Any, component: str) -> str:
        if component.startswith("vae") and getattr(model.vae.config, "force_upcast", False):
            return (
                "kept fp32: the VAE config sets force_upcast (SDXL's VAE overflows fp16 into NaN/black images; "
                "diffusers upcasts it too). A VAE fixed for fp16 (force_upcast false) is exported in fp16 where its activations fit"
            )
        return ""

    def pipelines(self, model: Any, kind_pipelines: tuple[str, ...]) -> tuple[str, ...]:
        if self.info(model).requires_aesthetics_score:  # the refiner continues from an image or latents, never from text alone
            return tuple(p for p in kind_pipelines if p != "txt2img")
        return kind_pipelines

    def info(self, model: Any) -> SdxlInfo:
        """The manifest's sdxl section, from the folder's configs; a UNet the encoders cannot condition is refused."""
        te2 = model.text_encoder_2
        unet = model.unet.config
        pooled = int(te2.config.projection_dim)
        per_id = int(unet.addition_time_embed_dim or 0)
        width = int(unet.projection_class_embeddings_input_dim or 0)
        aesthetic = bool(model.index.get("requires_aesthetics_score", False))
        if per_id <= 0 or (width - pooled) % per_id or (width - pooled) // per_id != (5 if aesthetic else 6):
            expected = (
                "5 (original_size, crops_coords_top_left, aesthetic_score)"
                if aesthetic
                else "6 (original_size, crops_coords_top_left, target_size)"
            )
            raise ModelError(
                f"{model.path / 'unet' / 'config.json'}: projection_class_embeddings_input_dim {width} does not fit "
                f"text_encoder_2's projection_dim {pooled} plus {expected} time ids of addition_time_embed_dim {per_id} "
                f"(model_index.json requires_aesthetics_score is {str(aesthetic).lower()}); the folder's configs disagree"
            )
        context = sum(int(m.config.hidden_size) for _, m in self.encoders(model))
        if context != unet.cross_attention_dim:
            raise ModelError(
                f"{model.path}: the text encoders' hidden sizes add up to {context} but the UNet's cross_attention_dim is "
                f"{unet.cross_attention_dim}; the folder mixes parts of different models"
            )
        encoders = tuple(
            TextEncoderInfo(
                name,
                "tokenizer" if name == "text_encoder" else "tokenizer_2",
                int(m.config.max_position_embeddings),
                pad_token(model.path / ("tokenizer" if name == "text_encoder" else "tokenizer_2")),
            )
            for name, m in self.encoders(model)
        )
        return SdxlInfo(
            encoders, pooled, (width - pooled) // per_id, per_id, aesthetic, bool(model.index.get("force_zeros_for_empty_prompt", True))
        )


def _penultimate(m: Any, ids: Any) -> Any:
    """CLIPTextModel -> its penultimate hidden state (SDXL conditions on it, not on the last one)."""
    return m(ids, output_hidden_states=True).hidden_states[-2]


def _penultimate_with_projection(m: Any, ids: Any) -> Any:
    """CLIPTextModelWithProjection -> (pooled projection, penultimate hidden state)."""
    out = m(ids, output_hidden_states=True)
    return out.text_embeds, out.hidden_states[-2]


def pad_token(folder: Path) -> str:
    """The pad token a tokenizer folder declares (CLIP's default <|endoftext|> where it names none)."""
    config = read_json_object(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    pad = config.get("pad_token", "<|endoftext|>")
    return str(pad.get("content", "") if isinstance(pad, dict) else pad)


def detect(path: Path, index: dict[str, Any] | None = None) -> ExportFamily:
    """The family of a diffusers folder, from its pipeline class (model_index.json, read here unless given) and
    components; another family is refused by name."""
    index = read_json_object(path / "model_index.json") if index is None else index
    pipeline = str(index.get("_class_name", ""))
    if pipeline in SDXL_PIPELINES:
        return StableDiffusionXL()
    if pipeline.startswith("StableDiffusionXL"):
        raise_other(path, pipeline, f"an SDXL variant this SDK does not export (it exports {', '.join(SDXL_PIPELINES)})")
    for prefix, what in OTHER_FAMILIES.items():
        if pipeline.startswith(prefix):
            raise_other(path, pipeline, what)
    if (path / "text_encoder_2").is_dir():
        raise ModelError(
            f"{path} has text_encoder_2/ but model_index.json names {pipeline or 'no pipeline class'}: an SDXL folder names "
            f"one of {', '.join(SDXL_PIPELINES)}; fix its _class_name"
        )
    return StableDiffusion()


def raise_other(path: Path, pipeline: str, what: str) -> None:
    raise ModelError(
        f"{path} is a {pipeline} folder: {what}. This SDK version exports the Stable Diffusion 1.x/2.x family "
        "(with its inpainting, upscaler, LCM and Turbo variants) and SDXL (base, Turbo, refiner) only; nothing was written"
    )
