"""python -m benchmarks.runtime_bench: per-stage time, memory and footprint of one bundle on this machine.

Stages are timed from outside the pipeline: every engine is wrapped in a timing proxy that
keeps the Engine protocol, and the sampler's per-step callback marks the end of each step, so
host time per step is the step's wall time minus the UNet time inside it (guidance mix,
scheduler update, casts and copies). Warm-up runs are not counted; figures are the median and
spread over the counted runs. Torch-free, like runtime/ itself, which never imports this module:
it runs on a Jetson with only the runtime installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.sampling import SAMPLERS

DEFAULT_BUNDLE = Path("engines") / "shapes-ldm-64x64-b1-fp32-onnxruntime"
# results/bench/ holds the published figures: a run writes there only when asked (--out results/bench)
DEFAULT_OUT = Path("out") / "bench"
DEFAULT_PROMPT = "a large red circle on a white background"
# per-run figures, in the order the tables show them (seconds unless the name says otherwise)
STAGES = ("text_encoder", "unet_call", "host_per_step", "vae_decode", "total")
STAGE_LABELS = {
    "text_encoder": "text encoder",
    "unet_call": "UNet call (each)",
    "host_per_step": "host per step (outside engines)",
    "vae_decode": "VAE decode",
    "total": "total (end to end)",
}


@dataclass(frozen=True)
class Call:
    """One engine call: which component, and when it started and ended (perf_counter seconds)."""

    name: str
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


class TimedEngine:
    """An Engine that records every call's span in a shared log; everything else passes through."""

    def __init__(self, engine: Any, log: list[Call], name: str | None = None):
        self.engine, self.log = engine, log
        self.name = name or engine.component.name

    @property
    def component(self) -> Any:
        return self.engine.component

    def __call__(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        out = self.engine(feed)
        self.log.append(Call(self.name, start, time.perf_counter()))
        return out

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.engine, attr)


def instrument(pipe: Any) -> list[Call]:
    """Wrap a loaded Pipeline's engines in timing proxies; returns the log they append to."""
    log: list[Call] = []
    pipe.engines = {name: TimedEngine(engine, log, name) for name, engine in pipe.engines.items()}
    return log


def run_figures(calls: Sequence[Call], step_ends: Sequence[float], start: float, end: float, batch: int = 1) -> dict[str, Any]:
    """One generation's stages from its engine calls and step marks.

    Step i spans from the previous step's end (the first from the last text encoder call's end) to its
    own end mark; its host time is that span minus the UNet calls that started inside it.
    """
    unet = [c for c in calls if c.name == "unet"]
    encoder_end = max((c.end for c in calls if c.name == "text_encoder"), default=start)
    host, previous = [], encoder_end
    for mark in step_ends:
        inside = sum(c.seconds for c in unet if previous <= c.start < mark)
        host.append(mark - previous - inside)
        previous = mark
    total = end - start
    return {
        "text_encoder": sum(c.seconds for c in calls if c.name == "text_encoder"),
        "unet_call": statistics.median(c.seconds for c in unet) if unet else 0.0,
        "unet_calls": len(unet),
        "unet_total": sum(c.seconds for c in unet),
        "host_per_step": statistics.median(host) if host else 0.0,
        "host_per_step_all": host,
        "host_total": sum(host),
        "steps": len(step_ends),
        "vae_decode": sum(c.seconds for c in calls if c.name == "vae_decoder"),
        "total": total,
        "images_per_s": batch / total if total > 0 else 0.0,
    }


def spread(values: Iterable[float]) -> dict[str, float]:
    """Median, min, max and the relative spread (max - min) / median of the counted runs."""
    v = sorted(float(x) for x in values)
    if not v:
        raise ValueError("no counted runs to summarise: use --runs 1 or more")
    median = statistics.median(v)
    return {"median": median, "min": v[0], "max": v[-1], "rel_spread": (v[-1] - v[0]) / median if median else 0.0, "n": len(v)}


def summarise(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per stage (and images/s, host share of the UNet call) across counted runs."""
    keys = (*STAGES, "images_per_s", "unet_total", "host_total")
    out: dict[str, Any] = {k: spread(r[k] for r in runs) for k in keys}
    out["host_share_of_unet_call"] = spread(r["host_per_step"] / r["unet_call"] for r in runs if r["unet_call"] > 0)
    out["unet_calls_per_run"] = runs[0]["unet_calls"]
    out["steps"] = runs[0]["steps"]
    return out


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def device_memory_bytes() -> int | None:
    """GPU memory this process holds, from nvidia-smi; None where there is no NVIDIA GPU or driver tool."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    for line in done.stdout.splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip() == str(os.getpid()):
            return int(float(mib)) * 2**20
    return 0


def import_seconds(statement: str = "import runtime", repeats: int = 5, cwd: Path | None = None) -> dict[str, float]:
    """Time STATEMENT in fresh interpreters (interpreter start-up not counted); median and spread."""
    probe = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    times = []
    for _ in range(repeats):
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=cwd, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"`{statement}` failed in a fresh interpreter: {done.stderr.strip().splitlines()[-1:]}")
        times.append(float(done.stdout.strip().splitlines()[-1]))
    return spread(times)


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, RAM, OS, load, GPU, package versions."""
    from importlib import metadata

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(_meminfo_kib("MemTotal") / 2**20, 1) if _meminfo_kib("MemTotal") else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpu": _gpu_name(),
        "packages": {},
    }
    packages = (
        "numpy", "tokenizers", "onnxruntime", "onnxruntime-gpu", "tensorrt", "tensorrt-rtx-cu13", "torch", "diffusers", "transformers",
    )  # fmt: skip
    for package in packages:
        try:
            info["packages"][package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _meminfo_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _gpu_name() -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else None


def timed_txt2img(pipe: Any, log: list[Call], **options: Any) -> tuple[dict[str, Any], np.ndarray]:
    """One generation through an instrumented Pipeline: its stage figures and its images."""
    log.clear()
    marks: list[float] = []
    start = time.perf_counter()
    images = pipe.txt2img(callback=lambda *_: marks.append(time.perf_counter()), output_type="np", **options)
    end = time.perf_counter()
    return run_figures(list(log), marks, start, end, pipe.batch_size), images


def measure(
    bundle: Path, *, prompt: str, steps: int, guidance_scale: float, seed: int, scheduler: str | None, warmup: int, runs: int,
    device: str | None = None, on_run: Callable[[str], None] = lambda _: None, cuda_graph: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Load BUNDLE, run warm-up then counted generations; stage figures, memory and footprint.

    cuda_graph: a TensorRT bundle's UNet call as a CUDA graph (Pipeline.load's option)."""
    from runtime.pipeline import Pipeline

    if runs < 1 or warmup < 0 or steps < 1:
        raise ValueError(f"need --runs >= 1, --warmup >= 0 and --steps >= 1 (got {runs}, {warmup}, {steps})")
    t0 = time.perf_counter()
    pipe = Pipeline.load(bundle, device=device, **({"cuda_graph": True} if cuda_graph else {}))
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_bytes()
    log = instrument(pipe)
    options = dict(prompt=prompt, steps=steps, guidance_scale=guidance_scale, seed=seed, scheduler=scheduler)
    for i in range(warmup):
        timed_txt2img(pipe, log, **options)
        on_run(f"warm-up {i + 1}/{warmup} done")
    counted = []
    for i in range(runs):
        figures, _ = timed_txt2img(pipe, log, **options)
        counted.append(figures)
        on_run(f"run {i + 1}/{runs}: {figures['total']:.3f} s")
    providers = sorted({p for e in pipe.engines.values() for p in getattr(e, "providers", [])})
    return {
        "bundle": str(bundle),
        "bundle_bytes": bundle_size(bundle),
        "precision": pipe.manifest.precision,
        "image": {"height": pipe.height, "width": pipe.width, "batch_size": pipe.batch_size},
        "backend": pipe.manifest.backend,
        "providers": providers,
        "settings": {**options, "warmup": warmup, "runs": runs},
        "load_s": load_s,
        "peak_rss_after_load_bytes": rss_loaded,
        "peak_rss_bytes": peak_rss_bytes(),
        "device_memory_bytes": device_memory_bytes(),
        "runs": counted,
        "summary": summarise(counted),
    }


def bundle_size(bundle: Path) -> int:
    return sum(f.stat().st_size for f in Path(bundle).rglob("*") if f.is_file())


def fmt_seconds(s: float) -> str:
    """Human units for a table cell: µs under a millisecond, ms under a second, else s."""
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def stage_table(summary: Mapping[str, Any]) -> list[str]:
    """Markdown rows: one per stage, median with min-max and relative spread."""
    rows = ["| stage | median | min | max | spread |", "|---|---|---|---|---|"]
    for stage in STAGES:
        s = summary[stage]
        rows.append(
            f"| {STAGE_LABELS[stage]} | {fmt_seconds(s['median'])} | {fmt_seconds(s['min'])} | {fmt_seconds(s['max'])} | "
            f"{100 * s['rel_spread']:.1f}% |"
        )
    ips = summary["images_per_s"]
    rows.append(f"| images/s | {ips['median']:.3g} | {ips['min']:.3g} | {ips['max']:.3g} | {100 * ips['rel_spread']:.1f}% |")
    return rows


def markdown(result: Mapping[str, Any]) -> str:
    """The bench result as a markdown report: settings, stage table, memory, import time, machine."""
    s, m, settings = result["summary"], result["machine"], result["settings"]
    image = result["image"]
    gib = 2**30
    device_mem = result["device_memory_bytes"]
    lines = [
        f"# benchmarks.runtime_bench: {Path(result['bundle']).name}",
        "",
        f"{image['height']}x{image['width']}, batch {image['batch_size']}, {result['precision']}, {result['backend']} "
        f"({', '.join(result['providers']) or 'n/a'}); {settings['steps']} steps "
        f"({s['unet_calls_per_run']} UNet calls) of {settings['scheduler'] or 'the model default sampler'}, "
        f"guidance {settings['guidance_scale']}, seed {settings['seed']}; {settings['warmup']} warm-up run(s) not counted, "
        f"{settings['runs']} counted.",
        "",
        *stage_table(s),
        "",
        f"- host time per step: {100 * s['host_share_of_unet_call']['median']:.3f}% of a UNet call",
        f"- load (sessions created): {result['load_s']:.2f} s; bundle {result['bundle_bytes'] / 2**20:.1f} MiB",
        f"- peak resident memory: {result['peak_rss_after_load_bytes'] / gib:.2f} GiB after load, "
        f"{result['peak_rss_bytes'] / gib:.2f} GiB after the runs",
        "- device memory: " + ("not measured (no NVIDIA GPU here)" if device_mem is None else f"{device_mem / gib:.2f} GiB (nvidia-smi)"),
        f"- `import runtime`: {fmt_seconds(result['import']['import runtime']['median'])}; "
        f"`from runtime import Pipeline` (numpy, samplers): {fmt_seconds(result['import']['from runtime import Pipeline']['median'])} "
        f"(fresh interpreters, median of {result['import']['import runtime']['n']})",
        "",
        machine_line(m),
    ]
    return "\n".join(lines) + "\n"


def machine_line(m: Mapping[str, Any]) -> str:
    packages = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    gpu = f"GPU {m['gpu']}" if m.get("gpu") else "no GPU"
    load = m.get("load_average_at_start")
    shared = f" Load average {load[0]:.2f} at start: a shared machine, so timings are indicative." if load else ""
    return f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {gpu}; {m['os']}; Python {m['python']}; {packages}.{shared}"


def write_results(result: Mapping[str, Any], out: Path, stem: str) -> tuple[Path, Path]:
    """STEM.json (everything) and STEM.md (the report) under OUT."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(markdown(result))
    return json_path, md_path


def publish(result: Mapping[str, Any], text: str, out: Path, stem: str) -> None:
    """A benchmark's report printed, and written with its figures as STEM.md and STEM.json under OUT."""
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(text)
    print(f"wrote {out / stem}.json and .md", file=sys.stderr)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.runtime_bench",
        description="Time one engine bundle stage by stage (text encoder, each UNet call, host time per step, VAE decode, "
        "total), with peak memory and `import runtime` time; writes JSON and a markdown table.",
    )
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="engine bundle folder (default %(default)s)")
    add_run_options(p, out=DEFAULT_OUT, warmup=2, name="runtime-<bundle folder name>")
    p.add_argument(
        "--scheduler", choices=sorted(SAMPLERS), help="sampler (default: the one the model's scheduler config names)"
    )
    p.add_argument("--import-runs", type=int, default=7, help="fresh interpreters timing `import runtime` (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="smoke mode: 2 steps, 1 warm-up, 2 counted runs, 2 import probes")
    return p


def add_run_options(p: argparse.ArgumentParser, *, out: Path, warmup: int, name: str, each: str = "run") -> None:
    """The options every benchmark command shares: what to generate, how often, where to write.

    EACH names what --warmup and --runs count: a "run" is one generation, compare's "round" one per system.
    """
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt (default %(default)r)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps per generation (default %(default)s)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance scale (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial latents (default %(default)s)")
    p.add_argument("--warmup", type=int, default=warmup, help=f"uncounted warm-up {each}s (default %(default)s)")
    p.add_argument("--runs", type=int, default=5, help=f"counted {each}s (default %(default)s)")
    p.add_argument("--device", choices=("cpu", "cuda", "tensorrt"), help="execution device (default: cuda where installed, else cpu)")
    p.add_argument("--out", type=Path, default=out, help="folder for NAME.json and NAME.md (default %(default)s)")
    p.add_argument("--name", help=f"file stem (default {name})")


def main(argv: list[str] | None = None) -> int:
    from runtime.errors import BundleError

    args = parser().parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.runs, args.import_runs = 2, 1, 2, 2
    say = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    try:
        result = measure(
            args.bundle, prompt=args.prompt, steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
            scheduler=args.scheduler, warmup=args.warmup, runs=args.runs, device=args.device, on_run=say,
        )  # fmt: skip
        here = Path(__file__).resolve().parent.parent
        result = {
            **result,
            "import": {
                stmt: import_seconds(stmt, args.import_runs, cwd=here) for stmt in ("import runtime", "from runtime import Pipeline")
            },
            "machine": machine(),
        }
    except (BundleError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    json_path, md_path = write_results(result, args.out, args.name or f"runtime-{args.bundle.resolve().name}")
    print(markdown(result))
    say(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
