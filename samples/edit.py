"""Edit an image: img2img redraws all of it, inpainting repaints a rectangle (--rect) and keeps the rest exactly.

Without --image, the sample first draws an input with txt2img (edit-input.png), so it runs with no
arguments. The rectangle is in the input image's pixels, x0,y0 inclusive and x1,y1 exclusive (so
0,0,64,64 is the whole of a 64x64 image); it becomes a mask image (edit-mask.png: white is repainted).
The engines have static shapes: an image of another size is refused, or resized with --resize.

examples:
  python samples/edit.py                                              # draw an input, then both edits
  python samples/edit.py "a large blue circle in the center on a black background" --image in.png --only img2img --strength 0.6
  python samples/edit.py "a small green square in the center on a black background" --image in.png --rect 16,16,48,48 --only inpaint
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _common  # the samples' plumbing: finds (or builds) the reference bundle, saves PNGs with their settings
from PIL import Image, ImageDraw

import runtime
from runtime import image_files

INPUT_PROMPT = "a large red circle in the center on a black background"  # for the input drawn without --image
EDIT_PROMPT = "a large blue square in the center on a black background"
Rect = tuple[int, int, int, int]


def rectangle(text: str) -> Rect:
    """--rect's value: four whole numbers, x0,y0,x1,y1 (checked against the image once its size is known)."""
    try:
        x0, y0, x1, y1 = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected x0,y0,x1,y1 in pixels (four whole numbers), got {text!r}") from None
    return x0, y0, x1, y1


def checked_rect(rect: Rect | None, size: tuple[int, int]) -> Rect:
    """The rectangle to repaint, inside an image of `size` (width, height): the middle half by default."""
    width, height = size
    x0, y0, x1, y1 = rect or (width // 4, height // 4, width - width // 4, height - height // 4)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise _common.SampleError(
            f"--rect {x0},{y0},{x1},{y1} is not inside the {width}x{height} image: "
            f"it needs 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}"
        )
    return x0, y0, x1, y1


def rectangle_mask(rect: Rect, size: tuple[int, int]) -> Image.Image:
    """A mask image of `size`: black (keep) with the rectangle white (repaint), as the runtime reads masks."""
    mask = Image.new("L", size, 0)
    x0, y0, x1, y1 = rect
    ImageDraw.Draw(mask).rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)  # PIL's rectangle includes its last pixel
    return mask


def open_image(path: Path) -> Image.Image:
    try:
        image: Image.Image = image_files.open_image(path, "--image").convert("RGB")  # alpha, palette, grayscale: the VAE takes RGB
    except (ValueError, FileNotFoundError) as e:
        raise _common.SampleError(str(e)) from None
    return image


def main(argv: list[str] | None = None) -> int:
    p = _common.parser("python samples/edit.py", __doc__)
    p.add_argument("prompt", nargs="?", default=EDIT_PROMPT, help="what the edited image should show (default: %(default)r)")
    p.add_argument("--image", type=Path, help=f"the image to edit (default: draw one from {INPUT_PROMPT!r})")
    p.add_argument("--rect", type=rectangle, metavar="x0,y0,x1,y1", help="inpainting: the rectangle to repaint (default: the middle half)")
    p.add_argument("--strength", type=float, default=0.75, help="img2img: how far from the image to go, (0, 1] (default %(default)s)")
    p.add_argument("--only", choices=("img2img", "inpaint"), help="run one of the two edits (default: both)")
    p.add_argument("--resize", action="store_true", help="resize the image (and its mask) to the bundle's size instead of refusing it")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default %(default)s; img2img runs steps * strength)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    _common.add_bundle_and_out(p)
    args = p.parse_args(argv)

    sampling = {"steps": args.steps, "seed": args.seed}
    written = []
    try:
        # The user's own input is checked before the engines load: a typo should not cost a model load.
        image = open_image(args.image) if args.image else None
        rect = checked_rect(args.rect, image.size) if image else None
        pipe = runtime.Pipeline.load(_common.bundle(args.bundle))
        if image is None:
            rect = checked_rect(args.rect, (pipe.width, pipe.height))  # before spending time on drawing the input
            image = pipe.txt2img(INPUT_PROMPT, **sampling)[0]
            written.append(args.out / "edit-input.png")
            _common.save_png(image, written[-1], _common.settings(pipe, INPUT_PROMPT, **sampling))

        if args.only != "inpaint":
            # SDEdit: the image's latents noised to the level of `strength`, then the last int(steps * strength) steps.
            out = pipe.img2img(args.prompt, image, strength=args.strength, resize=args.resize, **sampling)[0]
            written.append(args.out / "edit-img2img.png")
            _common.save_png(out, written[-1], _common.settings(pipe, args.prompt, task="img2img", strength=args.strength, **sampling))

        if args.only != "img2img" and rect is not None:
            # White in the mask is repainted; outside it the result keeps the input's own pixels.
            mask = rectangle_mask(rect, image.size)
            out = pipe.inpaint(args.prompt, image, mask, resize=args.resize, **sampling)[0]
            written.append(args.out / "edit-inpaint.png")
            rect_text = ",".join(map(str, rect))
            _common.save_png(out, written[-1], _common.settings(pipe, args.prompt, task="inpaint", rect=rect_text, **sampling))
            mask.save(args.out / "edit-mask.png")
            written.append(args.out / "edit-mask.png")
    except _common.USER_ERRORS as e:
        return _common.fail(e)

    for path in written:
        print(f"wrote {_common.shown(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
