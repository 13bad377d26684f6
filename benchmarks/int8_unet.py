"""python -m benchmarks.int8_unet: int8 vs fp32 UNet call time on ONNX Runtime, interleaved in one process.

From an fp32 ONNX Runtime bundle: record calibration inputs from real sampling runs (as --precision int8
does), quantize a copy of its UNet with export.int8.quantize (float nodes by the rules; --float-convs N adds
the sweep), then time fp32 and int8 calls alternately on the same recorded mid-trajectory input, so
load changes on a shared machine hit both alike. Reports calibration and quantization time, the
quantization step's peak memory (measured in a child process), and the UNet file sizes.

    python -m benchmarks.int8_unet --bundle engines/sd15-random-512x512-b1-fp32-onnxruntime \\
        --calibration-size 1 --calls 3 --out results/int8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def quantize_step(source: str, target: str, feeds: list[dict[str, np.ndarray]], float_convs: int, placement: str) -> dict[str, Any]:
    """Calibration pass + QDQ rewrite; run in a child process (--child), so its peak RSS is this step's alone."""
    import onnx

    from export.int8 import quantize

    where = quantize.PLACEMENTS[placement]()
    model = onnx.load(source, load_external_data=False)
    kept = quantize.float_rules(model)
    with tempfile.TemporaryDirectory(prefix="int8-bench-") as tmp:
        copy = quantize.working_copy(Path(source), Path(tmp) / "fp32")
        ranges = Path(tmp) / "ranges.json"
        t0 = time.perf_counter()
        quantize.calibrate(copy, feeds, quantize.calibration_tensors(model, exclude=sorted(kept)), ranges)
        calibrate_s = time.perf_counter() - t0
        calibrate_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if float_convs > 0:
            errors, _ = quantize.sensitivity(copy, feeds, where, quantize.candidates(model, kept), ranges)
            kept |= {n: "sensitive" for n in quantize.most_sensitive(errors, float_convs)}
        quantize.quantize(copy, Path(target), feeds, where, exclude=sorted(kept), ranges=ranges)
    return {
        "seconds": time.perf_counter() - t0,
        "calibration_pass_seconds": calibrate_s,
        "calibration_pass_peak_rss_bytes": calibrate_rss,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "float_nodes": len(kept),
    }


def save_feeds(path: Path, feeds: list[dict[str, np.ndarray]]) -> None:
    np.savez(path, **{f"{i}/{k}": v for i, f in enumerate(feeds) for k, v in f.items()})


def load_feeds(path: Path) -> list[dict[str, np.ndarray]]:
    with np.load(path) as z:
        rows: dict[int, dict[str, np.ndarray]] = {}
        for key in z.files:
            i, name = key.split("/", 1)
            rows.setdefault(int(i), {})[name] = z[key]
    return [rows[i] for i in sorted(rows)]


def record(bundle: Path, generations: int, steps: int) -> list[dict[str, np.ndarray]]:
    """UNet inputs of real sampling runs, as --precision int8 records them."""
    from export.int8 import calibration
    from runtime.pipeline import Pipeline

    prompts = calibration.read_prompts(calibration.DEFAULT_PROMPTS).prompts
    with Pipeline.load(bundle, device="cpu", verify=False) as pipe:
        rec = calibration.Recording()
        calibration.generate(pipe, calibration.plan(prompts, generations), steps, rec)
    return rec.feeds


def record_in_child(bundle: Path, generations: int, steps: int, tmp: Path) -> list[dict[str, np.ndarray]]:
    """Record in a fresh interpreter: a full-size bundle's sessions leave this process GBs it never gives back,
    which the quantization child then lacked (it died, out of memory, beside a 13.4 GB parent)."""
    feeds_file = tmp / "recorded.npz"
    cmd = [sys.executable, "-m", "benchmarks.int8_unet", "--calibration-size", str(generations), "--steps", str(steps)]
    done = subprocess.run([*cmd, "--record-child", str(bundle), str(feeds_file)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"recording failed with exit status {done.returncode}: {done.stderr[-2000:]}")
    return load_feeds(feeds_file)


def quantize_in_child(
    source: Path, target: Path, feeds: list[dict[str, np.ndarray]], float_convs: int, placement: str, tmp: Path
) -> dict[str, Any]:
    """A fresh interpreter (not a multiprocessing pool: one spawned from this many-threaded process hung once)."""
    feeds_file = tmp / "feeds.npz"
    if not feeds_file.is_file():
        save_feeds(feeds_file, feeds)
    child = [str(source), str(target), str(feeds_file), str(float_convs), placement]
    cmd = [sys.executable, "-m", "benchmarks.int8_unet", "--child", *child]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        killed = " (killed by a signal: out of memory?)" if done.returncode < 0 else ""
        raise RuntimeError(f"quantization failed with exit status {done.returncode}{killed}: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def onnx_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.int8_unet", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, help="an fp32 ONNX Runtime bundle (python -m export.build --precision fp32)")
    p.add_argument("--calibration-size", type=int, default=1, help="generations recorded for calibration, 20 steps each (default 1)")
    p.add_argument("--float-convs", type=int, default=0, help="most sensitive convs kept float by a sweep (default 0: rules only)")
    p.add_argument("--calls", type=int, default=3, help="timed calls per precision, after one warm-up each (default 3)")
    p.add_argument("--out", type=Path, default=Path("out") / "int8", help="folder for the JSON and Markdown results")
    p.add_argument("--steps", type=int, default=20, help="sampling steps of the recorded generations (default %(default)s)")
    p.add_argument(
        "--placements",
        default="asymmetric",
        help="comma-separated int8 graphs to time against fp32 and each other: symmetric (zero points 0, float bias: what "
        "TensorRT parses and what the exporter writes), asymmetric (u8 activations with zero points) (default %(default)s)",
    )
    p.add_argument("--child", nargs=5, metavar=("SOURCE", "TARGET", "FEEDS", "N", "PLACEMENT"), help=argparse.SUPPRESS)
    p.add_argument("--record-child", nargs=2, metavar=("BUNDLE", "FEEDS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        source, target, feeds, n, placement = args.child
        print(json.dumps(quantize_step(source, target, load_feeds(Path(feeds)), int(n), placement)))
        return 0
    if args.record_child:
        bundle, feeds = args.record_child
        save_feeds(Path(feeds), record(Path(bundle), args.calibration_size, args.steps))
        return 0
    if args.bundle is None:
        p.error("--bundle is required")

    from benchmarks.runtime_bench import machine, machine_line
    from export.int8 import quantize
    from runtime.backends.onnxruntime import OrtEngine
    from runtime.bundle import read_bundle

    placements = [name.strip() for name in args.placements.split(",") if name.strip()]
    unknown = [name for name in placements if name not in quantize.PLACEMENTS]
    if unknown or not placements:
        p.error(f"--placements {args.placements}: choose from {', '.join(quantize.PLACEMENTS)}")
    load = list(os.getloadavg())
    manifest, _ = read_bundle(args.bundle, verify_files=False)
    unet = manifest.components["unet"]
    if unet.precision != "fp32":
        print(f"error: {args.bundle} has a {unet.precision} UNet; give an fp32 bundle", file=sys.stderr)
        return 2
    source = args.bundle / unet.file
    # one int8 graph keeps the old names (int8); several are told apart by placement (int8-symmetric, ...)
    names = {pl: "int8" if len(placements) == 1 else f"int8-{pl}" for pl in placements}
    with tempfile.TemporaryDirectory(prefix="int8-unet-") as tmp:
        t0 = time.perf_counter()
        feeds = record_in_child(args.bundle, args.calibration_size, args.steps, Path(tmp))
        record_s = time.perf_counter() - t0
        print(f"recorded {len(feeds)} UNet inputs in {record_s:.1f} s")
        files, steps = {"fp32": source}, {}
        for pl, name in names.items():
            files[name] = Path(tmp) / f"unet-{name}.onnx"
            steps[name] = quantize_in_child(source, files[name], feeds, args.float_convs, pl, Path(tmp))
            print(f"{name}: quantized in {steps[name]['seconds']:.1f} s, peak RSS {steps[name]['peak_rss_bytes'] / 2**30:.2f} GiB")
        sizes = {name: onnx_bytes(f) for name, f in files.items()}
        feed = feeds[len(feeds) // 2]
        engines = {name: OrtEngine(unet, f, device="cpu") for name, f in files.items()}
        times: dict[str, list[float]] = {name: [] for name in engines}
        for engine in engines.values():
            engine(feed)  # warm-up
        for _ in range(args.calls):
            for name, engine in engines.items():
                t = time.perf_counter()
                engine(feed)
                times[name].append(time.perf_counter() - t)
        outs = {name: np.asarray(engine(feed)[unet.outputs[0].name], dtype=np.float64) for name, engine in engines.items()}
    rel = {name: float(np.linalg.norm(outs[name] - outs["fp32"]) / np.linalg.norm(outs["fp32"])) for name in names.values()}
    med = {k: statistics.median(v) for k, v in times.items()}
    first = names[placements[0]]
    result = {
        "command": ["python", "-m", "benchmarks.int8_unet", *(argv if argv is not None else sys.argv[1:])],
        "bundle": str(args.bundle),
        "unet_input": {t.name: list(t.shape) for t in unet.inputs},
        "calibration": {"generations": args.calibration_size, "steps": args.steps, "unet_inputs": len(feeds), "seconds": record_s},
        "placements": {name: quantize.PLACEMENTS[pl]().record() for pl, name in names.items()},
        "quantization": steps[first] if len(names) == 1 else steps,
        "unet_bytes": sizes,
        "size_ratio": sizes[first] / sizes["fp32"],
        "call_seconds": times,
        "median_call_seconds": med,
        "int8_over_fp32_time": med[first] / med["fp32"],
        "over_fp32_time": {name: med[name] / med["fp32"] for name in names.values()},
        "rel_l2_mid_trajectory": rel[first] if len(names) == 1 else rel,
        "machine": {**machine(), "vnni": quantize.has_vnni(), "load_average_at_start": load},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"int8-unet-{args.bundle.name}" + ("" if len(names) == 1 else "-" + "-".join(placements))
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = "\n".join([f"# benchmarks.int8_unet: {args.bundle.name}", "", *table_rows(args.calls, med, sizes, names), ""])
    notes = []
    for pl, name in names.items():
        q, where = steps[name], result["placements"][name]
        notes += [
            f"- {name} ({pl}: {where['activations']} activations, {where['weights']} weights, reduce_range {where['reduce_range']}): "
            f"relative L2 vs fp32 on the timed input {rel[name]:.4f}; quantization ({q['float_nodes']} float nodes) "
            f"{q['seconds']:.1f} s, peak RSS {q['peak_rss_bytes'] / 2**30:.2f} GiB (child process); its calibration pass "
            f"{q['calibration_pass_seconds']:.1f} s, peak RSS {q['calibration_pass_peak_rss_bytes'] / 2**30:.2f} GiB"
        ]
    notes.append(
        f"- calibration: {len(feeds)} UNet inputs from {args.calibration_size} generation(s), recorded in {record_s:.1f} s; "
        f"this CPU {'has' if result['machine']['vnni'] else 'lacks'} VNNI"
    )
    table += "\n".join([*notes, "", machine_line(result["machine"])])
    (args.out / f"{stem}.md").write_text(table + "\n")
    print(table)
    return 0


def table_rows(calls: int, med: dict[str, float], sizes: dict[str, int], names: dict[str, str]) -> list[str]:
    """fp32 and each int8 graph side by side; every ratio is against fp32."""
    cols = ["fp32", *names.values()]
    return [
        "| | " + " | ".join(cols) + " | " + " | ".join(f"{c} / fp32" for c in names.values()) + " |",
        "|---" * (1 + len(cols) + len(names)) + "|",
        f"| UNet call (median of {calls}, interleaved) | "
        + " | ".join(f"{med[c]:.3f} s" for c in cols)
        + " | "
        + " | ".join(f"{med[c] / med['fp32']:.2f}x" for c in names.values())
        + " |",
        "| UNet file | "
        + " | ".join(f"{sizes[c] / 2**20:.1f} MiB" for c in cols)
        + " | "
        + " | ".join(f"{sizes[c] / sizes['fp32']:.2f}x" for c in names.values())
        + " |",
    ]

if __name__ == "__main__":
    raise SystemExit(main())
