"""Model families: each one module that turns prompts into UNet conditioning (see families.base).

The manifest's `model.family` names the module; the denoise loop and the tasks never ask which.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ..bundle import Manifest
from ..errors import BundleError
from .base import Conditioning, Family, OpenEngine

__all__ = ["Conditioning", "Family", "FAMILIES", "open_family"]

# family name -> (module, class); imported on first use, so a bundle pays only for its own family
FAMILIES = {"sd": (".sd", "StableDiffusion"), "sdxl": (".sdxl", "StableDiffusionXL")}


def open_family(bundle: Path, manifest: Manifest, engine: OpenEngine) -> Family:
    """The bundle's family, its text encoders opened through `engine`."""
    family = manifest.model.family
    if family not in FAMILIES:
        raise BundleError(
            f"bundle {bundle} is of model family {family!r}, which this runtime does not know (known: {', '.join(FAMILIES)}); "
            "use the SDK version that built it, or rebuild the bundle with this one's `python -m export.build`"
        )
    module, name = FAMILIES[family]
    loader = getattr(importlib.import_module(module, __name__), name)
    opened: Family = loader.load(bundle, manifest, engine)
    return opened
