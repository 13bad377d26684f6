"""python -m benchmarks.chart: per-stage time of each system, one panel per comparison, as a PNG.

Reads the JSON files `python -m benchmarks.compare` writes; each system is one stacked bar of
its median stage times (text encoder, all UNet calls, host time over all steps, VAE decode,
and whatever else the end-to-end time holds).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SEGMENTS = (
    ("text_encoder", "text encoder", "#8da0cb"),
    ("unet_total", "UNet (all calls)", "#fc8d62"),
    ("host_total", "host, all steps (outside engines)", "#e41a1c"),
    ("vae_decode", "VAE decode", "#66c2a5"),
    ("other", "other (tokenizer, setup, postprocess)", "#bbbbbb"),
)


def stage_medians(summary: Mapping[str, Any]) -> dict[str, float]:
    """Median seconds per segment; 'other' is the end-to-end time the stages do not cover."""
    parts = {key: float(summary[key]["median"]) for key, _, _ in SEGMENTS if key != "other"}
    parts["other"] = max(0.0, float(summary["total"]["median"]) - sum(parts.values()))
    return parts


def panel_title(result: Mapping[str, Any]) -> str:
    image, settings = result["image"], result["settings"]
    return (
        f"{Path(result['model']).name}: {image['height']}x{image['width']}, {settings['steps']} steps {result['scheduler']}, "
        f"{result['precision']}, median of {settings['runs']}"
    )


def draw(results: list[Mapping[str, Any]], out: Path) -> Path:
    """One panel per comparison, one stacked bar per system; writes OUT (PNG)."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("the chart needs matplotlib: pip install -e '.[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = 1.2 + sum(1.0 + 0.5 * len(r["systems"]) for r in results)
    fig, axes = plt.subplots(len(results), 1, figsize=(10, height), squeeze=False)
    for ax, result in zip(axes[:, 0], results):
        names = list(result["systems"])[::-1]  # ours on top
        for row, name in enumerate(names):
            left = 0.0
            for key, label, colour in SEGMENTS:
                width = stage_medians(result["systems"][name]["summary"])[key]
                ax.barh(row, width, left=left, color=colour, label=label if row == 0 else None, height=0.6)
                left += width
            total = float(result["systems"][name]["summary"]["total"]["median"])  # medians of parts need not sum to it
            ax.text(left, row, f"  total {total:.3g} s", va="center", fontsize=9)
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("seconds per image (median)")
        ax.set_title(panel_title(result), fontsize=10)
        ax.set_xlim(0, ax.get_xlim()[1] * 1.12)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=9, frameon=False)
    machine = results[0].get("machine", {})
    fig.suptitle(
        f"Per-stage time, ours vs diffusers ({machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
        f"{machine.get('gpu') or 'no GPU'})",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.chart", description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path, help="compare JSON files (from python -m benchmarks.compare)")
    p.add_argument("-o", "--output", type=Path, default=Path("out/bench/stages.png"), help="PNG to write (default %(default)s)")
    args = p.parse_args(argv)
    try:
        results = [json.loads(path.read_text()) for path in args.results]
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: cannot read a compare result: {e}", file=sys.stderr)
        return 2
    missing = [str(path) for path, r in zip(args.results, results) if not r.get("systems")]
    if missing:
        print(f"error: no systems in {', '.join(missing)}: pass files written by `python -m benchmarks.compare`", file=sys.stderr)
        return 2
    try:
        print(f"wrote {draw(results, args.output)}")
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
