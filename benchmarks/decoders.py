"""python -m benchmarks.decoders --bundle B: the full VAE decoder against the tiny one (and the preview map), timed
interleaved in one process on the same latents, so a shared machine's load falls on both alike.

    python -m benchmarks.decoders --bundle engines/shapes-ldm-lcm-tiny --rounds 200 --out results/speed-levers/decode

Each round decodes one latent batch with every decoder in turn (the order alternating between rounds); the
table gives each one's median and quartiles, and its median as a multiple of the full decoder's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.runtime_bench import machine, machine_line


def time_decoders(pipe: Any, rounds: int, warmup: int = 5, seed: int = 0) -> dict[str, list[float]]:
    """Seconds per decode of one latent batch, per decoder: full, tiny (if the bundle has one), preview map."""
    from runtime.preview import linear_preview

    latents = np.random.default_rng(seed).standard_normal(pipe.manifest.latent_shape, dtype=np.float32)
    runs: dict[str, Any] = {"full": lambda: pipe.decode(latents, "full")}
    if "vae_decoder_tiny" in pipe.manifest.components:
        runs["tiny"] = lambda: pipe.decode(latents, "tiny")
    if pipe.manifest.levers.preview is not None:
        runs["preview map"] = lambda: linear_preview(latents, pipe.manifest.levers.preview)
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for r in range(warmup + rounds):
        for name in order if r % 2 else reversed(order):
            t0 = time.perf_counter()
            runs[name]()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def table(times: dict[str, list[float]]) -> str:
    full = float(np.median(times["full"]))
    lines = ["| decoder | median | 25% | 75% | vs full |", "|---|---|---|---|---|"]
    for name, ts in times.items():
        q1, med, q3 = np.percentile(ts, [25, 50, 75])
        lines.append(f"| {name} | {med * 1e3:.2f} ms | {q1 * 1e3:.2f} ms | {q3 * 1e3:.2f} ms | {med / full:.3f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decoders", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True, help="an engine bundle (with --tiny-vae for the tiny row)")
    p.add_argument("--rounds", type=int, default=200, help="timed rounds (default 200)")
    p.add_argument("--out", type=Path, help="write decode.md and decode.json here")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    import runtime

    with runtime.Pipeline.load(args.bundle) as pipe:
        times = time_decoders(pipe, args.rounds)
    m = machine()
    report = f"{args.rounds} interleaved rounds, bundle {args.bundle.name}\n\n{table(times)}\n{machine_line(m)}\n"
    print(report)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "decode.md").write_text(report)
        summary = {name: {"median_s": float(np.median(ts)), "times_s": ts} for name, ts in times.items()}
        (args.out / "decode.json").write_text(json.dumps({"bundle": str(args.bundle), "machine": m, "decoders": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
