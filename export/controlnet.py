"""ControlNets (Zhang et al. 2023, arXiv:2302.05543) as bundle components, and the UNet that takes their residuals.

Each `--controlnet FOLDER` (a diffusers ControlNetModel) becomes a component `controlnet_<i>` with the UNet's
static shapes and CFG batch: inputs sample, timestep, the UNet's text inputs (SDXL: text_embeds, time_ids too),
controlnet_cond (the control image, [0, 1]) and conditioning_scale (one factor per residual, so diffusers' guess
mode, with its per-block scales, is a feed and not another engine); outputs the down-block and mid-block
residuals, named as the UNet's inputs that take them. Several nets' residuals are summed by the runtime, as
diffusers' MultiControlNetModel sums them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.bundle import TensorSpec, sha256_file

from .errors import ModelError, read_json_object
from .model import component_weights
from .onnx_export import DOWN_RESIDUAL, MID_RESIDUAL, ComponentSpec, wrap

COMPONENT = "controlnet_{}"
# Config keys a ControlNet must share with the UNet it steers: its residuals are added to that UNet's skips
MATCHING = ("block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim", "addition_embed_type")


@dataclass(frozen=True)
class ControlNet:
    """One loaded ControlNet: where it came from and its torch module (float32, eval)."""

    path: Path
    module: Any
    hashes: dict[str, str]

    def record(self) -> dict[str, Any]:
        """What the manifest keeps of the source (the component's build record): folder and file hashes."""
        pooled = bool(getattr(self.module.config, "global_pool_conditions", False))
        return {"source": str(self.path.resolve()), "source_hashes": self.hashes, "global_pool_conditions": pooled}


def load_controlnets(paths: tuple[str, ...], unet: Any, vae_factor: int, allow_pickle: bool = False) -> list[ControlNet]:
    """Load and check every --controlnet folder against the model it will steer; refuse by message what cannot fit."""
    nets = []
    for given in paths:
        path = Path(given)
        config = path / "config.json"
        if not config.is_file():
            raise ModelError(f"--controlnet {given}: {config} not found; pass a diffusers ControlNetModel folder (save_pretrained)")
        settings = read_json_object(config)
        cls = settings.get("_class_name")
        if cls != "ControlNetModel":
            raise ModelError(
                f"--controlnet {given}: its config names {cls!r}, not ControlNetModel; pass a diffusers ControlNetModel folder"
            )
        weights = component_weights(path.parent, path.name, allow_pickle, None)
        from diffusers import ControlNetModel

        check_fits(given, settings, unet.config, vae_factor)  # from its config: before any weight is read
        module = ControlNetModel.from_pretrained(str(path), use_safetensors=weights.safetensors).float().eval()
        hashes = {f.name: sha256_file(f) for f in sorted(path.iterdir()) if f.is_file() and f.suffix in (".json", ".safetensors")}
        nets.append(ControlNet(path, module, hashes))
    return nets


def check_fits(given: str, net: dict[str, Any], unet: Any, vae_factor: int) -> None:
    """A ControlNet built for another UNet (SD 1.5's on SDXL, ...) is refused naming the setting that differs.

    net: its config.json; unet: the model's UNet config."""
    for key in MATCHING:
        ours, theirs = getattr(unet, key, None), net.get(key)
        if (list(ours) if isinstance(ours, (list, tuple)) else ours) != (list(theirs) if isinstance(theirs, (list, tuple)) else theirs):
            raise ModelError(
                f"--controlnet {given} was made for another UNet: its {key} is {theirs!r}, the model's UNet has {ours!r}; "
                "pass a ControlNet trained for this model (or its base model)"
            )
    factor = 2 ** (len(net.get("conditioning_embedding_out_channels", (16, 32, 96, 256))) - 1)  # diffusers' default
    if factor != vae_factor:
        raise ModelError(
            f"--controlnet {given} downsamples its control image by {factor}, but the model's VAE by {vae_factor}: "
            "its residuals would not match the latents; pass a ControlNet made for this model"
        )


def residual_specs(net: ControlNet, rows: int, h: int, w: int) -> tuple[TensorSpec, ...]:
    """The residuals' static shapes at `rows` x latent h x w, read off one batch-1 forward (every net shares them: check_fits)."""
    import torch

    cfg = net.module.config
    f = 2 ** (len(cfg.conditioning_embedding_out_channels) - 1)
    extra = {}
    if cfg.addition_embed_type == "text_time":
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(1, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim),
            "time_ids": torch.zeros(1, 6),
        }
    with torch.no_grad():
        down, mid = net.module(
            torch.zeros(1, cfg.in_channels, h, w), torch.zeros(1), encoder_hidden_states=torch.zeros(1, 1, cfg.cross_attention_dim),
            controlnet_cond=torch.zeros(1, cfg.conditioning_channels, h * f, w * f), return_dict=False, **extra,
        )  # fmt: skip
    return (
        *(TensorSpec(DOWN_RESIDUAL.format(i), (rows, *d.shape[1:]), "float32") for i, d in enumerate(down)),
        TensorSpec(MID_RESIDUAL, (rows, *mid.shape[1:]), "float32"),
    )


def controlnet_spec(
    index: int, net: ControlNet, unet_spec: ComponentSpec, residuals: tuple[TensorSpec, ...], vae_factor: int
) -> ComponentSpec:
    """One ControlNet with the UNet's batch and text inputs; its outputs are the UNet's residual inputs."""
    cfg = net.module.config
    by_name = {t.name: t for t in unet_spec.inputs}
    b, _, h, w = by_name["sample"].shape
    text = [by_name[n] for n in ("encoder_hidden_states", "text_embeds", "time_ids") if n in by_name]
    inputs = (
        TensorSpec("sample", (b, cfg.in_channels, h, w), "float32"),
        by_name["timestep"],
        *text,
        TensorSpec("controlnet_cond", (b, cfg.conditioning_channels, h * vae_factor, w * vae_factor), "float32"),
        TensorSpec("conditioning_scale", (len(residuals),), "float32"),
    )
    keywords = [t.name for t in text]

    def forward(m: Any, x: Any, t: Any, *more: Any) -> Any:
        *conditions, cond, scale = more
        given = dict(zip(keywords, conditions))
        added = {k: given.pop(k) for k in ("text_embeds", "time_ids") if k in given}
        down, mid = m(
            x, t, **given, controlnet_cond=cond, return_dict=False, **({"added_cond_kwargs": added} if added else {})
        )
        return (*(d * scale[i] for i, d in enumerate(down)), mid * scale[-1])

    return ComponentSpec(COMPONENT.format(index), wrap(net.module, forward), inputs, residuals)
