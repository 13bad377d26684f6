"""python -m benchmarks.sdxl: a full-size SDXL-base-architecture pipeline with random weights, and what exporting it takes.

The component configs are SDXL base 1.0's public ones, written out by hand (no hub access here); the
tokenizers are the real CLIP vocabulary from assets/clip-tokenizer (tokenizer_2 pads with "!", as SDXL's).
The weights are random, so images are noise, but every tensor has SDXL's size. `--estimate` prints the
parameter counts and the memory an export needs, on paper, without allocating a weight (torch's meta
device); the default writes the model folder; `--quick` does both for a tiny stand-in (the tests' smoke mode).
`--export-to BUNDLE` then exports that folder the way that fits 24 GiB (fp16, `--low-memory`: traced from half-precision
torch, weights freed as each component is written) in a child process, and records its wall time, peak resident
memory (the kernel's, from wait4) and the bundle's size per file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import sd15
from reference.architecture import CLIP_DIR

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "models-generated" / "sdxl-random"

UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + text_encoder_2's 1280-wide projection
    norm_num_groups=32,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)
# CLIP ViT-L/14 (as SD 1.5's, legacy ids) and OpenCLIP ViT-bigG/14 with its projection
TEXT_ENCODER = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
    pad_token_id=1,
)  # fmt: skip
TEXT_ENCODER_2 = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
    pad_token_id=1,
)  # fmt: skip
# SD 1.5's VAE architecture; SDXL trained it anew at 1024 with its own latent scale
VAE = {**sd15.VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}  # fp16 overflows: export keeps it fp32
SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
    timestep_spacing="leading", interpolation_type="linear", prediction_type="epsilon", use_karras_sigmas=False,
)  # fmt: skip
# The tiny stand-in --quick builds (the tests' SDXL shape), so the smoke mode exercises the same code
QUICK = {
    "unet": dict(
        sample_size=8, block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
        layers_per_block=1, cross_attention_dim=80, addition_time_embed_dim=8, projection_class_embeddings_input_dim=72, norm_num_groups=8,
    ),
    "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
    "text_encoder_2": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, projection_dim=24),
    "vae": dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64),
}  # fmt: skip
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae")
# What the floor leaves out and a machine must still hold: the OS and page cache, the tracer's graph, constant
# folding's copies of transposed weights, the verification's activations, ONNX Runtime's session. An assumed margin.
MARGIN_BYTES = 4 * 2**30


def build_pipeline(seed: int = 0, quick: bool = False, meta: bool = False) -> Any:
    """SDXL base's components at full size (or the --quick stand-in), randomly initialised (seeded); on torch's meta
    device with meta=True: shapes only, no memory, for counting."""
    import contextlib

    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def config(name: str, base: dict[str, Any]) -> dict[str, Any]:
        return {**base, **(QUICK[name] if quick else {})}

    torch.manual_seed(seed)
    with torch.device("meta") if meta else contextlib.nullcontext():
        parts = dict(
            unet=UNet2DConditionModel(**config("unet", UNET)),
            vae=AutoencoderKL(**config("vae", VAE)),
            text_encoder=CLIPTextModel(CLIPTextConfig(**config("text_encoder", TEXT_ENCODER))),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**config("text_encoder_2", TEXT_ENCODER_2))),
        )
    return StableDiffusionXLPipeline(
        **parts,
        tokenizer=CLIPTokenizer.from_pretrained(CLIP_DIR, pad_token="<|endoftext|>"),
        tokenizer_2=CLIPTokenizer.from_pretrained(CLIP_DIR, pad_token="!"),
        scheduler=EulerDiscreteScheduler(**SCHEDULER),
        add_watermarker=False,
    )


def parameter_counts(pipe: Any) -> dict[str, int]:
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in COMPONENTS}


def estimate(counts: dict[str, int], ram_bytes: int) -> dict[str, Any]:
    """On paper: each component's weights in fp32 and fp16, the bundle's size, and a floor for an export's peak.

    export.build loads every component in float32 at once, then exports one at a time; exporting the largest
    (the UNet) holds its torch weights and, while the ONNX file is written and checked, a second full copy of them
    (the ONNX proto), so the peak is at least all fp32 weights plus the largest component again. A floor: the
    tracer's graph, the verification's activations and ONNX Runtime's session come on top: "fits" asks for
    MARGIN_BYTES of headroom above the floor.
    """
    fp32 = {k: 4 * v for k, v in counts.items()}
    largest = max(fp32.values())
    floor = sum(fp32.values()) + largest
    vae = fp32["vae"]  # the decoder and encoder together hold about the whole VAE
    return {
        "parameters": counts,
        "fp32_bytes": fp32,
        "bundle_fp32_bytes": sum(fp32.values()),
        # --precision fp16: the VAE stays fp32 (force_upcast), the rest halves
        "bundle_fp16_bytes": sum(v // 2 for k, v in fp32.items() if k != "vae") + vae,
        "export_peak_floor_bytes": floor,
        "ram_bytes": ram_bytes,
        "headroom_bytes": ram_bytes - floor,
        "fits": ram_bytes - floor >= MARGIN_BYTES,
    }


def ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def write_model(out: Path, seed: int = 0, force: bool = False, quick: bool = False) -> dict[str, int]:
    """Save the pipeline (safetensors) to OUT; returns the parameter count per component."""
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    pipe = build_pipeline(seed, quick)
    counts = parameter_counts(pipe)
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    return counts


def export_command(model: Path, bundle: Path, size: int | None) -> list[str]:
    """The user's command: fp16, --low-memory, txt2img (no VAE encoder), classifier-free guidance, batch 1."""
    cmd = [
        sys.executable, "-m", "export.build", "--model", str(model), "--out", str(bundle), "--precision", "fp16",
        "--low-memory", "--backend", "onnxruntime", "--pipelines", "txt2img", "--guidance", "cfg",
    ]  # fmt: skip
    return cmd + (["--height", str(size), "--width", str(size)] if size else [])


def measure_export(model: Path, bundle: Path, size: int | None = None) -> dict[str, Any]:
    """Run the export as a child process; its wall time, peak RSS and the bundle's files (bytes)."""
    from .runtime_bench import bundle_size, machine

    cmd = export_command(model.resolve(), bundle.resolve(), size)
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=REPO)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"export failed (exit {code}) after {seconds:.0f} s, peak RSS {usage.ru_maxrss / 2**20:.1f} GiB")
    files = sorted(f for f in bundle.rglob("*") if f.is_file())
    return {
        "command": ["python", *cmd[1:]],
        "export_s": seconds,
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # KiB on Linux
        "bundle_bytes": bundle_size(bundle),
        "files": {str(f.relative_to(bundle)): f.stat().st_size for f in files if f.stat().st_size > 2**20},
        "machine": machine(),
    }


def stage_times(bundle: Path) -> dict[str, Any]:
    """Each component of a bundle, one ONNX Runtime session at a time, timed on one call with the gate's fixed inputs.

    Why not benchmarks.runtime_bench: on a CPU, ONNX Runtime computes fp16 in fp32 and its graph optimisations fold
    fp32 copies of every fp16 weight; the four full-size SDXL sessions together passed this 24 GiB machine (the
    run was stopped). Here each session is created without graph optimisations (the casts stay in the graph, run per
    call), timed, and closed before the next: the per-stage figures of a 1024x1024 run, not the pipeline's.
    """
    import resource

    import onnxruntime as ort

    from export.inputs import fixed_inputs
    from runtime.bundle import load_manifest

    manifest = load_manifest(bundle)
    figures: dict[str, Any] = {"bundle": str(bundle), "graph_optimization_level": "ORT_DISABLE_ALL", "stages": {}}
    for name, component in manifest.components.items():
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        t0 = time.perf_counter()
        session = ort.InferenceSession(str(bundle / component.file), options, providers=["CPUExecutionProvider"])
        load = time.perf_counter() - t0
        feed = fixed_inputs(component.inputs, name, manifest.vae.scaling_factor)
        t0 = time.perf_counter()
        session.run(None, feed)
        call = time.perf_counter() - t0
        del session
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        figures["stages"][name] = {"load_s": load, "call_s": call, "peak_rss_bytes_so_far": rss}
        print(f"  {name:<15} load {load:6.1f} s  one call {call:7.1f} s  peak RSS so far {rss / 2**30:.2f} GiB", flush=True)
    return figures


def report(figures: dict[str, Any]) -> str:
    gib = 2**30
    lines = [f"{'component':<15} {'parameters':>14} {'fp32':>10}"]
    for name in COMPONENTS:
        lines.append(f"{name:<15} {figures['parameters'][name]:>14,} {figures['fp32_bytes'][name] / gib:>8.2f} GiB")
    lines += [
        f"bundle: {figures['bundle_fp32_bytes'] / gib:.2f} GiB fp32, {figures['bundle_fp16_bytes'] / gib:.2f} GiB fp16 (VAE kept fp32)",
        f"fp32 export peak, at least: {figures['export_peak_floor_bytes'] / gib:.1f} GiB (all fp32 weights + the UNet's ONNX copy); "
        f"this machine: {figures['ram_bytes'] / gib:.1f} GiB, headroom {figures['headroom_bytes'] / gib:.1f} GiB -> "
        + ("fits" if figures["fits"] else f"does not fit (less than the {MARGIN_BYTES / gib:.0f} GiB margin)"),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sdxl", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model folder to write (default %(default)s, gitignored)")
    p.add_argument("--seed", type=int, default=0, help="torch seed for the random weights (default 0)")
    p.add_argument("--force", action="store_true", help="replace an existing folder")
    p.add_argument("--estimate", action="store_true", help="only count parameters and estimate the export's memory (allocates nothing)")
    p.add_argument("--results", type=Path, help="JSON file for the estimate")
    p.add_argument("--quick", action="store_true", help="the tiny stand-in instead of the full size (smoke test)")
    p.add_argument("--export-to", type=Path, metavar="BUNDLE", help="then export the model folder to BUNDLE (fp16, --low-memory)")
    p.add_argument("--export-results", type=Path, help="JSON file for the export's figures")
    p.add_argument("--stage-times", type=Path, metavar="BUNDLE", help="only time each component of BUNDLE, one session at a time")
    p.add_argument("--size", type=int, help="the bundle's image size (default: the model's native size, 1024 at full size)")
    args = p.parse_args(argv)
    if args.stage_times:
        timed = stage_times(args.stage_times)
        if args.export_results:
            args.export_results.parent.mkdir(parents=True, exist_ok=True)
            args.export_results.write_text(json.dumps(timed, indent=2) + "\n")
        return 0
    figures = estimate(parameter_counts(build_pipeline(args.seed, args.quick, meta=True)), ram())
    print(report(figures))
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(figures, indent=2) + "\n")
    if args.estimate:
        return 0
    if not (args.export_to and (args.out / "model_index.json").exists()):
        t0 = time.perf_counter()
        try:
            counts = write_model(args.out, args.seed, args.force, args.quick)
        except FileExistsError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        total = ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in counts.items())
        print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s: {total} parameters")
    if args.export_to:
        measured = measure_export(args.out, args.export_to, args.size)
        gib = 2**30
        print(
            f"export: {measured['export_s']:.0f} s, peak RSS {measured['peak_rss_bytes'] / gib:.2f} GiB, "
            f"bundle {measured['bundle_bytes'] / gib:.2f} GiB"
        )
        for name, size in measured["files"].items():
            print(f"  {name:<32} {size / gib:6.2f} GiB")
        if args.export_results:
            args.export_results.parent.mkdir(parents=True, exist_ok=True)
            args.export_results.write_text(json.dumps(measured, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
