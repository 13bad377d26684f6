"""A build's options fitted to one loaded model: image size, guidance mode, pipelines and the components they need."""

from __future__ import annotations

from .model import SourceModel


def image_size(model: SourceModel, height: int | None, width: int | None) -> tuple[int, int]:
    """Default to the model's native size; sizes must survive the VAE and every UNet downsampling."""
    native = model.unet.config.sample_size * model.vae_factor
    height, width = height or native, width or native
    multiple = model.vae_factor * 2 ** (len(model.unet.config.down_block_types) - 1)
    for what, v in (("height", height), ("width", width)):
        if v <= 0 or v % multiple:
            raise ValueError(
                f"--{what} {v} is not a positive multiple of {multiple} "
                f"(the VAE's factor {model.vae_factor} times the UNet's downsampling); try {max(multiple, round(v / multiple) * multiple)}"
            )
    return height, width


def resolve_guidance(model: SourceModel, asked: str) -> str:
    """auto: a guidance embedding where the UNet takes one (LCM), else classifier-free guidance."""
    takes_embedding = model.unet.config.time_cond_proj_dim is not None
    if asked == "auto":
        return "embedded" if takes_embedding else "cfg"
    if asked == "embedded" and not takes_embedding:
        raise ValueError(
            "--guidance embedded needs a UNet with time_cond_proj_dim (an LCM-distilled UNet); this one has none: use cfg or none"
        )
    return asked


def resolve_pipelines(model: SourceModel, asked: str | None) -> tuple[str, ...]:
    """Default: everything the model can do; a subset leaves out what it does not need (txt2img alone: no VAE encoder)."""
    if asked is None:
        return model.pipelines
    wanted = tuple(dict.fromkeys(p.strip() for p in asked.split(",") if p.strip()))
    unknown = [p for p in wanted if p not in model.pipelines]
    if unknown or not wanted:
        raise ValueError(
            f"--pipelines {asked!r}: {model.path.name} ({model.kind} model) runs {', '.join(model.pipelines)}; "
            f"{'it cannot run ' + ', '.join(unknown) if unknown else 'name at least one'}"
        )
    return wanted


def needed_components(pipelines: tuple[str, ...], text: tuple[str, ...] = ("text_encoder",)) -> set[str]:
    """The text encoders (`text`), UNet and VAE decoder; the VAE encoder only serves pipelines that start from an image's latents."""
    names = {*text, "unet", "vae_decoder"}
    return names | ({"vae_encoder"} if {"img2img", "inpaint"} & set(pipelines) else set())
