"""Write a Triton model repository that serves one engine bundle with the Python backend.

    OUT/
      README.md                how to run it (NGC tritonserver container, or `python -m serving`)
      MODEL/config.pbtxt       typed inputs/outputs, dynamic batching up to the bundle's batch, instance group
      MODEL/1/model.py         serving/model.py
      MODEL/1/runtime/         a copy of the runtime package (torch-free, without its command line), so the repository
                               runs as it was written
      MODEL/1/serving/         serving/handler.py, what the model calls
      MODEL/1/bundle/          the bundle, copied (or referenced by absolute path: link=True)

Pure stdlib plus runtime.bundle: `python -m serving` writes one without the exporter's dependencies.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from runtime.bundle import Manifest, load_manifest
from runtime.errors import BundleError

HERE = Path(__file__).resolve().parent
RUNTIME = HERE.parent / "runtime"
MODEL_SOURCE = HERE / "model.py"
# what a model process needs of the checkout: the runtime without its command line, and the request handler
RUNTIME_LEFT_OUT = ("__pycache__", "*.pyc", "cli.py", "__main__.py", "serve")
SERVING_CARRIED = ("__init__.py", "handler.py")


@dataclass(frozen=True)
class RepositoryOptions:
    """What the repository's config.pbtxt says beyond the bundle's own shapes.

    instances: model instances (each its own process with its own pipeline) per device.
    max_queue_delay_us: how long Triton holds a request waiting for batch mates when an instance is free.
    kind: 'auto' (CPU for ONNX bundles, GPU for TensorRT ones), 'cpu' or 'gpu'.
    link: reference the bundle by absolute path instead of copying it (for a repository on the same machine).
    """

    name: str = "ldm"
    instances: int = 1
    max_queue_delay_us: int = 20000
    kind: str = "auto"
    link: bool = False
    max_prompt_chars: int = 2000
    max_steps: int = 200


def write_repository(bundle: str | Path, out: str | Path, options: RepositoryOptions = RepositoryOptions()) -> Path:
    """Write the repository for `bundle` at `out` (a new or empty folder) and return `out`; nothing is left on failure."""
    bundle, out = Path(bundle).resolve(), Path(out)
    check_options(options)
    manifest = load_manifest(bundle)  # every file's sha256 checked: a repository never serves a damaged bundle
    if "txt2img" not in manifest.pipelines:
        raise BundleError(f"bundle {bundle} runs {', '.join(manifest.pipelines)} only; the Triton model serves txt2img (text to image)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose a new --out (nothing of yours is overwritten)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        version = staging / options.name / "1"
        version.mkdir(parents=True)
        shutil.copy2(MODEL_SOURCE, version / "model.py")
        shutil.copytree(RUNTIME, version / "runtime", ignore=shutil.ignore_patterns(*RUNTIME_LEFT_OUT))
        (version / "serving").mkdir()
        for name in SERVING_CARRIED:
            shutil.copy2(HERE / name, version / "serving" / name)
        if options.link:
            bundle_ref = str(bundle)
        else:
            shutil.copytree(bundle, version / "bundle", ignore=shutil.ignore_patterns("__pycache__"))
            bundle_ref = "bundle"
        (staging / options.name / "config.pbtxt").write_text(config_pbtxt(manifest, bundle_ref, options))
        (staging / "README.md").write_text(readme(manifest, bundle, options))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def check_options(options: RepositoryOptions) -> None:
    if options.instances < 1:
        raise ValueError(f"--instances is {options.instances}: it must be 1 or more (model instances per device)")
    if options.max_queue_delay_us < 0:
        raise ValueError(f"--max-queue-delay-us is {options.max_queue_delay_us}: it must be 0 or more")
    if options.kind not in ("auto", "cpu", "gpu"):
        raise ValueError(f"--kind is {options.kind!r}: choose auto, cpu or gpu")
    if not options.name or not all(c.isalnum() or c in "_-" for c in options.name):
        raise ValueError(f"--name {options.name!r}: a model name is letters, digits, '_' and '-'")


def instance_kind(manifest: Manifest, kind: str) -> str:
    """Triton's instance kind: TensorRT engines need a GPU; ONNX bundles run on CPU unless asked for a GPU."""
    if kind == "auto":
        kind = "gpu" if manifest.backend == "tensorrt" else "cpu"
    if kind == "cpu" and manifest.backend == "tensorrt":
        raise ValueError("--kind cpu: this bundle holds TensorRT engines, which run on an NVIDIA GPU only; use --kind gpu")
    return "KIND_GPU" if kind == "gpu" else "KIND_CPU"


def config_pbtxt(manifest: Manifest, bundle_ref: str, options: RepositoryOptions) -> str:
    """The model configuration (protobuf text format of Triton's ModelConfig)."""
    batch = manifest.batch_size
    inputs = [
        ("prompt", "TYPE_STRING", False),
        ("negative_prompt", "TYPE_STRING", True),
        ("seed", "TYPE_INT64", True),
        ("steps", "TYPE_INT32", True),
        ("guidance_scale", "TYPE_FP32", True),
        ("scheduler", "TYPE_STRING", True),
    ]
    input_lines = ",\n".join(
        f'  {{ name: "{name}" data_type: {dtype} dims: [ 1 ]{" optional: true" if optional else ""} }}' for name, dtype, optional in inputs
    )
    params = {
        "bundle": bundle_ref,
        "backend": manifest.backend,
        "max_prompt_chars": str(options.max_prompt_chars),
        "max_steps": str(options.max_steps),
    }
    param_lines = ",\n".join(f'  {{ key: "{k}" value: {{ string_value: "{_escape(v)}" }} }}' for k, v in params.items())
    shape = f"{manifest.height}x{manifest.width}, batch {batch}, {manifest.precision}, {manifest.backend}"
    return f"""# Generated by `python -m serving.write_repository` from bundle {_escape(manifest.model.name)} ({shape}).
# Requests are queued and batched up to the bundle's static batch: items with equal steps/guidance_scale/scheduler
# share one UNet batch (see serving/handler.py); the optional inputs default to 50 steps, guidance 7.5,
# the model's own scheduler, a random seed (returned as seed_used) and an empty negative prompt.
name: "{options.name}"
backend: "python"
max_batch_size: {batch}
input [
{input_lines}
]
output [
  {{ name: "image" data_type: TYPE_UINT8 dims: [ {manifest.height}, {manifest.width}, 3 ] }},
  {{ name: "seed_used" data_type: TYPE_INT64 dims: [ 1 ] }}
]
dynamic_batching {{
  preferred_batch_size: [ {batch} ]
  max_queue_delay_microseconds: {options.max_queue_delay_us}
}}
instance_group [
  {{ count: {options.instances} kind: {instance_kind(manifest, options.kind)} }}
]
parameters [
{param_lines}
]
"""


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def readme(manifest: Manifest, bundle: Path, options: RepositoryOptions) -> str:
    gpu = instance_kind(manifest, options.kind) == "KIND_GPU"
    trt_pkgs = "tensorrt cuda-python"
    if manifest.tensorrt is not None and manifest.tensorrt.library == "tensorrt-rtx":
        trt_pkgs = f"tensorrt-rtx-cu13=={manifest.tensorrt.tensorrt} cuda-python"
    backend_pkgs = {"onnxruntime": "onnxruntime-gpu" if gpu else "onnxruntime", "tensorrt": trt_pkgs}[manifest.backend]
    gpus = "--gpus all " if gpu else ""
    return f"""# Triton model repository: {manifest.model.name}

Generated by `python -m serving.write_repository` from `{bundle}`: one model, `{options.name}`, served by Triton's Python
backend, which runs the bundle through the project's torch-free `runtime.Pipeline` (copied into `{options.name}/1/runtime`).
Static shapes: {manifest.height}x{manifest.width} images, batch {manifest.batch_size} ({manifest.precision}, {manifest.backend}).

## Run it

On this machine, with the server from the `nvidia-pytriton` wheel (`bash scripts/setup.sh` installs it in `.venv-triton`):

    python -m serving {bundle}

With NVIDIA's tritonserver container (NGC `nvcr.io/nvidia/tritonserver:<yy.mm>-py3`), whose Python backend needs
the runtime's dependencies installed first (numpy 1.x: the Python backend's stub exchanges tensors with numpy 1):

    docker run --rm {gpus}-p 8000:8000 -p 8001:8001 -p 8002:8002 -v "$PWD":/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3 \\
      bash -c "pip install 'numpy<2' tokenizers Pillow {backend_pkgs} && tritonserver --model-repository=/models"

(or bake that `pip install` into an image `FROM` the tritonserver one; see deploy/k8s in the ldm_deploy checkout).

## Ask it

Inputs (each shaped [1, 1] per request: batch dimension first): `prompt` BYTES (required), `negative_prompt` BYTES,
`seed` INT64, `steps` INT32, `guidance_scale` FP32, `scheduler` BYTES (a runtime sampler name: ddim, euler, dpmpp_2m...).
Outputs: `image` UINT8 [{manifest.height}, {manifest.width}, 3] and `seed_used` INT64.
A request's image is the one `runtime.Pipeline.txt2img(prompt, negative_prompt, seed=seed, ...)` returns first.
Bad requests (no prompt, steps outside 1..{options.max_steps}, a prompt over {options.max_prompt_chars} characters,
an unknown scheduler, a wrong dtype) get an error naming the input; the server goes on serving.

Health: `/v2/health/live`, `/v2/health/ready` (HTTP port); Prometheus metrics on the metrics port (`/metrics`):
`nv_inference_queue_duration_us`, `nv_inference_exec_count` / `nv_inference_count` (their ratio: requests per batch).

Tuning: `max_batch_size` is the bundle's static batch (rebuild the bundle with `--batch-size` to change it);
`instance_group.count` and `dynamic_batching.max_queue_delay_microseconds` are
`python -m serving.write_repository --instances` and `--max-queue-delay-us`; the serving limits are the `max_steps` and
`max_prompt_chars` parameters in `{options.name}/config.pbtxt`.
"""
