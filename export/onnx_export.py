"""Per-component ONNX export with static shapes, external data past 2 GB, and the fp16 step.

I/O names follow the wider ONNX ecosystem (Optimum's Stable Diffusion exports), so other
tools can open the files.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.bundle import TensorSpec

OPSET = 17
# UNet inputs diffusers' UNet2DConditionModel takes inside `added_cond_kwargs` (SDXL's pooled text and micro-conditioning)
ADDED_CONDITIONS = ("text_embeds", "time_ids")
# The UNet inputs that take ControlNet residuals (export.controlnet), as diffusers' down/mid_block_additional_residual(s)
DOWN_RESIDUAL = "down_block_residual_{}"
MID_RESIDUAL = "mid_block_residual"
PROTOBUF_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class ComponentSpec:
    """What to export: a torch callable and its static I/O."""

    name: str
    module: Any  # torch.nn.Module
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    latent_scale: float | None = None  # the scaling factor its latent input is divided by, where not the model VAE's


def wrap(module: Any, fn: Callable[..., Any]) -> Any:
    """A module whose forward is fn(module, *inputs): positional I/O for the exporter, weights registered."""
    import torch

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, *args: Any) -> Any:
            return fn(self.inner, *args)

    return Wrapper().eval()


def component_specs(
    model: Any, *, height: int, width: int, batch: int, guidance: str = "cfg", chunks: int = 1, residuals: tuple[TensorSpec, ...] = ()
) -> list[ComponentSpec]:
    """The four components with the bundle's static shapes (CFG: batch 2B for text encoder and UNet).

    height, width: the output image's; the UNet works at 1/f of it, as does the upscaler's input image.
    chunks: prompt chunks the UNet's context takes; past one, its length is an ONNX dynamic axis in whole chunks
    (the TensorRT build gives it a profile), so a prompt of fewer chunks runs at its own length.
    residuals: ControlNet residual inputs for the UNet (export.controlnet), none without ControlNets.
    """
    unet, vae = model.unet, model.vae
    f = model.vae_factor
    h, w, c = height // f, width // f, unet.config.in_channels
    lc = vae.config.latent_channels
    b2 = 2 * batch if guidance == "cfg" else batch
    text = tuple(chunked(t, chunks) for t in model.family.unet_text_inputs(model, b2))  # the family's business
    unet_inputs: tuple[TensorSpec, ...] = (TensorSpec("sample", (b2, c, h, w), "float32"), TensorSpec("timestep", (b2,), "float32"), *text)
    conditioning: tuple[TensorSpec, ...] = ()
    if guidance == "embedded":  # LCM: the guidance scale enters as an embedding, no second batch half
        conditioning += (TensorSpec("timestep_cond", (b2, unet.config.time_cond_proj_dim), "float32"),)
    if model.kind == "upscaler":  # the noise level added to the low-resolution image, as diffusers feeds it (torch.long)
        conditioning += (TensorSpec("class_labels", (b2,), "int64"),)
    unet_inputs += (*conditioning, *residuals)
    keywords = [t.name for t in (*text, *conditioning, *residuals)]

    def unet_fn(m: Any, x: Any, t: Any, *more: Any) -> Any:
        given = dict(zip(keywords, more))
        added = {k: given.pop(k) for k in ADDED_CONDITIONS if k in given}  # SDXL's, which diffusers takes as one dict
        control = residual_keywords(given)
        return m(x, t, **given, **control, **({"added_cond_kwargs": added} if added else {}), return_dict=False)[0]

    denoiser = ComponentSpec(
        "unet", wrap(unet, unet_fn), unet_inputs, (TensorSpec("out_sample", (b2, unet.config.out_channels, h, w), "float32"),)
    )
    decoder = ComponentSpec(
        "vae_decoder",
        wrap(vae, lambda m, z: m.decode(z, return_dict=False)[0]),
        (TensorSpec("latent_sample", (batch, lc, h, w), "float32"),),
        (TensorSpec("sample", (batch, vae.config.out_channels, height, width), "float32"),),
    )
    encoder = ComponentSpec(
        "vae_encoder",
        # the posterior's mean and log-variance, so the runtime can sample it with its own noise
        wrap(vae, lambda m, x: m.encode(x, return_dict=False)[0].parameters),
        (TensorSpec("sample", (batch, vae.config.in_channels, height, width), "float32"),),
        (TensorSpec("latent_parameters", (batch, 2 * lc, h, w), "float32"),),
    )
    return [*model.family.text_specs(model, b2), denoiser, decoder, encoder]


def residual_keywords(given: dict[str, Any]) -> dict[str, Any]:
    """Take the ControlNet residual inputs out of a UNet call's keywords, as diffusers' UNet2DConditionModel takes them."""
    count = sum(1 for k in given if k.startswith(DOWN_RESIDUAL[:-2]))
    if not count:
        return {}
    down = tuple(given.pop(DOWN_RESIDUAL.format(i)) for i in range(count))
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": given.pop(MID_RESIDUAL)}


def chunked(t: TensorSpec, chunks: int) -> TensorSpec:
    """The UNet's context, taking up to `chunks` text-encoder contexts along its sequence axis."""
    if t.name != "encoder_hidden_states" or chunks == 1:
        return t
    seq = t.shape[1]
    return TensorSpec(t.name, (t.shape[0], seq * chunks, *t.shape[2:]), t.dtype, (0, seq, *(0 for _ in t.shape[2:])))


def torch_inputs(spec: ComponentSpec, arrays: dict[str, Any]) -> tuple[Any, ...]:
    import torch

    return tuple(torch.from_numpy(arrays[t.name]) for t in spec.inputs)


def export_onnx(spec: ComponentSpec, sample: dict[str, Any], out: Path) -> None:
    """torch -> ONNX at `out` (plus out.data where the model passes protobuf's 2 GB limit)."""
    import onnx
    import torch

    with tempfile.TemporaryDirectory(prefix=f"export-{spec.name}-") as tmp:
        raw = Path(tmp) / "model.onnx"
        # the tracer warns about every Python-level shape check in diffusers; static shapes make them moot
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                spec.module,
                torch_inputs(spec, sample),
                str(raw),
                dynamo=False,  # the TorchScript exporter: static graphs TensorRT's parser knows well
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                dynamic_axes={t.name: {a: f"{t.name}_{a}" for a, s in enumerate(t.steps) if s} for t in spec.inputs if t.steps} or None,
                opset_version=OPSET,
                do_constant_folding=True,
            )
        proto = onnx.load(str(raw), load_external_data=True)
        save_onnx(proto, out)


def export_onnx_as(spec: ComponentSpec, sample: dict[str, Any], out: Path, precision: str) -> None:
    """torch -> ONNX at `out` in `precision`: fp16 is exported in fp32 to a scratch folder, then converted.

    Either way the file written must pass onnx.checker's full check (InvalidOnnxError otherwise).
    """
    if precision != "fp16":
        export_onnx(spec, sample, out)
        check_onnx(out, spec.name)
        return
    with tempfile.TemporaryDirectory(prefix="fp32-") as tmp:
        fp32 = Path(tmp) / "model.onnx"
        export_onnx(spec, sample, fp32)
        convert_fp16(fp32, out)
    check_onnx(out, spec.name)


def export_onnx_half(spec: ComponentSpec, sample: dict[str, Any], out: Path) -> None:
    """torch -> fp16 ONNX at `out`, traced from the module cast to half precision in place (--low-memory).

    No fp32 ONNX is ever written or held: the torch weights halve before tracing, so an SDXL UNet's export holds
    5 GB of weights where the fp32 road holds 10 GB plus a 10 GB ONNX copy. The bundle's I/O stays float32 (the
    contract): the graph casts float inputs to fp16 on entry and its outputs back to float32. The module is left
    in half precision; the caller owns it (export.from_model frees it).
    """
    import torch

    inner = spec.module.half()

    class HalfIO(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: Any) -> Any:
            out = self.inner(*(a.half() if a.is_floating_point() else a for a in args))
            return tuple(o.float() for o in out) if isinstance(out, (tuple, list)) else out.float()

    handles = _fp32_layer_norms(inner)
    try:
        export_onnx(ComponentSpec(spec.name, HalfIO().eval(), spec.inputs, spec.outputs), sample, out)
    finally:
        for h in handles:
            h.remove()
    check_onnx(out, spec.name)


def _fp32_layer_norms(module: Any) -> list[Any]:
    """Keep LayerNorms fp32 inside a half module, casting around them; returns the hooks' handles.

    The TorchScript exporter's LayerNormalization upcasts a half input to float32 but not the half scale and bias,
    a graph onnx.checker rejects; fp32 normalisation is also what mixed precision does anyway.
    """
    import torch

    handles = []
    for m in module.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.float()
            handles.append(m.register_forward_pre_hook(lambda _m, args: tuple(a.float() for a in args)))
            handles.append(m.register_forward_hook(lambda _m, _args, out: out.half()))
    return handles


def save_onnx(proto: Any, out: Path) -> list[Path]:
    """Save as one file, or with external data past 2 GB; return the files written."""
    import onnx

    out.parent.mkdir(parents=True, exist_ok=True)
    size = sum(len(t.raw_data) for t in proto.graph.initializer)
    if size < PROTOBUF_LIMIT - (64 << 20):
        onnx.save_model(proto, str(out))
        return [out]
    data = out.with_name(out.name + ".data")
    onnx.save_model(proto, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
    return [out, data]


def convert_fp16(src: Path, dst: Path) -> None:
    """fp32 ONNX -> fp16 weights and compute, fp32 I/O kept so the contract does not change."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = onnx.load(str(src), load_external_data=True)
    half = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=True)
    _restore_fp32_resize_params(half)
    topological_sort(half.graph)  # the converter appends the fp32 -> fp16 input Casts after the nodes that read them
    save_onnx(half, dst)


def topological_sort(graph: Any) -> None:
    """Reorder graph.node in place so every node follows the nodes whose outputs it reads (ONNX requires it).

    Stable: among the nodes that are ready, the earliest in the old order goes first, so an already sorted
    graph is left as it was. Names a subgraph (If/Loop body) reads from the outer scope count as inputs.
    """
    import heapq

    nodes = list(graph.node)
    producer = {name: i for i, n in enumerate(nodes) for name in n.output if name}
    waits_on: list[set[int]] = []
    for n in nodes:
        names = set(n.input) | _outer_names(n)
        waits_on.append({producer[name] for name in names if name in producer})
    readers: dict[int, list[int]] = {}
    for i, deps in enumerate(waits_on):
        for d in deps:
            readers.setdefault(d, []).append(i)
    pending = [len(deps) for deps in waits_on]
    ready = [i for i, count in enumerate(pending) if count == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for r in readers.get(i, ()):
            pending[r] -= 1
            if pending[r] == 0:
                heapq.heappush(ready, r)
    if len(order) != len(nodes):
        raise InvalidOnnxError(f"the graph has a cycle through {len(nodes) - len(order)} nodes; it cannot be sorted")
    if order != list(range(len(nodes))):
        del graph.node[:]
        graph.node.extend(nodes[i] for i in order)


def _outer_names(node: Any) -> set[str]:
    """The names a node's subgraphs read without defining them (their outer-scope inputs)."""
    from onnx import AttributeProto

    used: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs) if attr.type == AttributeProto.GRAPHS else []
        for g in graphs:
            defined = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                used |= (set(n.input) | _outer_names(n)) - defined
                defined |= set(n.output)
    used.discard("")
    return used


class InvalidOnnxError(RuntimeError):
    """An exported ONNX file fails onnx.checker's full check: an exporter bug, never shipped."""


def check_onnx(path: Path, what: str) -> None:
    """onnx.checker's full check (types and shapes inferred strictly) on the file as written, external data included."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)  # the path form: works past 2 GB, with external data
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        detail = " ".join(str(e).split())[:300] or type(e).__name__
        raise InvalidOnnxError(
            f"{what}: the exported {path.name} fails onnx.checker's full check ({detail}); nothing was written. "
            "This is an export bug: please report it with the model's config"
        ) from e


def _restore_fp32_resize_params(proto: Any) -> None:
    """The converter also halves Constant nodes, but Resize's roi and scales must stay float32 (ONNX spec)."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    constants = {n.output[0]: n for n in proto.graph.node if n.op_type == "Constant"}
    for node in proto.graph.node:
        if node.op_type != "Resize":
            continue
        for name in node.input[1:3]:
            const = constants.get(name)
            if const is None:
                continue
            value = const.attribute[0]
            if value.t.data_type == TensorProto.FLOAT16:
                value.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(value.t).astype(np.float32), value.t.name))


def onnx_files(out: Path) -> list[Path]:
    data = out.with_name(out.name + ".data")
    return [out, data] if data.exists() else [out]
