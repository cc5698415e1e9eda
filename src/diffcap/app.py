"""`diffcap serve`: a web page to caption images and watch the denoising, and its JSON API.

The server is Python's own threading HTTP server with one self-contained page (inline CSS and JavaScript, no
fonts, scripts or images from anywhere else; its Content-Security-Policy forbids them), so serving needs no
dependency beyond the model's and makes no outside request. Endpoints:

    GET  /                 the page
    GET  /api/info         checkpoint, sampler defaults, limits, examples
    GET  /examples/K.png   example image K
    POST /api/caption      body: the image file's bytes; query: steps, guidance, samples, seed, trajectory
                           (0/1), or example=K with no body. Answer: {"caption", "chosen", "captions": [...],
                           "samples": [{"caption", "chosen", "trajectory": [{"t", "caption", "tokens": [{"token",
                           "confidence"}]}]}], "steps", "guidance", "seed", "seconds"}; errors: {"error": message}
                           with a 4xx status.

The samples of a request are the candidates `Captioner.caption` draws for the image with `candidates` = samples
(`Captioner.samples`), and "caption" (sample "chosen") is the one it keeps, by the checkpoint's choice; with the
default number of samples (the checkpoint's `sample.candidates`) it is what `diffcap caption CHECKPOINT IMAGE`
prints. Uploads are limited in bytes (checked from Content-Length before reading) and pixels (checked from the
image header before decoding, by `diffcap.data.images.load_image`); a bad file gets a one-line message, never a
traceback. The model serves one request at a time (a lock); concurrent requests queue.
"""

from __future__ import annotations

import io
import json
import logging
import math
import tempfile
import threading
import time
import traceback
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from PIL import Image

from diffcap.checkpoint import CheckpointError
from diffcap.data.collection import IMAGE_SUFFIXES
from diffcap.data.images import ImageLoadError, load_image

log = logging.getLogger("diffcap")

#: The checkpoint `diffcap serve` uses when none is named: the one the package ships (when it ships one).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "checkpoint"
#: Photos the package ships for the page's examples (CC0 / public domain, see its LICENSE.md).
EXAMPLES_DIR = Path(__file__).resolve().parent / "assets" / "examples"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 8_000_000  # an upload's size
    max_pixels: int = 25_000_000  # width x height of an upload, checked before decoding
    max_steps: int = 100  # sampling steps of one request
    max_samples: int = 8  # captions of one request


class RequestError(Exception):
    """A request the server refuses, with the HTTP status and the one-line message the page shows."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def resolve_checkpoint(checkpoint: str | Path | None) -> Path:
    """The checkpoint to serve: the one named, else DEFAULT_CHECKPOINT if it exists, else a clear error."""
    if checkpoint is not None:
        return Path(checkpoint)
    if (DEFAULT_CHECKPOINT / "meta.json").is_file():
        return DEFAULT_CHECKPOINT
    raise CheckpointError(
        f"no CHECKPOINT given and this installation ships no default checkpoint (looked in {DEFAULT_CHECKPOINT}); "
        "name one, e.g. `diffcap serve runs/f8k/checkpoint` (train one with `diffcap train`, or `./run demo`)"
    )


@dataclass
class Example:
    label: str
    image: Image.Image  # RGB
    png: bytes  # thumbnail shown on the page


def _thumbnail_png(image: Image.Image, size: int = 160) -> bytes:
    thumb = image.copy()
    thumb.thumbnail((size, size))
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG")
    return buffer.getvalue()


def generated_examples(n: int = 4, seed: int = 3) -> list[Example]:
    """Synthetic shape images (the demo's), labelled with one of their true captions; need no data."""
    import random

    from diffcap.demo import draw_scene, random_scene

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = random_scene(rng)
        image = draw_scene(scene, rng)
        out.append(Example(scene.captions()[0], image, _thumbnail_png(image)))
    return out


def folder_examples(folder: Path, limit: int = 12, max_pixels: int = Limits.max_pixels) -> list[Example]:
    """Up to `limit` images of a folder (sorted by name); unreadable files are skipped with a warning."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"examples folder {folder} does not exist")
    out = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            image = load_image(path, max_pixels=max_pixels)
        except ImageLoadError as exc:
            log.warning("skipping example %s", exc)
            continue
        out.append(Example(path.name, image, _thumbnail_png(image)))
        if len(out) >= limit:
            break
    return out


def default_examples(max_pixels: int = Limits.max_pixels) -> list[Example]:
    """The photos shipped in EXAMPLES_DIR, else generated shape images."""
    shipped = folder_examples(EXAMPLES_DIR, max_pixels=max_pixels) if EXAMPLES_DIR.is_dir() else []
    return shipped or generated_examples()


def _int_param(params: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = params.get(name, "")
    if raw == "":
        value = default
    else:
        try:
            value = int(raw)
        except ValueError:
            raise RequestError(400, f"{name} must be a whole number, got {raw[:40]!r}") from None
    if not lo <= value <= hi:
        raise RequestError(400, f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _float_param(params: dict[str, str], name: str, default: float, lo: float, hi: float) -> float:
    raw = params.get(name, "")
    if raw == "":
        value = default
    else:
        try:
            value = float(raw)
        except ValueError:
            raise RequestError(400, f"{name} must be a number, got {raw[:40]!r}") from None
    if not (math.isfinite(value) and lo <= value <= hi):
        raise RequestError(400, f"{name} must be between {lo:g} and {hi:g}, got {raw[:40]}")
    return value


class CaptionService:
    """Everything the HTTP layer calls: validation, image loading and the (locked) model."""

    def __init__(self, captioner: Any, *, checkpoint: str = "", limits: Limits = Limits(),
                 examples: Sequence[Example] = ()) -> None:
        self.captioner = captioner
        self.checkpoint = checkpoint
        self.limits = limits
        self.examples = list(examples)
        self._lock = threading.Lock()
        model = captioner.model
        self.defaults = {"steps": model.config.sample.steps, "guidance": model.config.sample.guidance,
                         "seed": model.config.sample.seed,
                         "samples": 1 if getattr(model, "autoregressive", False)
                         else max(1, min(model.config.sample.candidates, limits.max_samples))}
        self.max_steps = min(limits.max_steps, model.diffusion.num_timesteps)
        # an autoregressive checkpoint (model.kind) writes word by word: it has no denoising trajectory
        self.has_trajectory = not getattr(model, "autoregressive", False)

    def info(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "trajectory": self.has_trajectory,
            "defaults": {**self.defaults, "steps": min(self.defaults["steps"], self.max_steps)},
            "limits": {"max_bytes": self.limits.max_bytes, "max_pixels": self.limits.max_pixels,
                       "max_steps": self.max_steps, "max_samples": self.limits.max_samples},
            "examples": [{"id": str(i), "label": e.label, "url": f"examples/{i}.png"}
                         for i, e in enumerate(self.examples)],
        }

    def example_png(self, index: str) -> bytes:
        if not index.isdigit() or int(index) >= len(self.examples):
            raise RequestError(404, f"no example {index[:20]!r}")
        return self.examples[int(index)].png

    def load_upload(self, data: bytes, filename: str = "upload") -> Image.Image:
        """The uploaded bytes as an RGB image, through the same safe loader as files on disk."""
        if len(data) > self.limits.max_bytes:
            raise RequestError(413, too_large_message(filename, len(data), self.limits.max_bytes))
        if not data:
            raise RequestError(400, f"{filename}: the file is empty")
        with tempfile.TemporaryDirectory(prefix="diffcap-upload-") as folder:
            path = Path(folder) / "upload"
            path.write_bytes(data)
            try:
                return load_image(path, max_pixels=self.limits.max_pixels)
            except ImageLoadError as exc:
                raise RequestError(400, f"{filename}: {exc.reason}") from None

    def caption(self, image: Image.Image, params: dict[str, str]) -> dict[str, Any]:
        steps = _int_param(params, "steps", min(self.defaults["steps"], self.max_steps), 1, self.max_steps)
        guidance = _float_param(params, "guidance", self.defaults["guidance"], 0.0, 20.0)
        samples = _int_param(params, "samples", self.defaults["samples"], 1, self.limits.max_samples)
        seed = _int_param(params, "seed", self.defaults["seed"], 0, 2**31 - 1)
        trajectory = self.has_trajectory and params.get("trajectory", "1") not in ("0", "false", "no")
        start = time.perf_counter()
        try:
            with self._lock:
                results = self.captioner.samples(image, samples, steps=steps, guidance=guidance, seed=seed,
                                                 trajectory=trajectory)
        except ValueError as exc:  # the sampler's own checks of its settings
            raise RequestError(400, str(exc).splitlines()[0] if str(exc) else "invalid settings") from None
        chosen = next(k for k, r in enumerate(results) if r.chosen)
        return {
            "caption": results[chosen].caption, "chosen": chosen,
            "captions": [r.caption for r in results],
            "samples": [r.to_dict() for r in results],
            "steps": steps, "guidance": guidance, "seed": seed,
            "seconds": round(time.perf_counter() - start, 3),
        }

    def caption_request(self, body: bytes, params: dict[str, str], filename: str = "upload") -> dict[str, Any]:
        if "example" in params:
            index = params["example"]
            self.example_png(index)  # 404 when unknown
            return {"image": self.examples[int(index)].label, **self.caption(self.examples[int(index)].image, params)}
        return {"image": filename, **self.caption(self.load_upload(body, filename), params)}


def too_large_message(filename: str, size: int, limit: int) -> str:
    return f"{filename}: the file is {size / 1e6:.1f} MB, more than the limit of {limit / 1e6:.1f} MB"


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "diffcap"
    timeout = 60  # seconds a client may take to send its request
    protocol_version = "HTTP/1.1"

    # -- plumbing -------------------------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data).encode(), "application/json; charset=utf-8")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _guard(self, fn) -> None:  # type: ignore[no-untyped-def]
        try:
            fn()
        except RequestError as exc:
            if self.command == "POST":
                self.close_connection = True  # the body may be unread: never parse it as the next request
            self._error(exc.status, exc.message)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 - the page gets a line, the log gets the traceback
            log.error("request %s %s failed:\n%s", self.command, self.path, traceback.format_exc())
            self._error(500, f"internal error ({type(exc).__name__}); the server log has the details")

    # -- routes ---------------------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._guard(self._get)

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802
        self._guard(self._post)

    def _get(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        service = self.server.service
        if url.path in ("/", "/index.html"):
            self._send(200, PAGE.encode(), "text/html; charset=utf-8", {"Content-Security-Policy": CSP})
        elif url.path == "/api/info":
            self._json(200, service.info())
        elif url.path == "/healthz":
            self._json(200, {"ok": True})
        elif url.path.startswith("/examples/") and url.path.endswith(".png"):
            self._send(200, service.example_png(url.path[len("/examples/"): -len(".png")]), "image/png")
        else:
            raise RequestError(404, f"no page {url.path[:100]!r}")

    def _post(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/api/caption":
            raise RequestError(404, f"no endpoint {url.path[:100]!r}")
        service = self.server.service
        params = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
        filename = urllib.parse.unquote(self.headers.get("X-Filename", "") or "upload")[:200]
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            if "example" not in params:
                raise RequestError(411, "send the image as the request body, with a Content-Length")
            length = 0
        else:
            try:
                length = int(length_header)
            except ValueError:
                raise RequestError(400, "bad Content-Length") from None
            if length < 0:
                raise RequestError(400, "bad Content-Length")
        if length > service.limits.max_bytes:
            self._discard(length)
            raise RequestError(413, too_large_message(filename, length, service.limits.max_bytes))
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            self.close_connection = True
            raise RequestError(400, "the upload was cut short")
        self._json(200, service.caption_request(body, params, filename))

    def _discard(self, length: int) -> None:
        """Read and drop a refused upload (so the client can read the answer) unless it is absurdly large."""
        if length > 8 * self.server.service.limits.max_bytes:
            self.close_connection = True
            return
        left = length
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # concurrent connections waiting to be accepted
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], service: CaptionService) -> None:
        self.service = service
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{'[' + host + ']' if ':' in str(host) else host}:{port}/"


def make_server(service: CaptionService, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> _Server:
    """A server bound to host:port (0: a free port; see `.url`); call `.serve_forever()` to run it."""
    try:
        return _Server((host, port), service)
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def build_service(checkpoint: str | Path | None = None, *, limits: Limits = Limits(),
                  examples: Path | None = None) -> CaptionService:
    from diffcap.captioner import Captioner

    path = resolve_checkpoint(checkpoint)
    captioner = Captioner.from_pretrained(path)
    if examples:
        chosen = folder_examples(examples, max_pixels=limits.max_pixels)
    else:
        chosen = default_examples(limits.max_pixels)
    return CaptionService(captioner, checkpoint=str(path), limits=limits, examples=chosen)


# -- load measurement -----------------------------------------------------------------------------------------


def post_caption(url: str, body: bytes, params: dict[str, Any] | None = None, *, filename: str = "image.png",
                 timeout: float = 300.0) -> tuple[int, dict[str, Any]]:
    """POST an image to a running server's /api/caption; (HTTP status, decoded JSON answer)."""
    query = urllib.parse.urlencode(params or {})
    request = urllib.request.Request(urllib.parse.urljoin(url, "api/caption") + (f"?{query}" if query else ""),
                                     data=body, method="POST",
                                     headers={"Content-Type": "application/octet-stream",
                                              "X-Filename": urllib.parse.quote(filename)})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # localhost: never through a proxy
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def measure_latency(url: str, bodies: Sequence[bytes], *, requests: int = 64, concurrency: int = 8,
                    params: dict[str, Any] | None = None, progress: bool = False) -> dict[str, Any]:
    """Send `requests` caption requests (cycling through `bodies`) from `concurrency` clients at once.

    Returns the latency percentiles (seconds, from sending to the whole answer), throughput and errors, and
    every answer's captions in request order.
    """
    if requests < 1 or concurrency < 1 or not bodies:
        raise ValueError("need at least one request, one client and one image")

    def one(i: int) -> tuple[float, int, dict[str, Any]]:
        start = time.perf_counter()
        status, answer = post_caption(url, bodies[i % len(bodies)], params, filename=f"image{i % len(bodies)}.png")
        return time.perf_counter() - start, status, answer

    from tqdm.auto import tqdm

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool, \
            tqdm(total=requests, desc="requests", unit="req", disable=not progress) as bar:
        futures = [pool.submit(one, i) for i in range(requests)]
        for future in futures:
            future.add_done_callback(lambda _: bar.update(1))
        results = [future.result() for future in futures]
    wall = time.perf_counter() - started
    import numpy as np

    latencies = np.array([r[0] for r in results])
    return {
        "requests": requests, "concurrency": concurrency,
        "errors": sum(r[1] != 200 for r in results),
        "p50": float(np.percentile(latencies, 50)), "p90": float(np.percentile(latencies, 90)),
        "p99": float(np.percentile(latencies, 99)), "mean": float(latencies.mean()), "max": float(latencies.max()),
        "wall": wall, "requests_per_second": requests / wall,
        "answers": [r[2] for r in results],
    }


def run_benchmark(service: CaptionService, *, requests: int, concurrency: int, host: str = DEFAULT_HOST,
                  port: int = 0, params: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Start a server, measure it over localhost HTTP with the examples as uploads, stop it."""
    server = make_server(service, host, port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        bodies = []
        for example in service.examples or generated_examples():
            buffer = io.BytesIO()
            example.image.save(buffer, format="PNG")
            bodies.append(buffer.getvalue())
        return measure_latency(server.url, bodies, requests=requests, concurrency=concurrency, params=params,
                               progress=progress)
    finally:
        server.shutdown()
        server.server_close()


def serve(checkpoint: str | Path | None = None, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          limits: Limits = Limits(), examples: Path | None = None) -> None:
    """Load the checkpoint and serve until interrupted."""
    service = build_service(checkpoint, limits=limits, examples=examples)
    server = make_server(service, host, port)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach this machine can use the captioner", host)
    print(f"serving {service.checkpoint} on {server.url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


# -- the page ------------------------------------------------------------------------------------------------

CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' blob: data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'")

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>diffcap: caption an image</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 1080px; margin: 1.5em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: .2em; } h2 { font-size: 1.1em; margin: 1.2em 0 .4em; }
.sub { color: #666; margin-top: 0; }
.cols { display: flex; gap: 2em; flex-wrap: wrap; }
.left { flex: 0 0 320px; } .right { flex: 1 1 500px; min-width: 0; }
#drop { border: 2px dashed #aaa; border-radius: 8px; padding: 1em; text-align: center; background: #fafafa; }
#drop.over { border-color: #2563eb; background: #eef4ff; }
#preview { max-width: 100%; max-height: 260px; display: none; margin: .5em auto 0; border-radius: 4px; }
#examples { display: flex; gap: 6px; flex-wrap: wrap; }
#examples button { padding: 0; border: 2px solid transparent; background: none; cursor: pointer; }
#examples button.chosen { border-color: #2563eb; }
#examples img { width: 64px; height: 64px; object-fit: cover; display: block; outline: 1px solid #ccc; }
label { display: block; margin: .5em 0 .1em; font-size: .9em; color: #444; }
.row { display: flex; gap: .6em; align-items: center; }
.row input[type=range] { flex: 1; } .row input[type=number] { width: 5.5em; }
#run { margin-top: 1em; padding: .5em 1.4em; font-size: 1em; cursor: pointer; }
#error { color: #a40000; background: #fff0f0; border: 1px solid #f3b5b5; padding: .5em .8em; border-radius: 4px; }
#error:empty { display: none; }
#status { color: #666; min-height: 1.2em; }
#captions li { margin: .25em 0; cursor: pointer; padding: .15em .3em; border-radius: 3px; }
#captions li.chosen { background: #eef4ff; }
#captions li.kept .text::after { content: "  kept"; font-weight: normal; font-size: .8em; color: #2563eb; }
#captions .text { font-weight: 600; font-size: 1.05em; }
table#trajectory { border-collapse: collapse; font-family: ui-monospace, monospace; font-size: .9em; }
#trajectory td { padding: 2px 6px; vertical-align: top; border-bottom: 1px solid #eee; }
#trajectory td.t { color: #777; text-align: right; white-space: nowrap; }
.tok { display: inline-block; padding: 1px 3px; margin: 1px 0 1px 4px; border-radius: 3px; }
.tok.cont { margin-left: 0; }
.legend span { display: inline-block; width: 2.2em; text-align: center; font-size: .8em; border-radius: 3px; }
</style></head><body>
<h1>diffcap: caption an image</h1>
<p class="sub">A continuous-diffusion language model turns Gaussian noise into a caption in a few parallel
denoising steps. <span id="checkpoint"></span></p>
<div class="cols"><div class="left">
  <div id="drop"><input type="file" id="file" accept="image/*" aria-label="image file">
    <div style="font-size:.85em;color:#666;margin-top:.4em">or drop an image here; <span id="limits"></span></div>
    <img id="preview" alt="the chosen image"></div>
  <h2>Examples</h2><div id="examples"></div>
  <label for="steps">denoising steps</label>
  <div class="row"><input type="range" id="steps-range" min="1" max="100" value="10">
    <input type="number" id="steps" min="1" max="100" value="10"></div>
  <label for="guidance">guidance weight (0 = off)</label>
  <div class="row"><input type="range" id="guidance-range" min="0" max="5" step="0.1" value="0">
    <input type="number" id="guidance" min="0" max="20" step="0.1" value="0"></div>
  <label for="samples">number of samples (the caption keeps one)</label>
  <div class="row"><input type="range" id="samples-range" min="1" max="8" value="1">
    <input type="number" id="samples" min="1" max="8" value="1"></div>
  <label for="seed">seed</label>
  <div class="row"><input type="number" id="seed" min="0" value="0" style="width:8em"></div>
  <button id="run" type="button">Caption</button>
</div><div class="right">
  <div id="error" role="alert"></div>
  <div id="status" aria-live="polite"></div>
  <h2>Captions</h2><ol id="captions"></ol>
  <div id="traj-section"><h2>Denoising trajectory <span id="traj-which" style="font-weight:normal;color:#666"></span></h2>
  <p class="sub">The caption rounded from the model's estimate of the clean text at each step, from pure noise
  (large t) to the result (t = 0). Shading: the model's confidence in each word piece
  <span class="legend"><span data-c="0.1">0.1</span><span data-c="0.5">0.5</span><span data-c="0.9">0.9</span></span></p>
  <table id="trajectory"><tbody></tbody></table></div>
</div></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let info = null, chosen = null, last = null, running = false;

function shade(c) { return "rgba(37, 99, 235, " + (0.08 + 0.72 * Math.max(0, Math.min(1, c))).toFixed(3) + ")"; }
function ink(c) { return c > 0.6 ? "#fff" : "#111"; }
for (const s of document.querySelectorAll(".legend span")) {
  const c = parseFloat(s.dataset.c); s.style.background = shade(c); s.style.color = ink(c);
}
function showError(message) { $("error").textContent = message; }
function link(a, b) {
  $(a).addEventListener("input", () => { $(b).value = $(a).value; });
  $(b).addEventListener("input", () => { $(a).value = $(b).value; });
}
link("steps-range", "steps"); link("guidance-range", "guidance"); link("samples-range", "samples");

function choose(item, previewUrl) {
  chosen = item;
  $("preview").style.display = "block"; $("preview").src = previewUrl;
  for (const b of document.querySelectorAll("#examples button")) b.classList.toggle("chosen", b.dataset.id === item.example);
  run();
}
$("file").addEventListener("change", () => {
  const file = $("file").files[0];
  if (file) choose({ file }, URL.createObjectURL(file));
});
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  const file = e.dataTransfer.files[0];
  if (file) choose({ file }, URL.createObjectURL(file));
});
$("run").addEventListener("click", run);
$("preview").addEventListener("error", () => { $("preview").style.display = "none"; });

async function init() {
  try {
    const r = await fetch("api/info");
    info = await r.json();
  } catch (e) { showError("The server could not be reached: " + e.message); return; }
  const d = info.defaults, l = info.limits;
  $("checkpoint").textContent = "Checkpoint: " + info.checkpoint;
  if (!info.trajectory) $("traj-section").style.display = "none";  // an autoregressive checkpoint
  $("limits").textContent = "at most " + (l.max_bytes / 1e6).toFixed(1) + " MB and " + (l.max_pixels / 1e6).toFixed(0) + " megapixels";
  for (const id of ["steps", "steps-range"]) { $(id).max = l.max_steps; $(id).value = d.steps; }
  for (const id of ["samples", "samples-range"]) { $(id).max = l.max_samples; $(id).value = d.samples; }
  $("guidance").value = d.guidance; $("guidance-range").value = d.guidance; $("seed").value = d.seed;
  for (const ex of info.examples) {
    const b = document.createElement("button");
    b.type = "button"; b.dataset.id = ex.id; b.title = ex.label;
    const img = document.createElement("img"); img.src = ex.url; img.alt = ex.label;
    b.appendChild(img);
    b.addEventListener("click", () => choose({ example: ex.id }, ex.url));
    $("examples").appendChild(b);
  }
  document.body.dataset.ready = "1";
}

async function run() {
  if (!info) return;
  if (!chosen) { showError("Choose an image or an example first."); return; }
  if (running) return;
  showError("");
  const q = new URLSearchParams({ steps: $("steps").value, guidance: $("guidance").value,
                                  samples: $("samples").value, seed: $("seed").value });
  const options = { method: "POST", headers: {} };
  let name;
  if (chosen.example !== undefined) { q.set("example", chosen.example); name = "example " + chosen.example; }
  else {
    name = chosen.file.name;
    if (chosen.file.size > info.limits.max_bytes) {
      showError(name + ": the file is " + (chosen.file.size / 1e6).toFixed(1) + " MB, more than the limit of " +
                (info.limits.max_bytes / 1e6).toFixed(1) + " MB");
      return;
    }
    options.body = chosen.file;
    options.headers["Content-Type"] = "application/octet-stream";
    options.headers["X-Filename"] = encodeURIComponent(name);
  }
  running = true; $("run").disabled = true;
  $("status").textContent = "captioning " + name + " ...";
  document.body.dataset.state = "busy";
  try {
    const r = await fetch("api/caption?" + q.toString(), options);
    let data;
    try { data = await r.json(); } catch (e) { data = { error: "the server answered " + r.status + " " + r.statusText }; }
    if (!r.ok) {
      showError(data.error || ("the server answered " + r.status));
      $("status").textContent = "";
      $("captions").replaceChildren(); $("trajectory").tBodies[0].replaceChildren(); $("traj-which").textContent = "";
    } else {
      last = data; render(data.chosen);
      $("status").textContent = name + ": " + data.samples.length + " caption(s), " + data.steps + " steps, " +
                                data.seconds.toFixed(2) + " s";
    }
  } catch (e) {
    showError("The server could not be reached: " + e.message);
    $("status").textContent = "";
  } finally {
    running = false; $("run").disabled = false;
    document.body.dataset.state = "done";
  }
}

function render(k) {
  const list = $("captions"); list.replaceChildren();
  last.samples.forEach((s, i) => {
    const li = document.createElement("li");
    const span = document.createElement("span"); span.className = "text";
    span.textContent = s.caption || "(empty caption)";
    li.appendChild(span);
    li.classList.toggle("chosen", i === k);
    li.classList.toggle("kept", s.chosen && last.samples.length > 1);
    if (last.samples.length > 1) li.title = "show this caption's trajectory";
    li.addEventListener("click", () => render(i));
    list.appendChild(li);
  });
  $("traj-which").textContent = last.samples.length > 1 ? "(caption " + (k + 1) + ")" : "";
  const body = $("trajectory").tBodies[0]; body.replaceChildren();
  for (const step of last.samples[k].trajectory) {
    const tr = document.createElement("tr"); tr.className = "step"; tr.dataset.t = step.t;
    tr.dataset.caption = step.caption;
    const t = document.createElement("td"); t.className = "t"; t.textContent = "t=" + step.t;
    const words = document.createElement("td"); words.className = "tokens";
    if (!step.tokens.length) words.textContent = "(empty)";
    for (const tok of step.tokens) {
      const s = document.createElement("span");
      const cont = tok.token.startsWith("##");
      s.className = "tok" + (cont ? " cont" : "");
      s.textContent = cont ? tok.token.slice(2) : tok.token;
      s.dataset.confidence = tok.confidence;
      s.title = "confidence " + tok.confidence.toFixed(2);
      s.style.background = shade(tok.confidence); s.style.color = ink(tok.confidence);
      words.appendChild(s);
    }
    tr.append(t, words); body.appendChild(tr);
  }
}
init();
</script></body></html>
"""
