"""`python -m serving BUNDLE`: a local Triton Inference Server serving BUNDLE, until Ctrl-C or SIGTERM.

It writes a model repository for the bundle (serving/repository.py, the bundle referenced, not copied)
into a fresh workspace, starts the `tritonserver` binary of the `nvidia-pytriton` wheel from the serving
environment (`.venv-triton`, made by scripts/setup.sh: numpy 1.x, which the Python backend's stub needs),
bound to 127.0.0.1 unless --host says otherwise, waits until the model is ready and prints the URLs.
On SIGTERM/SIGINT it asks the server to stop, waits for it, ends whatever of its process group is left
(the Python backend's stub processes), removes the shared-memory regions under its own prefix and the workspace.
If the launcher itself is killed (SIGKILL), the kernel sends the server SIGTERM (PR_SET_PDEATHSIG) and it stops
the same way; only the workspace (ldm-serve-* in $TMPDIR) is left.
Only the standard library: it runs from any Python, the server from the serving environment.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from runtime.errors import BundleError

from .repository import RepositoryOptions, write_repository

CHECKOUT = Path(__file__).resolve().parent.parent
DEFAULT_ENV = CHECKOUT / ".venv-triton"
ENV_VARIABLE = "LDM_TRITON_ENV"
SHM = Path("/dev/shm")
STOP_GRACE_S = 30.0  # tritonserver's own --exit-timeout-secs default: the time models get to unload
SETUP_HINT = "run `bash scripts/setup.sh` (it makes .venv-triton with nvidia-pytriton and numpy 1.x), or pass --triton-env"

# What the serving environment's Python reports about itself: where the wheel's server is, and the libpython the stub loads.
PROBE = """
import json, sys, sysconfig, importlib.util
spec = importlib.util.find_spec("pytriton")
print(json.dumps({
    "pytriton": None if spec is None else list(spec.submodule_search_locations)[0],
    "version": "%d.%d" % sys.version_info[:2],
    "libdir": sysconfig.get_config_var("LIBDIR"),
    "ldlibrary": sysconfig.get_config_var("LDLIBRARY"),
    "numpy": getattr(importlib.util.find_spec("numpy"), "origin", None) and __import__("numpy").__version__,
}))
"""


class ServeError(Exception):
    """Something the launcher cannot do, with what to do about it."""


@dataclass(frozen=True)
class TritonInstall:
    """The pieces of the serving environment the server is started from."""

    env: Path  # the virtual environment: its bin/ goes first on PATH, so the stub's embedded Python finds it
    server: Path  # tritonserver
    python_backend: Path  # libtriton_python.so and triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for the environment's Python version
    libs: tuple[Path, ...]  # the wheel's shared libraries and the directory of the environment's libpython


def find_triton(env: Path | None) -> TritonInstall:
    """The serving environment: --triton-env, else $LDM_TRITON_ENV, else the checkout's .venv-triton."""
    env = env or (Path(os.environ[ENV_VARIABLE]) if os.environ.get(ENV_VARIABLE) else DEFAULT_ENV)
    python = env / "bin" / "python"
    if not python.exists():
        raise ServeError(f"no serving environment at {env} (no bin/python): {SETUP_HINT}")
    done = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise ServeError(f"{python} could not describe itself: {done.stderr.strip()[-500:]}")
    info = json.loads(done.stdout)
    if info["pytriton"] is None:
        raise ServeError(f"{env} has no nvidia-pytriton (it ships the tritonserver binary): {SETUP_HINT}")
    if not info["numpy"] or not str(info["numpy"]).startswith("1."):
        raise ServeError(
            f"{env} has numpy {info['numpy']}; the Python backend's stub needs numpy 1.x (numpy 2 returns corrupt tensors): {SETUP_HINT}"
        )
    root = Path(info["pytriton"]) / "tritonserver"
    libpython = Path(info["libdir"]) / str(info["ldlibrary"])
    if not str(info["ldlibrary"]).endswith(".so") or not libpython.exists():
        raise ServeError(
            f"{env}'s Python {info['version']} has no shared libpython ({libpython}), which the backend stub loads; "
            "make the serving environment from a Python built with --enable-shared (Debian's python3 is)"
        )
    install = TritonInstall(
        env=env,
        server=root / "bin" / "tritonserver",
        python_backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / info["version"] / "triton_python_backend_stub",
        libs=(Path(info["pytriton"]).parent / "nvidia_pytriton.libs", Path(info["libdir"])),
    )
    for path in (install.server, install.python_backend / "libtriton_python.so", install.stub):
        if not path.exists():
            raise ServeError(f"{path} is missing from nvidia-pytriton (for Python {info['version']}): {SETUP_HINT}")
    return install


def backend_directory(install: TritonInstall, workspace: Path) -> Path:
    """Triton's backends folder: the Python backend with the stub beside libtriton_python.so, where the backend looks for it."""
    python = workspace / "backends" / "python"
    python.mkdir(parents=True)
    for item in install.python_backend.iterdir():
        if item.suffix in (".so", ".py"):
            (python / item.name).symlink_to(item)
    (python / "triton_python_backend_stub").symlink_to(install.stub)
    return python.parent


def server_command(install: TritonInstall, repository: Path, backends: Path, args: argparse.Namespace, shm_prefix: str) -> list[str]:
    return [
        str(install.server),
        f"--model-repository={repository}",
        f"--backend-directory={backends}",
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
        f"--http-address={args.host}",
        f"--http-port={args.http_port}",
        f"--grpc-address={args.host}",
        f"--grpc-port={args.grpc_port}",
        "--allow-metrics=true",
        f"--metrics-address={args.host}",
        f"--metrics-port={args.metrics_port}",
        "--strict-readiness=true",
        "--exit-on-error=true",
        f"--exit-timeout-secs={int(STOP_GRACE_S)}",
    ]


def server_env(install: TritonInstall, workspace: Path) -> dict[str, str]:
    env = dict(os.environ)
    # temporary files of the server and its models (onnxruntime writes $TMPDIR/.ses on import) go with the workspace
    env["TMPDIR"] = str(workspace / "tmp")
    (workspace / "tmp").mkdir(exist_ok=True)
    env["PATH"] = f"{install.env / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*map(str, install.libs), *filter(None, [env.get("LD_LIBRARY_PATH")])])
    env.pop("PYTHONHOME", None)
    env.pop("PYTHONPATH", None)  # the model imports the runtime copied into its repository, nothing of the caller's
    return env


def _die_with_parent() -> None:
    """In the server's process (before exec): if the launcher dies without stopping it (SIGKILL), it gets SIGTERM."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    os.setsid()  # its own process group: the stubs it starts are stopped with it, and a terminal's Ctrl-C comes through us


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServeError(
                f"tritonserver exited with code {proc.returncode} before it was ready; its log above says why "
                "(a port in use? choose others with --http-port/--grpc-port/--metrics-port)"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise ServeError(f"tritonserver was not ready within {timeout_s:g} s ({url}); its log above says what it was doing")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server (it unloads the model, whose stubs exit), then SIGKILL to whatever its group still holds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_GRACE_S + 5)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stubs that outlived the server; the group is the server's own (setsid)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def remove_shm(prefix: str) -> list[str]:
    """The Python backend's shared-memory regions under this launch's own prefix that a hard stop left behind."""
    left = sorted(p.name for p in SHM.glob(f"{prefix}*")) if SHM.is_dir() else []
    for name in left:
        (SHM / name).unlink(missing_ok=True)
    return left


@contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise KeyboardInterrupt in the main thread, so every wait below ends in the cleanup."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def urls(args: argparse.Namespace, name: str) -> list[str]:
    host = f"[{args.host}]" if ":" in args.host else args.host
    return [
        f"  HTTP     http://{host}:{args.http_port}/v2/models/{name}/infer   (health: /v2/health/ready, /v2/health/live)",
        f"  gRPC     {host}:{args.grpc_port}",
        f"  metrics  http://{host}:{args.metrics_port}/metrics",
    ]


def serve(args: argparse.Namespace) -> int:
    install = find_triton(args.triton_env)
    workspace = Path(tempfile.mkdtemp(prefix="ldm-serve-"))
    shm_prefix = f"ldm_serve_{uuid.uuid4().hex[:12]}_"
    proc: subprocess.Popen[bytes] | None = None
    try:
        with stop_signals():
            try:
                options = RepositoryOptions(name=args.name, instances=args.instances, max_queue_delay_us=args.max_queue_delay_us, link=True)
                repository = write_repository(args.bundle, workspace / "model_repository", options)
                command = server_command(install, repository, backend_directory(install, workspace), args, shm_prefix)
                proc = subprocess.Popen(command, env=server_env(install, workspace), stdout=sys.stderr, preexec_fn=_die_with_parent)
                local = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
                local = f"[{local}]" if ":" in local else local
                wait_ready(f"http://{local}:{args.http_port}/v2/health/ready", proc, args.ready_timeout)
                print(f"serving {args.bundle} as model {args.name!r}", flush=True)
                print("\n".join(urls(args, args.name)), flush=True)
                if not loopback(args.host):
                    print(f"  listening on {args.host}: reachable from other machines, with no authentication", flush=True)
                print("ready; stop with Ctrl-C or SIGTERM", flush=True)
                code = proc.wait()
                print(f"error: tritonserver exited by itself with code {code}; its log above says why", file=sys.stderr)
                return 1
            except KeyboardInterrupt:
                print("stopping", file=sys.stderr, flush=True)
                return 0
    finally:
        with _ignoring_stop_signals():  # a second Ctrl-C must not leave the cleanup half done
            if proc is not None:
                stop(proc)
            left = remove_shm(shm_prefix)
            if left:
                print(f"removed {len(left)} shared-memory region(s) the server left in {SHM}", file=sys.stderr)
            shutil.rmtree(workspace, ignore_errors=True)


@contextmanager
def _ignoring_stop_signals() -> Iterator[None]:
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving",
        description="Serve an engine bundle from a local Triton Inference Server (HTTP, gRPC, Prometheus metrics) until Ctrl-C/SIGTERM.",
    )
    defaults = RepositoryOptions()
    p.add_argument("bundle", type=Path, metavar="BUNDLE", help="engine bundle folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s; 0.0.0.0 exposes it to the network)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (default %(default)s)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default %(default)s)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default %(default)s)")
    p.add_argument("--name", default=defaults.name, help="model name (default %(default)s)")
    p.add_argument("--instances", type=int, default=defaults.instances, help="model instances (default %(default)s)")
    p.add_argument(
        "--max-queue-delay-us", type=int, default=defaults.max_queue_delay_us, help="dynamic batching delay, µs (default %(default)s)"
    )
    p.add_argument("--triton-env", type=Path, help=f"serving environment (default ${ENV_VARIABLE}, else {DEFAULT_ENV})")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for the model to load (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return serve(args)
    except (ServeError, BundleError, FileExistsError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
