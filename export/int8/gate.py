"""The int8 quality gate: judged on trajectories and images, not on one fixed input.

A relative max error on fixed inputs (the fp32/fp16 gate, export.gates) rejects every int8 UNet,
including ones whose images are identical to the eye: one outlier activation decides it. This gate
measures what a user sees, on held-out generations (prompts and seeds apart from calibration):
- the UNet's relative L2 error on the fp32 run's own trajectory inputs, per noise-level bucket
  (timesteps split in four equal ranges of the training schedule), the worst bucket deciding;
- the same-seed pixel mean absolute difference of the final images, int8 vs fp32 (range [0, 1]).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..verify import VerificationError

# Worst-bucket UNet relative L2, and same-seed pixel MAE. Both leave room over what a sound build measures
# (reference model: about 0.03 and 0.002) and well under a broken calibration (0.3+ and 0.05+).
MAX_UNET_REL_L2 = 0.1
MAX_PIXEL_MAE = 0.01
BUCKETS = 4


class Int8GateError(VerificationError):
    """The int8 UNet is over the quality gate; the message carries its figures."""


def bucket_of(t: float, train_steps: int) -> int:
    return min(int(t * BUCKETS / train_steps), BUCKETS - 1)


def bucket_name(b: int, train_steps: int) -> str:
    lo, hi = b * train_steps // BUCKETS, (b + 1) * train_steps // BUCKETS
    return f"t{lo}-{hi}"


def unet_figures(got: Sequence[np.ndarray], ref: Sequence[np.ndarray], timesteps: Sequence[float], train_steps: int) -> dict[str, Any]:
    """Relative L2 of int8 vs fp32 UNet outputs, per noise-level bucket and overall."""
    err = np.zeros(BUCKETS)
    norm = np.zeros(BUCKETS)
    count = np.zeros(BUCKETS, dtype=int)
    for g, r, t in zip(got, ref, timesteps):
        b = bucket_of(t, train_steps)
        r64 = r.astype(np.float64)
        err[b] += float(np.sum((g.astype(np.float64) - r64) ** 2))
        norm[b] += float(np.sum(r64**2))
        count[b] += 1
    per = {
        bucket_name(b, train_steps): {"rel_l2": float(np.sqrt(err[b] / max(norm[b], 1e-30))), "calls": int(count[b])}
        for b in range(BUCKETS)
        if count[b]
    }
    overall = float(np.sqrt(err.sum() / max(norm.sum(), 1e-30)))
    worst = max((v["rel_l2"] for v in per.values()), default=float("inf"))
    if not all(np.isfinite(g).all() for g in got):
        worst = overall = float("inf")
    return {"rel_l2": overall, "worst_bucket_rel_l2": worst, "buckets": per}


def gate(unet: dict[str, Any], images_int8: np.ndarray, images_fp32: np.ndarray, generations: int) -> dict[str, Any]:
    """The gate's record: its figures, limits and verdict (the manifest's verification entry)."""
    diff = np.abs(images_int8.astype(np.float64) - images_fp32)
    mae = float(diff.mean()) if np.isfinite(diff).all() else float("inf")
    passed = unet["worst_bucket_rel_l2"] <= MAX_UNET_REL_L2 and mae <= MAX_PIXEL_MAE
    return {
        "gate": "int8 trajectory + image",
        "unet": unet,
        "pixel_mae": mae,
        "pixel_max_abs": float(diff.max()) if np.isfinite(diff).all() else float("inf"),
        "generations": generations,
        "limits": {"worst_bucket_rel_l2": MAX_UNET_REL_L2, "pixel_mae": MAX_PIXEL_MAE},
        "passed": bool(passed),
    }


def summary(figures: dict[str, Any]) -> str:
    """One line of figures: worst bucket, per bucket, pixel MAE, against the limits."""
    buckets = ", ".join(f"{k} {v['rel_l2']:.3f}" for k, v in figures["unet"]["buckets"].items())
    limits = figures["limits"]
    return (
        f"UNet relative L2 worst bucket {figures['unet']['worst_bucket_rel_l2']:.3f} (limit {limits['worst_bucket_rel_l2']:g}; "
        f"{buckets}), same-seed pixel MAE vs fp32 {figures['pixel_mae']:.4f} (limit {limits['pixel_mae']:g}) "
        f"over {figures['generations']} generations"
    )
