"""Session: a loaded bundle, what every task shares: its engines, its family's text side, one denoise loop, the VAE.

Tasks (runtime/tasks/) compose these parts; `runtime.Pipeline` is a Session with the tasks as methods. What a
task is asked is checked in runtime.options, where a run starts and stops in runtime.handoff, and the LoRA
slots are switched in runtime.slots.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import control as ctl
from .bundle import BundleState, Component, Manifest, read_bundle, rebuild_hint
from .bundle.levers import DEEP_UNET, SHALLOW_UNET, TINY_DECODER
from .deepcache import CachedUNet, StepAware
from .dispatch import load_engine
from .errors import BundleError, Cancelled, NonFiniteError
from .families import Family, open_family
from .guidance import Extra, guided
from .handoff import Stopped

# the VAE side (decode, encode_image, finish, draw) is Latents'; Images is named here too, where the tasks import it
from .latents import Images as Images
from .latents import Latents
from .options import Progress, Prompt, Sampling, batch_prompts
from .pinned import PinnedFolder
from .preview import Recorder, linear_preview
from .protocol import Engine
from .sampling import CLASS_DEFAULTS, DEFAULT_FOR_CLASS, Known, Model, default_sampler, get_sampler, noise_schedule, sampler_grid
from .slots import LoraSpec, Slots

if TYPE_CHECKING:
    from typing_extensions import Self

# Components every generation needs; the VAE encoder opens on first use.
NEEDED = ("unet", "vae_decoder")
LOAD_ATTEMPTS = 3  # loads that saw the bundle change under them (a concurrent --force rebuild) before giving up


def initial_latents(shape: Sequence[int], seed: int | None) -> np.ndarray:
    """The documented seed contract: float32 standard normal, the first draw of numpy's default_rng(seed) (PCG64).

    The same seed gives the same latents, hence the same image, on every backend and machine.
    """
    return np.random.default_rng(seed).standard_normal(tuple(shape), dtype=np.float32)


class Session(Latents):
    """A loaded bundle: its manifest, engines and model family, ready to generate."""

    def __init__(
        self, bundle: Path, manifest: Manifest, engines: dict[str, Engine], options: Mapping[str, Any] | None = None,
        pinned: PinnedFolder | None = None,
    ):  # fmt: skip
        self.bundle, self.manifest = bundle, manifest
        self._pinned = pinned  # the folder this session's files are read from (lazily opened engines included)
        self._root = pinned.root if pinned is not None else bundle
        self.height, self.width, self.batch_size = manifest.height, manifest.width, manifest.batch_size  # static shapes
        self._options = dict(options or {})
        self._every_step: dict[str, Any] = {}  # load options of the UNets called every step (cuda_graph=True), opened lazily
        self._state: BundleState | None = None  # what Session.load read, to check lazily opened engines against
        self._slots = Slots(bundle, manifest, self.rebuild)
        self.engines = {name: self._slots.fed(e) for name, e in engines.items()}
        self.family: Family = open_family(bundle, manifest, self.engine, root=self._root)
        class_name = manifest.scheduler.class_name
        self.schedule = noise_schedule(dict(manifest.scheduler.config), class_name if class_name in CLASS_DEFAULTS else "DDIMScheduler")

    @classmethod
    def load(cls, bundle: str | Path, *, device: str | None = None, verify: bool = True, cuda_graph: bool = False) -> Self:
        """Open BUNDLE; the backend follows the component files (onnx -> ONNX Runtime, plan -> TensorRT).

        device: for ONNX bundles, 'cpu' | 'cuda' | 'tensorrt' execution provider (default: CUDA where
        onnxruntime-gpu is installed, else CPU). verify: check every file's sha256 first.
        cuda_graph: capture the TensorRT UNet call once and replay it every step (static shapes allow it); DeepCache's
        full and shallow UNets too.
        """
        bundle = Path(bundle)
        for _ in range(LOAD_ATTEMPTS):
            pinned = PinnedFolder(bundle)  # every read of this attempt goes to the folder opened here: one build
            state: BundleState | None = None
            try:
                manifest, state = read_bundle(bundle, verify_files=verify, root=pinned.root)
                session = cls._open(bundle, manifest, device, cuda_graph, pinned)
            except (BundleError, OSError, ValueError):
                changed = pinned.moved() or (state is not None and not state.current())  # asked before the handle closes
                pinned.close()
                if not changed:
                    raise
                continue  # the bundle was swapped or deleted under the load (a rebuild replaced it): read it again
            if not verify or state.current():  # no file was altered in place while the engines opened
                session._state = state
                return session
            session.close()
        raise BundleError(
            f"bundle {bundle} changed while loading, {LOAD_ATTEMPTS} times (a `--force` rebuild writing it?); "
            "load it again once the rebuild is done"
        )

    @classmethod
    def _open(cls, bundle: Path, manifest: Manifest, device: str | None, cuda_graph: bool, pinned: PinnedFolder) -> Self:
        options: dict[str, Any] = {"device": device} if device else {}
        components = manifest.components
        # the text encoders are the family's to open; a bundle with only the tiny VAE decoder decodes with it
        missing = [c for c in NEEDED if c not in components and not (c == "vae_decoder" and TINY_DECODER in components)]
        if missing:
            raise BundleError(f"bundle {bundle} has no {', '.join(missing)}; rebuild it with `{rebuild_hint(bundle, manifest)}`")
        if cuda_graph and manifest.components["unet"].format != "plan":
            raise ValueError(
                f"cuda_graph=True needs TensorRT engines, and {bundle} holds ONNX; "
                f"build them with `python -m export.build --from-onnx {bundle}`"
            )
        graph: dict[str, Any] = {"cuda_graph": True} if cuda_graph else {}
        engines: dict[str, Engine] = {}
        try:
            wanted = [n for n in components if n in NEEDED or (n == TINY_DECODER and "vae_decoder" not in components)]
            for name in wanted:
                c = components[name]
                engines[name] = load_engine(c, pinned.root, **_engine_options(c, options), **(graph if name == "unet" else {}))
            session = cls(bundle, manifest, engines, options, pinned)
            session._every_step = graph  # DeepCache's pair stands in for the UNet's calls: captured the same way
            return session
        except BaseException:
            for engine in engines.values():
                getattr(engine, "close", lambda: None)()
            raise

    def engine(self, name: str) -> Engine:
        """A component's engine, opened on first use."""
        if name not in self.engines:
            if name not in self.manifest.components:
                raise BundleError(f"bundle {self.bundle} has no {name}; rebuild it with `{rebuild_hint(self.bundle, self.manifest)}`")
            component = self.manifest.components[name]
            rebuilt = BundleError(
                f"bundle {self.bundle} was rebuilt since it was loaded, so its {name} would come from another build; load the bundle again"
            )
            try:
                every_step = self._every_step if name in (DEEP_UNET, SHALLOW_UNET) else {}
                engine = load_engine(component, self._root, **_engine_options(component, self._options), **every_step)
            except (BundleError, OSError):
                if self._state is not None and self._state.files and not self._state.current():
                    raise rebuilt from None  # the loaded build's folder was deleted by the rebuild
                raise
            if self._state is not None and self._state.files and not self._state.current():
                getattr(engine, "close", lambda: None)()
                raise rebuilt
            self.engines[name] = self._slots.fed(engine)
        return self.engines[name]

    def set_lora(self, adapters: LoraSpec, scale: float = 1.0) -> None:
        """Switch LoRA adapters for the generations that follow, without a rebuild and without touching the weights.

        adapters: None (the base model), a .safetensors file (at `scale`), or a list of files and (file, scale) pairs,
        e.g. [("style.safetensors", 0.8), ("detail.safetensors", 0.5)]. Needs a bundle built with --lora-slots RANK;
        the adapters' ranks per layer must sum to at most RANK. Every adapter is checked before any takes effect.

        Atomic per generation: a generation uses the adapters set when it began, to its end. set_lora called meanwhile
        (from another thread) does not wait; it applies from the next generation.
        """
        self._slots.set(adapters, scale)

    def generation(self) -> AbstractContextManager[None]:
        """One generation's scope: its engine calls all see the LoRA adapters set when it began (see set_lora)."""
        return self._slots.pinned()

    @property
    def lora(self) -> tuple[tuple[str, float], ...]:
        """The adapters set_lora switched on, as (file name, scale); () for the base model or a bundle without slots."""
        return self._slots.active

    @property
    def pipelines(self) -> tuple[str, ...]:
        """What this bundle can do: txt2img, img2img, inpaint (text-to-image models), or inpaint / upscale alone."""
        return self.manifest.pipelines

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
        if self._pinned is not None:
            self._pinned.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def rebuild(self, **changes: object) -> str:
        """The export.build line that rebuilds this bundle in place, with `changes` to its flags (height=512)."""
        return rebuild_hint(self.bundle, self.manifest, **changes)

    def guided_model(
        self, prompt: Prompt, negative_prompt: Prompt, options: Sampling, image: Extra | None = None,
        conditioning: Mapping[str, Any] | None = None,
    ) -> Model:  # fmt: skip
        """The UNet wrapped for the bundle's guidance mode, conditioned on the prompts by the model's family.

        image: per-image UNet conditioning beyond latents and text (see guidance.unet_call), batch B.
        conditioning: the family's keywords and ControlNet's (runtime.control), as runtime.options.task_options split them off.
        """
        prompts = batch_prompts(prompt, "prompt", self.batch_size)  # checked before the negatives: the likelier mistake
        negatives = batch_prompts(negative_prompt, "negative_prompt", self.batch_size)
        family = {k: v for k, v in (conditioning or {}).items() if k not in ctl.KEYWORDS}
        control = {k: v for k, v in (conditioning or {}).items() if k in ctl.KEYWORDS}
        schedule = lambda: self.timesteps(options)  # noqa: E731  (only a ControlNet bundle asks)
        unet: Engine | CachedUNet = ctl.controlled_unet(self.engines["unet"], self.engine, self.manifest, control, schedule, self.rebuild())
        if options["cache_interval"] > 1:
            if ctl.residual_inputs(self.manifest):  # export refuses --deepcache with --controlnet; an edited manifest lands here
                raise BundleError(
                    f"cache_interval={options['cache_interval']}: bundle {self.bundle} has ControlNets, and DeepCache's UNets take no "
                    "ControlNet residuals; use cache_interval=1"
                )
            unet = self.cached_unet(options["cache_interval"])
        model = guided(
            unet, self.family, self.manifest.guidance_info, prompts, negatives,
            options["guidance_scale"], options["guidance_rescale"], image, self.rebuild, family,
        )  # fmt: skip
        return StepAware(model, unet) if isinstance(unet, CachedUNet) else model

    def cached_unet(self, interval: int) -> CachedUNet:
        """DeepCache's UNet pair behind the plain UNet's interface; a bundle built without them is refused, with the fix."""
        if DEEP_UNET not in self.manifest.components or SHALLOW_UNET not in self.manifest.components:
            raise BundleError(
                f"cache_interval={interval}: bundle {self.bundle} has no DeepCache UNets (built without --deepcache); "
                f"rebuild it with them: `{self.rebuild(deepcache=0)}`, or use cache_interval=1"
            )
        return CachedUNet(self.engines["unet"].component, self.engine(DEEP_UNET), self.engine(SHALLOW_UNET), interval)

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
        step_done = getattr(model, "step_done", None)  # DeepCache's schedule counts steps
        recorder = Recorder(model) if options["preview"] is not None else None
        model = recorder or model

        def on_step(i: int, t: float, x: np.ndarray) -> None:
            done[0] = i + 1
            if step_done is not None:
                step_done()
            if recorder is not None:
                self._preview(recorder, options, i + 1 - start, (end or steps) - start)
            if user_callback is not None:
                user_callback(i, t, x)
            if end is not None and i + 1 >= end:
                raise Stopped(x)

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
        except Stopped as stop:
            latents = stop.latents
        if not np.isfinite(latents).all():
            raise NonFiniteError(f"the {name} sampler's last update (eta={options['eta']}) produced NaN/inf from finite model outputs")
        return latents

    def _preview(self, recorder: Recorder, options: Sampling, step: int, total: int) -> None:
        """Every preview_every steps and after the last, the caller's preview gets the current x0 estimate as images."""
        preview = options["preview"]
        if preview is None or (step % options["preview_every"] and step != total):
            return
        x0 = recorder.estimate(self.schedule.alphas_cumprod, self.schedule.prediction_type)
        if x0 is None:
            return
        if TINY_DECODER in self.manifest.components and self.manifest.levers.tiny_vae is not None:
            images = self.decode(x0, "tiny")
        elif self.manifest.levers.preview is not None:
            images = linear_preview(x0, self.manifest.levers.preview)
        else:  # a bundle exported before previews existed: the full decoder, which costs what it costs
            images = self.decode(x0, "full")
        preview(step, total, images)

    def timesteps(self, options: Sampling) -> list[float]:
        """The timestep of each step the sampler will run: its grid, computed from the schedule (the sampler table)."""
        return sampler_grid(options["scheduler"] or self._default_sampler(), self.schedule, options["steps"])

    def _default_sampler(self) -> str:
        class_name = self.manifest.scheduler.class_name
        if class_name not in DEFAULT_FOR_CLASS:
            warnings.warn(
                f"the model's scheduler is {class_name}, which this runtime does not reproduce; sampling with DDIM "
                "from the same noise schedule (pass scheduler='ddim' to silence this)",
                stacklevel=4,
            )
        return default_sampler(class_name, self.manifest.scheduler.config)


def _engine_options(component: Component, options: Mapping[str, Any]) -> dict[str, Any]:
    """How an ONNX Runtime session's idle workers wait. Workers that spin after a run hold a core until the next run:
    worth it for the UNet, whose next run is its own one step later, and for DeepCache's deep UNet, whose next runs
    are the short shallow ones. A once-per-image component's workers sleep: their spinning took 15% of a
    reference-model image on 2 cores from the UNet calls that follow. The shallow UNet spins only within its own
    runs: spinning after them took a core from the deep UNet's long run that follows (a deep-shallow-shallow cycle
    of the reference model's pair, on 2 cores: 0.65-0.67x of three plain UNet calls with it, 0.54-0.57x without)."""
    if component.format != "onnx":
        return dict(options)
    spin = {"unet": "always", DEEP_UNET: "always", SHALLOW_UNET: "in-run"}.get(component.name, "never")
    return {**options, "spin": spin}


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
