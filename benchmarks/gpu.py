"""python -m benchmarks.gpu: one model on an NVIDIA GPU three ways, in fresh processes, side by side.

(a) TensorRT-for-RTX engines (a bundle built with --backend tensorrt-rtx, possibly on another machine: carried over
unchanged), each load in a fresh process: first with an empty runtime cache (just-in-time compilation for this
GPU), then again with the cache that load left; (b) the ONNX Runtime bundle on its CUDA provider (onnxruntime-gpu);
(c) diffusers in fp16 torch, the baseline. Per image (median of --runs after --warmup), per UNet call (median), the
GPU memory the process holds at the end (nvidia-smi), and each load's time. The same prompt, seed, steps (20) and
guidance (7.5) for all; the model's own size (SD 1.5: 512x512), batch 1.

    python -m benchmarks.gpu --rtx-bundle engines/sd15-random-512x512-b1-fp16-tensorrt-rtx \\
        --onnx-bundle engines/sd15-random-512x512-b1-fp16-onnxruntime --model models-generated/sd15-random --out results/gpu

A system that cannot run here (no GPU, a package missing, no bundle given) is a row saying why; with nothing run
the command writes that table and exits 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .runtime_bench import DEFAULT_PROMPT, device_memory_bytes, machine, machine_line, measure

SYSTEMS = ("tensorrt-rtx", "tensorrt-rtx-cached", "onnxruntime-cuda", "diffusers-fp16")
LABELS = {
    "tensorrt-rtx": "TensorRT for RTX, first load (empty runtime cache)",
    "tensorrt-rtx-cached": "TensorRT for RTX, second load (runtime cache)",
    "onnxruntime-cuda": "ONNX Runtime, CUDA provider",
    "diffusers-fp16": "diffusers, fp16 torch",
}


def gpu_here() -> str:
    """'' where nvidia-smi lists a GPU, else why not (what the skipped rows say)."""
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU here (nvidia-smi not found)"
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return f"no NVIDIA GPU here (nvidia-smi failed: {e})"
    return "" if done.returncode == 0 and "GPU" in done.stdout else "no NVIDIA GPU here (nvidia-smi lists none)"


def why_not(system: str, target: Path | None) -> str:
    """Why SYSTEM cannot run here ('' when it can): its input, its packages, then the GPU."""
    if target is None:
        flag = {"diffusers-fp16": "--model"}.get(system, "--onnx-bundle" if system == "onnxruntime-cuda" else "--rtx-bundle")
        return f"not asked for ({flag} not given)"
    if not target.exists():
        return f"{target} does not exist"
    needs = {
        "tensorrt-rtx": ("tensorrt_rtx", "cuda.bindings"),
        "tensorrt-rtx-cached": ("tensorrt_rtx", "cuda.bindings"),
        "onnxruntime-cuda": ("onnxruntime",),
        "diffusers-fp16": ("torch", "diffusers"),
    }[system]
    missing = [m for m in needs if not _installed(m)]
    if missing:
        return f"{', '.join(missing)} not installed"
    return gpu_here()


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


# ---- one system, in a child process --------------------------------------------------------------------


def run_system(system: str, target: Path, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Load and time one system in this process; what the parent reads from the child's last stdout line."""
    request = dict(prompt=settings["prompt"], steps=settings["steps"], guidance_scale=settings["guidance_scale"], seed=settings["seed"])
    if system == "diffusers-fp16":
        return _diffusers(target, request, settings)
    device = "cuda" if system == "onnxruntime-cuda" else None
    if device:
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise RuntimeError("onnxruntime has no CUDA provider here: pip install onnxruntime-gpu")
    result = measure(
        target, scheduler=None, warmup=settings["warmup"], runs=settings["runs"], device=device, cuda_graph=device is None, **request
    )
    s = result["summary"]
    return {
        "image_s": s["total"]["median"],
        "unet_call_s": s["unet_call"]["median"],
        "load_s": result["load_s"],
        "gpu_memory_bytes": result["device_memory_bytes"],
        "providers": result["providers"],
    }


def _diffusers(model: Path, request: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    import statistics
    import time

    import torch

    from .others import DiffusersTorch

    t0 = time.perf_counter()
    system = DiffusersTorch(model, model, device="cuda", half=True)
    load_s = time.perf_counter() - t0
    unet = system.pipe.unet
    size = unet.config.sample_size
    rng = np.random.default_rng(int(request["seed"]))
    latents = rng.standard_normal((1, unet.config.in_channels, size, size)).astype(np.float32)
    runs = [system.generate(dict(request), latents)[0] for _ in range(settings["warmup"] + settings["runs"])][settings["warmup"] :]
    return {
        "image_s": statistics.median(r["total"] for r in runs),
        "unet_call_s": statistics.median(r["unet_call"] for r in runs),
        "load_s": load_s,
        "gpu_memory_bytes": device_memory_bytes(),
        "torch_max_allocated_bytes": int(torch.cuda.max_memory_allocated()),
        "providers": system.providers,
    }


def in_child(system: str, target: Path, settings: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """One system in a fresh interpreter: its own GPU memory, its own just-in-time compilation."""
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--child", system, str(target), json.dumps(dict(settings))]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, check=False)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]}
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


# ---- the table ---------------------------------------------------------------------------------------------


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def table(rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Markdown rows: each system's figures, or why it did not run; per image also against diffusers fp16."""
    base = rows.get("diffusers-fp16", {}).get("image_s")
    lines = [
        "| system | per image | per UNet call | GPU memory held | load | per image / diffusers fp16 |",
        "|---|---|---|---|---|---|",
    ]
    for system in SYSTEMS:
        r = rows.get(system, {})
        if "image_s" not in r:
            lines.append(f"| {LABELS[system]} | {r.get('skipped') or r.get('error', 'not run')} | | | | |")
            continue
        mem = r.get("gpu_memory_bytes")
        ratio = f"{r['image_s'] / base:.2f}x" if base else "-"
        lines.append(
            f"| {LABELS[system]} | {_ms(r['image_s'])} | {_ms(r['unet_call_s'])} | "
            f"{'-' if mem is None else f'{mem / 2**30:.2f} GiB'} | {_ms(r['load_s'])} | {ratio} |"
        )
    return lines


def markdown(result: Mapping[str, Any]) -> str:
    s = result["settings"]
    head = [
        f"# benchmarks.gpu: {result['name']}",
        "",
        f"{s['steps']} steps, guidance {s['guidance_scale']}, batch 1, seed {s['seed']}; medians of {s['runs']} runs after "
        f"{s['warmup']} warm-up; each system in a fresh process.",
        "",
    ]
    return "\n".join([*head, *table(result["systems"]), "", machine_line(result["machine"])]) + "\n"


# ---- the command ---------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--rtx-bundle", type=Path, help="a TensorRT-for-RTX bundle (python -m export.build --backend tensorrt-rtx)")
    p.add_argument("--onnx-bundle", type=Path, help="an ONNX Runtime bundle of the same model, run on the CUDA provider")
    p.add_argument("--model", type=Path, help="the diffusers model folder, run by diffusers in fp16 torch")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default %(default)s)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (default %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="generations not counted, per system (default %(default)s)")
    p.add_argument("--runs", type=int, default=3, help="counted generations per system (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out") / "gpu", help="folder for the JSON and Markdown results")
    p.add_argument("--child", nargs=3, metavar=("SYSTEM", "TARGET", "SETTINGS"), help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.child:
        system, target, settings = args.child
        print(json.dumps(run_system(system, Path(target), json.loads(settings))))
        return 0
    settings = {"prompt": DEFAULT_PROMPT, "steps": args.steps, "guidance_scale": args.guidance_scale, "seed": args.seed}
    settings |= {"warmup": args.warmup, "runs": args.runs}
    targets = {
        "tensorrt-rtx": args.rtx_bundle, "tensorrt-rtx-cached": args.rtx_bundle,
        "onnxruntime-cuda": args.onnx_bundle, "diffusers-fp16": args.model,
    }  # fmt: skip
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="rtx-runtime-cache-") as cache:
        for system in SYSTEMS:
            target = targets[system]
            reason = why_not(system, target)
            if reason or target is None:
                rows[system] = {"skipped": reason}
                continue
            print(f"{LABELS[system]} ...", flush=True)
            # both TensorRT-for-RTX rows use one fresh cache folder: empty for the first load, filled for the second
            rows[system] = in_child(system, target, settings, {"LDM_DEPLOY_RUNTIME_CACHE": cache})
    names = [Path(t).name for t in (args.rtx_bundle, args.onnx_bundle, args.model) if t is not None]
    result = {"name": names[0] if names else "nothing", "settings": settings, "systems": rows, "machine": machine()}
    result["command"] = ["python", "-m", "benchmarks.gpu", *(argv if argv is not None else sys.argv[1:])]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"gpu-{result['name']}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (args.out / f"gpu-{result['name']}.md").write_text(text)
    print(text, end="")
    if not any("image_s" in r for r in rows.values()):
        print(f"error: nothing ran: {next(iter(r.get('skipped') or r.get('error') for r in rows.values()))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
