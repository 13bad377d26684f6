"""The ONNX road: a diffusers model folder -> a verified ONNX Runtime bundle (the TensorRT road starts here too)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from runtime.bundle import Component, Manifest
from runtime.bundle.levers import DeepCacheInfo, Levers

from . import controlnet, deepcache, lora, onnx_export, preview_map, textual_inversion, tiny_vae
from .gates import describe, differs
from .inputs import fixed_inputs
from .int8 import calibration
from .int8 import unet as int8
from .manifest_writer import manifest_for
from .model import ModelError, SourceModel, open_model, write_tokenizer
from .options import BuildOptions
from .resolve import image_size, needed_components, resolve_guidance, resolve_pipelines
from .staging import ENGINES, Log, default_name, staging, write_manifest
from .verify import FP16_MAX, VerificationError, compare, reference_and_peak, torch_reference

BACKEND = "onnxruntime"


def export_onnx_bundle(model_path: Path, out: Path | None, options: BuildOptions, log: Log) -> Path:
    """Export, verify and publish an ONNX bundle at `out` (default: under engines/); returns its folder.

    model_path: a diffusers folder, or a single-file checkpoint (converted to a temporary folder for the export).
    """
    with open_model(
        model_path, allow_pickle=options.allow_pickle, variant=options.variant, checkpoint_config=options.checkpoint_config, log=log
    ) as model:
        return export_model(model, out, options, log)


def export_model(model: SourceModel, out: Path | None, options: BuildOptions, log: Log) -> Path:
    """The loaded model -> a verified ONNX bundle."""
    height, width = image_size(model, options.height, options.width)
    guidance = resolve_guidance(model, options.guidance)
    pipelines = resolve_pipelines(model, options.pipelines)
    batch, precision = options.batch_size, options.precision
    adapters = lora.read_adapters(model, options.lora)  # checked against the model before anything is exported
    targets = lora.slot_targets(model, options.lora_slots) if options.lora_slots else ()
    info = lora.lora_info(lora.records(adapters), options.lora_slots, targets)
    nets = controlnet.load_controlnets(options.controlnets, model.unet, model.vae_factor, options.allow_pickle)
    named = default_name(model.name, height, width, batch, precision, BACKEND, guidance) + lora.suffix(info)
    out = out or ENGINES / (named + "".join(f"-{net.path.resolve().name}" for net in nets))
    what = f"{height}x{width}, batch {batch}, {precision}, {BACKEND}, guidance {guidance}; {', '.join(pipelines)}"
    log(f"building {out} from {model.source} ({what})")
    for line in model.report():
        log(line)
    t0 = time.perf_counter()
    choices = int8_choices(model, options, pipelines) if precision == "int8" else None
    chunks = prompt_chunks(model, options.max_prompt_tokens)
    with staging(out, options.force, model.source, log) as work:
        lora.fuse(model, adapters, log)
        added = textual_inversion.apply(model, options.textual_inversion, options.allow_pickle, log)
        f, rows = model.vae_factor, 2 * batch if guidance == "cfg" else batch
        residuals = controlnet.residual_specs(nets[0], rows, height // f, width // f) if nets else ()
        specs = onnx_export.component_specs(
            model, height=height, width=width, batch=batch, guidance=guidance, chunks=chunks, residuals=residuals
        )
        unet_spec = next(s for s in specs if s.name == "unet")
        specs += [controlnet.controlnet_spec(i, net, unet_spec, residuals, f) for i, net in enumerate(nets)]
        roots = {"unet": model.unet, "text_encoder": model.text_encoder}
        specs = [lora.with_slots(s, roots[s.name], targets, options.lora_slots) if s.name in roots else s for s in specs]
        lever_specs, levers = speed_levers(model, options, specs, pipelines, height=height, width=width, batch=batch)
        specs += lever_specs
        exported = "fp32" if precision == "int8" else precision  # int8: the UNet is quantized from its fp32 export
        needed = needed_components(pipelines, tuple(s.name for s in specs if s.name.startswith("text_encoder")))
        needed |= {s.name for s in specs if s.name.startswith("controlnet_")}
        needed_specs = [s for s in specs if s.name in needed | {s.name for s in lever_specs}]
        shared = shared_weights(needed_specs)
        components = {}
        for s in needed_specs:
            low_memory = options.low_memory and s.name not in shared
            components[s.name] = export_component(s, model, work, exported, log, low_memory=low_memory)
        for i, net in enumerate(nets):  # where each ControlNet came from, for the manifest and its rebuild command
            c = components[controlnet.COMPONENT.format(i)]
            components[c.name] = replace(c, build={**c.build, "controlnet": net.record()})
        for dest, src in model.family.tokenizers(model).items():
            write_tokenizer(src, work / dest)
            textual_inversion.write_added_tokens(work / dest, added.get(dest, {}))

        def manifest(precision: str) -> Manifest:
            return manifest_for(
                model, components, height=height, width=width, batch=batch, precision=precision, backend=BACKEND, guidance=guidance,
                pipelines=pipelines, lora=info, levers=levers, command=options.arguments(str(model.source)), prompt_chunks=chunks,
                textual_inversion=options.textual_inversion,
            )  # fmt: skip

        write_manifest(work, manifest(exported))
        if choices is not None:  # the staged fp32 bundle is what calibration samples with and the gate compares against
            for s in specs:  # exported and verified: the torch weights (SD 1.5: 4.3 GB) would only crowd the quantizer
                free_weights(s.module)
            components["unet"] = int8.quantize_unet(work, components["unet"], choices, log)
            write_manifest(work, manifest(precision))
    log(f"done in {time.perf_counter() - t0:.1f} s: {out}")
    return out


def speed_levers(
    model: SourceModel, options: BuildOptions, specs: list[onnx_export.ComponentSpec], pipelines: tuple[str, ...], *,
    height: int, width: int, batch: int,
) -> tuple[list[onnx_export.ComponentSpec], Levers]:  # fmt: skip
    """The optional components (--tiny-vae, --deepcache) and the manifest's record of them, with the latent preview map
    every bundle gets."""
    extra: list[onnx_export.ComponentSpec] = []
    tiny_info = cache_info = None
    if options.tiny_vae is not None:
        tiny = tiny_vae.load_tiny_vae(Path(options.tiny_vae), model)
        encodes = bool({"img2img", "inpaint"} & set(pipelines))
        extra += tiny_vae.tiny_vae_specs(tiny, height=height, width=width, batch=batch, factor=model.vae_factor, encoder=encodes)
        tiny_info = tiny_vae.tiny_vae_info(Path(options.tiny_vae), tiny)
    if options.deepcache is not None:
        unet_spec = next(s for s in specs if s.name == "unet")
        extra += deepcache.deepcache_specs(unet_spec, model.unet, options.deepcache)
        cache_info = DeepCacheInfo(options.deepcache)
    return extra, Levers(tiny_info, preview_map.fit_preview(model.vae, model.vae_factor), cache_info)


def prompt_chunks(model: SourceModel, max_prompt_tokens: int | None) -> int:
    """How many text-encoder contexts the UNet takes: --max-prompt-tokens in whole chunks (the context less bos and eos)."""
    if max_prompt_tokens is None:
        return 1
    size = model.family.max_length(model) - 2
    return -(-max_prompt_tokens // size)


def int8_choices(model: SourceModel, options: BuildOptions, pipelines: tuple[str, ...]) -> int8.Int8Choices:
    """--precision int8's choices, checked before any export work: txt2img drives calibration, so the bundle must have it."""
    if model.kind != "text2image":
        raise ModelError(
            f"--precision int8 calibrates on txt2img sampling runs, and {model.source} is a {model.kind} model, which has none; "
            "build it with --precision fp16 or fp32"
        )
    if "txt2img" not in pipelines:
        if "txt2img" in model.pipelines:
            why, fix = f"--pipelines {options.pipelines} leaves it out", "add txt2img to --pipelines, or "
        else:
            why, fix = f"{model.source} runs {', '.join(model.pipelines)} only (an SDXL refiner continues from another model's latents)", ""
        raise ModelError(
            f"--precision int8 calibrates on txt2img sampling runs, and this bundle would have none: {why}; "
            f"{fix}build it with --precision fp16 or fp32"
        )
    folder = Path(model.source)
    prompts = calibration.prompt_set(options.calibration_prompts, folder if folder.is_dir() else None)
    target = "tensorrt" if options.backend in ("tensorrt", "tensorrt-rtx") else "onnxruntime"
    return int8.Int8Choices(prompts, options.calibration_size, options.int8_float_convs, target, options.force)


def export_component(
    spec: onnx_export.ComponentSpec, model: SourceModel, work: Path, precision: str, log: Log, *, low_memory: bool = False
) -> Component:
    """Export one component, choose its precision, verify it against the fp32 module.

    low_memory: an fp16 component is traced from the module cast to half precision (no fp32 ONNX in between), and
    the module's torch weights are freed once the ONNX is written; the gate is the same (fp32 torch reference,
    computed before the cast). Only for a module no other component shares.
    """
    feed = fixed_inputs(spec.inputs, spec.name, spec.latent_scale or float(model.vae.config.scaling_factor))
    family_note = model.family.precision_note(model, spec.name)
    if precision == "fp16" and not family_note:  # the overflow check rides on the reference's forward pass
        reference, peak = reference_and_peak(spec, feed)
    else:
        reference, peak = torch_reference(spec, feed), 0.0
    chosen, note = component_precision(precision, family_note, peak)
    target = work / spec.name / "model.onnx"
    t0 = time.perf_counter()
    if low_memory and chosen == "fp16":
        onnx_export.export_onnx_half(spec, feed, target)
        note = note or "traced in fp16 (--low-memory)"
    else:
        onnx_export.export_onnx_as(spec, feed, target, chosen)
    if low_memory:
        free_weights(spec.module)
    component = Component(
        name=spec.name,
        file=str(target.relative_to(work)),
        format="onnx",
        precision=chosen,
        inputs=spec.inputs,
        outputs=spec.outputs,
        build=build_record(time.perf_counter() - t0, note),
    )
    figures = compare(component, work, reference, feed)
    size = sum(f.stat().st_size for f in onnx_export.onnx_files(target)) / 2**20
    log(
        f"  {spec.name:<14} {chosen}  {size:8.1f} MiB  {describe(figures)} (gate {figures['tolerance']:.0e})"
        + (f"  [{note}]" if note else "")
    )
    if not figures["passed"]:
        raise VerificationError(
            f"{spec.name}: the {chosen} ONNX {differs(figures, 'the fp32 torch module')} "
            f"(relative to its output range; the gate is {figures['tolerance']:g}); nothing was written. "
            + _gate_fix(figures, chosen)
        )
    return replace(component, verification=figures)


def _gate_fix(figures: dict[str, Any], chosen: str) -> str:
    if any(figures["outputs"][n]["nonfinite_values"]["reference"] for n in figures["nonfinite"]):
        return (
            "The fp32 torch module itself gives NaN/inf on the fixed inputs: the weights are broken or a fused LoRA's scale "
            "or alpha is far too large; check the model and any --lora FILE:SCALE."
        )
    if chosen == "fp16":
        return "Try --precision fp32."
    return "This is an export bug: please report it with the model's config."


def component_precision(asked: str, family_note: str, peak: float) -> tuple[str, str]:
    """The precision to export in, and why it is not the one asked for ("" when it is).

    family_note: the model family's reason to keep this component fp32 (SDXL's VAE with force_upcast), if any;
    peak: the largest |activation| of the fp32 module on the fixed inputs.
    """
    if asked == "fp16" and family_note:
        return "fp32", family_note
    if asked == "fp16" and peak > FP16_MAX / 2:  # half the range: headroom for inputs larger than the fixed ones
        return "fp32", f"kept fp32: activations reach {peak:.3g}, past half of fp16's range"
    return asked, ""


def shared_weights(specs: list[onnx_export.ComponentSpec]) -> set[str]:
    """The components whose torch weights another component also uses (the VAE's decoder and encoder)."""
    owners: dict[int, set[str]] = {}
    for spec in specs:
        for param in spec.module.parameters():
            owners.setdefault(id(param), set()).add(spec.name)
    return {name for names in owners.values() if len(names) > 1 for name in names}


def free_weights(module: Any) -> None:
    """Release a module's weight storage (moved to torch's meta device): an exported component needs them no more."""
    module.to("meta")


def build_record(seconds: float, note: str) -> dict[str, Any]:
    """What the manifest keeps of an ONNX export: the tools, and why a component kept fp32."""
    import torch

    record: dict[str, Any] = {
        "exporter": "torch.onnx.export (TorchScript)",
        "torch": torch.__version__,
        "opset": onnx_export.OPSET,
        "seconds": round(seconds, 2),
    }
    return {**record, "note": note} if note else record
