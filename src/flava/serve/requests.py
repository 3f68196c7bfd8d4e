"""Reading requests for the API: the content type, JSON bodies, multipart forms and their uploaded
images (decoded in a thread as the CLI decodes files, refused by size, pixel count and shape), k,
and lists of strings; each refusal an `ApiError` that names the fix."""

from __future__ import annotations

import difflib
import io
import json
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..data.decode import MAX_IMAGE_PIXELS, open_image
from ..data.members import BadSample
from ..data.transforms import MAX_ASPECT_RATIO
from .guard import ApiError, BodyTimeout, BodyTooLarge, MiB


@dataclass(frozen=True)
class RequestParser:
    """The server's limits, applied while reading a request."""

    max_k: int
    max_batch: int
    max_upload_bytes: int
    default_k: int

    def check_k(self, k: Any) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or int(k) != k:
            raise ApiError(422, f"k must be a whole number from 1 to {self.max_k}; got {k!r}")
        if not 1 <= k <= self.max_k:
            raise ApiError(422, f"k must lie between 1 and {self.max_k}; got {int(k)}")
        return int(k)

    @staticmethod
    def known(request: Request, given, allowed: set[str], where: str, query: frozenset[str] = frozenset(),
              repeatable: frozenset[str] = frozenset()) -> None:
        """400 naming a field of `given` (a JSON body's keys or a form's text fields) that `allowed`
        lacks, or a query parameter outside `query`: a misspelt `kk` or `topk` was dropped and
        answered with the defaults. Likewise a field or parameter given twice, unless `repeatable`:
        all but the last were dropped."""
        for name in given:
            if name not in allowed:
                _unknown(name, allowed, where)
        for name in request.query_params:
            if name not in query:
                _unknown(name, query, "the query string")
        query_names = [n for n, _ in request.query_params.multi_items()]
        for names, in_ in ((list(given), where), (query_names, "the query string")):
            counts = Counter(names)
            twice = next((n for n, c in counts.items() if c > 1 and n not in repeatable), None)
            if twice is not None:
                raise ApiError(400, f"{twice!r} is given {counts[twice]} times in {in_}; give it once")

    @staticmethod
    def form_fields(form) -> list[str]:
        """The names of a form's text fields (uploaded files may have any name)."""
        return [n for n, v in form.multi_items() if not isinstance(v, UploadFile)]

    def kind(self, request: Request) -> str:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            return "json"
        if ctype == "multipart/form-data":
            return "form"
        raise ApiError(415, f"send application/json or multipart/form-data, not {ctype or 'no content type'}")

    async def read_json(self, request: Request) -> dict:
        objects: list[list[tuple]] = []  # each object's keys as sent, the outermost last: json keeps a key's last value

        def keep(pairs: list[tuple]) -> dict:
            objects.append(pairs)
            return dict(pairs)

        try:
            body = json.loads(await request.body(), object_pairs_hook=keep)
        except ValueError:  # malformed JSON or not UTF-8
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the JSON body must be an object, e.g. {\"texts\": [\"a dog\"]}")
        counts = Counter(k for k, _ in objects[-1])
        twice = next((k for k, c in counts.items() if c > 1), None)
        if twice is not None:
            raise ApiError(400, f"{twice!r} is given {counts[twice]} times in the JSON body; give it once")
        return body

    async def read_form(self, request: Request):
        try:
            return await request.form(max_files=self.max_batch, max_fields=64)
        except (BodyTooLarge, BodyTimeout, ClientDisconnect):
            raise
        except StarletteHTTPException as e:
            raise ApiError(400, f"the multipart form cannot be read: {e.detail}") from None

    async def form_images(self, form, what: str = "image") -> list[Image.Image]:
        uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not uploads:
            raise ApiError(400, f"no {what} in the form; upload one as a file field named 'image'")
        if len(uploads) > self.max_batch:
            raise ApiError(400, f"{len(uploads)} files in one request; send at most {self.max_batch}")
        raw = []
        for up in uploads:
            if up.size is not None and up.size > self.max_upload_bytes:
                raise ApiError(413, f"upload {up.filename!r} is {up.size / MiB:.2f} MiB, over the limit of "
                                    f"{self.max_upload_bytes / MiB:.2f} MiB; send a smaller image")
            data = await up.read(self.max_upload_bytes + 1)
            if len(data) > self.max_upload_bytes:
                raise ApiError(413, f"upload {up.filename!r} is over the limit of "
                                    f"{self.max_upload_bytes / MiB:.2f} MiB; send a smaller image")
            raw.append((up.filename or "upload", data))
        return await run_in_threadpool(decode_images, raw)

    def form_k(self, form) -> int:
        value = form.get("k")
        if value is None or value == "":
            return self.default_k
        try:
            return self.check_k(int(str(value)))
        except ValueError:
            raise ApiError(422, f"k must be a whole number from 1 to {self.max_k}; got {value!r}") from None

    def string_list(self, body: dict, key: str, required: bool = True) -> list[str] | None:
        """`key`'s list of strings; the singular name (`text` for `texts`) is taken for it too, as
        the forms name their fields."""
        singular = {"texts": "text", "texts2": "text2"}.get(key, key)
        if singular != key and singular in body:
            if key in body:
                raise ApiError(400, f'give "{key}" or "{singular}", not both')
            key = singular
        value = body.get(key)
        if value is None and not required:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
            raise ApiError(400, f'"{key}" must be a non-empty list of strings')
        if len(value) > self.max_batch:
            raise ApiError(400, f'{len(value)} items in "{key}"; send at most {self.max_batch} per request')
        blank = [i for i, t in enumerate(value) if not t.strip()]
        if blank:  # `flava embed` leaves empty texts out; a request gets told instead of a vector of nothing
            raise ApiError(400, f'"{key}"[{blank[0]}] is empty' + (f" (and {len(blank) - 1} more)" if len(blank) > 1
                                                                   else "") + "; send texts with words in them")
        return value


def decode_images(raw: list[tuple[str, bytes]]) -> list[Image.Image]:
    """RGB images decoded as the CLI decodes files (`open_image`: the same pixels, e.g. 16-bit PNGs
    scaled, not clipped, and the same size guards); each refusal names the upload."""
    images = []
    for name, data in raw:
        try:
            images.append(open_image(data))
        except BadSample as e:
            raise _refusal(name, data, e.kind) from None
    return images


def _refusal(name: str, data: bytes, kind: str) -> ApiError:
    if kind == "image too large":
        return ApiError(413, f"upload {name!r} has more than {MAX_IMAGE_PIXELS:,} pixels (a JPEG: 64 times that), "
                             "too many to decode safely; send a smaller image")
    if kind == "extreme aspect ratio":
        with Image.open(io.BytesIO(data)) as im:  # only its header: `open_image` checks the size before decoding
            size = f"{im.width}x{im.height}"
        return ApiError(400, f"upload {name!r} is {size} pixels, one side over {MAX_ASPECT_RATIO} times the other; "
                             "crop it closer to square")
    return ApiError(415, f"upload {name!r} is not an image that can be read (PNG, JPEG, WebP, ...)")


def _unknown(name: str, allowed: set[str], where: str) -> None:
    close = difflib.get_close_matches(name, sorted(allowed), n=1)
    raise ApiError(400, f"unknown field {name!r} in {where}" + (f"; did you mean {close[0]!r}?" if close else
                        f"; this endpoint reads {', '.join(sorted(allowed)) or 'none'}"))
