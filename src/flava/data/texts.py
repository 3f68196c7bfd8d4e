"""Text files as sources: .txt (a line each) and .jsonl, local and uncompressed ones split into byte
ranges (a shard each) so no corpus is ever whole in memory, compressed or remote ones whole."""

from __future__ import annotations

import bz2
import json
import lzma
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .images import walk_files
from .sources import Opened, Source


TEXT_SUFFIXES = (".txt", ".jsonl")
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
TEXT_RANGE_BYTES = 8 << 20
"""Uncompressed local text is read in byte ranges of this size, so no corpus is ever whole in memory."""


@dataclass(frozen=True)
class TextShard:
    """Lines of a text file: those that start within [start, end) of a local uncompressed file, or
    every line of a compressed or remote one (a shard of its own)."""

    url: str
    start: int = 0
    end: int | None = None
    field: str = "text"
    cache: object = None

    @property
    def name(self) -> str:
        return self.url if self.end is None else f"{self.url}@{self.start}"

    def _lines(self, rejected: Counter) -> list[bytes]:
        # Lines end at \n, \r\n or a lone \r (old Mac files), as bytes.splitlines has it for whole files.
        if self.end is not None:
            with open(self.url, "rb") as f:
                at = self.start
                if at > 0:
                    f.seek(at - 1)
                    before, here = f.read(1), f.read(1)
                    if not (before == b"\n" or before == b"\r" and here != b"\n"):
                        f.seek(at)  # the line that started before this range belongs to the one before
                        at += len(_rest_of_line(f))
                if at >= self.end:
                    return []
                f.seek(at)
                data = f.read(self.end - at)
                if not data.endswith((b"\n", b"\r")):
                    data += _rest_of_line(f)  # the last line starting in the range, read to its end
                return data.splitlines()
        from .shards import read

        raw = read(self.url, self.cache)
        raw = raw.read_bytes() if isinstance(raw, Path) else raw
        suffix = _compression_suffix(self.url)
        if not suffix:
            return raw.splitlines()
        text, damage = decompress(raw, suffix)
        if damage:
            rejected[damage] += 1
        if damage and damage != TRAILING:
            text = text[:max(text.rfind(b"\n"), text.rfind(b"\r")) + 1]  # the line the damage cut is not a text
        return text.splitlines()

    def open(self) -> Opened:
        rejected: Counter = Counter()
        jsonl = _text_name(self.url).endswith(".jsonl")
        records = []
        for raw in self._lines(rejected):
            try:
                line = raw.decode("utf-8").removeprefix("\ufeff")  # a BOM: not text
            except UnicodeDecodeError:
                rejected["undecodable text line"] += 1
                continue
            if not line.strip():
                continue
            if jsonl:
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, RecursionError):
                    rejected["unreadable json line"] += 1
                    continue
                line = obj.get(self.field) if isinstance(obj, dict) else None
                if not isinstance(line, str):
                    rejected[f"json line without a text string in {self.field!r}"] += 1
                    continue
            records.append(line)
        return Opened(records, rejected)


def _rest_of_line(f) -> bytes:
    """The bytes from `f`'s position to the end of its line, the line's ending (\\n, \\r\\n or \\r) included."""
    out = []
    while chunk := f.read(1 << 16):
        ends = [i for i in (chunk.find(b"\n"), chunk.find(b"\r")) if i >= 0]
        if not ends:
            out.append(chunk)
            continue
        cut = min(ends)
        out.append(chunk[:cut + 1])
        if chunk[cut:cut + 1] == b"\r" and (chunk[cut + 1:cut + 2] or f.read(1)) == b"\n":
            out.append(b"\n")
        break
    return b"".join(out)


def _compression_suffix(url: str) -> str:
    from .shards import bare_name

    return next((c for c in COMPRESSED if bare_name(url).lower().endswith(c)), "")


def _text_name(url: str) -> str:
    """How a text file's name ends, less its compression and an http(s) query."""
    from .shards import bare_name

    return bare_name(url).lower().removesuffix(_compression_suffix(url))


def _decompressor(suffix: str):
    if suffix == ".gz":
        return zlib.decompressobj(wbits=31)
    if suffix == ".bz2":
        return bz2.BZ2Decompressor()
    if suffix == ".xz":
        return lzma.LZMADecompressor()
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj()


_CHUNK = 1 << 14
TRAILING = "bytes after compressed text"
"""Bytes after a complete member that start none (what gzip rejects and bz2 and xz ignore): the
text before them is whole."""


def decompress(raw: bytes, suffix: str) -> tuple[bytes, str | None]:
    """The text of a compressed file (members or frames one after another, as `cat`, pbzip2 and
    bgzip make them) and what cut it short, if anything: a file cut short or damaged keeps what
    came before the cut, to within a 16 KiB block (the file modules' readers raise and keep
    nothing; zstd's says nothing). Zeros after the last member (gzip's and xz's padding) are no
    damage; other bytes there are `TRAILING`."""
    import zstandard

    errors = (OSError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError)
    view, at, out = memoryview(raw), 0, []
    while at < len(view):
        if at > 0 and not any(view[at:]):  # padding (any stops at a member's first byte, which is not 0)
            break
        d, first = _decompressor(suffix), at
        while True:
            chunk = view[at:at + _CHUNK]
            try:
                out.append(d.decompress(chunk))
            except errors:
                damage = TRAILING if at == first > 0 else "damaged compressed text (read up to the damage)"
                return b"".join(out), damage
            if d.eof:
                at += len(chunk) - len(d.unused_data)  # an offset, not a copy: a file may hold thousands
                break
            at += len(chunk)
            if at >= len(view):
                return b"".join(out), "truncated compressed text"
    return b"".join(out), None


def text_file(path: str, field_name: str = "text", cache=None) -> Source:
    """Text from .txt files (one text per non-empty line) or .jsonl (the `field_name` of each
    object), optionally compressed (.gz, .bz2, .xz, .zst): a file, directory, glob or URL."""
    from .shards import expand, is_remote, size_of

    p = Path(path)
    if not is_remote(path) and p.is_dir():
        files = sorted(str(f) for f in walk_files(p) if f.is_file())
    else:
        files = expand(path, tuple(s + c for s in TEXT_SUFFIXES for c in ("", *COMPRESSED)))
    files = [f for f in files if _text_name(f).endswith(TEXT_SUFFIXES)]
    if not files:
        from .images import WRONG_KIND, holds_images

        shards = not is_remote(path) and any(f.lower().endswith(".tar") for f in expand(path, (".tar",)))
        raise DataError(f"{path} {WRONG_KIND['text']}" if shards or holds_images(path) else
                        f"no .txt or .jsonl files match {path}")
    shards: list[TextShard] = []
    sizes = [size_of(f) for f in files]
    for f, size in zip(files, sizes):
        if size is None or _compression_suffix(f):
            shards.append(TextShard(f, field=field_name, cache=cache))
        else:
            shards += [TextShard(f, a, min(a + TEXT_RANGE_BYTES, size), field_name)
                       for a in range(0, max(size, 1), TEXT_RANGE_BYTES)]
    source = Source("text", name=path, shards=shards)
    source.known_bytes = None if None in sizes else sum(sizes)
    return source
