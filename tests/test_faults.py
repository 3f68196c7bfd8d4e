"""Fault injection: runs killed with SIGKILL at seeded points (mid-step, mid-way through writing a
checkpoint's weights, before its checksums, between its rename and latest.json) resume exactly; a
disk that fills mid-write stops the run in one line and loses nothing; fuzzed shards, CSV, JSONL
and images are either trained on or counted, never fatal."""

import io
import json
import os
import signal
import subprocess
import tarfile
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import flava

from conftest import narrow_args, pretrain_args
from zygote import python
from flava.cli import main as cli
from flava.data.samples import SampleMaker, SampleSpec
from flava.data.registry import open_source
from flava.data.decode import open_image
from flava.data.members import BadSample
from flava.errors import DataError
from flava.io.runs import RunDir

STEPS = ["--max-steps", "6", "--set", "save_every=2", "--set", "seed=5"]  # checkpoints at steps 2, 4 and 6

# Kills this process at the n-th call of one function, then runs `flava`: the fault is in the
# test, the code under test is the real CLI.
DRIVER = textwrap.dedent("""
    import os, signal, sys
    event, n = sys.argv[1], int(sys.argv[2])
    import flava.io.checkpoint as io_checkpoint
    import flava.io.runs as runs
    import flava.objectives.pretraining as pretraining
    import flava.train.checkpoint as train_checkpoint
    calls = [0]

    def hit():
        calls[0] += 1
        return calls[0] == n

    def kill():
        os.kill(os.getpid(), signal.SIGKILL)

    if event == "step":  # mid-step: after the forward of the n-th batch, before its update
        forward = pretraining.PretrainingModel.forward
        def patched(self, *a, **k):
            out = forward(self, *a, **k)
            if hit():
                kill()
            return out
        pretraining.PretrainingModel.forward = patched
    elif event == "weights":  # half of model.safetensors written
        save_file = io_checkpoint.save_file
        def patched(tensors, path, **k):
            save_file(tensors, path, **k)
            if hit():
                data = open(path, "rb").read()
                open(path, "wb").write(data[: len(data) // 2])
                kill()
        io_checkpoint.save_file = patched
    elif event == "checksums":  # every file staged, the checksums not yet
        write_checksums = train_checkpoint.write_checksums
        def patched(directory):
            if hit():
                kill()
            write_checksums(directory)
        train_checkpoint.write_checksums = patched
    elif event == "pointer":  # the checkpoint renamed into place, latest.json not yet updated
        point = runs.RunDir.point_latest
        def patched(self, *a, **k):
            if hit():
                kill()
            point(self, *a, **k)
        runs.RunDir.point_latest = patched
    from flava.cli import main
    sys.exit(main(sys.argv[3:]))
""")


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _flava(args, timeout=300, plain=False) -> subprocess.CompletedProcess:
    return python(["-m", "flava.cli", *args], _env(), timeout, plain=plain)


def _rows(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigkill_at_seeded_points_resumes_exactly(train_data, tmp_path):
    ref = tmp_path / "ref"
    done = _flava(pretrain_args(train_data, ref) + narrow_args() + STEPS, plain=True)  # its own hash seed and start
    assert done.returncode == 0, done.stdout + done.stderr
    reference = _rows(ref)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    rng = np.random.default_rng(2026)
    trials = [("step", int(rng.integers(2, 6))), ("weights", int(rng.integers(1, 4))),
              ("checksums", int(rng.integers(1, 4))), ("pointer", int(rng.integers(1, 4)))]
    for event, n in trials:
        run = tmp_path / f"{event}{n}"
        killed = python([str(driver), event, str(n), *pretrain_args(train_data, run), *narrow_args(), *STEPS], _env())
        assert killed.returncode == -signal.SIGKILL, (event, n, killed.stdout + killed.stderr)
        resumed = _flava(["pretrain", "--output", str(run), "--resume"])
        assert resumed.returncode == 0, (event, n, resumed.stdout + resumed.stderr)
        rows = _rows(run)
        assert [r["step"] for r in rows] == list(range(1, 7)), (event, n)  # each step logged once
        for got, want in zip(rows, reference):
            assert got["kind"] == want["kind"] and got["data_draws"] == want["data_draws"], (event, n)
            assert got["loss"] == pytest.approx(want["loss"], abs=1e-6), (event, n, got["step"])
        assert not [p for p in RunDir(run).checkpoints.iterdir() if p.name.startswith(".")], (event, n)


@pytest.mark.slow
def test_a_disk_that_fills_mid_write_stops_in_one_line_and_loses_nothing(train_data, tmp_path, capsys,
                                                                          monkeypatch):
    import flava.io.checkpoint as io_checkpoint

    save_file = io_checkpoint.save_file
    calls = []

    def fills(tensors, path, **k):
        calls.append(path)
        save_file(tensors, path, **k)
        if len(calls) == 2:  # the second checkpoint: half its weights reach the disk, then ENOSPC
            data = open(path, "rb").read()
            open(path, "wb").write(data[: len(data) // 2])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(io_checkpoint, "save_file", fills)
    run = tmp_path / "run"
    code = cli(pretrain_args(train_data, run) + STEPS)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "No space left on device" in err
    assert "step_00000002 is intact" in err
    assert [p.name for p in RunDir(run).step_dirs()] == ["step_00000002"]
    assert not [p for p in RunDir(run).checkpoints.iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(io_checkpoint, "save_file", save_file)
    assert cli(["pretrain", "--output", str(run), "--resume"]) == 0
    assert [r["step"] for r in _rows(run)] == list(range(1, 7))


def test_a_full_disk_said_in_a_librarys_own_words_is_one_line(tmp_path, capsys, monkeypatch):
    # safetensors (finetune's task model, a codebook), torch.save and numpy (embed) say a full disk in
    # words of their own, without errno: each had been a traceback, and the fine-tuning lost with it.
    import shutil
    from collections import namedtuple

    from safetensors import SafetensorError

    import flava.io.checkpoint as io_checkpoint
    import flava.retrieval.embed as embed
    from flava.io.files import replace_dir

    def no_space(*_, **__):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(OSError) as e:
        replace_dir(tmp_path / "model", lambda tmp: no_space())
    assert e.value.errno == 28 and e.value.filename == str(tmp_path / "model")
    assert not list(tmp_path.iterdir())  # the staging copy taken away
    with pytest.raises(SafetensorError):  # another library error is not taken for a full disk
        replace_dir(tmp_path / "model", lambda tmp: (_ for _ in ()).throw(SafetensorError("header too large")))

    model = tmp_path / "m"
    torch.manual_seed(0)
    flava.FlavaModel(flava.preset("tiny")).save_pretrained(model)
    monkeypatch.setattr(io_checkpoint, "save_file", no_space)
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    (tmp_path / "cb").mkdir()
    code = cli(["train-codebook", "--images", str(tmp_path / "a.png"), "--output", str(tmp_path / "cb" / "out"),
                "--steps", "1", "--batch-size", "1", "--eval-images", "1", "--set", "codebook.vocab_size=16",
                "--set", "codebook.hidden_size=8"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"cannot use {tmp_path / 'cb' / 'out'}: No space left on device; the disk is full" in err, err

    # numpy's words: "N requested and M written", with free space nearly gone.
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10 << 20, (10 << 20) - 4096, 4096))
    monkeypatch.setattr(embed.np, "save", lambda *_: (_ for _ in ()).throw(OSError("6400 requested and 2016 written")))
    code = cli(["embed", "--model", str(model), "--images", str(tmp_path / "a.png"), "--output", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "the disk is full" in err, err
    assert not list((tmp_path / "e" / "img_emb").iterdir())  # no half-written .tmp left
    # Words decide, the free space only for a short write's: a CUDA error on a nearly full disk is no
    # full disk, and a quota said in a library's words (os error 122) is a quota.
    from flava.io.files import disk_full

    assert disk_full(RuntimeError("CUDA error: an illegal memory access"), tmp_path) is None
    quota = disk_full(SafetensorError("I/O error: Disk quota exceeded (os error 122)"), tmp_path)
    assert quota is not None and quota.errno == 122
    # A read-only file system is no permission to change (it had been said so).
    from flava.io.files import explain_os_error

    assert explain_os_error(OSError(30, "Read-only file system", "/mnt/ro/run")) == \
        "cannot use /mnt/ro/run: Read-only file system; its file system is read-only: choose another path"


@pytest.mark.slow
def test_a_disk_that_fills_while_metrics_are_written_names_the_file(train_data, tmp_path, capsys, monkeypatch):
    # A full disk's error names no file: the line said "cannot use a file".
    from flava.train.metrics import MetricsLog

    enter = MetricsLog.__enter__

    class Fills:
        def __init__(self, f):
            self.f, self.flushes = f, 0

        def write(self, text):
            return self.f.write(text)

        def flush(self):
            self.flushes += 1
            if self.flushes == 3:
                raise OSError(28, "No space left on device")
            self.f.flush()

        def close(self):  # the close repeats the failed write, as a real file's does
            self.f.close()
            if self.flushes >= 3:
                raise OSError(28, "No space left on device")

    def entered(self):
        enter(self)
        self._file = Fills(self._file)
        return self

    monkeypatch.setattr(MetricsLog, "__enter__", entered)
    run = tmp_path / "run"
    code = cli(pretrain_args(train_data, run) + STEPS)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"cannot use {run / 'metrics.jsonl'}" in err and "the disk is full" in err, err
    monkeypatch.setattr(MetricsLog, "__enter__", enter)
    assert cli(["pretrain", "--output", str(run), "--resume"]) == 0
    assert [r["step"] for r in _rows(run)] == list(range(1, 7))


# --------------------------------------------------------------------------- fuzzing


def _mutate(data: bytes, rng: np.random.Generator, keep: bytes = b"") -> bytes:
    """Flipped bytes, a cut, or inserted garbage; bytes in `keep` are neither made nor unmade."""
    b = bytearray(data)
    kind = rng.integers(3)
    if kind == 0 or not b:
        for _ in range(int(rng.integers(1, 8))):
            i = int(rng.integers(len(b))) if b else 0
            if b and b[i] not in keep:
                new = int(rng.integers(256))
                b[i] = new if new not in keep else 0xFF
    elif kind == 1:
        b = b[: int(rng.integers(len(b)))]
    else:
        i = int(rng.integers(len(b)))
        junk = bytes(x if x not in keep else 0xFE for x in rng.integers(0, 256, int(rng.integers(1, 40))).tolist())
        b[i:i] = junk
    return bytes(b)


def _drain(kind: str, spec: str, maker: SampleMaker) -> tuple[int, int, int]:
    """(records, trained, counted) of a source, every record run through the sample maker."""
    src = open_source(kind, spec)
    trained = counted = 0
    for i, record in enumerate(src.records):
        try:
            maker(kind, record, (i, 0))
            trained += 1
        except BadSample:
            counted += 1
    return len(src.records), trained, counted + sum(src.rejected.values())


def test_fuzzed_inputs_are_trained_on_or_counted(tmp_path):
    rng = np.random.default_rng(7)
    maker = SampleMaker(SampleSpec(image_size=32, codebook_image_size=32, grid=4, max_text_length=16), 0)
    good = io.BytesIO()
    Image.new("RGB", (20, 16), (9, 99, 199)).save(good, format="PNG")
    png = good.getvalue()
    Image.new("RGB", (20, 16)).save(tmp_path / "ok.png")
    fuzzed = {"csv": 0, "jsonl": 0, "tar": 0, "image": 0}

    csv = ("image,caption\n" + "".join(f"ok.png,a caption number {i}\n" for i in range(20))).encode()
    header, body = csv.split(b"\n", 1)
    for t in range(40):
        (tmp_path / f"f{t}.csv").write_bytes(header + b"\n" + _mutate(body, rng, keep=b'",\n\r'))
        n_rows = (tmp_path / f"f{t}.csv").read_bytes().count(b"\n")
        records, trained, counted = _drain("pairs", str(tmp_path / f"f{t}.csv"), maker)
        assert trained + counted >= records and records + counted >= n_rows - 1 - 1, t  # a cut row may vanish
        fuzzed["csv"] += 1

    jsonl = "".join(json.dumps({"text": f"text number {i}"}) + "\n" for i in range(20)).encode()
    for t in range(40):
        (tmp_path / f"f{t}.jsonl").write_bytes(_mutate(jsonl, rng, keep=b"\n"))
        lines = [x for x in (tmp_path / f"f{t}.jsonl").read_bytes().splitlines() if x.strip()]
        records, trained, counted = _drain("text", str(tmp_path / f"f{t}.jsonl"), maker)
        assert records + sum(open_source("text", str(tmp_path / f"f{t}.jsonl")).rejected.values()) == len(lines), t
        assert trained + counted >= records, t
        fuzzed["jsonl"] += 1

    shard = io.BytesIO()
    with tarfile.open(fileobj=shard, mode="w") as tar:
        for i in range(10):
            for name, data in ((f"{i:03d}.png", png), (f"{i:03d}.txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    for t in range(60):
        (tmp_path / f"f{t}.tar").write_bytes(_mutate(shard.getvalue(), rng))
        try:
            records, trained, counted = _drain("pairs", str(tmp_path / f"f{t}.tar"), maker)
        except DataError as e:  # a shard damaged beyond reading is a one-line error, never a crash
            assert "tar" in str(e), t
            continue
        assert trained + counted >= records, t
        fuzzed["tar"] += 1

    for t in range(60):
        path = tmp_path / f"f{t}.png"
        path.write_bytes(_mutate(png, rng))
        try:
            assert open_image(path).mode == "RGB"
        except BadSample:
            pass
        fuzzed["image"] += 1
    assert sum(fuzzed.values()) >= 190, fuzzed


def test_what_a_killed_save_left_is_recovered_not_refused(tmp_path):
    """A save (codebook or fine-tuning state) killed midway leaves a staging copy beside it, or,
    killed between its two renames, the previous state moved aside: the next start restores the
    previous state, tolerates and then removes the staging copy, and still refuses foreign files."""
    from flava.errors import CheckpointError
    from flava.finetune.taskmodel import check_output
    from flava.io.checkpoint import check_replaceable
    from flava.io.files import recover_replaced, replace_dir
    from flava.io.runs import codebook_state, resolve
    from flava.train.codebook import METRICS, STATE, _check_start

    out = tmp_path / "codebook"
    replace_dir(out / STATE, lambda d: (d / "state.json").write_text(json.dumps({"step": 3})))
    (out / METRICS).write_text("")
    (out / STATE).rename(out / f".{STATE}.old")  # killed between the renames of the next save
    (out / f".{STATE}.k3_x9q1z.tmp").mkdir()  # and a staging copy of another killed save
    assert _check_start(out, resume=True) == {"step": 3}
    # Read where it lies: only the lock's holder moves it back (a running one may be between its renames).
    assert (out / f".{STATE}.old").is_dir() and not (out / STATE).exists()
    # Named as a model or codebook, it is an unfinished training there too (the demo codebook's
    # start looks for it the same way, so it resumes rather than refusing to start over it).
    with pytest.raises(CheckpointError, match=r"training has not finished \(step 3 of \?\)"):
        resolve(out)
    assert codebook_state(out) == out / f".{STATE}.old" / "state.json"
    check_replaceable(out, (METRICS, STATE, ".lock"))  # the final write will replace the folder
    recover_replaced(out / STATE)
    assert sorted(p.name for p in out.iterdir()) == [METRICS, STATE]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"already holds other files \(notes.txt\) and is not a checkpoint"):
        check_replaceable(out, (METRICS, STATE, ".lock"))

    task = tmp_path / "task"
    (task / ".training.ab12cd34.tmp").mkdir(parents=True)
    assert check_output(task, "text-classification") is None
    recover_replaced(task / "training")
    assert list(task.iterdir()) == []
