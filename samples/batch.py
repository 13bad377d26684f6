"""A prompts file to a folder of PNGs, each carrying its settings; run it again after an interruption to finish the rest.

The prompts file is either text, one prompt per line (blank lines and lines starting with # are
skipped), or CSV (a .csv file) with a header row naming its columns: prompt (required), and any of
negative_prompt, seed, steps, guidance, sampler. An empty cell, or a column left out, takes the
command line's value; a row without a seed gets --seed plus its row number minus 1, so every row differs
and a rerun draws the same images.

Each image is named after its row number, prompt and a hash of all its settings, and written
atomically (a temporary file renamed into place), so a PNG in the folder is always a finished one:
a rerun skips the rows whose PNG exists, and redraws a row whose settings changed. A bad row is
reported in one line and the others still run; the exit status is then 1.

examples:
  python samples/batch.py                                   # a few prompts for the reference model
  python samples/batch.py prompts.txt --steps 30 --out out/samples/cats
  python samples/batch.py prompts.csv --bundle engines/sd-model-512x512-b1-fp16-onnxruntime

exit status: 0 every row written (or already there), 1 some rows failed, 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import _common  # the samples' plumbing: finds (or builds) the reference bundle, saves PNGs with their settings

import runtime
from runtime.sampling import SAMPLERS

# Used when no prompts file is given: the reference model's vocabulary.
EXAMPLE_PROMPTS = [
    "a large red circle in the center on a black background",
    "a small blue square in the top left on a white background",
    "a large yellow triangle in the bottom right on a gray background",
    "a small green circle in the top right on a black background",
]
COLUMNS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "sampler")


@dataclass(frozen=True)
class Row:
    """One image to make: where it came from (for messages) and its settings."""

    where: str  # "prompts.csv line 4"
    number: int  # 1, 2, ... in file order, for the file name
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    sampler: str | None

    def file_name(self, bundle: str) -> str:
        """Row number + prompt for people, a hash of every setting (and the bundle) so changed settings redraw."""
        settings = {k: v for k, v in asdict(self).items() if k not in ("where", "number")}
        digest = hashlib.sha256(json.dumps({**settings, "bundle": bundle}, sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.number:04d}-{_common.slug(self.prompt)}-{digest}.png"


@dataclass(frozen=True)
class Defaults:
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    sampler: str | None


def read_rows(path: Path | None, defaults: Defaults) -> list[Row | _common.SampleError]:
    """Every row of the prompts file: a Row, or the SampleError that says what is wrong with it.

    A problem with the whole file (missing, no prompt column) raises SampleError instead.
    """
    if path is None:
        lines = [(f"example {i}", {"prompt": p}) for i, p in enumerate(EXAMPLE_PROMPTS, 1)]
    else:
        try:
            text = path.read_text(encoding="utf-8-sig")  # -sig: a BOM from a spreadsheet export is not part of the header
        except FileNotFoundError:
            raise _common.SampleError(f"prompts file {path} does not exist") from None
        except (UnicodeDecodeError, IsADirectoryError) as e:
            raise _common.SampleError(f"prompts file {path} is not a UTF-8 text file ({e})") from None
        lines = csv_rows(path, text) if path.suffix.lower() == ".csv" else text_rows(path, text)
    rows: list[Row | _common.SampleError] = []
    for number, (where, cells) in enumerate(lines, 1):
        try:
            rows.append(make_row(where, number, cells, defaults))
        except _common.SampleError as e:
            rows.append(e)
    return rows


def text_rows(path: Path, text: str) -> list[tuple[str, dict[str, str]]]:
    return [
        (f"{path.name} line {i}", {"prompt": line.strip()})
        for i, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]


def csv_rows(path: Path, text: str) -> list[tuple[str, dict[str, str]]]:
    reader = csv.DictReader(text.splitlines())
    header = [(name or "").strip().lower() for name in reader.fieldnames or []]
    if "prompt" not in header:
        raise _common.SampleError(f"{path.name}: the first row must name the columns, one of them 'prompt' (columns: {', '.join(COLUMNS)})")
    unknown = [name for name in header if name not in COLUMNS]
    if unknown:
        raise _common.SampleError(f"{path.name}: unknown column {unknown[0]!r} (columns: {', '.join(COLUMNS)})")
    reader.fieldnames = header
    rows = []
    try:
        for cells in reader:
            where = f"{path.name} line {reader.line_num}"
            if None in cells:  # more cells than the header has names
                rows.append((where, {"error": f"{len(header) + len(cells[None])} cells for {len(header)} columns"}))
            elif any((v or "").strip() for v in cells.values()):  # skip blank rows
                rows.append((where, {k: (v or "").strip() for k, v in cells.items()}))
    except csv.Error as e:  # e.g. a cell over csv's field_size_limit (131,072 characters), an unclosed quote at the end
        limit = csv.field_size_limit()
        why = f"a cell is longer than {limit} characters (a prompt is cut to 77 tokens anyway)" if "field limit" in str(e) else str(e)
        line = reader.line_num + 1  # the row being read when it failed (line_num counts the rows finished)
        raise _common.SampleError(f"{path.name} line {line}: {why}; fix that row") from None
    return rows


def make_row(where: str, number: int, cells: dict[str, str], d: Defaults) -> Row:
    """Cells -> a checked Row; a bad cell raises SampleError naming the row and the cell."""

    def number_cell(name: str, kind: type[int] | type[float], default: float) -> float:
        value = cells.get(name, "")
        try:
            return default if value == "" else kind(value)
        except ValueError:
            raise _common.SampleError(f"{where}: {name} {value!r} is not {'a whole number' if kind is int else 'a number'}") from None

    if "error" in cells:
        raise _common.SampleError(f"{where}: {cells['error']}")
    if not cells.get("prompt"):
        raise _common.SampleError(f"{where}: the prompt is empty")
    seed, steps = int(number_cell("seed", int, d.seed + number - 1)), int(number_cell("steps", int, d.steps))
    if seed < 0:
        raise _common.SampleError(f"{where}: seed {seed} is negative")
    if steps < 1:
        raise _common.SampleError(f"{where}: steps {steps} must be at least 1")
    sampler = cells.get("sampler") or d.sampler
    if sampler is not None and sampler not in SAMPLERS:
        raise _common.SampleError(f"{where}: unknown sampler {sampler!r} (one of {', '.join(sorted(SAMPLERS))})")
    guidance = number_cell("guidance", float, d.guidance)
    return Row(where, number, cells["prompt"], cells.get("negative_prompt") or d.negative_prompt, seed, steps, guidance, sampler)


def main(argv: list[str] | None = None) -> int:
    p = _common.parser("python samples/batch.py", __doc__)
    p.add_argument("prompts", nargs="?", type=Path, help="prompts file: .txt (one per line) or .csv (default: a few example prompts)")
    p.add_argument("--negative-prompt", default="", help="default negative prompt (default: none)")
    p.add_argument("--seed", type=int, default=0, help="a row without a seed gets SEED + its row number - 1 (default %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="default denoising steps (default %(default)s)")
    p.add_argument("--guidance", type=float, default=7.5, help="default classifier-free guidance scale (default %(default)s)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), help="default sampler (default: the model's own)")
    _common.add_bundle_and_out(p, out=_common.OUT / "batch")
    args = p.parse_args(argv)

    try:
        _common.check_out_folder(args.out)  # before any work: a file there would only be found after the first image
        rows = read_rows(args.prompts, Defaults(args.negative_prompt, args.seed, args.steps, args.guidance, args.sampler))
        bundle = _common.bundle(args.bundle)
        pipe = runtime.Pipeline.load(bundle)
    except _common.USER_ERRORS as e:
        return _common.fail(e)

    if args.out.is_dir():  # a run killed mid-write (kill -9, power loss) leaves its temporary files: ours, by name
        for stale in args.out.glob(".[0-9][0-9][0-9][0-9]-*.png*.tmp"):
            stale.unlink(missing_ok=True)
    written = skipped = failed = 0
    try:
        for row in rows:
            if isinstance(row, _common.SampleError):  # a bad row is reported and the others still run
                print(f"error: {row}", file=sys.stderr)
                failed += 1
                continue
            path = args.out / row.file_name(bundle.name)
            if path.exists():  # written atomically, so it is a finished image: this is what makes a rerun resume
                print(f"skip  {_common.shown(path)} (already written)")
                skipped += 1
                continue
            try:
                options = {"steps": row.steps, "guidance_scale": row.guidance, "seed": row.seed, "scheduler": row.sampler}
                images = pipe.txt2img(row.prompt, row.negative_prompt, **options)
            except _common.USER_ERRORS as e:
                print(f"error: {row.where}: {e}", file=sys.stderr)
                failed += 1
                continue
            try:
                _common.save_png(images[0], path, _common.settings(pipe, row.prompt, negative_prompt=row.negative_prompt, **options))
            except OSError as e:  # a full disk stays full: stop, with what was done (every written image is whole)
                print(f"error: {e}; {written} new images were written, run the same command again to finish", file=sys.stderr)
                return 2
            print(f"wrote {_common.shown(path)}", flush=True)
            written += 1
    except KeyboardInterrupt:
        # Whatever was being written is a hidden temporary file, never a PNG that looks finished.
        print(f"\ninterrupted after {written} new images: run the same command again to finish the rest", file=sys.stderr)
        return 130

    print(f"{written} written, {skipped} already there, {failed} failed, in {_common.shown(args.out)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
