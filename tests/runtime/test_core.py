"""The core every task shares: the sampling options written once, progress counted honestly, tasks as peers."""

from __future__ import annotations

import inspect
import io

import numpy as np
import pytest

import runtime
from runtime.cli import progress_bar
from runtime.options import DEFAULTS
from runtime.pipeline import Pipeline

PROMPT = "a blue square"


@pytest.fixture(scope="module")
def pipe(bundle_fp32):
    return runtime.Pipeline.load(bundle_fp32)


def test_img2img_progress_counts_the_steps_that_run(pipe):
    """img2img at strength 0.5 of 10 steps runs 5: the callback sees 1..5 of 5, not 6..10 of 5."""
    seen: list[tuple[int, int]] = []
    image = np.full((pipe.height, pipe.width, 3), 128, np.uint8)
    pipe.img2img(PROMPT, image, strength=0.5, steps=10, seed=0, output_type="latent", callback=lambda s, n, t: seen.append((s, n)))
    assert seen == [(s, 5) for s in range(1, 6)]


def test_cancel_names_the_step_it_stopped_after(pipe):
    image = np.full((pipe.height, pipe.width, 3), 128, np.uint8)
    with pytest.raises(runtime.Cancelled, match="after step 2 of 7"):
        pipe.img2img(PROMPT, image, strength=0.7, steps=10, seed=0, callback=lambda s, n, t: s < 2)


@pytest.mark.parametrize("task", ["txt2img", "img2img", "inpaint", "upscale"])
def test_an_unknown_sampling_keyword_is_a_type_error_listing_the_options(pipe, task):
    args = {"txt2img": (PROMPT,), "img2img": (PROMPT, None), "inpaint": (PROMPT, None, None), "upscale": (PROMPT, None)}[task]
    with pytest.raises(TypeError, match=rf"{task}\(\) got an unexpected keyword argument 'stpes' \(sampling options: steps, "):
        getattr(pipe, task)(*args, stpes=3)


def test_tasks_are_peers_with_explicit_signatures():
    """Each task names its own arguments and takes the shared sampling options as typed keywords."""
    own = {
        "txt2img": ["prompt", "negative_prompt", "latents", "denoising_end", "output_type"],
        "img2img": ["prompt", "image", "negative_prompt", "strength", "noise", "encoder_noise", "resize", "denoising_start", "output_type"],
        "inpaint": ["prompt", "image", "mask_image", "negative_prompt", "strength", "latents", "encoder_noise", "composite", "resize",
                    "output_type"],
        "upscale": ["prompt", "image", "negative_prompt", "noise_level", "latents", "image_noise", "resize", "output_type"],
    }  # fmt: skip
    for task, names in own.items():
        params = inspect.signature(getattr(Pipeline, task)).parameters
        assert list(params)[1:-1] == names, task
        assert params["sampling"].kind is inspect.Parameter.VAR_KEYWORD
    assert list(DEFAULTS) == ["steps", "guidance_scale", "guidance_rescale", "seed", "scheduler", "eta", "callback"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_on_a_terminal_and_writes_lines_to_a_log():
    log, term = io.StringIO(), Terminal()
    for stream in (log, term):
        show = progress_bar(stream=stream)
        for step in range(1, 51):
            show(step, 50, 999.0 - step)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 10
    assert lines[0].startswith("step 5/50 ") and lines[-1].startswith("step 50/50 ")
    assert term.getvalue().count("\r") == 50 and term.getvalue().endswith("s\n") and term.getvalue().count("\n") == 1


def test_leaving_the_with_block_frees_the_sessions_and_a_later_call_says_so(bundle_fp32):
    """close() drops each ONNX Runtime session at once (a full-size pipeline's 9 GB used to wait for the garbage
    collector); a closed pipeline's next call is refused by name, not a crash inside ONNX Runtime."""
    from runtime.errors import BundleError

    with Pipeline.load(bundle_fp32) as closed:
        assert closed.txt2img(PROMPT, steps=1, seed=0, output_type="latent").shape[0] == 1
    assert [getattr(e, "session", "?") for e in closed.engines.values()] == [None] * len(closed.engines)
    with pytest.raises(BundleError, match="text_encoder: this ONNX Runtime engine was closed; load the bundle again"):
        closed.txt2img(PROMPT, steps=1, seed=0)
    closed.close()  # twice is fine
