"""python -m export.build: a diffusers model folder -> a verified engine bundle under engines/."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from runtime.errors import BundleError
from runtime.manifest import SCHEMA, SCHEMA_VERSION, Component

from . import onnx_export
from .bundle import ENGINES, check_target, default_name, staging, write_manifest
from .model import ModelError, SourceModel, load_model, write_tokenizer
from .tensorrt import PRESETS, EngineBuildError, builder_settings, require_tensorrt, tensorrt_available
from .verify import FP16_MAX, VerificationError, activation_peak, compare, sample_inputs, torch_reference

REFERENCE_MODEL = Path(__file__).resolve().parent.parent / "models" / "shapes-ldm"
PRECISIONS = ("fp32", "fp16")
GUIDANCE_MODES = ("cfg", "none", "embedded")
Log = Callable[[str], None]


def resolve_backend(asked: str, log: Log) -> str:
    """TensorRT engines where TensorRT exists; `auto` elsewhere builds the ONNX Runtime flavour, said in one line."""
    if asked == "tensorrt":
        require_tensorrt("--backend tensorrt", instead="or build the ONNX Runtime flavour with --backend onnxruntime")
        return "tensorrt"
    if asked == "auto":
        if tensorrt_available():
            log("TensorRT is installed: building TensorRT engines (--backend tensorrt)")
            return "tensorrt"
        log("TensorRT is not installed here: building the ONNX Runtime flavour (--backend onnxruntime)")
    return "onnxruntime"


def image_size(model: SourceModel, height: int | None, width: int | None) -> tuple[int, int]:
    """Default to the model's native size; sizes must survive the VAE and every UNet downsampling."""
    native = model.unet.config.sample_size * model.vae_factor
    height, width = height or native, width or native
    multiple = model.vae_factor * 2 ** (len(model.unet.config.down_block_types) - 1)
    for what, v in (("height", height), ("width", width)):
        if v <= 0 or v % multiple:
            raise ValueError(
                f"--{what} {v} is not a positive multiple of {multiple} "
                f"(the VAE's factor {model.vae_factor} times the UNet's downsampling); try {max(multiple, round(v / multiple) * multiple)}"
            )
    return height, width


def resolve_guidance(model: SourceModel, asked: str) -> str:
    """auto: a guidance embedding where the UNet takes one (LCM), else classifier-free guidance."""
    takes_embedding = model.unet.config.time_cond_proj_dim is not None
    if asked == "auto":
        return "embedded" if takes_embedding else "cfg"
    if asked not in GUIDANCE_MODES:
        raise ValueError(f"unknown guidance mode {asked!r}: choose one of auto, {', '.join(GUIDANCE_MODES)}")
    if asked == "embedded" and not takes_embedding:
        raise ValueError("--guidance embedded needs a UNet with time_cond_proj_dim (an LCM-distilled UNet); this one has none: use cfg or none")
    return asked


def resolve_pipelines(model: SourceModel, asked: str | None) -> tuple[str, ...]:
    """Default: everything the model can do; a subset leaves out what it does not need (txt2img alone: no VAE encoder)."""
    if asked is None:
        return model.pipelines
    wanted = tuple(dict.fromkeys(p.strip() for p in asked.split(",") if p.strip()))
    unknown = [p for p in wanted if p not in model.pipelines]
    if unknown or not wanted:
        raise ValueError(
            f"--pipelines {asked!r}: {model.path.name} ({model.kind} model) runs {', '.join(model.pipelines)}; "
            f"{'it cannot run ' + ', '.join(unknown) if unknown else 'name at least one'}"
        )
    return wanted


def needed_components(pipelines: tuple[str, ...]) -> set[str]:
    """The VAE encoder only serves pipelines that start from an image's latents."""
    names = {"text_encoder", "unet", "vae_decoder"}
    return names | ({"vae_encoder"} if {"img2img", "inpaint"} & set(pipelines) else set())


def export_component(spec: onnx_export.ComponentSpec, model: SourceModel, work: Path, precision: str, log: Log) -> Component:
    """Export one component, choose its precision, verify it against the fp32 module."""
    feed = sample_inputs(spec, model)
    reference = torch_reference(spec, feed)
    target = work / spec.name / "model.onnx"
    chosen, build_note = precision, ""
    if precision == "fp16":
        peak = activation_peak(spec, feed)
        if peak > FP16_MAX / 2:
            chosen, build_note = "fp32", f"kept fp32: activations reach {peak:.3g}, past half of fp16's range"
    t0 = time.perf_counter()
    if chosen == "fp16":
        with tempfile.TemporaryDirectory(prefix="fp32-") as tmp:
            fp32 = Path(tmp) / "model.onnx"
            onnx_export.export_onnx(spec, feed, fp32)
            onnx_export.convert_fp16(fp32, target)
    else:
        onnx_export.export_onnx(spec, feed, target)
    import torch

    component = Component(
        name=spec.name,
        file=str(target.relative_to(work)),
        format="onnx",
        precision=chosen,
        inputs=spec.inputs,
        outputs=spec.outputs,
        build={
            "exporter": "torch.onnx.export (TorchScript)",
            "torch": torch.__version__,
            "opset": onnx_export.OPSET,
            "seconds": round(time.perf_counter() - t0, 2),
            **({"note": build_note} if build_note else {}),
        },
    )
    figures = compare(component, work, reference, feed)
    size = sum(f.stat().st_size for f in onnx_export.onnx_files(target)) / 2**20
    log(
        f"  {spec.name:<13} {chosen}  {size:8.1f} MiB  error {figures['rel_err']:.2e} (gate {figures['tolerance']:.0e})"
        + (f"  [{build_note}]" if build_note else "")
    )
    if not figures["passed"]:
        raise VerificationError(
            f"{spec.name}: the {chosen} ONNX differs from the fp32 torch module by {figures['rel_err']:.3g} "
            f"(relative to its output range; the gate is {figures['tolerance']:g}); nothing was written. "
            + ("Try --precision fp32." if chosen == "fp16" else "This is an export bug: please report it with the model's config.")
        )
    return Component(**{**component.__dict__, "verification": figures})


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
) -> dict[str, Any]:
    te, vae = model.text_encoder, model.vae
    guidance_info: dict[str, Any] = {"mode": guidance, "unet_batch": 2 * batch if guidance == "cfg" else batch}
    if guidance == "embedded":
        guidance_info["embedding_dim"] = int(model.unet.config.time_cond_proj_dim)
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": model.name,
            "kind": model.kind,
            "family": {768: "sd1", 1024: "sd2"}.get(model.unet.config.cross_attention_dim, "custom"),
            "prediction_type": model.scheduler_config.get("prediction_type", "epsilon"),
            "source": str(model.path.resolve()),
            "source_hashes": model.hashes,
        },
        "pipelines": list(pipelines),
        "scheduler": {"class_name": model.scheduler_class, "config": model.scheduler_config},
        "vae": {
            "scaling_factor": float(vae.config.scaling_factor),
            "latent_channels": int(vae.config.latent_channels),
            "downscale_factor": model.vae_factor,
        },
        "image": {"height": height, "width": width, "batch_size": batch},
        "guidance": guidance_info,
        "tokenizer": {"dir": "tokenizer", "max_length": int(te.config.max_position_embeddings)},
        "backend": backend,
        "precision": precision,
        "components": {name: c.to_json() for name, c in components.items()},
        **({"upscale": model.upscale_settings()} if model.kind == "upscaler" else {}),
    }


def build(
    model_path: Path,
    out: Path | None = None,
    *,
    precision: str = "fp16",
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 1,
    backend: str = "auto",
    guidance: str = "auto",
    pipelines: str | None = None,
    allow_pickle: bool = False,
    force: bool = False,
    log: Log = print,
    builder_optimization_level: int | None = None,
    workspace: int | None = None,
    device_preset: str | None = None,
) -> Path:
    """Export, verify and publish a bundle; returns its folder. Raises before writing anything on bad input.

    With the tensorrt backend the verified ONNX bundle is exported to a scratch folder first, then its
    engines are built and verified as `--from-onnx` does; the TensorRT bundle keeps the ONNX files.
    """
    if precision not in PRECISIONS:
        raise ValueError(
            f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)} "
            "(int8 engines are built with --from-onnx from a bundle whose UNet ONNX carries Q/DQ nodes)"
        )
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    settings = builder_settings(device_preset, builder_optimization_level, workspace)
    backend = resolve_backend(backend, log)
    if backend == "tensorrt":
        from .from_onnx import build_from_onnx

        if out is not None:
            check_target(out, force)
        with tempfile.TemporaryDirectory(prefix="onnx-bundle-") as tmp:
            onnx_options: dict[str, Any] = dict(
                precision=precision, height=height, width=width, batch_size=batch_size, guidance=guidance, pipelines=pipelines,
                allow_pickle=allow_pickle,
            )  # fmt: skip
            onnx_bundle = build(model_path, Path(tmp) / "onnx", backend="onnxruntime", log=log, **onnx_options)
            return build_from_onnx(onnx_bundle, out, precision=precision, settings=settings, force=force, log=log)
    if out is not None:
        check_target(out, force)
    model = load_model(model_path, allow_pickle=allow_pickle)
    height, width = image_size(model, height, width)
    guidance = resolve_guidance(model, guidance)
    chosen = resolve_pipelines(model, pipelines)
    out = out or ENGINES / default_name(model.name, height, width, batch_size, precision, backend, guidance)
    check_target(out, force)
    log(
        f"building {out} from {model.path} ({height}x{width}, batch {batch_size}, {precision}, {backend}, guidance {guidance}; "
        f"{', '.join(chosen)})"
    )
    t0 = time.perf_counter()
    with staging(out, force) as work:
        specs = onnx_export.component_specs(model, height=height, width=width, batch=batch_size, guidance=guidance)
        specs = [s for s in specs if s.name in needed_components(chosen)]
        components = {s.name: export_component(s, model, work, precision, log) for s in specs}
        write_tokenizer(model.tokenizer_dir, work / "tokenizer")
        manifest = manifest_for(
            model, components, height=height, width=width, batch=batch_size, precision=precision, backend=backend, guidance=guidance,
            pipelines=chosen,
        )  # fmt: skip
        write_manifest(work, manifest)
    log(f"done in {time.perf_counter() - t0:.1f} s: {out}")
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export.build",
        description="Turn a local diffusers Stable Diffusion folder into a verified engine bundle (ONNX files, "
        "manifest.json, tokenizer) that `python -m runtime` and `runtime.Pipeline.load` run without torch.",
    )
    p.add_argument("--model", type=Path, default=REFERENCE_MODEL, help="diffusers model folder (default: the shipped reference model, %(default)s)")
    p.add_argument("--out", type=Path, help="bundle folder (default: engines/<model>-<H>x<W>-b<B>-<precision>-<backend>)")
    p.add_argument(
        "--precision",
        help="fp32 or fp16 (fp16 keeps a component in fp32 where it would overflow); default fp16. "
        "With --from-onnx also int8 (needs a UNet ONNX with Q/DQ nodes); default there: the bundle's own precision",
    )
    p.add_argument("--height", type=int, help="image height in pixels (default: the model's native size)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the model's native size)")
    p.add_argument("--batch-size", type=int, default=1, help="images per call; the engines have static shapes (default 1)")
    p.add_argument("--backend", choices=("auto", "onnxruntime", "tensorrt"), default="auto", help="engine backend (default auto)")
    p.add_argument(
        "--guidance",
        choices=("auto", *GUIDANCE_MODES),
        default="auto",
        help="how the UNet is guided: cfg (classifier-free, batch-2B UNet), none (batch-B UNet: Turbo-style models, "
        "guidance_scale <= 1), embedded (LCM guidance embedding); default auto: embedded where the UNet takes one, else cfg",
    )
    p.add_argument(
        "--pipelines",
        metavar="LIST",
        help="comma-separated pipelines the bundle serves, from what the model can do: txt2img,img2img,inpaint for a "
        "text-to-image model (txt2img alone leaves out the VAE encoder), inpaint for an inpainting model, upscale for "
        "the x4 upscaler; default: all the model can do",
    )
    p.add_argument("--allow-pickle", action="store_true", help="also load .bin/.ckpt pickle weights (they can run code: trusted files only)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle folder; with TensorRT also keep an engine over its verification gate")
    trt = p.add_argument_group("TensorRT engines (--backend tensorrt, --from-onnx)")
    trt.add_argument(
        "--from-onnx",
        type=Path,
        metavar="BUNDLE",
        help="build TensorRT engines from an existing bundle's ONNX files, without torch (export on a workstation, "
        "build on the target); writes a new bundle (default engines/<model>-<H>x<W>-b<B>-<precision>-tensorrt-<gpu>-<trt version>)",
    )
    trt.add_argument("--builder-optimization-level", type=int, metavar="N", help="TensorRT builder optimization level, 0 (fast build) to 5; default 3")
    trt.add_argument("--workspace", type=int, metavar="MIB", help="limit of TensorRT's builder workspace memory pool, in MiB (default: the whole GPU)")
    trt.add_argument("--device-preset", choices=sorted(PRESETS), help="builder limits for a device class, e.g. jetson-orin-nano: 1024 MiB workspace, one stream")
    return p


def build_from_args(args: argparse.Namespace) -> Path:
    """The CLI's two roads: a diffusers model folder, or --from-onnx an existing bundle."""
    from .from_onnx import build_from_onnx

    if args.from_onnx is None:
        return build(
            args.model,
            args.out,
            precision=args.precision or "fp16",
            height=args.height,
            width=args.width,
            batch_size=args.batch_size,
            backend=args.backend,
            guidance=args.guidance,
            pipelines=args.pipelines,
            allow_pickle=args.allow_pickle,
            force=args.force,
            builder_optimization_level=args.builder_optimization_level,
            workspace=args.workspace,
            device_preset=args.device_preset,
        )
    given = (("--height", args.height), ("--width", args.width), ("--backend onnxruntime", args.backend == "onnxruntime"), ("--pipelines", args.pipelines))
    clashes = [flag for flag, v in given if v]
    if clashes or args.batch_size != 1:
        raise ValueError(f"--from-onnx builds the bundle's own shapes with TensorRT; drop {', '.join(clashes or ['--batch-size'])}")
    settings = builder_settings(args.device_preset, args.builder_optimization_level, args.workspace)
    return build_from_onnx(args.from_onnx, args.out, precision=args.precision, settings=settings, force=args.force)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        build_from_args(args)
    except (ModelError, FileExistsError, VerificationError, BundleError, EngineBuildError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
