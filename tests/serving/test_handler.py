"""serving.handler without Triton: batches of requests as the Python backend hands them over, the real runtime.

A request's image must equal `Pipeline.txt2img(prompt, negative_prompt, seed=seed, ...)[0]` whatever it was batched
with; requests with different options never share a pipeline call; a bad row fails its own request only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serving.handler import Handler, Limits


@pytest.fixture(scope="module")
def pipe(bundle_batch2: Path):
    from runtime import Pipeline

    with Pipeline.load(bundle_batch2) as p:
        yield p


@pytest.fixture(scope="module")
def handler(pipe) -> Handler:
    return Handler(pipe, Limits(max_prompt_chars=500, max_steps=20))


def ask(prompts: str | list[str], seeds: int | list[int], **extra: Any) -> dict[str, np.ndarray]:
    """A request as Triton hands it to the model: every input [n, 1], batch first."""
    prompts = [prompts] if isinstance(prompts, str) else prompts
    seeds = [seeds] * len(prompts) if isinstance(seeds, int) else seeds
    n = len(prompts)
    inputs = {"prompt": np.array([[p.encode()] for p in prompts], dtype=object), "seed": np.array([[s] for s in seeds], np.int64)}
    dtypes = {"steps": np.int32, "guidance_scale": np.float32, "negative_prompt": object, "scheduler": object}
    for name, value in extra.items():
        value = value.encode() if isinstance(value, str) else value
        inputs[name] = np.array([[value]] * n, dtype=dtypes[name])
    return inputs


def own(pipe, prompt: str, seed: int, steps: int, **options: Any) -> np.ndarray:
    return np.asarray(pipe.txt2img(prompt, options.pop("negative_prompt", ""), seed=seed, steps=steps, **options)[0])


def test_mixed_batch_gives_every_request_the_runtimes_own_image(pipe, handler: Handler) -> None:
    requests = [
        ask("a red circle", 11, steps=3),
        ask("a blue square", 12, steps=3, negative_prompt="red"),  # shares a call with the first: same options
        ask("a green triangle", 13, steps=4),  # other steps: its own call
        ask("a red circle", 14, steps=3, guidance_scale=2.0),  # other guidance: its own call
        ask("a yellow circle", 15, steps=3, scheduler="euler_a"),  # draws noise while sampling: run apart
        ask(["a purple square", "a white circle"], [16, 17], steps=3),  # a request of two rows
    ]
    answers = handler.handle(requests)
    expected = [
        [own(pipe, "a red circle", 11, 3)],
        [own(pipe, "a blue square", 12, 3, negative_prompt="red")],
        [own(pipe, "a green triangle", 13, 4)],
        [own(pipe, "a red circle", 14, 3, guidance_scale=2.0)],
        [own(pipe, "a yellow circle", 15, 3, scheduler="euler_a")],
        [own(pipe, "a purple square", 16, 3), own(pipe, "a white circle", 17, 3)],
    ]
    for i, (answer, images) in enumerate(zip(answers, expected)):
        assert answer.error is None, f"request {i}: {answer.error}"
        assert answer.images is not None and answer.images.dtype == np.uint8 and answer.images.shape == (len(images), 64, 64, 3)
        np.testing.assert_array_equal(answer.images, np.stack(images), err_msg=f"request {i}")
    assert answers[5].seeds is not None and answers[5].seeds.tolist() == [[16], [17]]


def test_plan_groups_equal_options_up_to_the_batch_and_runs_noisy_samplers_apart(handler: Handler) -> None:
    from serving.handler import parse_request

    items = [
        parse_request(ask(p, s, steps=st, scheduler=sc), handler.limits, handler.default_scheduler)[0]
        for p, s, st, sc in [("a", 1, 3, "ddim"), ("b", 2, 4, "ddim"), ("c", 3, 3, "ddim"), ("d", 4, 3, "ddim"),
                             ("e", 5, 3, "euler_a"), ("f", 6, 3, "euler_a")]
    ]  # fmt: skip
    assert handler.plan(items) == [[0, 2], [3], [1], [4], [5]]


def test_the_samplers_that_draw_noise_run_apart(handler: Handler) -> None:
    from runtime.sampling import SAMPLERS

    assert {name for name in SAMPLERS if handler.noisy[name]} == {"ddpm", "euler_a", "lcm", "tcd"}  # the table's flags


@pytest.mark.parametrize(
    ("request_inputs", "message"),
    [
        ({"seed": np.array([[1]], np.int64)}, "input 'prompt' is missing"),
        (ask("   ", 1), "input 'prompt' is empty"),
        (ask("x" * 501, 1), "input 'prompt' is 501 characters; this server takes at most 500"),
        (ask("a red circle", 1, negative_prompt="y" * 600), "input 'negative_prompt' is 600 characters"),
        (ask("a red circle", 1, steps=0), "input 'steps' is 0: it must be between 1 and 20"),
        (ask("a red circle", 1, steps=21), "input 'steps' is 21"),
        (ask("a red circle", -3), "input 'seed' is -3"),
        (ask("a red circle", 1, guidance_scale=float("nan")), "input 'guidance_scale' is nan"),
        (ask("a red circle", 1, scheduler="warp"), "input 'scheduler' is 'warp', which this server does not know; choose one of: ddim"),
        ({"prompt": np.array([[b"\xff\xfe"]], dtype=object)}, "input 'prompt' is not valid UTF-8"),
        ({"prompt": np.array([[b"a"]], dtype=object), "steps": np.array([[3], [4]], np.int32)}, "input 'steps' has shape [2, 1]"),
    ],
)
def test_a_bad_request_is_refused_by_name_and_its_batch_mates_are_served(pipe, handler: Handler, request_inputs, message: str) -> None:
    good = ask("a red circle", 21, steps=2)
    bad, served = handler.handle([request_inputs, good])
    assert bad.error is not None and message in bad.error, bad.error
    assert served.error is None and served.images is not None
    np.testing.assert_array_equal(served.images[0], own(pipe, "a red circle", 21, 2))


def test_a_failed_run_answers_its_own_requests_and_the_next_batch_is_served(pipe, handler: Handler, monkeypatch) -> None:
    calls = {"n": 0}
    real = handler.run

    def failing_once(items):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("the engine fell over")
        return real(items)

    monkeypatch.setattr(handler, "run", failing_once)
    first, second = handler.handle([ask("a red circle", 1, steps=2), ask("a blue circle", 2, steps=3)])
    assert first.error == "generation failed: RuntimeError: the engine fell over"
    assert second.error is None
    np.testing.assert_array_equal(second.images[0], own(pipe, "a blue circle", 2, 3))
