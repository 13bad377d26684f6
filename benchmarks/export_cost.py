"""python -m benchmarks.export_cost: what building a bundle costs: wall time, peak memory, bundle size.

Runs `python -m export.build` as a child process, exactly as a user would, and reads the
child's peak resident memory from the kernel (wait4's rusage) when it exits.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from runtime import atomic

from .runtime_bench import bundle_size, machine

REPO = Path(__file__).resolve().parent.parent


def build_command(model: Path, precision: str, out: Path, force: bool) -> list[str]:
    cmd = [
        sys.executable, "-m", "export.build",
        "--model", str(model), "--precision", precision, "--backend", "onnxruntime", "--out", str(out),
    ]  # fmt: skip
    return cmd + (["--force"] if force else [])


def measure_export(model: Path, precision: str, out: Path, force: bool = False) -> dict[str, Any]:
    """Run the export in a child; its wall time, peak RSS (bytes) and the bundle it wrote."""
    cmd = build_command(model, precision, out, force)
    t0 = time.perf_counter()
    child = subprocess.Popen(build_command(model.resolve(), precision, out.resolve(), force), cwd=REPO)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - t0
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"export failed (exit {child.returncode}): {' '.join(cmd[1:])}")
    files = sorted(f for f in out.rglob("*") if f.is_file())
    return {
        "command": ["python", *cmd[1:]],
        "model": str(model),
        "precision": precision,
        "bundle": str(out),
        "export_s": seconds,
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # KiB on Linux
        "bundle_bytes": bundle_size(out),
        "files": {str(f.relative_to(out)): f.stat().st_size for f in files if f.stat().st_size > 2**20},
        "machine": machine(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.export_cost", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="diffusers model folder")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="bundle precision (default %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.add_argument("--results", type=Path, required=True, help="JSON file for the figures")
    args = p.parse_args(argv)
    try:
        figures = measure_export(args.model, args.precision, args.out, args.force)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.results.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(args.results, figures, indent=2)
    print(
        f"export {figures['export_s']:.0f} s, peak RSS {figures['peak_rss_bytes'] / 2**30:.2f} GiB, "
        f"bundle {figures['bundle_bytes'] / 2**30:.2f} GiB -> {args.results}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
