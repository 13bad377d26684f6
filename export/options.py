"""BuildOptions: what a build is asked for, checked once, before any model is read."""

from __future__ import annotations

from dataclasses import dataclass

from runtime.manifest import GUIDANCE_MODES

from .tensorrt import BuilderSettings, builder_settings

PRECISIONS = ("fp32", "fp16")
BACKENDS = ("auto", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class BuildOptions:
    """One bundle's choices; the defaults are the CLI's. What depends on the model is fitted later (export.resolve)."""

    precision: str = "fp16"  # fp16 keeps a component in fp32 where it would overflow
    height: int | None = None  # pixels; None: the model's native size
    width: int | None = None
    batch_size: int = 1  # the engines have static shapes
    backend: str = "auto"  # auto: TensorRT where it is installed, else ONNX Runtime
    guidance: str = "auto"  # auto: embedded where the UNet takes a guidance embedding, else cfg
    pipelines: str | None = None  # comma-separated; None: all the model can do
    allow_pickle: bool = False  # .bin/.ckpt weights can run code: trusted files only
    variant: str | None = None  # a folder's weight variant (save_pretrained's variant=, e.g. fp16); None: detected
    checkpoint_config: str | None = None  # a single file's config: a shipped name (sd1, sd2, ...) or a diffusers folder; None: detected
    force: bool = False  # replace an existing bundle; with TensorRT also keep an engine over its gate
    low_memory: bool = False  # fp16 ONNX traced from half-precision torch (no fp32 ONNX), torch weights freed once exported
    # TensorRT's builder (None: the preset's, else TensorRT's own); checked whatever the backend
    builder_optimization_level: int | None = None
    workspace: int | None = None  # MiB
    device_preset: str | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"unknown precision {self.precision!r}: choose one of {', '.join(PRECISIONS)} "
                "(int8 engines are built with --from-onnx from a bundle whose UNet ONNX carries Q/DQ nodes)"
            )
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.guidance not in ("auto", *GUIDANCE_MODES):
            raise ValueError(f"unknown guidance mode {self.guidance!r}: choose one of auto, {', '.join(GUIDANCE_MODES)}")
        self.tensorrt_builder()  # raises on an unknown preset, an out-of-range level or workspace

    def tensorrt_builder(self) -> BuilderSettings:
        """The TensorRT builder settings: the preset, with explicit level and workspace on top."""
        return builder_settings(self.device_preset, self.builder_optimization_level, self.workspace)
