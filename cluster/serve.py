"""The Ray Serve app: an HTTP API and a page in front of :class:`inpaint.serving.InpaintService`.

    python jobs/serve.py --checkpoint runs/quickstart-sample          # the usual way
    serve run cluster.serve:app_builder checkpoint=runs/quickstart-sample follow=newest
    serve deploy serve-config.yaml    # import_path: cluster.serve:app_builder, args: {checkpoint: ...}

Routes: ``POST /v1/inpaint`` (multipart or JSON), ``GET /v1/model``, ``GET /healthz``, ``GET /``
(the page, cluster/web/index.html), ``GET /docs`` (an offline rendering of ``/openapi.json``:
FastAPI's default Swagger page loads its scripts from a CDN). Every refusal is ``{"error": "..."}``
with a status code (the table in the README's "Serve and share a model"), never a traceback.

The replica does the work itself (one deployment, FastAPI ingress): each replica runs at most
``concurrency`` fills at once (torch already uses every core for one on a CPU) and queues at most
``queue`` more; past that it answers 503 with Retry-After at once instead of letting a burst pile
up. Serve's own ``max_queued_requests`` is the backstop (its 503 carries Retry-After as well, set
through ``backpressure_config``, but a plain-text body). ``follow``: a thread per replica polls the run (:class:`CheckpointFollower`)
and swaps the model in with one reference assignment (:class:`ModelSlot`): requests in flight
finish on the model they started with, none is dropped.
"""

# No `from __future__ import annotations`: FastAPI must see `Request` itself in the routes' signatures, and
# serve.ingress moves them to a class of its own where the string would not resolve.
import asyncio
import base64
import binascii
import copy
import html
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from cluster.console import configure_replica
from inpaint.errors import one_line
from inpaint.serving import (FOLLOW_MODES, CheckpointFollower, InpaintService, ModelSlot, RequestError, check_fields,
                             load_model, run_folder_of)

log = logging.getLogger("inpaint.serve")
requests_log = logging.getLogger("inpaint.serve.requests")  # one line per fill or refusal (ServeOptions.log_requests)
PAGE = Path(__file__).resolve().parent / "web" / "index.html"
MAX_BODY_BYTES = 64 * 2**20  # a 24 MP JPEG and its PNG mask fit; a larger body is 413 before it is read
RETRY_AFTER_S = 1
INPAINT_PATH = "/v1/inpaint"


@dataclass
class ServeOptions:
    """What ``jobs/serve.py``, ``serve run`` args and a RayService's ``args`` may set (all JSON-able)."""

    checkpoint: str = "runs/quickstart-sample"
    follow: str | None = None  # None, "newest" or "best"
    follow_interval_s: float = 30.0
    device: str = "cpu"
    max_pixels: int | None = None  # the largest context window filled (default: inference's MAX_FILL_PIXELS)
    concurrency: int = 1  # fills at once per replica (measured: >1 gains nothing on CPU, benchmarks/RESULTS.md)
    queue: int = 16  # requests a replica holds waiting beyond `concurrency`; more get 503
    max_body_bytes: int = MAX_BODY_BYTES
    cpus: int = 1  # CPUs a replica reserves, and torch's threads in it (benchmarks/RESULTS.md, "Serving")
    batch: int = 1  # >1: same-size windows of concurrent requests go through the generator together (@serve.batch)
    log_requests: bool = True  # a console line per fill and per refusal (off for load tests)

    def __post_init__(self) -> None:
        if self.follow not in (None, *FOLLOW_MODES):
            raise ValueError(f"follow must be one of {', '.join(FOLLOW_MODES)}, got {self.follow!r}")
        if (self.concurrency < 1 or self.queue < 0 or self.max_body_bytes < 1 or self.follow_interval_s <= 0
                or self.cpus < 1 or self.batch < 1):
            raise ValueError("concurrency >= 1, queue >= 0, max_body_bytes >= 1, follow_interval_s > 0, cpus >= 1 and batch >= 1 "
                             "are required")


class Admission:
    """At most ``running`` requests working and ``waiting`` queued; the next one is refused at once (503)."""

    def __init__(self, running: int, waiting: int):
        self._slots = asyncio.Semaphore(running)
        self._running, self._waiting, self._limit = 0, 0, running + waiting

    def check(self) -> None:
        if self._waiting + self._running >= self._limit:
            raise RequestError(503, "too many requests queued; retry shortly")

    async def __aenter__(self):
        self.check()
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        self._running += 1

    async def __aexit__(self, *exc):
        self._running -= 1
        self._slots.release()


def error_response(request: Request, status: int, message: str) -> JSONResponse:
    """``{"error": message}`` with ``status``; a refused fill's line goes to the replica's console too."""
    if request.url.path == INPAINT_PATH:  # not every 404 a browser or a scanner asks for (favicon.ico)
        requests_log.info("%s %s %d: %s", request.method, INPAINT_PATH, status, one_line(message, 300))
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse({"error": one_line(message, 1000)}, status_code=status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 as soon as it is known to exceed ``limit`` (declared length first, then as it streams)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise RequestError(413, f"request body of {int(declared):,} bytes is over the limit of {limit:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body is over the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_multipart(headers: Headers, body: bytes, limit: int) -> dict[str, Any]:
    async def stream():
        yield body

    try:
        form = await MultiPartParser(headers, stream(), max_files=4, max_fields=8, max_part_size=limit).parse()
    except MultiPartException as exc:
        raise RequestError(400, f"malformed multipart body ({exc.message})") from None
    names = [name for name, _ in form.multi_items()]
    if len(names) != len(set(names)):
        raise RequestError(422, "a field is given twice")
    check_fields(names)
    fields = {}
    for name, value in form.multi_items():
        fields[name] = await value.read() if isinstance(value, UploadFile) else value
        if name in ("image", "mask") and isinstance(fields[name], str):
            fields[name] = fields[name].encode("latin-1", "replace")  # a file sent as a plain field
    await form.close()
    return fields


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"body is not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise RequestError(422, "JSON body must be an object with image and mask (base64)")
    check_fields(list(document))
    for name in ("image", "mask"):
        value = document[name]
        if not isinstance(value, str):
            raise RequestError(422, f"{name} must be a base64 string")
        if value.startswith("data:") and "," in value:  # a data: URL, as a browser's FileReader gives it
            value = value.split(",", 1)[1]
        try:
            document[name] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, f"{name} is not valid base64") from None
    return document


def offline_docs(spec: dict[str, Any]) -> str:
    """The OpenAPI document as one plain HTML page: no scripts, nothing fetched from elsewhere."""
    rows = []
    for path, methods in spec.get("paths", {}).items():
        for method, operation in methods.items():
            body = operation.get("requestBody", {}).get("content", {})
            rows.append(f"<h2><code>{method.upper()} {html.escape(path)}</code></h2>"
                        f"<p>{html.escape(operation.get('summary', ''))}</p>"
                        f"<pre>{html.escape(operation.get('description', ''))}</pre>"
                        + "".join(f"<p>body <code>{html.escape(kind)}</code>:</p><pre>"
                                  f"{html.escape(json.dumps(content.get('schema', {}), indent=2))}</pre>"
                                  for kind, content in body.items()))
    return ("<!doctype html><meta charset=utf-8><title>inpaint API</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:auto}pre{background:#eee;padding:.5em}</style>"
            f"<h1>inpaint API {html.escape(spec['info']['version'])}</h1>"
            "<p>Machine-readable: <a href=/openapi.json>/openapi.json</a>. Errors: "
            "<code>{\"error\": \"one line\"}</code> with 400, 413, 415, 422 or 503 (Retry-After).</p>" + "".join(rows))


FIELD_SCHEMA = {
    "image": {"type": "string", "format": "binary", "description": "the photo (PNG, JPEG, WebP, ...)"},
    "mask": {"type": "string", "format": "binary",
             "description": "same size as the image; white (grey >= 128) = hole"},
    "blend": {"type": "boolean", "default": True, "description": "Poisson-blend the fill into its surroundings"},
    "format": {"type": "string", "enum": ["png", "jpeg"], "default": "png"},
}
INPAINT_BODY = {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["image", "mask"], "properties": FIELD_SCHEMA,
                                       "additionalProperties": False}},
    "application/json": {"schema": {"type": "object", "required": ["image", "mask"], "additionalProperties": False,
                                    "properties": {**FIELD_SCHEMA,
                                                   "image": {"type": "string", "format": "byte"},
                                                   "mask": {"type": "string", "format": "byte"}}}}}}
INPAINT_DOC = """Fill the hole the mask marks. Returns the completed image (image/png or image/jpeg); known
pixels come back bit for bit in PNG. The network sees a square window around the hole (twice the hole's longer
side, at least the checkpoint's image size), as `python -m inpaint fill` does.

curl -F image=@photo.jpg -F mask=@mask.png -F format=png http://HOST:PORT/v1/inpaint -o filled.png"""

api = FastAPI(title="inpaint", version="1", docs_url=None, redoc_url=None,
              description="Fill holes in photos with the trained inpainting GAN.")


@api.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(request, exc.status_code, str(exc.detail))


@api.exception_handler(RequestValidationError)
async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = (exc.errors() or [{}])[0]
    return error_response(request, 422, f"{'.'.join(map(str, first.get('loc', ())))}: {first.get('msg', 'invalid request')}")


@api.exception_handler(RequestError)
async def request_error(request: Request, exc: RequestError) -> JSONResponse:
    return error_response(request, exc.status, exc.message)


@api.exception_handler(Exception)
async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error")  # the traceback goes to the replica's log, never to the client
    return error_response(request, 500, f"internal error ({type(exc).__name__})")


class BatchedGenerator:
    """Stands in for an Inpainter's generator: each call (from a request's worker thread) joins a @serve.batch.

    The window logic stays :meth:`Inpainter.fill_array`'s; only the network call is pooled. A batch
    groups windows of the same shape and of the same model (a follow swap may land between two requests).
    """

    def __init__(self, server: "InpaintServer", generator):
        self.server, self.generator = server, generator

    def __call__(self, pixels, known):
        return asyncio.run_coroutine_threadsafe(self.server.generate((self.generator, pixels, known)),
                                                self.server.loop).result()


def run_batch(items: list) -> list:
    """The generator's output for each (generator, pixels, known), same-shape windows stacked into one call."""
    import torch

    groups: dict[tuple, list[int]] = {}
    for index, (generator, pixels, _) in enumerate(items):
        groups.setdefault((id(generator), tuple(pixels.shape)), []).append(index)
    results: list = [None] * len(items)
    with torch.no_grad():
        for indices in groups.values():
            generator = items[indices[0]][0]
            output = generator(torch.cat([items[i][1] for i in indices]), torch.cat([items[i][2] for i in indices]))
            for row, index in enumerate(indices):
                results[index] = output[row:row + 1]
    return results


# max_ongoing_requests: how many requests the router hands a replica; the replica's own Admission decides
# what runs, waits or gets 503 (benchmarks/RESULTS.md, "Serving"). max_queued_requests is the backstop for
# requests no replica takes; its 503 gets Retry-After too (backpressure_config), with Serve's plain-text body.
@serve.deployment(max_ongoing_requests=64, max_queued_requests=256, backpressure_config={"retry_after_s": RETRY_AFTER_S},
                  health_check_period_s=10, graceful_shutdown_timeout_s=60)
@serve.ingress(api)
class InpaintServer:
    """One replica: a model slot, the request service around it, and (with follow) the thread that moves it on."""

    def __init__(self, options: dict[str, Any]):
        import torch

        self.options = ServeOptions(**options)
        configure_replica()
        requests_log.setLevel(logging.INFO if self.options.log_requests else logging.WARNING)
        torch.set_num_threads(self.options.cpus)  # Ray sets OMP_NUM_THREADS from num_cpus; say it to torch too
        self.loop = None  # the replica's event loop, known from the first request (batching needs it)
        if self.options.batch > 1:
            self.generate.set_max_batch_size(self.options.batch)
        model = self.load(self.options.checkpoint)
        self.slot = ModelSlot(model)
        self.service = InpaintService(self.slot)
        self.admission = Admission(self.options.concurrency, self.options.queue)
        self._stop = threading.Event()
        if self.options.follow:
            self.follower = CheckpointFollower(
                run_folder_of(model.checkpoint_url), self.options.follow, model.checkpoint_url,
                load=self.load)
            threading.Thread(target=self._follow, name="follow", daemon=True).start()
        log.info("replica loaded %s", model.checkpoint_url)

    def load(self, url: str):
        """A checkpoint's model; with batching, a copy of its Inpainter whose generator calls join a batch."""
        model = load_model(url, self.options.device, self.options.max_pixels)
        if self.options.batch == 1:
            return model
        inpainter = copy.copy(model.inpainter)
        inpainter.generator = BatchedGenerator(self, model.inpainter.generator)
        return replace(model, inpainter=inpainter)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def generate(self, items: list) -> list:
        return await asyncio.to_thread(run_batch, items)

    def _follow(self) -> None:
        while not self._stop.wait(self.options.follow_interval_s):
            try:
                model = self.follower.poll()
            except Exception:  # one bad poll must not end following
                log.exception("follow: poll failed")
                continue
            if model is not None:
                old = self.slot.swap(model)
                log.info("follow: now serving %s (was %s)", model.checkpoint_url, old.checkpoint_url)

    def __del__(self):
        self._stop.set()

    @api.post(INPAINT_PATH, summary="Fill a hole", description=INPAINT_DOC, response_class=Response,
              openapi_extra={"requestBody": INPAINT_BODY},
              responses={200: {"content": {"image/png": {}, "image/jpeg": {}}, "description": "the completion"}})
    async def inpaint(self, request: Request) -> Response:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in ("multipart/form-data", "application/json"):
            raise RequestError(415, f"send multipart/form-data or application/json, not {content_type or 'nothing'}")
        self.admission.check()  # refuse a burst before reading its bodies, not after
        body = await read_body(request, self.options.max_body_bytes)
        if content_type == "application/json":
            fields = parse_json(body)
        else:
            fields = await parse_multipart(request.headers, body, self.options.max_body_bytes)
        del body
        self.loop = self.loop or asyncio.get_running_loop()
        async with self.admission:
            started = time.perf_counter()
            answer = await asyncio.to_thread(
                self.service.answer, fields["image"], fields["mask"],
                blend=fields.get("blend", True), output_format=fields.get("format", "png"))
        checkpoint = answer.checkpoint_url.rstrip("/").rsplit("/", 1)[-1]
        requests_log.info("POST %s 200: filled in %.0f ms by %s", INPAINT_PATH, 1000 * (time.perf_counter() - started),
                          checkpoint)
        return Response(answer.data, media_type=answer.content_type, headers={"X-Checkpoint": checkpoint})

    @api.get("/v1/model", summary="The model being served")
    async def model(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.service.model_info)  # reads metrics.json: maybe from S3

    @api.get("/healthz", summary="200 when this replica serves a model")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "checkpoint": self.slot.current.checkpoint_url}

    @api.get("/docs", include_in_schema=False)
    async def docs(self) -> HTMLResponse:
        return HTMLResponse(offline_docs(api.openapi()))

    @api.get("/", include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))


GPU_DEFAULTS = {"device": "cuda", "batch": 8, "concurrency": 8}  # not yet measured on a GPU (none lent): see RESULTS


def with_gpu_defaults(options: dict[str, Any]) -> dict[str, Any]:
    """A GPU replica batches same-size windows of up to 8 requests at once, unless told otherwise."""
    return {**GPU_DEFAULTS, **options}


def build_app(options: ServeOptions, *, replicas: int = 1, gpu: bool = False):
    """The bound application for ``serve.run``."""
    actor = {"num_gpus": 1, "num_cpus": options.cpus} if gpu else {"num_cpus": options.cpus}
    return InpaintServer.options(num_replicas=replicas, ray_actor_options=actor).bind(asdict(options))


def _flag(value: Any) -> bool:
    """A config file's true/false, or `serve run`'s key=value text."""
    return str(value).lower() in ("true", "1", "yes")


def app_builder(args: dict[str, Any]):
    """``serve run cluster.serve:app_builder key=value ...`` and a config file's ``args``: ServeOptions fields,
    plus ``replicas`` and ``gpu``; ``$VAR`` in ``checkpoint`` is expanded from the environment."""
    args = dict(args)
    if isinstance(args.get("checkpoint"), str):  # a RayService config names the bucket as $INPAINT_BUCKET
        args["checkpoint"] = os.path.expandvars(args["checkpoint"])
    replicas = int(args.pop("replicas", 1))
    gpu = _flag(args.pop("gpu", False))
    if "log_requests" in args:
        args["log_requests"] = _flag(args["log_requests"])
    if gpu:
        args = with_gpu_defaults(args)
    for name, kind in (("follow_interval_s", float), ("max_pixels", int), ("concurrency", int), ("queue", int),
                       ("max_body_bytes", int), ("cpus", int), ("batch", int)):
        if args.get(name) is not None:
            args[name] = kind(args[name])
    if args.get("follow") in ("", "none", "None"):
        args["follow"] = None
    return build_app(ServeOptions(**args), replicas=replicas, gpu=gpu)
