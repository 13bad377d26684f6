"""samples/web/: the page in a real headless browser (Chromium, driven by Playwright) makes the runtime's image, pixel for pixel,
and, for a ControlNet bundle, takes a drawn region as the control image.

Needs Debian's chromium and the playwright package (scripts/setup.sh installs both; never `playwright install`):
where either is missing the browser tests skip, naming it. The HTTP checks need neither.
"""

from __future__ import annotations

import base64
import contextlib
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
from tests.helpers.close import assert_same_image
from tests.samples.common import SAMPLES, one_error_line, run_sample

WAIT_MS = 60_000  # every browser wait is bounded by this


@dataclass
class Server:
    url: str
    out: Path
    log: Path


@contextlib.contextmanager
def running_server(bundle: Path, tmp: Path):
    """samples/web/server.py on a free loopback port (--port 0: the server picks one and prints its URL)."""
    out, log = tmp / "images", tmp / "server.log"
    cmd = [sys.executable, str(SAMPLES / "web" / "server.py"), "--bundle", str(bundle), "--port", "0", "--out", str(out)]
    cmd += ["--socket-timeout", "2"]  # a stalled connection is answered after 2 s (test_a_stalled_body_is_answered_408)
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
def server(sample_bundle, tmp_path_factory):
    with running_server(sample_bundle, tmp_path_factory.mktemp("web")) as running:
        yield running


@pytest.fixture(scope="module")
def drawing_server(tiny_model, tmp_path_factory):
    """The server on a bundle with a ControlNet (the tiny random model and net: what a drawing does, not a good image)."""
    from export.build import build
    from tests.helpers.tiny_controlnet import make_tiny_controlnet

    tmp = tmp_path_factory.mktemp("web-controlnet")
    net = make_tiny_controlnet(tiny_model, tmp / "net")
    bundle = build(tiny_model, tmp / "bundle", precision="fp32", pipelines="txt2img", controlnets=(str(net),), log=lambda _: None)
    with running_server(bundle, tmp) as running:
        yield running, bundle


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


@contextlib.contextmanager
def open_page(browser, server):
    page = browser.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))  # an exception in the page's JavaScript fails the test
    page.goto(server.url)
    page.wait_for_function("document.querySelectorAll('#sampler option').length > 1")  # /api/info has filled the form
    yield page
    page.close()
    assert errors == []


@pytest.fixture
def page(browser, server):
    with open_page(browser, server) as opened:
        yield opened


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
    assert_same_image(pixels[..., :3], expected, "the page's PNG vs the runtime in this process")  # PNG is lossless

    # the file behind it carries the settings, and the strip of recent images starts with it
    src = page.get_attribute("#result", "src")
    with Image.open(server.out / src.removeprefix("/images/")) as im:
        assert (im.text["prompt"], im.text["negative_prompt"], im.text["seed"], im.text["steps"], im.text["sampler"]) == (
            prompt, negative, "5", "6", "euler",
        )  # fmt: skip
    page.wait_for_function("document.querySelectorAll('#recent img').length > 0")
    assert page.get_attribute("#recent img", "src") == src
    assert "seed 5" in page.inner_text("#caption")


CANVAS_PIXELS = """() => {
  const canvas = document.getElementById("canvas");
  return {width: canvas.width, height: canvas.height,
          rgba: Array.from(canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data)};
}"""


def shown(page, script: str) -> np.ndarray:
    """An image the page holds (SHOWN_PIXELS, CANVAS_PIXELS) as (h, w, 3) uint8, checked opaque."""
    got = page.evaluate(script)
    pixels = np.array(got["rgba"], np.uint8).reshape(got["height"], got["width"], 4)
    assert (pixels[..., 3] == 255).all()
    return pixels[..., :3]


def test_the_drawn_region_is_the_control_image(browser, drawing_server):
    """A stroke on the canvas (the bundle's size, white on black) reaches the runtime as control_image; cleared, none is sent."""
    import runtime

    server, bundle = drawing_server
    pipe = runtime.Pipeline.load(bundle)
    prompt, settings = "a small red circle in the top left on a black background", {"seed": 3, "steps": 4}
    with open_page(browser, server) as page:
        assert page.is_visible("#canvas")
        box = page.locator("#canvas").bounding_box()
        assert box["width"] > 64  # shown larger than its pixels: the pointer is scaled to them
        page.mouse.move(box["x"] + 0.25 * box["width"], box["y"] + 0.3 * box["height"])
        page.mouse.down()
        page.mouse.move(box["x"] + 0.7 * box["width"], box["y"] + 0.6 * box["height"], steps=8)
        page.mouse.up()
        drawing = shown(page, CANVAS_PIXELS)
        assert drawing.shape == (64, 64, 3) and drawing[19, 16].min() == 255 and drawing[38, 44].min() == 255
        assert drawing[0, 0].max() == drawing[63, 63].max() == 0 and (drawing.max(axis=2) == 255).mean() < 0.4

        page.fill("#prompt", prompt)
        page.fill("#seed", "3")
        page.fill("#steps", "4")
        guidance = float(page.input_value("#guidance"))
        assert generate(page) == "done", page.inner_text("#error")
        expected = pipe.txt2img(prompt, guidance_scale=guidance, control_image=Image.fromarray(drawing), **settings)[0]
        plain = pipe.txt2img(prompt, guidance_scale=guidance, **settings)[0]
        assert_same_image(shown(page, SHOWN_PIXELS), expected, "the page's image vs the runtime's with the drawing")
        assert np.abs(np.asarray(expected, np.int16) - np.asarray(plain, np.int16)).max() > 10, "the drawing changed nothing"
        with Image.open(server.out / page.get_attribute("#result", "src").removeprefix("/images/")) as im:
            assert im.text["control"] == "the region drawn on the page"

        page.click("#clear")
        assert shown(page, CANVAS_PIXELS).max() == 0
        assert generate(page) == "done", page.inner_text("#error")
        assert_same_image(shown(page, SHOWN_PIXELS), plain, "after Clear: no control image")


def png_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def test_a_drawing_that_does_not_fit_is_a_400_with_its_reason(drawing_server):
    server, _ = drawing_server
    api, black = server.url + "api/generate", Image.new("RGB", (64, 64))
    status, info = get(server.url + "api/info")
    assert status == 200 and json.loads(info)["controlnets"] == 1
    for drawing, message in [
        (png_url(Image.new("RGB", (96, 80))), "control_image is 96x80 (width x height) and this bundle makes 64x64 images"),
        (png_url(black).replace("image/png", "image/jpeg"), "control_image must be a PNG data URL (data:image/png;base64,...)"),
        (png_url(black)[:-8] + "!!", "control_image is not a readable PNG"),
        (["x"], "control_image must be a string, got list"),
    ]:
        status, answer = post(api, {"prompt": "x", "steps": 1, "control_image": drawing})
        assert status == 400 and answer["error"].startswith(message), answer
    assert "Traceback" not in server.log.read_text()


def test_without_a_controlnet_there_is_no_canvas_and_a_drawing_is_refused(page, server):
    assert page.is_hidden("#control")
    status, answer = post(server.url + "api/generate", {"prompt": "x", "control_image": png_url(Image.new("RGB", (64, 64)))})
    assert status == 400 and answer["error"].startswith("control_image: this bundle has no ControlNet; rebuild it with one: ")
    assert "`python -m export.build" in answer["error"] and "--controlnet CONTROLNET_FOLDER`" in answer["error"]


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
    assert job["preview"].startswith("data:image/png;base64,")  # the image forming, as the page shows it while running
    preview = Image.open(io.BytesIO(base64.b64decode(job["preview"].split(",", 1)[1])))
    assert preview.size == (16, 16)  # the reference bundle has no tiny decoder: the latent-to-RGB map, at the latents' size

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


def raw(server: Server, request: bytes) -> tuple[int, str]:
    """Send `request` as written (urllib would fix its headers) and read the status line and body of the answer."""
    host, port = server.url.split("//")[1].rstrip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:  # 60 s: a hang guard, the answer comes at once
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def request(body: bytes, headers: str = "", host: str = "127.0.0.1") -> bytes:
    return (
        f"POST /api/generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{headers}Connection: close\r\n\r\n"
    ).encode() + body


@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        ("", 411, "a Content-Length header is required"),
        ("Content-Length: -1\r\n", 400, "Content-Length must be a whole number of bytes"),
        ("Content-Length: abc\r\n", 400, "Content-Length must be a whole number of bytes"),
        ("Content-Length: 300000000\r\n", 413, "request too large (at most 1048576 bytes)"),
        ("Transfer-Encoding: chunked\r\n", 411, "send the body with a Content-Length, not chunked"),
    ],
    ids=["missing", "negative", "not-a-number", "too-large", "chunked"],
)
def test_content_length_is_checked_before_any_body_is_read(server, headers, status, message):
    assert raw(server, request(b'{"prompt": "x"}', headers)) == (status, json.dumps({"error": message}))
    assert "Traceback" not in server.log.read_text()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[" * 30_000 + b"]" * 30_000, "the JSON is nested 30000 levels deep; a request is one flat object"),
        (b'{"prompt": "x", "seed": Infinity}', "Infinity is not a number JSON allows"),
        (b'{"prompt": "x", "guidance": NaN}', "NaN is not a number JSON allows"),
        (b'{"prompt": "x", "seed": 1e400}', "1e400 is past float's range"),
        (b'{"prompt": "x", "sampler": ["ddim"]}', "sampler must be a string, got list"),
        (b'{"prompt": {"text": "x"}}', "prompt must be a string, got dict"),
        (b'{"prompt": "x", "steps": true}', "steps must be a number, got bool"),
        (b'{"prompt": "x", "seed": [1]}', "seed must be a number, got list"),
        (b'{"prompt": "x", "seed": 1e300}', "seed must be between 0 and 4.29497e+09, got 1e+300"),
        (b'{"prompt": "x"', "Expecting ',' delimiter: line 1 column 15 (char 14)"),
        (b"\xff\xfe", "the request is not UTF-8 text"),
    ],
    ids=["deep", "infinity", "nan", "overflow", "list-sampler", "dict-prompt", "bool-steps", "list-seed", "huge-seed", "cut", "bytes"],
)
def test_every_bad_body_is_a_400_with_its_reason(server, body, message):
    status, answer = raw(server, request(body, f"Content-Length: {len(body)}\r\n"))
    assert (status, json.loads(answer)["error"]) == (400, message)
    assert "Traceback" not in server.log.read_text()


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8000", "127.0.0.1.attacker.example", ""])
def test_another_hosts_name_is_refused_dns_rebinding(server, host):
    get_recent = f"GET /api/recent HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    for req in (get_recent, request(b"{}", "Content-Length: 2\r\n", host)):
        status, answer = raw(server, req)
        assert status == 403 and "is not an address this server answers to" in json.loads(answer)["error"]
    port = server.url.rstrip("/").rsplit(":", 1)[1]
    for ok in ("127.0.0.1", f"127.0.0.1:{port}", f"localhost:{port}"):
        assert raw(server, f"GET /api/recent HTTP/1.1\r\nHost: {ok}\r\nConnection: close\r\n\r\n".encode())[0] == 200


def test_the_host_rule(monkeypatch):
    sys.path.insert(0, str(SAMPLES / "web"))
    monkeypatch.syspath_prepend(str(SAMPLES))
    from server import allowed_host  # samples/web/server.py

    assert allowed_host("192.168.1.5:8000", "0.0.0.0", ()) and allowed_host("[::1]:80", "::", ())
    assert not allowed_host("evil.example", "0.0.0.0", ()) and allowed_host("studio.lan", "0.0.0.0", ("studio.lan",))
    assert allowed_host("10.0.0.2", "10.0.0.2", ()) and not allowed_host("10.0.0.3", "10.0.0.2", ())
    assert not allowed_host("localhost:x", "127.0.0.1", ()) and not allowed_host(None, "127.0.0.1", ())


def test_a_stalled_body_is_answered_408_and_frees_its_thread(server):
    """The client sends headers that promise a body and then nothing: after the socket timeout (2 s here) it gets 408."""
    status, answer = raw(server, request(b"{", "Content-Length: 100\r\n"))
    assert (status, json.loads(answer)["error"]) == (408, "the request body did not arrive within 2 s")


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_a_port_out_of_range_is_one_line(sample_bundle, port):
    line = one_error_line(run_sample("web/server.py", "--bundle", sample_bundle, "--port", port, timeout=60))
    assert "--port" in line and ("out of range 0..65535" in line or "is not a port number" in line)
