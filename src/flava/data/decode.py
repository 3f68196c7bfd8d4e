"""Decoding images for training and inference: JPEGs by libjpeg-turbo (through simplejpeg) at the
smallest fast DCT scale a crop needs, other formats through Pillow; the guards against images too
large or too thin to decode; a crop chosen from the stored size, cut and resized in one call.

An image read from a file or bytes is turned upright as its EXIF orientation says (a phone's
photographs are stored sideways with the tag; viewers, browsers, OpenCV and transformers'
`load_image` show them upright), so sizes and crop boxes here are the upright image's. An
in-memory PIL image is used as it is: its pixels may have been turned already."""

from __future__ import annotations

import io
import math
import os
import stat
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .members import BadSample, Blob, ImageRef, ImageURL, Member, TarMember
from .transforms import crop_resize, extreme_aspect, to_rgb

MISSING_IMAGE = "missing image file"
MAX_IMAGE_PIXELS = 40_000_000
"""Images with more pixels are refused before decoding (a 13000x13000 PNG decodes to 1 GB); a JPEG
is decoded at the largest of libjpeg's 1/2, 1/4 and 1/8 scales within it (`jpeg_within_limit`)."""


def _image_bytes(ref: Path | Member) -> bytes:
    if isinstance(ref, (TarMember, Blob, ImageURL)):
        data = ref.read()
    elif not isinstance(ref, (str, os.PathLike)):  # a parquet cell and the like: read as it reads itself
        if not ref.exists():
            raise BadSample(ref.missing() if hasattr(ref, "missing") else MISSING_IMAGE)
        try:
            data = ref.read_bytes()
        except OSError:
            raise BadSample("unreadable image") from None
    else:
        # Opened without waiting: a FIFO named as an image (or found in a folder, through a link)
        # would wait for a writer for ever, and the run with it.
        try:
            fd = os.open(ref, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:  # a dangling link too
            raise BadSample("missing image file") from None
        except OSError:
            raise BadSample("unreadable image") from None
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise BadSample("image path is a folder" if stat.S_ISDIR(mode) else "not a regular file")
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read()
        except OSError:
            raise BadSample("unreadable image") from None
        finally:
            os.close(fd)
    if not data:
        raise BadSample("empty image file")
    return data


def jpeg_within_limit(width: int, height: int) -> tuple[int, int] | None:
    """For a JPEG of more than MAX_IMAGE_PIXELS (a 48-108 MP phone photograph): the size of its
    largest DCT-domain scale (1/2, 1/4, 1/8) within them, which libjpeg decodes without the whole
    image's memory; None when even 1/8 is larger, or when the image needs no scaling."""
    if width * height <= MAX_IMAGE_PIXELS:
        return None
    for n in (4, 2, 1):  # eighths
        w, h = math.ceil(width * n / 8), math.ceil(height * n / 8)
        if w * h <= MAX_IMAGE_PIXELS:
            return w, h
    return None


def _capped(least: tuple[int, int], cap: tuple[int, int] | None) -> tuple[int, int]:
    """A decode request (`least`) no larger than `cap` in either side."""
    return least if cap is None else (min(least[0], cap[0]), min(least[1], cap[1]))


def check_size(width: int, height: int) -> None:
    """BadSample for an image too large to decode or too thin to resize."""
    if width * height > MAX_IMAGE_PIXELS:
        raise BadSample("image too large")
    if extreme_aspect(width, height):
        raise BadSample("extreme aspect ratio")


ORIENTATION = 0x0112
"""The EXIF tag of how the stored pixels are to be shown: 1 as stored; 2-8 flipped or turned."""


def _orientation(read_exif: Callable[[], Image.Exif]) -> int:
    """The orientation in the EXIF `read_exif()` gives; 1 where it has none, or where the EXIF is
    damaged (an image shown as stored, not a lost one; Pillow's warnings about it kept quiet)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = read_exif().get(ORIENTATION, 1)
    except Exception:  # Pillow raises what its TIFF parser meets
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def jpeg_orientation(data: bytes) -> int:
    """JPEG bytes' orientation by Pillow's rule (EXIF's tag, else XMP's `tiff:Orientation`), as
    the PIL path reads it: the segments before the image data are walked by their headers
    (microseconds; the data itself is never scanned), and Pillow reads the EXIF where there is
    one, or the whole header where XMP may say it."""
    i, end, exif, xmp = 2, len(data), None, False
    while i + 4 <= end and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # a fill byte before the marker
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # the image data starts (or ends): EXIF and XMP come before it
            break
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xE1 and data[i + 4:i + 10] == b"Exif\x00\x00" and exif is None:
            exif = data[i + 4:i + 2 + length]
        elif marker == 0xE1 and data[i + 4:i + 33] == b"http://ns.adobe.com/xap/1.0/\x00":
            xmp = True
        i += 2 + length
    if xmp:
        def read() -> Image.Exif:
            with Image.open(io.BytesIO(data)) as im:
                return im.getexif()
        return _orientation(read)
    if exif is not None:
        def parse() -> Image.Exif:
            parsed = Image.Exif()
            parsed.load(exif)
            return parsed
        return _orientation(parse)
    return 1


def upright(array: np.ndarray, orientation: int) -> np.ndarray:
    """[H, W, C] pixels as EXIF `orientation` says they are shown (Pillow's `exif_transpose`),
    contiguous (torch takes no negative strides)."""
    turned = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
              5: lambda a: a.swapaxes(0, 1), 6: lambda a: a.swapaxes(0, 1)[:, ::-1],
              7: lambda a: a[::-1, ::-1].swapaxes(0, 1), 8: lambda a: a.swapaxes(0, 1)[::-1]}.get(orientation)
    # A copy, not ascontiguousarray: that keeps a negative stride on an axis of one pixel.
    return array if turned is None else turned(array).copy()


def _upright_draft(draft: Callable[[int, int], tuple[int, int]], orientation: int
                   ) -> Callable[[int, int], tuple[int, int]]:
    """`draft`, which sizes the upright image, asked of the stored one (turned a quarter, its
    width and height swap)."""
    if orientation < 5:
        return draft

    def stored(width: int, height: int) -> tuple[int, int]:
        w, h = draft(height, width)
        return h, w
    return stored


def open_image(ref: ImageRef | bytes, draft: Callable[[int, int], tuple[int, int]] | None = None) -> Image.Image:
    """Decode to RGB, upright, or raise BadSample with the reason. `draft` maps the upright image's
    (width, height) to the smallest size worth decoding: a JPEG is then decoded at 1/2, 1/4 or 1/8
    scale in the DCT domain where that still covers it (libjpeg's scaled decoding, through PIL's
    draft mode)."""
    if isinstance(ref, Image.Image):
        check_size(*ref.size)
        return to_rgb(ref)
    try:
        data = ref if isinstance(ref, bytes) else _image_bytes(ref)
        if _large_jpeg(data):  # past PIL's own bomb limit too (89 MP): libjpeg-turbo at a DCT scale within ours
            array = _libjpeg(data, draft)
            if array is not None:
                return Image.fromarray(array)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Damaged EXIF leaves the image as stored (`_orientation`): nothing to warn about.
            warnings.filterwarnings("ignore", "Corrupt EXIF data", UserWarning)
            with Image.open(io.BytesIO(data)) as im:
                cap = jpeg_within_limit(im.width, im.height) if im.format == "JPEG" else None
                check_size(*(cap or im.size))
                orientation = _orientation(im.getexif)
                if draft is not None or cap is not None:
                    least = _upright_draft(draft, orientation)(im.width, im.height) if draft is not None else im.size
                    # PIL scales by whole sides (size // request): a cap rounded up would keep the whole image.
                    floor = None if cap is None else (im.width // math.ceil(im.width / cap[0]),
                                                      im.height // math.ceil(im.height / cap[1]))
                    im.draft("RGB", _capped(least, floor))
                im.load()
                return to_rgb(im if orientation == 1 else ImageOps.exif_transpose(im))
    except BadSample:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise BadSample("image too large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, MemoryError):
        raise BadSample("unreadable image") from None


def decode(ref: ImageRef, draft: Callable[[int, int], tuple[int, int]] | None = None, memo: dict | None = None
           ) -> np.ndarray | Image.Image:
    """The image as `decode_rgb` decodes it, in the form its decoder gives: a [H, W, 3] uint8 array
    from libjpeg-turbo, or an RGB PIL image (other formats, and JPEGs libjpeg-turbo does not read).
    `memo`, a dict kept for one image across calls, holds libjpeg-turbo's decodes by scale: crops
    of one image needing one scale decode it once (the array shared: its users only read it)."""
    if isinstance(ref, Image.Image):
        return open_image(ref)
    data = _image_bytes(ref)
    array = _libjpeg(data, draft, memo)
    return array if array is not None else open_image(data, draft)


def _large_jpeg(data: bytes) -> bool:
    """Whether `data` is a JPEG whose header names more than MAX_IMAGE_PIXELS."""
    if data[:2] != b"\xff\xd8":
        return False
    import simplejpeg

    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return False
    return width * height > MAX_IMAGE_PIXELS


def _libjpeg(data: bytes, draft: Callable[[int, int], tuple[int, int]] | None = None, memo: dict | None = None
             ) -> np.ndarray | None:
    """[H, W, 3] uint8, upright: JPEG bytes libjpeg-turbo reads (YCbCr, grey or RGB), at the smallest
    fast scale `draft` allows and at most `jpeg_within_limit`'s; None for other bytes (PIL's then)."""
    if data[:2] != b"\xff\xd8":
        return None
    import simplejpeg

    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None  # PIL says what is wrong with it
    if colorspace not in ("YCbCr", "Gray", "RGB"):
        return None
    cap = jpeg_within_limit(width, height)
    check_size(*(cap or (width, height)))
    orientation = jpeg_orientation(data)
    least = _capped(fast_scale(width, height, *_upright_draft(draft, orientation)(width, height))
                    if draft is not None else (width, height), cap)
    if memo is not None and least in memo:
        return memo[least]
    try:
        array = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=least[0], min_height=least[1])
    except ValueError:
        return None
    array = upright(array, orientation)
    if memo is not None:
        memo[least] = array
    return array


FAST_EIGHTHS = (1, 2, 4)
"""The reduced DCT scales libjpeg-turbo decodes faster than the whole image (in eighths: 1/8, 1/4,
1/2; its SIMD kernels). The others cost more than the next of these up, and 5/8-7/8 more than
the whole: a 256-px photograph at 7/8 took 0.54 ms, whole 0.25. An image of a few pixels, whose
sizes at two scales round to one, may still be decoded at a slow one: at no cost that counts."""


DECODED = "fast-dct-scales"
"""How a crop's pixels are decoded, as `flava prepare` records it beside the tokens it made of
them: shards prepared before `FAST_EIGHTHS` hold, for some crops (a 90-100 % box of a 256-px
photograph: about 3 in 10), tokens of pixels decoded at 7/8 (2-4 % of those crops' tokens differ)."""


def fast_scale(width: int, height: int, least_width: int, least_height: int) -> tuple[int, int]:
    """The size to ask libjpeg-turbo for, so that it picks the smallest of the fast scales
    (`FAST_EIGHTHS`, or the whole image) still at least (least_width, least_height)."""
    for n in FAST_EIGHTHS:
        w, h = math.ceil(width * n / 8), math.ceil(height * n / 8)
        if w >= least_width and h >= least_height:
            return w, h
    return width, height


def decode_rgb(ref: ImageRef, draft: Callable[[int, int], tuple[int, int]] | None = None,
               memo: dict | None = None) -> np.ndarray:
    """[H, W, 3] uint8 RGB, as `open_image` gives, faster for JPEGs: libjpeg-turbo through
    simplejpeg (the same pixels as PIL, without PIL's per-image overheads; with `draft`, the
    smallest of its fast DCT scales, 1/8, 1/4, 1/2 or whole, that still covers the request). Other
    formats, and JPEGs it does not read (CMYK), go through PIL, whose draft mode may choose a
    larger scale."""
    image = decode(ref, draft, memo)
    return image if isinstance(image, np.ndarray) else np.array(image)  # a writable copy: torch wraps it


def dct_scale(width: int, height: int, decoded_width: int, decoded_height: int) -> tuple[float, float]:
    """The scale a (width, height) image was decoded at, each way: a JPEG's n/8, whose last
    pixel libjpeg rounds up from a part of one (so decoded / stored is slightly more than the
    scale, and a box scaled by it would stretch towards the right and bottom edges)."""
    for n in range(1, 9):
        if (math.ceil(width * n / 8), math.ceil(height * n / 8)) == (decoded_width, decoded_height):
            return n / 8, n / 8
    return decoded_width / width, decoded_height / height


Box = tuple[float, float, float, float]
"""(left, top, right, bottom) in pixels."""


def decode_boxes(ref: ImageRef, plan: Callable[[int, int], list[tuple[Box, int]]], memo: dict | None = None
                 ) -> tuple[np.ndarray, list[Box]]:
    """The image as [H, W, 3] uint8 and the boxes `plan(width, height)` picks in it. The plan is
    made from the image's size (upright) before decoding: (box in its pixels, the side it will be
    resized to) for each crop. A JPEG is decoded at the smallest of its fast DCT scales that still
    gives every box its side in pixels each way, and the boxes are returned in the pixels decoded;
    the plan is the same whatever that scale is. `memo`: as `decode`'s."""
    planned: list = []

    def least(width: int, height: int) -> tuple[int, int]:
        # Asked again when libjpeg-turbo refuses a JPEG that PIL then decodes: the same plan, since
        # it draws from the sample's generator (and picks prepared crops' targets) once.
        if not planned:
            boxes = plan(width, height)
            # A prepared crop read from a damaged .npy: counted, not a crash of the decoder.
            if not all(math.isfinite(v) for box, _ in boxes for v in box) or \
                    any(r <= l or b <= t for (l, t, r, b), _ in boxes):
                raise BadSample("unusable crop box")
            planned[:] = [boxes, (width, height)]
        boxes = planned[0]
        # Never more than the stored image: a box a pixel wide asks for no larger a decode.
        return (min(width, max([1] + [math.ceil(width * side / (r - l)) for (l, _, r, _), side in boxes])),
                min(height, max([1] + [math.ceil(height * side / (b - t)) for (_, t, _, b), side in boxes])))

    image = decode_rgb(ref, draft=least, memo=memo)
    if not planned:  # an in-memory image: decoded already, no draft was asked
        least(image.shape[1], image.shape[0])
    boxes, (width, height) = planned
    fx, fy = dct_scale(width, height, image.shape[1], image.shape[0])
    return image, [(left * fx, top * fy, right * fx, bottom * fy) for (left, top, right, bottom), _ in boxes]


def decode_crop(ref: ImageRef, choose: Callable[[int, int], Box], *sizes: int, memo: dict | None = None,
                side: int | None = None) -> list[torch.Tensor]:
    """[3, size, size] uint8 for each size: the box `choose(width, height)` picks (left, top,
    right, bottom, in pixels of the upright image) resized, from the image decoded as
    `decode_boxes` decodes it (the box `side` pixels each way, by default `max(sizes)`; `memo`:
    as `decode`'s)."""
    side = max(sizes) if side is None else side
    image, (box,) = decode_boxes(ref, lambda width, height: [(choose(width, height), side)], memo)
    return crop_resize(image, box, *sizes)
