"""The manifest of an ONNX bundle exported from a diffusers model (the TensorRT one: export.tensorrt.from_onnx)."""

from __future__ import annotations

from pathlib import Path

from runtime.bundle import (
    Component,
    GuidanceInfo,
    LoraInfo,
    Manifest,
    ModelInfo,
    SchedulerInfo,
    TokenizerInfo,
    UpscaleInfo,
    VaeInfo,
)

from .families import StableDiffusionXL
from .model import SourceModel
from .staging import now
from .textual_inversion import parse_spec


def manifest_for(
    model: SourceModel,
    components: dict[str, Component],
    *,
    height: int,
    width: int,
    batch: int,
    precision: str,
    backend: str,
    guidance: str,
    pipelines: tuple[str, ...] = ("txt2img",),
    lora: LoraInfo | None = None,
    command: tuple[str, ...] = (),
    prompt_chunks: int = 1,
    textual_inversion: tuple[str, ...] = (),
) -> Manifest:
    """Everything the runtime needs to drive the exported components, from the model folder's own configs."""
    upscale = None
    if model.kind == "upscaler":
        settings = model.upscale_settings()
        upscale = UpscaleInfo(int(settings["max_noise_level"]), SchedulerInfo.from_json(settings["low_res_scheduler"]))
    return Manifest(
        created=now(),
        model=ModelInfo(
            name=model.name,
            kind=model.kind,
            family=model.family.name,
            architecture=model.family.architecture(model),
            prediction_type=model.scheduler_config.get("prediction_type", "epsilon"),
            source=str(model.source),
            source_hashes=model.hashes,
            omitted=model.omitted,
        ),
        pipelines=tuple(pipelines),
        scheduler=SchedulerInfo(model.scheduler_class, model.scheduler_config),
        vae=VaeInfo(float(model.vae.config.scaling_factor), int(model.vae.config.latent_channels), model.vae_factor),
        height=height,
        width=width,
        batch_size=batch,
        guidance_info=GuidanceInfo(
            guidance,
            2 * batch if guidance == "cfg" else batch,
            int(model.unet.config.time_cond_proj_dim) if guidance == "embedded" else None,
        ),
        tokenizer=TokenizerInfo(
            next(iter(model.family.tokenizers(model))), model.family.max_length(model), prompt_chunks,
            tuple(str(Path(p).resolve()) + (f":{t}" if t else "") for p, t in map(parse_spec, textual_inversion)),
        ),  # fmt: skip
        backend=backend,
        precision=precision,
        components=components,
        upscale=upscale,
        lora=lora,
        sdxl=model.family.info(model) if isinstance(model.family, StableDiffusionXL) else None,
        command=command,
    )
