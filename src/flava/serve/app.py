"""`create_app`: the HTTP API of `flava serve` (FastAPI) and its web page.

Endpoints (a refusal is JSON `{"error": message}` with a 4xx status; an internal error too, 500):

- `GET /` the search page (static/index.html); `GET /health` what is loaded.
- `GET /search?q=TEXT&k=N` text query; `POST /search` a multipart image (field `image`), or JSON
  `{"embedding": [...], "k": N}`, or JSON `{"position": i, "k": N}` (search by an indexed item).
  Answer: `{"results": [{"position", "item", "score", "metadata"}], "took_ms", "k", "query"}`.
- `POST /embed` JSON `{"texts": [...]}` or multipart images -> `{"embeddings", "dim", "took_ms"}`.
- `POST /classify` multipart image(s) + form fields `classes` (comma-separated), optional
  `templates` ('clip', 'short', or prompts separated by '|', each with one {}) and `top_k`.
- `POST /predict` a fine-tuned task model: JSON `{"texts": [...], "texts2": [...]?, "top_k"}` or
  multipart images + optional `text` fields.
- `GET /items/{position}` the indexed image file at a position (only files the index records) or,
  for a text index, `{"position", "item"}`.
- `GET /metrics` Prometheus text format: `flava_requests_total{endpoint,method,status}` and a
  summary `flava_request_latency_ms{endpoint,quantile="0.5"|"0.99"}` with `_sum`, `_count` and
  `flava_request_latency_mean_ms`; `GET /metrics?format=json` the same figures as JSON.

The model and the index are called from Starlette's threadpool, never on the event loop. Model
calls run one at a time (one forward pass uses every core torch has; concurrent passes would only
fight over them) in arrival order, and long jobs are cut into short calls (a few class names'
prompts, one batch of images) that queue again after each, so a /classify of a thousand new
classes delays a /search by one short call, not by the whole job. A request that waits longer
than `queue_timeout` for the model is answered 503. Class-name embeddings are cached per
(templates, class name). FAISS searches run concurrently.

A client that disconnects before its request is read is counted with status 499 (no traceback);
a body that stalls for `body_timeout` seconds is answered 408 (headers have their own timeout:
`serve.http`).
"""

from __future__ import annotations

import asyncio
import io
import math
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
)
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import FlavaError
from ..evaluate.zero_shot import class_embeddings, parse_templates
from .classify import ZeroShotClassifier
from .embed import Embedder

if TYPE_CHECKING:
    from ..model.flava import FlavaModel
    from .index import VectorIndex

T = TypeVar("T")
MiB = 2**20
FORM_OVERHEAD = 64 * 1024
"""Bytes a multipart body may hold beyond its uploads (boundaries, headers, form fields)."""
LATENCY_WINDOW = 10_000
"""Latest requests per endpoint the latency quantiles are taken over."""
PROMPTS_PER_CALL = 64
"""Class-name prompts embedded per model call: the most another request waits behind /classify."""
CLASS_CACHE = 16_384
"""Class-name embeddings kept (per templates and name; a few KB each)."""
CLIENT_CLOSED = 499
"""The status counted for a request whose client went away before it was read (nginx's)."""


class ApiError(Exception):
    """A request the API refuses: its status and a one-line message naming the fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class _BodyTooLarge(Exception):
    pass


class _BodyTimeout(Exception):
    pass


class ModelQueue:
    """Model calls one at a time, first come first served; a caller that waits longer than
    `timeout` seconds gets 503 instead of waiting on."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._cond = threading.Condition()
        self._waiting: deque[object] = deque()
        self._busy = False

    def call(self, fn: Callable[..., T], *args) -> T:
        ticket = object()
        deadline = time.monotonic() + self.timeout
        with self._cond:
            self._waiting.append(ticket)
            while self._busy or self._waiting[0] is not ticket:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._waiting.remove(ticket)
                    self._cond.notify_all()
                    raise ApiError(503, f"the model is busy: this request waited {self.timeout:g} s for it; retry "
                                        "later")
                self._cond.wait(left)
            self._waiting.popleft()
            self._busy = True
        try:
            return fn(*args)
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()


class Metrics:
    """Request counts per (endpoint, method, status) and latencies per (endpoint, method)."""

    def __init__(self, window: int = LATENCY_WINDOW):
        self.lock = threading.Lock()
        self.window = window
        self.counts: Counter[tuple[str, str, int]] = Counter()
        self.recent: dict[tuple[str, str], deque[float]] = {}
        self.totals: dict[tuple[str, str], list[float]] = {}

    def observe(self, endpoint: str, method: str, status: int, ms: float) -> None:
        with self.lock:
            self.counts[endpoint, method, status] += 1
            key = (endpoint, method)
            self.recent.setdefault(key, deque(maxlen=self.window)).append(ms)
            total = self.totals.setdefault(key, [0, 0.0])
            total[0] += 1
            total[1] += ms

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            counts = sorted(self.counts.items())
            latency = {k: (list(v), *self.totals[k]) for k, v in sorted(self.recent.items())}
        out: dict[str, Any] = {"requests": [{"endpoint": e, "method": m, "status": s, "count": n}
                                            for (e, m, s), n in counts], "latency_ms": []}
        for (endpoint, method), (recent, count, total) in latency.items():
            p50, p99 = np.percentile(np.asarray(recent), [50, 99]) if recent else (0.0, 0.0)
            out["latency_ms"].append({"endpoint": endpoint, "method": method, "count": int(count),
                                      "mean": total / count, "p50": float(p50), "p99": float(p99),
                                      "sum": total})
        return out

    def prometheus(self) -> str:
        snap = self.snapshot()
        lines = ["# HELP flava_requests_total HTTP requests answered, by endpoint, method and status.",
                 "# TYPE flava_requests_total counter"]
        for r in snap["requests"]:
            lines.append(f'flava_requests_total{{endpoint="{r["endpoint"]}",method="{r["method"]}",'
                         f'status="{r["status"]}"}} {r["count"]}')
        lines += [f"# HELP flava_request_latency_ms Request latency in ms (quantiles of the latest {self.window}).",
                  "# TYPE flava_request_latency_ms summary"]
        for r in snap["latency_ms"]:
            labels = f'endpoint="{r["endpoint"]}",method="{r["method"]}"'
            lines.append(f'flava_request_latency_ms{{{labels},quantile="0.5"}} {r["p50"]:.3f}')
            lines.append(f'flava_request_latency_ms{{{labels},quantile="0.99"}} {r["p99"]:.3f}')
            lines.append(f"flava_request_latency_ms_sum{{{labels}}} {r['sum']:.3f}")
            lines.append(f"flava_request_latency_ms_count{{{labels}}} {r['count']}")
        lines += ["# HELP flava_request_latency_mean_ms Mean request latency in milliseconds since start.",
                  "# TYPE flava_request_latency_mean_ms gauge"]
        for r in snap["latency_ms"]:
            lines.append(f'flava_request_latency_mean_ms{{endpoint="{r["endpoint"]}",method="{r["method"]}"}} '
                         f'{r["mean"]:.3f}')
        return "\n".join(lines) + "\n"


class _Guard:
    """Outermost ASGI layer: refuses bodies over the limit (by Content-Length before reading, and
    by counting what arrives when there is none) and times every request for `Metrics`."""

    def __init__(self, app, max_body: int, metrics: Metrics, router, body_timeout: float):
        self.app, self.max_body, self.metrics, self.router = app, max_body, metrics, router
        self.body_timeout = body_timeout

    def endpoint(self, scope) -> str:
        route = scope.get("route")
        if route is None:  # refused before routing: find the route it was meant for
            from starlette.routing import Match

            route = next((r for r in self.router.routes if r.matches(scope)[0] != Match.NONE), None)
        return getattr(route, "path", None) or "unmatched"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        state = {"status": 500, "started": False, "received": 0}

        async def send_(message):
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
            await send(message)

        async def receive_():
            if state.get("body_done"):  # later receives wait for a disconnect: no timeout
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except asyncio.TimeoutError:
                raise _BodyTimeout from None
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_body:
                    raise _BodyTooLarge
                state["body_done"] = not message.get("more_body", False)
            return message

        too_large = _too_large(self.max_body)
        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                await too_large(scope, receive, send_)
            else:
                try:
                    await self.app(scope, receive_, send_)
                except _BodyTooLarge:
                    if state["started"]:
                        raise
                    await too_large(scope, receive, send_)
                except _BodyTimeout:
                    if state["started"]:
                        raise
                    await _body_timed_out(self.body_timeout)(scope, receive, send_)
        finally:
            self.metrics.observe(self.endpoint(scope), scope["method"], state["status"],
                                 (time.perf_counter() - start) * 1e3)


def _body_timed_out(seconds: float) -> JSONResponse:
    return JSONResponse({"error": f"the request body stalled for {seconds:g} s; send it at once"}, status_code=408,
                        headers={"Connection": "close"})


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"error": f"the request body is larger than the limit of {limit / MiB:.2f} MiB; send a "
                                  "smaller image or start the server with a larger --max-upload-mb"}, status_code=413)


class _LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


def _json_safe(value: Any) -> Any:
    """Numpy scalars and arrays to plain Python, recursively, for JSON answers."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1e3, 3)


def create_app(
    model: FlavaModel | None = None,
    index: VectorIndex | None = None,
    task: Any = None,
    *,
    model_name: str | None = None,
    max_upload_bytes: int = 10 * MiB,
    max_k: int = 1000,
    max_batch: int = 64,
    default_k: int = 12,
    batch_size: int = 32,
    max_classes: int = 1000,
    queue_timeout: float = 30.0,
    body_timeout: float = 30.0,
) -> FastAPI:
    """The API over a loaded model (`flava.load`), vector index (`VectorIndex.open`) and task
    model (`flava.load_task`); any may be None and the endpoints that need it answer 409.

    max_upload_bytes bounds each uploaded file and (with 64 KiB for the form around them) each
    request body; max_k bounds k; max_batch bounds the texts or images of one request; max_classes
    the class names of one /classify. A request waits at most queue_timeout seconds for the model
    (then 503), and a body that stalls for body_timeout seconds is answered 408.
    """
    if max_upload_bytes < 1 or max_k < 1 or max_batch < 1 or max_classes < 2:
        raise FlavaError("max_upload_bytes, max_k and max_batch must be at least 1, max_classes at least 2")
    if not (queue_timeout > 0 and body_timeout > 0):
        raise FlavaError("queue_timeout and body_timeout must be positive")
    embedder = Embedder(model, batch_size=batch_size) if model is not None else None
    if embedder is not None and index is not None and embedder.dim != index.dim:
        raise FlavaError(f"the model makes {embedder.dim}-dimensional embeddings but the index holds "
                         f"{index.dim}-dimensional ones; serve the index with the model that built it "
                         f"({index.model or 'not recorded'})")
    if model_name is None and model is not None:
        model_name = index.model if index is not None and index.model else type(model).__name__
    queue = ModelQueue(queue_timeout)
    class_cache = _LRU(max(CLASS_CACHE, max_classes))
    metrics = Metrics()

    app = FastAPI(title="flava serve", version=__version__,
                  description="Search, embed and classify with a FLAVA model.")
    app.state.metrics = metrics

    async def with_model(fn: Callable[..., T], *args) -> T:
        return await run_in_threadpool(queue.call, fn, *args)

    async def images_of(images: list) -> np.ndarray:
        """Image embeddings, one model call per batch (others may run between)."""
        parts = [await with_model(embedder.images, images[i:i + batch_size])
                 for i in range(0, len(images), batch_size)]
        return np.concatenate(parts)

    async def class_vectors(classes: list[str], templates: tuple[str, ...]) -> np.ndarray:
        """[C, D] from the cache, the missing ones a few prompts per model call."""
        found = {c: class_cache.get((templates, c)) for c in classes}
        missing = [c for c, v in found.items() if v is None]
        step = max(1, PROMPTS_PER_CALL // len(templates))
        for i in range(0, len(missing), step):
            part = missing[i:i + step]
            for c, v in zip(part, await with_model(_class_embeddings, model, part, templates)):
                found[c] = v
                class_cache.put((templates, c), v)
        return np.stack([found[c] for c in classes])

    # ------------------------------------------------------------------ errors

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse({"error": e.message}, status_code=e.status)

    @app.exception_handler(_BodyTooLarge)
    async def body_too_large(request: Request, e: _BodyTooLarge):
        return _too_large(max_upload_bytes + FORM_OVERHEAD)

    @app.exception_handler(_BodyTimeout)
    async def body_timed_out(request: Request, e: _BodyTimeout):
        return _body_timed_out(body_timeout)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, e: ClientDisconnect):
        # Nobody is there to read it; the status is what /metrics counts.
        return JSONResponse({"error": "the client disconnected before sending the whole request"},
                            status_code=CLIENT_CLOSED)

    @app.exception_handler(FlavaError)
    async def flava_error(request: Request, e: FlavaError):
        return JSONResponse({"error": str(e)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        parts = []
        for err in e.errors():
            where = " ".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body"))
            parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", "invalid"))
        return JSONResponse({"error": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        # Still JSON for the client; uvicorn logs the traceback.
        return JSONResponse({"error": f"internal error ({type(e).__name__}); see the server's log"}, status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = e.detail if isinstance(e.detail, str) else "request refused"
        if e.status_code == 404 and message == "Not Found":
            message = f"no endpoint {request.url.path}; see /docs for the API"
        return JSONResponse({"error": message}, status_code=e.status_code, headers=getattr(e, "headers", None))

    # ------------------------------------------------------------------ request parsing

    def need_model() -> Embedder:
        if embedder is None:
            raise ApiError(409, "no model is loaded; start flava serve with --model")
        return embedder

    def need_index() -> VectorIndex:
        if index is None:
            raise ApiError(409, "no index is loaded; start flava serve with --index")
        return index

    def need_task():
        if task is None:
            raise ApiError(409, "no task model is loaded; start flava serve with --task")
        return task

    def check_k(k: Any) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or int(k) != k:
            raise ApiError(422, f"k must be a whole number from 1 to {max_k}; got {k!r}")
        if not 1 <= k <= max_k:
            raise ApiError(422, f"k must lie between 1 and {max_k}; got {int(k)}")
        return int(k)

    def kind(request: Request) -> str:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            return "json"
        if ctype == "multipart/form-data":
            return "form"
        raise ApiError(415, f"send application/json or multipart/form-data, not {ctype or 'no content type'}")

    async def read_json(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError:  # malformed JSON or not UTF-8
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the JSON body must be an object, e.g. {\"texts\": [\"a dog\"]}")
        return body

    async def read_form(request: Request):
        try:
            return await request.form(max_files=max_batch, max_fields=64)
        except (_BodyTooLarge, _BodyTimeout, ClientDisconnect):
            raise
        except StarletteHTTPException as e:
            raise ApiError(400, f"the multipart form cannot be read: {e.detail}") from None

    async def form_images(form, what: str = "image") -> list[Image.Image]:
        uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not uploads:
            raise ApiError(400, f"no {what} in the form; upload one as a file field named 'image'")
        if len(uploads) > max_batch:
            raise ApiError(400, f"{len(uploads)} files in one request; send at most {max_batch}")
        raw = []
        for up in uploads:
            if up.size is not None and up.size > max_upload_bytes:
                raise ApiError(413, f"upload {up.filename!r} is {up.size / MiB:.2f} MiB, over the limit of "
                                    f"{max_upload_bytes / MiB:.2f} MiB; send a smaller image")
            data = await up.read(max_upload_bytes + 1)
            if len(data) > max_upload_bytes:
                raise ApiError(413, f"upload {up.filename!r} is over the limit of {max_upload_bytes / MiB:.2f} MiB; "
                                    "send a smaller image")
            raw.append((up.filename or "upload", data))
        return await run_in_threadpool(_decode_images, raw)

    def form_k(form) -> int:
        value = form.get("k")
        if value is None or value == "":
            return default_k
        try:
            return check_k(int(str(value)))
        except ValueError:
            raise ApiError(422, f"k must be a whole number from 1 to {max_k}; got {value!r}") from None

    def string_list(body: dict, key: str, required: bool = True) -> list[str] | None:
        value = body.get(key)
        if value is None and not required:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
            raise ApiError(400, f'"{key}" must be a non-empty list of strings')
        if len(value) > max_batch:
            raise ApiError(400, f'{len(value)} items in "{key}"; send at most {max_batch} per request')
        return value

    async def search(vectors: np.ndarray, k: int, query: dict, start: float) -> dict:
        idx = need_index()
        hits = await run_in_threadpool(idx.search, vectors, min(k, len(idx)))
        results = [{"position": int(h.position), "item": h.item, "score": float(h.score),
                    "metadata": _json_safe(h.metadata or {})} for h in hits[0]]
        return {"results": results, "k": k, "query": query, "took_ms": _ms(start)}

    def position_of(value: Any) -> int:
        idx = need_index()
        if isinstance(value, bool) or not isinstance(value, int):
            raise ApiError(422, f"position must be a whole number; got {value!r}")
        if not 0 <= value < len(idx):
            raise ApiError(404, f"no item at position {value}; the index holds positions 0 to {len(idx) - 1}")
        return value

    def vector_of(position: int) -> np.ndarray:
        """[1, D]: the item's stored vector (decoded, for a product-quantized index)."""
        return np.asarray(index.vector(position), dtype=np.float32).reshape(1, -1)

    # ------------------------------------------------------------------ endpoints

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(resources.files(__package__).joinpath("static/index.html").read_text("utf-8"))

    @app.get("/health")
    async def health():
        return {
            "status": "ok", "version": __version__, "model": model_name,
            "dim": embedder.dim if embedder is not None else None,
            "index": None if index is None else {"size": len(index), "dim": index.dim,
                                                 "modality": index.modality, "model": index.model},
            "task": None if task is None else {"task": task.task, "labels": len(task.label_names or [])},
            "max_k": max_k, "default_k": default_k, "max_upload_bytes": max_upload_bytes,
            "max_classes": max_classes,
        }

    @app.get("/search")
    async def search_text(q: str = "", k: int = default_k):
        start = time.perf_counter()
        if not q.strip():
            raise ApiError(400, "the query q is empty; give some text, e.g. /search?q=a+red+square")
        k = check_k(k)
        need_index()
        vectors = await with_model(need_model().texts, [q])
        return await search(vectors, k, {"type": "text", "text": q}, start)

    @app.post("/search")
    async def search_post(request: Request):
        start = time.perf_counter()
        if kind(request) == "form":
            form = await read_form(request)
            k = form_k(form)
            need_index()
            need_model()
            images = await form_images(form)
            if len(images) != 1:
                raise ApiError(400, f"{len(images)} images uploaded; search with one image at a time")
            vectors = await images_of(images)
            return await search(vectors, k, {"type": "image"}, start)
        body = await read_json(request)
        k = check_k(body.get("k", default_k))
        if "embedding" in body:
            idx = need_index()
            vec = body["embedding"]
            if not isinstance(vec, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                    for v in vec):
                raise ApiError(400, '"embedding" must be a list of numbers')
            if len(vec) != idx.dim:
                raise ApiError(400, f'"embedding" has {len(vec)} numbers; this index needs {idx.dim}')
            vectors = np.asarray([vec], dtype=np.float32)
            if not np.isfinite(vectors).all():
                raise ApiError(400, '"embedding" holds a non-finite number')
            return await search(vectors, k, {"type": "embedding"}, start)
        if "position" in body:
            position = position_of(body["position"])
            vectors = await run_in_threadpool(vector_of, position)
            return await search(vectors, k, {"type": "position", "position": position,
                                             "item": index.item(position)}, start)
        raise ApiError(400, 'give "embedding" or "position" in the JSON body, or upload an image as multipart')

    @app.post("/embed")
    async def embed(request: Request):
        start = time.perf_counter()
        emb = need_model()
        if kind(request) == "form":
            images = await form_images(await read_form(request))
            vectors, what = await images_of(images), "image"
        else:
            texts = string_list(await read_json(request), "texts")
            vectors, what = await with_model(emb.texts, texts), "text"
        return {"embeddings": vectors.tolist(), "dim": int(vectors.shape[1]), "modality": what,
                "model": model_name, "took_ms": _ms(start)}

    @app.post("/classify")
    async def classify(request: Request):
        start = time.perf_counter()
        need_model()
        if kind(request) != "form":
            raise ApiError(415, "send the image(s) and 'classes' as multipart/form-data")
        form = await read_form(request)
        classes = [c.strip() for c in str(form.get("classes") or "").split(",") if c.strip()]
        if len(classes) < 2:
            raise ApiError(400, "give at least two class names in the form field 'classes', comma-separated")
        if len(set(classes)) != len(classes):
            raise ApiError(400, "the class names in 'classes' repeat; give each once")
        if len(classes) > max_classes:
            raise ApiError(400, f"{len(classes)} class names in one request; send at most {max_classes} (the "
                                "server's --max-classes)")
        templates = parse_templates(str(form.get("templates") or "clip"))
        top_k = form.get("top_k")
        try:
            top_k = min(len(classes), int(str(top_k))) if top_k not in (None, "") else min(5, len(classes))
        except ValueError:
            raise ApiError(422, f"top_k must be a whole number; got {top_k!r}") from None
        if top_k < 1:
            raise ApiError(422, "top_k must be at least 1")
        images = await form_images(form)
        # Class embeddings a few prompts per model call (cached), so other requests interleave.
        classifier = ZeroShotClassifier(model, classes, templates, batch_size,
                                        class_vectors=await class_vectors(classes, templates))
        image_emb = await images_of(images)
        scores = classifier.scores(image_emb)
        probs = classifier.probabilities(image_emb, scores)
        results = []
        for row_p, row_s in zip(probs, scores):
            order = np.argsort(-row_p, kind="stable")[:top_k]
            results.append({"classes": [{"label": classes[j], "probability": float(row_p[j]),
                                         "score": float(row_s[j])} for j in order]})
        return {"results": results, "templates": len(templates), "took_ms": _ms(start)}

    @app.post("/predict")
    async def predict(request: Request):
        start = time.perf_counter()
        tm = need_task()
        texts = texts2 = images = None
        if kind(request) == "form":
            form = await read_form(request)
            top_k = form.get("top_k") or 5
            texts = [str(v) for v in form.getlist("text") if str(v).strip()] or None
            texts2 = [str(v) for v in form.getlist("text2") if str(v).strip()] or None
            if any(isinstance(v, UploadFile) for _, v in form.multi_items()):
                images = await form_images(form)
        else:
            body = await read_json(request)
            texts = string_list(body, "texts", required=False)
            texts2 = string_list(body, "texts2", required=False)
            top_k = body.get("top_k", 5)
        try:
            top_k = int(str(top_k))
        except ValueError:
            raise ApiError(422, f"top_k must be a whole number; got {top_k!r}") from None
        if texts is None and images is None:
            raise ApiError(400, 'give "texts" (JSON) or images (multipart) to predict on')
        preds = await with_model(lambda: tm.predict(texts=texts, images=images, texts2=texts2, top_k=top_k))
        return {"predictions": _json_safe(preds), "task": tm.task, "took_ms": _ms(start)}

    @app.get("/items/{position}")
    async def item(position: int):
        idx = need_index()
        position = position_of(position)
        value = idx.item(position)
        if idx.modality != "image":
            return {"position": position, "item": value}
        path = Path(value)
        if not path.is_file():
            raise ApiError(404, f"the indexed file {path} no longer exists; rebuild the index")
        return FileResponse(path)

    @app.get("/metrics")
    async def metrics_endpoint(format: str = "prometheus"):
        if format == "json":
            return metrics.snapshot()
        if format != "prometheus":
            raise ApiError(400, f"format must be 'prometheus' or 'json'; got {format!r}")
        return PlainTextResponse(metrics.prometheus(), media_type="text/plain; version=0.0.4")

    app.add_middleware(_Guard, max_body=max_upload_bytes + FORM_OVERHEAD, metrics=metrics, router=app.router,
                       body_timeout=body_timeout)
    return app


def _class_embeddings(model, classes: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    return class_embeddings(model, classes, model.processor.tokenizer, templates)


def _decode_images(raw: list[tuple[str, bytes]]) -> list[Image.Image]:
    """Decoded RGB images; 415 names an upload that is not an image, 413 one with too many pixels."""
    images = []
    for name, data in raw:
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                images.append(im.convert("RGB"))
        except Image.DecompressionBombError:
            raise ApiError(413, f"upload {name!r} has too many pixels to decode safely; send a smaller image") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise ApiError(415, f"upload {name!r} is not an image that can be read (PNG, JPEG, WebP, ...)") from None
    return images
