"""WebDataset tar shards: members grouped by key into pair and image records (with the crops and
image tokens `flava prepare` stored beside them); a shard cut short or damaged is read up to the
damage and counted; shard indexes (`index.json`); tar sources from any shard spec."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .images import IMAGE_SUFFIXES, WRONG_KIND, holds_images
from .members import BadSample, Blob, Member, TarMember
from .sources import CAPTION_SUFFIXES, ImageRecord, Opened, PairRecord, PreparedCrops, Source


def _end_marker_present(f, end: int, size: int) -> bool:
    """A complete tar ends with two zero blocks after its last member."""
    if size - end < 1024:
        return False
    f.seek(end)
    return not any(f.read(1024))


TOKENS_EXT, CROPS_EXT = ".tokens.npy", ".crops.npy"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
"""Shards a folder of them is read for: tars, and tars compressed whole as WebDataset reads them."""


def _decompressor(head: bytes):
    """A maker of incremental decompressors for a shard compressed whole (gzip, bzip2, xz, zstd:
    told by its first bytes, whatever its name), or None for a plain tar. `head`: its first 262 bytes."""
    import bz2
    import lzma
    import zlib

    if head[257:262] == b"ustar":  # a tar's header: its first member's name may begin "BZh..."
        return None
    if head[:3] == b"\x1f\x8b\x08":
        return lambda: zlib.decompressobj(31)
    if head[:3] == b"BZh" and head[3:4].isdigit() and head[4:10] in (b"1AY&SY", b"\x17rE8P\x90"):
        return bz2.BZ2Decompressor
    if head[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMADecompressor
    if head[:4] == b"\x28\xb5\x2f\xfd":  # a zstd frame (read as a tar, it was "corrupt")
        import zstandard

        return lambda: zstandard.ZstdDecompressor().decompressobj()
    return None


def _data_after(f, start: int, total: int) -> bool:
    """Whether anything but padding follows a tar's end (another tar joined with `cat`, which
    tarfile, as WebDataset's reader, never reaches: `tar -A` joins them readably)."""
    if total <= start:
        return False
    f.seek(start)
    return any(f.read(min(total - start, 2**20)))


_REGULAR, _LINKS, _SPECIAL = (b"0", b"\0", b"7"), (b"1", b"2"), (b"3", b"4", b"5", b"6")
"""Header types as tarfile reads them: files, links, and others it lists without data (devices,
folders, FIFOs). Any other type (pax, GNU long names, sparse files) is left to tarfile."""


def _octal(field: bytes) -> int | None:
    """A header's number as tarfile reads it (octal ASCII up to a NUL), or None (base-256 and
    damaged fields are left to tarfile)."""
    if field[0] & 0x80:
        return None
    cut = field.find(0)
    try:
        return int((field if cut < 0 else field[:cut]).strip() or b"0", 8)
    except ValueError:
        return None


def _pax(record: bytes) -> dict[str, str] | None:
    """A pax extended header's fields ("LEN key=value\\n" records), or None where tarfile should
    read it: damaged, or naming a charset or GNU sparse data."""
    fields, pos = {}, 0
    while pos < len(record) and record[pos]:
        space = record.find(b" ", pos, pos + 21)
        length = int(record[pos:space]) if space > pos and record[pos:space].isdigit() else 0
        line = record[space + 1:pos + length]
        key, equals, value = line[:-1].partition(b"=")
        if length < 5 or pos + length > len(record) or not line.endswith(b"\n") or not key or not equals:
            return None
        key = key.decode("utf-8", "surrogateescape")
        if key == "hdrcharset" or key.startswith("GNU."):
            return None
        fields[key] = value.decode("utf-8", "surrogateescape")
        pos += length
    return fields


def _plain_listing(f, total: int) -> list[tuple[str, int, int, bool, bool]] | None:
    """(name, data offset, size, is a file, is a link) of each member, as tarfile lists them, for
    a tar of ustar, GNU or per-member pax headers read to its end marker; None for any other
    (damaged, cut, empty, GNU long names, global pax headers), which tarfile reads. tarfile builds
    a header's objects in Python at about 40 us a member, half a small shard's reading; this walk
    takes a few."""
    listing, offset, pax = [], 0, None
    while offset + 512 <= total:
        f.seek(offset)
        header = f.read(512)
        if len(header) < 512:
            return None
        if header.count(0) == 512:
            return listing if listing and pax is None else None
        kind = header[156:157]
        size, checksum = _octal(header[124:136]), _octal(header[148:156])
        if size is None or checksum != sum(header) - sum(header[148:156]) + 256:
            return None
        if kind == b"x" and pax is None:  # the next member's pax fields: its name, its size
            if offset + 512 + size > total:
                return None
            pax = _pax(f.read(size))
            if pax is None:
                return None
            offset += 512 + -(-size // 512) * 512
            continue
        if kind not in _REGULAR + _LINKS + _SPECIAL:
            return None
        name = header[:100].split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")
        if kind == b"\0" and name.endswith("/"):  # an old (V7) tar's folder
            kind = b"5"
        if kind == b"5":
            name = name.rstrip("/")
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix.decode(tarfile.ENCODING, "surrogateescape") + "/" + name
        if pax:
            name = pax["path"].rstrip("/") if "path" in pax else name
            if "size" in pax:
                if not pax["size"].strip().isdigit():
                    return None
                size = int(pax["size"])
        pax = None
        regular = kind in _REGULAR
        if regular and offset + 512 + size > total:
            return None
        listing.append((name, offset + 512, size, regular, kind in _LINKS))
        offset += 512 + (-(-size // 512) * 512 if regular else 0)
    return None


def _listing(f, total: int):
    """A tar's members, as `_plain_listing` gives them; read by tarfile where that walk declines."""
    plain = _plain_listing(f, total)
    if plain is not None:
        yield from plain
        return
    f.seek(0)
    with tarfile.open(fileobj=f, mode="r:") as tar:
        for info in tar:
            yield info.name, info.offset_data, info.size, info.isfile(), info.issym() or info.islnk()


_LINK = object()
"""A link member in a sample's group: not read (it names another member), but a sample that
lacks its image or caption for it is counted as such."""


def _decompressed(data: bytes | memoryview, make) -> bytes:
    """The tar inside a compressed shard: as much as its data gives (a shard cut short or damaged
    keeps the members before the damage; the tar reader then counts it), concatenated streams
    (`cat a.gz b.gz`) one after another (their tars joined as `cat` joins them: counted)."""
    out, rest = [], bytes(data)
    while rest:
        d = make()
        try:
            out.append(d.decompress(rest))
        except Exception:  # zlib.error, OSError, lzma.LZMAError: damaged data, read up to it
            break
        if not d.eof:
            break
        rest = d.unused_data
    return b"".join(out)


@dataclass(frozen=True)
class TarShard:
    """A WebDataset tar: members sharing a key (the name up to its first dot) form one sample.
    A member whose extension its sample holds already starts another sample of that key, as
    WebDataset starts one where the key changes: shards joined with `tar -A` repeat every key,
    and a stray duplicate must not replace the image its caption was written for.

    A shard cut short (a failed upload or copy) keeps the samples before the cut and is counted
    as truncated; a member whose header claims more bytes than the file holds is not used. A
    shard compressed whole (.tar.gz, .tgz, .tar.bz2, .tar.xz) is decompressed in memory, as a
    remote shard is read."""

    url: str
    kind: str
    cache: object = None
    size: int | None = None
    """Samples, when an index says so."""

    @property
    def name(self) -> str:
        return self.url

    def _members(self, rejected: Counter) -> dict[tuple[str, int], dict[str, Member]]:
        """{(key, n): {extension: member}}: the n-th sample of that key in the shard."""
        from webdataset.tariterators import base_plus_ext

        from .shards import is_remote, read

        where = read(self.url, self.cache)
        if isinstance(where, Path):
            with open(where, "rb") as f:
                head = f.read(262)
        else:
            head = bytes(where[:262])
        make = _decompressor(head)
        if make is not None:
            where = _decompressed(where.read_bytes() if isinstance(where, Path) else where, make)
        data = None
        if isinstance(where, Path):
            f = open(where, "rb")
            total = where.stat().st_size
        else:
            data, total = memoryview(where), len(where)
            f = io.BytesIO(where)
        groups: dict[tuple[str, int], dict[str, Member]] = {}
        latest: dict[str, int] = {}
        origin = self.url if is_remote(self.url) else str(Path(self.url).resolve())  # what embed records
        try:
            cut = False
            with f:
                end = 0
                for name, offset_data, size, regular, link in _listing(f, total):
                    end = offset_data + size
                    if not (regular or link):
                        continue
                    if end > total:
                        rejected["tar member past the end of its shard"] += 1
                        cut = True
                        continue
                    split = base_plus_ext(name)
                    key, ext = (split[0], "." + split[1].lower()) if split[0] else (name, "")
                    n = latest.get(key, 0)
                    if ext in groups.get((key, n), ()):
                        n = latest[key] = n + 1
                    groups.setdefault((key, n), {})[ext] = _LINK if link else (
                        TarMember(where, offset_data, size, ext) if data is None
                        else Blob(data[offset_data:end], ext, f"{origin}#{name}"))
                marker = -(-end // 512) * 512
                if not cut and not _end_marker_present(f, marker, total):
                    rejected["truncated tar shard"] += 1
                elif not cut and _data_after(f, marker + 1024, total):
                    rejected["data after the end of a tar shard (tars joined with cat: join them with tar -A)"] += 1
                elif not groups and not cut:
                    rejected["empty tar shard"] += 1
        except (tarfile.TarError, OSError):
            if not cut:  # else the shard ends inside that member: tarfile's error says no more than that
                rejected["corrupt tar shard (read up to the damage)" if groups
                         else "not a tar archive (or damaged at its start)"] += 1
        return groups

    def open(self) -> Opened:
        rejected: Counter = Counter()
        records = []
        for (key, _), group in self._members(rejected).items():
            members = {ext: m for ext, m in group.items() if m is not _LINK}
            links = [ext for ext, m in group.items() if m is _LINK]
            image = next((m for ext, m in members.items() if ext in IMAGE_SUFFIXES), None)
            prepared = PreparedCrops(members[CROPS_EXT], members[TOKENS_EXT]) \
                if CROPS_EXT in members and TOKENS_EXT in members else None
            if self.kind == "images":
                if image is None:
                    rejected[_incomplete(members, links)] += _lost(members)
                    continue
                label = members.get(".cls")
                records.append(ImageRecord(image, _label(label), prepared))
                continue
            caption = next((members[e] for e in CAPTION_SUFFIXES if e in members), None)
            if image is None or caption is None:
                rejected[_incomplete(members, links, image is None, caption is None)] += _lost(members)
                continue
            records.append(PairRecord(image, caption, prepared, key, members.get(".json")))
        return Opened(records, rejected)


def _lost(members: dict[str, Member]) -> int:
    """Samples an incomplete key stands for: one, or, where names held dots (`img.v0.jpg`,
    `img.v1.jpg`: one key `img`), as many as its images."""
    return max(1, sum(ext.count(".") > 1 and ext.endswith(tuple(IMAGE_SUFFIXES)) for ext in members))


def _incomplete(members: dict[str, Member], links: list[str], no_image: bool = True,
                no_caption: bool = False) -> str:
    """Why a sample lacks its image or caption: a link stood for it (links are not followed), its
    members' names held a dot in their key (`photo.v2.jpg` is key `photo`, extension `.v2.jpg`),
    or it is missing one."""
    if any(no_image and ext in IMAGE_SUFFIXES or no_caption and ext in CAPTION_SUFFIXES for ext in links):
        return "tar sample whose image or caption is a link (links in shards are not followed)"
    if any(ext.count(".") > 1 and ext.endswith((*IMAGE_SUFFIXES, *CAPTION_SUFFIXES)) for ext in members):
        return "tar sample whose key holds a dot (a key ends at its name's first dot: rename a.b.jpg a_b.jpg)"
    return "incomplete tar sample"


def _label(member: Member | None) -> int:
    if member is None:
        return -1
    try:
        return int(member.read().decode().strip())
    except (ValueError, UnicodeDecodeError, BadSample):
        return -1


INDEX = "index.json"
PREPARE_SETTINGS = "prepare_settings.json"
"""What `flava prepare` writes first in its output (and its index, INDEX, last)."""
"""The shard index `flava prepare` writes beside its shards (wids' shard-list layout)."""


def read_index(url: str) -> dict:
    """A shard index: {"shardlist": [{"url", "nsamples"}], "flava": {...}}; shard URLs relative
    to the index."""
    from .shards import check_hosts, is_remote, read

    check_hosts([url])
    try:
        raw = read(url)
        text = raw.read_text() if isinstance(raw, Path) else raw.decode()
        index = json.loads(text)
        if not (isinstance(index, dict) and "shardlist" in index):  # a table written as JSON, say
            raise DataError(f"{url} is not a shard index (`flava prepare`'s {INDEX}, which lists shards): a table of "
                            "rows must be JSON Lines (.jsonl, one object per line), CSV, TSV or parquet")
        shards = index["shardlist"]
        base = url.rsplit("/", 1)[0] if "/" in url else "."
        for s in shards:
            if not (is_remote(s["url"]) or s["url"].startswith("/")):
                s["url"] = f"{base}/{s['url']}"
            s["nsamples"] = int(s["nsamples"])
        return index
    except FileNotFoundError:
        raise DataError(f"shard index {url} does not exist") from None
    except DataError:
        raise
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise DataError(f"shard index {url} could not be read ({type(e).__name__}); write it again with "
                        "`flava prepare`") from None


def tar_source(kind: str, spec: str, cache=None) -> Source:
    """Tar shards named by a spec (see `data.shards`), or by a shard index (`index.json`, or a
    directory holding one)."""
    from .shards import expand, is_remote

    index_url = spec if spec.endswith(".json") else None
    if index_url is None and not is_remote(spec) and (Path(spec) / INDEX).is_file():
        index_url = str(Path(spec) / INDEX)
    if index_url is None and not is_remote(spec) and (Path(spec) / PREPARE_SETTINGS).is_file():
        # `flava prepare` writes its index last: without one, its shards so far would pass for the whole
        done = len(list(Path(spec).glob("[0-9]*.json")))
        raise DataError(f"{spec} is an unfinished `flava prepare` output ({done} shard(s) written, no {INDEX} yet): "
                        "run the same prepare command again to finish it")
    if index_url is not None:
        index = read_index(index_url)
        shards = [TarShard(s["url"], kind, cache, s["nsamples"]) for s in index["shardlist"]]
        source = Source(kind, name=spec, shards=shards, size=sum(s.size for s in shards))
        source.prepared = index.get("flava")
        return source
    urls = expand(spec, TAR_SUFFIXES)
    images = kind == "pairs" and (all(u.lower().endswith(tuple(IMAGE_SUFFIXES)) for u in urls) if urls else
                                  holds_images(spec))
    if images:  # a glob of images matched them as shards: each read as a damaged tar
        raise DataError(f"{spec} {WRONG_KIND['pairs']}")
    if not urls:
        raise DataError(f"no tar shards match {spec}")
    source = Source(kind, name=spec, shards=[TarShard(u, kind, cache) for u in urls])
    source.known_bytes = _local_bytes(urls)
    _find_prepared(source, urls)
    return source


def _local_bytes(urls: list[str]) -> int | None:
    """The shards' bytes when every one is a local file (a stat each), else None: a resume compares
    them, as shards written again under their names may hold other samples at the saved positions."""
    from .shards import _local, is_remote

    if any(is_remote(u) for u in urls):
        return None
    try:
        return sum(os.stat(_local(u)).st_size for u in urls)
    except OSError:  # a shard missing now is met, and counted, as the stream reaches it
        return None


def _find_prepared(source: Source, urls: list[str]) -> None:
    """What `flava prepare` recorded of local shards named by a glob, a pattern or one by one, read
    from the index beside them into `source.prepared` (named so, they had trained on their stored
    tokens unchecked: another codebook's, another vocabulary's). Remote shards are not looked up."""
    from .shards import _local, is_remote

    made: dict[str, dict | None] = {}  # by folder: its index's record (None: shards without tokens)
    counted: dict[str, int] = {}  # samples in the shards the indexes list, by real path
    for folder in dict.fromkeys(os.path.dirname(_local(u)) or "." for u in urls if not is_remote(u)):
        index, mark = Path(folder) / INDEX, Path(folder) / PREPARE_SETTINGS
        if mark.is_file() and not index.is_file():
            raise DataError(f"{source.name} names shards of an unfinished `flava prepare` output ({folder}, no "
                            f"{INDEX} yet): run the same prepare command again to finish it")
        try:
            listed = read_index(str(index)) if index.is_file() else None
        except DataError:
            if mark.is_file():
                raise
            listed = None  # another program's index.json: these are not prepare's shards
        made[folder] = listed.get("flava") if listed else None
        if listed:
            counted.update({os.path.realpath(_local(s["url"])): s["nsamples"] for s in listed["shardlist"]})
    # Named one by one or by a glob, prepared shards are counted by their index, as the folder is.
    if counted and all(not is_remote(u) and os.path.realpath(_local(u)) in counted for u in urls):
        source.known_size = sum(counted[os.path.realpath(_local(u))] for u in urls)
    if not any(made.values()):
        return
    if len({json.dumps(info, sort_keys=True) for info in made.values()}) == 1:
        source.prepared = next(iter(made.values()))
        return
    infos = [i for i in made.values() if i]
    differ = [k for k in sorted(set().union(*infos)) if len({repr(i.get(k)) for i in infos}) > 1] or ["codebook"]
    source.prepared_apart = [f"{f}: " + (f"{differ[0]} {i.get(differ[0])}" if i else "no image tokens")
                             for f, i in made.items()]


def tar_pairs(pattern: str, cache=None) -> Source:
    return tar_source("pairs", pattern, cache)
