"""The reference model's int8 calibration prompts, shipped in its folder as data: MODEL/calibration/.

`python -m export.build --precision int8` calibrates a model on MODEL/calibration/prompts.txt where the folder has one
(and gates it on MODEL/calibration/held_out.txt), so the exporter needs nothing of reference/: this module writes
both files from the trainer's own caption distribution and lists them in the folder's SHA256SUMS.

    python -m reference.calibration models/shapes-ldm
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np

from reference.dataset import random_caption, sample_attributes

FOLDER = "calibration"
PROMPTS = 256  # enough for any sensible --calibration-size; a larger one cycles through them
HELD_OUT = 4  # the int8 gate's generations (export.int8.unet.GATE_GENERATIONS)
CALIBRATION_SEED = 0
HELD_OUT_SEED = 1_000_003  # drawn apart from calibration, as the gate's seeds (export.int8.calibration.HELD_OUT_SEED)


def captions(n: int, seed: int) -> list[str]:
    """The reference model's training captions (canonical and reworded), as its trainer draws them."""
    rng = np.random.default_rng(seed)
    return [random_caption(sample_attributes(rng), rng) for _ in range(n)]


def write(model: Path) -> list[Path]:
    """MODEL/calibration/{prompts,held_out}.txt, and their lines in MODEL/SHA256SUMS where the folder has one."""
    folder = model / FOLDER
    folder.mkdir(exist_ok=True)
    files = {
        folder / "prompts.txt": ("int8 calibration prompts: the reference model's training captions", captions(PROMPTS, CALIBRATION_SEED)),
        folder / "held_out.txt": ("int8 gate prompts, drawn apart from calibration", captions(HELD_OUT, HELD_OUT_SEED)),
    }
    for path, (what, lines) in files.items():
        path.write_text(f"# {what} (written by python -m reference.calibration)\n" + "".join(f"{line}\n" for line in lines))
    sums = model / "SHA256SUMS"
    if sums.is_file():
        names = {path.relative_to(model).as_posix() for path in files}
        kept = [line for line in sums.read_text().splitlines() if line.split(maxsplit=1)[-1].lstrip("*") not in names]
        added = [f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.relative_to(model).as_posix()}" for path in files]
        sums.write_text("".join(f"{line}\n" for line in sorted([*kept, *added], key=lambda s: s.split(maxsplit=1)[-1])))
    return list(files)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reference.calibration", description=__doc__.split("\n")[0])
    p.add_argument("model", type=Path, nargs="?", default=Path("models/shapes-ldm"), help="model folder (default %(default)s)")
    for path in write(p.parse_args(argv).model):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
