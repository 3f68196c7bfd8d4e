"""`create_app`: the HTTP API of `flava serve` (FastAPI) and its web page.

Endpoints (a refusal is JSON `{"error": message}` with a 4xx status; an internal error too, 500):

- `GET /` the search page (static/index.html); `GET /health` what is loaded.
- `GET /search?q=TEXT&k=N` text query; `POST /search` a multipart image (field `image`), or JSON
  `{"embedding": [...], "k": N}`, or JSON `{"position": i, "k": N}` (search by an indexed item).
  Answer: `{"results": [{"position", "item", "score", "metadata"}], "took_ms", "k", "query"}`.
- `POST /embed` JSON `{"texts": [...]}` or multipart images -> `{"embeddings", "dim", "took_ms"}`.
- `POST /classify` multipart image(s) + form fields `classes` (comma-separated), optional
  `templates` ('clip', 'short', or prompts separated by '|', each with one {}) and `top_k` ->
  `{"results": [{"classes": [{"label", "probability", "similarity"}]}], "templates", "took_ms"}`.
- `POST /predict` a fine-tuned task model: JSON `{"texts": [...], "texts2": [...]?, "top_k"}` or
  multipart images + optional `text` fields.
- `GET /items/{position}` the indexed image file at a position (only files the index records, not
  through a link, and only while PIL still reads an image there and its size and modification time
  are those embed recorded, its media type from the format read; a file streamed with
  FileResponse's ETag and Last-Modified, 304 to a conditional GET they match; an image inside a
  local tar shard, which the index records as `shard#offset`, too) or, for a text index,
  `{"position", "item"}`.
- `GET /metrics` Prometheus text format: `flava_requests_total{endpoint,method,status}` and a
  summary `flava_request_latency_ms{endpoint,quantile="0.5"|"0.99"}` with `_sum`, `_count` and
  `flava_request_latency_mean_ms`, and the gauge `flava_model_queue_waiting` (requests waiting for
  the model); `GET /metrics?format=json` the same figures as JSON.

The model and the index are called from Starlette's threadpool, never on the event loop. Model
calls run one at a time (one forward pass uses every core torch has; concurrent passes would only
fight over them) in arrival order, and long jobs are cut into short calls (a few class names'
prompts, one batch of images) that queue again after each, so a /classify of a thousand new
classes delays a /search by one short call, not by the whole job. A request that waits longer
than `queue_timeout` for the model is answered 503. Class-name embeddings are cached per
(templates, class name). FAISS searches run concurrently.

A client that disconnects before its request is read is counted with status 499 (no traceback);
a body that stalls for `body_timeout` seconds is answered 408 (headers have their own timeout:
`serve.http`). What stands around the endpoints (refusals, the model queue, metrics, the body
guard, JSON errors) is `serve.guard`; reading requests is `serve.requests`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from .. import __version__
from ..data.arrow import image_cell
from ..errors import FlavaError
from ..evaluate.zero_shot import class_embeddings, parse_templates
from ..retrieval.classify import ZeroShotClassifier, check_classes, split_list
from ..retrieval.embed import Embedder
from .guard import FORM_OVERHEAD, ApiError, Guard, Metrics, MiB, ModelQueue, add_error_handlers
from .requests import RequestParser

if TYPE_CHECKING:
    from ..model.flava import FlavaModel
    from ..retrieval.index import VectorIndex

T = TypeVar("T")
PROMPTS_PER_CALL = 64
"""Class-name prompts embedded per model call: the most another request waits behind /classify."""
CLASS_CACHE = 16_384
"""Class-name embeddings kept (per templates and name; a few KB each)."""


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
    metrics.gauges["model_queue_waiting"] = ("Requests waiting for the model.", lambda: queue.waiting)

    async def with_model(fn: Callable[..., T], *args) -> T:
        return await queue.call(fn, *args)

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

    add_error_handlers(app, max_upload_bytes + FORM_OVERHEAD, body_timeout)

    # ------------------------------------------------------------------ request parsing

    parser = RequestParser(max_k, max_batch, max_upload_bytes, default_k)
    check_k, kind, read_json, read_form = parser.check_k, parser.kind, parser.read_json, parser.read_form
    known, form_fields = parser.known, parser.form_fields
    form_images, form_k, string_list = parser.form_images, parser.form_k, parser.string_list

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
    async def health(request: Request):
        known(request, (), set(), "")  # `/health?verbose=1` answered as if read: refused, as elsewhere
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
    async def search_text(request: Request, q: str = "", k: int = default_k):
        start = time.perf_counter()
        known(request, (), set(), "", frozenset({"q", "k"}))
        if not q.strip():
            raise ApiError(400, "the query q is empty; give some text, e.g. /search?q=a+red+square")
        k = check_k(k)
        need_index()
        vectors = await with_model(need_model().texts, [q])
        return await search(vectors, k, {"type": "text", "text": q}, start)

    @app.post("/search")
    async def search_post(request: Request):
        start = time.perf_counter()
        # k from the body or form, else the query string (?k=N, as GET /search reads it)
        query_k = request.query_params.get("k")
        if kind(request) == "form":
            form = await read_form(request)
            known(request, form_fields(form), {"k"}, "the form", frozenset({"k"}))
            k = form_k(form) if form.get("k") not in (None, "") else \
                form_k({"k": query_k}) if query_k is not None else default_k
            need_index()
            need_model()
            images = await form_images(form)
            if len(images) != 1:
                raise ApiError(400, f"{len(images)} images uploaded; search with one image at a time")
            vectors = await images_of(images)
            return await search(vectors, k, {"type": "image"}, start)
        body = await read_json(request)
        known(request, body, {"k", "embedding", "position"}, "the JSON body", frozenset({"k"}))
        k = check_k(body["k"]) if "k" in body else form_k({"k": query_k}) if query_k is not None else default_k
        if "embedding" in body and "position" in body:  # one query each, as the CLI's --text or --image
            raise ApiError(400, 'give "embedding" or "position" in the JSON body, not both')
        if "embedding" in body:
            idx = need_index()
            vec = body["embedding"]
            if not isinstance(vec, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                    for v in vec):
                raise ApiError(400, '"embedding" must be a list of numbers')
            if len(vec) != idx.dim:
                raise ApiError(400, f'"embedding" has {len(vec)} numbers; this index needs {idx.dim}')
            # In float64: JSON numbers up to 1e308 are finite there, and float32 would make 1e300 infinite.
            try:
                wide = np.asarray([vec], dtype=np.float64)
            except OverflowError:  # a JSON integer past float64 (10**400)
                raise ApiError(400, '"embedding" holds a number too large for float64') from None
            if not np.isfinite(wide).all():
                raise ApiError(400, '"embedding" holds a non-finite number')
            if not wide.any():  # every item would score 0: a ranking of nothing
                raise ApiError(400, '"embedding" is all zeros; send a vector with a direction')
            # Scored as the index's own vectors are, by cosine: a longer vector scored past 1. Scaled by
            # its largest number first: float64's norm of 1e200s is infinite, of 1e-200s 0.
            wide /= np.abs(wide).max()
            vectors = (wide / np.linalg.norm(wide)).astype(np.float32)
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
            form = await read_form(request)
            known(request, form_fields(form), set(), "the form")
            images = await form_images(form)
            vectors, what = await images_of(images), "image"
        else:
            body = await read_json(request)
            known(request, body, {"texts", "text"}, "the JSON body")
            texts = string_list(body, "texts")
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
        known(request, form_fields(form), {"classes", "templates", "top_k"}, "the form")
        given = str(form.get("classes") or "")
        # The CLI's parser and checks (a file name is only a class name here: no server file is read).
        classes = split_list(given, "classes") if given.strip() else []
        if len(classes) < 2:
            raise ApiError(400, "give at least two class names in the form field 'classes', comma-separated")
        if len(classes) > max_classes:  # first: the checks below take time in proportion
            raise ApiError(400, f"{len(classes)} class names in one request; send at most {max_classes} (the "
                                "server's --max-classes)")
        check_classes(classes, model.processor.tokenizer)  # before any of their prompts is embedded
        templates = parse_templates(str(form.get("templates") or "clip"))
        if len(templates) > PROMPTS_PER_CALL:  # each class's prompts go in one model call
            raise ApiError(400, f"{len(templates)} templates in one request; send at most {PROMPTS_PER_CALL}")
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
            # "similarity", not "score": /predict's and the CLI's `score` is a probability.
            results.append({"classes": [{"label": classes[j], "probability": float(row_p[j]),
                                         "similarity": float(row_s[j])} for j in order]})
        return {"results": results, "templates": len(templates), "took_ms": _ms(start)}

    @app.post("/predict")
    async def predict(request: Request):
        start = time.perf_counter()
        tm = need_task()
        texts = texts2 = images = None
        if kind(request) == "form":
            form = await read_form(request)
            known(request, form_fields(form), {"text", "text2", "texts", "texts2", "top_k"}, "the form",
                  repeatable=frozenset({"text", "text2", "texts", "texts2"}))  # one text a field
            top_k = form.get("top_k") or 5
            # Either name, as the JSON body takes either.
            texts = [str(v) for k in ("text", "texts") for v in form.getlist(k) if str(v).strip()] or None
            texts2 = [str(v) for k in ("text2", "texts2") for v in form.getlist(k) if str(v).strip()] or None
            if any(isinstance(v, UploadFile) for _, v in form.multi_items()):
                images = await form_images(form)
        else:
            body = await read_json(request)
            known(request, body, {"texts", "texts2", "text", "text2", "top_k"}, "the JSON body")
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
    async def item(position: int, request: Request):
        known(request, (), set(), "")
        import os

        from ..data.shards import is_remote
        from ..data.tars import TAR_SUFFIXES

        idx = need_index()
        position = position_of(position)
        value = idx.item(position)
        if idx.modality != "image":
            return {"position": position, "item": value}
        path = Path(value)
        shard, hash_, offset = value.rpartition("#")
        if not path.is_file() and hash_ and offset.isascii() and offset.isdigit():  # an image inside a tar shard
            data, media = await run_in_threadpool(_shard_member, Path(shard), int(offset))
            return Response(data, media_type=media)
        cell = None if path.is_file() else image_cell(value)
        if cell is not None:  # an image's bytes in a parquet or Arrow file
            data, media = await run_in_threadpool(_cell_bytes, cell)
            return Response(data, media_type=media)
        if hash_ and not os.path.lexists(path) and (is_remote(shard) or shard.lower().endswith(TAR_SUFFIXES[1:])):
            raise ApiError(404, f"the indexed image {offset} is inside {shard}, a remote or compressed shard, whose "
                                "images are not served; embed from local plain .tar shards to serve them")
        if not os.path.lexists(path):  # anything else there (a link, a FIFO) is named by _file_image
            raise ApiError(404, f"the indexed file {path} no longer exists; rebuild the index")
        return await run_in_threadpool(_file_image, path, request.headers, idx.files([position])[0])

    @app.get("/metrics")
    async def metrics_endpoint(request: Request, format: str = "prometheus"):
        known(request, (), set(), "", frozenset({"format"}))
        if format == "json":
            return metrics.snapshot()
        if format != "prometheus":
            raise ApiError(400, f"format must be 'prometheus' or 'json'; got {format!r}")
        return PlainTextResponse(metrics.prometheus(), media_type="text/plain; version=0.0.4")

    app.add_middleware(Guard, max_body=max_upload_bytes + FORM_OVERHEAD, metrics=metrics, router=app.router,
                       body_timeout=body_timeout, limit=max_upload_bytes)
    return app


def _shard_member(shard: Path, offset: int) -> tuple[bytes, str]:
    """An indexed image inside a local tar shard (`flava embed` over shards) and the media type its
    bytes say."""
    from ..data.members import member_at

    if not shard.is_file():
        raise ApiError(404, f"the indexed shard {shard} is not a local file (moved, or a remote one): its images are "
                            "not served; rebuild the index from local shards")
    return _image_response(lambda: member_at(shard, offset), f"{shard}#{offset}")


def _cell_bytes(cell) -> tuple[bytes, str]:
    """An indexed image held in a parquet or Arrow file (`flava embed --pairs` over one)."""
    if not Path(cell.shard.path).is_file():
        raise ApiError(404, f"the indexed file {cell.shard.path} no longer exists; rebuild the index")
    return _image_response(cell.read_bytes, cell.locator())


def _file_image(path: Path, request_headers: Any, indexed: tuple[int, int] | None = None) -> Response:
    """An indexed image file while it still is one: what is at the path now may have been replaced
    (by a link to /etc/passwd, say), so its header is read from the very file whose bytes are then
    streamed (never read whole: a 75 MB TIFF eight times at once), with the validators Starlette's
    FileResponse sends, so a page's thumbnails are revalidated: 304 for a matching If-None-Match or
    If-Modified-Since. Range requests are not supported (the whole file is sent). `indexed`: the
    file's size and modification time (ns) when it was embedded, where the index knows them: a
    file saved over since is not the image its vector and score belong to, as `index --add` judges."""
    import errno
    import hashlib
    import os
    import stat
    from email.utils import formatdate

    from PIL import Image, UnidentifiedImageError
    from starlette.responses import StreamingResponse

    fd = f = None
    try:
        # Non-blocking: a FIFO put there meanwhile is no file to wait on. No link is followed: embed
        # records resolved paths, so a link there now (to another user's image) was put in its place.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kinds = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device",
                     stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}
            raise ValueError("not a regular file" + "".join(f": {k}" for is_, k in kinds.items() if is_(st.st_mode)))
        f = os.fdopen(fd, "rb")
        if indexed is not None and (st.st_size, st.st_mtime_ns) != indexed:
            raise _Changed()
        with Image.open(f) as im:  # the header only: nothing but an image is read whole
            media = _media_type(im.format)
        f.seek(0)
    except Exception as e:  # anything a missing or damaged file raises is this item's 404
        if f is not None:
            f.close()
        elif fd is not None:
            os.close(fd)
        if isinstance(e, FileNotFoundError):  # removed since the endpoint looked
            raise ApiError(404, f"the indexed file {path} no longer exists; rebuild the index") from None
        if isinstance(e, _Changed):
            raise ApiError(404, f"the indexed image {path} was changed since it was indexed (its size or "
                                "modification time differ): it is not the image its vector was made from; rebuild "
                                "the index") from None
        link = isinstance(e, OSError) and e.errno == errno.ELOOP and os.path.islink(path)
        why = "it is now a link" if link else "not an image" if isinstance(e, UnidentifiedImageError) else str(e)
        raise ApiError(404, f"the indexed image {path} cannot be read ({why}); rebuild the index") from None
    # Of the file opened, not of the path (which may change meanwhile); as FileResponse computes them.
    tag = hashlib.md5(f"{st.st_mtime}-{st.st_size}".encode(), usedforsecurity=False).hexdigest()
    validators = {"last-modified": formatdate(st.st_mtime, usegmt=True), "etag": f'"{tag}"'}
    if _not_modified(request_headers, validators["etag"], st.st_mtime):
        f.close()
        return Response(status_code=304, headers=validators)
    return StreamingResponse(_read_chunks(f, st.st_size), media_type=media,
                             headers={"content-length": str(st.st_size), **validators})


class _Changed(Exception):
    """An indexed file whose size or modification time is not the index's."""


def _read_chunks(f, size: int, chunk: int = 64 * 2**10):
    """The first `size` bytes of `f` (its size when opened: the Content-Length sent), then `f` closed,
    also when the client leaves early (the generator is closed)."""
    with f:
        while size > 0 and (data := f.read(min(chunk, size))):
            size -= len(data)
            yield data


def _not_modified(request_headers: Any, etag: str, mtime: float) -> bool:
    """Whether a GET's conditional headers match the file (RFC 9110 13.2.2: If-None-Match, compared
    weakly, decides alone when given; else If-Modified-Since, to the second Last-Modified shows)."""
    from email.utils import parsedate_to_datetime

    if (tags := request_headers.get("if-none-match")) is not None:
        given = {t.strip().removeprefix("W/") for t in tags.split(",")}
        return "*" in given or etag in given
    if (since := request_headers.get("if-modified-since")) is not None:
        try:
            return int(mtime) <= parsedate_to_datetime(since).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):  # not a date: ignored, as RFC 9110 says
            return False
    return False


def _media_type(format: str | None) -> str:
    """The media type of an image format PIL read (not of a file name's extension)."""
    from PIL import Image

    # A camera's JPEG with MPF data opens as MPO, which a browser would download, not show.
    return "image/jpeg" if format == "MPO" else Image.MIME.get(format or "", "application/octet-stream")


def _image_response(read: Callable[[], bytes], where: str) -> tuple[bytes, str]:
    """An image's bytes and the media type they say."""
    import io

    from PIL import Image

    try:
        data = read()
        with Image.open(io.BytesIO(data)) as im:
            media = _media_type(im.format)
        return data, media
    except Exception as e:  # anything a damaged member or image raises is this item's 404
        raise ApiError(404, f"the indexed image {where} cannot be read ({e}); rebuild the index") from None


def _class_embeddings(model, classes: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    return class_embeddings(model, classes, model.processor.tokenizer, templates)

