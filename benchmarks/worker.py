"""python -m benchmarks.worker SYSTEM: one pipeline in its own process, driven by JSON lines.

The parent (benchmarks.compare) writes one request per line on stdin; the worker answers each
with one JSON line on the stdout it was given. Everything else the libraries print goes to
stderr, so the protocol stays clean. A process per system keeps each one's peak memory its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import IO, Any

import numpy as np

from .runtime_bench import device_memory_bytes, peak_rss_bytes
from .systems import SYSTEMS, open_system


def serve(system: str, model: Path, bundle: Path, device: str | None, requests: IO[str], replies: IO[str]) -> int:
    """Load SYSTEM, say so, then answer requests until stdin closes."""

    def send(reply: dict[str, Any]) -> None:
        replies.write(json.dumps(reply) + "\n")
        replies.flush()

    t0 = time.perf_counter()
    try:
        pipe = open_system(system, model, bundle, device)
    except Exception as e:  # any failure to load is reported to the parent, which says what failed
        send({"error": f"{system} could not load: {type(e).__name__}: {e}", "trace": traceback.format_exc()})
        return 1
    send({"ready": True, "load_s": time.perf_counter() - t0, "peak_rss_bytes": peak_rss_bytes(), "providers": pipe.providers})
    for line in requests:
        request = json.loads(line)
        try:
            figures, images = pipe.generate(request, np.load(request["latents"]))
        except Exception as e:  # reported per request, so one failing system does not stop the others
            send({"error": f"{system}: {type(e).__name__}: {e}", "trace": traceback.format_exc()})
            continue
        if request.get("image_out"):
            np.save(request["image_out"], images)
        send({"figures": figures, "peak_rss_bytes": peak_rss_bytes(), "device_memory_bytes": device_memory_bytes()})
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.worker", description=__doc__.splitlines()[0])
    p.add_argument("system", choices=SYSTEMS)
    p.add_argument("--model", type=Path, required=True, help="diffusers model folder")
    p.add_argument("--bundle", type=Path, required=True, help="engine bundle exported from that model")
    p.add_argument("--device", choices=("cpu", "cuda", "tensorrt"), help="execution device (default: cuda where installed, else cpu)")
    args = p.parse_args(argv)
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints from libraries must not reach the protocol
    return serve(args.system, args.model, args.bundle, args.device, sys.stdin, replies)


if __name__ == "__main__":
    raise SystemExit(main())
