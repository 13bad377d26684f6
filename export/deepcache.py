"""--deepcache: the two UNets DeepCache (Ma et al. CVPR 2024, arXiv:2312.00858) alternates between.

unet_deepcache: the full UNet, also returning the deep feature: the hidden state that enters the last up block's
layer where the shallow branch rejoins. unet_shallow: conv_in, the first `branch` layers of the first down block,
then that up block from the rejoining layer on, fed with the cached feature instead of everything deeper.
Branch numbering is the deepcache package's cache_branch_id within the outermost blocks: 0 keeps only conv_in's
skip and the last up layer; b runs b layers of the first down block and b + 1 of the last up block.
"""

from __future__ import annotations

from typing import Any

from runtime.bundle import TensorSpec
from runtime.bundle.levers import DEEP_FEATURE, DEEP_UNET, SHALLOW_UNET

from .onnx_export import ADDED_CONDITIONS, ComponentSpec


def check_branch(unet: Any, branch: int) -> None:
    most = len(unet.down_blocks[0].resnets)
    if not 0 <= branch <= most:
        raise ValueError(
            f"--deepcache {branch}: this UNet's first down block has {most} layers, so the branch must be 0 to {most} "
            "(0: the shallowest and fastest shallow UNet, as DeepCache's default)"
        )


def rejoin_layer(unet: Any, branch: int) -> int:
    """The index of the last up block's layer whose input hidden state is the cached deep feature."""
    return len(unet.up_blocks[-1].resnets) - 1 - branch


def feature_channels(unet: Any, branch: int) -> int:
    """The deep feature's channels: the rejoining layer's input minus the skip concatenated to it (the first down
    block's width, which every skip into the last up block has)."""
    resnet = unet.up_blocks[-1].resnets[rejoin_layer(unet, branch)]
    return int(resnet.in_channels) - int(unet.config.block_out_channels[0])


def embeddings(unet: Any, sample: Any, timestep: Any, context: Any, given: dict[str, Any]) -> tuple[Any, Any]:
    """The time embedding and the processed text context, as UNet2DConditionModel.forward makes them."""
    import torch

    added = {k: given[k] for k in ADDED_CONDITIONS if k in given}
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), given.get("timestep_cond"))
    class_emb = unet.get_class_embed(sample=sample, class_labels=given.get("class_labels"))
    if class_emb is not None:
        emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=context, added_cond_kwargs=added)
    emb = emb + aug if aug is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    return emb, unet.process_encoder_hidden_states(encoder_hidden_states=context, added_cond_kwargs=added)


def layer(block: Any, i: int, h: Any, emb: Any, context: Any) -> Any:
    """One resnet (and its cross-attention, where the block has one) of a down or up block."""
    h = block.resnets[i](h, emb)
    if getattr(block, "has_cross_attention", False):
        h = block.attentions[i](h, encoder_hidden_states=context, return_dict=False)[0]
    return h


def shallow_forward(unet: Any, branch: int, sample: Any, timestep: Any, context: Any, feature: Any, given: dict[str, Any]) -> Any:
    """The shallow UNet: what a cached step computes (DeepCache's Eq. 4 branch, outermost blocks only)."""
    import torch

    emb, context = embeddings(unet, sample, timestep, context, given)
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    h = unet.conv_in(sample)
    skips = [h]
    for i in range(branch):
        h = layer(unet.down_blocks[0], i, h, emb, context)
        skips.append(h)
    up = unet.up_blocks[-1]
    h = feature
    for i in range(rejoin_layer(unet, branch), len(up.resnets)):
        h = layer(up, i, torch.cat([h, skips.pop()], dim=1), emb, context)
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)


def full_with_feature(unet: Any, branch: int, call: Any) -> tuple[Any, Any]:
    """call() runs the ordinary UNet forward; returns its output and the deep feature, caught on its way in."""
    rejoin = unet.up_blocks[-1].resnets[rejoin_layer(unet, branch)]
    width = feature_channels(unet, branch)
    caught: list[Any] = []
    handle = rejoin.register_forward_pre_hook(lambda _m, args: caught.append(args[0][:, :width]))
    try:
        out = call()
    finally:
        handle.remove()
    return out, caught[0]


def deepcache_specs(unet_spec: ComponentSpec, unet: Any, branch: int) -> list[ComponentSpec]:
    """unet_deepcache and unet_shallow, with the full UNet's inputs (shallow: plus the feature)."""
    import torch

    check_branch(unet, branch)
    inputs = unet_spec.inputs
    if inputs[2].name != "encoder_hidden_states":
        raise ValueError(f"--deepcache: the UNet's third input is {inputs[2].name}, not encoder_hidden_states")
    names = [t.name for t in inputs]
    b2, _, h, w = inputs[0].shape
    feature = TensorSpec(DEEP_FEATURE, (b2, feature_channels(unet, branch), h, w), "float32")
    # SDXL's outermost blocks have no cross-attention: its shallow UNet reads no text context (an ONNX input it would
    # not use is dropped by the exporter, so the spec leaves it out too)
    reads_text = any(getattr(b, "has_cross_attention", False) for b in (unet.down_blocks[0], unet.up_blocks[-1]))
    shallow_inputs = tuple(t for t in inputs if reads_text or t.name != "encoder_hidden_states") + (feature,)

    class Deep(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = unet

        def forward(self, *args: Any) -> Any:
            given = dict(zip(names, args))
            x, t = given.pop("sample"), given.pop("timestep")
            added = {k: given.pop(k) for k in ADDED_CONDITIONS if k in given}

            def call() -> Any:
                extra = {"added_cond_kwargs": added} if added else {}
                return self.inner(x, t, **given, **extra, return_dict=False)[0]

            return full_with_feature(self.inner, branch, call)

    class Shallow(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = unet

        def forward(self, *args: Any) -> Any:
            given = dict(zip([t.name for t in shallow_inputs], args))
            x, t, cached = given.pop("sample"), given.pop("timestep"), given.pop(DEEP_FEATURE)
            return shallow_forward(self.inner, branch, x, t, given.pop("encoder_hidden_states", None), cached, given)

    return [
        ComponentSpec(DEEP_UNET, Deep().eval(), inputs, (*unet_spec.outputs, feature)),
        ComponentSpec(SHALLOW_UNET, Shallow().eval(), shallow_inputs, unet_spec.outputs),
    ]
