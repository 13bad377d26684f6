"""Tiny LoRA adapters for the tiny SD models, written in the two layouts model sites and diffusers use.

Random low-rank matrices for a chosen set of the model's layers (attention projections, feed-forward, proj_in/out as
1x1 convolutions, the text encoder's attention and MLP), saved with safetensors:
- `peft`: diffusers' save_lora_weights layout: `unet.<module>.lora_A.weight` / `lora_B.weight`,
  `text_encoder.text_model.<module>...`, alpha in the `lora_adapter_metadata` header entry (peft's lora_alpha);
- `kohya`: `lora_unet_<module_with_underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`, `lora_te_text_model_...`.
The same arguments give the same numbers in either layout, so a peft file can stand for its kohya twin where
diffusers cannot load the kohya one (its kohya text-encoder conversion fails with this diffusers/transformers pair).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

LAYOUTS = ("peft", "kohya")


@functools.lru_cache(maxsize=4)
def _layers(model_dir: Path) -> dict[str, dict[str, tuple[str, int, int]]]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from export.lora import layers_of

    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    te = CLIPTextModel.from_pretrained(model_dir / "text_encoder")
    return {
        c: {n: (layer.kind, layer.in_features, layer.out_features) for n, layer in layers_of(m).items()}
        for c, m in (("unet", unet), ("text_encoder", te))
    }


def attention_layers(component: str, module: str) -> bool:
    """The slot scope: the UNet's attention blocks, the text encoder's transformer layers."""
    return ("attentions." in module) if component == "unet" else module.startswith("encoder.layers.")


def make_adapter(
    model_dir: Path,
    out: Path,
    *,
    layout: str = "peft",
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    select: Callable[[str, str], bool] = attention_layers,
    std: float = 0.15,
) -> Path:
    """Write a random adapter for the layers `select(component, module)` picks (Linear and 1x1 Conv2d only)."""
    rng = np.random.default_rng(seed)
    alpha = float(rank if alpha is None else alpha)
    tensors: dict[str, np.ndarray] = {}
    targets: dict[str, list[str]] = {"unet": [], "text_encoder": []}
    for component, layers in _layers(model_dir).items():
        for module, (kind, fin, fout) in sorted(layers.items()):
            if kind not in ("linear", "conv1x1") or not select(component, module):
                continue
            tail = (1, 1) if kind == "conv1x1" else ()
            down = (std * rng.standard_normal((rank, fin, *tail))).astype(np.float32)
            up = (std * rng.standard_normal((fout, rank, *tail))).astype(np.float32)
            tensors.update(_keys(layout, component, module, down, up, alpha))
            targets[component].append(module)
    return _save(out, tensors, layout, alpha, rank, targets)


def _keys(layout: str, component: str, module: str, down: np.ndarray, up: np.ndarray, alpha: float) -> dict[str, np.ndarray]:
    if layout == "peft":
        name = f"{component}.{'text_model.' if component == 'text_encoder' else ''}{module}"
        return {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}
    if layout == "kohya":
        prefix = "lora_unet_" if component == "unet" else "lora_te_text_model_"
        name = prefix + module.replace(".", "_")
        return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": np.array(alpha, dtype=np.float32)}
    raise ValueError(f"unknown layout {layout!r}; one of {LAYOUTS}")


def _save(out: Path, tensors: dict[str, np.ndarray], layout: str, alpha: float, rank: int, targets: dict[str, list[str]]) -> Path:
    from safetensors.numpy import save_file

    metadata = {"format": "pt"}
    if layout == "peft":  # as diffusers' save_lora_weights writes each component's peft LoraConfig (the fields that matter)
        config = {
            f"{c}.{k}": v
            for c, modules in targets.items() if modules
            for k, v in (("r", rank), ("lora_alpha", alpha), ("target_modules", sorted(modules)))
        }  # fmt: skip
        metadata["lora_adapter_metadata"] = json.dumps(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    return out
