"""python -m export.build: a diffusers model folder -> a verified engine bundle under engines/.

The Python API is `build(model, out, precision="fp32", ...)`, or `build(model, out, BuildOptions(...))`. The command
line maps flags to BuildOptions (or --from-onnx); every error is one `error: ...` line, exit 2 (Ctrl-C: exit 130).
Two roads leave from here: export.from_model (a model folder -> an ONNX Runtime bundle) and export.tensorrt.from_onnx
(an ONNX bundle -> TensorRT engines); the tensorrt backend takes the first road into a scratch folder, then the second.
"""

from __future__ import annotations

import argparse
import errno
import sys
import tempfile
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from runtime.atomic import NO_SPACE
from runtime.backends.libraries import TENSORRT, TENSORRT_RTX, require
from runtime.backends.tensorrt import require_tensorrt, tensorrt_available
from runtime.bundle import GUIDANCE_MODES
from runtime.errors import BundleError

from .from_model import export_onnx_bundle
from .model import REFERENCE_MODEL, ModelError
from .onnx_export import InvalidOnnxError
from .options import BACKENDS, BuildOptions
from .staging import Log, check_target
from .tensorrt import from_onnx
from .tensorrt.builder import PRESETS, EngineBuildError, builder_settings, compute_capabilities
from .verify import VerificationError

__all__ = ["REFERENCE_MODEL", "BuildOptions", "build", "build_bundle", "main"]


def build(
    model_path: str | Path,
    out: Path | None = None,
    options: BuildOptions | None = None,
    *,
    log: Log = print,
    **choices: Any,
) -> Path:
    """Export, verify and publish a bundle; returns its folder. Raises before writing anything on bad input.

    choices: BuildOptions' fields as keywords (precision="fp32", batch_size=2, ...), over `options` when both are given.
    """
    return build_bundle(Path(model_path), out, replace(options or BuildOptions(), **choices), log)


def resolve_backend(asked: str, log: Log) -> str:
    """TensorRT engines where TensorRT exists; `auto` elsewhere builds the ONNX Runtime flavour, said in one line."""
    if asked == "tensorrt":
        require_tensorrt("--backend tensorrt", instead="or build the ONNX Runtime flavour with --backend onnxruntime")
        return "tensorrt"
    if asked == "tensorrt-rtx":  # builds without a GPU: only the library is needed here
        require(TENSORRT_RTX, "--backend tensorrt-rtx", cuda=False, instead="or build the ONNX Runtime flavour with --backend onnxruntime")
        return "tensorrt-rtx"
    if asked == "auto":
        if tensorrt_available():
            log("TensorRT is installed: building TensorRT engines (--backend tensorrt)")
            return "tensorrt"
        log("TensorRT is not installed here: building the ONNX Runtime flavour (--backend onnxruntime)")
    return "onnxruntime"


def build_bundle(model_path: Path, out: Path | None, options: BuildOptions, log: Log = print) -> Path:
    """Export, verify and publish a bundle; returns its folder. Raises before writing anything on bad input.

    With the tensorrt backend the verified ONNX bundle is exported to a scratch folder first, then its
    engines are built and verified as `--from-onnx` does; the TensorRT bundle keeps the ONNX files.
    """
    backend = resolve_backend(options.backend, log)
    if out is not None:
        check_target(out, options.force, model_path)  # before the model loads: a clash costs nothing to report
    if backend == "onnxruntime":
        return export_onnx_bundle(model_path, out, replace(options, backend=backend), log)  # recorded as resolved
    with tempfile.TemporaryDirectory(prefix="onnx-bundle-") as tmp:
        # recorded as resolved (tensorrt or tensorrt-rtx, with its --compute-capability): the engines' rebuild command
        onnx_bundle = export_onnx_bundle(model_path, Path(tmp) / "onnx", replace(options, backend=backend), log)
        library = TENSORRT_RTX if backend == "tensorrt-rtx" else TENSORRT
        return from_onnx.build_from_onnx(
            onnx_bundle, out, precision=options.precision, settings=options.tensorrt_builder(), force=options.force, log=log,
            library=library, targets=options.targets(),
        )  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export.build",
        description="Turn a local diffusers Stable Diffusion folder (or a single-file SD 1.x/2.x checkpoint) into a verified "
        "engine bundle (ONNX files, manifest.json, tokenizer) that `python -m runtime` and `runtime.Pipeline.load` run without torch.",
    )
    add_bundle_flags(p)
    add_tensorrt_flags(p)
    return p


def add_bundle_flags(p: argparse.ArgumentParser) -> None:
    """The model, the bundle's shapes and what it serves: BuildOptions' fields, by name."""
    p.add_argument(
        "--model",
        type=Path,
        default=REFERENCE_MODEL,
        help="diffusers model folder, or a single-file checkpoint (.safetensors in the original SD layout, converted offline); "
        "default: the shipped reference model, %(default)s",
    )
    p.add_argument("--out", type=Path, help="bundle folder (default: engines/<model>-<H>x<W>-b<B>-<precision>-<backend>)")
    p.add_argument(
        "--precision",
        help="fp32, fp16 (fp16 keeps a component in fp32 where it would overflow) or int8 (the UNet calibrated to int8 "
        "QDQ on real sampling runs and gated on image quality, the rest fp32); default fp16. With --from-onnx: int8 needs "
        "a UNet ONNX with Q/DQ nodes; default there: the bundle's own precision",
    )
    p.add_argument("--height", type=int, help="image height in pixels (default: the model's native size)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the model's native size)")
    p.add_argument("--batch-size", type=int, default=1, help="images per call; the engines have static shapes (default 1)")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="engine backend: onnxruntime; tensorrt (NVIDIA TensorRT, built on the GPU it runs on); tensorrt-rtx (TensorRT "
        "for RTX: built on any machine, no GPU needed, compiled for the RTX-class GPU at first load); default auto: "
        "tensorrt where TensorRT is installed, else onnxruntime. With --from-onnx: tensorrt (default) or tensorrt-rtx",
    )
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
    p.add_argument(
        "--low-memory",
        action="store_true",
        help="for models near the machine's memory (SDXL on 24 GiB): an fp16 component is traced from its torch module cast "
        "to half precision instead of converted from an fp32 ONNX, and each component's torch weights are freed once its "
        "ONNX is written (the VAE's decoder and encoder share theirs, and take the ordinary road)",
    )
    p.add_argument(
        "--allow-pickle", action="store_true", help="also load .bin/.ckpt pickle weights (they can run code: trusted files only)"
    )
    p.add_argument(
        "--variant",
        metavar="NAME",
        help="the folder's weight variant to export, as save_pretrained(variant=NAME) names its files (e.g. fp16: "
        "model.fp16.safetensors); default: the plain weights, else the only variant a component has",
    )
    p.add_argument(
        "--checkpoint-config",
        metavar="NAME|DIR",
        help="for a single-file checkpoint: the architecture to convert it as, one of the shipped configs "
        "(sd1, sd1-inpainting, sd2, sd2-base, sd2-inpainting) or a diffusers folder with its configs; "
        "default: recognised from the checkpoint's keys and shapes (SD 2.x as the 768 v-prediction model)",
    )
    add_int8_flags(p)
    add_lever_flags(p)
    add_prompt_flags(p)
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing bundle folder; with TensorRT also keep an engine over its verification gate",
    )
    p.add_argument(
        "--lora",
        action="append",
        metavar="FILE[:SCALE]",
        help="fuse a LoRA adapter (.safetensors, diffusers/peft or kohya layout, UNet and text encoder parts) into the "
        "weights at SCALE (default 1) before the export; repeat for several; the manifest records file, sha256 and scale",
    )
    p.add_argument(
        "--controlnet",
        dest="controlnets",
        action="append",
        metavar="FOLDER",
        help="add a ControlNet (a diffusers ControlNetModel folder) as a component, and give the UNet its residual inputs; "
        "repeat for several (the runtime's control_image= takes one image per net)",
    )
    p.add_argument(
        "--lora-slots",
        type=int,
        metavar="RANK",
        help="give the UNet and text encoder LoRA slots of this rank (their attention and transformer layers take low-rank "
        "matrices as inputs), so Pipeline.set_lora switches adapters at run time without a rebuild; default: none",
    )


def add_lever_flags(p: argparse.ArgumentParser) -> None:
    """The optional speed levers: a tiny VAE, DeepCache's UNets."""
    p.add_argument(
        "--tiny-vae",
        type=Path,
        metavar="DIR",
        help="also export this diffusers AutoencoderTiny folder (TAESD: taesd for SD 1.x/2.x, taesdxl for SDXL; the reference "
        "model's: models/shapes-ldm-taesd) as vae_decoder_tiny (and vae_encoder_tiny for img2img/inpaint); tasks pick it "
        "with decoder='tiny'",
    )
    p.add_argument(
        "--deepcache",
        type=int,
        nargs="?",
        const=0,
        metavar="BRANCH",
        help="also export DeepCache's UNets (the full UNet returning its deep feature, and a shallow UNet reusing it), so "
        "tasks take cache_interval=N; BRANCH: where the shallow UNet rejoins (default 0, the shallowest)",
    )


def add_prompt_flags(p: argparse.ArgumentParser) -> None:
    """Long prompts and textual-inversion embeddings (docs/prompts.md)."""
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        metavar="N",
        help="the CLIP tokens a prompt may take: prompts are encoded in chunks of 75 and the UNet takes up to ceil(N/75) "
        "of them (a prompt of fewer chunks runs exactly as on a one-chunk bundle); longer prompts are cut with a warning; "
        "default 75 (one chunk)",
    )
    p.add_argument(
        "--textual-inversion",
        action="append",
        metavar="FILE[:TOKEN]",
        help="add a textual-inversion embedding (A1111 .pt/.safetensors, diffusers learned_embeds.safetensors; SDXL "
        "clip_l/clip_g pairs) to the tokenizer and text encoder(s), as TOKEN (default: the token the file names, else "
        "the file's name); a multi-vector embedding takes that many tokens; repeat for several. .pt files are pickles: "
        "refused unless --allow-pickle",
    )


def add_int8_flags(p: argparse.ArgumentParser) -> None:
    """--precision int8's calibration and float-node choices."""
    p.add_argument(
        "--calibration-prompts",
        type=Path,
        metavar="FILE",
        help="int8: UTF-8 text, one prompt per line (# comments), to calibrate on; default: the model's own "
        "(MODEL/calibration/prompts.txt: the reference model ships its captions), "
        "else the project's set (export/int8/calibration_prompts.txt)",
    )
    p.add_argument(
        "--calibration-size",
        type=int,
        metavar="N",
        help="int8: generations (20 steps each, every UNet call recorded) to calibrate on (default 32)",
    )
    p.add_argument(
        "--int8-float-convs",
        type=int,
        metavar="N",
        help="int8: how many of the most sensitive convolutions stay float, found by a sensitivity sweep cached under "
        "engines/.cache (default 10; 0 skips the sweep)",
    )


def add_tensorrt_flags(p: argparse.ArgumentParser) -> None:
    """--from-onnx and TensorRT's builder limits, in a group of their own in --help."""
    trt = p.add_argument_group("TensorRT engines (--backend tensorrt | tensorrt-rtx, --from-onnx)")
    trt.add_argument(
        "--from-onnx",
        type=Path,
        metavar="BUNDLE",
        help="build TensorRT engines from an existing bundle's ONNX files, without torch (export on a workstation, "
        "build on the target); writes a new bundle (default engines/<model>-<H>x<W>-b<B>-<precision>-tensorrt-<gpu>-<trt version>)",
    )
    trt.add_argument(
        "--builder-optimization-level", type=int, metavar="N", help="TensorRT builder optimization level, 0 (fast build) to 5; default 3"
    )
    trt.add_argument(
        "--workspace", type=int, metavar="MIB", help="limit of TensorRT's builder workspace memory pool, in MiB (default: the whole GPU)"
    )
    trt.add_argument(
        "--device-preset",
        choices=sorted(PRESETS),
        help="builder limits for a device class, e.g. jetson-orin-nano: 1024 MiB workspace, one stream",
    )
    trt.add_argument(
        "--compute-capability",
        metavar="LIST",
        help="TensorRT for RTX: the GPUs to build for, comma-separated from 7.5 (Turing), 8.0, 8.6, 8.9, 12.0, 12.1; "
        "'current' for this machine's GPU; default: the library's portable set (8.0 to 12.x, no Turing)",
    )


def options_from_args(args: argparse.Namespace) -> BuildOptions:
    """Each flag is the BuildOptions field of its name; a flag left unset (None) keeps the field's default."""
    given = {f.name: getattr(args, f.name) for f in fields(BuildOptions)}
    return BuildOptions(**{name: value for name, value in given.items() if value is not None})


def from_onnx_from_args(args: argparse.Namespace) -> Path:
    """--from-onnx: the bundle fixes shapes, pipelines and backend; only precision and builder flags apply."""
    given = (
        ("--height", args.height),
        ("--width", args.width),
        ("--backend onnxruntime", args.backend == "onnxruntime"),
        ("--compute-capability (TensorRT for RTX only)", args.compute_capability is not None and args.backend != "tensorrt-rtx"),
        ("--pipelines", args.pipelines),
        ("--variant", args.variant),
        ("--checkpoint-config", args.checkpoint_config),
        ("--lora", args.lora),
        ("--lora-slots", args.lora_slots),
        ("--controlnet", args.controlnets),
        ("--max-prompt-tokens", args.max_prompt_tokens),
        ("--textual-inversion", args.textual_inversion),
        ("--calibration-prompts", args.calibration_prompts),
        ("--calibration-size", args.calibration_size),
        ("--int8-float-convs", args.int8_float_convs),
        ("--tiny-vae", args.tiny_vae),
        ("--deepcache", args.deepcache is not None),
    )
    clashes = [flag for flag, v in given if v]
    if clashes or args.batch_size != 1:
        raise ValueError(f"--from-onnx builds the bundle's own shapes with TensorRT; drop {', '.join(clashes or ['--batch-size'])}")
    settings = builder_settings(args.device_preset, args.builder_optimization_level, args.workspace)
    library = TENSORRT_RTX if args.backend == "tensorrt-rtx" else TENSORRT
    return from_onnx.build_from_onnx(
        args.from_onnx, args.out, precision=args.precision, settings=settings, force=args.force, library=library,
        targets=compute_capabilities(args.compute_capability),
    )  # fmt: skip


def build_from_args(args: argparse.Namespace) -> Path:
    """The CLI's two roads: a diffusers model folder, or --from-onnx an existing bundle."""
    if args.from_onnx is not None:
        return from_onnx_from_args(args)
    return build_bundle(args.model, args.out, options_from_args(args))


def disk_message(e: OSError) -> str:
    """An OSError during a build as one line: what happened, where, and that nothing was published."""
    cause = "the disk is full" if e.errno in NO_SPACE else (e.strerror or str(e))
    where = f" writing {e.filename}" if e.filename else ""
    return f"{cause}{where}; nothing was published and an existing bundle is as it was: free space (or fix the folder) and build again"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        build_from_args(args)
    except (ModelError, FileExistsError, VerificationError, InvalidOnnxError, BundleError, EngineBuildError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only folder: staging removed the partial bundle, an existing one is untouched
        print(f"error: {disk_message(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if "No space left on device" not in str(e):  # torch and onnx wrap a failed write in their own errors
            raise
        print(f"error: {disk_message(OSError(errno.ENOSPC, 'No space left on device'))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # staging removed the partial bundle; an existing one was left as it was
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
