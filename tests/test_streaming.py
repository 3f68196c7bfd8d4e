"""Data at scale: shards streamed from an HTTP server and an S3 server (moto) on 127.0.0.1, text
read by byte ranges, weighted mixing, `flava prepare` and training that never runs the codebook,
and a 2-process run killed and resumed on 1 process."""

import dataclasses
import gzip
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import finished, free_port, narrow_args, openers, pretrain_args, proc_state
from zygote import Process, python
from flava.data import decode, texts
from flava.data.texts import text_file
from flava.data.pipeline import BatchStream, KindStream
from flava.data.samples import SampleMaker, SampleSpec
from flava.data.registry import open_source, open_stream
from flava.data.shards import ShardCache, expand
from flava.errors import ConfigError, DataError

SPEC = SampleSpec(image_size=32, codebook_image_size=32, grid=4, max_text_length=16)


def png(seed: int, size=20) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_shards(root, shards=4, per=6):
    root.mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        with tarfile.open(root / f"shard-{k:03d}.tar", "w") as tar:
            for i in range(per):
                for ext, data in (("png", png(100 * k + i)), ("txt", f"shard {k} picture {i}".encode())):
                    info = tarfile.TarInfo(f"{k:03d}{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


def batches(source, n=4, **kw):
    s = BatchStream("pairs", source, SampleMaker(SPEC, 0), batch_size=4, seed=3, lanes=2, **kw)
    return [s.next_batch() for _ in range(n)], s


def same(a, b):
    return all(torch.equal(x.pixel_values, y.pixel_values) and torch.equal(x.input_ids, y.input_ids)
               for x, y in zip(a, b))


def test_a_stream_restored_to_its_snapshot_draws_and_counts_as_if_the_draws_since_had_not_been(tmp_path):
    # Under torchrun every step takes a snapshot: it no longer copies the bad records and shard
    # rejections met so far (which grow with the run), and takes back what the draws since added.
    root = write_shards(tmp_path / "shards", shards=4, per=6)
    for k in (2, 0):  # a record without its caption: its shard's rejection
        with tarfile.open(root / f"shard-{k:03d}.tar", "a") as tar:
            info = tarfile.TarInfo(f"00{k}0099.png")
            data = png(7)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(root / "shard-003.tar", "a") as tar:  # an image that cannot be read: a bad record
        for ext, data in (("png", b"not an image"), ("txt", b"a broken picture")):
            info = tarfile.TarInfo(f"0030099.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    spec = str(root / "shard-{000..003}.tar")
    plain, s = batches(open_source("pairs", spec), n=1)
    s.snapshot()
    kept = s.snapshot()
    before = json.dumps(s.state(), sort_keys=True)
    ahead = [s.next_batch() for _ in range(8)]  # meets both shards: the counts grow
    assert s.state()["bad"] and len(s.state()["rejected"]) > len(json.loads(before)["rejected"])
    s.restore(kept)
    assert json.dumps(s.state(), sort_keys=True) == before
    again = [s.next_batch() for _ in range(8)]
    assert same(again, ahead)
    whole, w = batches(open_source("pairs", spec), n=9)
    assert same(plain + again, whole) and w.state() == s.state()
    with pytest.raises(RuntimeError, match="latest snapshot"):  # taken before a later one
        s.restore((0, {}, {}, []))


def serve(root, port: int, host: str = "127.0.0.1") -> subprocess.Popen:
    """Python's HTTP server for `root` on `host`:`port` (127.0.0.1, or ::1), once it answers."""
    import urllib.request

    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", host,
                               "--directory", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 20
    where = f"[{host}]" if ":" in host else host
    while True:
        try:
            urllib.request.urlopen(f"http://{where}:{port}", timeout=1).close()
            return server
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail(f"the HTTP server on {host} did not start" + (
                    " (this machine's IPv6 loopback may be off)" if ":" in host else ""))
            time.sleep(0.1)


@pytest.fixture
def http_server(tmp_path):
    root = write_shards(tmp_path / "www")
    port = free_port()
    server = serve(root, port)
    yield f"http://127.0.0.1:{port}", root
    server.terminate()
    server.wait(timeout=10)


def test_shards_on_a_host_named_by_its_ipv6_address(tmp_path):
    # Its brackets read as a glob and its colons as webdataset's `::` list joiner: no such URL
    # could name a shard ("could not list http://[").
    root = write_shards(tmp_path / "www")
    port = free_port()
    server = serve(root, port, host="::1")
    try:
        url = f"http://[::1]:{port}/shard-{{000..001}}.tar"
        assert expand(url + "::" + str(root / "shard-002.tar"), (".tar",)) == [
            f"http://[::1]:{port}/shard-000.tar", f"http://[::1]:{port}/shard-001.tar", str(root / "shard-002.tar")]
        local, _ = batches(open_source("pairs", str(root / "shard-{000..001}.tar")))
        remote, s = batches(open_source("pairs", url))
        assert same(local, remote) and not s.rejected
        # A folder is listed; a glob is refused in one line (fsspec's listing reads the brackets as a pattern).
        assert expand(f"http://[::1]:{port}/", (".tar",))[:2] == [f"http://[::1]:{port}/shard-000.tar",
                                                                 f"http://[::1]:{port}/shard-001.tar"]
        with pytest.raises(DataError, match=r"^http://\[::1\]:\d+/shard-\*\.tar: a glob is not listed on a host named by "
                                            r"its IPv6 address .+ to take its shards$"):
            expand(f"http://[::1]:{port}/shard-*.tar", (".tar",))
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_an_index_entry_may_chain_fsspec_protocols():
    # Shard URLs are opened as fsspec.open opens them (its chains, and whatever a URL itself
    # configures: an S3 object's ?versionId, an FTP host), not only by their protocol.
    import fsspec

    from flava.data.shards import read

    fsspec.filesystem("memory").pipe("/chained/a.tar", b"abc")
    try:
        assert bytes(read("simplecache::memory://chained/a.tar")) == b"abc"
    finally:
        fsspec.filesystem("memory").rm("/chained", recursive=True)


def test_shards_over_http_with_and_without_a_bounded_cache(http_server, tmp_path):
    url, root = http_server
    local, _ = batches(open_source("pairs", str(root)))
    remote, s = batches(open_source("pairs", url + "/shard-{000..003}.tar"))
    assert same(local, remote) and not s.rejected
    # Signed URLs: a query is no glob (its ? had listed the server and matched nothing).
    signed, _ = batches(open_source("pairs", "::".join(f"{url}/shard-{i:03d}.tar?X-Amz-Signature=ab{i}"
                                                      for i in range(4))))
    assert same(local, signed)
    one_shard = (root / "shard-000.tar").stat().st_size
    cache = ShardCache(str(tmp_path / "cache"), max_bytes=2 * one_shard)
    cached, _ = batches(open_source("pairs", url + "/shard-{000..003}.tar", cache=cache), n=8)
    assert same(local, cached[:4])
    kept = list((tmp_path / "cache").iterdir())
    assert 1 <= len(kept) <= 2 and sum(f.stat().st_size for f in kept) <= 2 * one_shard  # bounded
    # A shard the server does not have is counted and passed over, not fatal.
    gone, g = batches(open_source("pairs", url + "/shard-{000..004}.tar"), n=6)
    assert all(len(b) == 4 for b in gone) and any("missing shard" in c or "unreadable shard" in c
                                                  for c in g.rejected.values())
    # ... and named where a run reports what it skipped (it was counted, not named: in a range of
    # thousands, which one?).
    from flava.train.accounting import DataAccounting

    counts, where = DataAccounting({"pairs": SimpleNamespace(streams=[g])}, 1).bad_records_where()
    assert set(where) == set(counts) and set(where.values()) == {f"{url}/shard-004.tar"}
    # None there: each counted once in the refusal, however often the stream came back to it.
    from flava.errors import DataError

    with pytest.raises(DataError, match=r"holds a usable record \(met: 2 missing shard; e\.g\. http://\S+/gone-00[01]"):
        batches(open_source("pairs", url + "/gone-{000..001}.tar"))
    # A remote table or image is named as one (read as a local path, it was "http:/host/x.csv does not exist").
    with pytest.raises(DataError, match=re.escape(f"{url}/notes.txt is text, not pairs")):
        open_source("pairs", f"{url}/notes.txt")
    for kind, name, what in (("pairs", "pairs.csv", "table"), ("images", "x.png", "image")):
        with pytest.raises(DataError, match=re.escape(f"{url}/{name}: remote {kind} are read from WebDataset shards "
                                                      f"(.tar files, a folder or glob of them, or their index.json); "
                                                      f"copy the {what} here")):
            open_source(kind, f"{url}/{name}")


def test_a_host_dns_does_not_know_is_refused_at_once_and_not_waited_for_as_an_outage(train_data, tmp_path, capsys,
                                                                                     monkeypatch):
    # A misspelt address had been waited for as a store's outage: data.outage_minutes (30) of notes.
    # The resolver's answers are given here, the same on any machine: "no such name" for
    # `.invalid` (RFC 6761), "cannot answer now" for a resolver that is down.
    import socket

    from flava.cli import main as cli
    from flava.data import shards

    looked_up = []

    def resolver(host, *args, **kwargs):
        looked_up.append(host)
        if host.endswith(".invalid"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    for proxy in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    spec = "https://shards.no-such-host.invalid/shard-{000..003}.tar"
    code = cli(pretrain_args(train_data, tmp_path / "run") + ["--set", f'data.pairs=["{spec}"]',
                                                                "--set", "data.outage_minutes=0.05"])
    err = capsys.readouterr().err
    assert code == 2 and looked_up == ["shards.no-such-host.invalid"], err  # once for the four shards
    assert len(err.strip().splitlines()) == 1 and "https://shards.no-such-host.invalid/shard-000.tar: no host " \
        "shards.no-such-host.invalid is known to DNS: is the address right?" in " ".join(err.split()), err
    with pytest.raises(DataError, match="no host index.no-such-host.invalid is known to DNS"):
        open_source("pairs", "http://index.no-such-host.invalid/index.json")
    # A resolver that cannot answer now, an IP address, and a proxy's hosts are left to the read.
    assert len(open_source("pairs", "https://store.example/shard-{000..003}.tar").shards) == 4
    looked_up.clear()
    assert len(open_source("pairs", "http://10.1.2.3:8000/shard-{000..001}.tar").shards) == 2 and looked_up == []
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    assert len(open_source("pairs", spec).shards) == 4 and looked_up == []
    assert shards._RESOLVED == set()  # nothing found: nothing kept


def test_a_server_that_cannot_be_reached_is_tried_again_said_and_never_called_missing(http_server, monkeypatch,
                                                                                      capfd):
    import socket

    from flava.data import shards
    from flava.errors import DataError

    url, _ = http_server
    monkeypatch.setattr(shards, "FETCH_TIMEOUT_S", 0.5)
    monkeypatch.setattr(shards, "RETRY_PAUSE_S", 0.05)  # the waits said, not waited out
    with socket.socket() as hole:  # takes connections and never answers: HTTP's reader waited for ever
        hole.bind(("127.0.0.1", 0))
        hole.listen(8)
        stalled = f"http://127.0.0.1:{hole.getsockname()[1]}/x.tar"
        start = time.time()
        with pytest.raises(OSError, match=re.escape(f"{stalled}: no answer in 0.5 s (3 attempts); is the server up")):
            shards.read(stalled)
        assert time.time() - start < 30
    err = capfd.readouterr().err
    assert err.count(f"note: {stalled}: no answer in 0.5 s (attempt ") == 2 and "(attempt 2 of 3)" in err
    # Nothing listening: a refused connection, said and tried again, is no missing shard.
    refused = f"http://127.0.0.1:{free_port()}/x.tar"
    with pytest.raises(OSError, match=re.escape(refused) + r": ClientConnectorError: .*\(3 attempts\)"):
        shards.read(refused)
    assert capfd.readouterr().err.count("trying again") == 2
    # What the server answers it does not hold is missing, at once.
    with pytest.raises(FileNotFoundError):
        shards.read(url + "/nothing.tar")
    assert "trying again" not in capfd.readouterr().err
    # A listing that cannot be had for want of a server says so, not to name shards one by one.
    with pytest.raises(DataError, match=r"could not list http://127.0.0.1:\d+/: ClientConnectorError: .*; is the "
                                        r"server up and the address right\?$"):
        shards.expand(refused.rsplit("/", 1)[0] + "/", (".tar",))
    # A server that answered (a refusal, an error of its own) is not asked about being up.
    assert shards._hint(refused, PermissionError("403 Forbidden")) == ""
    # The user's own fsspec settings for HTTP stay beside the timeout (explicit ones replaced them whole).
    import fsspec

    monkeypatch.setitem(fsspec.config.conf, "http", {"client_kwargs": {"trust_env": True}})
    kwargs = shards._storage_options(refused)["client_kwargs"]
    assert kwargs["trust_env"] is True and kwargs["timeout"].sock_read == 0.5
    # S3's "come back later" (as s3fs raises it) may pass; its refusal does not.
    from botocore.exceptions import ClientError, ReadTimeoutError
    from s3fs.errors import translate_boto_error

    def s3_error(code, status):
        return translate_boto_error(ClientError({"Error": {"Code": code, "Message": code},
                                                 "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"))

    assert shards.unreachable(s3_error("SlowDown", 503)) and shards.unreachable(ReadTimeoutError(endpoint_url="u"))
    assert not shards.unreachable(s3_error("AccessDenied", 403)) and not shards.unreachable(ValueError("bad tar"))
    # An S3 endpoint that cannot be reached (botocore's words) is met with the variable that names another,
    # and where one is named, with the store it names (it had been told to name one all the same).
    for name in ("AWS_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    unreached = OSError('Could not connect to the endpoint URL: "https://b.s3.amazonaws.com/x.tar"')
    assert "named by AWS_ENDPOINT_URL" in shards._hint("s3://b/x.tar", unreached)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert shards._hint("s3://b/x.tar", unreached) == "; is the store AWS_ENDPOINT_URL=http://127.0.0.1:9 names up?"


class _HoldingServer:
    """Shards over HTTP from a thread of this process; once `hold` is set every request waits
    (up to a minute) for `release`, as a stalled store's would. While `answer` is set, every
    request (for the files named in `only`, when any are) is answered with that status instead (503:
    come back later; 403: a refusal)."""

    def __init__(self, root):
        import functools
        import http.server
        import threading

        self.hold, self.release, self.held = threading.Event(), threading.Event(), threading.Event()
        self.answer, self.answered, self.only = 0, 0, set()
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def _served(self) -> bool:
                if outer.hold.is_set():
                    outer.held.set()
                    outer.release.wait(60)
                if outer.answer and (not outer.only or self.path.rsplit("/", 1)[-1] in outer.only):
                    outer.answered += 1
                    self.send_error(outer.answer)
                    return False
                return True

            def do_GET(self):
                if self._served():
                    super().do_GET()

            def do_HEAD(self):
                if self._served():
                    super().do_HEAD()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_a_store_that_says_to_come_back_later_is_waited_for_and_the_stream_is_as_if_it_had_not(tmp_path, monkeypatch,
                                                                                               capfd, workers):
    import threading

    from flava.data import shards, sources

    monkeypatch.setattr(shards, "RETRIES", 1)
    monkeypatch.setattr(sources, "OUTAGE_PAUSES_S", (0.2, 0.4))
    root = write_shards(tmp_path / "www")
    local, _ = batches(open_source("pairs", str(root)))
    server = _HoldingServer(root)
    spec = server.url + "/shard-{000..003}.tar"
    try:
        server.answer = 503  # S3's SlowDown, a gateway's outage: passed over, it changed what the run trained on
        threading.Timer(1.5, lambda: setattr(server, "answer", 0)).start()
        waited, s = batches(open_source("pairs", spec), num_workers=workers, outage_s=60)
        assert server.answered >= 2 and same(local, waited) and not s.rejected
        s._drop_iterator()  # its worker, reading ahead, would wait for the outage below too
        err = capfd.readouterr().err
        assert re.search(r"note: \S+/shard-00\d\.tar: ClientResponseError: 503, message='Service Unavailable'.*; waiting "
                         r"for the store: reading it again in 0\.2 s \(\d s of up to 60 s, data\.outage_minutes\)", err)
        assert re.search(r"note: \S+/shard-00\d\.tar read after [123] s of waiting", err)
        # An outage longer than the stream waits ends it, naming the shard and the setting.
        server.answer = 503
        with pytest.raises(DataError, match=r"^http://\S+/shard-00\d\.tar: ClientResponseError: 503, .*: the store "
                                            r"could not serve it for [12] s \(the wait allowed: "
                                            r"data\.outage_minutes=0\.0166667; a shard that fails so for good is "
                                            r"passed over with 0\)$"):
            batches(open_source("pairs", spec), num_workers=workers, outage_s=1)
        capfd.readouterr()
        # A refusal is no outage: counted and passed over at once, as before; so is any failure with 0.
        for answer, outage in ((403, 60), (503, 0)):
            server.answer, start = answer, time.time()
            with pytest.raises(DataError, match=r"no shard holds a usable record \(met: 4 unreadable shard; e\.g\. "
                                                rf"\S+: ClientResponseError: {answer}, "):
                batches(open_source("pairs", spec), num_workers=workers, outage_s=outage)
            assert time.time() - start < 10
        assert "waiting for the store" not in capfd.readouterr().err
    finally:
        server.close()


@pytest.mark.slow
def test_a_stop_requested_during_a_stalled_read_saves_at_once_and_resumes_exactly(train_data, tmp_path, one_thread):
    # A scheduler's SIGTERM while the loader waited on a stalled store was taken only once the
    # read gave up (three minutes), past any grace period: the run was killed unsaved. The wait
    # is given up, the steps done are saved, and the resume gives the uninterrupted run's losses.
    import multiprocessing
    import threading

    from conftest import narrow, tiny_run

    from flava import stopping
    from flava.train.trainer import Trainer

    server = _HoldingServer(write_shards(tmp_path / "www", shards=8, per=4))
    try:
        def cfg(workers):
            c = narrow(tiny_run(train_data, max_steps=10, save_every=100, log_every=1, tensorboard=False))
            c.data.pairs = [server.url + "/shard-{000..007}.tar"]
            c.data.mixing, c.data.num_workers = [1.0, 0.0, 0.0], workers
            return c

        reference = [r["loss"] for r in Trainer(cfg(0), tmp_path / "ref").fit()]
        for workers in (0, 1):
            server.release.clear()
            cut = Trainer(cfg(workers), tmp_path / f"run-{workers}")
            last = [time.monotonic()]

            def logged(row):
                last[0] = time.monotonic()
                server.hold.set()  # after step 1: the next shard read stalls (the worker's, ahead of its owner)

            def signal_once_waiting():  # the owner waiting: no step for 1 s after a read stalled
                server.held.wait(60)
                while time.monotonic() - last[0] < 1:
                    time.sleep(0.05)
                if ended.is_set():  # the handlers are gone: the signal would end this test process
                    return
                sent.append(time.monotonic())
                os.kill(os.getpid(), signal.SIGTERM)
                if not ended.wait(25):  # a stop that waits on the read is let through, to be seen late
                    server.release.set()

            cut.log, ended, sent = logged, threading.Event(), []
            sender = threading.Thread(target=signal_once_waiting, daemon=True)
            sender.start()
            before = {p.pid for p in multiprocessing.active_children()}
            with stopping.handling():
                try:
                    cut.fit()
                finally:
                    ended.set()
            stopped_in = time.monotonic() - sent[0]
            # The worker stuck in the read is gone too: the loader's own shutdown waited ~10 s for it at exit.
            assert not [p for p in multiprocessing.active_children() if p.pid not in before]
            sender.join(5)
            server.hold.clear(), server.held.clear(), server.release.set()
            # Stopped well before the read's own limit (60 s a try, three tries), with its step saved.
            assert cut.stopped == signal.SIGTERM and 1 <= cut.step < 10 and stopped_in < 20, (cut.step, stopped_in)
            again = Trainer(cfg(workers), tmp_path / f"run-{workers}")
            assert again.resume() and again.step == cut.step
            assert [r["loss"] for r in again.fit()] == pytest.approx(reference[cut.step:], abs=1e-6), workers
    finally:
        server.close()


@pytest.mark.slow
def test_a_store_down_longer_than_the_run_waits_ends_it_saved_amid_an_accumulated_step(train_data, tmp_path, one_thread,
                                                                                      monkeypatch):
    # With gradient accumulation the run had ended unsaved: the step's first micro-batch had moved
    # its stream. The step is undone, the steps done are saved, and the resume gives the
    # uninterrupted run's losses.
    from conftest import narrow, tiny_run

    from flava.data import shards, sources
    from flava.train.trainer import Trainer

    monkeypatch.setattr(shards, "RETRIES", 1)
    monkeypatch.setattr(sources, "OUTAGE_PAUSES_S", (0.2, 0.4))
    server = _HoldingServer(write_shards(tmp_path / "www", shards=4, per=12))
    try:
        def cfg():
            c = narrow(tiny_run(train_data, max_steps=5, save_every=100, log_every=1, tensorboard=False))
            c.data.pairs, c.data.mixing, c.data.lanes = [server.url + "/shard-{000..003}.tar"], [1.0, 0.0, 0.0], 1
            c.optim.grad_accumulation, c.data.outage_minutes = 2, 1 / 60
            return c

        reference = [r["loss"] for r in Trainer(cfg(), tmp_path / "ref").fit()]
        cut = Trainer(cfg(), tmp_path / "run")
        # A shard holds 3 draws of 4: step 5's first micro-batch is read from the open shard, its
        # second opens the next.
        cut.log = lambda row: setattr(server, "answer", 503 if row["step"] == 4 else server.answer)
        with pytest.raises(DataError, match=r"^http://\S+/shard-00\d\.tar: ClientResponseError: 503, .*: the store "
                                            r"could not serve it for [12] s .*; step 4 is saved in \S*step_00000004: once "
                                            r"the data is readable, continue with --resume$"):
            cut.fit()
        server.answer = 0
        again = Trainer(cfg(), tmp_path / "run")
        assert again.resume() and again.step == 4
        assert [r["loss"] for r in again.fit()] == pytest.approx(reference[4:], abs=1e-6)
    finally:
        server.close()


@pytest.mark.slow  # processes started
def test_a_loader_worker_that_dies_is_started_again_and_the_stream_is_as_if_it_had_not(tmp_path, capfd):
    # torch's SIGCHLD handler raised in this process wherever it was (a step, a checkpoint's
    # write): the run ended there, with the steps since its last checkpoint lost.
    from torch.utils.data import get_worker_info

    root = write_shards(tmp_path / "s", shards=4, per=30)
    reference, _ = batches(open_source("pairs", str(root)), n=10)
    got, s = batches(open_source("pairs", str(root)), n=2, num_workers=2)
    victim = s._it._workers[0]
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(10)
    time.sleep(0.2)  # where torch's handler raised
    # Past the 4 draws a worker may have prepared before it was killed (prefetch_factor 4): one of
    # its parts must be asked of it after its death.
    got += [s.next_batch() for _ in range(8)]
    s._drop_iterator()
    assert same(reference, got) and len(got) == 10
    assert f"a loader worker died (pid {victim.pid}, killed by SIGKILL); its draw is read again by new workers" in \
        capfd.readouterr().err

    class Crashing(SampleMaker):  # a decoder that crashes on a record: every worker dies on it
        def __call__(self, *args):
            if get_worker_info() is not None:
                os.kill(os.getpid(), signal.SIGKILL)
            return super().__call__(*args)

    s = BatchStream("pairs", open_source("pairs", str(root)), Crashing(SPEC, 0), batch_size=4, seed=3, num_workers=1)
    with pytest.raises(DataError, match=r"its loader workers died 4 times at draw 0 \(pid \d+, killed by SIGKILL\); "
                                        r"SIGKILL is most often the out-of-memory killer: lower data\.num_workers"):
        s.next_batch()


@pytest.mark.slow
def test_a_run_whose_loader_worker_is_killed_goes_on_as_if_it_had_not(train_data, tmp_path, one_thread):
    from conftest import narrow, tiny_run

    from flava.train.trainer import Trainer

    def cfg():
        c = narrow(tiny_run(train_data, max_steps=4, save_every=100, log_every=1, tensorboard=False))
        c.data.mixing, c.data.num_workers = [1.0, 0.0, 0.0], 1
        return c

    reference = [r["loss"] for r in Trainer(cfg(), tmp_path / "ref").fit()]
    run = Trainer(cfg(), tmp_path / "run")

    def kill_the_worker(row):
        if row["step"] == 2:
            worker = run.streams["pairs"].streams[0]._it._workers[0]
            os.kill(worker.pid, signal.SIGKILL)
            worker.join(10)
            time.sleep(0.2)

    run.log = kill_the_worker
    losses = [r["loss"] for r in run.fit()]
    run.streams["pairs"].streams[0]._drop_iterator()
    assert losses == pytest.approx(reference, abs=1e-6)


def test_a_stop_ends_a_stalled_pipe_command_and_what_it_started(tmp_path):
    # webdataset's pipe waited for its command at close (up to two hours), and the command's own
    # children outlived it: a read given up ends them all.
    import threading

    from flava import stopping
    from flava.data import shards

    pid_file = tmp_path / "pid"
    url = f"pipe:sleep 60 & echo $! > {pid_file}; wait"
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    start = time.monotonic()
    try:
        with stopping.handling(), pytest.raises(stopping.Abandoned):
            timer.start()
            with stopping.abandonable(), stopping.interruptible():
                shards.read(url)
    finally:
        timer.cancel()  # never after the handlers are gone: the signal would end this test process
    assert time.monotonic() - start < 10
    sleeper = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while proc_state(sleeper) not in ("X", "Z") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc_state(sleeper) in ("X", "Z")  # gone, or a zombie awaiting a reaper


def test_a_cache_smaller_than_the_shards_in_use_loses_none_of_them(tmp_path):
    # Two lanes read two shards at once from a cache that holds one: each fetch evicts the other
    # lane's shard, which it goes on reading through the descriptor it opened.
    root = write_shards(tmp_path / "d", shards=4)
    local, _ = batches(open_source("pairs", str(root)), n=8)
    cache = ShardCache(str(tmp_path / "cache"), max_bytes=(root / "shard-000.tar").stat().st_size)
    (tmp_path / "cache").mkdir()
    stale = tmp_path / "cache" / ".dead-writer.tar.123.part"
    stale.write_bytes(b"half a shard")
    os.utime(stale, (time.time() - 7200,) * 2)
    cached, s = batches(open_source("pairs", f"pipe:cat {root}/shard-{{000..003}}.tar", cache=cache), n=8)
    assert same(local, cached) and not s.rejected
    assert len(list((tmp_path / "cache").iterdir())) == 1 and not stale.exists()


def test_pipe_commands_read_shards(tmp_path):
    root = write_shards(tmp_path / "d", shards=2)
    local, _ = batches(open_source("pairs", str(root)))
    piped, _ = batches(open_source("pairs", f"pipe:cat {root}/shard-{{000..001}}.tar"))
    assert same(local, piped)


@pytest.mark.slow
def test_training_from_an_s3_server(tmp_path):
    import boto3  # with moto[server], from the test extra
    from moto.server import ThreadedMotoServer

    root = write_shards(tmp_path / "d")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": endpoint}
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                          region_name="us-east-1")
        s3.create_bucket(Bucket="data")
        for f in sorted(root.iterdir()):
            s3.upload_file(str(f), "data", f"pairs/{f.name}")
        import fsspec.config

        old = dict(os.environ)
        os.environ.update(env)
        fsspec.config.conf["s3"] = {"endpoint_url": endpoint}
        try:
            local, _ = batches(open_source("pairs", str(root)))
            listed = open_source("pairs", "s3://data/pairs/")  # a listing of the bucket's prefix
            assert [s.url for s in listed.shards] == [f"s3://data/pairs/shard-{k:03d}.tar" for k in range(4)]
            remote, _ = batches(listed)
            assert same(local, remote)
            # Shards the store does not hold: refused, naming the first and what the store said.
            with pytest.raises(DataError, match=r"no shard holds a usable record \(met: \d+ missing shard; e\.g\. "
                                                r"s3://data/pairs/gone-00\d\.tar: .+\)"):
                batches(open_source("pairs", "s3://data/pairs/gone-{000..001}.tar"))
        finally:
            fsspec.config.conf.pop("s3", None)
            os.environ.clear()
            os.environ.update(old)
        # The real command, reading the bucket through a brace range.
        run = tmp_path / "run"
        args = ["pretrain", "--output", str(run), "--max-steps", "2", "--set", "data.batch_size=4",
                "--set", 'data.pairs=["s3://data/pairs/shard-{000..003}.tar"]', "--set", "data.num_workers=1",
                "--set", "objectives.mmm_image_weight=0", "--set", "objectives.mim_weight=0",
                "--set", "tensorboard=false", "--set", "log_every=1"]
        out = python(["-m", "flava.cli", *args], {**os.environ, **env, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stdout + out.stderr
        summary = json.loads((run / "summary.json").read_text())
        assert summary["samples_by_source"]["pairs"] == {"s3://data/pairs/shard-{000..003}.tar": 8}
    finally:
        server.stop()


def _alive(pid: int) -> bool:
    try:
        return not open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_a_loader_worker_told_to_end_serves_its_owner_until_shut_down(tmp_path):
    # SIGTERM to the whole process group reaches the workers while their owner runs on to the step
    # where it stops (under torchrun, up to log_every steps later, which may be minutes): they
    # serve until then, here 12 s and 12 draws later.
    import multiprocessing

    root = write_shards(tmp_path / "d", shards=2)
    s = BatchStream("pairs", open_source("pairs", str(root)), SampleMaker(SPEC, 0), batch_size=4, seed=3,
                    num_workers=1)
    before = {p.pid for p in multiprocessing.active_children()}  # an earlier test's in this process may linger
    first = [s.next_batch()]
    (worker,) = [p for p in multiprocessing.active_children() if p.pid not in before]
    os.kill(worker.pid, signal.SIGTERM)
    time.sleep(12)
    more = [s.next_batch() for _ in range(12)]  # past the 4 draws prefetched before the signal
    whole, _ = batches(open_source("pairs", str(root)), n=13)
    assert len(more) == 12 and all(torch.equal(a.pixel_values, b.pixel_values)
                                   for a, b in zip(whole[1:], more)) and torch.equal(whole[0].input_ids, first[0].input_ids)
    s._it = None  # shut down as a finished stream is
    deadline = time.time() + 20
    while _alive(worker.pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(worker.pid)


def _owner_signalling_its_worker(root, ending: str, timeout: float) -> subprocess.CompletedProcess:
    """A process that opens a stream with one loader worker, sends the worker SIGTERM (as a
    scheduler signalling the group does), prints the worker's pid and ends with `ending`."""
    return python(["-c", f"""
import multiprocessing, os, signal, time
from flava.data.pipeline import BatchStream
from flava.data.registry import open_source
from flava.data.samples import SampleMaker, SampleSpec
s = BatchStream("pairs", open_source("pairs", {str(root)!r}), SampleMaker(SampleSpec(32, 32, 4, 16), 0), 4, seed=3,
                num_workers=1)
s.next_batch()
(w,) = multiprocessing.active_children()
os.kill(w.pid, signal.SIGTERM)
time.sleep(0.5)
print(w.pid, flush=True)
{ending}
"""], {**os.environ, "OMP_NUM_THREADS": "1"}, timeout)


@pytest.mark.slow
def test_a_loader_worker_told_to_end_goes_when_its_owner_is_gone(tmp_path):
    owner = _owner_signalling_its_worker(write_shards(tmp_path / "d", shards=2),
                                         "os._exit(0)  # gone without shutting its worker down", 120)
    assert owner.returncode == 0, owner.stderr
    pid = int(owner.stdout.split()[-1])
    deadline = time.time() + 5  # it looks every OWNER_POLL_S
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "the worker outlived its owner"


@pytest.mark.slow
def test_an_owner_that_exits_is_not_held_by_a_worker_told_to_end(tmp_path):
    # At its exit an owner joins its workers (multiprocessing's exit handler, which also sends
    # SIGTERM, as DataLoader does to a slow one): a worker serving through SIGTERM until its owner
    # is gone would wait for an owner waiting for it.
    root = write_shards(tmp_path / "d", shards=2)
    t = time.time()
    owner = _owner_signalling_its_worker(root, "pass  # a normal exit, the stream still open", 60)
    assert owner.returncode == 0 and owner.stdout.strip().isdigit(), owner.stderr
    assert time.time() - t < 15  # it does not wait out a grace period either


def test_a_stream_draws_nothing_from_the_global_generator(tmp_path):
    # A checkpoint restores torch's global generator for dropout; a stream rebuilt on resume must
    # not move it, or the resumed run's dropout would differ from the uninterrupted run's.
    root = write_shards(tmp_path / "d", shards=2)
    for workers in (0, 1):
        s = BatchStream("pairs", open_source("pairs", str(root)), SampleMaker(SPEC, 0), batch_size=4, seed=3,
                        num_workers=workers)
        before = torch.get_rng_state()
        s.next_batch()
        s.load_state(s.state())  # as a resume does: the next draw builds the iterator again
        s.next_batch()
        assert torch.equal(before, torch.get_rng_state()), workers
        s._it = None


def test_text_is_read_by_byte_ranges_without_losing_or_repeating_a_line(tmp_path, monkeypatch):
    lines = [f"line {i} " + "word " * (i % 7) for i in range(200)]
    (tmp_path / "t.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(texts, "TEXT_RANGE_BYTES", 97)  # ranges that cut lines in the middle
    src = open_source("text", str(tmp_path / "t.txt"))
    assert len(src.shards) > 20 and [r.strip() for r in src.records] == [x.strip() for x in lines]
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": x}) + "\n" for x in lines[:10]))
    z = open_source("text", str(tmp_path / "z.jsonl.gz"))
    assert len(z.shards) == 1 and z.records == lines[:10]


def test_a_text_file_gives_the_same_texts_compressed_or_not_whatever_its_line_endings(tmp_path, monkeypatch):
    # A file of old Mac line endings (a lone \r) was one text read by byte ranges, and 50 texts
    # gzipped (read whole, split by bytes.splitlines). Lines end at \n, \r\n or \r in both.
    mac = b"".join(f"classic mac line {i}\r".encode() for i in range(50))
    (tmp_path / "cr.txt").write_bytes(mac)
    (tmp_path / "cr.txt.gz").write_bytes(gzip.compress(mac))
    want = [f"classic mac line {i}" for i in range(50)]
    assert text_file(str(tmp_path / "cr.txt")).records == text_file(str(tmp_path / "cr.txt.gz")).records == want
    # Every mix of endings, with ranges cut anywhere (between a \r and its \n too): no line lost,
    # none read twice, the same as the compressed copy's.
    rng = np.random.default_rng(0)
    ends = [b"\n", b"\r", b"\r\n", b"\r\r\n", b"\n\n"]
    for trial in range(30):
        data = b"".join(f"t{trial} line {i}".encode() + ends[int(rng.integers(len(ends)))] for i in range(40))
        data = data[:int(rng.integers(len(data) - 5, len(data) + 1))]  # at times no ending at the end
        (tmp_path / "m.txt").write_bytes(data)
        (tmp_path / "m.txt.gz").write_bytes(gzip.compress(data))
        whole = [x.decode() for x in data.splitlines() if x.strip()]
        monkeypatch.setattr(texts, "TEXT_RANGE_BYTES", int(rng.integers(1, 40)))
        ranged = text_file(str(tmp_path / "m.txt"))
        assert len(ranged.shards) > 1 and ranged.records == whole, trial
        assert text_file(str(tmp_path / "m.txt.gz")).records == whole, trial


def test_weighted_mixing_is_seeded_resumable_and_counted(tmp_path):
    a, b = write_shards(tmp_path / "a", shards=2), write_shards(tmp_path / "b", shards=2)
    maker = SampleMaker(SPEC, 0)

    class Weighted:
        def __init__(self, path, weight):
            self.path, self.weight = path, weight

    def make():
        return open_stream("pairs", [Weighted(str(a), 3.0), Weighted(str(b), 1.0)], maker, batch_size=2, seed=1)

    s = make()
    assert isinstance(s, KindStream)
    for _ in range(40):
        s.next_batch()
    seen = s.samples_by_source
    assert sum(seen.values()) == 80 and 0.6 < seen[str(a)] / 80 < 0.9  # about three quarters
    state = s.state()
    more = [s.next_batch().input_ids for _ in range(5)]
    t = make()
    t.load_states([state])
    assert all(torch.equal(t.next_batch().input_ids, x) for x in more)
    with pytest.raises(DataError, match="a weight, or none"):
        open_stream("pairs", [Weighted(str(a), 1.0), str(b)], maker, batch_size=2, seed=1)


@pytest.mark.slow
def test_prepare_then_train_without_the_codebook(train_data, tmp_path, capsys):
    from flava.cli import main as cli
    from flava.config import preset
    from flava.data.samples import read_npy
    from flava.data.transforms import map_pixels, to_tensor
    from flava.loading import load_codebook
    from flava.train.presets import demo_config
    from flava.train.trainer import Trainer

    codebook = train_data / "codebook"
    out = tmp_path / "prepared"
    args = ["prepare", "--pairs", str(train_data / "pairs.csv"), "--output", str(out), "--codebook", str(codebook),
            "--shard-size", "5", "--size", "24", "--workers", "2"]
    assert cli(args) == 0
    # Images stored smaller than the model's input are upscaled in training: said at the start; and
    # the tiny preset's heads predict another vocabulary than this codebook's 64 tokens.
    said = " ".join(capsys.readouterr().out.split())
    assert "--size 24 is below the model's 64-px input" in said
    assert "the codebook has 64 tokens and the --config model's MIM/MMM heads predict 512" in said
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["samples"] == 16 and report["dropped"] == {"missing image file": 1} and report["shards"] == 4
    index = json.loads((out / "index.json").read_text())
    assert [s["nsamples"] for s in index["shardlist"]] == [5, 5, 5, 1]
    assert index["flava"]["codebook"] == load_codebook(codebook).fingerprint()

    # Other settings into the same folder: refused, naming what differs.
    assert cli([a if a != "5" else "6" for a in args]) == 2
    assert "other inputs or settings (settings.shard_size: 5 -> 6)" in " ".join(capsys.readouterr().err.split())
    # Interrupted work resumes: a shard removed is made again, the same bytes.
    before = (out / "00001.tar").read_bytes()
    (out / "00001.tar").unlink()
    (out / "00001.json").unlink()
    assert cli(args) == 0 and (out / "00001.tar").read_bytes() == before

    # The stored tokens are the codebook's for the stored image cropped by the stored box.
    cb = load_codebook(codebook)
    record = open_source("pairs", str(out)).records[3]
    image = decode.open_image(record.image)
    boxes, tokens = read_npy(record.prepared.crops), read_npy(record.prepared.tokens)
    tiny = preset("tiny")
    assert boxes.shape == (4, 4) and tokens.shape == (4, tiny.image.grid_size ** 2)
    assert np.array_equal(boxes[0], [0, 0, 1, 1]) and not np.array_equal(boxes[1], boxes[2])
    for k in range(4):
        box = tuple(float(v) for v in boxes[k] * np.array([image.width, image.height] * 2))
        size = tiny.codebook_image_size
        crop = map_pixels(to_tensor(image.resize((size, size), Image.BICUBIC, box=box)))
        assert torch.equal(cb.token_ids(crop[None])[0].to(torch.int64), torch.from_numpy(tokens[k].astype(np.int64)))

    # Images from a folder, labels kept.
    assert cli(["prepare", "--images", str(train_data / "img"), "--output", str(tmp_path / "imgs"),
                "--codebook", str(codebook), "--workers", "1"]) == 0
    assert "was trained on" not in capsys.readouterr().out  # a codebook of the model's scale
    assert cli(["prepare", "--images", str(train_data / "img" / "a" / "0.png"), "--output", str(tmp_path / "small"),
                "--codebook", str(codebook), "--workers", "1", "--config", "small"]) == 0
    assert "the codebook " + str(codebook) + " was trained on 64-px images (8x8 tokens), but the --config model's " \
           "14x14 patch grid gives it 112-px ones" in " ".join(capsys.readouterr().out.split())
    labels = [r.label for r in open_source("images", str(tmp_path / "imgs")).records]
    assert len(labels) == 16 and set(labels) == {0}

    cfg = demo_config()
    cfg.model.image.vocab_size = cfg.model.codebook.vocab_size = 64
    cfg.data.pairs, cfg.data.images, cfg.data.batch_size, cfg.data.num_workers = [str(out)], [str(tmp_path / "imgs")], 4, 0
    cfg.data.mixing, cfg.tensorboard, cfg.seed = [0.5, 0.5, 0], False, 5
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.model.codebook is None  # never loaded, never run
    assert not [n for n in trainer.notes if "crop_scale_min" in n]
    cfg.data.crop_scale_min = 0.5  # the prepared crops were chosen at 0.9: said, as the setting cannot reach them
    assert f"{out}: its crops were chosen when it was prepared (--crop-scale-min 0.9): data.crop_scale_min=0.5 " \
           "does not apply to it" in Trainer(cfg, tmp_path / "run5").notes
    cfg.data.crop_scale_min = 0.9
    assert not [n for n in trainer.notes if "earlier flava" in n]
    index = json.loads((out / "index.json").read_text())
    del index["flava"]["decoded"]  # as a release before crops were decoded at the fast DCT scales alone wrote it
    (out / "index.json").write_text(json.dumps(index))
    assert f"{out} was prepared by an earlier flava: some of its image tokens describe slightly other pixels than " \
           "training shows the model; prepare it again for exact MIM/MMM targets" in Trainer(cfg, tmp_path / "run6").notes
    (out / "index.json").write_text(json.dumps({**index, "flava": {**index["flava"], "decoded": "fast-dct-scales"}}))
    rows = trainer.fit(max_steps=4)
    trained = {name for r in rows for name in r["losses"]}
    assert {"mim", "mmm_image"} <= trained and all(np.isfinite(r["loss"]) for r in rows)
    # Heads of another vocabulary than the tokens': refused (an 8192-way head had trained on 64 tokens).
    cfg.model.image.vocab_size = 8192
    with pytest.raises(Exception, match=r"holds image tokens of a 64-token codebook but the MIM/MMM heads predict "
                                        r"image.vocab_size=8192: set model.image.vocab_size=64"):
        Trainer(cfg, tmp_path / "run4")
    cfg.model.image.vocab_size = 64
    cfg.data.pairs = [str(train_data / "pairs.csv")]  # raw pairs need a codebook
    with pytest.raises(Exception, match="no codebook is given"):
        Trainer(cfg, tmp_path / "run2")
    # A model of another patch grid is told how to prepare again.
    cfg.data.pairs = [str(out)]
    cfg.model.image.patch_size //= 2
    with pytest.raises(Exception, match=r"was prepared for a 8x8 patch grid; the model has 16x16: prepare the data "
                                        r"again"):
        Trainer(cfg, tmp_path / "run3")


@pytest.fixture(scope="module")
def prepared_thrice(train_data, tmp_path_factory):
    """Four pairs prepared (two shards) by three codebooks: the tests' 64-token one (a), another
    64-token one (b) and a 1024-token one (c); `prepare(out, codebook)` prepares them again."""
    import types

    import flava
    from flava.cli import main as cli
    from flava.config import preset, to_dict
    from flava.io.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("prepared")

    def codebook(name: str, vocab: int):
        cfg = preset("tiny")
        cfg.image.vocab_size = cfg.codebook.vocab_size = vocab
        cfg.codebook.hidden_size = 8
        torch.manual_seed(vocab + len(name))
        save_checkpoint(root / name, to_dict(cfg), {"codebook": flava.FlavaImageCodebook(cfg.codebook).state_dict()})
        return root / name

    table = root / "pairs.csv"
    table.write_text("\n".join((train_data / "pairs_clean.csv").read_text().splitlines()[:5]).replace(
        "img/", f"{train_data}/img/") + "\n")

    def prepare(out, cb):
        assert cli(["prepare", "--pairs", str(table), "--output", str(out), "--codebook", str(cb), "--workers", "1",
                    "--size", "64", "--shard-size", "2"]) == 0
        return out

    cb1 = train_data / "codebook"
    a, b = prepare(root / "a", cb1), prepare(root / "b", codebook("cb2", 64))
    c = prepare(root / "c", codebook("cb3", 1024))
    fp1, fp2 = (json.loads((p / "index.json").read_text())["flava"]["codebook"] for p in (a, b))
    return types.SimpleNamespace(root=root, a=a, b=b, c=c, cb1=cb1, fp1=fp1, fp2=fp2, prepare=prepare)


def _pair_trainer(output, *pairs, codebook=None):
    """A tiny joint run's Trainer on `pairs` alone, with 64-token heads."""
    from flava.train.presets import demo_config
    from flava.train.trainer import Trainer

    cfg = demo_config()
    cfg.model.image.vocab_size = cfg.model.codebook.vocab_size = 64
    cfg.data.pairs, cfg.data.batch_size, cfg.data.num_workers, cfg.tensorboard = [str(p) for p in pairs], 4, 0, False
    cfg.codebook = str(codebook) if codebook else ""
    return Trainer(cfg, output)


@pytest.mark.slow
def test_sources_prepared_by_other_codebooks_are_refused_together_and_on_resume(prepared_thrice, tmp_path, capsys):
    # Without codebook= nothing compared the sources: token k meant two patches and both trained as
    # MIM/MMM targets; and a run whose data was prepared again by another codebook resumed on.
    import shutil

    from flava.cli import main as cli

    p = prepared_thrice
    with pytest.raises(ConfigError, match=rf"data.pairs {p.a} and data.pairs {p.b} hold image tokens of different "
                                          rf"codebooks \({p.fp1} and {p.fp2}\).*prepare them with one codebook"):
        _pair_trainer(tmp_path / "run", p.a, p.b)

    data = shutil.copytree(p.b, tmp_path / "data")
    run = tmp_path / "resumed"
    args = ["pretrain", "--output", str(run), "--max-steps", "1", "--set", f'data.pairs=["{data}"]', "--set",
            "model.image.vocab_size=64", "--set", "data.batch_size=4", "--set", "data.num_workers=0", *narrow_args()]
    assert cli(args) == 0
    shutil.rmtree(data)
    p.prepare(data, p.cb1)
    capsys.readouterr()
    assert cli([*args[:3], "--resume", "--max-steps", "2"]) == 2
    said = capsys.readouterr().err
    assert "Traceback" not in said
    assert f"the run trained on image tokens of codebook {p.fp2}, but data.pairs {data} holds those of codebook " \
           f"{p.fp1}: prepare the data again with the run's codebook" in " ".join(said.split())


def test_prepared_shards_named_by_glob_or_one_by_one_get_the_folders_checks(prepared_thrice, tmp_path):
    # Only a folder's index.json made shards prepared: named otherwise, another codebook's tokens
    # trained under codebook=, a 1024-token codebook's ended in `IndexError: Target 519 is out of
    # bounds`, and with no codebook the data was said to have "none precomputed".
    import shutil

    p = prepared_thrice
    with pytest.raises(ConfigError, match=rf"{p.b}/\*.tar holds image tokens of another codebook \({p.fp2}\) than "
                                          rf"{p.cb1}"):
        _pair_trainer(tmp_path / "run", f"{p.b}/*.tar", codebook=p.cb1)
    with pytest.raises(ConfigError, match=r"00000.tar holds image tokens of a 1024-token codebook but the MIM/MMM "
                                          r"heads predict image.vocab_size=64: set model.image.vocab_size=1024"):
        _pair_trainer(tmp_path / "run", f"{p.c}/00000.tar")
    with pytest.raises(ConfigError, match=rf"names shards prepared otherwise \({p.a}: codebook {p.fp1}; {p.b}: "
                                          rf"codebook {p.fp2}\): name each folder as a source of its own"):
        _pair_trainer(tmp_path / "run", f"{p.root}/[ab]/*.tar")
    # Its tokens are the targets: no codebook needed, none loaded.
    assert _pair_trainer(tmp_path / "run", f"{p.b}/{{00000..00001}}.tar").model.codebook is None
    # Counted by the index too, as the folder is (they had been sized as estimates from the first).
    from flava.data.registry import open_source

    whole = open_source("pairs", str(p.b)).known_size
    assert open_source("pairs", f"{p.b}/*.tar").known_size == whole is not None
    assert open_source("pairs", f"{p.b}/00000.tar").known_size == json.loads(
        (p.b / "index.json").read_text())["shardlist"][0]["nsamples"]
    # Shards copied without their index (or remote ones, not looked up) are not checked at the start,
    # but ids past the heads are bad samples, not a traceback from the loss.
    shutil.copytree(p.c, tmp_path / "loose", ignore=shutil.ignore_patterns("*.json"))
    with pytest.raises(DataError, match=r"none of \d+ records .* prepared tokens beyond the model's image.vocab_size"):
        _pair_trainer(tmp_path / "run", tmp_path / "loose", codebook=p.cb1)


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


@pytest.mark.distributed
def test_a_two_process_run_killed_resumes_on_one_process(train_data, tmp_path):
    shards = write_shards(tmp_path / "shards", shards=4, per=6)
    steps = 12  # the kill after step 3 leaves nine to go
    opts = ["--max-steps", str(steps), "--save-every", "2", "--set", "seed=5", "--set", "optim.warmup_steps=1",
            "--set", f'data.pairs=["{shards}"]', "--set", "data.lanes=4", *narrow_args()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    flava = ["-m", "flava.cli"]
    whole = Process(flava + pretrain_args(train_data, tmp_path / "whole", batch_size=8) + opts, env, merge=True,
                    plain=True)
    cut = tmp_path / "cut"
    two = Process(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *flava,
                   *pretrain_args(train_data, cut, batch_size=4), *opts], env, merge=True)
    log = cut / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and two.poll() is None:  # kill every process after step 3 (checkpoint: 2)
        if log.is_file() and any(json.loads(x)["step"] >= 3 for x in log.read_text().splitlines() if x.strip()):
            break
        time.sleep(0.05)
    workers = descendants(two.pid)
    assert two.poll() is None, two.communicate()[0]
    for pid in [two.pid, *descendants(two.pid)]:  # torchrun and its workers, as a node failure would
        os.kill(pid, signal.SIGKILL)
    two.wait()
    deadline = time.time() + 30
    while time.time() < deadline and not all(finished(p) for p in workers):
        time.sleep(0.05)
    done = [json.loads(x)["step"] for x in log.read_text().splitlines() if x.strip()]
    assert 3 <= max(done) < steps, done
    resumed = python(flava + ["pretrain", "--output", str(cut), "--resume", "--set", "data.batch_size=8",
                              "--override"], env)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr, "lock held by", openers(cut / ".lock"))
    import re

    at = re.search(r"resumed from step (\d+)", resumed.stdout)
    assert at and int(at.group(1)) < steps, resumed.stdout
    out, _ = whole.communicate(timeout=300)
    assert whole.returncode == 0, out
    a = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    for x, y in zip(a, b):
        assert x["kind"] == y["kind"] and x["data_draws"] == y["data_draws"] and x["samples"] == y["samples"] == 8
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-4), (x, y)
        for name in x["losses"]:
            assert x["losses"][name] == pytest.approx(y["losses"][name], abs=1e-4), name


@dataclasses.dataclass(frozen=True)
class _CalledWhere:
    """A tokenizer factory that records, in a file, the processes that made a tokenizer."""

    inner: object
    record: str

    def __call__(self):
        with open(self.record, "a") as f:
            f.write(f"{os.getpid()}\n")
        return self.inner()


@pytest.mark.slow  # its pool's processes start
def test_prepare_on_a_gpu_tokenises_what_its_processes_read_in_one_process(train_data, tmp_path):
    # Each pool process had tokenised on the device: a CUDA context and a codebook apiece, which on
    # a small GPU could exhaust its memory. The shards are those one process writes.
    from flava.config import preset
    from flava.data.prepare import PrepareSettings, prepare
    from flava.loading import CodebookTokenizer

    settings = PrepareSettings(size=24, shard_size=5, codebook_image_size=preset("tiny").codebook_image_size,
                               image_size=preset("tiny").image.image_size)
    made = {}
    for name, workers, here in (("one", 1, False), ("pool", 2, True)):
        record = tmp_path / f"{name}.pids"
        tokenizer = _CalledWhere(CodebookTokenizer(str(train_data / "codebook"), "cpu"), str(record))
        report = prepare("pairs", [open_source("pairs", str(train_data / "pairs.csv"))], tmp_path / name, settings,
                         tokenizer, "fingerprint", workers=workers, tokenize_here=here)
        assert report["samples"] == 16 and report["shards"] == 4 and report["image_tokens"]
        assert record.read_text().split() == [str(os.getpid())]  # made once, here
        made[name] = {p.name: p.read_bytes() for p in sorted((tmp_path / name).glob("*.tar"))}
    assert len(made["one"]) == 4 and made["pool"] == made["one"]


def test_prepare_counts_the_table_rows_it_could_not_read(train_data, tmp_path, capsys):
    from flava.cli import main as cli

    table = tmp_path / "pairs.csv"
    rows = (train_data / "pairs_clean.csv").read_text().replace("img/", str(train_data / "img") + "/")
    table.write_bytes(rows.encode() + f"{train_data / 'img' / 'a' / '0.png'},caf\xe9 au lait\n".encode("latin-1"))
    assert cli(["prepare", "--pairs", str(table), "--output", str(tmp_path / "out"), "--workers", "1",
                "--size", "24"]) == 0
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert report["samples"] == 16 and sum(report["dropped"].values()) == 1, report["dropped"]
    # Into a folder of other files: refused, the files left alone.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep\n")
    assert cli(["prepare", "--pairs", str(table), "--output", str(tmp_path / "mine"), "--workers", "1"]) == 2
    assert [f.name for f in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    # No processes at all: refused (-1 had run 'with -1 process', 0 as the default).
    for n in ("0", "-1"):
        assert cli(["prepare", "--pairs", str(table), "--output", str(tmp_path / "none"), "--workers", n]) == 2
        assert f"--workers must be at least 1 (it is {n})" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_prepare_leaves_the_inputs_a_store_failed_to_give_to_its_next_run(tmp_path, monkeypatch, capsys):
    # A store down for a moment wrote its shards as empty, finished units: every rerun then
    # refused the output for want of samples, for good.
    from flava.cli import main as cli
    from flava.data import shards

    monkeypatch.setattr(shards, "RETRIES", 1)
    root = write_shards(tmp_path / "www", shards=2, per=3)
    port = free_port()
    args = ["prepare", "--pairs", f"http://127.0.0.1:{port}/shard-{{000..001}}.tar", "--output", str(tmp_path / "out"),
            "--workers", "1", "--size", "16"]
    assert cli(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"2 of 2 inputs could not be read (e.g. http://127.0.0.1:{port}/shard-000.tar: " in err
    assert "run the same command again to finish once they can be read" in err
    assert not (tmp_path / "out" / "index.json").exists()
    server = serve(root, port)
    try:
        assert cli(args) == 0
    finally:
        server.terminate()
        server.wait(timeout=10)
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert report["samples"] == 6 and not report["dropped"]
    # An input that fails for good (a command that fails, a store's refusal) is counted, not waited for.
    failing = ["prepare", "--pairs", f"pipe:cat {root}/shard-000.tar", "pipe:false", "--output", str(tmp_path / "p"),
               "--workers", "1", "--size", "16"]
    assert cli(failing) == 0
    report = json.loads((tmp_path / "p" / "prepare_report.json").read_text())
    assert report["samples"] == 3 and report["dropped"] == {"unreadable shard": 1}
    # A store that keeps saying to come back later (503) holds the output until --skip-unreadable.
    held = _HoldingServer(root)
    try:
        held.answer = 503
        busy = ["prepare", "--pairs", str(root / "shard-000.tar"), held.url + "/shard-001.tar", "--output",
                str(tmp_path / "s"), "--workers", "1", "--size", "16"]
        assert cli(busy) == 2
        assert "1 of 2 inputs could not be read" in " ".join(capsys.readouterr().err.split())
        assert cli(busy + ["--skip-unreadable"]) == 0
    finally:
        held.close()
    report = json.loads((tmp_path / "s" / "prepare_report.json").read_text())
    assert report["samples"] == 3 and report["dropped"] == {"unreadable shard": 1}


@pytest.mark.parametrize("workers", ["1", pytest.param("2", marks=pytest.mark.slow)])  # 2: processes started
def test_a_stop_during_a_stalled_read_ends_prepare_promptly_and_a_rerun_finishes_it(tmp_path, workers, capsys,
                                                                                     monkeypatch):
    # It waited for the read to give up (60 s a try, three tries: six minutes for two units).
    import threading

    from flava.cli import main as cli
    from flava.data import prepare

    monkeypatch.setattr(prepare, "STOP_GRACE_S", 1.0)  # the units being written, all stalled here

    server = _HoldingServer(write_shards(tmp_path / "www", shards=4, per=3))
    args = ["prepare", "--pairs", server.url + "/shard-{000..003}.tar", "--output", str(tmp_path / "out"),
            "--workers", workers, "--size", "16"]
    try:
        server.hold.set()

        def stop_once_held():
            server.held.wait(60)
            sent.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGTERM)

        sent = []
        threading.Thread(target=stop_once_held, daemon=True).start()
        assert cli(args) == 143
        assert time.monotonic() - sent[0] < prepare.STOP_GRACE_S + 15
        assert "stopped by SIGTERM after 0 of 4 units" in capsys.readouterr().err
        assert not list((tmp_path / "out").glob(".*.tmp.*"))
        server.hold.clear(), server.release.set()
        assert cli(args) == 0
        assert json.loads((tmp_path / "out" / "prepare_report.json").read_text())["samples"] == 12
    finally:
        server.close()


def test_an_unfinished_prepare_is_named_and_finished_only_from_its_own_inputs(train_data, tmp_path, monkeypatch,
                                                                           capsys):
    from flava.cli import main as cli

    out = tmp_path / "prepared"
    args = ["prepare", "--pairs", "pairs_clean.csv", "--output", str(out), "--workers", "1", "--shard-size", "4",
            "--size", "24"]
    monkeypatch.chdir(train_data)  # the input named relative to where it is run
    assert cli(args) == 0
    (out / "index.json").unlink()  # as a stopped prepare leaves it: the last unit and the index not written
    for f in ("00003.json", "00003.tar", "prepare_report.json"):
        (out / f).unlink()
    with pytest.raises(DataError, match=r"unfinished `flava prepare` output \(3 shard\(s\) written"):
        open_source("pairs", str(out))
    # Another folder holding a file of the same name: not the input it was started from.
    (tmp_path / "b").mkdir()
    rows = (train_data / "pairs_clean.csv").read_text().splitlines()[:3]
    (tmp_path / "b" / "pairs_clean.csv").write_text("\n".join(rows).replace("img/", f"{train_data}/img/") + "\n")
    monkeypatch.chdir(tmp_path / "b")
    capsys.readouterr()
    assert cli(args) == 2
    assert "holds unfinished shards prepared from other inputs or settings" in capsys.readouterr().err
    # The same file named from elsewhere finishes it.
    args[2] = os.path.relpath(train_data / "pairs_clean.csv")
    assert cli(args) == 0
    assert json.loads((out / "prepare_report.json").read_text())["samples"] == 16
    assert open_source("pairs", str(out)).known_size == 16
    # Finished, there is nothing to finish: other inputs are told to go to a new directory.
    args[2] = "pairs_clean.csv"
    capsys.readouterr()
    assert cli(args) == 2
    assert re.search(r"holds finished shards prepared from other inputs .*; prepare into a new directory \(or remove "
                     "this one to prepare it again\)", " ".join(capsys.readouterr().err.split()))


def test_a_local_folder_without_an_index_is_sized_by_its_shards_bytes(tmp_path):
    # Mixing weighs plain paths by their size: one short shard that sorts first (a re-cut tail,
    # a last upload) had sized a folder of 2 + 3 x 12 records at 8.
    from flava.data.registry import estimated_size

    rng = np.random.default_rng(0)
    for k, per in enumerate((2, 12, 12, 12)):
        with tarfile.open(tmp_path / f"shard-{k:03d}.tar", "w") as tar:
            for i in range(per):  # photographs' worth of bytes: a tar's padding is a small share
                for ext, data in (("jpg", rng.bytes(64_000)), ("txt", b"a caption")):
                    info = tarfile.TarInfo(f"{k:03d}{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    source = open_source("pairs", str(tmp_path))
    assert len(source.shards) == 4 and abs(estimated_size(source) - 38) <= 3, estimated_size(source)
    # Where a shard's bytes say nothing, its count stands: a first shard of no usable record ...
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        info = tarfile.TarInfo("0000000.jpg")
        info.size = 64_000
        tar.addfile(info, io.BytesIO(rng.bytes(64_000)))  # an image without its caption
    assert estimated_size(open_source("pairs", str(tmp_path))) == 4
    # ... and lines of text files, each cut into byte ranges of its own: each range's bytes.
    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text("".join(f"line of text {i:08d}\n" for i in range(10)))
    (text / "b.txt").write_text("".join(f"line of text {i:08d}\n" for i in range(500_000)))  # 11 MB: 2 ranges
    source = open_source("text", str(text))
    assert len(source.shards) == 3 and abs(estimated_size(source) - 500_010) <= 5_000, estimated_size(source)


def test_the_size_estimate_of_a_mix_waits_for_a_store_as_long_as_the_run_does(tmp_path, monkeypatch):
    # Weighing sources by their first shard, the run had waited the default 30 minutes for an outage
    # whatever data.outage_minutes said.
    from flava.data import registry

    asked = []
    real = registry.estimated_size
    monkeypatch.setattr(registry, "estimated_size", lambda src, outage=None: asked.append(outage) or real(src, outage))
    a, b = write_shards(tmp_path / "a", shards=2), write_shards(tmp_path / "b", shards=2)
    open_stream("pairs", [str(a), str(b)], SampleMaker(SPEC, 0), 2, 0, outage_s=6)
    assert asked == [(6, "data.outage_minutes")] * 2


def test_prepare_decodes_a_large_jpeg_at_the_scale_its_size_needs():
    # A 2999 x 2049 photograph decoded whole took most of prepare's time for it: now at the DCT
    # scale that still leaves twice the size asked (1/4), resized from the stored image's extent
    # in it (a scaled decode's last pixel is part of one) to the size the stored image gives.
    import skimage.data

    import flava.data.prepare as prepare
    from flava.data import decode
    from flava.data.members import Blob

    def jpeg(w, h, mode="RGB"):
        buf = io.BytesIO()
        Image.fromarray(skimage.data.astronaut()).resize((w, h), Image.BICUBIC).convert(mode).save(buf, "JPEG",
                                                                                              quality=90)
        return Blob(buf.getvalue(), ".jpg")

    decoded = []
    real = prepare.decode

    def spy(ref, draft=None):
        out = real(ref, draft)
        decoded.append(out.shape[:2] if isinstance(out, np.ndarray) else out.size[::-1])
        return out
    big, cmyk, small = jpeg(2999, 2049), jpeg(2999, 2049, "CMYK"), jpeg(300, 200)
    try:
        prepare.decode = spy
        got, by_pil, as_is = (prepare._resized(b, 256) for b in (big, cmyk, small))
    finally:
        prepare.decode = real
    assert decoded[0] == (513, 750)  # 1/4: the smallest n/8 scale whose shorter side keeps 2 x 256 pixels
    want = decode.open_image(big).resize((375, 256), Image.BICUBIC)  # 2999 x 256 / 2049 = 374.7
    assert got.size == want.size == by_pil.size == (375, 256)  # libjpeg-turbo's and PIL's (CMYK) decodes alike
    assert np.abs(np.asarray(got, dtype=float) - np.asarray(want, dtype=float)).mean() < 0.6
    assert as_is.size == (300, 200) and np.array_equal(np.asarray(as_is), np.asarray(decode.open_image(small)))


def test_remote_shards_without_image_tokens_are_refused_saying_how_prepared_ones_are_named(http_server, tmp_path,
                                                                                           capsys):
    # They were said to hold none, where prepared shards served so are read through their index.json.
    from flava.cli import main

    url, _ = http_server
    code = main(["pretrain", "--output", str(tmp_path / "run"), "--max-steps", "1",
                 "--set", f'data.pairs=["{url}/shard-{{000..001}}.tar"]'])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "is not known to hold image tokens (remote shards are read as prepared through their " \
                         "folder's index.json" in err, err


def test_a_remote_text_file_or_table_named_with_a_query_string_is_read_by_its_name(http_server):
    # notes.txt?v=1 was "no .txt or .jsonl files match", notes.txt.gz?sig=1 too, and pairs.csv?v=2 was
    # read as a tar ("not a tar archive") instead of refused as a remote table.
    url, root = http_server
    (root / "notes.txt").write_text("a first line\na second line\n")
    (root / "notes.txt.gz").write_bytes(gzip.compress(b"a first line\na second line\n"))
    for name in ("notes.txt?v=1", "notes.txt.gz?sig=1"):
        assert text_file(f"{url}/{name}").records == ["a first line", "a second line"], name
    with pytest.raises(DataError, match=r"pairs.csv\?v=2: remote pairs are read from WebDataset shards"):
        open_source("pairs", f"{url}/pairs.csv?v=2")


def test_credentials_a_store_refuses_are_said_at_once_not_tried_again(monkeypatch, capfd):
    # Missing or wrong S3 keys had been tried three times a shard, pauses between: minutes of notes
    # for 40 shards, hours for thousands, before a run was refused.
    from botocore.exceptions import NoCredentialsError

    from flava.data import shards

    def no_keys(url):
        raise NoCredentialsError()

    monkeypatch.setattr(shards, "_filesystem", no_keys)
    with pytest.raises(OSError, match=r"s3://b/0.tar: NoCredentialsError: Unable to locate credentials; give the "
                                      r"store's credentials \(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        shards._fetch("s3://b/0.tar")
    assert "attempt 1 of" not in capfd.readouterr().err
    with pytest.raises(DataError, match=r"could not list s3://b/ \(NoCredentialsError: .*\); give the store's"):
        shards.expand("s3://b/", (".tar",))
