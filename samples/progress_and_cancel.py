"""A progress bar from the step callback; Ctrl-C or a deadline cancels the generation, and the half-done image is not written.

The runtime calls `callback(step, total, t)` after every denoising step; returning False stops the
generation there with `runtime.Cancelled`. So cancelling is cooperative: the step under way (one UNet
call) finishes first, and nothing is decoded or written after it.

examples:
  python samples/progress_and_cancel.py                       # 50 steps with a progress bar; press Ctrl-C to cancel
  python samples/progress_and_cancel.py --deadline 0.5        # give up if not done half a second into sampling
  python samples/progress_and_cancel.py "a small green square" --steps 200 --seed 7
  python samples/progress_and_cancel.py --previews 10         # also write the image forming, every 10 steps

exit status: 0 written, 1 cancelled by the deadline, 130 cancelled by Ctrl-C, 2 bad input.
"""

from __future__ import annotations

import signal
import sys
import time

import _common  # the samples' plumbing: finds (or builds) the reference bundle, saves PNGs with their settings
import numpy as np
from PIL import Image

import runtime


class Canceller:
    """Decides, after each step, whether to go on: not if Ctrl-C was pressed or the deadline has passed."""

    def __init__(self, deadline: float | None):
        self.deadline, self.started, self.reason = deadline, time.monotonic(), ""

    def on_sigint(self, signum: int, frame: object) -> None:
        # Only note it: raising KeyboardInterrupt here could land anywhere, even inside the engine call.
        # A second Ctrl-C falls back to Python's default and interrupts at once.
        self.reason = "Ctrl-C"
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def keep_going(self) -> bool:
        if not self.reason and self.deadline is not None and time.monotonic() - self.started > self.deadline:
            self.reason = f"deadline of {self.deadline:g} s"
        return not self.reason


class Bar:
    """One line on stderr, redrawn in place: [######......] 12/50  0.8 s, 2.6 s left."""

    def __init__(self, width: int = 30):
        self.width, self.started, self.drawn = width, time.monotonic(), False
        self.tty = sys.stderr.isatty()  # into a log file: one line per tenth instead of redrawing in place

    def draw(self, step: int, total: int) -> None:
        if not self.tty and step < total and step * 10 // total == (step - 1) * 10 // total:
            return
        elapsed = time.monotonic() - self.started
        left = elapsed / step * (total - step)  # steps take about equally long
        done = self.width * step // total
        line = f"[{'#' * done}{'.' * (self.width - done)}] {step}/{total} {elapsed:5.1f} s, {left:4.1f} s left"
        sys.stderr.write(f"\r{line}" if self.tty else f"{line}\n")
        sys.stderr.flush()
        self.drawn = self.tty

    def end(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")
            self.drawn = False


def main(argv: list[str] | None = None) -> int:
    p = _common.parser("python samples/progress_and_cancel.py", __doc__)
    p.add_argument("prompt", nargs="?", default=_common.DEFAULT_PROMPT, help="what to draw (default: %(default)r)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    p.add_argument("--deadline", type=float, metavar="SECONDS", help="cancel if sampling is not done after SECONDS (loading not counted)")
    p.add_argument(
        "--previews",
        type=int,
        metavar="K",
        help="write the current estimate of the image every K steps as progress_preview_STEP.png (the tiny VAE decoder's "
        "where the bundle has one, else the bundle's latent-to-RGB map at the latents' resolution, enlarged)",
    )
    _common.add_bundle_and_out(p)
    args = p.parse_args(argv)
    if args.deadline is not None and args.deadline < 0:
        return _common.fail(f"--deadline must be 0 or more seconds, got {args.deadline:g}")
    if args.previews is not None and args.previews < 1:
        return _common.fail(f"--previews must be 1 or more steps, got {args.previews}")

    try:
        pipe = runtime.Pipeline.load(_common.bundle(args.bundle))
    except _common.USER_ERRORS as e:
        return _common.fail(e)
    except KeyboardInterrupt:  # Ctrl-C while loading: nothing to cancel cooperatively yet
        print("interrupted while loading the bundle: nothing written", file=sys.stderr)
        return 130

    canceller, bar = Canceller(args.deadline), Bar()
    reached = (0, args.steps)

    def on_step(step: int, total: int, t: float) -> bool:
        nonlocal reached
        reached = (step, total)
        bar.draw(step, total)
        return canceller.keep_going()  # False: the runtime raises runtime.Cancelled after this step

    def on_preview(step: int, total: int, images: np.ndarray) -> None:
        image = Image.fromarray((images[0] * 255).round().astype(np.uint8)).resize((pipe.width, pipe.height), Image.NEAREST)
        image.save(args.out / f"progress_preview_{step:04d}.png")

    previews = {"preview": on_preview, "preview_every": args.previews} if args.previews else {}
    args.out.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGINT, canceller.on_sigint)  # only while generating; restored below
    try:
        images = pipe.txt2img(args.prompt, steps=args.steps, seed=args.seed, callback=on_step, **previews)
    except runtime.Cancelled:
        bar.end()
        print(f"cancelled by {canceller.reason} after step {reached[0]} of {reached[1]}: nothing written", file=sys.stderr)
        return 130 if canceller.reason == "Ctrl-C" else 1
    except _common.USER_ERRORS as e:
        bar.end()
        return _common.fail(e)
    finally:
        signal.signal(signal.SIGINT, previous)
    bar.end()

    path = args.out / "progress_and_cancel.png"
    _common.save_png(images[0], path, _common.settings(pipe, args.prompt, seed=args.seed, steps=args.steps))
    print(f"wrote {_common.shown(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
