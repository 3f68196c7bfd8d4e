"""`flava serve`: the real command on 127.0.0.1 over a tiny random model and an index of 12 small
PNGs. Answers are checked against a direct `VectorIndex.search` / `Embedder` on the same inputs,
refusals for their status and message, and the search page in real headless Chromium."""

import contextlib
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import flava
from flava.finetune.heads import TextClassifier, TextHead
from flava.finetune.taskmodel import save_task_model
from flava.serve.app import create_app
from flava.retrieval.embed import Embedder
from flava.retrieval.index import VectorIndex, index_from_arrays

# The real `flava serve` runs as a subprocess: the whole module is the slow lane.
pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MAX_UPLOAD = 40_000  # bytes: --max-upload-mb below, small enough to test both 413 paths cheaply
TOPICS = ["sport", "politics", "tech"]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 50, 220), "yellow": (230, 220, 30)}


class Server:
    def __init__(self, root: Path, proc: subprocess.Popen, url: str):
        self.root, self.proc, self.url = root, proc, url
        self.model = flava.load(root / "model")
        self.embedder = Embedder(self.model)
        self.index = VectorIndex.open(root / "index")
        self.images = sorted((root / "images").glob("*.png"), key=lambda p: int(p.stem))

    def request(self, method: str, path: str, body: bytes | None = None, ctype: str | None = None,
                headers: dict | None = None):
        """(status, parsed JSON or raw bytes, headers) of one request."""
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=dict(headers or {}))
        if ctype:
            req.add_header("Content-Type", ctype)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status, data, hdrs = r.status, r.read(), r.headers
        except urllib.error.HTTPError as e:
            status, data, hdrs = e.code, e.read(), e.headers
        if hdrs.get("content-type", "").startswith("application/json"):
            data = json.loads(data)
        return status, data, hdrs

    def get(self, path: str):
        return self.request("GET", path)

    def post_json(self, path: str, obj):
        return self.request("POST", path, json.dumps(obj).encode(), "application/json")

    def post_form(self, path: str, fields: dict | list | None = None, files: list | None = None):
        return self.request("POST", path, *multipart(fields or {}, files or []))


def multipart(fields: dict | list, files: list) -> tuple[bytes, str]:
    """A multipart/form-data body of text fields (a dict, or (name, value) pairs: a name may repeat)
    and (field, filename, bytes) files."""
    boundary = uuid.uuid4().hex
    out = b""
    for name, value in fields.items() if isinstance(fields, dict) else fields:
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    for name, filename, data in files:
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def make_images(folder: Path) -> list[Path]:
    """12 PNGs: a square of one of four colours on one of three backgrounds, with a little noise."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(12):
        colour = list(COLOURS.values())[i % 4]
        arr = np.full((48, 48, 3), (40 + 80 * (i // 4),) * 3, dtype=np.int16)
        arr[8 + i % 3 * 4:36, 10:38 - i % 2 * 6] = colour
        arr += rng.integers(-12, 13, arr.shape, dtype=np.int16)
        paths.append(folder / f"{i}.png")
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    flava.FlavaModel(flava.preset("tiny")).save_pretrained(root / "model")
    paths = make_images(root / "images")
    vectors = Embedder(flava.load(root / "model")).images(paths)
    rows = [{"image_path": str(p.resolve()), "colour": list(COLOURS)[i % 4]} for i, p in enumerate(paths)]
    index_from_arrays(vectors, None, root / "index", model=str(root / "model"), modality="image", metadata=rows)
    model = flava.FlavaModel(flava.preset("tiny"))
    classifier = TextClassifier(model.text_tower(), TextHead(model.config.text.hidden_size, len(TOPICS), 0.0))
    save_task_model(classifier, root / "task", tokenizer=model.processor.tokenizer, label_names=TOPICS,
                    max_text_length=32)
    # The real command, with the model the index records (no --model).
    cmd = [sys.executable, "-m", "flava.cli", "serve", "--index", str(root / "index"), "--task", str(root / "task"),
           "--port", "0", "--max-upload-mb", str(MAX_UPLOAD / 2**20), "--max-k", "50"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines, url, deadline = [], None, time.monotonic() + 90
    while url is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "listening on " in line:
            url = line.split("listening on ")[1].split()[0].rstrip("/")
    if url is None:
        proc.kill()
        pytest.fail("flava serve did not start:\n" + "".join(lines) + proc.stdout.read())
    srv = Server(root, proc, url)
    srv.startup_output = "".join(lines)
    yield srv
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def assert_same_hits(results: list[dict], hits) -> None:
    assert [r["position"] for r in results] == [h.position for h in hits]
    assert [r["item"] for r in results] == [h.item for h in hits]
    np.testing.assert_allclose([r["score"] for r in results], [h.score for h in hits], atol=1e-5)


# --------------------------------------------------------------------------- answers


def test_health(server):
    status, body, _ = server.get("/health")
    assert status == 200 and body["status"] == "ok"
    assert body["model"] == str(server.root / "model")
    assert body["index"] == {"size": 12, "dim": server.embedder.dim, "modality": "image",
                             "model": str(server.root / "model")}
    assert body["task"] == {"task": "text-classification", "labels": 3} and body["max_k"] == 50


def test_text_search_equals_index_search(server):
    q = "a red square on a dark background"
    status, body, _ = server.get("/search?q=" + urllib.request.quote(q) + "&k=5")
    assert status == 200, body
    want = server.index.search(server.embedder.texts([q]), 5)[0]
    assert len(body["results"]) == 5 and body["took_ms"] > 0
    assert_same_hits(body["results"], want)
    assert body["results"][0]["metadata"] == want[0].metadata


def test_image_upload_search(server):
    path = server.images[5]
    status, body, _ = server.post_form("/search", {"k": 4}, [("image", path.name, path.read_bytes())])
    assert status == 200, body
    assert_same_hits(body["results"], server.index.search(server.embedder.images([path]), 4)[0])
    assert body["results"][0]["position"] == 5 and body["results"][0]["score"] == pytest.approx(1, abs=1e-4)


def test_embedding_search(server):
    vec = np.random.default_rng(1).standard_normal(server.index.dim).astype(np.float32)
    vec /= np.linalg.norm(vec)
    status, body, _ = server.post_json("/search", {"embedding": vec.tolist(), "k": 12})
    assert status == 200, body
    assert_same_hits(body["results"], server.index.search(vec[None], 12)[0])
    # A vector of any length is scored by cosine, as the index's own (10 x it had scored past 1).
    # float32's norm of 1e-30s is 0 and of 1e20s infinite; 1e300 is finite JSON but infinite as float32,
    # and float64's norm of 1e200s and 1e-200s is infinite and 0 (1e300 had been called non-finite).
    for scale in (10.0, 1e-30, 1e20, 1e300, 1e200, 1e-200):
        status, longer, _ = server.post_json("/search", {"embedding": (scale * vec.astype(np.float64)).tolist(),
                                                         "k": 12})
        assert status == 200 and [h["position"] for h in longer["results"]] == \
            [h["position"] for h in body["results"]], scale
        assert [h["score"] for h in longer["results"]] == pytest.approx([h["score"] for h in body["results"]],
                                                                        abs=1e-6), scale


def test_post_search_reads_k_from_the_query_string_as_get_does(server):
    png = server.images[0].read_bytes()
    status, body, _ = server.post_form("/search?k=2", files=[("image", "a.png", png)])
    assert status == 200 and body["k"] == 2 and len(body["results"]) == 2
    status, body, _ = server.post_json("/search?k=3", {"position": 1})
    assert status == 200 and len(body["results"]) == 3
    status, body, _ = server.post_json("/search?k=3", {"position": 1, "k": 4})  # the body's own k wins
    assert status == 200 and len(body["results"]) == 4


def test_search_by_position(server):
    status, body, _ = server.post_json("/search", {"position": 7, "k": 3})
    assert status == 200, body
    first = body["results"][0]
    assert first["position"] == 7 and first["item"] == server.index.item(7)
    assert first["score"] == pytest.approx(1, abs=1e-4)
    want = server.index.search(server.embedder.images([server.images[7]]), 3)[0]
    assert_same_hits(body["results"], want)


def test_embed_texts_and_images(server):
    texts = ["a blue square", "yellow"]
    status, body, _ = server.post_json("/embed", {"texts": texts})
    assert status == 200 and body["dim"] == server.embedder.dim and body["modality"] == "text"
    np.testing.assert_allclose(body["embeddings"], server.embedder.texts(texts), atol=1e-5)
    status, body, _ = server.post_json("/embed", {"text": texts[0]})  # the singular, as /predict's form names it
    assert status == 200 and np.allclose(body["embeddings"], server.embedder.texts(texts[:1]), atol=1e-5)
    files = [("image", p.name, p.read_bytes()) for p in server.images[:3]]
    status, body, _ = server.post_form("/embed", files=files)
    assert status == 200 and body["modality"] == "image"
    np.testing.assert_allclose(body["embeddings"], server.embedder.images(server.images[:3]), atol=1e-5)


def test_classify(server):
    from flava.evaluate.zero_shot import class_embeddings

    classes = ["red", "green", "blue"]
    files = [("image", p.name, p.read_bytes()) for p in server.images[:2]]
    status, body, _ = server.post_form("/classify", {"classes": ", ".join(classes), "templates": "short"}, files)
    assert status == 200, body
    emb = class_embeddings(server.model, classes, server.model.processor.tokenizer, ("a photo of a {}.",))
    scores = server.embedder.images(server.images[:2]) @ emb.T
    logits = np.exp(float(server.model.logit_scale.detach())) * scores
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert len(body["results"]) == 2
    for row, want_p in zip(body["results"], probs):
        got = {c["label"]: c["probability"] for c in row["classes"]}
        assert list(got) == [classes[j] for j in np.argsort(-want_p, kind="stable")]
        np.testing.assert_allclose([got[c] for c in classes], want_p, atol=1e-5)
    # Each class's cosine similarity is "similarity": "score" is a probability in /predict and the CLI.
    for row, want_s in zip(body["results"], scores):
        assert {c["label"]: c["similarity"] for c in row["classes"]} == pytest.approx(dict(zip(classes, want_s)),
                                                                                        abs=1e-5)
        assert all("score" not in c for c in row["classes"])
    # Underscores are read as spaces in the prompts, as `flava classify --classes` reads them; the
    # labels stay as named.
    named = ["dark_red", "green", "blue"]
    status, dark, _ = server.post_form("/classify", {"classes": ", ".join(named), "templates": "short"}, files)
    emb = class_embeddings(server.model, ["dark red", *classes[1:]], server.model.processor.tokenizer,
                           ("a photo of a {}.",))
    logits = np.exp(float(server.model.logit_scale.detach())) * (server.embedder.images(server.images[:2]) @ emb.T)
    want = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    for row, want_p in zip(dark["results"], want):
        got = {c["label"]: c["probability"] for c in row["classes"]}
        np.testing.assert_allclose([got[c] for c in named], want_p, atol=1e-5)


def test_items_serves_only_indexed_files(server):
    status, data, headers = server.get("/items/2")
    assert status == 200 and headers["content-type"] == "image/png"
    assert data == server.images[2].read_bytes()
    for bad in ("12", "-1", "99999"):
        status, body, _ = server.get("/items/" + bad)
        assert status == 404 and "no item at position" in body["error"]
    status, body, _ = server.get("/items/..%2F..%2Fetc%2Fpasswd")
    assert status in (404, 422) and "error" in body


def test_metrics_count_requests(server):
    def count(snapshot, endpoint, method, status):
        return sum(r["count"] for r in snapshot["requests"]
                   if (r["endpoint"], r["method"], r["status"]) == (endpoint, method, status))

    _, before, _ = server.get("/metrics?format=json")
    for _ in range(3):
        assert server.get("/search?q=green&k=2")[0] == 200
    assert server.get("/search?q=&k=2")[0] == 400
    _, after, _ = server.get("/metrics?format=json")
    assert count(after, "/search", "GET", 200) == count(before, "/search", "GET", 200) + 3
    assert count(after, "/search", "GET", 400) == count(before, "/search", "GET", 400) + 1
    lat = next(r for r in after["latency_ms"] if (r["endpoint"], r["method"]) == ("/search", "GET"))
    assert 0 < lat["p50"] <= lat["p99"] and lat["mean"] > 0 and lat["count"] >= 4
    status, text, headers = server.get("/metrics")
    text = text.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert 'flava_requests_total{endpoint="/search",method="GET",status="200"}' in text
    assert 'flava_request_latency_ms{endpoint="/search",method="GET",quantile="0.99"}' in text


def test_predict_equals_task_model(server):
    task = flava.load_task(server.root / "task")
    texts = ["the match ended in a draw", "parliament votes today"]
    status, body, _ = server.post_json("/predict", {"texts": texts, "top_k": 2})
    assert status == 200 and body["task"] == "text-classification", body
    want = task.predict(texts=texts, top_k=2)
    for got, exp in zip(body["predictions"], want):
        assert got["label"] == exp["label"] and [t["label"] for t in got["top"]] == [t["label"] for t in exp["top"]]
        np.testing.assert_allclose([t["score"] for t in got["top"]], [t["score"] for t in exp["top"]], atol=1e-5)
    status, body, _ = server.post_form("/predict", {"text": texts[0]})
    assert status == 200 and body["predictions"][0]["label"] == want[0]["label"]
    status, body, _ = server.post_form("/predict", [("text", t) for t in texts])  # one text a field
    assert status == 200 and [p["label"] for p in body["predictions"]] == [p["label"] for p in want], body
    # A form's field name in JSON and the JSON's in a form: either is taken.
    for status, body, _ in (server.post_json("/predict", {"text": texts[0]}),
                            server.post_form("/predict", {"texts": texts[0]})):
        assert status == 200 and body["predictions"][0]["label"] == want[0]["label"], body
    # texts2 is read as itself (this model takes no pairs, and says so), not taken for its own singular.
    for texts2 in ({"texts2": ["a second text"]}, {"text2": "a second text"}):
        status, body, _ = server.post_json("/predict", {"texts": texts[:1], **texts2})
        assert status == 400 and "texts2" in body["error"] and "not both" not in body["error"], body


def test_responses_are_not_held_back_by_nagle(server):
    """The server's connections have TCP_NODELAY: a small keep-alive request takes about a
    millisecond, not the ~40 ms of a delayed ACK when the response body waits behind its headers."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    times = []
    for _ in range(15):
        start = time.perf_counter()
        conn.request("GET", "/health")
        conn.getresponse().read()
        times.append(time.perf_counter() - start)
    conn.close()
    assert statistics.median(times) < 0.02, times


# --------------------------------------------------------------------------- refusals


@contextlib.contextmanager
def app_in_a_thread(app):
    """A client of `app` served by uvicorn in a thread on 127.0.0.1, stopped after the block."""
    import threading

    import uvicorn
    from conftest import free_port

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not srv.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        client = Server.__new__(Server)
        client.url = f"http://127.0.0.1:{port}"
        yield client
    finally:
        srv.should_exit = True
        thread.join(10)


def test_an_address_not_of_this_machine_names_the_host_and_a_busy_port_the_port(tmp_path, capsys):
    """Binding is tried before the model loads: the refusal names what to change."""
    import socket

    from flava.cli import main as cli

    model = str(tmp_path / "never-loaded")
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): no interface here has it.
    assert cli(["serve", "--model", model, "--host", "192.0.2.1", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "cannot listen on 192.0.2.1 (" in err and "choose another --host" in err and "--port" not in err, err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert cli(["serve", "--model", model, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port} (Address already in use); choose another --port" in err, err
    # An IPv6 address as a URL writes it, bracketed, is the address; a busy port on it is named as URLs name it.
    with socket.socket(socket.AF_INET6) as busy:
        busy.bind(("::1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert cli(["serve", "--model", model, "--host", "[::1]", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on [::1]:{port} (Address already in use); choose another --port" in err, err
    # A link-local address without its interface: the host is at fault, and what it lacks is said.
    assert cli(["serve", "--model", model, "--host", "fe80::1", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on fe80::1 (" in err and "names its interface: fe80::1%eth0" in err and "--port" not in err


def test_nothing_loaded_answers_409():
    """An app with no model, index or task (uvicorn in a thread): each endpoint says what to load."""
    with app_in_a_thread(create_app()) as client:
        assert client.get("/health")[1]["index"] is None
        for (status, body, _), flag in [
            (client.get("/search?q=dog"), "--index"),
            (client.post_json("/search", {"position": 0}), "--index"),
            (client.post_json("/embed", {"texts": ["a"]}), "--model"),
            (client.post_json("/predict", {"texts": ["a"]}), "--task"),
            (client.get("/items/0"), "--index"),
        ]:
            assert status == 409 and flag in body["error"], body


def test_a_request_whose_client_left_gives_up_its_place_for_the_model(tmp_path, monkeypatch):
    """uvicorn never cancels a request whose client disconnected: the queue asks, and such a
    request (a POST's and a GET's) leaves without its model call, counted as 499."""
    import socket
    import threading

    from flava.retrieval.embed import Embedder as Emb

    flava.FlavaModel(flava.preset("tiny")).save_pretrained(tmp_path / "model")
    model = flava.load(tmp_path / "model")
    index = index_from_arrays(np.eye(3, 128, dtype=np.float32), None, tmp_path / "idx", modality="text",
                              metadata=[{"caption": c} for c in "abc"])
    calls, release = [], threading.Event()
    texts = Emb.texts

    def recorded(self, items, *a, **k):
        calls.append(items[0])
        if items[0] == "slow":
            release.wait(20)
        return texts(self, items, *a, **k)

    monkeypatch.setattr(Emb, "texts", recorded)

    def waiting(client, n: int) -> None:
        deadline = time.monotonic() + 10
        while client.get("/metrics?format=json")[1]["model_queue_waiting"] != n:
            assert time.monotonic() < deadline, f"the model queue never held {n} request(s)"
            time.sleep(0.02)

    with app_in_a_thread(create_app(model, index)) as client:
        slow = threading.Thread(target=client.post_json, args=("/embed", {"texts": ["slow"]}))
        slow.start()
        deadline = time.monotonic() + 10
        while calls != ["slow"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        host, port = client.url.removeprefix("http://").split(":")
        body = json.dumps({"texts": ["gone"]}).encode()
        left = []
        for n, request in enumerate([b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body,
                                     b"GET /search?q=gone-too HTTP/1.1\r\nHost: x\r\n\r\n"], 1):
            left.append(socket.create_connection((host, int(port)), timeout=5))
            left[-1].sendall(request)
            waiting(client, n)
        for conn in left:
            conn.close()  # both hang up while they wait
        waiting(client, 0)  # the queue hears them leave
        after = []
        waits = threading.Thread(target=lambda: after.append(client.post_json("/embed", {"texts": ["after"]})))
        waits.start()
        waiting(client, 1)
        release.set()
        slow.join(20)
        waits.join(20)
        assert after[0][0] == 200 and calls == ["slow", "after"]
        snapshot = client.get("/metrics?format=json")[1]
        closed = {(r["endpoint"], r["method"]) for r in snapshot["requests"] if r["status"] == 499}
        assert closed == {("/embed", "POST"), ("/search", "GET")}


def assert_items_served(model, index, pngs, holder, gone: str) -> None:
    """/items sends each indexed image's bytes, and a 404 saying `gone` once `holder` (the file
    that holds them) is moved to moved-NAME."""
    with app_in_a_thread(create_app(flava.load(model), index)) as client:
        for i, png in enumerate(pngs):
            status, data, headers = client.get(f"/items/{i}")
            assert status == 200 and headers["content-type"] == "image/png" and data == png
        holder.rename(holder.with_name(f"moved-{holder.name}"))
        status, body, _ = client.get("/items/0")
        assert status == 404 and gone in body["error"]


def test_items_serves_a_file_only_while_it_is_an_image_and_as_the_image_it_is(tmp_path):
    """What is at an indexed path now may not be what was indexed: a link to a secret, a text file,
    a PNG renamed .jpg. Only an image is sent, typed by the format PIL reads, not by its extension."""
    import io

    images = []
    for i, fmt in enumerate(("JPEG", "PNG", "PNG")):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), list(COLOURS.values())[i]).save(buf, format=fmt)
        images.append(tmp_path / f"{i}.jpg")  # the second is a PNG under a .jpg name
        images[-1].write_bytes(buf.getvalue())
    index = index_from_arrays(np.eye(3, 8, dtype=np.float32), [str(p) for p in images], tmp_path / "idx")
    with app_in_a_thread(create_app(None, index)) as client:
        for i, media in ((0, "image/jpeg"), (1, "image/png")):
            status, data, headers = client.get(f"/items/{i}")
            assert status == 200 and headers["content-type"] == media and data == images[i].read_bytes()
        secret = tmp_path / "secret.txt"
        secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
        images[0].unlink()
        images[0].symlink_to(secret)
        images[2].write_text("a text file now")
        for i, why in ((0, "it is now a link"), (2, "not an image")):
            status, body, _ = client.get(f"/items/{i}")
            assert status == 404 and body["error"] == (f"the indexed image {images[i]} cannot be read ({why}); "
                                                       "rebuild the index"), body


def test_items_refuses_a_file_saved_over_since_it_was_indexed(tmp_path):
    """Another picture saved at an indexed path had been served beside the old image's score: the
    size and modification time embed recorded tell it apart, as `index --add` tells it."""
    import io

    images = []
    for i, colour in enumerate(("red", "blue")):
        buf = io.BytesIO()
        Image.new("RGB", (16 + 8 * i, 16), COLOURS[colour]).save(buf, format="BMP")
        images.append(tmp_path / f"{i}.bmp")
        images[-1].write_bytes(buf.getvalue())
    files = [(p.stat().st_size, p.stat().st_mtime_ns) for p in images]
    assert files[0][0] != files[1][0]  # told apart by size: a write within the clock's tick keeps the time
    index = index_from_arrays(np.eye(2, 8, dtype=np.float32), [str(p) for p in images], tmp_path / "idx", files=files)
    with app_in_a_thread(create_app(None, index)) as client:
        assert [client.get(f"/items/{i}")[0] for i in range(2)] == [200, 200]
        images[0].write_bytes(images[1].read_bytes())  # another picture at the same path
        status, body, _ = client.get("/items/0")
        assert status == 404 and body["error"] == (
            f"the indexed image {images[0]} was changed since it was indexed (its size or modification time "
            "differ): it is not the image its vector was made from; rebuild the index"), body
        assert client.get("/items/1")[0] == 200


def test_items_follows_no_link_and_names_what_is_at_the_path_instead_of_an_image(tmp_path):
    """embed records resolved paths, so a link at an indexed path was put there since: replacing an
    indexed .jpg by a link to another user's image outside the folder must not serve that image. A
    FIFO, a directory or a link to /dev/zero there is named for what it is, not 'no longer exists'."""
    import io

    folder, elsewhere = tmp_path / "indexed", tmp_path / "other_user"
    folder.mkdir()
    elsewhere.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), COLOURS["red"]).save(buf, format="JPEG")
    images = [folder / f"{i}.jpg" for i in range(5)]
    for p in images:
        p.write_bytes(buf.getvalue())
    (elsewhere / "private.jpg").write_bytes(buf.getvalue())
    index = index_from_arrays(np.eye(5, 8, dtype=np.float32), [str(p) for p in images], tmp_path / "idx")
    with app_in_a_thread(create_app(None, index)) as client:
        assert client.get("/items/0")[0] == 200
        for p, put in ((images[0], lambda p: p.symlink_to(elsewhere / "private.jpg")),
                       (images[1], lambda p: p.symlink_to("/dev/zero")),
                       (images[2], lambda p: p.symlink_to(tmp_path / "nowhere.jpg")),
                       (images[3], os.mkfifo), (images[4], os.mkdir)):
            p.unlink()
            put(p)
        answers = [client.get(f"/items/{i}") for i in range(5)]
        whys = ["it is now a link"] * 3 + ["not a regular file: a FIFO", "not a regular file: a directory"]
        for (status, body, _), p, why in zip(answers, images, whys):
            assert (status, body) == (404, {"error": f"the indexed image {p} cannot be read ({why}); rebuild the "
                                                     "index"}), p
        images[0].unlink()
        assert client.get("/items/0")[1]["error"] == f"the indexed file {images[0]} no longer exists; rebuild the index"


def test_items_streams_the_file_with_its_validators_and_answers_a_conditional_get_with_304(tmp_path):
    """/items streams the file it checked, a chunk at a time (read whole, 8 requests for a 75 MB TIFF
    had held it 8 times), with the Content-Length, ETag and Last-Modified Starlette's FileResponse
    sends, so the page's thumbnails are revalidated: a matching If-None-Match (weakly compared) or
    If-Modified-Since is a 304 without a body; If-None-Match, when given, decides alone."""
    import hashlib
    import tracemalloc
    from email.utils import formatdate
    from urllib.parse import urlsplit

    big = tmp_path / "big.bmp"
    Image.new("RGB", (2500, 2000), (10, 200, 30)).save(big)  # 15 MB, uncompressed
    index = index_from_arrays(np.eye(1, 8, dtype=np.float32), [str(big)], tmp_path / "idx")
    st = big.stat()
    etag = f'"{hashlib.md5(f"{st.st_mtime}-{st.st_size}".encode()).hexdigest()}"'
    modified = formatdate(st.st_mtime, usegmt=True)
    with app_in_a_thread(create_app(None, index)) as client:
        status, data, headers = client.get("/items/0")
        assert status == 200 and headers["content-type"] == "image/bmp" and data == big.read_bytes()
        assert (headers["content-length"], headers["etag"], headers["last-modified"]) == (str(st.st_size), etag,
                                                                                        modified)
        for given in ({"If-None-Match": etag}, {"If-None-Match": f'"other", W/{etag}'}, {"If-None-Match": "*"},
                      {"If-Modified-Since": modified}):
            status, data, headers = client.request("GET", "/items/0", headers=given)
            assert (status, data, headers["etag"], headers["last-modified"]) == (304, b"", etag, modified), given
        for given in ({"If-None-Match": '"other"', "If-Modified-Since": modified},
                      {"If-Modified-Since": formatdate(st.st_mtime - 60, usegmt=True)},
                      {"If-Modified-Since": "not a date"}):
            assert client.request("GET", "/items/0", headers=given)[0] == 200, given
        os.utime(big, (st.st_atime, st.st_mtime + 10))  # changed since: the old tag no longer matches
        status, data, headers = client.request("GET", "/items/0", headers={"If-None-Match": etag})
        assert status == 200 and headers["etag"] != etag and data == big.read_bytes()
        # Streamed: the server holds a chunk at a time, not the file (the client reads as it comes).
        url = urlsplit(client.url)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        tracemalloc.start()
        try:
            conn.request("GET", "/items/0")
            response, got = conn.getresponse(), 0
            while chunk := response.read(64 * 1024):
                got += len(chunk)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            conn.close()
        assert got == st.st_size and peak < st.st_size / 4, (got, peak)


def test_items_serves_the_images_of_an_index_built_from_shards(tmp_path, monkeypatch):
    """`flava embed` over a WebDataset shard records its images as shard#offset: /items sends them."""
    import io
    import tarfile

    from flava.cli import main as cli
    from flava.data.members import BadSample, member_at

    pngs = []
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for i, rgb in enumerate(COLOURS.values()):
            buf = io.BytesIO()
            Image.new("RGB", (24, 24), rgb).save(buf, format="PNG")
            pngs.append(buf.getvalue())
            for name, data in ((f"s{i}.png", pngs[-1]), (f"s{i}.txt", f"colour {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    flava.FlavaModel(flava.preset("tiny")).save_pretrained(tmp_path / "model")
    monkeypatch.chdir(tmp_path)  # a relative shard path is recorded whole: a server elsewhere finds it
    assert cli(["embed", "--model", str(tmp_path / "model"), "--pairs", "00000.tar",
                "--output", str(tmp_path / "emb")]) == 0
    monkeypatch.chdir(tmp_path.parent)
    assert cli(["index", "--embeddings", str(tmp_path / "emb"), "--output", str(tmp_path / "idx")]) == 0
    index = VectorIndex.open(tmp_path / "idx")
    assert index.item(0).startswith(f"{tmp_path / '00000.tar'}#")
    assert_items_served(tmp_path / "model", index, pngs, tmp_path / "00000.tar", "is not a local file")
    # A compressed shard's images are named by shard and member (they had been a digest of their
    # bytes); /items says why it cannot send them.
    import gzip

    (tmp_path / "00001.tar.gz").write_bytes(gzip.compress((tmp_path / "moved-00000.tar").read_bytes()))
    assert cli(["embed", "--model", str(tmp_path / "model"), "--pairs", str(tmp_path / "00001.tar.gz"),
                "--output", str(tmp_path / "emb-gz")]) == 0
    assert cli(["index", "--embeddings", str(tmp_path / "emb-gz"), "--output", str(tmp_path / "idx-gz")]) == 0
    compressed = VectorIndex.open(tmp_path / "idx-gz")
    assert sorted(compressed.item(i) for i in range(len(pngs))) == [
        f"{tmp_path / '00001.tar.gz'}#s{i}.png" for i in range(len(pngs))]
    with app_in_a_thread(create_app(None, compressed)) as client:
        status, body, _ = client.get("/items/0")
    assert status == 404 and "a remote or compressed shard, whose images are not served" in body["error"], body
    for offset in (0, 100, 1024):  # no header before it, not a block, a block of the first image's bytes
        with pytest.raises(BadSample):
            member_at(tmp_path / "moved-00000.tar", offset)
    # A damaged header's size (4 GiB in a small file) is refused, not read into memory.
    data = bytearray((tmp_path / "moved-00000.tar").read_bytes())
    header = tarfile.TarInfo("s0.png")
    header.size = 2**32
    data[:512] = header.tobuf(tarfile.USTAR_FORMAT)
    (tmp_path / "damaged.tar").write_bytes(bytes(data))
    with pytest.raises(BadSample, match="not a whole file"):
        member_at(tmp_path / "damaged.tar", 512)


def test_items_serves_the_images_of_an_index_built_from_parquet(tmp_path):
    """`flava embed --pairs` over parquet: a path cell is recorded as the image file it names, a
    bytes cell as where its bytes are, which /items sends."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from flava.cli import main as cli

    pngs = []
    for i, rgb in enumerate(((200, 30, 30), (30, 200, 30), (30, 30, 200))):
        buf = io.BytesIO()
        Image.new("RGB", (24, 24), rgb).save(buf, format="PNG")
        pngs.append(buf.getvalue())
        (tmp_path / f"{i}.png").write_bytes(pngs[-1])
    captions = ["red", "green", "blue"]
    pq.write_table(pa.table({"image": pngs, "caption": captions}), tmp_path / "bytes.parquet", row_group_size=2)
    pq.write_table(pa.table({"image": [f"{i}.png" for i in range(3)], "caption": captions}), tmp_path / "paths.parquet")
    flava.FlavaModel(flava.preset("tiny")).save_pretrained(tmp_path / "model")
    for name in ("bytes", "paths"):
        assert cli(["embed", "--model", str(tmp_path / "model"), "--pairs", str(tmp_path / f"{name}.parquet"),
                    "--output", str(tmp_path / f"emb-{name}")]) == 0
        assert cli(["index", "--embeddings", str(tmp_path / f"emb-{name}"), "--output", str(tmp_path / name)]) == 0
    assert [VectorIndex.open(tmp_path / "paths").item(i) for i in range(3)] == [str(tmp_path / f"{i}.png")
                                                                                 for i in range(3)]
    index = VectorIndex.open(tmp_path / "bytes")
    assert index.item(2) == f"{tmp_path / 'bytes.parquet'}#1:0:image"  # the second row group's first row
    assert_items_served(tmp_path / "model", index, pngs, tmp_path / "bytes.parquet", "no longer exists")


def test_bad_requests(server):
    png = server.images[0].read_bytes()
    cases = [
        (server.get("/search?q=&k=3"), 400, "empty"),
        (server.get("/search?q=%20%20"), 400, "empty"),
        (server.get("/search?q=dog&k=0"), 422, "k must"),
        (server.get("/search?q=dog&k=51"), 422, "k must"),
        (server.get("/search?q=dog&k=ten"), 422, "k"),
        (server.post_json("/search", {"embedding": [0.1] * server.index.dim, "k": 500}), 422, "k must"),
        (server.post_json("/search", {"embedding": [0.1, 0.2]}), 400, "numbers"),
        (server.post_json("/search", {"position": 12}), 404, "no item at position 12"),
        (server.post_json("/search", {"position": -3}), 404, "no item at position"),
        (server.post_json("/search", {}), 400, "embedding"),
        (server.post_json("/search", {"position": 1, "embedding": [0.1] * server.index.dim}), 400,
         'give "embedding" or "position" in the JSON body, not both'),
        (server.post_form("/search", files=[("image", "notes.txt", b"not an image at all")]), 415, "notes.txt"),
        (server.post_form("/embed", files=[("image", "big.png", png + b"\0" * MAX_UPLOAD)]), 413, "big.png"),
        (server.post_form("/search", files=[("image", "huge.png", b"\0" * 200_000)]), 413,
         f"larger than the limit of {MAX_UPLOAD / 2**20:.2f} MiB"),  # the limit set, not with the form's framing
        (server.request("POST", "/search", b"k=3", "application/x-www-form-urlencoded"), 415, "multipart"),
        (server.request("POST", "/embed", b"{not json", "application/json"), 400, "JSON"),
        (server.post_json("/embed", {"texts": []}), 400, "texts"),
        (server.post_json("/embed", {"texts": ["a dog", "  "]}), 400, '"texts"[1] is empty'),
        (server.post_form("/classify", {"classes": "a, b", "templates": "|".join(["a {}."] * 65)},
                          [("image", "a.png", png)]), 400, "65 templates"),
        (server.post_form("/classify", {"classes": "red"}, [("image", "a.png", png)]), 400, "two class"),
        (server.post_form("/classify", {"classes": "a, b", "templates": "no slot"}, [("image", "a.png", png)]),
         400, "{}"),
        # The CLI's parser for --classes (an empty name refused), and a field given twice is refused, not last-wins.
        (server.post_form("/classify", {"classes": "red,,blue"}, [("image", "a.png", png)]), 400,
         "classes 'red,,blue' holds an empty name between ','s; name each one"),
        (server.post_form("/classify", [("classes", "red,blue"), ("classes", "green,grey")], [("image", "a.png", png)]),
         400, "'classes' is given 2 times in the form; give it once"),
        (server.post_form("/classify", {"classes": "red, blue, red"}, [("image", "a.png", png)]), 400,
         "class 'red' is named twice"),
        (server.post_form("/classify", {"classes": "Cat, dog, CAT"}, [("image", "a.png", png)]), 400,
         "classes 'Cat' and 'CAT' are the same to this model's tokenizer (each reads as 'cat')"),
        # Past the server's cap (1000), refused before any check whose time grows with the names.
        (server.post_form("/classify", {"classes": ",".join(["same"] + [f"c{i}" for i in range(3000)] + ["same"])},
                          [("image", "a.png", png)]), 400, "3002 class names in one request; send at most 1000"),
        (server.get("/search?q=red&q=blue"), 400, "'q' is given 2 times in the query string; give it once"),
        (server.post_json("/search?k=2&k=3", {"position": 1}), 400, "'k' is given 2 times in the query string"),
        # A JSON key given twice had been answered with its last value.
        (server.request("POST", "/search", b'{"position": 3, "position": 4, "k": 1}', "application/json"), 400,
         "'position' is given 2 times in the JSON body; give it once"),
        (server.request("POST", "/embed", b'{"texts": ["a"], "texts": ["b"]}', "application/json"), 400,
         "'texts' is given 2 times in the JSON body"),
        (server.request("POST", "/search", b'{"embedding": [1' + b"0" * 400 + b", 0" * (server.index.dim - 1) + b"]}",
                        "application/json"), 400, '"embedding" holds a number too large for float64'),
        (server.post_json("/predict", {"texts": []}), 400, "texts"),
        (server.post_json("/predict", {"texts": ["a"], "top_k": 0}), 400, "top_k"),
        (server.get("/no/such/thing"), 404, "no endpoint"),
        # A misspelt field or parameter was dropped and answered with the defaults.
        (server.post_json("/search", {"position": 1, "kk": 2}), 400, "unknown field 'kk' in the JSON body; did you "
                                                                     "mean 'k'?"),
        (server.post_form("/search", {"kk": "3"}, [("image", "a.png", png)]), 400, "unknown field 'kk' in the form"),
        (server.get("/health?x=1"), 400, "unknown field 'x' in the query string; this endpoint reads none"),
        (server.get("/metrics?fromat=json"), 400, "unknown field 'fromat' in the query string; did you mean 'format'?"),
        (server.get("/items/0?size=small"), 400, "unknown field 'size' in the query string"),
        (server.post_form("/classify", {"classes": "a, b", "topk": "1"}, [("image", "a.png", png)]), 400,
         "did you mean 'top_k'?"),
        (server.post_json("/embed", {"textz": ["a dog"]}), 400, "unknown field 'textz' in the JSON body; did you mean"),
        (server.post_json("/embed", {"text": "a", "texts": ["b"]}), 400, 'give "texts" or "text", not both'),
        (server.post_json("/predict", {"texts": ["a"], "topk": 2}), 400, "'topk'"),
        (server.get("/search?q=dog&kk=3"), 400, "unknown field 'kk' in the query string"),
        (server.post_json("/search?n=2", {"position": 1}), 400, "the query string"),
        (server.post_json("/search", {"embedding": [0.0] * server.embedder.dim}), 400, "all zeros"),
    ]
    for (status, body, _), want, phrase in cases:
        assert status == want, (want, body)
        assert isinstance(body, dict) and phrase in body["error"], (phrase, body)


# --------------------------------------------------------------------------- the page


@pytest.mark.browser
def test_page_in_headless_chromium(server):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright (python) is not installed: pip install playwright (it is in the test extras)")
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium); make test does")
    q = "a yellow square"
    status, want, _ = server.get("/search?q=" + urllib.request.quote(q) + "&k=6")
    assert status == 200
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/", timeout=20_000)
            page.wait_for_selector("body[data-ready='1']", timeout=10_000)
            assert "12 images indexed" in page.inner_text("#info")
            page.select_option("#k", "6")
            page.fill("#q", q)
            page.press("#q", "Enter")
            page.wait_for_selector("body[data-state='done']", timeout=10_000)
            cards = page.locator("#grid .card")
            assert cards.count() == 6
            first = cards.nth(0)
            assert first.get_attribute("data-item") == want["results"][0]["item"]
            assert float(first.get_attribute("data-score")) == pytest.approx(want["results"][0]["score"], abs=1e-6)
            assert first.locator(".score").inner_text() == f"{want['results'][0]['score']:.3f}"
            # Every card's picture loaded from /items.
            page.wait_for_function("[...document.querySelectorAll('#grid img')].every(i => i.complete)",
                                   timeout=10_000)
            widths = page.evaluate("[...document.querySelectorAll('#grid img')].map(i => i.naturalWidth)")
            assert widths == [48] * 6
            # A click searches by the clicked item: it comes first, with score ~1.
            clicked = cards.nth(2).get_attribute("data-position")
            page.evaluate("document.body.dataset.state = ''")
            cards.nth(2).click()
            page.wait_for_selector("body[data-state='done']", timeout=10_000)
            cards = page.locator("#grid .card")
            assert cards.count() == 6
            assert cards.nth(0).get_attribute("data-position") == clicked
            assert float(cards.nth(0).get_attribute("data-score")) == pytest.approx(1, abs=1e-4)
            _, by_item, _ = server.post_json("/search", {"position": int(clicked), "k": 6})
            assert [cards.nth(i).get_attribute("data-position") for i in range(6)] == \
                [str(r["position"]) for r in by_item["results"]]
            # An uploaded image (the file input behind the drop zone) searches by image.
            page.evaluate("document.body.dataset.state = ''")
            page.set_input_files("#file", str(server.images[9]))
            page.wait_for_selector("body[data-state='done']", timeout=10_000)
            assert page.locator("#grid .card").nth(0).get_attribute("data-position") == "9"
            assert not errors, errors
        finally:
            browser.close()


def test_ctrl_c_stops_the_server(server):
    """Last: SIGINT (Ctrl-C) ends `flava serve` cleanly, with exit status 0."""
    server.proc.send_signal(signal.SIGINT)
    out, _ = server.proc.communicate(timeout=20)
    assert server.proc.returncode == 0, out
    assert "stopped" in out and "Traceback" not in out, out
