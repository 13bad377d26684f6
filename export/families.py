"""Model families on the export side: which text encoders a folder has and how their output reaches the UNet.

The counterpart of runtime.families: a bundle's `model.family` names the runtime module that
reads what the family here exported. One family today, `sd` (SD 1.x/2.x and the UNets built on
them: inpainting, x4 upscaler, LCM, Turbo); a folder of another family is refused by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from runtime.manifest import TensorSpec

from .errors import ModelError, read_json_object
from .onnx_export import ComponentSpec, wrap

# cross_attention_dim -> the checkpoint architecture it belongs to; the reference model and others are "custom"
ARCHITECTURES = {768: "sd1", 1024: "sd2"}
# Pipelines of families this SDK does not export yet, with what sets them apart
OTHER_FAMILIES = {
    "StableDiffusionXL": "SDXL (two text encoders, pooled text_embeds and time_ids UNet inputs)",
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


def detect(path: Path, index: dict[str, Any] | None = None) -> ExportFamily:
    """The family of a diffusers folder, from its pipeline class (model_index.json, read here unless given) and
    components; another family is refused by name."""
    index = read_json_object(path / "model_index.json") if index is None else index
    pipeline = str(index.get("_class_name", ""))
    for prefix, what in OTHER_FAMILIES.items():
        if pipeline.startswith(prefix):
            raise_other(path, pipeline, what)
    if (path / "text_encoder_2").is_dir():
        raise_other(path, pipeline or "a pipeline with text_encoder_2/", OTHER_FAMILIES["StableDiffusionXL"])
    return StableDiffusion()


def raise_other(path: Path, pipeline: str, what: str) -> None:
    raise ModelError(
        f"{path} is a {pipeline} folder: {what}. This SDK version exports the Stable Diffusion 1.x/2.x family "
        "(with its inpainting, upscaler, LCM and Turbo variants) only; nothing was written"
    )
