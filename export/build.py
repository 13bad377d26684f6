"""python -m export.build: a diffusers model folder -> a verified engine bundle under engines/.

The Python API is `build(model, out, precision="fp32", ...)`, or `build(model, out, BuildOptions(...))`.
This module only names the entry points: the command line is export.cli and the work export.build_bundle,
which the CLI imports directly, so running this module does not import it back (no import cycle).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from .build_bundle import build_bundle
from .bundle import Log
from .cli import main
from .model import REFERENCE_MODEL
from .options import BuildOptions

__all__ = ["REFERENCE_MODEL", "BuildOptions", "build", "main"]


def build(
    model_path: str | Path,
    out: Path | None = None,
    options: BuildOptions | None = None,
    *,
    log: Log = print,
    **choices: Any,
) -> Path:
    """Export, verify and publish a bundle; returns its folder. Raises before writing anything on bad input.

    choices: BuildOptions' fields as keywords (precision="fp32", batch_size=2, ...), over `options` when both are given.
    """
    return build_bundle(Path(model_path), out, replace(options or BuildOptions(), **choices), log)


if __name__ == "__main__":
    raise SystemExit(main())
