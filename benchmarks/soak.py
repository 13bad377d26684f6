"""python -m benchmarks.soak: does a long-lived process stay flat? N generations on one pipeline, then M load/close cycles.

An embedded app loads a bundle once and generates for days, or reloads it on every request. Either way
its resident memory, threads and open files must level off, not grow. This records all three at
intervals and compares the second half of each phase with its first: growth is reported, never
asserted (a shared machine's allocator noise is not a leak). Torch-free, like the runtime.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from runtime import atomic
from runtime.sampling import SAMPLERS

DEFAULT_OUT = Path("out") / "bench"  # results/bench/ only when asked (--out results/bench)
SAMPLES = 10  # readings per phase


def reading() -> dict[str, float]:
    """This process's resident memory (MiB), threads and open file descriptors, from /proc."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {
        "rss_mib": int(status["VmRSS"].split()[0]) / 1024,
        "threads": int(status["Threads"]),
        "fds": len(os.listdir("/proc/self/fd")),
    }


def phase(name: str, count: int, step: Any) -> dict[str, Any]:
    """Run step(i) count times, reading the process every count/SAMPLES steps."""
    every = max(1, count // SAMPLES)
    readings, start = [], time.perf_counter()
    for i in range(count):
        step(i)
        if (i + 1) % every == 0 or i + 1 == count:
            readings.append({"done": i + 1, "seconds": round(time.perf_counter() - start, 2), **reading()})
    half = len(readings) // 2
    growth = {k: round(readings[-1][k] - readings[half][k], 2) for k in ("rss_mib", "threads", "fds")}
    print(f"{name}: {count} in {readings[-1]['seconds']:.1f} s; second-half growth {growth}", file=sys.stderr)
    return {"count": count, "readings": readings, "second_half_growth": growth}


def soak(bundle: Path, generations: int, cycles: int, steps: int, scheduler: str | None) -> dict[str, Any]:
    from runtime import Pipeline

    before = reading()
    pipe = Pipeline.load(bundle)
    prompts = ["a small red circle on a black background", "a large blue square in the top left on a white background"]

    def generate(i: int) -> None:
        pipe.txt2img(prompts[i % 2], steps=steps, seed=i, scheduler=scheduler, output_type="np")

    generating = phase("generations", generations, generate)
    pipe.close()

    def load_close(i: int) -> None:
        with Pipeline.load(bundle) as p:
            p.txt2img(prompts[0], steps=1, seed=i, output_type="latent")

    loading = phase("load/close cycles", cycles, load_close)
    return {
        "bundle": str(bundle), "steps": steps, "scheduler": scheduler, "before_load": before,
        "generations": generating, "load_close_cycles": loading,
    }  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    rows = [
        "| phase | count | seconds | RSS MiB first / middle / last | threads last | fds last | 2nd-half growth (RSS MiB, threads, fds) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("generations", "load_close_cycles"):
        p = result[name]
        r = p["readings"]
        g = p["second_half_growth"]
        rss = f"{r[0]['rss_mib']:.0f} / {r[len(r) // 2]['rss_mib']:.0f} / {r[-1]['rss_mib']:.0f}"
        rows.append(
            f"| {name.replace('_', ' ')} | {p['count']} | {r[-1]['seconds']:.0f} | {rss} | {r[-1]['threads']} | {r[-1]['fds']} | "
            f"{g['rss_mib']:+.1f}, {g['threads']:+d}, {g['fds']:+d} |"
        )
    return f"`python -m benchmarks.soak --bundle {result['bundle']}` ({result['steps']} steps per image)\n\n" + "\n".join(rows) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.splitlines()[0])
    default = Path("engines") / "shapes-ldm-64x64-b1-fp16-onnxruntime"
    p.add_argument("--bundle", type=Path, default=default, help="bundle folder (default %(default)s)")
    p.add_argument("--generations", type=int, default=500, help="images generated on one pipeline (default %(default)s)")
    p.add_argument("--cycles", type=int, default=400, help="load/close cycles, one step each (default %(default)s)")
    p.add_argument("--steps", type=int, default=4, help="sampling steps per image (default %(default)s)")
    p.add_argument("--scheduler", choices=sorted(SAMPLERS), help="sampler (default: the model's)")
    p.add_argument("--quick", action="store_true", help="20 generations and 10 cycles: the tests' mode")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for soak.json and soak.md (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.quick:
        args.generations, args.cycles = 20, 10
    if args.generations < 1 or args.cycles < 1:
        print("error: --generations and --cycles must be at least 1", file=sys.stderr)
        return 2
    from runtime.errors import BundleError

    try:
        result = soak(args.bundle, args.generations, args.cycles, args.steps, args.scheduler)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(args.out / "soak.json", result, indent=2)
    atomic.write_text(args.out / "soak.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
