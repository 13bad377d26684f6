"""End to end: `python -m serving` starts the real Triton server on loopback; tritonclient asks it over HTTP and gRPC.

Every image must equal the runtime's own for the same prompt and seed (`Pipeline.txt2img(...)[0]`, in this process),
bad requests get errors naming the input while the server goes on serving, and SIGTERM leaves no process, no
shared-memory region and no workspace behind. The tests run in file order on one server; the last one stops it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO
from tests.serving.common import alive, cmdline, descendants, free_port, listening, request, send, serving_python

pytestmark = pytest.mark.slow
SHM = Path("/dev/shm")
# 127.0.0.1 as /proc/net/tcp writes it, and as tcp6 writes its IPv4-mapped form ::ffff:127.0.0.1 (gRPC listens so)
LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F"}


@dataclass
class Served:
    proc: subprocess.Popen[str]
    ports: dict[str, int]
    tmpdir: Path  # the launcher's TMPDIR: its workspace goes there
    work: Path
    lines: list[str] = field(default_factory=list)

    def url(self, protocol: str) -> str:
        return f"127.0.0.1:{self.ports[protocol]}"


def own_shm() -> set[str]:
    """The launcher's regions: the Python backend's, under the prefix serving gives it."""
    return {p.name for p in SHM.glob("ldm_serve_*")}


@pytest.fixture(scope="module")
def served(bundle_batch2: Path, tmp_path_factory: pytest.TempPathFactory):
    serving_python()
    work = tmp_path_factory.mktemp("serve")
    tmpdir = work / "tmp"
    tmpdir.mkdir()
    ports = {k: free_port() for k in ("http", "grpc", "metrics")}
    cmd = [sys.executable, "-m", "serving", str(bundle_batch2), *[f"--{k}-port={v}" for k, v in ports.items()]]
    log = open(work / "serve.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "TMPDIR": str(tmpdir)}, stdout=subprocess.PIPE, stderr=log, text=True)
    handle = Served(proc, ports, tmpdir, work)
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            handle.lines.append(line)
            if line.startswith("ready"):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(180):
        proc.kill()
        pytest.fail(f"serving was not ready in 180 s; its log:\n{(work / 'serve.log').read_text()[-4000:]}")
    yield handle
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=90)
    log.close()


@pytest.fixture(scope="module")
def pipe(bundle_batch2: Path):
    from runtime import Pipeline

    with Pipeline.load(bundle_batch2) as p:
        yield p


def runtime_image(pipe, prompt: str, seed: int, steps: int = 4, negative_prompt: str = "", **options) -> np.ndarray:
    return np.asarray(pipe.txt2img(prompt, negative_prompt, seed=seed, steps=steps, **options)[0])


def test_prints_its_urls_and_listens_on_loopback_only(served: Served) -> None:
    text = "".join(served.lines)
    assert f"http://127.0.0.1:{served.ports['http']}/v2/models/ldm/infer" in text
    assert f"127.0.0.1:{served.ports['grpc']}" in text
    assert f"http://127.0.0.1:{served.ports['metrics']}/metrics" in text
    for port in served.ports.values():
        assert listening(port) and set(listening(port)) <= LOOPBACK, f"port {port} listens on {listening(port)} (hex), not only 127.0.0.1"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_images_equal_the_runtimes_own(served: Served, pipe, protocol: str, tmp_path: Path) -> None:
    asks = [
        ("a red circle", 1, {}),
        ("a blue square", 2, {"negative_prompt": "green", "guidance_scale": 5.0}),
        ("a yellow triangle", 3, {"scheduler": "euler_a"}),  # draws noise while sampling: run apart, same seed, same image
    ]
    errors, images, _ = send(tmp_path, protocol, served.url(protocol), [request(p, s, **o) for p, s, o in asks])
    assert errors == [None] * len(asks)
    for i, (prompt, seed, options) in enumerate(asks):
        assert images[i].shape == (64, 64, 3) and images[i].dtype == np.uint8
        np.testing.assert_array_equal(images[i], runtime_image(pipe, prompt, seed, **options), err_msg=f"{protocol} request {i}")


def test_concurrent_mixed_requests_share_batches_and_stay_exact(served: Served, pipe, tmp_path: Path) -> None:
    prompts = ["a red circle", "a green square", "a blue triangle", "a purple circle"]
    asks = [(prompts[i % 4], 100 + i, 3 + i % 2) for i in range(8)]  # two step counts: two groups that never share a UNet batch
    errors, images, report = send(
        tmp_path, "http", served.url("http"), [request(p, s, steps) for p, s, steps in asks], concurrent=True, stats=True
    )
    assert errors == [None] * len(asks)
    for i, (prompt, seed, steps) in enumerate(asks):
        np.testing.assert_array_equal(images[i], runtime_image(pipe, prompt, seed, steps), err_msg=f"request {i}")
    batched = {int(b): n for b, n in report["batches"].items() if int(b) >= 2}
    assert batched, f"Triton never batched requests together: executions by batch size {report['batches']}"


def test_bad_requests_get_errors_naming_the_input_and_the_server_keeps_serving(served: Served, pipe, tmp_path: Path) -> None:
    bad = [
        (request(None, 1), "'prompt' is missing"),
        (request("a red circle", 1, steps=0), "'steps' is 0"),
        (request("a" * 10_000, 1), "10000 characters"),
        ([["prompt", "BYTES", "a red circle"], ["steps", "FP32", 4.0]], "expects 'INT32'"),  # Triton's own type check
        (request("a red circle", 1, scheduler="warp_drive"), "'scheduler' is 'warp_drive'"),
    ]
    good = request("a green circle", 5)
    for protocol in ("http", "grpc"):
        errors, images, _ = send(tmp_path, protocol, served.url(protocol), [spec for spec, _ in bad] + [good])
        for (_, expected), error in zip(bad, errors):
            assert error is not None and expected in error, f"{protocol}: expected an error with {expected!r}, got {error!r}"
        assert errors[-1] is None and set(images) == {len(bad)}
        np.testing.assert_array_equal(images[len(bad)], runtime_image(pipe, "a green circle", 5))


def test_load_benchmark_quick_run(served: Served, bundle_batch2: Path, tmp_path: Path) -> None:
    """benchmarks.triton_load against this server, small: every request answered, every image the runtime's, figures written."""
    cmd = [str(serving_python()), "-m", "benchmarks.triton_load", str(bundle_batch2), "--url", served.url("http")]
    cmd += ["--metrics-url", f"http://{served.url('metrics')}/metrics", "--clients", "3", "--requests", "2", "--steps", "2"]
    done = subprocess.run([*cmd, "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / f"triton-load-{bundle_batch2.name}-3x2-2steps.json").read_text())
    assert report["served"]["answered"] == report["served"]["images_equal"] == 6 and report["served"]["errors"] == 0
    assert report["metrics"]["nv_inference_request_success"] == 6  # the counters moved by this run's requests, not the warm-up
    assert sum(int(b) * n for b, n in report["batch_histogram"].items()) == 6
    assert "| Triton (serving), http |" in (tmp_path / f"triton-load-{bundle_batch2.name}-3x2-2steps.md").read_text()


def test_sigterm_stops_the_server_and_leaves_nothing(served: Served) -> None:
    tree = descendants(served.proc.pid)
    assert any("tritonserver" in c for c in tree.values()) and any("triton_python_backend_stub" in c for c in tree.values()), tree
    regions = own_shm()
    assert regions, "the Python backend's shared-memory regions were not found under the launcher's prefix: the check would see nothing"
    assert any(served.tmpdir.iterdir()), "no workspace in the launcher's TMPDIR: the check would see nothing"
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=90) == 0
    left = {pid: c for pid, c in tree.items() if alive(pid, c)}
    assert not left, f"processes left after SIGTERM: {left}"
    assert not (own_shm() & regions), f"shared memory left in /dev/shm: {sorted(own_shm() & regions)}"
    assert not any(served.tmpdir.iterdir()), f"workspace left: {list(served.tmpdir.iterdir())}"


def test_host_binds_the_address_given_and_ctrl_c_stops_it_cleanly(bundle_batch2: Path, tmp_path: Path) -> None:
    """--host 127.0.0.2 (loopback still: nothing leaves this machine) is where every endpoint listens; SIGINT stops it."""
    serving_python()
    ports = {k: free_port() for k in ("http", "grpc", "metrics")}
    cmd = [sys.executable, "-m", "serving", str(bundle_batch2), "--host", "127.0.0.2", *[f"--{k}-port={v}" for k, v in ports.items()]]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env={**os.environ, "TMPDIR": str(tmp_path)}, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready"):
                break
        assert lines and lines[-1].startswith("ready"), "".join(lines)
        assert f"http://127.0.0.2:{ports['http']}/v2/models/ldm/infer" in "".join(lines)
        assert "reachable from other machines" not in "".join(lines)  # 127.0.0.2 is loopback
        for port in ports.values():
            assert set(listening(port)) <= {"0200007F", "0000000000000000FFFF00000200007F"} and listening(port), listening(port)
        tree = descendants(proc.pid)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
        assert not {pid: c for pid, c in tree.items() if alive(pid, c)}
        assert not any(tmp_path.iterdir())
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_port_in_use_is_named_and_the_failed_start_leaves_nothing(bundle_batch2: Path, tmp_path: Path) -> None:
    serving_python()
    regions_before = own_shm()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "serving", str(bundle_batch2), f"--http-port={port}"]
        cmd += [f"--grpc-port={free_port()}", f"--metrics-port={free_port()}"]
        done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "TMPDIR": str(tmp_path)}, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2 and done.stdout == ""
    assert "error: tritonserver exited with code 1 before it was ready" in done.stderr and "a port in use?" in done.stderr
    assert f"'127.0.0.1:{port}' already in use" in done.stderr  # the server's own log line, passed through
    assert own_shm() <= regions_before and not any(tmp_path.iterdir())
    assert not [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if str(tmp_path) in cmdline(pid)]
