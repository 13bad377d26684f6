"""python -m benchmarks.compare: our runtime against diffusers, stage by stage, on one model.

Each system (benchmarks.systems) runs in its own worker process, all children of this one; they
take turns, one generation at a time, in a rotating order, with the same prompt, initial latents
(drawn once by the runtime's seed contract), sampler (the model's own scheduler), steps and
guidance. Prints each stage and the ratios, checks that the images agree, and writes JSON and a
markdown report.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime import atomic

from .footprint import DIFFUSERS_TORCH, RUNTIME, footprint
from .runtime_bench import STAGE_LABELS, STAGES, add_run_options, fmt_seconds, machine, machine_line, summarise
from .systems import SYSTEMS

REPO = Path(__file__).resolve().parent.parent
REFERENCE_MODEL = REPO / "models" / "shapes-ldm"
# results/bench/ holds the published figures: a run writes there only when asked (--out results/bench)
DEFAULT_OUT = REPO / "out" / "bench"
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}  # max abs pixel difference on [0, 1], as the parity tests


class WorkerError(RuntimeError):
    """A worker process failed to load or to generate."""


class Worker:
    """One system in a child process (benchmarks.worker), spoken to in JSON lines."""

    def __init__(self, system: str, model: Path, bundle: Path, device: str | None):
        self.system = system
        cmd = [sys.executable, "-m", "benchmarks.worker", system, "--model", str(model.resolve()), "--bundle", str(bundle.resolve())]
        self.proc = subprocess.Popen(
            cmd + (["--device", device] if device else []), cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.ready = self._reply()

    def _reply(self) -> dict[str, Any]:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            raise WorkerError(f"{self.system}: the worker exited (code {self.proc.wait()}) without answering; its stderr is above")
        reply = json.loads(line)
        if "error" in reply:
            raise WorkerError(reply["error"])
        return reply

    def ask(self, request: Mapping[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=120)


def rotation(systems: Sequence[str], round_index: int) -> list[str]:
    """Round r starts with system r mod n, so no system always runs first (or right after another)."""
    k = round_index % len(systems)
    return list(systems[k:]) + list(systems[:k])


def shown(path: Path) -> str:
    """A path as results record it: relative to the repository where it lies inside it."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def agreement(images: Mapping[str, np.ndarray], tolerance: float) -> dict[str, Any]:
    """Max abs pixel difference of every other system's image against ours (and against diffusers-torch)."""
    pairs = {}
    names = list(images)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            diff = max_abs_diff(images[a], images[b])
            pairs[f"{a} vs {b}"] = {"max_abs_diff": diff, "agree": diff <= tolerance}
    return {"tolerance": tolerance, "pairs": pairs, "all_agree": all(p["agree"] for p in pairs.values())}


def ratios(systems: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """ours / other, per stage median: below 1 means ours is faster."""
    if "ours" not in systems:
        return {}
    ours = systems["ours"]["summary"]
    out = {}
    for name, result in systems.items():
        if name == "ours":
            continue
        theirs = result["summary"]
        out[name] = {k: ours[k]["median"] / theirs[k]["median"] for k in (*STAGES, "unet_total") if theirs[k]["median"] > 0}
    return out


def run_comparison(
    model: Path, bundle: Path, systems: Sequence[str], *, prompt: str, steps: int, guidance_scale: float, seed: int,
    warmup: int, runs: int, device: str | None, work: Path, log: Any = print,
) -> dict[str, Any]:  # fmt: skip
    """Start the workers one after another, run warm-up then counted rounds, collect figures and images."""
    from runtime import load_manifest
    from runtime.pipeline import initial_latents

    manifest = load_manifest(bundle, verify_files=False)
    latents_path = work / "latents.npy"
    np.save(latents_path, initial_latents(manifest.latent_shape, seed))
    workers: dict[str, Worker] = {}
    failed: dict[str, str] = {}
    try:
        for name in systems:  # one at a time, so no load competes with another for the cores
            try:
                workers[name] = Worker(name, model, bundle, device)
                log(f"{name}: loaded in {workers[name].ready['load_s']:.1f} s")
            except WorkerError as e:
                failed[name] = str(e)
                log(f"{name}: {e}")
        counted: dict[str, list[dict[str, Any]]] = {name: [] for name in workers}
        last: dict[str, dict[str, Any]] = {}
        for r in range(warmup + runs):
            for name in rotation(list(workers), r):
                if name in failed:
                    continue
                request = {"prompt": prompt, "steps": steps, "guidance_scale": guidance_scale, "latents": str(latents_path)}
                request["image_out"] = str(work / f"{name}.npy")
                try:
                    reply = workers[name].ask(request)
                except WorkerError as e:
                    failed[name] = str(e)
                    log(f"{name}: {e}")
                    continue
                last[name] = reply
                if r >= warmup:
                    counted[name].append(reply["figures"])
                log(
                    f"{'warm-up' if r < warmup else 'run'} {r + 1 - (0 if r < warmup else warmup)} {name}: "
                    f"{reply['figures']['total']:.3f} s"
                )
    finally:
        for w in workers.values():
            w.close()
    results = {}
    for name, figures in counted.items():
        if name in failed or not figures:
            continue
        results[name] = {
            "providers": workers[name].ready["providers"],
            "load_s": workers[name].ready["load_s"],
            "peak_rss_after_load_bytes": workers[name].ready["peak_rss_bytes"],
            "peak_rss_bytes": last[name]["peak_rss_bytes"],
            "device_memory_bytes": last[name]["device_memory_bytes"],
            "runs": figures,
            "summary": summarise(figures),
        }
    images = {name: np.load(work / f"{name}.npy") for name in results}
    precision = manifest.precision
    return {
        "model": shown(model),
        "bundle": shown(bundle),
        "precision": precision,
        "image": {"height": manifest.height, "width": manifest.width, "batch_size": manifest.batch_size},
        "scheduler": manifest.scheduler.class_name,
        "settings": {
            "prompt": prompt,
            "steps": steps,
            "guidance_scale": guidance_scale,
            "seed": seed,
            "warmup": warmup,
            "runs": runs,
            "device": device or "default",
        },
        "systems": results,
        "failed": failed,
        "ratios": ratios(results),
        "agreement": agreement(images, TOLERANCE.get(precision, 5e-2)) if len(images) > 1 else None,
    }


def markdown(result: Mapping[str, Any]) -> str:
    """Stage table (median over counted runs, spread in brackets), ratios, memory, agreement, footprint."""
    systems, ratio = result["systems"], result["ratios"]
    names, others = list(systems), list(ratio)
    settings, image = result["settings"], result["image"]
    gib = 2**30
    header = ["stage", *names, *(f"ours / {o}" for o in others)]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for stage in (*STAGES, "unet_total"):
        label = "UNet, all calls" if stage == "unet_total" else STAGE_LABELS[stage]
        cells = [
            f"{fmt_seconds(systems[n]['summary'][stage]['median'])} (±{50 * systems[n]['summary'][stage]['rel_spread']:.0f}%)"
            for n in names
        ]
        stage_ratios = (f"{ratio[o].get(stage, float('nan')):.2f}x" for o in others)
        rows.append("| " + " | ".join([label, *cells, *stage_ratios]) + " |")

    def row(label: str, cells: Iterable[str]) -> str:
        """A table row of one figure per system, its ratio columns left empty."""
        return f"| {label} | " + " | ".join(cells) + " |" + " |" * len(others)

    summary = {n: systems[n]["summary"] for n in names}
    rows.append(row("UNet calls per run", (str(summary[n]["unet_calls_per_run"]) for n in names)))
    rows.append(row("host per step / UNet call", (f"{100 * summary[n]['host_share_of_unet_call']['median']:.2f}%" for n in names)))
    rows.append(row("images/s", (f"{summary[n]['images_per_s']['median']:.3g}" for n in names)))
    rows.append(row("load", (f"{systems[n]['load_s']:.2f} s" for n in names)))
    rows.append(row("peak RSS (process)", (f"{systems[n]['peak_rss_bytes'] / gib:.2f} GiB" for n in names)))
    lines = [
        f"# benchmarks.compare: {Path(result['model']).name}",
        "",
        f"{image['height']}x{image['width']}, batch {image['batch_size']}, {result['precision']} bundle `{Path(result['bundle']).name}`; "
        f"{settings['steps']} steps of the model's {result['scheduler']}, guidance {settings['guidance_scale']}, seed {settings['seed']}, "
        f"prompt {settings['prompt']!r}; {settings['warmup']} warm-up round(s) not counted, {settings['runs']} counted, "
        "systems alternating in a rotating order, one worker process each. Median over counted runs (± half the min-max spread).",
        "",
        *rows,
        "",
        *(f"- {n}: {', '.join(systems[n]['providers'])}" for n in names),
    ]
    for name, why in result["failed"].items():
        lines.append(f"- {name} did not run: {why}")
    if result["agreement"]:
        a = result["agreement"]
        pairs = "; ".join(f"{k}: {v['max_abs_diff']:.2e}" for k, v in a["pairs"].items())
        lines.append(
            f"- images (max abs pixel difference on [0, 1], tolerance {a['tolerance']:g}): "
            f"{pairs} -> {'agree' if a['all_agree'] else 'DISAGREE'}"
        )
    device = [f"{n} {systems[n]['device_memory_bytes'] / gib:.2f} GiB" for n in names if systems[n]["device_memory_bytes"] is not None]
    lines.append("- device memory: " + (", ".join(device) if device else "not measured (no NVIDIA GPU here)"))
    if "footprint" in result:
        f = result["footprint"]
        ours, theirs = f["runtime"]["total_bytes"], f["diffusers_torch"]["total_bytes"]
        lines.append(
            f"- install footprint: runtime + ONNX Runtime {ours / 2**20:.0f} MiB "
            f"({', '.join(f['runtime']['roots'])} and their requirements) vs "
            f"diffusers + torch {theirs / 2**20:.0f} MiB ({', '.join(f['diffusers_torch']['roots'])} and theirs): {ours / theirs:.2f}x"
        )
    lines += ["", machine_line(result["machine"])]
    return "\n".join(lines) + "\n"


def default_bundle(model: Path, precision: str) -> Path:
    manifest_model = model.resolve().name
    matches = sorted((REPO / "engines").glob(f"{manifest_model}-*-b1-{precision}-onnxruntime"))
    if not matches:
        raise FileNotFoundError(
            f"no {precision} ONNX Runtime bundle of {model} under engines/; build one with "
            f"`python -m export.build --model {model} --precision {precision} --backend onnxruntime`, or pass --bundle"
        )
    return matches[0]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description="Our runtime (ONNX Runtime) against diffusers' StableDiffusionPipeline (torch) and diffusers' "
        "OnnxStableDiffusionPipeline (ONNX Runtime, on the bundle's ONNX files): same model, prompt, latents, sampler, "
        "steps and guidance, alternating in one process tree. Writes JSON and a markdown table.",
    )
    p.add_argument("--model", type=Path, default=REFERENCE_MODEL, help="diffusers model folder (default: the reference model)")
    p.add_argument("--bundle", type=Path, help="bundle exported from --model (default: engines/<model>-*-b1-<precision>-onnxruntime)")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="which default bundle to pick (default %(default)s)")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS), help="what to run (default: all)")
    add_run_options(p, out=DEFAULT_OUT, warmup=1, name="compare-<model folder name>", each="round")
    p.add_argument("--quick", action="store_true", help="smoke mode: 2 steps, no warm-up, 1 counted round")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.runs = 2, 0, 1
    if args.runs < 1 or args.warmup < 0 or args.steps < 1:
        print(f"error: need --runs >= 1, --warmup >= 0 and --steps >= 1 (got {args.runs}, {args.warmup}, {args.steps})", file=sys.stderr)
        return 2
    say = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    try:
        bundle = args.bundle or default_bundle(args.model, args.precision)
        with tempfile.TemporaryDirectory(prefix="compare-") as tmp:
            result = run_comparison(
                args.model, bundle, args.systems, prompt=args.prompt, steps=args.steps, guidance_scale=args.guidance_scale,
                seed=args.seed, warmup=args.warmup, runs=args.runs, device=args.device, work=Path(tmp), log=say,
            )  # fmt: skip
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not result["systems"]:
        print(f"error: no system ran: {result['failed']}", file=sys.stderr)
        return 1
    result["footprint"] = {"runtime": footprint(RUNTIME), "diffusers_torch": footprint(DIFFUSERS_TORCH)}
    result["machine"] = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"compare-{args.model.resolve().name}"
    atomic.write_json(args.out / f"{stem}.json", result, indent=2)
    atomic.write_text(args.out / f"{stem}.md", markdown(result))
    print(markdown(result))
    say(f"wrote {args.out / stem}.json and .md")
    if result["agreement"] and not result["agreement"]["all_agree"]:
        say("error: the images disagree beyond the tolerance (see the table)")
        return 1
    return 0 if not result["failed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
