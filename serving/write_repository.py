"""`python -m serving.write_repository BUNDLE --out model_repository`: a Triton Inference Server model repository for a bundle.

The repository (serving/repository.py) serves the bundle with Triton's Python backend through the torch-free
runtime; `python -m serving BUNDLE` runs one locally. Every error is one `error: ...` line, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.errors import BundleError

from .repository import RepositoryOptions, write_repository


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving.write_repository",
        description="Write a Triton Inference Server model repository (Python backend, dynamic batching up to the bundle's "
        "batch) that serves BUNDLE through runtime.Pipeline.",
    )
    defaults = RepositoryOptions()
    p.add_argument("bundle", type=Path, metavar="BUNDLE", help="engine bundle folder (from python -m export.build)")
    p.add_argument("--out", type=Path, default=Path("model_repository"), help="repository folder, new or empty (default %(default)s)")
    p.add_argument("--name", default=defaults.name, help="the model's name in the repository (default %(default)s)")
    p.add_argument("--instances", type=int, default=defaults.instances, help="model instances per device (default %(default)s)")
    p.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=defaults.max_queue_delay_us,
        help="how long a request may wait for batch mates while an instance is free, microseconds (default %(default)s)",
    )
    p.add_argument(
        "--kind",
        choices=("auto", "cpu", "gpu"),
        default=defaults.kind,
        help="instance kind: auto = GPU for TensorRT bundles, CPU for ONNX ones (default %(default)s)",
    )
    p.add_argument("--link", action="store_true", help="reference the bundle by absolute path instead of copying it into the repository")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    options = RepositoryOptions(
        name=args.name, instances=args.instances, max_queue_delay_us=args.max_queue_delay_us, kind=args.kind, link=args.link
    )
    try:
        out = write_repository(args.bundle, args.out, options)
    except (BundleError, FileExistsError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (model {args.name!r}); run it with `python -m serving {args.bundle}` or see {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
