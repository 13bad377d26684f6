"""BuildOptions: what a build is asked for, checked once, before any model is read."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from runtime.bundle import GUIDANCE_MODES
from runtime.bundle.manifest import MAX_BATCH, MAX_IMAGE_SIDE

from .tensorrt.builder import BuilderSettings, builder_settings, compute_capabilities

PRECISIONS = ("fp32", "fp16", "int8")
BACKENDS = ("auto", "onnxruntime", "tensorrt", "tensorrt-rtx")


@dataclass(frozen=True)
class BuildOptions:
    """One bundle's choices; the defaults are the CLI's. What depends on the model is fitted later (export.resolve)."""

    precision: str = "fp16"  # fp16 keeps a component in fp32 where it would overflow
    height: int | None = None  # pixels; None: the model's native size
    width: int | None = None
    batch_size: int = 1  # the engines have static shapes
    backend: str = "auto"  # auto: TensorRT where it is installed, else ONNX Runtime; tensorrt-rtx: TensorRT for RTX, no GPU needed
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
    compute_capability: str | None = None  # TensorRT for RTX's targets, comma-separated; None: its portable default
    lora: tuple[str, ...] = ()  # FILE[:SCALE] adapters fused into the weights before the export
    lora_slots: int = 0  # rank of the LoRA slots the UNet and text encoder take as inputs (0: none)
    controlnets: tuple[str, ...] = ()  # diffusers ControlNetModel folders: a controlnet_<i> component each
    # int8 (the UNet as calibrated QDQ): prompts file (None: the model's own or the shipped set), generations
    # recorded for calibration, and the most sensitive convs kept float (found by a cached sweep; 0: no sweep)
    # prompts: how many CLIP tokens a prompt may take (None: one chunk, the text encoder's context less bos and eos;
    # more: the UNet takes its context in whole chunks up to that), and textual-inversion embeddings FILE[:TOKEN]
    max_prompt_tokens: int | None = None
    textual_inversion: tuple[str, ...] = ()
    calibration_prompts: Path | None = None
    calibration_size: int = 32
    int8_float_convs: int = 10
    tiny_vae: Path | None = None  # a diffusers AutoencoderTiny folder exported beside the full VAE (decoder="tiny")
    deepcache: int | None = None  # DeepCache's shallow UNet cut at this branch, beside the full UNet (cache_interval=N)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"unknown precision {self.precision!r}: choose one of {', '.join(PRECISIONS)} "
                "(int8: the UNet calibrated to int8 QDQ, the other components fp32)"
            )
        self.check_int8()
        # the runtime's own limits (runtime.bundle.manifest): a bundle past them would be refused at load, after minutes of export
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise ValueError(f"--batch-size {self.batch_size} is out of range 1..{MAX_BATCH}, the batches the runtime loads")
        for what, side in (("height", self.height), ("width", self.width)):
            if side is not None and not 1 <= side <= MAX_IMAGE_SIDE:
                raise ValueError(f"--{what} {side} is out of range 1..{MAX_IMAGE_SIDE} pixels, the image sides the runtime loads")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.guidance not in ("auto", *GUIDANCE_MODES):
            raise ValueError(f"unknown guidance mode {self.guidance!r}: choose one of auto, {', '.join(GUIDANCE_MODES)}")
        object.__setattr__(self, "lora", tuple(self.lora))  # argparse's append gives a list
        object.__setattr__(self, "textual_inversion", tuple(self.textual_inversion))
        self.check_lora()
        self.check_levers()
        self.check_prompts()
        object.__setattr__(self, "controlnets", tuple(str(c) for c in self.controlnets))
        if self.controlnets and self.precision == "int8":  # calibration samples without control images
            raise ValueError("--controlnet with --precision int8 is not supported yet: build ControlNet bundles in fp16 or fp32")
        self.tensorrt_builder()  # raises on an unknown preset, an out-of-range level or workspace
        if self.compute_capability is not None and self.backend != "tensorrt-rtx":
            raise ValueError("--compute-capability is for TensorRT for RTX engines: add --backend tensorrt-rtx")
        self.targets()

    def check_lora(self) -> None:
        """The adapter files exist and their scales are finite numbers; the slot rank is in range (before any model loads)."""
        from runtime.lora import MAX_SCALE, parse_spec

        from .lora import MAX_SLOT_RANK

        for spec in self.lora:
            path, scale = parse_spec(spec)
            if not path.is_file():
                raise ValueError(f"--lora {spec}: {path} is not a file (pass FILE[:SCALE], e.g. --lora style.safetensors:0.8)")
            if not abs(scale) <= MAX_SCALE:  # NaN fails too
                raise ValueError(f"--lora {spec}: the scale must be a number from -{MAX_SCALE:g} to {MAX_SCALE:g}")
        if not 0 <= self.lora_slots <= MAX_SLOT_RANK:
            raise ValueError(f"--lora-slots {self.lora_slots}: the slot rank must be 0 (no slots) to {MAX_SLOT_RANK}")
        if self.lora_slots and self.precision == "int8":
            # calibration would see only the zero (base) slots, and the quantized layers would misread an adapter's
            raise ValueError(
                "--lora-slots with --precision int8 is not supported: fuse the adapter with --lora, or build slots in fp16 or fp32"
            )

    def check_levers(self) -> None:
        """--tiny-vae names a folder; --deepcache is a branch >= 0 and not combined with what its UNets cannot follow."""
        if self.tiny_vae is not None and not Path(self.tiny_vae).is_dir():
            raise ValueError(
                f"--tiny-vae {self.tiny_vae} is not a folder: pass a diffusers AutoencoderTiny folder (config.json + safetensors)"
            )
        if self.deepcache is None:
            return
        if isinstance(self.deepcache, bool) or not isinstance(self.deepcache, int) or self.deepcache < 0:
            raise ValueError(f"--deepcache takes a branch number >= 0 (default 0), got {self.deepcache!r}")
        if self.precision == "int8":
            raise ValueError("--deepcache with --precision int8 is not supported (calibration covers the full UNet only): use fp16 or fp32")
        if self.lora_slots:
            raise ValueError("--deepcache with --lora-slots is not supported (the caching UNets take no slots): fuse adapters with --lora")
        if self.controlnets:
            raise ValueError(
                "--deepcache with --controlnet is not supported (the caching UNets take no ControlNet residuals): build two bundles"
            )

    def check_prompts(self) -> None:
        """--max-prompt-tokens is a whole number in range; every --textual-inversion file exists (before any model loads)."""
        from runtime.bundle.manifest import MAX_CHUNKS

        from .textual_inversion import check_spec

        n = self.max_prompt_tokens
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHUNKS * 75):
            raise ValueError(
                f"--max-prompt-tokens {n!r}: give the CLIP tokens a prompt may take, 1 to {MAX_CHUNKS * 75} "
                "(75 per chunk; e.g. 150 for two chunks)"
            )
        if n is not None and n > 75 and self.precision == "int8":
            raise ValueError("--max-prompt-tokens over 75 with --precision int8 is not supported yet: build it in fp16 or fp32")
        for spec in self.textual_inversion:
            check_spec(spec, self.allow_pickle)

    def check_int8(self) -> None:
        """The int8 flags: sizes first (cheap), then the prompts file, read before any model is."""
        from .int8.calibration import CalibrationError, check_size, read_prompts

        check_size(self.calibration_size)
        if self.precision == "int8":
            from .int8.quantize import check_quantizer

            check_quantizer()
        if isinstance(self.int8_float_convs, bool) or not isinstance(self.int8_float_convs, int) or self.int8_float_convs < 0:
            raise CalibrationError(f"--int8-float-convs must be a whole number >= 0, got {self.int8_float_convs!r}")
        if self.calibration_prompts is not None:
            if self.precision != "int8":
                raise CalibrationError(f"--calibration-prompts is for --precision int8, not {self.precision}; drop it or ask for int8")
            read_prompts(Path(self.calibration_prompts))

    def targets(self) -> tuple[str, ...]:
        """TensorRT for RTX's target compute capabilities (() its portable default)."""
        return compute_capabilities(self.compute_capability)

    def arguments(self, model: str) -> tuple[str, ...]:
        """The export.build arguments that ask for these options (each flag is the field of its name; a field at its
        default is left out, precision and backend never): the manifest records them, and rebuild hints repeat them."""
        words = ["--model", model]
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "force" or value is None or (value == f.default and f.name not in ("precision", "backend")):
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                words.append(flag)
            else:
                words += [w for v in (value if isinstance(value, tuple) else (value,)) for w in (flag, str(v))]
        return tuple(words)

    def tensorrt_builder(self) -> BuilderSettings:
        """The TensorRT builder settings: the preset, with explicit level and workspace on top."""
        return builder_settings(self.device_preset, self.builder_optimization_level, self.workspace)
