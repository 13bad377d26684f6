"""LoRA at export: adapters fused into the torch weights, or low-rank slots exported as extra engine inputs.

Fused (`--lora FILE[:SCALE]`): W += scale * alpha / rank * up @ down on each targeted layer before the export,
as diffusers' load_lora_weights + fuse_lora do. Slotted (`--lora-slots RANK`): every slot target computes
W x + B (A x) with A and B read from stacked engine inputs (one A and one B input per component and layer shape:
`lora_a_<in>_<out>` (L, in, rank) holds A transposed, `lora_b_<in>_<out>` (L, rank, out) B transposed, so a Linear's
update is two plain matmuls, x @ a @ b, and a 1x1 conv's needs no transpose of its activations), so the runtime
switches adapters by feeding other matrices (zeros: the base model), never touching the weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from runtime.bundle import LoraAdapter, LoraInfo, LoraTarget, TensorSpec
from runtime.lora import Adapter, Layer, Layers, LoraError, parse_spec, read_adapter

from .onnx_export import ComponentSpec
from .staging import Log

# The layers that get slots: the UNet's attention blocks (attention projections, feed-forward, proj_in/proj_out) and
# the text encoder's transformer layers: what kohya, diffusers' training scripts and model-site adapters train.
SLOT_SCOPES = {"unet": ("attentions.",), "text_encoder": ("encoder.layers.",)}
MAX_SLOT_RANK = 256


def layers_of(module: Any) -> dict[str, Layer]:
    """Every Linear and Conv2d of a torch module, by name, with its kind (linear, conv1x1, or `KxK Conv2d`)."""
    import torch

    out: dict[str, Layer] = {}
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear):
            out[name] = Layer("linear", m.in_features, m.out_features)
        elif isinstance(m, torch.nn.Conv2d):
            k = tuple(m.kernel_size)
            kind = "conv1x1" if k == (1, 1) and m.groups == 1 else f"{k[0]}x{k[1]} Conv2d"
            out[name] = Layer(kind, m.in_channels, m.out_channels)
    return out


def model_layers(model: Any) -> dict[str, dict[str, Layer]]:
    """The layers an adapter may target, per component; an SDXL refiner has no first text encoder, so none there."""
    roots = {"unet": model.unet, "text_encoder": model.text_encoder}
    return {name: layers_of(module) if module is not None else {} for name, module in roots.items()}


def read_adapters(model: Any, specs: Sequence[str]) -> list[tuple[Adapter, float]]:
    """The `--lora FILE[:SCALE]` adapters, each checked against the model's layers."""
    layers = model_layers(model)
    out = []
    for spec in specs:
        path, scale = parse_spec(spec)
        out.append((read_adapter(path, layers, where=f"the model {model.source}"), scale))
    return out


def records(adapters: Sequence[tuple[Adapter, float]]) -> tuple[LoraAdapter, ...]:
    """The manifest's record of fused adapters: file, sha256, scale."""
    return tuple(LoraAdapter(str(a.path), a.sha256, float(s)) for a, s in adapters)


def fuse(model: Any, adapters: Sequence[tuple[Adapter, float]], log: Log) -> None:
    """Add each adapter's scaled update into the model's weights (in place)."""
    import torch

    roots = {"unet": model.unet, "text_encoder": model.text_encoder}
    with torch.no_grad():
        for adapter, scale in adapters:
            for u in adapter.updates:
                weight = roots[u.component].get_submodule(u.module).weight
                delta = torch.from_numpy(u.delta(scale)).reshape(weight.shape)
                weight += delta.to(weight.dtype)
            parts = sorted({u.component for u in adapter.updates})
            log(f"  LoRA {adapter.name} fused at scale {scale:g}: {len(adapter.updates)} layers of {', '.join(parts)}, rank {adapter.rank}")


def slot_targets(model: Any, rank: int) -> tuple[LoraTarget, ...]:
    """The slot layers (SLOT_SCOPES, Linear and 1x1 Conv2d), each given its stacked inputs and row in them."""
    if not 1 <= rank <= MAX_SLOT_RANK:
        raise ValueError(f"--lora-slots {rank}: the slot rank must be 1..{MAX_SLOT_RANK}")
    targets: list[LoraTarget] = []
    for component, layers in model_layers(model).items():
        rows: dict[tuple[int, int], int] = {}
        for module, layer in layers.items():
            if layer.kind not in ("linear", "conv1x1") or not any(scope in module for scope in SLOT_SCOPES[component]):
                continue
            shape = (layer.in_features, layer.out_features)
            index = rows.get(shape, 0)
            rows[shape] = index + 1
            a, b = f"lora_a_{shape[0]}_{shape[1]}", f"lora_b_{shape[0]}_{shape[1]}"
            targets.append(LoraTarget(component, module, layer.kind, *shape, a, b, index))
    return tuple(targets)


def slot_inputs(targets: Sequence[LoraTarget], component: str, rank: int) -> tuple[TensorSpec, ...]:
    """The stacked A and B inputs one component takes, in the order of their first target."""
    count: dict[str, int] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for t in targets:
        if t.component != component:
            continue
        count[t.a] = count[t.b] = max(count.get(t.a, 0), t.index + 1)
        shapes[t.a], shapes[t.b] = (t.in_features, rank), (rank, t.out_features)
    return tuple(TensorSpec(name, (count[name], *shapes[name]), "float32") for name in shapes)


def with_slots(spec: ComponentSpec, root: Any, targets: Sequence[LoraTarget], rank: int) -> ComponentSpec:
    """The component with its slot inputs after its own: each target layer's output gains B (A x) by a forward hook.

    root: the torch module the targets' names are relative to (model.unet, model.text_encoder).
    """
    import torch

    mine = [t for t in targets if t.component == spec.name]
    extra = slot_inputs(targets, spec.name, rank)
    if not mine:
        return spec
    fed: dict[str, Any] = {}  # the slot tensors of the call in progress; empty outside one (hooks then add nothing)

    def hook_for(t: LoraTarget) -> Any:
        def hook(_m: Any, args: Any, out: Any) -> Any:
            if not fed:
                return out
            a, b = fed[t.a][t.index], fed[t.b][t.index]  # A^T (in, rank), B^T (rank, out)
            x = args[0]
            if t.kind == "conv1x1":  # on (N, C, H*W): the small matrices are transposed, never the activations
                low = torch.matmul(a.t(), torch.flatten(x, 2))
                return out + torch.matmul(b.t(), low).reshape(out.shape)
            return out + torch.matmul(torch.matmul(x, a), b)

        return hook

    for t in mine:
        root.get_submodule(t.module).register_forward_hook(hook_for(t))
    base, count = spec.module, len(spec.inputs)

    class Slotted(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = base

        def forward(self, *args: Any) -> Any:
            fed.update(zip((s.name for s in extra), args[count:]))
            try:
                return self.inner(*args[:count])
            finally:
                fed.clear()

    return replace(spec, module=Slotted().eval(), inputs=(*spec.inputs, *extra))


def lora_info(fused: tuple[LoraAdapter, ...], rank: int, targets: tuple[LoraTarget, ...]) -> LoraInfo | None:
    return LoraInfo(fused, rank, targets) if fused or rank else None


def suffix(info: LoraInfo | None) -> str:
    """The default bundle name's part for LoRA: -lora-<sha256 of the fused adapters and scales> and/or -slots<R>."""
    if info is None:
        return ""
    import hashlib

    out = ""
    if info.fused:
        digest = hashlib.sha256(";".join(f"{a.sha256}:{a.scale!r}" for a in info.fused).encode()).hexdigest()[:8]
        out += f"-lora-{digest}"
    if info.slot_rank:
        out += f"-slots{info.slot_rank}"
    return out


__all__ = ["LoraError", "Layers", "fuse", "lora_info", "read_adapters", "records", "slot_targets", "suffix", "with_slots"]
