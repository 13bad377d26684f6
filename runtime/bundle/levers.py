"""The manifest's record of the optional speed levers a bundle was built with: a tiny VAE, the latent preview map,
DeepCache's feature-caching UNets. Export writes it, the runtime reads it through these classes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# the components each lever adds to a bundle
TINY_DECODER, TINY_ENCODER = "vae_decoder_tiny", "vae_encoder_tiny"
DEEP_UNET, SHALLOW_UNET = "unet_deepcache", "unet_shallow"
DEEP_FEATURE = "deep_feature"  # the cached tensor: an output of DEEP_UNET, an input of SHALLOW_UNET


@dataclass(frozen=True)
class TinyVaeInfo:
    """A tiny VAE (diffusers' AutoencoderTiny) exported beside the full one: where from, and its latent scale."""

    source: str
    scaling_factor: float  # the tiny VAE's own: its decoder reads latents / scaling_factor, as diffusers feeds it

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "scaling_factor": self.scaling_factor}


@dataclass(frozen=True)
class PreviewInfo:
    """A linear map from latents to RGB in [0, 1] (per latent pixel), fitted at export on the full decoder's images."""

    weights: tuple[tuple[float, ...], ...]  # (latent channels, 3)
    bias: tuple[float, ...]  # (3,)
    fit_error: float  # mean absolute pixel error of the fit on its own samples, [0, 1] scale

    def to_json(self) -> dict[str, Any]:
        return {"weights": [list(r) for r in self.weights], "bias": list(self.bias), "fit_error": self.fit_error}


@dataclass(frozen=True)
class DeepCacheInfo:
    """DeepCache (Ma et al. 2024, arXiv:2312.00858): the branch the shallow UNet was cut at (0: the skip from conv_in
    only; b: the first b layers of the first down block and the last b + 1 of the last up block)."""

    branch: int

    def to_json(self) -> dict[str, Any]:
        return {"branch": self.branch}


@dataclass(frozen=True)
class Levers:
    tiny_vae: TinyVaeInfo | None = None
    preview: PreviewInfo | None = None
    deepcache: DeepCacheInfo | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.tiny_vae is not None:
            out["tiny_vae"] = self.tiny_vae.to_json()
        if self.preview is not None:
            out["preview"] = self.preview.to_json()
        if self.deepcache is not None:
            out["deepcache"] = self.deepcache.to_json()
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any] | None) -> Levers:
        raw = raw or {}
        tiny, preview, cache = raw.get("tiny_vae"), raw.get("preview"), raw.get("deepcache")
        return cls(
            TinyVaeInfo(str(tiny["source"]), float(tiny["scaling_factor"])) if tiny else None,
            PreviewInfo(
                tuple(tuple(float(v) for v in row) for row in preview["weights"]),
                tuple(float(v) for v in preview["bias"]),
                float(preview.get("fit_error", 0.0)),
            ) if preview else None,
            DeepCacheInfo(int(cache["branch"])) if cache else None,
        )  # fmt: skip

    def rebuild_flags(self) -> dict[str, str]:
        """The export.build flags that rebuild these levers."""
        flags: dict[str, str] = {}
        if self.tiny_vae is not None:
            flags["--tiny-vae"] = self.tiny_vae.source
        if self.deepcache is not None:
            flags["--deepcache"] = str(self.deepcache.branch)
        return flags
