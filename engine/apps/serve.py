"""`ddpm-engine serve`: the sampling engine behind HTTP (Starlette on uvicorn).

One engine thread owns the model and runs `Engine.serve_forever`; HTTP handlers (the event loop)
parse and check a request, submit it to the engine and await it, so the loop never waits on the
model. Rows of every client's requests share the engine's steps (engine/core.py): a request that
arrives while others run joins at the next step with free slots.

    POST /v1/images   {"classes": [...] | "class": c, "n", and the sampling fields of engine.settings.FIELDS}:
                      the names, defaults and ranges of `ddpm-engine sample`'s flags, from that one
                      table; image i has class classes[i % len(classes)] and
                      the noise of (seed, i), so it equals image i of `ddpm-engine sample` with the
                      same flags. Answers a JSON list of base64 PNGs and the settings used,
                      `Accept: image/png` a grid (one row per class), `Accept: text/event-stream`
                      server-sent events: progress (step k of S), each image as it finishes, done.
    GET /v1/model     the classes, defaults and limits (what the page builds its form from)
    GET /healthz      liveness;  GET /readyz: model loaded, engine running, not draining
    GET /metrics      Prometheus text (prometheus-client)
    GET /             a small page: pick classes and guidance, watch the grid fill in

Errors are one line of JSON, {"error": "..."}, with a 4xx status for bad input (400 malformed or
nested too deep, 408 a head or body too slow, 413 too large, 422 a field of the wrong type, out of
range or unknown, 401 without the --token, 429 with Retry-After when the queue is full, 503 while
draining or past --max-connections); a client that disconnects cancels its request, whose rows leave
the batch at the next step. SIGTERM stops admitting, lets in-flight requests finish (up to --grace
seconds), answers those still running then with a 503, and exits 0. The server keeps no state between requests: replicas
behind any HTTP load balancer scale it out (docs/serving.md).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass
from importlib import resources

import numpy as np
import torch
import uvicorn
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from engine.apps.clitools import one_line
from engine.core import Engine, EngineClosed, NonFiniteImages, Request
from engine.errors import UserError
from engine.formats.checkpoint import Checkpoint
from engine.formats.images import class_rows, grid
from engine.generate import labels_for, to_uint8
from engine.noise import image_keys
from engine.settings import FIELDS, Field, FieldError, SampleSettings, model_classes, resolve_guidance, shown

SAMPLE = SampleSettings()  # the defaults, as `ddpm-engine sample` reads them
log = logging.getLogger("ddpm-engine.apps.serve")


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None     # bearer token every endpoint but /healthz and the page requires
    max_images: int = 256        # images a request may ask for
    max_queue: int = 64          # requests waiting for slots; more are answered 429
    max_body: int = 16 * 1024    # bytes of a request body
    max_depth: int = 16          # nesting of arrays and objects in a request body
    grace_s: float = 30.0        # what SIGTERM gives in-flight requests
    header_timeout_s: float = 10.0  # from a connection (or its last answer) to a whole request head
    body_timeout_s: float = 10.0    # from the request head to the whole body
    keep_alive_s: float = 5.0       # an idle keep-alive connection is closed after this
    max_connections: int = 256      # open connections; more are answered 503 and closed


class BadRequest(Exception):
    """A request the server refuses: its status and one line saying why."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": one_line(message)}, status_code=status, headers=headers)


@dataclass
class Job:
    """One parsed POST /v1/images: what the engine runs and what the answer says."""

    settings: SampleSettings
    classes: list[int]
    n: int
    seed: int


# A request's fields: the sampling fields of engine.settings.FIELDS, and the request's own.
REQUEST_FIELDS = ("class", "classes", "n")
N_FIELD = Field("n", int, "images in the answer (default: 10 per class)", lo=1)


def parse_job(body: object, ckpt: Checkpoint, max_images: int) -> Job:
    """The request body as a Job, every field checked by engine.settings.FIELDS (the CLI's table: its
    names, defaults and ranges) and against the model; BadRequest(422) names the field that is wrong.
    A field that is absent takes its default; null is a value only for steps (the sampler's default)."""
    if not isinstance(body, dict):
        raise BadRequest(422, "the body must be a JSON object")
    unknown = sorted(set(body) - set(FIELDS) - set(REQUEST_FIELDS))
    if unknown:
        raise BadRequest(422, f"unknown field {shown(unknown[0])}; use {', '.join(sorted([*FIELDS, *REQUEST_FIELDS]))}")
    if "class" in body and "classes" in body:
        raise BadRequest(422, "give class or classes, not both")
    try:
        values = {name: FIELDS[name].check(body[name]) for name in FIELDS if name in body}
        picked = body.get("classes", body.get("class"))
        field = "classes" if "classes" in body else "class"
        if field in body and picked is None:
            raise FieldError(field, "must be a class name or index, or a list of them, not null")
        classes = model_classes(picked if isinstance(picked, list) or picked is None else [picked], ckpt.config,
                                ckpt.class_names, field)
        values["guidance"] = resolve_guidance(values.get("guidance"), SAMPLE.guidance, ckpt.config)
        seed = values.pop("seed", 0)
        settings = SampleSettings(**values).check(ckpt.diffusion.num_timesteps)
        n = N_FIELD.check(body["n"]) if "n" in body else min(10 * len(classes), max_images)
        if n > max_images:
            raise FieldError("n", f"{shown(n)} is out of range [1, {max_images}] (this server's --max-images)")
    except FieldError as e:
        raise BadRequest(422, str(e)) from None
    return Job(settings, classes, n, seed)


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def png_base64(image: np.ndarray) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


class Metrics:
    """What /metrics exports, in the server's own registry."""

    def __init__(self, engine: Engine):
        self.registry = registry = CollectorRegistry()
        Gauge("ddpm_queue_depth", "requests waiting for slots", registry=registry).set_function(lambda: engine.queued)
        Gauge("ddpm_active_slots", "rows (images) in the engine's batch", registry=registry).set_function(
            lambda: engine.active)
        Gauge("ddpm_max_slots", "the engine's largest batch (images)", registry=registry).set(engine.max_batch)
        batch_buckets = sorted({2**k for k in range(int(math.log2(engine.max_batch)) + 1)} | {engine.max_batch})
        self.batch = Histogram("ddpm_batch_rows", "images in an engine step (the U-Net sees up to twice as many)",
                               buckets=batch_buckets, registry=registry)
        self.latency = Histogram("ddpm_request_latency_seconds", "POST /v1/images, arrival to answer",
                                 buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250), registry=registry)
        self.images = Counter("ddpm_images", "images generated", registry=registry)
        self.steps = Counter("ddpm_engine_steps", "engine steps run", registry=registry)
        self.rejected = Counter("ddpm_rejected_requests", "requests refused, by reason", ["reason"], registry=registry)
        self.cancelled = Counter("ddpm_cancelled_requests", "requests whose client went away", registry=registry)
        self._recent: list[tuple[float, int]] = []
        Gauge("ddpm_images_per_second", "images finished over the last 10 s", registry=registry).set_function(
            self.images_per_s)
        self._lock = threading.Lock()

    def on_step(self, rows: int) -> None:
        self.batch.observe(rows)
        self.steps.inc()

    def finished(self, count: int) -> None:
        self.images.inc(count)
        with self._lock:
            self._recent.append((time.monotonic(), count))

    def images_per_s(self, window_s: float = 10.0) -> float:
        now = time.monotonic()
        with self._lock:
            self._recent = [(t, c) for t, c in self._recent if now - t <= window_s]
            return sum(c for _, c in self._recent) / window_s


class Service:
    """The engine thread, and what the handlers share."""

    def __init__(self, ckpt: Checkpoint, engine: Engine, options: ServeOptions):
        self.ckpt, self.engine, self.options = ckpt, engine, options
        self.metrics = Metrics(engine)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ddpm-engine", daemon=True)
        self.draining = False
        self.step_s = 0.0  # a moving average of an engine step's wall time, for Retry-After

    def _run(self) -> None:
        def timed(rows: int, seconds: float) -> None:
            self.step_s = 0.9 * self.step_s + 0.1 * seconds if self.step_s else seconds
            self.metrics.on_step(rows)

        self.engine.on_step = timed
        try:
            self.engine.serve_forever(self.stop)
        except BaseException:  # noqa: BLE001 - the thread's end must be visible to /readyz and the log
            log.exception("the engine thread stopped")
            raise

    def start(self) -> None:
        self.thread.start()

    def ready(self) -> bool:
        return self.thread.is_alive() and not self.draining

    def drain(self) -> None:
        """Stop admitting; requests still running after the grace period are ended (Drained: a 503)."""
        self.draining = True
        self.engine.close()
        expire = threading.Timer(self.options.grace_s, self.engine.abort,
                                 [Drained(f"the server is shutting down and this request outlived its "
                                          f"{self.options.grace_s:g} s grace period")])
        expire.daemon = True
        expire.start()

    def shutdown(self) -> None:
        """Drain, then stop the engine thread and wait for it: the process never exits under a running step."""
        if not self.draining:
            self.drain()
        self.engine.abort(Drained("the server is shutting down"))
        self.stop.set()
        self.thread.join()

    def submit(self, job: Job, loop: asyncio.AbstractEventLoop,
               events: asyncio.Queue | None = None) -> tuple[Request, asyncio.Future]:
        """Queue a job on the engine: (its Request, a future set on the event loop when it ends); with
        `events`, its progress and each finished image arrive there too."""
        if self.draining:
            raise BadRequest(503, "the server is shutting down")
        if self.engine.queued >= self.options.max_queue:
            self.metrics.rejected.labels("queue_full").inc()
            wait = self.step_s * max(1, self.engine.queued) * job.settings.num_steps(self.ckpt.diffusion.num_timesteps)
            raise BadRequest(429, f"the queue is full ({self.options.max_queue} requests); retry later",
                             {"Retry-After": str(max(1, math.ceil(wait)))})
        indices = torch.arange(job.n)
        done = loop.create_future()

        def notify(item) -> None:
            if events is not None:
                loop.call_soon_threadsafe(events.put_nowait, item)

        def on_done(request: Request) -> None:
            if request.error is None and not request.cancelled:
                self.metrics.finished(request.n)
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(request))
            notify(("done", None))

        request = Request(job.settings, labels_for(indices, job.classes), image_keys(job.seed, indices),
                          on_progress=lambda r, _: notify(("progress", r.steps_done)),
                          on_image=lambda r, i: notify(("image", i)), on_done=on_done)
        try:
            self.engine.submit(request)
        except EngineClosed:
            raise BadRequest(503, "the server is shutting down") from None
        return request, done


def answer_of(job: Job, request: Request, ckpt: Checkpoint) -> dict:
    return {"n": job.n, "seed": job.seed, "settings": asdict(job.settings),
            "labels": request.labels.tolist(), "class_names": [ckpt.class_names[c] for c in request.labels.tolist()]
            if ckpt.class_names else []}


class ClientGone(Exception):
    """The client disconnected before its request was read: nobody to answer."""


async def read_json(http: HttpRequest, options: ServeOptions) -> object:
    """The body as JSON: 413 past options.max_body bytes (checked while reading), 408 if it takes longer
    than options.body_timeout_s, 400 if it is not JSON or nests deeper than options.max_depth;
    ClientGone if the client leaves (or breaks the framing) mid-body."""
    limit = options.max_body
    declared = http.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and len(declared) < 20 and int(declared) > limit:
        raise BadRequest(413, f"the body is over {limit} bytes")
    body = bytearray()
    try:
        async with asyncio.timeout(options.body_timeout_s):
            async for chunk in http.stream():
                body += chunk
                if len(body) > limit:
                    raise BadRequest(413, f"the body is over {limit} bytes")
    except TimeoutError:
        raise BadRequest(408, f"the body did not arrive within {options.body_timeout_s:g} s") from None
    except ClientDisconnect:
        raise ClientGone() from None
    if nesting(body) > options.max_depth:
        raise BadRequest(400, f"the body nests arrays and objects deeper than {options.max_depth}")
    try:
        return json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise BadRequest(400, f"the body is not valid JSON: {e}") from None


def nesting(body: bytes) -> int:
    """The deepest nesting of [ and { outside JSON strings (what json.loads would recurse into)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


async def disconnected(http: HttpRequest) -> None:
    """Returns when the client goes away (the body has been read, so receive() only reports that)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


def sse(kind: str, data: dict) -> str:
    """One server-sent event."""
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


class Api:
    """The HTTP endpoints, one method each, over a Service."""

    def __init__(self, service: Service):
        self.service, self.ckpt, self.options, self.metrics = service, service.ckpt, service.options, service.metrics
        self.page = resources.files("engine.apps").joinpath("serve_page.html").read_text()

    async def images(self, http: HttpRequest) -> Response:
        """POST /v1/images: JSON, a PNG grid, or server-sent events, by the Accept header."""
        started = time.perf_counter()
        try:
            body = await read_json(http, self.options)
        except ClientGone:
            self.metrics.cancelled.inc()
            return Response(status_code=499)
        job = parse_job(body, self.ckpt, self.options.max_images)
        accept = http.headers.get("accept", "")
        loop = asyncio.get_running_loop()
        if "text/event-stream" in accept:
            events: asyncio.Queue = asyncio.Queue()
            request, _ = self.service.submit(job, loop, events)
            return StreamingResponse(self.stream(job, request, events, started), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-store"})
        request, done = self.service.submit(job, loop)
        gone = asyncio.ensure_future(disconnected(http))
        try:
            await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not done.done():  # the client went away: free its slots
            request.cancel()
            self.metrics.cancelled.inc()
            return Response(status_code=499)
        if request.error is not None:
            return self.failed(request.error)
        x = to_uint8(request.images)
        if "image/png" in accept and "application/json" not in accept:
            picture = grid(class_rows(x, request.labels.numpy(), job.classes))
            response = Response(await asyncio.to_thread(png_bytes, picture), media_type="image/png")
        else:  # PNG encoding off the event loop: a 256-image answer takes tens of ms
            pngs = await asyncio.to_thread(lambda: [png_base64(image) for image in x])
            response = JSONResponse({**answer_of(job, request, self.ckpt), "images": pngs})
        self.metrics.latency.observe(time.perf_counter() - started)
        return response

    async def stream(self, job: Job, request: Request, events: asyncio.Queue, started: float):
        """Server-sent events: `start`, `progress` {step, steps, images_done, n}, `image` {index, label, png}
        as each finishes, then `done` or `error` {error}. A client that goes away cancels the request."""
        steps = request.num_steps
        try:
            yield sse("start", answer_of(job, request, self.ckpt))
            while True:
                kind, value = await events.get()
                if kind == "progress":
                    yield sse("progress", {"step": min(steps, value // job.n), "steps": steps,
                                           "images_done": request.finished, "n": job.n})
                elif kind == "image":
                    image = to_uint8(request.images[value:value + 1])[0]
                    yield sse("image", {"index": value, "label": int(request.labels[value]), "png": png_base64(image)})
                elif request.error is not None:
                    yield sse("error", {"error": one_line(request.error)})
                    return
                else:
                    self.metrics.latency.observe(time.perf_counter() - started)
                    yield sse("done", answer_of(job, request, self.ckpt))
                    return
        finally:
            if not request.done:
                request.cancel()
                self.metrics.cancelled.inc()

    @staticmethod
    def failed(error: BaseException) -> Response:
        if isinstance(error, Drained):
            return error_response(503, str(error))
        if isinstance(error, NonFiniteImages):
            return error_response(500, str(error))
        log.error("a request failed: %s", one_line(error) or type(error).__name__)
        return error_response(500, f"sampling failed: {one_line(error) or type(error).__name__}")

    async def model(self, http: HttpRequest) -> Response:
        config, T = self.ckpt.config, self.ckpt.diffusion.num_timesteps
        return JSONResponse({
            "classes": list(self.ckpt.class_names), "image_size": config.image_size, "guidable": config.guidable,
            "num_timesteps": T, "engine": self.service.engine.name, "defaults": {**asdict(SAMPLE), "n_per_class": 10},
            "samplers": list(FIELDS["sampler"].choices), "spacings": list(FIELDS["spacing"].choices),
            "limits": {"n": self.options.max_images, "guidance": FIELDS["guidance"].hi, "steps": T,
                       "seed": FIELDS["seed"].hi}})

    async def healthz(self, http: HttpRequest) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, http: HttpRequest) -> Response:
        if self.service.ready():
            return JSONResponse({"status": "ready", "engine": self.service.engine.name})
        return error_response(503, "draining" if self.service.draining else "the engine is not running")

    async def metrics_text(self, http: HttpRequest) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def index(self, http: HttpRequest) -> Response:
        return HTMLResponse(self.page)

    async def bad_request(self, http: HttpRequest, error: BadRequest) -> Response:
        if error.status != 429:  # counted where the queue refused it
            self.metrics.rejected.labels("draining" if error.status == 503 else "invalid").inc()
        return error_response(error.status, str(error), error.headers)

    async def http_error(self, http: HttpRequest, error: HTTPException) -> Response:
        return error_response(error.status_code, error.detail, getattr(error, "headers", None))

    async def user_error(self, http: HttpRequest, error: UserError) -> Response:
        """Bad input found past parse_job (e.g. by the engine's own check of the settings): a 422."""
        self.metrics.rejected.labels("invalid").inc()
        return error_response(422, one_line(error) or type(error).__name__)


class TokenGuard:
    """ASGI middleware: every path but /healthz and the page (static HTML that asks for the token) needs
    `Authorization: Bearer TOKEN` (the scheme in any case, RFC 7235), checked before any body is read."""

    OPEN = ("/healthz", "/")

    def __init__(self, app, token: str, metrics: Metrics):
        self.app, self.token, self.metrics = app, token.encode("utf-8"), metrics

    def authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        value = dict(headers).get(b"authorization", b"")
        scheme, _, credentials = value.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self.token)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.OPEN and not self.authorized(scope["headers"]):
            self.metrics.rejected.labels("unauthorized").inc()
            response = error_response(401, "missing or wrong bearer token",
                                      {"WWW-Authenticate": 'Bearer realm="ddpm-engine"'})
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def build_app(service: Service):
    """The ASGI app: the routes, the one-line-JSON error handlers, and the token guard when a token is set.
    Anything else raised is a bug: uvicorn answers 500 and logs its traceback."""
    api = Api(service)
    app = Starlette(routes=[
        Route("/", api.index), Route("/healthz", api.healthz), Route("/readyz", api.readyz),
        Route("/metrics", api.metrics_text), Route("/v1/model", api.model),
        Route("/v1/images", api.images, methods=["POST"]),
    ], exception_handlers={BadRequest: api.bad_request, UserError: api.user_error, HTTPException: api.http_error})
    return app if service.options.token is None else TokenGuard(app, service.options.token, service.metrics)


class Drained(Exception):
    """A request still running when the drain's grace period ended."""


def raw_json_response(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 answer with a one-line JSON error, for what is answered below the ASGI app."""
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode() + body


class GuardedProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with what it lacks: a deadline for a whole request head (from the
    connection, or from the last answer on a kept-alive one), a cap on open connections, and one-line
    JSON for the errors it answers itself (a malformed request). `serve` sets the class attributes."""

    header_timeout_s = 10.0
    max_connections = 256

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(raw_json_response(503, "Service Unavailable", "too many connections; retry later"))
            transport.close()
            return
        self._arm_head_deadline()

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self.head_deadline = self.loop.call_later(self.header_timeout_s, self._head_deadline_passed)

    def _disarm_head_deadline(self) -> None:
        deadline = getattr(self, "head_deadline", None)
        if deadline is not None:
            deadline.cancel()
            self.head_deadline = None

    def _head_deadline_passed(self) -> None:
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.write(raw_json_response(
                408, "Request Timeout", f"no whole request head within {self.header_timeout_s:g} s"))
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm_head_deadline()  # a request head arrived: the app's deadlines take over

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_deadline()

    def connection_lost(self, exc) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        self.transport.write(raw_json_response(400, "Bad Request", msg))
        self.transport.close()


class DrainingServer(uvicorn.Server):
    """uvicorn's server. Its one line "serving ..." is printed once the socket is bound. A SIGTERM or
    Ctrl-C marks the service as draining (/readyz 503, new requests 503) while uvicorn stops listening;
    requests still running when the grace period ends are answered 503 (an `error` event on a stream),
    and the process exits 0."""

    def __init__(self, config: uvicorn.Config, service: Service, started_line: str):
        super().__init__(config)
        self.service, self.started_line = service, started_line

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            print(self.started_line, flush=True)

    def handle_exit(self, sig, frame) -> None:
        if not self.service.draining:
            self.service.drain()
        super().handle_exit(sig, frame)
        # uvicorn re-raises a captured signal once it has shut down, so the process would die of it
        # (status -15); a server that drained as asked exits 0.
        self._captured_signals.clear()


def serve(ckpt: Checkpoint, engine: Engine, options: ServeOptions) -> None:
    """Run the server until SIGTERM or Ctrl-C; in-flight requests get options.grace_s to finish."""
    service = Service(ckpt, engine, options)
    service.start()
    app = build_app(service)
    protocol = type("Protocol", (GuardedProtocol,), {"header_timeout_s": options.header_timeout_s,
                                                     "max_connections": options.max_connections})
    # uvicorn waits for the answers of the requests the drain ended: a few seconds past the grace period.
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="info", access_log=False,
                            http=protocol, timeout_keep_alive=max(1, math.ceil(options.keep_alive_s)),
                            timeout_graceful_shutdown=int(options.grace_s) + 10, lifespan="off")
    server = DrainingServer(config, service, f"serving {engine.name} on http://{options.host}:{options.port}/ "
                                             f"(max batch {engine.max_batch} images)")
    try:
        server.run()
    except SystemExit:  # uvicorn's start-up failure, which it has logged (a port in use)
        raise OSError(f"could not serve on {options.host}:{options.port} (see the line above)") from None
    finally:
        service.shutdown()
