"""Torch-free runtime for latent diffusion engine bundles.

`import runtime` pulls in nothing heavy: numpy, the tokenizer and a backend load
on first use, so an embedded app pays only for what it calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Pipeline", "BundleError", "Cancelled", "load_manifest"]

if TYPE_CHECKING:
    from .bundle import load_manifest
    from .errors import BundleError, Cancelled
    from .pipeline import Pipeline

_LAZY = {
    "Pipeline": ".pipeline",
    "BundleError": ".errors",
    "Cancelled": ".errors",
    "load_manifest": ".bundle",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'runtime' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
