"""Turn a drawn mask into an image: white where the object goes, black elsewhere (a ControlNet bundle).

The mask is any image file (any size: it is resized to the bundle's; any colours: its gray level is
what counts, white the object). Without --mask the sample draws one first (draw-mask.png). The prompt
names what to put there: for the reference model a colour, a shape and a background.

examples:
  python samples/draw.py                                   # the reference ControlNet bundle, built on first use
  python samples/draw.py --mask my-drawing.png "a blue circle on a white background" --seed 2
  python samples/draw.py --mask m.png "a red square on a gray background" --bundle engines/my-controlnet-bundle
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import _common  # the samples' plumbing: finds (or builds) the bundle, saves PNGs with their settings

import runtime

PROMPT = "a yellow triangle on a gray background"
REFERENCE_CONTROLNET = _common.REPO / "models" / "shapes-ldm-controlnet"
DEFAULT_BUNDLE = _common.REPO / "engines" / "shapes-ldm-64x64-b1-fp16-onnxruntime-shapes-ldm-controlnet"


def example_mask() -> Any:
    """A hand-drawn-looking blob: what a user's brush might leave (64x64, white on black)."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).polygon([(12, 50), (30, 14), (52, 52)], fill=255)
    return mask


def bundle(given: Path | None) -> Path:
    """The bundle given, else the reference model with its ControlNet (built once, saying so in one line)."""
    if given is not None:
        return given
    if not DEFAULT_BUNDLE.exists():
        print(f"building {_common.shown(DEFAULT_BUNDLE)} (the reference model with its ControlNet; once)", file=sys.stderr, flush=True)
        from export.build import REFERENCE_MODEL, build

        nets = (str(REFERENCE_CONTROLNET),)
        build(REFERENCE_MODEL, DEFAULT_BUNDLE, precision="fp16", backend="onnxruntime", controlnets=nets, log=lambda _: None)
    return DEFAULT_BUNDLE


def main(argv: list[str] | None = None) -> int:
    p = _common.parser("python samples/draw.py", __doc__)
    p.add_argument("prompt", nargs="?", default=PROMPT, help="what to draw in the white part (default: %(default)r)")
    p.add_argument("--mask", type=Path, help="the drawing: white where the object goes (default: one drawn for you)")
    p.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (default %(default)s; 4 for an LCM student)")
    p.add_argument("--guidance", type=float, default=5.0, help="guidance scale (default %(default)s)")
    p.add_argument("--scale", type=float, default=1.0, help="how strongly the drawing steers (default %(default)s)")
    _common.add_bundle_and_out(p)
    args = p.parse_args(argv)

    try:
        from PIL import Image

        if args.mask is None:
            mask = example_mask()
            _common.save_png(mask, args.out / "draw-mask.png", {"prompt": "the mask"})
        else:
            with Image.open(args.mask) as opened:
                mask = opened.convert("L")  # gray level is what counts: white is the object
        pipe = runtime.Pipeline.load(bundle(args.bundle))
        # The control image is RGB; control_resize fits a drawing of any size to the bundle's static one.
        images = pipe.txt2img(
            args.prompt, seed=args.seed, steps=args.steps, guidance_scale=args.guidance,
            control_image=mask.convert("RGB"), controlnet_conditioning_scale=args.scale, control_resize=True,
        )  # fmt: skip
    except (*_common.USER_ERRORS, OSError) as e:
        return _common.fail(e)

    path = args.out / "draw.png"
    settings = _common.settings(pipe, args.prompt, seed=args.seed, steps=args.steps, guidance_scale=args.guidance)
    _common.save_png(images[0], path, {**settings, "mask": str(args.mask or "draw-mask.png"), "controlnet_scale": args.scale})
    print(f"wrote {_common.shown(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
