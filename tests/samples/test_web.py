"""samples/web/: the page in a real headless browser (Chromium, driven by Playwright) makes the runtime's image, pixel for pixel.

Needs Debian's chromium and the playwright package (scripts/setup.sh installs both; never `playwright install`):
where either is missing the browser tests skip, naming it. The HTTP checks need neither.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO
from tests.samples.common import SAMPLES, one_error_line, run_sample

WAIT_MS = 60_000  # every browser wait is bounded by this


@dataclass
class Server:
    url: str
    out: Path
    log: Path


@pytest.fixture(scope="module")
def server(sample_bundle, tmp_path_factory):
    """samples/web/server.py on a free loopback port (--port 0: the server picks one and prints its URL)."""
    tmp = tmp_path_factory.mktemp("web")
    out, log = tmp / "images", tmp / "server.log"
    cmd = [sys.executable, str(SAMPLES / "web" / "server.py"), "--bundle", str(sample_bundle), "--port", "0", "--out", str(out)]
    with open(tmp / "stdout", "w") as stdout, open(log, "w") as stderr:  # files: a pipe nobody reads would fill and block it
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=stdout, stderr=stderr, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (found := re.search(r"http://127\.0\.0\.1:\d+/", (tmp / "stdout").read_text())):
            assert proc.poll() is None, f"the server exited ({proc.returncode}): {log.read_text()}"
            assert time.monotonic() < deadline, f"the server printed no URL within 60 s: {log.read_text()}"
            time.sleep(0.1)
        yield Server(found.group(0), out, log)
    finally:
        proc.terminate()  # SIGTERM, as systemd stops it
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser():
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("the playwright package (pip install playwright)")
    chromium = shutil.which("chromium")
    if chromium is None:
        missing.append("Debian's chromium (apt-get install chromium)")
    if missing:
        pytest.skip("the web page test needs " + " and ".join(missing))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, timeout=WAIT_MS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))  # an exception in the page's JavaScript fails the test
    page.goto(server.url)
    page.wait_for_function("document.querySelectorAll('#sampler option').length > 1")  # /api/info has filled the form
    yield page
    page.close()
    assert errors == []


def generate(page) -> str:
    """Press Generate and wait, bounded, until the page says done or error; returns which."""
    page.click("#generate")
    page.wait_for_function("['done', 'error'].includes(document.body.dataset.state)")
    return page.evaluate("document.body.dataset.state")


SHOWN_PIXELS = """() => {
  const img = document.getElementById("result");
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(img, 0, 0);
  return {width: canvas.width, height: canvas.height, rgba: Array.from(context.getImageData(0, 0, canvas.width, canvas.height).data)};
}"""


def test_the_page_shows_the_runtimes_image_pixel_for_pixel(page, server, sample_pipe):
    # as users write them: A1111 emphasis reaches the runtime unchanged, and the PNG keeps the prompt as written
    prompt, negative = "a small (blue:1.2) triangle in the top right on a [white] background", "(red)"
    page.fill("#prompt", prompt)
    page.fill("#negative_prompt", negative)
    page.fill("#seed", "5")
    page.fill("#steps", "6")
    page.select_option("#sampler", "euler")
    guidance = float(page.input_value("#guidance"))

    assert generate(page) == "done", page.inner_text("#error")
    assert page.inner_text("#error") == ""
    assert page.inner_text("#step") == "step 6/6"
    assert page.is_visible("#result")

    shown = page.evaluate(SHOWN_PIXELS)  # what the browser decoded and drew
    assert (shown["width"], shown["height"]) == (64, 64)
    pixels = np.array(shown["rgba"], np.uint8).reshape(64, 64, 4)
    expected = np.asarray(sample_pipe.txt2img(prompt, negative, seed=5, steps=6, guidance_scale=guidance, scheduler="euler")[0])
    assert (pixels[..., 3] == 255).all()
    assert np.array_equal(pixels[..., :3], expected)  # PNG is lossless: exactly the runtime's uint8 pixels

    # the file behind it carries the settings, and the strip of recent images starts with it
    src = page.get_attribute("#result", "src")
    with Image.open(server.out / src.removeprefix("/images/")) as im:
        assert (im.text["prompt"], im.text["negative_prompt"], im.text["seed"], im.text["steps"], im.text["sampler"]) == (
            prompt, negative, "5", "6", "euler",
        )  # fmt: skip
    page.wait_for_function("document.querySelectorAll('#recent img').length > 0")
    assert page.get_attribute("#recent img", "src") == src
    assert "seed 5" in page.inner_text("#caption")


def test_the_page_shows_errors(page):
    page.fill("#prompt", "   ")  # passes the form's `required`; the server says what is wrong
    assert generate(page) == "error"
    assert page.inner_text("#error") == "Error: the prompt is empty: describe the image to generate"
    assert page.is_enabled("#generate")  # ready for the next try


def post(url: str, body: object, content_type: str = "application/json") -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_one_generation_at_a_time_and_only_json(server):
    api = server.url + "api/"
    status, started = post(api + "generate", {"prompt": "a large red circle", "steps": 80, "seed": 1})
    assert status == 202, started
    status, refused = post(api + "generate", {"prompt": "a small blue square", "steps": 2})
    assert (status, refused["error"]) == (409, "busy: one generation at a time; wait for the current one to finish")
    deadline = time.monotonic() + 60
    while (job := json.loads(get(api + "jobs/" + started["job"])[1]))["state"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert job["state"] == "done" and (job["step"], job["total"]) == (80, 80), job
    status, png = get(server.url + job["image"].lstrip("/"))
    assert status == 200 and Image.open(io.BytesIO(png)).size == (64, 64)

    assert post(api + "generate", {"prompt": "x"}, content_type="text/plain")[0] == 415  # another site's form cannot post
    assert post(api + "generate", {"prompt": "x", "steps": 0})[1]["error"] == "steps must be between 1 and 500, got 0"
    assert post(api + "generate", {"prompt": "x", "sampler": "nope"})[1]["error"] == "unknown sampler 'nope'"
    assert get(server.url + "images/..%2Fserver.log")[0] == 404
    assert get(server.url + "static/../server.py")[0] == 404
    assert "Traceback" not in server.log.read_text()


def test_bad_startup_is_one_line(sample_bundle, tmp_path):
    line = one_error_line(run_sample("web/server.py", "--bundle", tmp_path / "nope", "--port", 0, timeout=60))
    assert line.startswith("error: no engine bundle at") and "python -m export.build" in line
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_error_line(run_sample("web/server.py", "--bundle", sample_bundle, "--port", port, "--out", tmp_path, timeout=60))
    assert line == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
