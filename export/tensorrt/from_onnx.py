"""An ONNX bundle -> a verified TensorRT bundle, without torch: export on a workstation, build on the target.

`python -m export.build --from-onnx BUNDLE` lands here. Each component's ONNX is copied into
the new bundle next to its engine (so the bundle can always be rebuilt, here or on another
GPU), built with export.tensorrt.builder, and verified against that ONNX run by ONNX Runtime on the
CPU with fixed inputs. An engine over its gate is refused unless `force`.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from runtime.backends.tensorrt import TrtEngine, current_device, require_tensorrt
from runtime.bundle import Component, Manifest, TensorRTInfo, TensorSpec, load_manifest, sha256_file
from runtime.bundle.fit import Device
from runtime.dispatch import load_engine
from runtime.errors import BundleError
from runtime.protocol import Engine

from ..gates import TOLERANCE, error_figures
from ..inputs import fixed_inputs
from ..lora import suffix as lora_suffix
from ..onnx_export import onnx_files
from ..staging import ENGINES, Log, default_name, now, staging, write_manifest
from .builder import (
    TIMING_CACHE_DIR,
    BuilderSettings,
    EngineBuildError,
    Precision,
    build_engine,
    choose_precision,
    has_qdq,
    timing_cache_path,
)

BuildFn = Callable[[str, Path, Sequence[TensorSpec], Precision, BuilderSettings, Path | None], bytes]
OpenFn = Callable[[Component, Path], Engine]


class VerificationFailed(EngineBuildError):
    """A built engine is further from its ONNX than its precision's gate."""


def onnx_component(component: Component) -> Component:
    """The ONNX a component was (or will be) built from: itself for an ONNX bundle, `build.onnx` for a plan."""
    if component.format == "onnx":
        return component
    source = component.source_onnx
    if source is None:
        raise BundleError(
            f"{component.name}: this TensorRT bundle does not carry the ONNX its engine was built from; rebuild from the ONNX bundle"
        )
    return source


def check_source_files(bundle: Path, manifest: Manifest, needed: Sequence[str]) -> None:
    """The files a rebuild reads (ONNX, tokenizer) must be unaltered; the old engines may be anything."""
    for rel, digest in manifest.files.items():
        if not any(rel == n or rel.startswith(n.rstrip("/") + "/") for n in needed):
            continue
        f = bundle / rel
        if not f.is_file() or sha256_file(f) != digest:
            state = "is missing" if not f.is_file() else "was altered or corrupted"
            raise BundleError(
                f"{bundle}: {rel} {state}; re-export the ONNX bundle with `python -m export.build --backend onnxruntime --force`"
            )


def run_engine(open_engine: OpenFn, component: Component, path: Path, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    engine = open_engine(component, path)
    try:
        return engine(feed)
    finally:
        close = getattr(engine, "close", None)
        if close is not None:
            close()


def from_onnx_args(precision: str, settings: BuilderSettings) -> list[str]:
    """The export.build flags that reproduce this build; the manifest keeps them for the rebuild command."""
    args = ["--precision", precision]
    if settings.preset:
        args += ["--device-preset", settings.preset]
    args += ["--builder-optimization-level", str(settings.optimization_level)]
    if settings.workspace_mib is not None:
        args += ["--workspace", str(settings.workspace_mib)]
    return args


def plan_precisions(
    manifest: Manifest, sources: Mapping[str, Component], bundle: Path, asked: str, major: int | None
) -> dict[str, Precision]:
    """Each component's engine precision; with major None only the checks that need no TensorRT run."""
    plans = {}
    for name, src in sources.items():
        qdq = has_qdq(bundle / src.file)
        kept = manifest.source_precision != "fp32" and src.precision == "fp32"
        plans[name] = choose_precision(asked, name, src.precision, qdq, major if major is not None else 10, kept_fp32=kept)
    return plans


def build_from_onnx(
    source: Path,
    out: Path | None = None,
    *,
    precision: str | None = None,
    settings: BuilderSettings = BuilderSettings(),
    force: bool = False,
    log: Log = print,
    device: Device | None = None,
    build: BuildFn = build_engine,
    open_engine: OpenFn | None = None,
    timing_cache_root: Path = TIMING_CACHE_DIR,
) -> Path:
    """Build, verify and publish a TensorRT bundle from SOURCE's ONNX files; returns its folder.

    device/build/open_engine default to this machine's GPU, TensorRT's builder and the runtime's
    TensorRT engine; tests pass their own to exercise everything around TensorRT.
    """
    source = Path(source)
    manifest = load_manifest(source, verify_files=False)
    sources = {name: onnx_component(c) for name, c in manifest.components.items()}
    tokenizer_dirs = manifest.tokenizer_dirs
    check_source_files(source, manifest, [*(f for c in sources.values() for f in _onnx_rel_files(source, c)), *tokenizer_dirs])
    asked = precision or manifest.source_precision
    plan_precisions(manifest, sources, source, asked, None)  # int8 without Q/DQ is refused before TensorRT is needed
    if device is None:
        require_tensorrt("building TensorRT engines")
        device = current_device()
    precisions = plan_precisions(manifest, sources, source, asked, int(device.tensorrt.split(".")[0]))
    name = default_name(
        manifest.model.name, manifest.height, manifest.width, manifest.batch_size, asked, f"tensorrt-{device.key}", manifest.guidance
    )
    out = out or ENGINES / (name + lora_suffix(manifest.lora))
    log(
        f"building {out} from {source} ({asked}, TensorRT {device.tensorrt} on {device.gpu}, "
        f"optimization level {settings.optimization_level})"
    )
    t0 = time.perf_counter()
    with staging(out, force) as work:
        job = _Job(
            source, manifest, work, settings, device, timing_cache_path(device, timing_cache_root),
            args=from_onnx_args(asked, settings), build=build, open_engine=open_engine or _open_trt, force=force, log=log,
        )  # fmt: skip
        for tokenizer_dir in tokenizer_dirs:
            shutil.copytree(source / tokenizer_dir, work / tokenizer_dir)
        components = {name: _build_component(job, src, precisions[name]) for name, src in sources.items()}
        write_manifest(work, _manifest(job, components, asked))
    log(f"done in {time.perf_counter() - t0:.1f} s: {out}")
    return out


@dataclass(frozen=True)
class _Job:
    """What every component's build shares."""

    source: Path
    manifest: Manifest
    work: Path
    settings: BuilderSettings
    device: Device
    timing_cache: Path
    args: list[str]
    build: BuildFn
    open_engine: OpenFn
    force: bool
    log: Log


def _onnx_rel_files(bundle: Path, component: Component) -> list[str]:
    return [str(f.relative_to(bundle)) for f in onnx_files(bundle / component.file)]


def _open_trt(component: Component, path: Path) -> Engine:
    return TrtEngine(component, path, check_device=False)


def _build_component(job: _Job, src: Component, precision: Precision) -> Component:
    """Copy the ONNX, build its engine, verify the engine against the ONNX through ONNX Runtime."""
    name, work = src.name, job.work
    for rel in _onnx_rel_files(job.source, src):
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(job.source / rel, work / rel)
    t0 = time.perf_counter()
    plan = job.build(name, work / src.file, src.inputs, precision, job.settings, job.timing_cache)
    seconds = round(time.perf_counter() - t0, 2)
    plan_file = str(Path(src.file).with_suffix(".plan"))
    (work / plan_file).write_bytes(plan)
    component = Component(
        name=name,
        file=plan_file,
        format="plan",
        precision=precision.name,
        inputs=src.inputs,
        outputs=src.outputs,
        build={
            "builder": "tensorrt",
            **job.device.to_json(),
            "flags": {**precision.flags(), **job.settings.to_json()},
            "timing_cache": str(job.timing_cache),
            "seconds": seconds,
            "from_onnx_args": job.args,
            "onnx": src.to_json(),
        },
    )
    feed = fixed_inputs(src.inputs, name, job.manifest.vae.scaling_factor)
    reference = load_engine(src, work, backend="onnxruntime", device="cpu")(feed)
    figures = error_figures(run_engine(job.open_engine, component, work / plan_file, feed), reference, TOLERANCE[precision.name])
    figures["reference"] = f"the {src.precision} ONNX through ONNX Runtime (CPU), fixed inputs (seed 0)"
    if src.verification:
        figures["onnx_vs_fp32_torch"] = src.verification.get("rel_err")
    job.log(
        f"  {name:<13} {precision.name}  {len(plan) / 2**20:8.1f} MiB  "
        f"error {figures['rel_err']:.2e} (gate {figures['tolerance']:.0e})  {seconds:.1f} s"
        + ("" if figures["passed"] else "  OVER THE GATE")
    )
    if not figures["passed"] and not job.force:
        raise VerificationFailed(
            f"{name}: the {precision.name} engine differs from its ONNX by {figures['rel_err']:.3g} (relative to the output "
            f"range; the gate is {figures['tolerance']:g}); nothing was written. Try a higher precision "
            f"(--precision fp32), or pass --force to keep it anyway (the manifest records the failure)"
        )
    return replace(component, verification=figures)


def _manifest(job: _Job, components: dict[str, Component], precision: str) -> Manifest:
    """The source bundle's manifest with the engines in place of its ONNX components, and where they were built."""
    device = job.device
    return replace(
        job.manifest,
        created=now(),
        backend="tensorrt",
        precision=precision,
        onnx_precision=job.manifest.source_precision,
        tensorrt=TensorRTInfo(device.tensorrt, device.gpu, device.compute_capability, job.settings.to_json(), tuple(job.args)),
        components=components,
        files={},
    )
