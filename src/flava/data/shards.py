"""Where shards are and how their bytes are read.

A data spec names shards: local files, directories and globs; brace ranges
(`shards/{00000..06999}.tar`, expanded by webdataset's `expand_urls`, `::` joining lists);
`http(s)://` (an IPv6 host in brackets too), `s3://` and any other object store `fsspec` knows; and
`pipe:` commands (open_clip's convention, opened by webdataset's `gopen`). Remote shards are read
whole into memory, or through a local cache bounded in size when one is configured, so that a
shard can be read at any offset: positions within a shard are what make a stream resumable exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import hashlib
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import stopping
from ..errors import DataError, first_line
from .images import files_below
from .members import hold_shard

GLOB_CHARS = "*?["
RETRIES = 3
RETRY_PAUSE_S = 0.5
"""The pause before a failed read's second attempt, doubled before each later one."""
TIMEOUTS = (TimeoutError, asyncio.TimeoutError)
"""aiohttp's timeouts (asyncio's, not the builtin before Python 3.11)."""
FETCH_TIMEOUT_S = 60.0
"""An HTTP read that connects, or receives anything, in no less time is given up and tried again:
aiohttp gives a request 5 minutes in all, and fsspec's reader makes two (HEAD, then GET) before it
fails, so a stalled server held a run silent for ten minutes a try. (s3fs's own read timeout is 15 s.)"""
CHECKED_NAMED = 10_000
"""A spec naming up to this many local files is refused at once when none of them exists."""
STALE_PART_S = 3600
"""A partial download older than this is a dead writer's: the cache removes it."""


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url and not url.startswith("file://")


def _local(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def check_protocol(url: str) -> None:
    """A DataError naming the package to install when no fsspec backend reads `url`."""
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as e:
        raise DataError(f"cannot read {url}: {e}") from None


_IPV6_HOST = re.compile(r"(?:(?<=://)|(?<=@))\[[0-9A-Za-z:.%~_-]+\]")
"""An IPv6 literal host (`http://[::1]:8000/...`): its colons are no `::` joining lists."""


MAX_NAMED_SHARDS = 10_000_000
"""The most shards braces may name: a range typed with digits to spare ({00000..99999999}) had built
a list of 100 million names, 20 GB, before a word was said."""


def _braced(spec: str) -> int:
    """How many names the brace groups of `spec` expand to (their product), counted before expanding."""
    n = 1
    for group in re.findall(r"\{([^{}]*)\}", spec):
        bounds = re.fullmatch(r"\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*", group)
        n *= abs(int(bounds[2]) - int(bounds[1])) + 1 if bounds else group.count(",") + 1
    return n


def expand_urls(spec: str) -> list[str]:
    """webdataset's `expand_urls` (`::` joins lists, braces expand), IPv6 literal hosts kept whole."""
    from webdataset.shardlists import expand_urls as webdataset_expand

    for part in spec.split("::"):
        if (n := _braced(part)) > MAX_NAMED_SHARDS:
            raise DataError(f"{part} names {n:,} shards with its braces, more than {MAX_NAMED_SHARDS:,}: check the "
                            "range (a brace range counts every number between its ends)")
    hosts: list[str] = []

    def hide(m: re.Match) -> str:
        hosts.append(m.group(0))
        return f"\0{len(hosts) - 1}\0"
    parts = webdataset_expand(_IPV6_HOST.sub(hide, spec))
    return [re.sub("\0(\\d+)\0", lambda m: hosts[int(m.group(1))], part) for part in parts] if hosts else parts


def bare_name(url: str) -> str:
    """A data spec as its name ends, less an http(s) URL's query and fragment (a signed URL's
    `?X-Amz-Signature=...`, a `?v=2`), which had hidden its .csv or .txt."""
    return url.split("?", 1)[0].split("#", 1)[0] if url.startswith(("http://", "https://")) else url


def _path_of(url: str) -> str:
    """A URL's path: what follows its host (whose IPv6 brackets are no glob), less an http(s)
    query (a signed URL's `?X-Amz-Signature=...` is no glob either)."""
    rest = bare_name(url).partition("://")[2]
    return rest.split("/", 1)[1] if "/" in rest else ""


def expand(spec: str, suffixes: tuple[str, ...]) -> list[str]:
    """The shards a spec names, in order. Directories yield their files ending in `suffixes`."""
    urls: list[str] = []
    parts = expand_urls(str(spec))
    check_hosts(parts)
    for part in parts:
        if part.startswith("pipe:"):
            urls.append(part)
        elif is_remote(part):
            check_protocol(part)
            urls += _expand_remote(part, suffixes)
        elif any(c in part for c in GLOB_CHARS) and not os.path.exists(_local(part)):  # "wds [v1]" is a name
            urls += sorted(m for m in glob.glob(_local(part), recursive=True) if Path(m).is_file())
        elif len(parts) == 1 and Path(_local(part)).is_dir():
            urls += [str(q) for q in files_below(_local(part), suffixes) if q.is_file()]
        else:
            # Named shards are not checked one by one (millions of stat calls at start-up on a
            # network file system); a missing one is counted when a stream reaches it.
            urls.append(_local(part))
    named = [u for u in urls if not is_remote(u)]
    # ... but a spec none of whose files exist is a wrong path, said now rather than at a step.
    if named and len(named) <= CHECKED_NAMED and not any(os.path.exists(u) for u in named):
        raise DataError(f"{named[0]} does not exist" if [spec] == named else f"{spec}: " + (
            f"{named[0]} does not exist" if len(named) == 1 else
            f"none of its {len(named):,} files exists (the first: {named[0]})"))
    return urls


def check_hosts(urls: list[str]) -> None:
    """A DataError now for an http(s) URL whose host DNS says does not exist (a misspelt address):
    a read takes a failed lookup for an outage and waits for the store (`data.outage_minutes`).
    Left to the read: a lookup the resolver cannot answer now, an IP address, and every host where
    a proxy may be the one to look names up. Each host is looked up once."""
    import urllib.parse

    netlocs = {}
    for url in urls:
        scheme, sep, rest = url.partition("://")
        if sep and scheme in ("http", "https"):
            netlocs.setdefault(rest.split("/", 1)[0], url)
    if not netlocs or _proxied():
        return
    for url in netlocs.values():
        try:
            host = urllib.parse.urlsplit(url).hostname
        except ValueError:  # not an address urllib reads: the read says what is wrong with it
            continue
        if host and host not in _RESOLVED and not _ip_address(host) and _unknown_host(host):
            raise DataError(f"{url}: no host {host} is known to DNS: is the address right? (a name only a VPN "
                            "resolves needs the VPN up)")


_RESOLVED: set[str] = set()
"""Hosts found (a refusal is looked up again: the next command may find it)."""


def _proxied() -> bool:
    """Whether a proxy may reach the stores: the environment names one, or fsspec's HTTP settings
    pass the client one (or the environment's)."""
    import urllib.request

    import fsspec

    if urllib.request.getproxies():
        return True
    own = [fsspec.config.conf.get(p, {}).get("client_kwargs") or {} for p in ("http", "https")]
    return any("proxy" in k or k.get("trust_env") for k in own)


def _ip_address(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 address may name its zone
        return True
    except ValueError:
        return False


def _unknown_host(host: str) -> bool:
    import socket

    try:
        socket.getaddrinfo(host, None)
    except socket.gaierror as e:
        return e.errno == socket.EAI_NONAME  # not EAI_AGAIN, a resolver that did not answer
    except OSError:
        return False
    _RESOLVED.add(host)
    return False


def _expand_remote(url: str, suffixes: tuple[str, ...]) -> list[str]:
    if not (url.endswith("/") or any(c in _path_of(url) for c in GLOB_CHARS)):
        return [url]
    if _IPV6_HOST.search(url) and not url.endswith("/"):
        raise DataError(f"{url}: a glob is not listed on a host named by its IPv6 address (fsspec's listing reads "
                        "its brackets as a pattern): name the shards with a brace range such as "
                        "shards/{00000..00099}.tar, or the folder (ending in /) to take its shards")
    try:
        fs, path = _filesystem(url)
        found = fs.glob(path) if not url.endswith("/") else fs.ls(path, detail=False)
    except Exception as e:  # each backend raises its own types for refused or missing listings
        if (cut := _connection_failure(e)) is not None:
            raise DataError(f"could not list {url}: {_said(cut)}{_hint(url, cut)}") from None
        if _credentials_failure(e):  # no listing, nor any read, would do better
            raise DataError(f"could not list {url} ({type(e).__name__}: {first_line(e)}){CREDENTIALS_HINT}") from None
        raise DataError(f"could not list {url} ({type(e).__name__}: {e}); name the shards one by one or "
                        "with a brace range such as shards/{00000..00099}.tar") from None
    protocol = url.split("://", 1)[0]
    out = sorted(f if "://" in f else f"{protocol}://{f}" for f in found)
    return [f for f in out if f.lower().endswith(suffixes)]


@dataclass(frozen=True)
class ShardCache:
    """Remote shards kept on local disk, the least recently used removed beyond `max_bytes`."""

    root: str
    max_bytes: int

    def path(self, url: str) -> Path:
        name = hashlib.sha256(url.encode()).hexdigest()[:24] + "-" + url.rstrip("/").rsplit("/", 1)[-1][-40:]
        return Path(self.root) / name

    def get(self, url: str) -> Path | bytes:
        """The shard's local copy, opened by this process (`hold_shard`): evicting it later, here
        or in another process, removes the file but not this reader's descriptor. Its bytes, not
        kept, where the cache cannot hold it (a full disk): said once, not counted against the shard."""
        target = self.path(url)
        for _ in range(3):
            if not target.is_file():
                data = _fetch(url)
                tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    tmp.write_bytes(data)
                    os.replace(tmp, target)  # other processes see a whole shard or none
                except OSError as e:  # the local disk's failure, not the shard's: read on without the cache
                    with contextlib.suppress(OSError):
                        tmp.unlink(missing_ok=True)
                    _cache_failed(self.root, e)
                    return data
                except BaseException:  # a stop given up amid the write
                    tmp.unlink(missing_ok=True)
                    raise
            try:
                hold_shard(target)
                os.utime(target)  # recency for eviction
            except FileNotFoundError:  # evicted by another process since: fetch it again
                continue
            self._evict(keep=target)
            return target
        raise OSError(f"{url}: the shard cache in {self.root} removed it as soon as it was fetched, three times; "
                      "raise data.cache_limit_gb")

    def _evict(self, keep: Path) -> None:
        files = []
        now = time.time()
        for f in Path(self.root).iterdir():
            try:
                if f.name.endswith(".part") and now - f.stat().st_mtime > STALE_PART_S:
                    f.unlink(missing_ok=True)  # a download whose writer died
                elif f.is_file() and not f.name.startswith("."):
                    st = f.stat()
                    files.append((st.st_mtime, st.st_size, f))
            except FileNotFoundError:  # removed by another process meanwhile
                continue
        total = sum(s for _, s, _ in files)
        for _, size, f in sorted(files):
            if total <= self.max_bytes:
                break
            if f != keep:
                f.unlink(missing_ok=True)
                total -= size


def _fetch(url: str) -> bytes:
    """A remote shard's bytes. Failures that may pass (a refused or dropped connection, a stalled
    server, a store's error) are said as they happen and tried again; a shard the store does not
    hold raises FileNotFoundError at once; OSError when every attempt failed."""
    last: BaseException | None = None
    for attempt in range(1, RETRIES + 1):
        try:
            if url.startswith("pipe:"):
                return _read_pipe(url)
            fs, path = _filesystem(url)
            with fs.open(path, "rb") as f:
                return f.read()
        except FileNotFoundError as e:
            if _missing(e):
                raise
            last = e.__cause__
        except Exception as e:  # network errors come in many types
            last = e
        stopping.poll()  # a failure a stop caused (a pipe's command ended by the same signal) is not tried again
        if _credentials_failure(last):  # the same answer each time: 3 tries of every shard had taken minutes
            raise OSError(f"{url}: {_said(last)}{CREDENTIALS_HINT}") from last
        if attempt < RETRIES:
            wait = RETRY_PAUSE_S * 2 ** (attempt - 1)
            # From a loader worker too: a wait on the network is never silent.
            print(f"note: {url}: {_said(last)} (attempt {attempt} of {RETRIES}); trying again in {wait:g} s",
                  file=sys.stderr, flush=True)
            time.sleep(wait)
    failure = Unreachable if _passing_failure(last) is not None else OSError
    raise failure(f"{url}: {_said(last)} ({RETRIES} attempts){_hint(url, last)}") from last


CREDENTIALS_HINT = ("; give the store's credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or "
                    "~/.aws/credentials) and check them")
CREDENTIAL_WORDS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken")


def _credentials_failure(e: BaseException | None) -> bool:
    """Whether a store refused the credentials, or none were found (botocore's errors, as s3fs
    passes them on): no retry can help."""
    return any(type(x).__name__ in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError")
               or any(w in str(x) for w in CREDENTIAL_WORDS) for x in _chain(e))


class Unreachable(OSError):
    """A store that could not be reached, gave no answer in time, or said it cannot serve now (429,
    503, ...), however often it was tried: unlike its refusal or a missing object, that may pass."""


def unreachable(e: BaseException) -> bool:
    return isinstance(e, Unreachable) or _passing_failure(e) is not None


def _read_pipe(url: str) -> bytes:
    """A `pipe:` command's output, as webdataset's gopen reads it, but with the command in a
    session of its own: a read given up (a stop, `stopping.abandonable`) ends the command and
    whatever it started, rather than wait for it (webdataset's close waits up to two hours)."""
    import importlib

    gopen = importlib.import_module("webdataset.gopen")  # the module: the package's `gopen` is its function
    if gopen.utils.enforce_security:  # as gopen_pipe: the user turned shell commands off
        raise ValueError(f"{url}: webdataset's enforce_security forbids pipe: URLs")
    f = gopen.Pipe(url[5:], mode="rb", shell=True, bufsize=8192, ignore_status=[141], start_new_session=True)
    try:
        data = f.read()
    except BaseException:
        with contextlib.suppress(OSError):
            os.killpg(f.proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            f.close()
        raise
    try:
        f.close()  # raises for a command that failed
    except OSError:
        raise OSError(f"{url}: the command ended with exit status {f.status}") from None
    return data


def end_pipes(pid: int) -> None:
    """Kill the `pipe:` commands that process `pid` (stopped, about to be killed: a loader worker
    given up amid a read) started, each the leader of a session of its own (`_read_pipe`), which
    would run on without it. Linux's /proc; elsewhere nothing."""
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            state = Path(stat).read_text().rsplit(")", 1)[1].split()  # after "pid (command)"
        except (OSError, IndexError):  # gone since the listing
            continue
        child = int(stat.split("/")[2])
        if int(state[1]) == pid and int(state[2]) == child:
            with contextlib.suppress(OSError):
                os.killpg(child, signal.SIGKILL)


def _filesystem(url: str):
    """(the fsspec filesystem that reads `url`, the path it takes), as `fsspec.core.url_to_fs`
    gives them; for a host named by its IPv6 address, made by protocol (http(s): nothing in the URL
    configures it), since fsspec reads `::` as a chain of protocols."""
    import fsspec

    if _IPV6_HOST.search(url):
        return fsspec.filesystem(url.split("://", 1)[0], **_storage_options(url)), url
    return fsspec.core.url_to_fs(url, **_storage_options(url))


def _storage_options(url: str) -> dict:
    """HTTP's timeout (FETCH_TIMEOUT_S) beside the user's own fsspec settings for it, which explicit
    arguments would replace whole (a proxy's trust_env, headers); a timeout of their own stands."""
    protocol = url.split("://", 1)[0]
    if protocol not in ("http", "https"):
        return {}
    import aiohttp
    import fsspec

    own = {**fsspec.config.conf.get("http", {}), **fsspec.config.conf.get(protocol, {})}.get("client_kwargs") or {}
    t = FETCH_TIMEOUT_S
    return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t), **own}}


CUT_CONNECTION_WORDS = ("Connect", "Timeout", "Disconnected", "Payload", "IncompleteRead")
NOT_PASSING_WORDS = ("SSL", "Certificate")
"""A TLS handshake the client refuses (an untrusted certificate, a wrong name) is the user's to fix."""
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
"""HTTP answers that say to come back later: a timeout, throttling (S3's 503 SlowDown, 429), a
server or gateway failing now."""


def _connection_failure(e: BaseException) -> BaseException | None:
    """The failed connection or the timeout behind `e`, if that is what it is (a store that could
    not be reached or dropped the connection, not one that refused what was asked). By the names of
    the libraries' own types (aiohttp's, botocore's, urllib3's), which few builtins cover."""
    for x in _chain(e):
        names = [k.__name__ for k in type(x).__mro__]
        if any(w in n for n in names for w in NOT_PASSING_WORDS):  # aiohttp's are ClientConnectorErrors too
            return None
        if isinstance(x, (ConnectionError, *TIMEOUTS)) or any(w in n for n in names for w in CUT_CONNECTION_WORDS):
            return x
    return None


def _chain(e: BaseException | None):
    """`e` and what it was raised from or during, up to 8 deep."""
    for _ in range(8):
        if e is None:
            return
        yield e
        e = e.__cause__ or e.__context__


def _status(e: BaseException) -> int | None:
    """The HTTP status a store answered with: aiohttp's (fsspec's HTTP) or botocore's (s3fs's)."""
    status = getattr(e, "status", None)
    if isinstance(status, int):
        return status
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status if isinstance(status, int) else None
    return None


def _passing_failure(e: BaseException) -> BaseException | None:
    """What, behind `e`, may pass: a connection that failed or timed out (`_connection_failure`),
    or an answer saying to come back later (TRANSIENT_STATUS)."""
    if (cut := _connection_failure(e)) is not None:
        return cut
    return next((x for x in _chain(e) if _status(x) in TRANSIENT_STATUS), None)


def _missing(e: FileNotFoundError) -> bool:
    """The store's "no such object", not a connection that failed: fsspec's HTTP reader raises
    FileNotFoundError for both, the failure as its cause."""
    cause = e.__cause__
    return cause is None or getattr(cause, "status", None) in (404, 410)


def _said(e: BaseException | None) -> str:
    if isinstance(e, TIMEOUTS):  # aiohttp's and asyncio's say little themselves
        return f"no answer in {FETCH_TIMEOUT_S:g} s"
    text = first_line(e)[:300]
    return text if text == type(e).__name__ else f"{type(e).__name__}: {text}"


def _hint(url: str, e: BaseException | None) -> str:
    """What to check, where the failure says: a store that could not be reached (not one that
    answered with a refusal: 403, 5xx, a missing package)."""
    if url.startswith(("s3://", "s3a://")) and "endpoint" in str(e).lower():
        named = next((k for k in ("AWS_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL") if os.environ.get(k)), None)
        if named is None:
            return ("; an S3-compatible store other than AWS is named by AWS_ENDPOINT_URL (or FSSPEC_S3_ENDPOINT_URL) "
                    "in the environment")
        # Named already (it had been told to name it): the store it names is what to check.
        return f"; is the store {named}={os.environ[named]} names up?"
    return "; is the server up and the address right?" if _connection_failure(e) is not None else ""


_CACHE_SAID: set[str] = set()


def _cache_failed(root: str, e: OSError) -> None:
    if root not in _CACHE_SAID:  # once per process
        _CACHE_SAID.add(root)
        print(f"note: data.cache_dir={root} cannot hold a shard ({e.strerror or e}): a shard it cannot hold is read "
              "without it, each time it is met", file=sys.stderr, flush=True)


def check_cache_dir(root: str) -> None:
    """DataError naming data.cache_dir where no shard could be kept (a file, /proc, no permission):
    its every shard had been counted as missing or unreadable."""
    probe = Path(root) / f".flava-cache-check-{os.getpid()}"
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise DataError(f"data.cache_dir={root} cannot be used ({e.strerror or e}): name a folder this user may "
                        "write, or leave it out to read remote shards without a cache") from None


def read(url: str, cache: ShardCache | None = None) -> bytes | Path:
    """A shard as a local path (local files, cached remote ones) or its bytes (remote, uncached).
    Raises OSError (or the backend's error) when it cannot be read."""
    if not is_remote(url):
        p = Path(_local(url))
        if not p.is_file():
            raise FileNotFoundError(url)
        return p
    if cache is not None:
        return cache.get(url)
    return _fetch(url)


def size_of(url: str) -> int | None:
    """A shard's size in bytes where it is cheap to learn (local files), else None."""
    if is_remote(url):
        return None
    try:
        return Path(_local(url)).stat().st_size
    except OSError:
        return None
