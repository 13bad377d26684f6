"""Comparing two runs of one computation without demanding the same bits.

Two runs of the same network on the same inputs agree to float32 rounding, not bit for bit, once anything about them
differs: the CPU's vector width (AVX2 vs AVX-512 kernels), a buffer's alignment, a process's thread split, another
library version in a server's environment. Reassociation moves a float32 value by a few ulps (about 1e-7 of its size),
which through a few denoising steps stays under 1e-5 of an image's [0, 1] range; every real difference these tests
look for (another seed, adapter, prompt, step count or mask) moves pixels by more than 1e-2. So 2e-5 still catches
them all, and a uint8 image may differ by one level where a value sat on a rounding boundary.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FLOAT_ATOL = 2e-5  # of the [0, 1] range (or of the output's own scale, see assert_close)
UINT8_LEVELS = 1  # one level of 255: a float32 value within an ulp of a rounding boundary
UINT8_FLIPPED = 0.01  # at most this fraction of the values may sit on such a boundary


def assert_same_image(got: Any, want: Any, what: str = "") -> None:
    """Two images (PIL, uint8 or float arrays in [0, 1]) from runs of one computation: equal within rounding."""
    a, b = np.asarray(got), np.asarray(want)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} and {b.shape}"
    if a.dtype == np.uint8 and b.dtype == np.uint8:
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
        assert diff.max() <= UINT8_LEVELS and (diff > 0).mean() <= UINT8_FLIPPED, (
            f"{what}: max difference {diff.max()} levels, {(diff > 0).mean():.2%} of the values differ"
        )
        return
    worst = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
    assert worst <= FLOAT_ATOL, f"{what}: max difference {worst:.3g} > {FLOAT_ATOL}"


def assert_close(got: Any, want: Any, what: str = "") -> None:
    """Two float tensors (a network's outputs) from runs of one computation: within FLOAT_ATOL of their scale."""
    a, b = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} and {b.shape}"
    scale = max(1.0, float(np.abs(b).max()))
    worst = float(np.abs(a - b).max())
    assert worst <= FLOAT_ATOL * scale, f"{what}: max difference {worst:.3g} > {FLOAT_ATOL} x {scale:.3g}"
