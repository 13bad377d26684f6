"""python -m export.tensorrt.trtexec BUNDLE: the exact trtexec lines, with the bundle's shapes, that rebuild and time its engines.

One line per component rebuilds the engine from the bundle's ONNX with the flags the bundle was
built with (precision, optimization level, workspace, timing cache); one line times an engine
(the bundle's own .plan where it has one, else the rebuilt one) with CUDA graphs and without
host<->device copies. `--run` runs them where trtexec is installed; `--json` is what CMakeLists.txt
reads to turn them into build targets.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from runtime.bundle import Component, Manifest, TensorSpec, load_manifest
from runtime.bundle.fit import recorded_device
from runtime.errors import BundleError

from .builder import (
    PRESETS,
    TIMING_CACHE_DIR,
    BuilderSettings,
    EngineBuildError,
    Precision,
    builder_settings,
    choose_precision,
    dynamic_inputs,
    has_qdq,
    timing_cache_path,
)
from .from_onnx import onnx_component

TRTEXEC_HINT = "trtexec ships with TensorRT (on JetPack: /usr/src/tensorrt/bin/trtexec); put it on PATH or pass --trtexec"


@dataclass(frozen=True)
class EngineCommands:
    """The trtexec argv that rebuilds one component's engine from its ONNX, and the one that times an engine."""

    component: str
    onnx: str
    engine: str  # what the build line writes
    timed: str  # what the time line loads: the bundle's own .plan, or the rebuilt engine
    timing_cache: str
    build: list[str]
    time: list[str]


def shape_spec(specs: Sequence[TensorSpec], smallest: bool = False) -> str:
    """trtexec's shape syntax: name:AxBxC,name2:D (with `smallest`, each tensor's least shape: TensorSpec.smallest)."""
    return ",".join(f"{t.name}:{'x'.join(str(d) for d in (t.smallest if smallest else t.shape))}" for t in specs)


def precision_flags(precision: Precision) -> list[str]:
    """trtexec flags for a Precision: --stronglyTyped (a no-op default in TensorRT 11), --fp16, --noTF32."""
    flags = ["--stronglyTyped"] if precision.strongly_typed else []
    flags += ["--fp16"] if precision.fp16_flag else []
    return flags + ([] if precision.tf32 else ["--noTF32"])


def recorded_precision(component: Component) -> Precision:
    flags = component.build.get("flags", {})
    return Precision(component.precision, bool(flags.get("strongly_typed")), bool(flags.get("fp16")), bool(flags.get("tf32", True)))


def recorded_settings(component: Component) -> BuilderSettings:
    flags = component.build.get("flags", {})
    fields = ("optimization_level", "workspace_mib", "max_aux_streams", "preset")
    return BuilderSettings(**{k: flags[k] for k in fields if k in flags})


def builder_flags(settings: BuilderSettings, timing_cache: Path) -> list[str]:
    flags = [f"--builderOptimizationLevel={settings.optimization_level}"]
    if settings.workspace_mib is not None:
        flags.append(f"--memPoolSize=workspace:{settings.workspace_mib}")  # trtexec's unit is MiB
    if settings.max_aux_streams is not None:
        flags.append(f"--maxAuxStreams={settings.max_aux_streams}")
    return flags + [f"--timingCacheFile={timing_cache}"]


def commands_for(
    bundle: Path,
    manifest: Manifest,
    component: Component,
    *,
    trtexec: str = "trtexec",
    engine_dir: Path,
    timing_cache: Path | None = None,
    precision: str | None = None,
    settings: BuilderSettings | None = None,
) -> EngineCommands:
    """Both trtexec lines for one component. A plan component rebuilds with its recorded flags unless overridden."""
    src = onnx_component(component)
    onnx = bundle / src.file
    rebuilt = engine_dir / f"{component.name}.plan"
    if component.format == "plan" and precision is None:
        engine_precision = recorded_precision(component)
    else:
        asked = precision or manifest.source_precision
        kept = manifest.source_precision != "fp32" and src.precision == "fp32"
        # trtexec's TensorRT is unknown here: take 10.x (JetPack 6), where --fp16 still exists
        engine_precision = choose_precision(asked, component.name, src.precision, has_qdq(onnx), 10, kept_fp32=kept)
    if settings is None:
        settings = recorded_settings(component) if component.format == "plan" else BuilderSettings()
    if timing_cache is None:
        timing_cache = _default_timing_cache(bundle, component)
    # trtexec refuses shape flags for a static ONNX ("Static model does not take explicit shapes"): profiles only for dynamic
    # inputs, as the Python builder makes them (a stepped axis from one step, tuned there, up to the bundle's maximum)
    dynamic = [t for t in src.inputs if t.name in set(dynamic_inputs(onnx))]
    least = shape_spec(dynamic, smallest=True)
    profile = [f"--minShapes={least}", f"--optShapes={least}", f"--maxShapes={shape_spec(dynamic)}"] if dynamic else []
    build = [
        trtexec, f"--onnx={onnx}", f"--saveEngine={rebuilt}", *profile,
        *precision_flags(engine_precision), *builder_flags(settings, timing_cache), "--skipInference",
    ]  # fmt: skip
    timed = bundle / component.file if component.format == "plan" else rebuilt
    time = [trtexec, f"--loadEngine={timed}", f"--shapes={shape_spec(src.inputs)}", "--useCudaGraph", "--noDataTransfers", "--useSpinWait"]
    return EngineCommands(component.name, str(onnx), str(rebuilt), str(timed), str(timing_cache), build, time)


def _default_timing_cache(bundle: Path, component: Component) -> Path:
    """The cache the bundle was built with (the same file the Python builder updates), else one for trtexec."""
    if component.format != "plan":
        return TIMING_CACHE_DIR / "trtexec.cache"
    recorded = component.build.get("timing_cache")
    return Path(recorded) if recorded else timing_cache_path(recorded_device(component, bundle))


def bundle_commands(
    bundle: Path,
    *,
    trtexec: str = "trtexec",
    engine_dir: Path | None = None,
    timing_cache: Path | None = None,
    precision: str | None = None,
    settings: BuilderSettings | None = None,
) -> list[EngineCommands]:
    """The trtexec lines of every component (text encoder, UNet, VAE decoder, VAE encoder)."""
    manifest = load_manifest(bundle, verify_files=False)
    if manifest.tensorrt is not None and manifest.tensorrt.library == "tensorrt-rtx":
        raise BundleError(
            f"{bundle} holds TensorRT for RTX engines: trtexec cannot load them, and TensorRT for RTX's pip wheel ships no "
            "command-line tool (only its Python module), so there are no lines to print. Time them on an RTX-class GPU with "
            f"`python -m benchmarks.gpu --bundle {bundle}`, or print trtexec lines for the ONNX bundle they were built from"
        )
    engine_dir = engine_dir if engine_dir is not None else Path("engines") / ".trtexec" / bundle.name
    return [
        commands_for(
            bundle, manifest, c, trtexec=trtexec, engine_dir=engine_dir, timing_cache=timing_cache, precision=precision, settings=settings
        )
        for c in manifest.components.values()
    ]


def script(commands: Sequence[EngineCommands]) -> str:
    """A shell script: a comment per component, then its two lines."""
    lines = []
    for c in commands:
        lines += [f"# {c.component}: rebuild from {c.onnx}, then time", shlex.join(c.build), shlex.join(c.time)]
    return "\n".join(lines) + "\n"


def run(commands: Sequence[EngineCommands], trtexec: str) -> int:
    """Run every line with trtexec (no shell); stops at the first failure and returns its exit status."""
    if shutil.which(trtexec) is None:
        raise FileNotFoundError(f"trtexec not found ({trtexec!r} is not on PATH): {TRTEXEC_HINT}")
    for c in commands:
        Path(c.engine).parent.mkdir(parents=True, exist_ok=True)
        Path(c.timing_cache).parent.mkdir(parents=True, exist_ok=True)
        for argv in (c.build, c.time):
            print(f"$ {shlex.join(argv)}", flush=True)
            done = subprocess.run(argv, check=False)
            if done.returncode != 0:
                print(f"error: trtexec exited with {done.returncode} for {c.component}", file=sys.stderr)
                return done.returncode
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export.tensorrt.trtexec",
        description="Print the trtexec command lines, with the bundle's shapes and build flags, that rebuild each engine "
        "from its ONNX and that time it; --run runs them.",
    )
    p.add_argument("bundle", type=Path, help="an engine bundle (ONNX or TensorRT)")
    p.add_argument("--run", action="store_true", help="run the lines with trtexec instead of printing them")
    p.add_argument("--json", action="store_true", help="print the commands as JSON (what CMakeLists.txt reads)")
    p.add_argument("--trtexec", default="trtexec", help="the trtexec program (default: trtexec from PATH)")
    p.add_argument("--engine-dir", type=Path, help="where the rebuilt engines go (default: engines/.trtexec/<bundle name>)")
    p.add_argument(
        "--timing-cache",
        type=Path,
        help="timing cache file (default: for a TensorRT bundle, the cache its engines were built with, "
        "engines/.timing-cache/<gpu>-<trt>.cache; for an ONNX bundle, whose GPU is not known yet, engines/.timing-cache/trtexec.cache)",
    )
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), help="engine precision (default: the bundle's)")
    p.add_argument("--builder-optimization-level", type=int, metavar="N", help="0 to 5 (default: the bundle's, else 3)")
    p.add_argument("--workspace", type=int, metavar="MIB", help="builder workspace limit in MiB (default: the bundle's, else none)")
    p.add_argument("--device-preset", choices=sorted(PRESETS), help="builder limits for a device class (default: the bundle's)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    custom = (args.device_preset, args.builder_optimization_level, args.workspace) != (None, None, None)
    try:
        settings = builder_settings(args.device_preset, args.builder_optimization_level, args.workspace) if custom else None
        commands = bundle_commands(
            args.bundle,
            trtexec=args.trtexec,
            engine_dir=args.engine_dir,
            timing_cache=args.timing_cache,
            precision=args.precision,
            settings=settings,
        )
        if args.run:
            return run(commands, args.trtexec)
    except (BundleError, EngineBuildError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps([asdict(c) for c in commands], indent=2) if args.json else script(commands), end="" if not args.json else "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
