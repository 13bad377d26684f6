"""python -m benchmarks.triton_load BUNDLE: a bounded load test of the Triton-served bundle against the runtime in one process.

Run it with the serving environment's Python from the checkout (`.venv-triton/bin/python -m benchmarks.triton_load ...`):
it needs tritonclient, and the runtime with numpy and onnxruntime for the in-process baseline.
It starts `python -m serving BUNDLE` on free loopback ports (or uses --url's server), sends CLIENTS concurrent
clients x REQUESTS requests each (mixed prompts, a distinct seed per request, equal steps/guidance so requests may
share a UNet batch), and checks that every request was answered without error and that every image equals the
runtime's own (`Pipeline.txt2img(prompt, seed=seed)`, first image) for the same prompt and seed. Then it runs the
same requests in this process, one `txt2img` call each, then BATCH requests per call (`latents` from each seed), and
prints a table: throughput, p50/p95/p99 latency, and what Triton's metrics endpoint and statistics say about
queueing and batching. --out DIR writes the figures as JSON and the table as Markdown. A bounded run: a fixed
request count, a deadline (--timeout), loopback only, and the server it started is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PROMPTS = (
    "a large red circle on a white background",
    "a small blue square in the top left corner",
    "a green triangle at the bottom",
    "a yellow circle and a purple square",
    "two orange triangles side by side",
)
MODEL = "ldm"
METRICS = (
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_request_duration_us",
)


@dataclass(frozen=True)
class Request:
    prompt: str
    seed: int
    steps: int
    negative_prompt: str = ""
    guidance_scale: float | None = None
    scheduler: str | None = None

    def options(self) -> dict[str, Any]:
        """txt2img's keywords for this request."""
        extra: dict[str, Any] = {"guidance_scale": self.guidance_scale} if self.guidance_scale is not None else {}
        return {"seed": self.seed, "steps": self.steps, **extra, **({"scheduler": self.scheduler} if self.scheduler else {})}


@dataclass
class Result:
    image: np.ndarray | None
    error: str | None
    seconds: float


def tensors(client_module: Any, request: Request) -> list[Any]:
    """The request as Triton inputs, each [1, 1]."""
    values: list[tuple[str, Any, str]] = [
        ("prompt", np.array([[request.prompt.encode()]], dtype=object), "BYTES"),
        ("negative_prompt", np.array([[request.negative_prompt.encode()]], dtype=object), "BYTES"),
        ("seed", np.array([[request.seed]], dtype=np.int64), "INT64"),
        ("steps", np.array([[request.steps]], dtype=np.int32), "INT32"),
    ]
    if request.guidance_scale is not None:
        values.append(("guidance_scale", np.array([[request.guidance_scale]], dtype=np.float32), "FP32"))
    if request.scheduler:
        values.append(("scheduler", np.array([[request.scheduler.encode()]], dtype=object), "BYTES"))
    return [raw_input(client_module, name, value, dtype) for name, value, dtype in values]


def raw_input(client_module: Any, name: str, value: np.ndarray, dtype: str) -> Any:
    tensor = client_module.InferInput(name, list(value.shape), dtype)
    tensor.set_data_from_numpy(value)
    return tensor


def client_module(protocol: str) -> Any:
    """tritonclient's module for 'http' or 'grpc' (imported here: it is installed in the serving environment only)."""
    if protocol not in ("http", "grpc"):
        raise ValueError(f"protocol {protocol!r}: http or grpc")
    import importlib

    return importlib.import_module(f"tritonclient.{protocol}")


def client(protocol: str, url: str) -> tuple[Any, Any]:
    """(the tritonclient module, a client) for 'http' or 'grpc'."""
    module = client_module(protocol)
    return module, module.InferenceServerClient(url)


def infer(protocol: str, url: str, inputs: Sequence[Any] | Request, model: str = MODEL) -> Result:
    """One request; its error message (not an exception) where the server refused it."""
    module, conn = client(protocol, url)
    start = time.perf_counter()
    try:
        given = tensors(module, inputs) if isinstance(inputs, Request) else list(inputs)
        answer = conn.infer(model, given)
        return Result(answer.as_numpy("image")[0], None, time.perf_counter() - start)
    except Exception as e:  # tritonclient raises InferenceServerException with the server's message
        return Result(None, str(e), time.perf_counter() - start)
    finally:
        conn.close()


def run_load(protocol: str, url: str, requests: Sequence[Sequence[Request]], timeout_s: float) -> tuple[list[list[Result]], float]:
    """Each client sends its requests one after another; clients run concurrently. Returns results and wall seconds."""
    deadline = time.monotonic() + timeout_s

    def one_client(mine: Sequence[Request]) -> list[Result]:
        out = []
        for r in mine:
            if time.monotonic() > deadline:
                out.append(Result(None, f"not sent: the {timeout_s:g} s deadline passed", 0.0))
                continue
            out.append(infer(protocol, url, r))
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        results = list(pool.map(one_client, requests))
    return results, time.perf_counter() - start


def scrape(metrics_url: str, model: str = MODEL) -> dict[str, float]:
    """Triton's Prometheus counters for `model` (summed over versions)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+)\{([^}]*)\}\s+([0-9.eE+-]+)$", line)
        if m and m.group(1) in METRICS and f'model="{model}"' in m.group(2):
            found[m.group(1)] = found.get(m.group(1), 0.0) + float(m.group(3))
    return found


def settled(metrics_url: str, before: Mapping[str, float], answered: int, timeout_s: float = 5.0) -> dict[str, float]:
    """The counters once they count every answered request: a response can reach the client just before Triton counts it."""
    deadline = time.monotonic() + timeout_s
    while True:
        after = scrape(metrics_url)
        done = after.get("nv_inference_request_success", 0.0) - before.get("nv_inference_request_success", 0.0)
        if done >= answered or time.monotonic() > deadline:
            return after
        time.sleep(0.1)


def batch_histogram(protocol: str, url: str, model: str = MODEL) -> dict[int, int]:
    """Executions per batch size, from Triton's statistics extension."""
    module, conn = client(protocol, url)
    try:
        stats = conn.get_inference_statistics(model, as_json=True) if protocol == "grpc" else conn.get_inference_statistics(model)
    finally:
        conn.close()
    model_stats = stats["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in model_stats.get("batch_stats", [])}


def percentiles(seconds: Sequence[float]) -> dict[str, float]:
    a = np.asarray(seconds, dtype=np.float64)
    return {f"p{q}": float(np.percentile(a, q)) for q in (50, 95, 99)} | {"mean": float(a.mean())}


def make_requests(clients: int, per_client: int, steps: int) -> list[list[Request]]:
    return [[Request(PROMPTS[(c + k) % len(PROMPTS)], 1000 * c + k, steps) for k in range(per_client)] for c in range(clients)]


def direct(bundle: Path, flat: Sequence[Request]) -> dict[str, Any]:
    """The same requests in this process: one txt2img call each, then the bundle's batch per call (each row its seed's latents)."""
    from runtime import Pipeline
    from runtime.session import initial_latents

    pipe = Pipeline.load(bundle)
    pipe.txt2img(flat[0].prompt, **flat[0].options())  # warm-up, as the server's first request is not counted either
    images, latencies = [], []
    start = time.perf_counter()
    for r in flat:
        t = time.perf_counter()
        images.append(np.asarray(pipe.txt2img(r.prompt, r.negative_prompt, **r.options())[0]))
        latencies.append(time.perf_counter() - t)
    one = time.perf_counter() - start
    b = pipe.batch_size
    start = time.perf_counter()
    for i in range(0, len(flat), b):
        group = list(flat[i : i + b])
        rows = group + [group[0]] * (b - len(group))
        latents = np.concatenate([initial_latents((1, *pipe.manifest.latent_shape[1:]), r.seed) for r in rows])
        pipe.txt2img([r.prompt for r in rows], [r.negative_prompt for r in rows], latents=latents, steps=group[0].steps)
    batched = time.perf_counter() - start
    pipe.close()
    return {
        "images": images,
        "one_per_call": {"seconds": one, "throughput_rps": len(flat) / one, "latency_s": percentiles(latencies)},
        "batched": {"batch": b, "seconds": batched, "throughput_rps": len(flat) / batched},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """`python -m serving` in a subprocess, on free loopback ports, until stop()."""

    bundle: Path
    extra: Sequence[str] = ()
    ports: dict[str, int] = field(default_factory=lambda: {k: free_port() for k in ("http", "grpc", "metrics")})
    proc: subprocess.Popen[str] | None = None
    log: list[str] = field(default_factory=list)

    def start(self, timeout_s: float = 300.0) -> Server:
        cmd = [sys.executable, "-m", "serving", str(self.bundle), *self.extra]
        cmd += [f"--{k}-port={v}" for k, v in self.ports.items()]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=Path(__file__).parent.parent)
        ready = threading.Event()

        def read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.log.append(line)
                if line.startswith("ready"):
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout_s):
            self.stop()
            raise RuntimeError(f"serving was not ready in {timeout_s:g} s: {''.join(self.log)[-2000:]}")
        return self

    def url(self, protocol: str) -> str:
        return f"127.0.0.1:{self.ports[protocol]}"

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


def table(report: Mapping[str, Any]) -> str:
    s, d = report["served"], report["direct"]
    rows = [
        ("Triton (serving), " + report["protocol"], s["throughput_rps"], s["latency_s"]),
        ("runtime in one process, 1 request per call", d["one_per_call"]["throughput_rps"], d["one_per_call"]["latency_s"]),
    ]
    lines = [
        f"Load test: {report['bundle']} (batch {report['batch']}), {report['clients']} clients x {report['per_client']} requests, "
        f"{report['steps']} steps, {report['cpu_count']} CPU cores "
        f"(1-minute load average {report['load_average_1m']['before']:.1f} before, {report['load_average_1m']['after']:.1f} after)",
        "",
        "| setting | requests/s | p50 s | p95 s | p99 s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, rps, lat in rows:
        lines.append(f"| {name} | {rps:.2f} | {lat['p50']:.3f} | {lat['p95']:.3f} | {lat['p99']:.3f} |")
    lines.append(f"| runtime in one process, {d['batched']['batch']} requests per call | {d['batched']['throughput_rps']:.2f} | | | |")
    m = report["metrics"]
    execs = m.get("nv_inference_exec_count", 0.0)
    requests = m.get("nv_inference_count", 0.0)
    lines += [
        "",
        f"answered {s['answered']}/{s['sent']}, errors {s['errors']}, "
        f"images equal to the runtime's own: {s['images_equal']}/{s['answered']}",
        f"Triton metrics over the run: {m.get('nv_inference_request_success', 0):.0f} requests in {execs:.0f} executions "
        f"({requests / max(execs, 1):.2f} requests per execution); per request: mean queue time "
        f"{m.get('nv_inference_queue_duration_us', 0) / max(requests, 1) / 1e3:.1f} ms, mean execution time "
        f"{m.get('nv_inference_compute_infer_duration_us', 0) / max(requests, 1) / 1e3:.1f} ms "
        "(Triton's durations add up per request; each request of a batch counts the whole execution)",
        f"executions by batch size: {report['batch_histogram']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.triton_load", description=__doc__.split("\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=25, help="requests per client")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--url", help="an already running server's host:port for --protocol (default: start serving)")
    p.add_argument("--metrics-url", help="its metrics URL, with --url")
    p.add_argument("--serve-args", default="", help="extra serving flags, e.g. '--instances 2'")
    p.add_argument("--no-direct", action="store_true", help="skip the in-process baseline (and the image check)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds the load may take before the rest is not sent")
    p.add_argument("--out", type=Path, help="write triton-load-<bundle>-<clients>x<requests>-<steps>steps.json and .md here")
    args = p.parse_args(argv)
    requests = make_requests(args.clients, args.requests, args.steps)
    flat = [r for mine in requests for r in mine]
    load_before = os.getloadavg()[0]
    server = None if args.url else Server(args.bundle, args.serve_args.split()).start()
    try:
        url = args.url or server.url(args.protocol)  # type: ignore[union-attr]
        metrics_url = args.metrics_url or f"http://{server.url('metrics')}/metrics"  # type: ignore[union-attr]
        warm = infer(args.protocol, url, flat[0])  # the model's first run (allocations) is not part of the load
        if warm.error:
            raise SystemExit(f"error: the server refused a warm-up request: {warm.error}")
        before = scrape(metrics_url)
        hist_before = batch_histogram(args.protocol, url)
        results, wall = run_load(args.protocol, url, requests, args.timeout)
        after = settled(metrics_url, before, sum(r.error is None for mine in results for r in mine))
        hist_after = batch_histogram(args.protocol, url)
    finally:
        if server is not None:
            server.stop()
    done = [r for mine in results for r in mine]
    answered = [r for r in done if r.error is None]
    errors = sorted({r.error for r in done if r.error is not None})
    served = {
        "sent": len(flat),
        "answered": len(answered),
        "errors": len(done) - len(answered),
        "error_messages": errors[:5],
        "seconds": wall,
        "throughput_rps": len(answered) / wall,
        "latency_s": percentiles([r.seconds for r in answered] or [0.0]),
        "images_equal": None,
    }
    report: dict[str, Any] = {
        "bundle": args.bundle.name,
        "batch": None,
        "protocol": args.protocol,
        "clients": args.clients,
        "per_client": args.requests,
        "steps": args.steps,
        "serve_args": args.serve_args,
        "cpu_count": os.cpu_count(),
        "load_average_1m": {"before": load_before, "after": os.getloadavg()[0]},  # other jobs on the machine skew every figure
        "served": served,
        "metrics": {k: after.get(k, 0.0) - before.get(k, 0.0) for k in METRICS},
        "batch_histogram": {b: n - hist_before.get(b, 0) for b, n in sorted(hist_after.items()) if n - hist_before.get(b, 0)},
    }
    if not args.no_direct:
        base = direct(args.bundle, flat)
        served["images_equal"] = sum(1 for r, ref in zip(done, base["images"]) if r.image is not None and np.array_equal(r.image, ref))
        report["batch"] = base["batched"]["batch"]
        report["direct"] = {k: v for k, v in base.items() if k != "images"}
        print(table(report))
    print(json.dumps({k: v for k, v in report.items() if k != "direct"} | {"direct": report.get("direct")}, default=str, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        serve = re.sub(r"[^A-Za-z0-9]+", "-", args.serve_args).strip("-")  # '--instances 2' -> 'instances-2'
        stem = args.out / f"triton-load-{args.bundle.name}-{args.clients}x{args.requests}-{args.steps}steps{'-' + serve if serve else ''}"
        stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        if "direct" in report:
            stem.with_suffix(".md").write_text(table(report) + "\n")
    ok = served["answered"] == served["sent"] and (args.no_direct or served["images_equal"] == served["sent"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
