"""What the samples share: the reference bundle (built on first use), one-line errors, PNGs that carry their settings.

Copying a sample into your own program? Replace `_common.bundle(args.bundle)` with your bundle's path and
`_common.save_png(...)` with `image.save(path)` (or keep the two functions: they are short). Everything
else in a sample is the runtime's own API.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    # A checkout used without `pip install -e .` still imports `runtime` (appended: an installed copy wins).
    sys.path.append(str(REPO))

import runtime  # noqa: E402  (after the path fix above)

# `python -m export.build` with no arguments builds exactly this: the reference model, fp16, ONNX Runtime.
DEFAULT_BUNDLE = REPO / "engines" / "shapes-ldm-64x64-b1-fp16-onnxruntime"
OUT = REPO / "out" / "samples"  # /out/ is gitignored
DEFAULT_PROMPT = "a large red circle in the center on a black background"  # the reference model's vocabulary
EXPORT_PACKAGES = ("torch", "diffusers", "transformers", "onnx")  # what building a bundle needs beyond the runtime

# What a user's mistake looks like when it comes out of the runtime: each message names the problem and
# the fix, so the samples print it as one line instead of a traceback. (FeedError is a ValueError.)
USER_ERRORS: tuple[type[BaseException], ...] = (runtime.BundleError, ValueError, FileNotFoundError, FloatingPointError)


class SampleError(ValueError):
    """Bad input found by a sample itself (a rectangle outside the image, a bad prompts file...)."""


class Parser(argparse.ArgumentParser):
    """argparse, except that a usage mistake is one `error: ...` line (exit 2), like every other error here."""

    def error(self, message: str) -> Any:  # argparse's own prints the whole usage block first
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parser(prog: str, doc: str | None) -> Parser:
    """A sample's argument parser: its docstring's first paragraph as the description, the rest as examples."""
    head, _, examples = (doc or "").partition("\n\n")
    return Parser(prog=prog, description=head, epilog=examples or None, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_bundle_and_out(p: argparse.ArgumentParser, out: Path = OUT) -> None:
    """--bundle (default: the reference bundle) and --out (default: `out`, under out/samples/)."""
    p.add_argument(
        "--bundle",
        type=Path,
        help=f"engine bundle folder (default: {shown(DEFAULT_BUNDLE)}, the reference model's, built on first use)",
    )
    p.add_argument("--out", type=Path, default=out, help=f"folder to write images into (default: {shown(out)})")


def fail(error: BaseException | str) -> int:
    """Report an error as one line on stderr; the exit status for main() to return."""
    print(f"error: {error}", file=sys.stderr)
    return 2


def shown(path: Path) -> str:
    """A path as the user would type it: relative to the current folder where it is inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def bundle(given: Path | None) -> Path:
    """The bundle to run: the one given (the runtime reports it if it is missing), else the reference model's."""
    if given is not None:
        return given
    if not DEFAULT_BUNDLE.exists():
        build_reference(DEFAULT_BUNDLE)
    return DEFAULT_BUNDLE


def build_reference(out: Path) -> None:
    """Build the reference model's bundle (a few seconds), saying so in one line; SampleError where this install
    has only the runtime (building needs torch and diffusers: the `export` extra)."""
    missing = [name for name in EXPORT_PACKAGES if importlib.util.find_spec(name) is None]
    command = "python -m export.build"
    if missing:
        raise SampleError(
            f"no bundle at {shown(out)}, and this install cannot build one (missing {', '.join(missing)}): "
            f'run `{command}` where the export extra is installed (pip install -e ".[export]"), or pass --bundle'
        )
    print(f"building the reference bundle {shown(out)} (`{command}`, a few seconds; once)", file=sys.stderr, flush=True)
    try:
        from export.build import REFERENCE_MODEL, build

        build(REFERENCE_MODEL, out, precision="fp16", backend="onnxruntime", log=lambda _: None)
    except ImportError as e:  # installed but broken (say, a torch that does not load)
        raise SampleError(f"cannot build {shown(out)} here ({e}); run `{command}` where the export extra works, or pass --bundle") from None


def settings(pipe: Any, prompt: str, **chosen: Any) -> dict[str, Any]:
    """The settings of one image, as they go into its PNG: what was asked plus what the bundle decided.

    chosen: negative_prompt, seed, steps, guidance_scale, scheduler (None: the model's own), and anything
    task-specific (strength, ...). The sampler the runtime picks by default is named, not left as "default".
    """
    from runtime.options import DEFAULTS
    from runtime.sampling import default_sampler

    for key in ("steps", "guidance_scale"):  # what the runtime used where the sample left it to the default
        chosen.setdefault(key, DEFAULTS[key])
    scheduler = chosen.pop("scheduler", None)
    sampler = scheduler or default_sampler(pipe.manifest.scheduler.class_name, pipe.manifest.scheduler.config)
    return {
        "prompt": prompt,
        "negative_prompt": chosen.pop("negative_prompt", ""),
        **chosen,
        "sampler": sampler,
        "size": f"{pipe.width}x{pipe.height}",
        "model": pipe.manifest.model.name,
        "bundle": Path(pipe.bundle).name,
    }


def parameters_text(s: Mapping[str, Any]) -> str:
    """The settings in AUTOMATIC1111's "parameters" format, which other Stable Diffusion tools read back."""
    lines = [str(s["prompt"])]
    if s.get("negative_prompt"):
        lines.append(f"Negative prompt: {s['negative_prompt']}")
    named = {
        "Steps": s.get("steps"), "Sampler": s.get("sampler"), "CFG scale": s.get("guidance_scale"), "Seed": s.get("seed"),
        "Size": s.get("size"), "Model": s.get("model"), "Denoising strength": s.get("strength"),
    }  # fmt: skip
    lines.append(", ".join(f"{k}: {v}" for k, v in named.items() if v is not None))
    return "\n".join(lines)


def save_png(image: Any, path: Path, settings: Mapping[str, Any]) -> None:
    """Write `image` as a PNG with its settings in text chunks, atomically.

    Text chunks: "parameters" (A1111's format) and one chunk per setting ("prompt", "seed", ...); PIL
    writes iTXt (UTF-8) for text Latin-1 cannot hold. Atomically: the PNG is written to a hidden temporary
    file in the same folder and renamed over `path`, so a PNG at `path` is always a whole one, whatever
    interrupts the program (the batch sample's resume relies on it).
    """
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters_text(settings))
    for key, value in settings.items():
        info.add_text(key, str(value))
    info.add_text("Software", "ldm-deploy runtime (samples/)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # one writer per file at a time in these samples
    try:
        with open(tmp, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the file
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe short form of a prompt."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].rstrip("-") or "image"
