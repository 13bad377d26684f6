"""The core every task shares: a bundle's engines, its family's text side, one denoise loop, the VAE.

Tasks (runtime/tasks/) compose these parts; `runtime.Pipeline` is this core with the tasks as methods.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

from . import control as ctl
from . import images as img
from .engine import Engine, cast_feed, load_engine
from .errors import BundleError, Cancelled, NonFiniteError
from .families import Family, open_family
from .feed import check_finite
from .guidance import Extra, guided
from .lora import LoraError, SlotFed, SlotState, file_rank, rank_needed, read_adapter
from .manifest import BundleState, Component, Manifest, read_bundle, rebuild_hint
from .sampling import CLASS_DEFAULTS, DEFAULT_FOR_CLASS, Known, Model, default_sampler, get_sampler, noise_schedule

if TYPE_CHECKING:
    from PIL.Image import Image
    from typing_extensions import Self

Prompt = str | Sequence[str]
Progress = Callable[[int, int, float], bool | None] | None
# set_lora's adapters: None, a file, or a list of files and (file, scale) pairs
LoraSpec = str | Path | Sequence[str | Path | tuple[str | Path, float]] | None
# output_type 'pil': a list of PIL images; 'np': float32 (B, H, W, 3) in [0, 1]; 'latent': the final latents
Images = list["Image"] | np.ndarray

# Components every generation needs; the VAE encoder opens on first use.
NEEDED = ("unet", "vae_decoder")
LOAD_ATTEMPTS = 3  # loads that saw the bundle change under them (a concurrent --force rebuild) before giving up


class Sampling(TypedDict, total=False):
    """The options every task takes, as keywords.

    steps: denoising steps. guidance_scale: classifier-free guidance strength (<= 1 turns it off).
    guidance_rescale: Lin et al. 2023's CFG rescale (SD 2.x v-prediction models like 0.7).
    seed: one `np.random.default_rng(seed)` draws the task's noise, in the order its docstring gives,
    then any noise the sampler adds. scheduler: a sampler name (default: the one the model's
    scheduler config names). eta: DDIM's and TCD's stochasticity (an error for samplers without it).
    callback(step, total, t) runs after every step, steps numbered 1..total; returning False cancels.
    """

    steps: int
    guidance_scale: float
    guidance_rescale: float
    seed: int | None
    scheduler: str | None
    eta: float | None
    callback: Progress


FEW_STEP_SAMPLERS = ("lcm", "tcd")
FEW_STEPS = 4


class SdxlConditioning(TypedDict, total=False):
    """The SDXL family's conditioning keywords (runtime.families.sdxl.KEYWORDS), typed for the tasks' signatures;
    an SD bundle refuses them by name."""

    original_size: tuple[int, int]
    crops_coords_top_left: tuple[int, int]
    target_size: tuple[int, int]
    negative_original_size: tuple[int, int]
    negative_crops_coords_top_left: tuple[int, int]
    negative_target_size: tuple[int, int]
    aesthetic_score: float
    negative_aesthetic_score: float


class TaskOptions(Sampling, SdxlConditioning, ctl.ControlOptions, total=False):
    """Every keyword a task takes beyond its own arguments: the sampling options, a family's conditioning, ControlNet's."""


DEFAULTS: Sampling = {
    "steps": 50, "guidance_scale": 7.5, "guidance_rescale": 0.0, "seed": None, "scheduler": None, "eta": None, "callback": None,
}  # fmt: skip


def sampling_options(task: str, given: Mapping[str, Any], conditioning: Sequence[str] = (), **task_defaults: Any) -> Sampling:
    """The caller's options over the task's defaults over DEFAULTS; an unknown keyword is a TypeError, as Python's.

    conditioning: the bundle family's own keywords (taken out of `given` by Core.options), named in that error.
    """
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        more = f"; this bundle's conditioning options: {', '.join(conditioning)}" if conditioning else ""
        raise TypeError(f"{task}() got an unexpected keyword argument {unknown[0]!r} (sampling options: {', '.join(DEFAULTS)}{more})")
    options: Sampling = {**DEFAULTS, **task_defaults, **given}  # type: ignore[typeddict-item]
    seed = options["seed"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"seed {seed!r} is not valid: a seed is a whole number >= 0 (any size), or None for a random one")
    for name in ("guidance_scale", "guidance_rescale", "eta"):
        value = options[name]
        if value is None and name == "eta":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        if not np.isfinite(value):
            raise NonFiniteError(f"{name} is {value}: it must be a finite number (NaN/inf would turn every latent into NaN)")
    return options


def check_prompts(prompt: Any, what: str) -> list[str]:
    """A str or a sequence of str, each valid Unicode; anything else is named by its argument."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)) and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    else:
        empty = " (pass '' for no negative prompt)" if what == "negative_prompt" and prompt is None else ""
        raise TypeError(f"{what} must be a str or a list of str, got {type(prompt).__name__} {prompt!r:.60}{empty}")
    for i, p in enumerate(prompts):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            which = what if len(prompts) == 1 else f"{what}[{i}]"
            raise ValueError(
                f"{which} is not valid text: character {e.start} is a lone surrogate {p[e.start]!r} "
                "(bytes that were not valid UTF-8?); pass the prompt as proper Unicode"
            ) from None
    return prompts


def initial_latents(shape: Sequence[int], seed: int | None) -> np.ndarray:
    """The documented seed contract: float32 standard normal, the first draw of numpy's default_rng(seed) (PCG64).

    The same seed gives the same latents, hence the same image, on every backend and machine.
    """
    return np.random.default_rng(seed).standard_normal(tuple(shape), dtype=np.float32)


class _Stopped(Exception):
    """A run stopped at its denoising_end: the latents it had reached."""

    def __init__(self, latents: np.ndarray):
        super().__init__("stopped at denoising_end")
        self.latents = latents


def handoff_cutoff(fraction: Any, what: str, config: Mapping[str, Any]) -> int:
    """The timestep where a hand-off happens, as diffusers computes it for denoising_end / denoising_start."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.integer, np.floating)) or not 0 < fraction < 1:
        raise ValueError(
            f"{what} must be a fraction strictly between 0 and 1 of the noise schedule (e.g. 0.8: the base runs the first "
            f"80% of it, the refiner the rest), got {fraction!r}"
        )
    train = int(config.get("num_train_timesteps", 1000))
    return int(round(train - float(fraction) * train))


def start_step(steps: int, strength: float) -> int:
    """How many of the schedule's first steps img2img skips, as diffusers' get_timesteps: the noise level of strength."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1] (1: start from pure noise, small: stay close to the image), got {strength}")
    kept = min(int(steps * strength), steps)
    if kept == 0:
        raise ValueError(
            f"strength {strength} with {steps} steps leaves no denoising step (int(steps * strength) = 0); "
            f"raise strength to at least {1 / steps:g} or use more steps"
        )
    return steps - kept


class Core:
    """A loaded bundle: its manifest, engines and model family, ready to generate."""

    def __init__(self, bundle: Path, manifest: Manifest, engines: dict[str, Engine], options: Mapping[str, Any] | None = None):
        self.bundle, self.manifest, self.engines = bundle, manifest, engines
        self.height, self.width, self.batch_size = manifest.height, manifest.width, manifest.batch_size  # static shapes
        self._options = dict(options or {})
        self._state: BundleState | None = None  # what Core.load read, to check lazily opened engines against
        self._slots = _slot_state(manifest)  # LoRA slot inputs, fed with every UNet and text encoder call
        self.engines = {name: self._fed(e) for name, e in engines.items()}
        self.family: Family = open_family(bundle, manifest, self.engine)
        class_name = manifest.scheduler.class_name
        self.schedule = noise_schedule(dict(manifest.scheduler.config), class_name if class_name in CLASS_DEFAULTS else "DDIMScheduler")

    @classmethod
    def load(cls, bundle: str | Path, *, device: str | None = None, verify: bool = True, cuda_graph: bool = False) -> Self:
        """Open BUNDLE; the backend follows the component files (onnx -> ONNX Runtime, plan -> TensorRT).

        device: for ONNX bundles, 'cpu' | 'cuda' | 'tensorrt' execution provider (default: CUDA where
        onnxruntime-gpu is installed, else CPU). verify: check every file's sha256 first.
        cuda_graph: capture the TensorRT UNet call once and replay it every step (static shapes allow it).
        """
        bundle = Path(bundle)
        for _ in range(LOAD_ATTEMPTS):
            manifest, state = read_bundle(bundle, verify_files=verify)
            try:
                core = cls._open(bundle, manifest, device, cuda_graph)
            except (BundleError, OSError, ValueError):
                if state.current():
                    raise
                continue  # the bundle changed under the load: a rebuild replaced it; read it again
            if not verify or state.current():
                core._state = state
                return core
            core.close()
        raise BundleError(
            f"bundle {bundle} changed while loading, {LOAD_ATTEMPTS} times (a `--force` rebuild writing it?); "
            "load it again once the rebuild is done"
        )

    @classmethod
    def _open(cls, bundle: Path, manifest: Manifest, device: str | None, cuda_graph: bool) -> Self:
        options: dict[str, Any] = {"device": device} if device else {}
        missing = [c for c in NEEDED if c not in manifest.components]  # the text encoders are the family's to open
        if missing:
            raise BundleError(f"bundle {bundle} has no {', '.join(missing)}; rebuild it with `{rebuild_hint(bundle, manifest)}`")
        if cuda_graph and manifest.components["unet"].format != "plan":
            raise ValueError(
                f"cuda_graph=True needs TensorRT engines, and {bundle} holds ONNX; "
                f"build them with `python -m export.build --from-onnx {bundle}`"
            )
        graph: dict[str, Any] = {"cuda_graph": True} if cuda_graph else {}
        engines = {
            name: load_engine(c, bundle, **_engine_options(c, options), **(graph if name == "unet" else {}))
            for name, c in manifest.components.items()
            if name in NEEDED
        }
        return cls(bundle, manifest, engines, options)

    def engine(self, name: str) -> Engine:
        """A component's engine, opened on first use."""
        if name not in self.engines:
            if name not in self.manifest.components:
                raise BundleError(f"bundle {self.bundle} has no {name}; rebuild it with `{rebuild_hint(self.bundle, self.manifest)}`")
            component = self.manifest.components[name]
            engine = load_engine(component, self.bundle, **_engine_options(component, self._options))
            if self._state is not None and self._state.files and not self._state.current():
                getattr(engine, "close", lambda: None)()
                raise BundleError(
                    f"bundle {self.bundle} was rebuilt since it was loaded, so its {name} would come from another build; "
                    "load the bundle again"
                )
            self.engines[name] = self._fed(engine)
        return self.engines[name]

    def _fed(self, engine: Engine) -> Engine:
        """A slotted component's engine gets the current LoRA slot inputs with every call."""
        if self._slots is not None and engine.component.name in self._slots.feeds:
            return SlotFed(engine, self._slots)
        return engine

    def set_lora(self, adapters: LoraSpec, scale: float = 1.0) -> None:
        """Switch LoRA adapters for the generations that follow, without a rebuild and without touching the weights.

        adapters: None (the base model), a .safetensors file (at `scale`), or a list of files and (file, scale) pairs,
        e.g. [("style.safetensors", 0.8), ("detail.safetensors", 0.5)]. Needs a bundle built with --lora-slots RANK;
        the adapters' ranks per layer must sum to at most RANK. Every adapter is checked before any takes effect.
        """
        wanted = _lora_list(adapters, scale)
        lora = self.manifest.lora
        if self._slots is None or lora is None:
            need = max(8, sum(file_rank(Path(p)) for p, _ in wanted)) if wanted else 8
            fused = f" (its adapters {', '.join(Path(a.file).name for a in lora.fused)} are fused into its weights)" if lora else ""
            raise BundleError(
                f"bundle {self.bundle} has no LoRA slots{fused}: it was built without --lora-slots, so adapters cannot be switched "
                f"at run time. Rebuild it with slots: `{self.rebuild(lora=[], lora_slots=need)}`, or fuse one adapter at export "
                "with --lora FILE[:SCALE]"
            )
        read = []
        for path, s in wanted:
            fix = f"; fuse it at export instead: `{self.rebuild(lora=[*(f'{a.file}:{a.scale!r}' for a in lora.fused), f'{path}:{s!r}'])}`"
            read.append((read_adapter(path, self._slots.layers, where=f"bundle {self.bundle}'s LoRA slots", fix=fix), s))
        need, where = rank_needed(read)
        if need > self._slots.rank:
            ranks = " + ".join(f"{a.name}: {a.rank}" for a, _ in read)
            raise LoraError(
                f"the adapters need rank {need} at {where} ({ranks}), but bundle {self.bundle}'s LoRA slots have rank "
                f"{self._slots.rank}; rebuild it with larger slots: `{self.rebuild(lora_slots=need)}`"
            )
        self._slots.set(read)

    @property
    def lora(self) -> tuple[tuple[str, float], ...]:
        """The adapters set_lora switched on, as (file name, scale); () for the base model or a bundle without slots."""
        return tuple((a.name, s) for a, s in self._slots.active) if self._slots is not None else ()

    @property
    def pipelines(self) -> tuple[str, ...]:
        """What this bundle can do: txt2img, img2img, inpaint (text-to-image models), or inpaint / upscale alone."""
        return self.manifest.pipelines

    def options(self, task: str, given: Mapping[str, Any], **task_defaults: Any) -> tuple[Sampling, Mapping[str, Any]]:
        """The sampling options (sampling_options) and the family's conditioning keywords (SDXL's original_size, ...),
        both checked before any work; a keyword that is neither is a TypeError naming both lists."""
        keywords = self.family.keywords
        conditioning = {k: v for k, v in given.items() if k in keywords}
        control = ctl.task_options(task, given)  # checked when the run's UNet is made
        rest = {k: v for k, v in given.items() if k not in keywords and k not in ctl.KEYWORDS}
        options = sampling_options(
            task, rest, (*keywords, *ctl.KEYWORDS), **{**self.step_defaults(rest.get("scheduler")), **task_defaults}
        )
        self.family.conditioning(conditioning)
        return options, {**conditioning, **control}

    def require(self, pipeline: str) -> None:
        """Refuse a pipeline the bundle was not built for, saying why and what builds it."""
        if pipeline in self.pipelines:
            return
        sdxl = self.manifest.sdxl
        if pipeline == "txt2img" and sdxl is not None and sdxl.requires_aesthetics_score:
            raise BundleError(
                f"txt2img is not available: bundle {self.bundle} holds an SDXL refiner (conditioned on an aesthetic score, "
                f"made to finish the last denoising steps), which runs {', '.join(self.pipelines)} only; generate with an SDXL base "
                "bundle and hand its latents over: base.txt2img(prompt, denoising_end=0.8, output_type='latent'), then "
                "refiner.img2img(prompt, latents, denoising_start=0.8)"
            )
        kind = self.manifest.model.kind
        if kind != "text2image" or pipeline == "upscale":
            why = {
                "inpainting": "an inpainting model (its UNet takes the mask and masked image as extra channels)",
                "upscaler": "an upscaler (its UNet takes the low-resolution image)",
                "text2image": "a text-to-image model",
            }.get(kind, f"a {kind} model")
            raise BundleError(
                f"{pipeline} is not available: bundle {self.bundle} holds {why}, which runs {', '.join(self.pipelines)} only; "
                f"build a bundle from a model made for {pipeline}"
            )
        encoder = " (adds the VAE encoder)" if pipeline in ("img2img", "inpaint") else ""
        raise BundleError(
            f"{pipeline} is not available: bundle {self.bundle} was built for {', '.join(self.pipelines)} only; "
            f"rebuild it with `{rebuild_hint(self.bundle, self.manifest, pipelines='txt2img,img2img,inpaint')}`{encoder}"
        )

    def close(self) -> None:
        """Release the engines' device memory and streams (TensorRT); safe to call twice."""
        for engine in self.engines.values():
            getattr(engine, "close", lambda: None)()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def rebuild(self, **changes: object) -> str:
        """The export.build line that rebuilds this bundle in place, with `changes` to its flags (height=512)."""
        return rebuild_hint(self.bundle, self.manifest, **changes)

    def prompts(self, prompt: Prompt, what: str) -> list[str]:
        """One prompt repeated, or exactly batch-size prompts; an empty `prompt` is refused."""
        prompts = check_prompts(prompt, what)
        if len(prompts) == 1:
            prompts = prompts * self.batch_size
        if what == "prompt" and any(not p.strip() for p in prompts):
            raise ValueError("prompt is empty: describe the image to generate (an empty prompt gives unconditioned noise)")
        if len(prompts) != self.batch_size:
            raise ValueError(
                f"{what}: {len(prompts)} prompts for a bundle built with batch size {self.batch_size}; "
                f"pass one prompt or exactly {self.batch_size} (or rebuild with --batch-size {len(prompts)})"
            )
        return prompts

    def guided_model(
        self, prompt: Prompt, negative_prompt: Prompt, options: Sampling, image: Extra | None = None,
        conditioning: Mapping[str, Any] | None = None,
    ) -> Model:  # fmt: skip
        """The UNet wrapped for the bundle's guidance mode, conditioned on the prompts by the model's family.

        image: per-image UNet conditioning beyond latents and text (see guidance.unet_call), batch B.
        conditioning: the family's keywords and ControlNet's (runtime.control), as Core.options split them off.
        """
        prompts = self.prompts(prompt, "prompt")  # checked before the negatives: an empty prompt is the likelier mistake
        negatives = self.prompts(negative_prompt, "negative_prompt")
        family = {k: v for k, v in (conditioning or {}).items() if k not in ctl.KEYWORDS}
        control = {k: v for k, v in (conditioning or {}).items() if k in ctl.KEYWORDS}
        unet = ctl.controlled_unet(self.engines["unet"], self.engine, self.manifest, control, self.timesteps(options), self.rebuild())
        return guided(
            unet, self.family, self.manifest.guidance_info, prompts, negatives,
            options["guidance_scale"], options["guidance_rescale"], image, self.rebuild, family,
        )  # fmt: skip

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents -> float32 images (B, H, W, 3) in [0, 1]; NaN (fp16 overflow) is an error, not a black image."""
        self.check_latents(latents, "the latents given to the VAE decoder")
        vae = self.engines["vae_decoder"]
        feed = cast_feed(vae.component, {"latent_sample": latents / self.manifest.vae.scaling_factor})
        out = np.asarray(vae(feed)["sample"])
        try:
            check_finite(vae.component, feed, out)
        except NonFiniteError as e:
            raise self._with_hint(e) from None
        return img.to_images(out)

    def check_latents(self, latents: np.ndarray, what: str) -> None:
        """NaN/inf latents are refused where they are found, named, never decoded into a black image."""
        if not np.isfinite(latents).all():
            raise NonFiniteError(f"{what} hold NaN/inf; nothing downstream can recover an image from them")

    def _with_hint(self, e: NonFiniteError, where: str = "") -> NonFiniteError:
        """An engine's NonFiniteError with the step it happened at, and for fp16 overflow the fp32 rebuild."""
        hint = ""
        if e.fp16_overflow:
            hint = f"; rebuild in fp32 with `{rebuild_hint(self.bundle, self.manifest, precision='fp32')}`"
        return NonFiniteError(f"{where}{e}{hint}", fp16_overflow=e.fp16_overflow)

    def encode_image(self, image: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """Pixels (B, 3, H, W) in [-1, 1] -> scaled latents: a sample of the VAE posterior, mean + std * noise."""
        enc = self.engine("vae_encoder")
        feed = cast_feed(enc.component, {"sample": image})
        params = np.asarray(enc(feed)["latent_parameters"], dtype=np.float64)
        try:
            check_finite(enc.component, feed, params)
        except NonFiniteError as e:
            raise self._with_hint(e) from None
        mean, logvar = np.split(params, 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))  # diffusers' DiagonalGaussianDistribution clamps the same
        latents: np.ndarray = ((mean + std * noise) * self.manifest.vae.scaling_factor).astype(np.float32)
        return latents

    def denoise(
        self,
        model: Model,
        noise: np.ndarray,
        options: Sampling,
        rng: np.random.Generator,
        *,
        init: np.ndarray | None = None,
        start: int = 0,
        known: Known | None = None,
        end: int | None = None,
        resume: bool = False,
    ) -> np.ndarray:
        """The one sampling loop every task shares; see runtime.sampling for init, start, known and resume.

        end: stop after that many of the schedule's steps and return the latents reached (denoising_end).
        """
        name = options["scheduler"] or self._default_sampler()
        sampler = get_sampler(name)
        eta = {} if options["eta"] is None else {"eta": options["eta"]}
        steps = options["steps"]
        self.check_latents(noise, "the initial latents (latents/noise given by the caller)")
        if init is not None:
            self.check_latents(init, "the encoded image latents")
        done = [start]  # schedule steps finished, advanced by the callback the sampler calls after each step
        user_callback = _step_callback(options["callback"], start, end or steps)

        def on_step(i: int, t: float, x: np.ndarray) -> None:
            done[0] = i + 1
            if user_callback is not None:
                user_callback(i, t, x)
            if end is not None and i + 1 >= end:
                raise _Stopped(x)

        def checked(x: np.ndarray, t: float) -> np.ndarray:
            """The guided model, its NaN/inf named by step; the UNet and the mix check their own outputs, so the
            latents are looked at only once something failed: the initial ones were checked, so NaN in them
            can only come from the sampler's previous update."""
            try:
                return model(x, t)
            except NonFiniteError as e:
                where = f"step {done[0] - start + 1} of {steps - start}: "
                if not np.isfinite(x).all():
                    raise NonFiniteError(
                        f"{where}the latents entering the UNet hold NaN/inf, made by the {name} sampler's previous update "
                        f"(eta={options['eta']}) from finite model outputs"
                    ) from None
                raise self._with_hint(e, where) from None

        try:
            latents: np.ndarray = sampler(
                checked, noise, self.schedule, steps, init=init, start=start, known=known, **eta, rng=rng, callback=on_step,
                **({"resume": True} if resume else {}),
            )  # fmt: skip
        except _Stopped as stop:
            latents = stop.latents
        if not np.isfinite(latents).all():
            raise NonFiniteError(f"the {name} sampler's last update (eta={options['eta']}) produced NaN/inf from finite model outputs")
        return latents

    def timesteps(self, options: Sampling) -> list[float]:
        """The timestep of each step the sampler will run: a dry run of it with a zero model on a 1x1 latent."""
        seen: list[float] = []
        get_sampler(options["scheduler"] or self._default_sampler())(
            lambda x, t: np.zeros_like(x), np.zeros((1, 1, 1, 1), np.float32), self.schedule, options["steps"],
            rng=np.random.default_rng(0), callback=lambda i, t, x: seen.append(t),
        )  # fmt: skip
        return seen

    def end_step(self, options: Sampling, denoising_end: float | None) -> int | None:
        """How many steps run before a denoising_end hand-off: those whose timestep is at or above the cutoff (diffusers)."""
        if denoising_end is None:
            return None
        cutoff = handoff_cutoff(denoising_end, "denoising_end", self.manifest.scheduler.config)
        ts = self.timesteps(options)
        kept = sum(t >= cutoff for t in ts)
        if kept == 0:
            raise ValueError(
                f"denoising_end {denoising_end} stops before the first of {len(ts)} steps (its timestep {ts[0]:g} is below the "
                f"cutoff {cutoff}); raise denoising_end"
            )
        return kept

    def start_at(self, options: Sampling, denoising_start: float) -> int:
        """The step a denoising_start hand-off resumes at: the run keeps the steps below the cutoff (diffusers)."""
        cutoff = handoff_cutoff(denoising_start, "denoising_start", self.manifest.scheduler.config)
        ts = self.timesteps(options)
        kept = sum(t < cutoff for t in ts)
        if kept == 0:
            raise ValueError(
                f"denoising_start {denoising_start} leaves none of the {len(ts)} steps to run (the last timestep {ts[-1]:g} is "
                f"not below the cutoff {cutoff}); lower denoising_start or use more steps"
            )
        return len(ts) - kept

    def finish(self, latents: np.ndarray, output_type: str, keep: tuple[np.ndarray, np.ndarray] | None = None) -> Images:
        """Latents -> the asked output type; keep=(original pixels, pixel mask) composites the result over the original."""
        if output_type == "latent":
            self.check_latents(latents, "the final latents")
            return latents
        images = self.decode(latents)
        if keep is not None:
            images = img.composite(images, *keep)
        return images if output_type == "np" else img.to_pil(images)

    def draw(self, given: np.ndarray | None, rng: np.random.Generator, shape: Sequence[int], what: str) -> np.ndarray:
        """A caller's noise, checked, or the generator's next draw."""
        if given is None:
            return rng.standard_normal(tuple(shape), dtype=np.float32)
        if not isinstance(given, np.ndarray):
            raise TypeError(f"{what} must be a numpy array, got {type(given).__name__}")
        if tuple(given.shape) != tuple(shape):
            raise ValueError(f"{what}: shape {tuple(given.shape)} but this bundle needs {tuple(shape)}")
        out = np.asarray(given, dtype=np.float32)
        if not np.isfinite(out).all():
            raise NonFiniteError(f"{what} given by the caller hold NaN/inf (or values too large for float32)")
        return out

    def step_defaults(self, scheduler: str | None) -> dict[str, int]:
        """Few-step samplers (LCM, TCD: a distilled UNet) default to 4 steps, the rest to DEFAULTS' 50."""
        name = scheduler or default_sampler(self.manifest.scheduler.class_name, self.manifest.scheduler.config)
        return {"steps": FEW_STEPS} if name in FEW_STEP_SAMPLERS else {}

    def _default_sampler(self) -> str:
        class_name = self.manifest.scheduler.class_name
        if class_name not in DEFAULT_FOR_CLASS:
            warnings.warn(
                f"the model's scheduler is {class_name}, which this runtime does not reproduce; sampling with DDIM "
                "from the same noise schedule (pass scheduler='ddim' to silence this)",
                stacklevel=4,
            )
        return default_sampler(class_name, self.manifest.scheduler.config)


def _slot_state(manifest: Manifest) -> SlotState | None:
    """The zero slot inputs of a bundle built with --lora-slots; None for a bundle without."""
    lora = manifest.lora
    if lora is None or not lora.slot_rank:
        return None
    shapes = {(c.name, t.name): t.shape for c in manifest.components.values() for t in c.inputs if t.name.startswith("lora_")}
    return SlotState([t for t in lora.targets if t.component in manifest.components], lora.slot_rank, shapes)


def _lora_list(adapters: LoraSpec, scale: float) -> list[tuple[Path, float]]:
    """set_lora's argument as (file, scale) pairs; anything else is a TypeError naming what was given."""
    if adapters is None:
        return []
    pair = isinstance(adapters, tuple) and len(adapters) == 2 and isinstance(adapters[0], (str, Path))
    pair = pair and not isinstance(adapters[1], (str, Path))  # type: ignore[index]
    if isinstance(adapters, (str, Path)):
        items: list[Any] = [(adapters, scale)]
    else:
        items = [adapters] if pair else list(adapters)
    out = []
    for item in items:
        if isinstance(item, (str, Path)):
            item = (item, scale)
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], (str, Path))):
            raise TypeError(f"set_lora takes None, a file, or a list of files and (file, scale) pairs; got {item!r:.80}")
        s = item[1]
        if isinstance(s, bool) or not isinstance(s, (int, float, np.integer, np.floating)) or not np.isfinite(s):
            raise ValueError(f"set_lora: the scale of {item[0]} must be a finite number, got {s!r}")
        out.append((Path(item[0]), float(s)))
    return out


def _engine_options(component: Component, options: Mapping[str, Any]) -> dict[str, Any]:
    """ONNX Runtime's worker threads spin after a run, waiting for the next; only the UNet, called every
    step, has a next run coming. Spinning after a once-per-image call steals a core from the UNet calls
    that follow (15% of a reference-model image on 2 cores)."""
    return {**options, "spin": component.name == "unet"} if component.format == "onnx" else dict(options)


def _step_callback(progress: Progress, start: int, steps: int) -> Callable[[int, float, np.ndarray], None] | None:
    """The sampler counts schedule steps (img2img starts at `start`); the caller sees the steps that run, 1..total."""
    if progress is None:
        return None
    total = steps - start

    def on_step(i: int, t: float, x: np.ndarray) -> None:
        done = i - start + 1
        if progress(done, total, t) is False:
            raise Cancelled(f"generation cancelled by the progress callback after step {done} of {total}")

    return on_step
