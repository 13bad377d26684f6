"""python -m benchmarks.levers --bundle B: the speed levers timed interleaved in one process, so a shared machine's
load falls on every variant alike: the full VAE decoder against the tiny one and the preview map (same latents),
and whole txt2img generations per steps x cache interval x decoder.

    python -m benchmarks.levers --bundle B --rounds 200 --out results/speed-levers/decode
    python -m benchmarks.levers --bundle B --generate --steps 50 20 --cache-interval 1 2 3 5 --rounds 5 --out DIR
    python -m benchmarks.levers --bundle B --unet --rounds 200 --out DIR      # one call of each UNet

Each round runs every variant once, in an order that alternates between rounds; a table gives each one's
median and quartiles, and its median as a multiple of the first variant's (the full decoder; cache interval 1).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.runtime_bench import machine, machine_line

PROMPT = "a small red circle in the top left on a black background"


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


def time_unets(pipe: Any, rounds: int, warmup: int = 5, seed: int = 0) -> dict[str, list[float]]:
    """Seconds per engine call of the plain UNet and DeepCache's pair, on the same random inputs."""
    from runtime.bundle.levers import DEEP_FEATURE, DEEP_UNET, SHALLOW_UNET

    rng = np.random.default_rng(seed)
    engines = {name: pipe.engine(name) for name in ("unet", DEEP_UNET, SHALLOW_UNET)}
    specs = {t.name: t for e in engines.values() for t in e.component.inputs}
    values = {n: (rng.standard_normal(t.shape) * (500 if n == "timestep" else 1)).astype(t.dtype) for n, t in specs.items()}
    feeds = {name: {t.name: values[t.name] for t in e.component.inputs} for name, e in engines.items()}
    assert DEEP_FEATURE in feeds[SHALLOW_UNET]
    times: dict[str, list[float]] = {name: [] for name in engines}
    order = list(engines)
    for r in range(warmup + rounds):
        for name in order if r % 2 else reversed(order):
            t0 = time.perf_counter()
            engines[name](feeds[name])
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def time_generations(
    pipe: Any, variants: dict[str, dict[str, Any]], rounds: int, warmup: int = 1, guidance_scale: float = 5.0
) -> dict[str, list[float]]:
    """Seconds per txt2img call, per variant (its keywords: steps, cache_interval, decoder, scheduler)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for r in range(warmup + rounds):
        for name in order if r % 2 else reversed(order):
            t0 = time.perf_counter()
            pipe.txt2img(PROMPT, seed=r, guidance_scale=guidance_scale, output_type="np", **variants[name])
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def table(times: dict[str, list[float]], what: str = "decoder") -> str:
    first = float(np.median(next(iter(times.values()))))
    lines = [f"| {what} | median | 25% | 75% | vs first |", "|---|---|---|---|---|"]
    for name, ts in times.items():
        q1, med, q3 = np.percentile(ts, [25, 50, 75])
        lines.append(f"| {name} | {med * 1e3:.2f} ms | {q1 * 1e3:.2f} ms | {q3 * 1e3:.2f} ms | {med / first:.3f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.levers", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True, help="an engine bundle (--tiny-vae for the tiny rows, --deepcache for intervals)")
    p.add_argument("--rounds", type=int, default=200, help="timed rounds (default 200)")
    p.add_argument("--generate", action="store_true", help="time whole generations instead of the decoders")
    p.add_argument("--unet", action="store_true", help="time one call of the UNet and of DeepCache's two (a --deepcache bundle)")
    p.add_argument("--steps", type=int, nargs="+", default=[50], help="--generate: step counts (default 50)")
    p.add_argument("--cache-interval", type=int, nargs="+", default=[1], help="--generate: DeepCache intervals (default 1)")
    p.add_argument("--decoder", nargs="+", default=["full"], choices=("full", "tiny"), help="--generate: decoders (default full)")
    p.add_argument("--scheduler", help="--generate: sampler (default: the bundle's)")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="--generate: guidance (default 5; <= 1 for a --guidance none bundle)")
    p.add_argument("--out", type=Path, help="write decode.md/.json (generate.md/.json with --generate) here")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    import runtime

    with runtime.Pipeline.load(args.bundle) as pipe:
        if args.generate:
            sampler = {"scheduler": args.scheduler} if args.scheduler else {}
            variants = {
                f"{s} steps, cache {c}, {d}": {"steps": s, "cache_interval": c, "decoder": d, **sampler}
                for s in args.steps for c in args.cache_interval for d in args.decoder
            }
            times, what, name = time_generations(pipe, variants, args.rounds, guidance_scale=args.guidance_scale), "generation", "generate"
        elif args.unet:
            times, what, name = time_unets(pipe, args.rounds), "UNet", "unet"
        else:
            times, what, name = time_decoders(pipe, args.rounds), "decoder", "decode"
    m = machine()
    report = f"{args.rounds} interleaved rounds, bundle {args.bundle.name}\n\n{table(times, what)}\n{machine_line(m)}\n"
    print(report)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{name}.md").write_text(report)
        summary = {k: {"median_s": float(np.median(ts)), "times_s": ts} for k, ts in times.items()}
        settings = {"guidance_scale": args.guidance_scale} if args.generate else {}
        record = {"bundle": str(args.bundle), "machine": m, **settings, what: summary}
        (args.out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
