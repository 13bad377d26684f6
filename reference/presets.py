"""Training recipes: one frozen ``Recipe`` per preset, overridable from the command line.

``gpu`` fills about 7 minutes of an H100; ``cpu`` about 2 hours of a 2-core machine; ``quick``
is a smoke run of a minute or two that exercises every phase (the tests use it). ``layout``
and ``settle`` continue a trained model (``--init``): first on the high-noise timesteps alone,
where the layout of the image is decided (see ``t_min``), then on all of them again. Step counts
are ceilings: with a time limit each phase also stops when its share of the time is spent,
and the learning rate anneals on whichever of the two runs out first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a training run, besides the output folder."""

    n_images: int
    vae_steps: int
    vae_batch_size: int
    unet_steps: int
    batch_size: int
    time_limit: float | None  # seconds for the whole run, save included; None: steps only
    vae_lr: float = 1e-3
    unet_lr: float = 1e-3
    warmup_steps: int = 200
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    kl_weight: float = 1e-6
    edge_weight: float = 0.5
    object_weight: float = 10.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    # Timesteps are drawn uniformly from [t_min, 1000). From t ~ 800 up the noisy latents stop
    # showing where the object is, so only there must the UNet take position from the caption;
    # those steps weigh little in the uniform-t loss (their noise is nearly all of z_t).
    t_min: int = 0
    captions_per_combination: int = 256
    vae_time_share: float = 0.22  # of the time left after data; the UNet gets the rest
    checkpoint_every_s: float | None = 120.0
    log_every_s: float = 5.0
    seed: int = 0
    workers: int | None = None

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return asdict(self)


# Presets that only continue a trained model (python -m reference.train --init MODEL).
CONTINUING = ("layout", "settle")

PRESETS: dict[str, Recipe] = {
    # Batches large enough to keep an H100 busy at 64x64; the time limit, not the step
    # ceilings, normally ends each phase.
    "gpu": Recipe(
        n_images=50_000,
        vae_steps=4_000,
        vae_batch_size=256,
        unet_steps=30_000,
        batch_size=1024,
        time_limit=340.0,
        vae_time_share=0.35,
        warmup_steps=200,
    ),
    # Measured on 2 idle cores: 1.6 VAE steps/s at batch 16, 1.3 text encoder + UNet steps/s at
    # batch 32, 65 s to encode the latents; two hours give the 3000 VAE steps (~30 min) and
    # ~7000 UNet steps. On a busy machine time, not the step ceilings, ends each phase.
    "cpu": Recipe(
        n_images=10_000,
        vae_steps=3_000,
        vae_batch_size=16,
        unet_steps=20_000,
        batch_size=32,
        time_limit=7_200.0,
        vae_time_share=0.3,
        checkpoint_every_s=600.0,
        warmup_steps=100,
    ),
    # Stages two and three of the shipped model (python -m reference.train --init ...), sized for
    # the 2-core CPU at ~1 step/s. "layout": the text encoder + UNet trained further on t >= 800
    # alone, at a constant learning rate with the raw weights kept: the UNet learns to place the
    # object where the caption says, and the lower steps drift (colour 58% on 50 prompts).
    # "settle": all timesteps again, annealed with EMA: the lower steps recover, position stays.
    "layout": Recipe(
        n_images=8_000,
        vae_steps=1,  # unused: the VAE comes with --init
        vae_batch_size=16,
        unet_steps=1_643,
        batch_size=48,
        time_limit=None,
        unet_lr=3e-4,
        warmup_steps=1,
        min_lr_ratio=1.0,
        ema_decay=0.0,
        captions_per_combination=64,
        checkpoint_every_s=600.0,
        seed=7,
        t_min=800,
    ),
    "settle": Recipe(
        n_images=10_000,
        vae_steps=1,
        vae_batch_size=16,
        unet_steps=1_185,
        batch_size=48,
        time_limit=None,
        unet_lr=3e-4,
        warmup_steps=20,
        ema_decay=0.998,
        checkpoint_every_s=600.0,
    ),
    "quick": Recipe(
        n_images=256,
        vae_steps=30,
        vae_batch_size=8,
        unet_steps=40,
        batch_size=8,
        time_limit=None,
        warmup_steps=4,
        captions_per_combination=16,
        checkpoint_every_s=None,
        log_every_s=2.0,
    ),
}


def resolve_recipe(preset: str, **overrides) -> Recipe:
    """The named preset with ``overrides`` (Recipe fields) applied, checked for sense."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    recipe = replace(PRESETS[preset], **overrides)
    check_recipe(recipe)
    return recipe


def check_recipe(r: Recipe) -> None:
    """Raise ValueError naming the first setting that cannot work."""
    positive = ("n_images", "vae_steps", "vae_batch_size", "unet_steps", "batch_size", "captions_per_combination")
    for name in positive:
        if getattr(r, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(r, name)}")
    if r.time_limit is not None and r.time_limit <= 0:
        raise ValueError(f"time limit must be > 0 seconds, got {r.time_limit}")
    if r.workers is not None and r.workers < 1:
        raise ValueError(f"workers must be >= 1, got {r.workers}")
    if not 0.0 <= r.caption_dropout < 1.0:
        raise ValueError(f"caption dropout must be in [0, 1), got {r.caption_dropout}")
    if not 0.0 <= r.ema_decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {r.ema_decay}")
    if not 0 <= r.t_min < 1000:
        raise ValueError(f"t_min must be in [0, 1000), got {r.t_min}")
    if not 0.0 < r.vae_time_share < 1.0:
        raise ValueError(f"the VAE's time share must be in (0, 1), got {r.vae_time_share}")
