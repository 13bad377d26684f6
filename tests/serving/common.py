"""What the serving tests share: the serving environment, a client run inside it, free ports, process trees."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import REPO

SERVING_PYTHON = REPO / ".venv-triton" / "bin" / "python"


def serving_python() -> Path:
    """The serving environment's interpreter; scripts/setup.sh makes it (no hardware needed, so no skip)."""
    if not SERVING_PYTHON.exists():
        pytest.fail(f"{SERVING_PYTHON} is missing: run `bash scripts/setup.sh` (it makes .venv-triton, the serving environment)")
    return SERVING_PYTHON


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def send(tmp: Path, protocol: str, url: str, requests: list[list[list[Any]]], *, concurrent: bool = False, stats: bool = False):
    """Send requests (each a list of [input name, Triton dtype, value]) with tritonclient from the serving environment.

    Returns (errors: one per request, None where answered; images: {request index: uint8 (H, W, 3)}; report).
    """
    job, out = tmp / f"job-{protocol}.json", tmp / f"out-{protocol}.npz"
    job.write_text(json.dumps({"protocol": protocol, "url": url, "requests": requests, "concurrent": concurrent, "stats": stats}))
    done = subprocess.run(
        [str(serving_python()), "-m", "tests.serving.client", str(job), str(out)], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out, allow_pickle=False) as data:
        report = json.loads(str(data["report"]))
        images = {int(k.split("_")[1]): data[k] for k in data.files if k.startswith("image_")}
    return report["errors"], images, report


def request(prompt: str | None, seed: int, steps: int = 4, **extra: Any) -> list[list[Any]]:
    spec: list[list[Any]] = [] if prompt is None else [["prompt", "BYTES", prompt]]
    spec += [["seed", "INT64", seed], ["steps", "INT32", steps]]
    types = {"negative_prompt": "BYTES", "scheduler": "BYTES", "guidance_scale": "FP32"}
    spec += [[name, types[name], value] for name, value in extra.items()]
    return spec


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every live process below `pid`."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = {}, list(children.get(pid, []))
    while todo:
        p = todo.pop()
        found[p] = cmdline(p)
        todo += children.get(p, [])
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def alive(pid: int, command: str) -> bool:
    """The process is still there (and is the same process: its command line matches), not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and cmdline(pid) == command


def listening(port: int) -> list[str]:
    """The local addresses (hex, as /proc/net/tcp writes them) of sockets listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                found.append(address)
    return found
