"""python -m benchmarks.engine_build: each engine of a bundle built alone, in a fresh process: seconds, size, peak memory.

`--from-onnx` builds every component in one process, so its peak memory is the largest engine's plus what
the earlier ones left behind. Here each component's ONNX goes through the same builder (export.tensorrt,
TensorRT for RTX by default: no GPU needed) in a child process of its own, which reports its wall time, the
engine's size and its own peak RSS. Nothing is written to the bundle; the engines are thrown away.

    python -m benchmarks.engine_build --bundle engines/sd15-random-512x512-b1-fp16-onnxruntime --out results/tensorrt-rtx
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .runtime_bench import machine, machine_line


def build_one(bundle: Path, name: str, backend: str, level: int) -> dict[str, Any]:
    """In the child: build one component's engine as --from-onnx would, and measure it."""
    from export.tensorrt.builder import build_engine, builder_settings
    from export.tensorrt.from_onnx import onnx_component, plan_precisions
    from runtime.backends.libraries import LIBRARIES
    from runtime.bundle import load_manifest

    library = LIBRARIES[backend]
    manifest = load_manifest(bundle, verify_files=False)
    src = onnx_component(manifest.components[name])
    precision = plan_precisions(manifest, {name: src}, bundle, manifest.source_precision, 10, library)[name]
    t0 = time.perf_counter()
    plan = build_engine(
        name, bundle / src.file, src.inputs, precision, builder_settings(optimization_level=level), None, src.outputs, library=library
    )
    return {
        "seconds": time.perf_counter() - t0,
        "bytes": len(plan),
        "precision": precision.name,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "library_version": str(library.load().__version__),
    }


def in_child(bundle: Path, name: str, backend: str, level: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.engine_build", "--child", str(bundle), name, backend, str(level)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        killed = " (killed by a signal: out of memory?)" if done.returncode < 0 else ""
        return {"error": f"exit status {done.returncode}{killed}: " + " | ".join(done.stderr.strip().splitlines()[-2:])}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def table(rows: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| engine | precision | build | engine size | peak memory (its process) |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | | failed: {r['error']} | | |")
        else:
            size, peak = r["bytes"] / 2**20, r["peak_rss_bytes"] / 2**30
            lines.append(f"| {name} | {r['precision']} | {r['seconds']:.1f} s | {size:.1f} MiB | {peak:.2f} GiB |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.engine_build", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, help="an ONNX bundle (or a TensorRT bundle: the ONNX it carries)")
    p.add_argument(
        "--backend", choices=("tensorrt-rtx", "tensorrt"), default="tensorrt-rtx", help="which TensorRT builds (default %(default)s)"
    )
    p.add_argument("--components", help="comma-separated components to build (default: all)")
    p.add_argument("--builder-optimization-level", type=int, default=3, metavar="N", help="0 to 5 (default %(default)s)")
    p.add_argument("--out", type=Path, default=Path("out") / "engine-build", help="folder for the JSON and Markdown results")
    p.add_argument("--child", nargs=4, metavar=("BUNDLE", "COMPONENT", "BACKEND", "LEVEL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        bundle, name, backend, level = args.child
        print(json.dumps(build_one(Path(bundle), name, backend, int(level))))
        return 0
    if args.bundle is None:
        p.error("--bundle is required")
    from runtime.bundle import load_manifest

    names = list(load_manifest(args.bundle, verify_files=False).components)
    if args.components:
        asked = [n.strip() for n in args.components.split(",") if n.strip()]
        unknown = [n for n in asked if n not in names]
        if unknown:
            p.error(f"--components: {args.bundle} has no {', '.join(unknown)} (it has {', '.join(names)})")
        names = asked
    rows = {}
    for name in names:
        rows[name] = in_child(args.bundle, name, args.backend, args.builder_optimization_level)
        print(f"{name}: {rows[name]}", flush=True)
    result = {
        "command": ["python", "-m", "benchmarks.engine_build", *(argv if argv is not None else sys.argv[1:])],
        "bundle": str(args.bundle), "backend": args.backend, "optimization_level": args.builder_optimization_level,
        "engines": rows, "machine": machine(),
    }  # fmt: skip
    stem = f"engine-build-{args.bundle.name}-{args.backend}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = "\n".join(
        [f"# benchmarks.engine_build: {args.bundle.name} ({args.backend})", "", *table(rows), "", machine_line(result["machine"])]
    )
    (args.out / f"{stem}.md").write_text(text + "\n")
    print(text)
    return 0 if not any("error" in r for r in rows.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
