"""Test helper: run every component of two bundles on the same fixed inputs and measure how far apart they are."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.inputs import fixed_inputs
from runtime.bundle import load_manifest
from runtime.dispatch import load_engine


def outputs(bundle: Path, seed: int = 1) -> dict[str, np.ndarray]:
    """{component/output: array} for every component, on fixed_inputs(seed) (the build's own gate uses seed 0)."""
    manifest = load_manifest(bundle)
    result = {}
    for name, component in manifest.components.items():
        feed = fixed_inputs(component.inputs, name, manifest.vae.scaling_factor, seed=seed)
        for out, value in load_engine(component, bundle, device="cpu")(feed).items():
            result[f"{name}/{out}"] = np.asarray(value, dtype=np.float64)
    return result


def differences(a: Path, b: Path) -> dict[str, tuple[float, float]]:
    """Per component output: (max |a - b|, that relative to the output's largest |value|)."""
    oa, ob = outputs(a), outputs(b)
    assert oa.keys() == ob.keys()
    return {k: (float(np.abs(oa[k] - ob[k]).max()), float(np.abs(oa[k] - ob[k]).max() / np.abs(oa[k]).max())) for k in oa}
