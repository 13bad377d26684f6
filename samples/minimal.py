"""Load a bundle, generate an image, save it: the ten lines everyone starts from.

examples:
  python samples/minimal.py                      # the reference model's bundle, built on first use
  python samples/minimal.py "a small blue square in the top left on a white background" --seed 3
  python samples/minimal.py "a photo of a cat" --bundle engines/sd-model-512x512-b1-fp16-onnxruntime --steps 30
"""

from __future__ import annotations

import sys

import _common  # the samples' plumbing: finds (or builds) the reference bundle, saves PNGs with their settings

import runtime


def main(argv: list[str] | None = None) -> int:
    p = _common.parser("python samples/minimal.py", __doc__)
    p.add_argument("prompt", nargs="?", default=_common.DEFAULT_PROMPT, help="what to draw (default: %(default)r)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same image on every machine (default %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default %(default)s)")
    _common.add_bundle_and_out(p)
    args = p.parse_args(argv)

    try:
        # Loading opens every engine once; keep `pipe` and call it for every image you make.
        pipe = runtime.Pipeline.load(_common.bundle(args.bundle))
        # A list of PIL images: one per slot of the bundle's static batch (1 for the reference bundle).
        images = pipe.txt2img(args.prompt, steps=args.steps, seed=args.seed)
    except _common.USER_ERRORS as e:  # the runtime's messages name the problem and its fix: one line is enough
        return _common.fail(e)

    path = args.out / "minimal.png"
    _common.save_png(images[0], path, _common.settings(pipe, args.prompt, seed=args.seed, steps=args.steps))
    print(f"wrote {_common.shown(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
