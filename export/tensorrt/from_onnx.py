"""An ONNX bundle -> a verified TensorRT bundle, without torch: export on a workstation, build on the target.

`python -m export.build --from-onnx BUNDLE` lands here. Each component's ONNX is copied into
the new bundle next to its engine (so the bundle can always be rebuilt, here or on another
GPU), built with export.tensorrt.builder, and verified against that ONNX run by ONNX Runtime on the
CPU with fixed inputs. An engine over its gate is refused unless `force`.

With TensorRT for RTX (`--backend tensorrt-rtx`) the build needs no GPU. Where there is none, the
engines cannot run, so they are not verified here: the manifest says so (verification.passed null)
and each network's inputs and outputs are checked against the manifest's instead.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends.libraries import TENSORRT, Library, require
from runtime.backends.tensorrt import NoGpu, TrtEngine, current_device, gpu_count, require_tensorrt, tensorrt_available
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
    recorded_targets,
    timing_cache_path,
)

# name, ONNX, inputs, precision, settings, timing cache, outputs -> the serialized engine
BuildFn = Callable[[str, Path, Sequence[TensorSpec], Precision, BuilderSettings, Path | None, Sequence[TensorSpec]], bytes]
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


def from_onnx_args(precision: str, settings: BuilderSettings, library: Library = TENSORRT, targets: tuple[str, ...] = ()) -> list[str]:
    """The export.build flags that reproduce this build; the manifest keeps them for the rebuild command."""
    args = ["--backend", library.key] if library is not TENSORRT else []
    args += ["--compute-capability", ",".join(targets)] if targets else []
    args += ["--precision", precision]
    if settings.preset:
        args += ["--device-preset", settings.preset]
    args += ["--builder-optimization-level", str(settings.optimization_level)]
    if settings.workspace_mib is not None:
        args += ["--workspace", str(settings.workspace_mib)]
    return args


def plan_precisions(
    manifest: Manifest, sources: Mapping[str, Component], bundle: Path, asked: str, major: int | None, library: Library = TENSORRT
) -> dict[str, Precision]:
    """Each component's engine precision; with major None only the checks that need no TensorRT run."""
    plans = {}
    for name, src in sources.items():
        qdq = has_qdq(bundle / src.file)
        kept = manifest.source_precision != "fp32" and src.precision == "fp32"
        plans[name] = choose_precision(
            asked, name, src.precision, qdq, major if major is not None else 10, kept_fp32=kept, library=library
        )
    return plans


def build_device(library: Library, targets: tuple[str, ...]) -> Device:
    """What the engines are built for: this GPU (classic TensorRT), or TensorRT for RTX's target compute capabilities."""
    if not library.ahead_of_time:
        require_tensorrt("building TensorRT engines", instead="or build TensorRT for RTX engines (no GPU needed): --backend tensorrt-rtx")
        return current_device()
    require(library, f"building {library.title} engines", cuda=False)
    version = str(library.load().__version__)
    if targets == ("current",):
        try:
            here = current_device(lib=library)
        except (NoGpu, BundleError) as e:
            raise EngineBuildError(
                f"--compute-capability current builds for this machine's GPU, and {e}; name the targets instead (e.g. 8.6,8.9)"
            ) from None
        return Device(version, here.gpu, here.compute_capability, library.key)
    return Device(version, "none (ahead of time)", ",".join(recorded_targets(targets)), library.key)


def engines_can_run(library: Library) -> bool:
    """Can this machine run what it builds (to verify it)? Classic TensorRT always (it built on the GPU)."""
    if not library.ahead_of_time:
        return True
    return tensorrt_available(library) and gpu_count()[0] > 0


def bundle_tag(device: Device, targets: tuple[str, ...]) -> str:
    """The backend part of a default bundle name: tensorrt-<gpu>-<version>, or tensorrt-rtx<version>-<targets>."""
    if device.library != "tensorrt-rtx":
        return f"tensorrt-{device.key}"
    which = "portable" if not targets else "sm" + "-".join(cc.replace(".", "") for cc in device.compute_capability.split(","))
    return f"tensorrt-rtx{device.tensorrt}-{which}"


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
    library: Library = TENSORRT,
    targets: tuple[str, ...] = (),
) -> Path:
    """Build, verify and publish a TensorRT bundle from SOURCE's ONNX files; returns its folder.

    device/build/open_engine default to this machine's GPU, TensorRT's builder and the runtime's
    TensorRT engine; tests pass their own to exercise everything around TensorRT.
    library: classic TensorRT or TensorRT for RTX; targets: TensorRT for RTX's compute capabilities
    (export.tensorrt.compute_capabilities; () its portable default).
    """
    source = Path(source)
    manifest = load_manifest(source, verify_files=False)
    sources = {name: onnx_component(c) for name, c in manifest.components.items()}
    tokenizer_dirs = manifest.tokenizer_dirs
    check_source_files(source, manifest, [*(f for c in sources.values() for f in _onnx_rel_files(source, c)), *tokenizer_dirs])
    asked = precision or manifest.source_precision
    plan_precisions(manifest, sources, source, asked, None, library)  # int8 without Q/DQ is refused before TensorRT is needed
    if targets and not library.ahead_of_time:
        raise ValueError("--compute-capability is for TensorRT for RTX (--backend tensorrt-rtx); TensorRT builds for the GPU it runs on")
    if device is None:
        device = build_device(library, targets)
    precisions = plan_precisions(manifest, sources, source, asked, int(device.tensorrt.split(".")[0]), library)
    name = default_name(
        manifest.model.name, manifest.height, manifest.width, manifest.batch_size, asked, bundle_tag(device, targets), manifest.guidance
    )
    out = out or ENGINES / (name + lora_suffix(manifest.lora))
    where = (
        f"for compute capability {device.compute_capability}" if library.ahead_of_time and not open_engine and not engines_can_run(library)
        else f"on {device.gpu}"
    )  # fmt: skip
    log(
        f"building {out} from {source} ({asked}, {library.title} {device.tensorrt} {where}, "
        f"optimization level {settings.optimization_level})"
    )
    if build is build_engine:
        build = partial(build_engine, library=library, targets=targets)
    t0 = time.perf_counter()
    with staging(out, force) as work:
        verify = open_engine is not None or engines_can_run(library)
        # TensorRT for RTX builds without timing kernels on a GPU: no timing cache to keep
        cache = None if library.ahead_of_time else timing_cache_path(device, timing_cache_root)
        job = _Job(
            source, manifest, work, settings, device, cache, args=from_onnx_args(asked, settings, library, targets),
            build=build, open_engine=open_engine or _open_trt, force=force, log=log, library=library, verify=verify,
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
    timing_cache: Path | None
    args: list[str]
    build: BuildFn
    open_engine: OpenFn
    force: bool
    log: Log
    library: Library = TENSORRT
    verify: bool = True  # False: TensorRT for RTX without a GPU here, the engines cannot run


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
    plan = job.build(name, work / src.file, src.inputs, precision, job.settings, job.timing_cache, src.outputs)
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
            "builder": job.library.key,
            **job.device.to_json(),
            **({"compute_capabilities": job.device.compute_capability.split(",")} if job.library.ahead_of_time else {}),
            "flags": {**precision.flags(), **job.settings.to_json()},
            "timing_cache": str(job.timing_cache) if job.timing_cache else None,
            "seconds": seconds,
            "bytes": len(plan),
            "from_onnx_args": job.args,
            "onnx": src.to_json(),
        },
    )
    if not job.verify:
        job.log(f"  {name:<13} {precision.name}  {len(plan) / 2**20:8.1f} MiB  not run: no GPU here  {seconds:.1f} s")
        return replace(component, verification=unverified(src))
    figures = engine_figures(component, src, work, job.manifest.vae.scaling_factor, job.open_engine)
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


def engine_figures(component: Component, src: Component, bundle: Path, scaling_factor: float, open_engine: OpenFn) -> dict[str, Any]:
    """The engine against the ONNX it was built from (ONNX Runtime, CPU) on fixed inputs, with its precision's gate."""
    feed = fixed_inputs(src.inputs, component.name, scaling_factor)
    reference = load_engine(src, bundle, backend="onnxruntime", device="cpu")(feed)
    got = run_engine(open_engine, component, bundle / component.file, feed)
    figures = error_figures(got, reference, TOLERANCE[component.precision])
    figures["reference"] = f"the {src.precision} ONNX through ONNX Runtime (CPU), fixed inputs (seed 0)"
    if src.verification:
        figures["onnx_vs_fp32_torch"] = src.verification.get("rel_err")
    return figures


def unverified(src: Component) -> dict[str, object]:
    """The verification record of an engine built where it cannot run (TensorRT for RTX without a GPU)."""
    return {
        "passed": None,
        "not_run": "built ahead of time on a machine without a GPU, where the engine cannot run; its network's inputs "
        "and outputs were checked against the manifest. On a GPU, `python -m export.tensorrt.verify BUNDLE` runs them "
        "against the ONNX they were built from",
        "onnx_vs_fp32_torch": src.verification.get("rel_err") if src.verification else None,
    }


def _manifest(job: _Job, components: dict[str, Component], precision: str) -> Manifest:
    """The source bundle's manifest with the engines in place of its ONNX components, and where they were built."""
    device = job.device
    return replace(
        job.manifest,
        created=now(),
        backend="tensorrt",
        precision=precision,
        onnx_precision=job.manifest.source_precision,
        tensorrt=TensorRTInfo(
            device.tensorrt, device.gpu, device.compute_capability, job.settings.to_json(), tuple(job.args), job.library.key,
            tuple(device.compute_capability.split(",")) if job.library.ahead_of_time else (),
        ),
        components=components,
        files={},
    )
