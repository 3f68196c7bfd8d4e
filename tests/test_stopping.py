"""SIGTERM (what schedulers send before SIGKILL) and SIGINT (Ctrl-C) to real `flava` processes:
each command stops at its own boundary, saves, exits with one line and 128 + the signal number,
and a rerun (or --resume) ends where an uninterrupted run ends; a second signal stops at once.
Also: a run resumed on another number of processes keeps its global batch without flags."""

import contextlib
import io
import json
import os
import re
import shutil
import signal
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import flava
from conftest import narrow_args, pretrain_args, proc_state
from zygote import Process, Ranks
from flava.io.checkpoint import write_checksums
from flava.io.runs import RunDir

# Every test here runs real CLI processes: the slow lane (those under torchrun: distributed too).
pytestmark = pytest.mark.slow

TINY_CODEBOOK = ["--set", "codebook.hidden_size=8", "--set", "codebook.vocab_size=64", "--set", "image.vocab_size=64"]


class Command:
    """`python -m flava.cli ARGS` with its output in files (no pipe to fill up)."""

    def __init__(self, args: list[str], where: Path, torchrun: int = 0, plain: bool = False):
        where.mkdir(parents=True, exist_ok=True)
        self.out, self.err = where / "stdout.txt", where / "stderr.txt"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] if torchrun else []
        self.p = Process(launcher + ["-m", "flava.cli", *args], env, self.out, self.err, plain=plain)

    def wait_for(self, ready, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while not ready():
            assert self.p.poll() is None, f"exited {self.p.returncode} early: {self.text()}"
            assert time.time() < deadline, f"not ready after {timeout} s: {self.text()}"
            time.sleep(0.02)

    def finish(self, timeout: float = 300) -> int:
        return self.p.wait(timeout=timeout)

    def text(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def stderr_lines(self) -> list[str]:
        return [x for x in self.err.read_text().splitlines() if x.strip()]


def done(cmd: Command) -> str:
    assert cmd.finish() == 0, cmd.text()
    return cmd.text()


def assert_stopped(cmd: Command, sig: signal.Signals, says: str) -> str:
    assert cmd.finish(timeout=120) == 128 + sig, cmd.text()
    lines = cmd.stderr_lines()
    assert len(lines) == 1 and says in lines[0], lines  # one line, no traceback (no worker's either)
    return lines[0]


def same_tensors(a: Path, b: Path) -> None:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


# --------------------------------------------------------------------------- train-codebook


def codebook_args(images: Path, output: Path, *more: str) -> list[str]:
    return ["train-codebook", "--images", str(images), "--output", str(output), "--batch-size", "4",
            "--num-workers", "1", *TINY_CODEBOOK, *more]


def test_sigterm_stops_train_codebook_at_a_step_and_resume_ends_as_an_uninterrupted_run(train_data, tmp_path):
    steps = ["--steps", "120", "--save-every", "1000"]  # no save but the one the stop makes
    whole = Command(codebook_args(train_data / "img", tmp_path / "whole", *steps), tmp_path / "w", plain=True)
    cut = Command(codebook_args(train_data / "img", tmp_path / "cut", *steps), tmp_path / "c")
    metrics = tmp_path / "cut" / "codebook_metrics.jsonl"
    cut.wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2)  # step 50 logged
    cut.p.send_signal(signal.SIGTERM)
    line = assert_stopped(cut, signal.SIGTERM, "flava train-codebook: stopped by SIGTERM at step ")
    step = int(line.split("at step ")[1].split()[0])
    assert 50 < step < 120 and "--resume" in line
    assert json.loads((tmp_path / "cut" / "training" / "state.json").read_text())["step"] == step
    # Damaged saved state is one line naming it; a line a kill cut short is logged again.
    optimizer = tmp_path / "cut" / "training" / "optimizer.pt"
    good = optimizer.read_bytes()
    optimizer.write_bytes(good[:3000])
    damaged = Command(codebook_args(tmp_path / "elsewhere", tmp_path / "cut", "--resume", "--steps", "300",
                                    "--config", "small"), tmp_path / "d")
    assert damaged.finish() == 2 and "training is damaged (optimizer.pt is not the file that was written" in \
        " ".join(damaged.text().split()) and "Traceback" not in damaged.text()
    # What a resume takes (steps, even at the default's value) and ignores, said.
    said = " ".join(damaged.text().split())
    assert "steps 120 -> 300" in said and "resuming with the run's own settings; ignored: images, config" in said
    optimizer.write_bytes(good)
    with metrics.open("a") as f:
        f.write('{"step": 19')
    out = done(Command(codebook_args(train_data / "img", tmp_path / "cut", "--resume"), tmp_path / "r"))
    # However the console wraps the line.
    assert f"resuming the codebook training in {tmp_path / 'cut'} at step {step} of 120" in " ".join(out.split())
    done(whole)
    same_tensors(tmp_path / "whole" / "model.safetensors", tmp_path / "cut" / "model.safetensors")
    same_tensors(tmp_path / "whole" / "decoder.safetensors", tmp_path / "cut" / "decoder.safetensors")

    def rows(path):  # every logged number but the wall-clock rate
        return [{k: v for k, v in json.loads(x).items() if k != "images_per_s"} for x in path.read_text().splitlines()]
    assert rows(tmp_path / "whole" / "codebook_metrics.jsonl") == rows(metrics)


def test_a_second_sigint_stops_at_once(train_data, tmp_path):
    # A step of 384 images at codebook width 64 lasts about a minute on one thread: the first
    # Ctrl-C, sent once its batch is drawn (a draw is given up at once), waits for the step; the
    # second does not.
    cmd = Command(codebook_args(train_data / "img", tmp_path / "cb", "--steps", "3", "--batch-size", "384",
                                "--num-workers", "0", "--set", "codebook.hidden_size=64"), tmp_path / "c")
    cmd.wait_for(lambda: "training an image codebook of 64 tokens" in cmd.out.read_text())
    time.sleep(3)
    cmd.p.send_signal(signal.SIGINT)
    # Said at once; a repeat within a second of it is the same request (as torchrun forwards one).
    cmd.wait_for(lambda: "SIGINT: stopping at the next step, after saving" in cmd.out.read_text(), 10)
    time.sleep(1.5)
    assert cmd.p.poll() is None  # the first one lets the step finish
    sent = time.time()
    cmd.p.send_signal(signal.SIGINT)
    # Stopped, its line written, within moments: the step's current operation ends first (under a
    # tenth of a second alone; 3 s once with four test processes on two cores), not the minute-long step.
    # The interpreter's teardown after the line (about a second, longer on a busy machine) is not the command's.
    while "stopped at once" not in cmd.err.read_text() and time.time() - sent < 60:
        time.sleep(0.02)
    assert time.time() - sent < 8
    assert_stopped(cmd, signal.SIGINT, "flava train-codebook: stopped at once by a second SIGINT")
    assert not (tmp_path / "cb" / "training").exists()  # nothing saved on the way out


def test_a_signal_in_the_flava_process_teardown_ends_it_with_its_commands_exit_code():
    # A second Ctrl-C after the stop line interrupted the loader's cleanup with a traceback, and a
    # SIGTERM during a finished run's teardown made its exit 0 a 143.
    import subprocess
    import sys

    script = ("import os, signal, sys; sys.argv = ['flava', 'info', 'no-such-model']; from flava.cli import entry; "
              "code = entry(); print('ended', code, flush=True); os.kill(os.getpid(), signal.SIGTERM); "
              "print('not reached')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    # Ended at once by the signal, with the command's own exit code and line.
    assert done.returncode == 2 and done.stdout.strip() == "ended 2", (done.returncode, done.stdout, done.stderr)
    assert len(done.stderr.strip().splitlines()) == 1 and "no-such-model" in done.stderr
    # Past the exit handlers Python puts back the default handlers: a SIGTERM there (here from the
    # last object freed) had ended the finished command with 143.
    late = ("import os, signal, sys, time; sys.argv = ['flava', 'info', 'no-such-model']; from flava.cli import entry\n"
            "class Late:\n    def __del__(self):\n        os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2)\n"
            "        os.write(1, b'lived on')\nlate = Late()\nsys.exit(entry())")
    done = subprocess.run([sys.executable, "-c", late], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and done.stdout == "lived on", (done.returncode, done.stdout, done.stderr)
    # The exit handlers that join loader workers (multiprocessing's) stay interruptible: one waiting
    # on a stuck worker had ignored the signal until the worker ended.
    stuck = ("import sys; sys.argv = ['flava']; import flava\nimport multiprocessing as mp, signal, time\n"
             "from flava import stopping\n"
             "def child():\n    signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)\n"
             "if __name__ == '__main__':\n    mp.get_context('fork').Process(target=child, daemon=True).start()\n"
             "    print('ended', flush=True)\n    stopping.end_with(3)")
    proc = subprocess.Popen([sys.executable, "-c", stuck], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.stdout.readline() == "ended\n"
    time.sleep(1)  # in multiprocessing's exit handler, joining the child
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 3
    # main() called by another program leaves its signals as they were.
    script = script.replace("import entry", "import main").replace("entry()", "main()")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == -signal.SIGTERM, (done.returncode, done.stdout, done.stderr)


# --------------------------------------------------------------------------- prepare


OWNER_OF_A_POOL = """
import multiprocessing as mp, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from flava import stopping
if __name__ == "__main__":
    pool = ProcessPoolExecutor(2, mp_context=mp.get_context("spawn"), initializer=stopping.ignore_in_worker)
    pids = [pool.submit(os.getpid).result() for _ in range(4)]
    pool.submit(time.sleep, 600)
    print(" ".join(map(str, set(pids))), flush=True)
    time.sleep(600)
"""


def test_pool_workers_end_when_their_owner_is_killed(tmp_path):
    # `flava prepare` killed outright (SIGKILL, the OOM killer) left its workers waiting for work
    # for ever, a few hundred MB each: they ignore SIGTERM, and each held its own end of the pipe.
    import subprocess
    import sys

    (tmp_path / "owner.py").write_text(OWNER_OF_A_POOL)
    owner = subprocess.Popen([sys.executable, str(tmp_path / "owner.py")], stdout=subprocess.PIPE, text=True)
    workers = []
    try:
        workers += [int(p) for p in owner.stdout.readline().split()]
        assert workers and all(_alive(p) for p in workers)
        owner.kill()
        owner.wait(10)
        deadline = time.time() + 10
        while any(_alive(p) for p in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in workers)
    finally:
        owner.kill()
        for p in workers:
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running (a zombie left to a reaper that may never come is not)."""
    return proc_state(pid) not in ("X", "Z")


def test_sigterm_stops_prepare_amid_a_unit_and_a_rerun_finishes_it(train_data, tmp_path):
    # Three shards; the first is read through a pipe that says when it is being read, then waits.
    # One process: the unit being read is given up at once (written whole or not at all).
    shards = []
    for s in range(3):
        path = tmp_path / f"in{s}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(4):
                for ext, data in (("txt", f"a square number {s * 4 + i}".encode()),
                                  ("png", (train_data / "img" / "a" / f"{(s * 4 + i) % 16}.png").read_bytes())):
                    info = tarfile.TarInfo(f"{s}{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(str(path))
    started = tmp_path / "started"
    first = f"pipe:touch {started}; sleep 1; cat {shards[0]}"

    def args(out):
        return ["prepare", "--pairs", first, *shards[1:], "--output", str(out), "--workers", "1", "--size", "32"]

    cut = Command(args(tmp_path / "cut"), tmp_path / "c")
    cut.wait_for(started.is_file)
    cut.p.send_signal(signal.SIGTERM)
    assert_stopped(cut, signal.SIGTERM, "flava prepare: stopped by SIGTERM after 0 of 3 units")
    assert not [p.name for p in (tmp_path / "cut").glob("*.tar")] + list((tmp_path / "cut").glob(".*.tmp.*"))
    assert not (tmp_path / "cut" / "index.json").exists()
    started.unlink()
    done(Command(args(tmp_path / "cut"), tmp_path / "r"))
    done(Command(args(tmp_path / "whole"), tmp_path / "w", plain=True))
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        a, b = (tarfile.open(tmp_path / d / name) for d in ("whole", "cut"))
        assert [(m.name, a.extractfile(m).read()) for m in a] == [(m.name, b.extractfile(m).read()) for m in b]
    index = [json.loads((tmp_path / d / "index.json").read_text()) for d in ("whole", "cut")]
    assert [{**x, "shardlist": [s["nsamples"] for s in x["shardlist"]]} for x in index][0] == \
        [{**x, "shardlist": [s["nsamples"] for s in x["shardlist"]]} for x in index][1]


# --------------------------------------------------------------------------- embed


def test_sigterm_stops_embed_at_a_part_and_a_rerun_finishes_it(tiny_model, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"caption {i} of a thing with {i % 7} parts" for i in range(4000)) + "\n")

    def args(out):
        return ["embed", "--model", str(tiny_model), "--texts", str(texts), "--output", str(out),
                "--part-size", "100", "--batch-size", "8", "--device", "cpu"]

    cut = Command(args(tmp_path / "cut"), tmp_path / "c")
    parts = tmp_path / "cut" / "parts"
    cut.wait_for(lambda: parts.is_dir() and any(parts.iterdir()))
    cut.p.send_signal(signal.SIGTERM)
    line = assert_stopped(cut, signal.SIGTERM, "flava embed: stopped by SIGTERM after ")
    kept = len(list(parts.iterdir()))
    assert f"after {kept} of 40 parts" in line and 1 <= kept < 40
    assert not (tmp_path / "cut" / "embed.json").exists()
    done(Command(args(tmp_path / "cut"), tmp_path / "r"))
    done(Command(args(tmp_path / "whole"), tmp_path / "w", plain=True))
    for i in range(40):
        name = f"text_emb/text_emb_{i:05d}.npy"
        assert np.array_equal(np.load(tmp_path / "whole" / name), np.load(tmp_path / "cut" / name)), name


def test_sigterm_ends_embed_reading_a_stalled_store_at_once(tiny_model, tmp_path):
    # Remote shards are read whole before any part: a stop waited for the read to give up (60 s a
    # try, three tries), past a scheduler's grace.
    from test_streaming import _HoldingServer, write_shards

    server = _HoldingServer(write_shards(tmp_path / "www", shards=2, per=3))
    try:
        server.hold.set()
        cut = Command(["embed", "--model", str(tiny_model), "--pairs", server.url + "/shard-{000..001}.tar",
                       "--output", str(tmp_path / "out"), "--device", "cpu"], tmp_path / "c")
        cut.wait_for(server.held.is_set)
        sent = time.monotonic()
        cut.p.send_signal(signal.SIGTERM)
        assert_stopped(cut, signal.SIGTERM, "flava embed: stopped by SIGTERM while reading the inputs; nothing was "
                                            "written: run the same command again to start")
        assert time.monotonic() - sent < 20 and not (tmp_path / "out").exists()
        server.hold.clear(), server.release.set()
        done(Command(["embed", "--model", str(tiny_model), "--pairs", server.url + "/shard-{000..001}.tar",
                      "--output", str(tmp_path / "out"), "--device", "cpu"], tmp_path / "r"))
        assert np.load(tmp_path / "out" / "img_emb" / "img_emb_00000.npy").shape[0] == 6
    finally:
        server.close()


# --------------------------------------------------------------------------- finetune


def test_sigterm_stops_finetune_at_a_step_and_resume_ends_as_an_uninterrupted_run(tiny_model, tmp_path):
    rows = ["text,label"] + [f"{'good' if i % 2 else 'bad'} thing number {i},{'pos' if i % 2 else 'neg'}"
                             for i in range(300)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")

    # The model is named by a run directory, whose newest checkpoint may move on while it trains.
    run = RunDir(tmp_path / "run")
    shutil.copytree(tiny_model, run.step(1))
    run.point_latest(1, run.step(1))

    def args(out, *more):
        return ["finetune", "--model", str(run.root), "--task", "text-classification", "--train",
                str(tmp_path / "train.csv"), "--output", str(out), "--epochs", "3", "--batch-size", "4", *more]

    cut = Command(args(tmp_path / "cut"), tmp_path / "c")
    cut.wait_for(lambda: "model: " in cut.out.read_text())
    time.sleep(0.5)  # about step 15 of 204 here: a machine 13 times as fast still stops mid-run
    cut.p.send_signal(signal.SIGTERM)
    line = assert_stopped(cut, signal.SIGTERM, "flava finetune: stopped by SIGTERM at step ")
    step = int(line.split("at step ")[1].split()[0])
    assert 0 < step < 204 and "--resume" in line  # 68 steps an epoch
    with pytest.raises(flava.CheckpointError, match="it holds a fine-tuning stopped before it finished: finish it "
                                                    "with the same `flava finetune` command and --resume"):
        flava.load_task(tmp_path / "cut")  # what `flava predict` says of it
    refused = Command(args(tmp_path / "cut"), tmp_path / "x")  # a plain rerun would start over
    assert refused.finish() == 2 and "add --resume" in refused.text()
    changed = Command(args(tmp_path / "cut", "--resume", "--epochs", "2"), tmp_path / "y")
    assert changed.finish() == 2 and "settings.epochs: 3 -> 2" in changed.text()
    assert "fine-tuning" not in changed.out.read_text()  # refused before any progress is drawn
    state = tmp_path / "cut" / "training" / "state.pt"
    good = state.read_bytes()
    state.write_bytes(good[:3000])
    damaged = Command(args(tmp_path / "cut", "--resume"), tmp_path / "d")
    assert damaged.finish() == 2 and "state in" in damaged.text() and "is damaged (state.pt is not the file" in \
        " ".join(damaged.text().split()) and "Traceback" not in damaged.text()
    state.write_bytes(good)
    # The run trained on meanwhile: the same --model names another checkpoint, refused by its weights.
    shutil.copytree(tiny_model, run.step(2))
    weights = run.step(2) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    (run.step(2) / "checksums.json").unlink(missing_ok=True)
    run.point_latest(2, run.step(2))
    other = Command(args(tmp_path / "cut", "--resume"), tmp_path / "o")
    assert other.finish() == 2
    said = " ".join(other.text().split())
    assert "was started from other weights (" in said and "--model now gives" in said
    assert "step_00000001" in said and "step_00000002" in said and "model:" not in said
    run.point_latest(1, run.step(1))
    # The same checkpoint named another way (a link; a job restarted from another folder) is the
    # same model: only the epochs changed below are refused (the name had been, as another model).
    (tmp_path / "runs-link").symlink_to(run.root)
    renamed = [str(tmp_path / "runs-link") if a == str(run.root) else a
               for a in args(tmp_path / "cut", "--resume", "--epochs", "2")]
    renamed_cmd = Command(renamed, tmp_path / "n")
    assert renamed_cmd.finish() == 2
    said = " ".join(renamed_cmd.text().split())
    assert "other settings (settings.epochs: 3 -> 2)" in said, said
    # The training data edited since the stop, as many rows: refused as changed (a table that lost
    # rows had ended in an IndexError, one that gained some in a false "input_ids is empty").
    table = tmp_path / "train.csv"
    kept = table.read_bytes()
    table.write_bytes(kept.replace(b"thing number 7,", b"thing numbered 7,"))
    edited = Command(args(tmp_path / "cut", "--resume"), tmp_path / "e")
    assert edited.finish() == 2
    assert "changed since it stopped (train.bytes: " in " ".join(edited.text().split()), edited.text()
    table.write_bytes(kept.replace(b"thing number 7,", b"thing number 8,"))  # as many bytes: told by their digest
    edited = Command(args(tmp_path / "cut", "--resume"), tmp_path / "e2")
    assert edited.finish() == 2 and "changed since it stopped (train.digest: " in " ".join(edited.text().split())
    table.unlink()
    gone = Command(args(tmp_path / "cut", "--resume"), tmp_path / "g")
    assert gone.finish() == 2
    assert f"{table} does not exist (the fine-tuning stopped in {tmp_path / 'cut'} was started on it as --train)" \
        in " ".join(gone.text().split())
    table.write_bytes(kept)
    (tmp_path / "alias").mkdir()  # the same file named another way: the same data
    (tmp_path / "alias" / "train.csv").symlink_to(table)
    # A state saved by a release that did not record the weights resumes (it was refused for ever).
    saved = torch.load(state, weights_only=True)
    saved["started_with"] = json.dumps({k: v for k, v in json.loads(saved["started_with"]).items()
                                        if k != "model_weights"})
    torch.save(saved, state)
    write_checksums(state.parent)
    alias = str(tmp_path / "alias" / "train.csv")
    linked = [alias if a == str(table) else a for a in args(tmp_path / "cut", "--resume")]
    out = done(Command(linked, tmp_path / "r"))
    assert "resuming the fine-tuning stopped" in out
    assert not (tmp_path / "cut" / "training").exists()
    done(Command(args(tmp_path / "whole"), tmp_path / "w", plain=True))
    same_tensors(tmp_path / "whole" / "model.safetensors", tmp_path / "cut" / "model.safetensors")
    report = [json.loads((tmp_path / d / "task.json").read_text()) for d in ("whole", "cut")]
    assert report[1]["finetune"]["data"].pop("train") == str(tmp_path / "alias" / "train.csv")  # as the resume named it
    report[0]["finetune"]["data"].pop("train")
    assert report[0] == report[1]


# --------------------------------------------------------------------------- pretrain


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


PRETRAIN_STEPS = ["--max-steps", "24", "--save-every", "1000", "--set", "seed=5", "--set", "data.num_workers=1"]


@pytest.fixture(scope="module")
def uninterrupted_pretrain(train_data, tmp_path_factory):
    """The metrics of the run the stopped ones must end as (one for both signals)."""
    out = tmp_path_factory.mktemp("whole")
    done(Command(pretrain_args(train_data, out / "run") + PRETRAIN_STEPS, out / "w", plain=True))
    return metrics(out / "run")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_pretrain_at_a_step_with_a_checkpoint_and_resume_continues_it(train_data, tmp_path, sig,
                                                                                   uninterrupted_pretrain):
    cut_args = pretrain_args(train_data, tmp_path / "cut") + PRETRAIN_STEPS
    cut = Command(cut_args, tmp_path / "c")
    log = tmp_path / "cut" / "metrics.jsonl"
    cut.wait_for(lambda: log.is_file() and len(log.read_text().splitlines()) >= 3)
    cut.p.send_signal(sig)
    line = assert_stopped(cut, sig, f"flava pretrain: stopped by {sig.name} at step ")
    step = int(line.split("at step ")[1].split()[0])
    assert 3 <= step < 24 and "--resume" in line
    assert json.loads((tmp_path / "cut" / "checkpoints" / "latest.json").read_text())["step"] == step
    assert max(r["step"] for r in metrics(tmp_path / "cut")) == step
    out = done(Command(cut_args + ["--resume"], tmp_path / "r"))
    assert f"resumed from step {step}" in out
    a, b = uninterrupted_pretrain, metrics(tmp_path / "cut")
    assert [r["step"] for r in b] == list(range(1, 25)) and len(a) == 24
    for x, y in zip(a, b):
        assert x["kind"] == y["kind"] and x["loss"] == pytest.approx(y["loss"], abs=1e-6), (x, y)


@pytest.mark.distributed
def test_under_torchrun_every_process_stops_at_the_same_step(train_data, tmp_path):
    cut = Command(pretrain_args(train_data, tmp_path / "cut") + ["--max-steps", "200", "--save-every", "1000",
                                                                 "--set", "data.num_workers=1"],
                  tmp_path / "c", torchrun=2)
    log = tmp_path / "cut" / "metrics.jsonl"
    cut.wait_for(lambda: log.is_file() and len(log.read_text().splitlines()) >= 3)
    # torchrun sends the signal on to both processes (each in its own session), which agree on a step.
    cut.p.send_signal(signal.SIGTERM)
    cut.finish(timeout=60)
    assert "flava pretrain: stopped by SIGTERM at step " in cut.err.read_text()
    assert "Traceback" not in cut.err.read_text().split("stopped by SIGTERM")[0]
    assert cut.out.read_text().count("SIGTERM: stopping") == 1, cut.text()  # said once, not by each process
    step = json.loads((tmp_path / "cut" / "checkpoints" / "latest.json").read_text())["step"]
    saved = json.loads((tmp_path / "cut" / "checkpoints" / f"step_{step:08d}" / "streams.json").read_text())
    assert len(saved) == 2 and saved[0]["pairs"]["draws"] == saved[1]["pairs"]["draws"]


@pytest.mark.distributed
def test_under_torchrun_a_stop_while_one_process_waits_out_its_store_saves_at_once(train_data, tmp_path):
    # The other process waited for it in the step's collectives: the stop waited as long as the
    # outage (data.outage_minutes), and torchrun's SIGKILL 30 s later lost every step since the
    # last checkpoint. They now agree after each draw, and both save the step before.
    from test_streaming import _HoldingServer, write_shards

    server = _HoldingServer(write_shards(tmp_path / "www", shards=8, per=8))
    # Two lanes, one a process; a shard gives each lane two draws. Process 1's second shard fails.
    second = int(np.random.default_rng([5, 0]).permutation(8)[1::2][1])
    server.answer, server.only = 503, {f"shard-{second:03d}.tar"}
    args = pretrain_args(train_data, tmp_path / "cut") + narrow_args() + [
        "--set", "seed=5", "--set", f'data.pairs=["{server.url}/shard-{{000..007}}.tar"]', "--set", "data.lanes=2",
        "--set", "data.mixing=[1,0,0]", "--save-every", "1000"]
    try:
        cut = Command(args + ["--max-steps", "6"], tmp_path / "c", torchrun=2)
        cut.wait_for(lambda: "waiting for the store" in cut.err.read_text(), timeout=180)
        sent = time.monotonic()
        cut.p.send_signal(signal.SIGTERM)
        # Said once both processes saved. (Once, under the whole suite's load, the waiting process
        # then lingered until torchrun's SIGKILL 30 s later, its step saved: hence the wait below.)
        cut.wait_for(lambda: "flava pretrain: stopped by SIGTERM at step 2" in cut.text() or cut.p.poll() is not None,
                     timeout=60)
        assert time.monotonic() - sent < 20 and "flava pretrain: stopped by SIGTERM at step 2" in cut.text(), cut.text()
        cut.finish(timeout=60)
        saved = json.loads((tmp_path / "cut" / "checkpoints" / "step_00000002" / "streams.json").read_text())
        # Process 0's third draw was undone: the state saved is the step's, as every resume reads it.
        assert [s["pairs"]["draws"] for s in saved] == [2, 2]
        # An outage longer than the wait: both save the steps done (the run had ended unsaved).
        # Forked as torchrun's processes (the launch itself is the stop's part above).
        failed = Ranks(["-m", "flava.cli", *args, "--max-steps", "6", "--output", str(tmp_path / "failed"),
                        "--set", "data.outage_minutes=0.02"], 2, {**os.environ, "OMP_NUM_THREADS": "1"})
        out, _ = failed.communicate(timeout=120)
        assert failed.returncode != 0, out
        said = " ".join(out.split())
        assert re.search(r"shard-\d+\.tar: ClientResponseError: 503, .* the store could not serve it for \d s .*; step 2 "
                         r"is saved in \S*step_00000002: once the data is readable, continue with --resume", said), said
        assert "another process's data failed at step 3" in said
        saved = json.loads((tmp_path / "failed" / "checkpoints" / "step_00000002" / "streams.json").read_text())
        assert [s["pairs"]["draws"] for s in saved] == [2, 2]
    finally:
        server.close()


# --------------------------------------------------------------------------- elastic resume


@pytest.mark.distributed
def test_a_run_resumed_on_two_processes_keeps_its_global_batch_without_flags(train_data, tmp_path):
    # optim.eps as in test_pretrain_processes: AdamW's 1e-8 turns the processes' rounding noise in
    # near-zero gradients into whole steps of lr.
    steps = ["--set", "seed=5", "--set", "optim.warmup_steps=1", "--set", "optim.eps=1e-4", *narrow_args()]
    args = pretrain_args(train_data, tmp_path / "run", "pairs_clean.csv", batch_size=8) + steps
    done(Command(args + ["--max-steps", "2"], tmp_path / "one"))
    shutil.copytree(tmp_path / "run", tmp_path / "ref")
    # The reference: the same run resumed on the one process it was started on (forked: torchrun's
    # processes draw hash seeds of their own).
    ref = Command(["pretrain", "--output", str(tmp_path / "ref"), "--resume", "--max-steps", "4"], tmp_path / "r")
    out = done(Command(["pretrain", "--output", str(tmp_path / "run"), "--resume", "--max-steps", "4"],
                       tmp_path / "two", torchrun=2))
    said = " ".join(out.split())  # rich folds lines at 110 columns
    assert "data.batch_size 4 per process keeps the run's global batch of 8 (it was 8 on 1 process)" in said, out
    assert "resumed from step 2" in out and "batch 4 x 2 processes" in out
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["data"]["batch_size"] == 4
    history = [json.loads(x) for x in (tmp_path / "run" / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["changes"] == {"data.batch_size": [8, 4]} and history[-1]["processes"] == 2
    assert "keeps the run's global batch" not in done(ref)
    a, b = metrics(tmp_path / "ref"), metrics(tmp_path / "run")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["kind"] == y["kind"] and x["samples"] == y["samples"] == 8
        assert x["data_draws"] == y["data_draws"]
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5), (x, y)


@pytest.mark.distributed
def test_a_global_batch_the_processes_cannot_share_is_refused_in_one_line(train_data, tmp_path):
    from flava.data.pipeline import per_process_batch

    assert per_process_batch(8, 2, "x") == 4
    with pytest.raises(flava.DataError, match="global batch of 6 samples, which 4 processes cannot share evenly: "
                                              r"resume on a number of processes that divides it \(e.g. 1, 2, 3, 6\)"):
        per_process_batch(6, 4, "the run in R")


def test_sigterm_stops_a_recipe_in_its_stage_and_the_same_command_finishes_it(train_data, tmp_path):
    args = pretrain_args(train_data, tmp_path / "recipe", "pairs_clean.csv") + [
        "--recipe", "paper-mim", "--max-steps", "2", "--stage-steps", "text-mlm=30", "--stage-steps", "image-mim=2",
        "--set", "save_every=1000"]
    cut = Command(args, tmp_path / "c")
    log = tmp_path / "recipe" / "text-mlm" / "metrics.jsonl"
    cut.wait_for(lambda: log.is_file() and len(log.read_text().splitlines()) >= 3)
    cut.p.send_signal(signal.SIGTERM)
    line = assert_stopped(cut, signal.SIGTERM, "flava pretrain: stopped by SIGTERM in stage text-mlm at step ")
    assert "run the same command again" in line
    step = json.loads((tmp_path / "recipe" / "text-mlm" / "checkpoints" / "latest.json").read_text())["step"]
    assert 3 <= step < 30 and not (tmp_path / "recipe" / "joint").exists()
    done(Command(args, tmp_path / "again"))
    finished = {r["stage"]: r["steps"] for r in json.loads((tmp_path / "recipe" / "recipe.json").read_text())["finished"]}
    assert finished == {"text-mlm": 30, "image-mim": 2, "joint": 2}
