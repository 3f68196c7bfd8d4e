"""The members of shards as records point to them: a tar member on local disk (read with pread on a
descriptor kept per shard), one held in memory (a remote shard read whole), and `BadSample`, the
reason a record cannot be used (counted under that name by the pipeline)."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import DataError


class BadSample(Exception):
    """A record that cannot be used; `kind` names why (it is counted under that name)."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


_FDS: dict[Path, tuple[tuple[int, int, int], int]] = {}
"""Open shards of this process, least recently used first: path -> ((inode, size, mtime), descriptor)."""
MAX_OPEN_SHARDS = 128


def _shard_fd(path: Path) -> int:
    """A read-only descriptor of a local shard, kept open across its members (an open per member
    costs as much as reading it) and opened when the shard is indexed: a shard cache that removes
    the file meanwhile (for another lane or process) leaves it readable here. pread needs no shared
    offset, so forked loader workers may use an inherited one; a file replaced on disk (another
    inode, size or time) is opened again."""
    held = _FDS.pop(path, None)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if held is None:
            raise
        _FDS[path] = held  # removed from disk since it was opened: the descriptor still reads it
        return held[1]
    key = (st.st_ino, st.st_size, st.st_mtime_ns)
    if held is not None and held[0] == key:
        _FDS[path] = held
        return held[1]
    if held is not None:
        os.close(held[1])
    while len(_FDS) >= MAX_OPEN_SHARDS:
        os.close(_FDS.pop(next(iter(_FDS)))[1])
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    _FDS[path] = key, fd
    return fd


def hold_shard(path: Path) -> None:
    """Open a local shard's descriptor now (see `_shard_fd`); FileNotFoundError if it is gone."""
    _shard_fd(path)


@dataclass(frozen=True)
class TarMember:
    """A tar member of a local shard, read by seeking."""

    shard: Path
    offset: int
    size: int
    ext: str = ""

    def locator(self) -> str:
        """`SHARD#OFFSET`, the shard absolute: a server started in another folder reads the member
        there again (`member_at`; serve's /items)."""
        return f"{Path(self.shard).resolve()}#{self.offset}"

    def read(self) -> bytes:
        data = os.pread(_shard_fd(self.shard), self.size, self.offset)
        if len(data) != self.size:
            raise BadSample("truncated tar member")
        return data


@dataclass(frozen=True, repr=False)
class Blob:
    """A tar member of a shard held in memory (a remote shard read whole), or a table's image cell."""

    data: bytes | memoryview
    ext: str = ""
    origin: str = field(default="", compare=False)
    """Where it was read: `SHARD#MEMBER` for a member of a remote or compressed shard; "" for a cell."""

    def read(self) -> bytes:
        return bytes(self.data)

    def locator(self) -> str:
        """Its shard and member name (what `embed` records of it; serve's /items cannot read it
        again), else the bytes' description."""
        return self.origin or repr(self)

    def __repr__(self) -> str:
        # In messages, never the bytes themselves; the digest keeps two images apart where an
        # example is known by its text (a validation carve groups examples by image).
        return f"<{len(self.data):,} bytes of image data, sha1 {hashlib.sha1(self.data).hexdigest()[:12]}>"


@dataclass(frozen=True)
class ImageURL:
    """A table's image given as a URL: named, never fetched (flava reads local files and shards)."""

    url: str
    ext: str = ""

    def read(self) -> bytes:
        raise BadSample(URL_NOT_FETCHED)

    def __str__(self) -> str:
        return self.url


URL_NOT_FETCHED = "image URL, not downloaded"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def table_image(base: Path, value) -> Path | Blob | ImageURL:
    """A table cell's image: a path (relative to `base`, the table's folder), the bytes of the
    image itself (parquet; a `datasets` Image struct), or a URL, which is not fetched."""
    if isinstance(value, dict):  # the `datasets` Image struct
        value = value.get("bytes") or value.get("path") or ""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Blob(bytes(value))
    text = str(value).strip()  # a hand-written table's "a.png, b.png": names do not end in spaces
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif _SCHEME.match(text):
        return ImageURL(text)
    p = Path(text).expanduser()
    return p if p.is_absolute() else base / p


def refuse_urls(table: Path, images: list) -> None:
    """DataError when a table's images are all URLs, where each would be counted as a bad record."""
    if images and all(isinstance(i, ImageURL) for i in images):
        raise DataError(f"{table}: its images are URLs ({images[0]}, ...), which flava does not fetch: download "
                        "them first (img2dataset writes WebDataset shards, which flava reads)")


def member_at(shard: Path, offset: int, limit: int = 64 * 2**20) -> bytes:
    """The bytes of the member whose data starts at `offset` of a local tar shard (what an index
    built from shards records as `shard#offset`): its header is the 512-byte block before its data.
    BadSample when no regular member's data of at most `limit` bytes starts there."""
    import tarfile

    if offset < 512 or offset % 512:
        raise BadSample(f"no tar member's data starts at byte {offset}")
    with open(shard, "rb") as f:
        f.seek(offset - 512)
        try:
            info = tarfile.TarInfo.frombuf(f.read(512), "utf-8", "surrogateescape")
        except (tarfile.HeaderError, ValueError, OverflowError):  # damaged numbers too
            raise BadSample(f"no tar member's data starts at byte {offset}") from None
        # A damaged header's size is not trusted with memory: at most what the file holds.
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or not 0 <= info.size <= min(
                limit, os.fstat(f.fileno()).st_size - offset):
            raise BadSample(f"the tar member at byte {offset} is not a whole file of at most {limit:,} bytes")
        return f.read(info.size)


Member = TarMember | Blob | ImageURL
ImageRef = Path | Member | Image.Image
