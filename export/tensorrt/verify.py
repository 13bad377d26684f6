"""python -m export.tensorrt.verify BUNDLE: run a TensorRT bundle's engines on this GPU against the ONNX they came from.

A TensorRT-for-RTX bundle built on a machine without a GPU could not run its engines there (its manifest says
verification.passed null). On the GPU it lands on, this runs each engine on the build's fixed inputs against
the ONNX the bundle carries, through ONNX Runtime on the CPU, with the build's gates (relative error 1e-3 fp32,
5e-2 fp16, 1e-1 int8), and prints one line per engine. The bundle is only read. Exit status: 0 all within
their gates, 1 one or more over, 2 the engines could not run here (the message says why).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.bundle import Component, load_manifest
from runtime.dispatch import load_engine
from runtime.errors import BundleError
from runtime.protocol import Engine

from .from_onnx import OpenFn, engine_figures, onnx_component


def verify_bundle(bundle: Path, open_engine: OpenFn | None = None, log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Each plan component's figures against its ONNX; by default the engines open as Pipeline.load opens them
    (library version, engine validity and GPU checked), so what cannot run here is refused by message."""

    def runtime_engine(component: Component, path: Path) -> Engine:
        return load_engine(component, bundle)

    manifest = load_manifest(bundle)
    plans = {name: c for name, c in manifest.components.items() if c.format == "plan"}
    if not plans:
        raise BundleError(f"{bundle} holds no TensorRT engines to verify (its components are ONNX, run by ONNX Runtime)")
    out = {}
    for name, component in plans.items():
        figures = engine_figures(component, onnx_component(component), bundle, manifest.vae.scaling_factor, open_engine or runtime_engine)
        verdict = "ok" if figures["passed"] else "OVER THE GATE"
        log(f"  {name:<13} {component.precision}  error {figures['rel_err']:.2e} (gate {figures['tolerance']:.0e})  {verdict}")
        out[name] = figures
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.tensorrt.verify", description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path, help="a TensorRT or TensorRT-for-RTX bundle (it carries the ONNX its engines came from)")
    args = p.parse_args(argv)
    try:
        figures = verify_bundle(args.bundle)
    except (BundleError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if all(f["passed"] for f in figures.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
