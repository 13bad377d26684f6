"""A small local web page to try a bundle: prompt, negative prompt, seed, steps, guidance and sampler in, the image out.

Python's standard library only (http.server): the page is static/index.html + app.js, no build step.
The page posts a generation to /api/generate, then polls /api/jobs/ID for the step the runtime's
progress callback last reported and the image forming (the runtime's preview of each step), and shows the PNG
when it is written. One generation runs at a
time (a second one asked meanwhile is refused with "busy"); the bundle is loaded once at start.
A bundle built with a ControlNet (export.build --controlnet) gets a canvas on the page: what is drawn
there (white on black, the bundle's size) is sent as the control image of its first net.
Images are written, with their settings in PNG text chunks, to --out; the strip under the image
shows the latest of them.

Listens on 127.0.0.1 only unless --host says otherwise: the page has no login, so anyone who can
reach the port can use the machine's accelerator.

examples:
  python samples/web/server.py                             # then open http://127.0.0.1:8000/
  python samples/web/server.py --port 0                    # any free port (printed)
  python samples/web/server.py --bundle engines/sd-model-512x512-b1-fp16-onnxruntime --host 0.0.0.0
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import json
import re
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # samples/, for _common
import _common  # noqa: E402  (the samples' plumbing: the reference bundle, one-line errors, PNGs with settings)
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import runtime  # noqa: E402
from runtime import control  # noqa: E402
from runtime.bounds import port_argument  # noqa: E402
from runtime.bundle import strict_json  # noqa: E402
from runtime.sampling import SAMPLERS, default_sampler  # noqa: E402

STATIC = Path(__file__).resolve().parent / "static"
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
IMAGE_NAME = re.compile(r"[A-Za-z0-9][\w.-]*\.png")  # what /images/ serves: our own file names, never a path
# a body carries a drawing: a PNG of white strokes on black, some kB even at SDXL's 1024x1024
MAX_STEPS, MAX_GUIDANCE, MAX_PROMPT, MAX_BODY = 500, 50.0, 2000, 1024 * 1024
PNG_URL = "data:image/png;base64,"  # how the page's canvas sends its drawing (toDataURL)
MAX_DEPTH = 4  # the request is one flat object: anything nested deeper is refused before it is parsed
SOCKET_TIMEOUT = 30.0  # seconds a connection may stall (a slow client's thread is freed, not kept forever)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
KEPT_JOBS, RECENT = 100, 12
SHOWN_SETTINGS = ("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "sampler")  # what the strip reads back


class Busy(Exception):
    """A generation is already running."""


@dataclass
class Job:
    """One generation, as the page polls it: running -> done (image) or error (message)."""

    id: str
    seed: int
    state: str = "running"
    step: int = 0
    total: int = 0
    image: str | None = None
    error: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    preview: str | None = None  # the image forming: a PNG data URL of the runtime's latest preview


class Studio:
    """The loaded bundle, the lock that lets one generation run at a time, and the jobs the page polls."""

    def __init__(self, pipe: runtime.Pipeline, out: Path):
        self.pipe, self.out = pipe, out
        self.lock = threading.Lock()  # one generation at a time: they would only share the same cores (or GPU)
        self.jobs: dict[str, Job] = {}
        self.default_sampler = default_sampler(pipe.manifest.scheduler.class_name, pipe.manifest.scheduler.config)
        self.controlnets = len(control.controlnets(pipe.manifest))  # 0: the page shows no canvas

    def info(self) -> dict[str, Any]:
        m = self.pipe.manifest
        return {
            "bundle": Path(self.pipe.bundle).name, "model": m.model.name, "width": self.pipe.width, "height": self.pipe.height,
            "samplers": sorted(SAMPLERS), "default_sampler": self.default_sampler,
            "defaults": {"steps": 20, "guidance": 7.5}, "limits": {"steps": MAX_STEPS, "guidance": MAX_GUIDANCE},
            "controlnets": self.controlnets,
        }  # fmt: skip

    def control_image(self, data: str) -> Any:
        """The page's drawing as the control image of the bundle's first net (any others left out); refused, with the
        runtime's rebuild line, by a bundle without a ControlNet."""
        if not self.controlnets:
            raise ValueError(str(control.without_controlnet(["control_image"], self.pipe.rebuild())))
        image = drawing(data, (self.pipe.width, self.pipe.height))
        return image if self.controlnets == 1 else [image] + [None] * (self.controlnets - 1)

    def start(self, request: Any) -> Job:
        """Check the request, take the lock, start the generation in a thread; ValueError / Busy otherwise."""
        options = checked(request)
        if "control_image" in options:
            options["control_image"] = self.control_image(options["control_image"])
        if not self.lock.acquire(blocking=False):
            raise Busy("busy: one generation at a time; wait for the current one to finish")
        job = Job(id=secrets.token_hex(8), seed=options["seed"], total=options["steps"])
        self.jobs[job.id] = job
        for old in list(self.jobs)[:-KEPT_JOBS]:  # dicts keep insertion order: drop the oldest
            del self.jobs[old]
        threading.Thread(target=self.run, args=(job, options), daemon=True).start()
        return job

    def run(self, job: Job, options: dict[str, Any]) -> None:
        """The generation thread: the step callback updates the job, which the page reads."""
        try:

            def on_step(step: int, total: int, t: float) -> None:
                job.step, job.total = step, total

            def on_preview(step: int, total: int, images: np.ndarray) -> None:
                job.preview = png_data_url(images[0])

            prompt, negative = options.pop("prompt"), options.pop("negative_prompt")
            drawn = {"control_image": options.pop("control_image")} if "control_image" in options else {}
            image = self.pipe.txt2img(prompt, negative, **options, **drawn, callback=on_step, preview=on_preview)[0]
            settings = _common.settings(self.pipe, prompt, negative_prompt=negative, **options)
            if drawn:
                settings["control"] = "the region drawn on the page"
            name = f"{time.strftime('%Y%m%d-%H%M%S')}-{job.id[:6]}-seed{job.seed}.png"
            _common.save_png(image, self.out / name, settings)
            job.settings, job.image, job.state = settings, f"/images/{name}", "done"
        except _common.USER_ERRORS as e:  # the runtime's messages say what to change: show them on the page
            job.error, job.state = str(e), "error"
        except Exception as e:  # a server keeps serving: the page shows it, the log keeps the traceback
            traceback.print_exc()
            job.error, job.state = f"{type(e).__name__}: {e}", "error"
        finally:
            self.lock.release()

    def recent(self) -> list[dict[str, Any]]:
        """The newest images in the output folder, with the settings read back from their PNG text chunks."""
        files = sorted(self.out.glob("*.png"), key=lambda p: p.stat().st_mtime, reverse=True)[:RECENT]
        found = []
        for path in files:
            try:
                with Image.open(path) as im:
                    text = dict(getattr(im, "text", {}))
            except OSError:
                continue
            found.append({"url": f"/images/{path.name}", **{k: text.get(k, "") for k in SHOWN_SETTINGS}})
        return found


def png_data_url(image: np.ndarray) -> str:
    """A float (h, w, 3) image in [0, 1] as a PNG data URL (a preview is small: the latents' size or the image's)."""
    buffer = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return PNG_URL + base64.b64encode(buffer.getvalue()).decode("ascii")


def drawing(data: str, size: tuple[int, int]) -> Image.Image:
    """A PNG data URL of the bundle's size (width, height) -> an RGB image; a message for anything else."""
    if not data.startswith(PNG_URL):
        raise ValueError(f"control_image must be a PNG data URL ({PNG_URL}...), as the page's canvas sends it")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data[len(PNG_URL) :], validate=True)), formats=["PNG"])
    except (binascii.Error, OSError):
        raise ValueError("control_image is not a readable PNG (its data URL's base64 or its PNG is damaged)") from None
    if image.size != size:  # asked before its pixels are read: a PNG header can claim any size
        raise ValueError(
            f"control_image is {image.width}x{image.height} (width x height) and this bundle makes {size[0]}x{size[1]} images: "
            "draw on the page's canvas, which has the bundle's size"
        )
    try:
        return image.convert("RGB")
    except OSError:
        raise ValueError("control_image is not a readable PNG (its pixel data is damaged)") from None


def checked(request: Any) -> dict[str, Any]:
    """The page's form -> txt2img's arguments, checked here so a bad field is a message, not a stack trace."""
    if not isinstance(request, dict):
        raise ValueError("expected a JSON object")
    for key in ("prompt", "negative_prompt", "sampler", "control_image"):
        if request.get(key) is not None and not isinstance(request[key], str):
            raise ValueError(f"{key} must be a string, got {type(request[key]).__name__}")
    prompt, negative = str(request.get("prompt") or "").strip(), str(request.get("negative_prompt") or "").strip()
    if not prompt:
        raise ValueError("the prompt is empty: describe the image to generate")
    if len(prompt) > MAX_PROMPT or len(negative) > MAX_PROMPT:
        raise ValueError(f"prompts are limited to {MAX_PROMPT} characters")
    seed = number(request.get("seed"), int, "seed", 0, 2**32 - 1, default=secrets.randbelow(2**32))  # empty: a random seed
    steps = number(request.get("steps"), int, "steps", 1, MAX_STEPS, default=20)
    guidance = number(request.get("guidance"), float, "guidance", 0.0, MAX_GUIDANCE, default=7.5)
    sampler = request.get("sampler") or None
    if sampler is not None and sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}")
    options = {
        "prompt": prompt, "negative_prompt": negative, "seed": seed, "steps": steps, "guidance_scale": guidance, "scheduler": sampler
    }
    if request.get("control_image"):  # checked against the bundle by Studio.control_image
        options["control_image"] = request["control_image"]
    return options


def parse_body(body: bytes) -> Any:
    """The request's JSON: nesting bounded before parsing, NaN/Infinity and numbers past float's range refused."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:  # a 64 KiB scan; json's own recursion limit would answer 30,000 levels with a traceback
        if in_string:
            escaped, in_string = (False, True) if escaped else (byte == 0x5C, byte != 0x22)
        elif byte == 0x22:
            in_string = True
        elif byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    if deepest > MAX_DEPTH:
        raise ValueError(f"the JSON is nested {deepest} levels deep; a request is one flat object")

    try:
        return strict_json(body)  # the bundle reader's own: NaN, Infinity and 1e400 refused
    except UnicodeDecodeError:
        raise ValueError("the request is not UTF-8 text") from None


def content_length(value: str | None) -> tuple[int, int] | int:
    """The body's length from its header, or the (status, ...) to refuse it with: 411 missing, 400 malformed, 413 large."""
    if value is None:
        return (411, 0)
    if not value.strip().isdigit():  # int() would take "-1", " +5" and "1_000"
        return (400, 0)
    length = int(value)
    return (413, 0) if length > MAX_BODY else length


def allowed_host(header: str | None, served: str, names: tuple[str, ...]) -> bool:
    """Whether a request's Host names this server: the address it listens on, a loopback name when it listens on
    loopback, any IP address when it listens on all of them, or a name given with --allow-host. A DNS-rebinding page
    reaches the server under its own domain name, which none of these is."""
    if not header:
        return False
    host = header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        host = host[1 : host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        host, _, port_text = host.partition(":")
        if not port_text.isdigit():
            return False
    served = served.lower()
    if host in names or host == served:
        return True
    if served in LOOPBACK_NAMES or served.startswith("127."):
        return host in LOOPBACK_NAMES
    if served not in ("0.0.0.0", "::", ""):
        return False
    if host in LOOPBACK_NAMES:
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def number(value: Any, kind: type[int] | type[float], name: str, low: float, high: float, default: float) -> Any:
    if value is None or value == "":
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    try:
        x = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} {value!r:.40} is not {'a whole number' if kind is int else 'a finite number'}") from None
    if not low <= x <= high:  # NaN fails this too
        raise ValueError(f"{name} must be between {low:g} and {high:g}, got {x:g}")
    return x


class Handler(BaseHTTPRequestHandler):
    studio: Studio  # set on the subclass that serve() makes
    served_host = "127.0.0.1"  # the address it listens on, and the extra names --allow-host gives
    host_names: tuple[str, ...] = ()
    timeout = SOCKET_TIMEOUT  # StreamRequestHandler sets it on the socket: a stalled client gets no thread forever

    def host_refused(self) -> bool:
        """Answer 403 to a request whose Host is not this server's (DNS rebinding), and say so."""
        if allowed_host(self.headers.get("Host"), self.served_host, self.host_names):
            return False
        self.send_json(
            {"error": f"Host {self.headers.get('Host')!r:.80} is not an address this server answers to; open it by its address, "
             "or start it with --allow-host NAME"}, 403)  # fmt: skip
        return True

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.host_refused():
            return
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            return self.send_file(STATIC / "index.html")
        if path.startswith("/static/"):
            name = path.removeprefix("/static/")  # only the files that are there: never a path built from the URL
            if name in {p.name for p in STATIC.iterdir()}:
                return self.send_file(STATIC / name)
        if path == "/api/info":
            return self.send_json(self.studio.info())
        if path == "/api/recent":
            return self.send_json(self.studio.recent())
        if path.startswith("/api/jobs/"):
            job = self.studio.jobs.get(path.removeprefix("/api/jobs/"))
            return self.send_json(asdict(job)) if job else self.send_json({"error": "no such job"}, 404)
        if path.startswith("/images/"):
            name = path.removeprefix("/images/")
            if IMAGE_NAME.fullmatch(name) and (self.studio.out / name).is_file():
                return self.send_file(self.studio.out / name, "image/png", cache="max-age=31536000, immutable")
        self.send_json({"error": "not found"}, 404)

    def do_POST(self) -> None:  # noqa: N802
        if self.host_refused():
            return
        if self.path != "/api/generate":
            return self.send_json({"error": "not found"}, 404)
        # JSON only: a form on another site cannot send it without a CORS preflight, which this server never grants.
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            return self.send_json({"error": "send the settings as application/json"}, 415)
        self.close_connection = True  # a refused body may be left unread: the connection cannot carry another request
        if self.headers.get("Transfer-Encoding"):
            return self.send_json({"error": "send the body with a Content-Length, not chunked"}, 411)
        length = content_length(self.headers.get("Content-Length"))
        if isinstance(length, tuple):
            message = {411: "a Content-Length header is required", 400: "Content-Length must be a whole number of bytes"}
            return self.send_json({"error": message.get(length[0], f"request too large (at most {MAX_BODY} bytes)")}, length[0])
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            return self.send_json({"error": f"the request body did not arrive within {self.timeout:g} s"}, 408)
        if len(body) < length:
            return self.send_json({"error": f"the body ended after {len(body)} of its {length} bytes"}, 400)
        try:
            job = self.studio.start(parse_body(body) if body else None)
        except Busy as e:
            return self.send_json({"error": str(e)}, 409)
        except ValueError as e:  # also json.JSONDecodeError
            return self.send_json({"error": str(e)}, 400)
        self.send_json({"job": job.id, "seed": job.seed}, 202)

    def send_json(self, data: Any, status: int = 200) -> None:
        self.send_body(json.dumps(data).encode(), "application/json", status, cache="no-store")

    def send_file(self, path: Path, content_type: str | None = None, cache: str = "no-cache") -> None:
        self.send_body(path.read_bytes(), content_type or STATIC_TYPES.get(path.suffix, "application/octet-stream"), 200, cache)

    def send_body(self, body: bytes, content_type: str, status: int, cache: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        if "/api/jobs/" not in self.path:  # the page polls several times a second: leave those out of the log
            super().log_message(format, *args)


def serve(
    studio: Studio, host: str, port: int, allow_hosts: tuple[str, ...] = (), timeout: float = SOCKET_TIMEOUT
) -> ThreadingHTTPServer:
    """Bind the server (port 0: any free one); the caller runs serve_forever().

    allow_hosts: names besides its address that requests may give as their Host (a DNS name of this machine).
    timeout: seconds a connection may stall before it is answered 408 or closed.
    """
    names = tuple(h.lower() for h in allow_hosts)
    attributes = {"studio": studio, "served_host": host, "host_names": names, "timeout": timeout}
    handler = type("StudioHandler", (Handler,), attributes)
    server_class = ThreadingHTTPServer
    if ":" in host:  # an IPv6 address such as ::1
        server_class = type("ThreadingHTTPServer6", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
    server = server_class((host, port), handler)
    server.daemon_threads = True  # a poll left open by a closed tab does not keep the process alive
    return server


def main(argv: list[str] | None = None) -> int:
    p = _common.parser("python samples/web/server.py", __doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine only)")
    p.add_argument("--port", type=port_argument(any_free=True), default=8000, help="port, 0..65535 (default %(default)s; 0: any free port)")
    p.add_argument(
        "--allow-host", action="append", default=[], metavar="NAME",
        help="a name the page may be opened by besides its address (repeatable); other Host headers get 403 (DNS rebinding)",
    )  # fmt: skip
    p.add_argument("--socket-timeout", type=float, default=SOCKET_TIMEOUT, help="seconds a connection may stall (default %(default)s)")
    _common.add_bundle_and_out(p, out=_common.OUT / "web")
    args = p.parse_args(argv)
    if not 0 < args.socket_timeout < 3600:
        p.error(f"--socket-timeout {args.socket_timeout}: give seconds between 0 and 3600")

    try:
        pipe = runtime.Pipeline.load(_common.bundle(args.bundle))
        server = serve(Studio(pipe, args.out), args.host, args.port, tuple(args.allow_host), args.socket_timeout)
    except _common.USER_ERRORS as e:
        return _common.fail(e)
    except OSError as e:  # the port is taken, the address is not this machine's...
        return _common.fail(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    args.out.mkdir(parents=True, exist_ok=True)
    host, port = server.server_address[:2]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach port {port} can use this page (no login)", file=sys.stderr)
    shown_host = f"[{host}]" if ":" in str(host) else host
    print(f"serving {Path(pipe.bundle).name} on http://{shown_host}:{port}/ (Ctrl-C to stop)", flush=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # systemd's stop: leave through the finally below
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
