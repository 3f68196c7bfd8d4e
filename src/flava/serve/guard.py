"""What stands around the endpoints of `flava serve`: refusals (`ApiError`), the queue that runs
model calls one at a time in arrival order, request metrics (Prometheus text and JSON), the outermost
ASGI layer that bounds and times request bodies, and the handlers that answer every error as JSON
`{"error": message}`."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..errors import FlavaError

T = TypeVar("T")
MiB = 2**20
FORM_OVERHEAD = 64 * 1024
"""Bytes a multipart body may hold beyond its uploads (boundaries, headers, form fields)."""
LATENCY_WINDOW = 10_000
"""Latest requests per endpoint the latency quantiles are taken over."""
CLIENT_CLOSED = 499
"""The status counted for a request whose client went away before it was answered (nginx's)."""


class ApiError(Exception):
    """A request the API refuses: its status and a one-line message naming the fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    pass


CLIENT_LEFT: contextvars.ContextVar[Callable[[], Awaitable[None]]] = contextvars.ContextVar("client_left")
"""Set by `Guard` for each request: a coroutine that returns when its client disconnects."""


class ClientGone(Exception):
    """The client of the request went away while it waited for the model."""


class ModelQueue:
    """Model calls one at a time, first come first served, each in a worker thread. Callers wait
    on the event loop, holding no thread: waiting threads filled the worker pool (40), so index
    searches waited behind model calls and callers beyond 40 waited with no deadline. A caller
    that waits longer than `timeout` seconds gets 503; one cancelled while it waits, or whose
    client disconnects (`CLIENT_LEFT`: uvicorn does not cancel such a request), gives up its place.
    A call whose caller went away after it started runs to its end before the next starts (its
    thread cannot be stopped)."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._waiting: deque[asyncio.Future] = deque()
        self._busy = False

    async def call(self, fn: Callable[..., T], *args) -> T:
        from starlette.concurrency import run_in_threadpool

        if self._busy or self._waiting:
            await self._turn(CLIENT_LEFT.get(None))
        else:
            self._busy = True
        # Nothing is awaited between the turn and the work: the model cannot be left held.
        work = asyncio.ensure_future(run_in_threadpool(fn, *args))
        work.add_done_callback(self._done)
        return await asyncio.shield(work)

    async def _turn(self, left: Callable[[], Awaitable[None]] | None) -> None:
        loop = asyncio.get_running_loop()
        turn = loop.create_future()
        self._waiting.append(turn)
        expiry = loop.call_later(self.timeout, self._expire, turn)
        # One listener a waiter, blocked in its receive: costs nothing until the client leaves.
        listener = asyncio.ensure_future(left()) if left is not None else None
        try:
            await asyncio.wait([turn, *([listener] if listener else [])], return_when=asyncio.FIRST_COMPLETED)
            if not turn.done() and not listener.cancelled() and listener.exception() is None:
                raise ClientGone
            await turn  # (a listener that failed cannot tell: wait as before) the 503 past the deadline
        except BaseException:
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self._release()  # handed the model just as the caller went away: pass it on
            elif turn in self._waiting:
                self._waiting.remove(turn)
            raise
        finally:
            expiry.cancel()
            if listener is not None:
                listener.cancel()  # a receive cancelled while it waits consumes nothing

    @property
    def waiting(self) -> int:
        """Callers waiting for the model (not the one it is running for)."""
        return len(self._waiting)

    def _expire(self, turn: asyncio.Future) -> None:
        if not turn.done():
            self._waiting.remove(turn)
            turn.set_exception(ApiError(503, f"the model is busy: this request waited {self.timeout:g} s for it; "
                                             "retry later"))

    def _done(self, work: asyncio.Future) -> None:
        if not work.cancelled():
            work.exception()  # read here: a caller that went away never reads it
        self._release()

    def _release(self) -> None:
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)  # the model passes to this caller: still busy
                return
        self._busy = False


class Metrics:
    """Request counts per (endpoint, method, status) and latencies per (endpoint, method)."""

    def __init__(self, window: int = LATENCY_WINDOW):
        self.lock = threading.Lock()
        self.window = window
        self.counts: Counter[tuple[str, str, int]] = Counter()
        self.recent: dict[tuple[str, str], deque[float]] = {}
        self.totals: dict[tuple[str, str], list[float]] = {}
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        """name: (help, read), values read when asked (e.g. the model queue's length)."""

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
                                            for (e, m, s), n in counts], "latency_ms": [],
                               **{name: read() for name, (_, read) in self.gauges.items()}}
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
        for name, (help_, _) in self.gauges.items():
            lines += [f"# HELP flava_{name} {help_}", f"# TYPE flava_{name} gauge", f"flava_{name} {snap[name]:g}"]
        return "\n".join(lines) + "\n"


class Guard:
    """Outermost ASGI layer: refuses bodies over the limit (by Content-Length before reading, and
    by counting what arrives when there is none) and times every request for `Metrics`."""

    def __init__(self, app, max_body: int, metrics: Metrics, router, body_timeout: float, limit: int | None = None):
        """`max_body` is what a body may hold (an upload and its form's framing); `limit`, the
        upload limit the user set, is what a refusal names (default `max_body`)."""
        self.app, self.max_body, self.metrics, self.router = app, max_body, metrics, router
        self.body_timeout, self.limit = body_timeout, limit if limit is not None else max_body

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
                raise BodyTimeout from None
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_body:
                    raise BodyTooLarge
                state["body_done"] = not message.get("more_body", False)
            return message

        async def left() -> None:
            """Returns when the client disconnects. Receives only once the body is read (a
            receive before would take a part of it) or for a GET, whose empty body no endpoint
            reads; otherwise it cannot tell, and never returns."""
            if not state.get("body_done") and scope["method"] not in ("GET", "HEAD"):
                await asyncio.Future()
            while (await receive())["type"] != "http.disconnect":
                pass

        CLIENT_LEFT.set(left)
        too_large = too_large_response(self.limit)
        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                await too_large(scope, receive, send_)
            else:
                try:
                    await self.app(scope, receive_, send_)
                except BodyTooLarge:
                    if state["started"]:
                        raise
                    await too_large(scope, receive, send_)
                except BodyTimeout:
                    if state["started"]:
                        raise
                    await body_stalled_response(self.body_timeout)(scope, receive, send_)
        finally:
            self.metrics.observe(self.endpoint(scope), scope["method"], state["status"],
                                 (time.perf_counter() - start) * 1e3)


def body_stalled_response(seconds: float) -> JSONResponse:
    return JSONResponse({"error": f"the request body stalled for {seconds:g} s; send it at once"}, status_code=408,
                        headers={"Connection": "close"})


def too_large_response(limit: int) -> JSONResponse:
    return JSONResponse({"error": f"the request body is larger than the limit of {limit / MiB:.2f} MiB; send a "
                                  "smaller image or start the server with a larger --max-upload-mb"}, status_code=413)


def add_error_handlers(app: FastAPI, max_body: int, body_timeout: float) -> None:
    """Every refusal and failure answered as JSON `{"error": message}` with its status."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse({"error": e.message}, status_code=e.status)

    @app.exception_handler(BodyTooLarge)
    async def on_body_too_large(request: Request, e: BodyTooLarge):
        return too_large_response(max_body)

    @app.exception_handler(BodyTimeout)
    async def on_body_timeout(request: Request, e: BodyTimeout):
        return body_stalled_response(body_timeout)

    @app.exception_handler(ClientGone)
    async def client_left(request: Request, e: ClientGone):
        return JSONResponse({"error": "the client disconnected while the request waited for the model"},
                            status_code=CLIENT_CLOSED)

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
