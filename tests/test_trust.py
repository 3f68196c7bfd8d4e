"""Trust, wave 2: vectors know their model, index updates and run locks survive kills, user
mistakes end in one line. Real parts throughout: the CLI, FAISS, forked and killed processes."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import flava
from conftest import proc_state
from flava.cli import main as cli
from flava.io.runs import RunDir
from flava.retrieval.embed import read_embeddings
from flava.retrieval.index import VectorIndex

SRC = str(Path(flava.__file__).resolve().parents[1])


def one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def tiny(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    flava.FlavaModel(flava.preset("tiny")).save_pretrained(path)
    return path


@pytest.fixture
def run_with_two_checkpoints(tmp_path):
    """A run directory whose latest.json names step 40; step 50 (other weights) is beside it."""
    run = RunDir(tmp_path / "run")
    tiny(run.step(40), 1)
    tiny(run.step(50), 2)
    run.point_latest(40, run.step(40))
    (tmp_path / "t.txt").write_text("a red circle\na blue square\na green triangle\n")
    return run


def env() -> dict:
    return dict(os.environ, PYTHONPATH=SRC, HF_HUB_OFFLINE="1")


# --------------------------------------------------------------------------- vectors know their model


@pytest.mark.slow  # a real server or CLI process
def test_vectors_record_their_checkpoint_and_refuse_another(run_with_two_checkpoints, tmp_path, capsys):
    run, texts = run_with_two_checkpoints, str(tmp_path / "t.txt")
    assert cli(["embed", "--model", str(run.root), "--texts", texts, "--output", str(tmp_path / "emb")]) == 0
    e = read_embeddings(tmp_path / "emb")
    assert e.checkpoint["path"] == str(run.step(40).resolve()) and e.checkpoint["step"] == 40
    assert e.checkpoint["fingerprint"].startswith("sha256:")
    assert cli(["index", "--embeddings", str(tmp_path / "emb"), "--output", str(tmp_path / "idx")]) == 0
    assert VectorIndex.open(tmp_path / "idx").checkpoint["fingerprint"] == e.checkpoint["fingerprint"]

    # The run trains on: its newest checkpoint is now step 50.
    run.point_latest(50, run.step(50))
    capsys.readouterr()
    assert cli(["search", "--index", str(tmp_path / "idx"), "--text", "a red circle", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    step40 = flava.load(run.step(40))
    want = (e.vectors @ step40.encode_text(["a red circle"]).numpy().T)[:, 0]
    assert hits[0]["item"] == "a red circle"
    np.testing.assert_allclose(sorted(h["score"] for h in hits), sorted(want), atol=1e-5)  # step 40's queries

    # Re-embedding into the same output with the run (now step 50) never mixes the two.
    code = cli(["embed", "--model", str(run.root), "--texts", texts, "--output", str(tmp_path / "emb")])
    err = one_line_error(capsys, code)
    assert "step 40" in err and "step 50" in err and "never mixes" in err
    # Step 50's vectors are not added to step 40's index.
    assert cli(["embed", "--model", str(run.root), "--texts", texts, "--output", str(tmp_path / "emb50")]) == 0
    capsys.readouterr()
    code = cli(["index", "--add", "--embeddings", str(tmp_path / "emb50"), "--output", str(tmp_path / "idx")])
    assert "embed with the same checkpoint" in one_line_error(capsys, code)

    # Another model of the same dimension, named explicitly: refused, or allowed loudly.
    code = cli(["search", "--index", str(tmp_path / "idx"), "--model", str(run.step(50)), "--text", "a red circle"])
    err = one_line_error(capsys, code)
    assert "step 50" in err and "--allow-other-model" in err and "another weights file (the same model saved" in err
    assert cli(["search", "--index", str(tmp_path / "idx"), "--model", str(run.step(50)), "--text", "a red circle",
                "--allow-other-model", "--json"]) == 0
    assert "WARNING" in capsys.readouterr().err

    # The index's own checkpoint rotated away: the run directory now means step 50, refused.
    import shutil
    shutil.rmtree(run.step(40))
    code = cli(["search", "--index", str(tmp_path / "idx"), "--text", "a red circle"])
    err = one_line_error(capsys, code)
    assert "gone or changed" in err and "step 50" in err

    # The same weights under another name (a copy) are the same model.
    shutil.copytree(run.step(50), tmp_path / "copy")
    assert cli(["index", "--embeddings", str(tmp_path / "emb50"), "--output", str(tmp_path / "idx50")]) == 0
    assert cli(["search", "--index", str(tmp_path / "idx50"), "--model", str(tmp_path / "copy"),
                "--text", "a red circle"]) == 0


# --------------------------------------------------------------------------- atomic index updates

# Kills `flava index --add` at one point of the update, from inside the real CLI.
KILL_DRIVER = textwrap.dedent("""
    import os, signal, sys
    point = sys.argv[1]
    import flava.retrieval.index as si

    def killer(original, when):
        def call(*args, **kwargs):
            if when(*args):
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)
        return call

    if point == "before-index-json":  # the new FAISS file is in place, index.json not yet replaced
        si.write_json_atomic = killer(si.write_json_atomic, lambda path, data: path.name == "index.json")
    elif point == "mid-faiss-write":  # half of the new FAISS file on disk
        import faiss
        write = faiss.write_index

        def half(index, path):
            write(index, path)
            os.truncate(path, os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        faiss.write_index = half
    from flava.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.slow  # a real server or CLI process
@pytest.mark.parametrize("point", ["before-index-json", "mid-faiss-write"])
def test_an_index_add_killed_midway_leaves_the_index_whole(tmp_path, point):
    model = tiny(tmp_path / "m", 0)
    for name, words in (("a", ["a red circle", "a blue square"]), ("b", ["a green triangle"])):
        (tmp_path / f"{name}.txt").write_text("\n".join(words) + "\n")
        assert cli(["embed", "--model", str(model), "--texts", str(tmp_path / f"{name}.txt"),
                    "--output", str(tmp_path / f"emb_{name}")]) == 0
    idx = tmp_path / "idx"
    assert cli(["index", "--embeddings", str(tmp_path / "emb_a"), "--output", str(idx)]) == 0
    add = ["index", "--add", "--embeddings", str(tmp_path / "emb_b"), "--output", str(idx)]
    proc = subprocess.run([sys.executable, "-c", KILL_DRIVER, point, *add], env=env(), capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    index = VectorIndex.open(idx)  # the index as it was before the add
    assert len(index) == 2 and index.search(index.vector(0), 2)[0][0].item == "a red circle"
    assert cli(add) == 0  # ...and the add can simply be run again
    index = VectorIndex.open(idx)
    assert len(index) == 3 and [h.item for h in index.search(index.vector(2), 1)[0]] == ["a green triangle"]
    assert sorted(p.name for p in idx.glob("*.faiss*")) == [index.info["index_file"]]


# --------------------------------------------------------------------------- the run lock and forked children

HOLDER = textwrap.dedent("""
    import os, subprocess, sys, time
    from pathlib import Path
    from flava.io.runs import RunDir
    with RunDir(Path(sys.argv[1])).lock():
        child = os.fork()  # as a loader worker is forked
        if child == 0:
            time.sleep(60)
            os._exit(0)
        # An exec'd child that could inherit every descriptor it is allowed to.
        spawned = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], close_fds=False)
        print(child, spawned.pid, flush=True)
        time.sleep(60)
""")


@pytest.mark.slow  # a real server or CLI process
def test_a_killed_runs_lock_is_free_while_its_forked_children_live(tmp_path, capsys):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "run")], env=env(), stdout=subprocess.PIPE,
                            text=True)
    children = [int(p) for p in proc.stdout.readline().split()]
    try:
        assert len(children) == 2
        with pytest.raises(flava.errors.ConfigError, match=f"pid {proc.pid} on"):
            with RunDir(tmp_path / "run").lock():
                pass
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        for pid in children:
            os.kill(pid, 0)  # both still alive
        with RunDir(tmp_path / "run").lock():  # ...and the lock is free
            pass
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()


EXITING = textwrap.dedent("""
    import ctypes, os, sys, threading, time
    from pathlib import Path
    from flava.io.runs import RunDir
    held = RunDir(Path(sys.argv[1])).lock()
    held.__enter__()
    def last():  # its last thread, still to end (torch's own threads end with the process)
        time.sleep(1.5)
        os._exit(0)
    threading.Thread(target=last).start()
    print("held", flush=True)
    ctypes.CDLL(None).pthread_exit(None)  # the first thread ends: a zombie leader, its files still open
""")


@pytest.mark.slow  # a real process
def test_a_lock_whose_holder_is_exiting_is_waited_for(tmp_path):
    # A run killed and restarted at once (a scheduler's requeue): its first thread was a zombie while
    # its others still held the lock, and the restart was refused, naming a process that had exited.
    proc = subprocess.Popen([sys.executable, "-c", EXITING, str(tmp_path / "run")], env=env(), stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        deadline = time.monotonic() + 10
        while proc_state(proc.pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc_state(proc.pid) == "Z" and len(os.listdir(f"/proc/{proc.pid}/task")) >= 2
        start = time.monotonic()
        with RunDir(tmp_path / "run").lock():  # taken once its last thread has ended
            waited = time.monotonic() - start
        assert 0.2 < waited < 10, waited
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_file_system_without_locks_is_said_not_taken_for_a_held_lock(tmp_path, monkeypatch, capsys):
    # flock failing with ENOLCK (NFS without its lock daemon) or ENOSYS (Lustre mounted noflock) had
    # been "in use by another flava run (another process)": every run there refused.
    import errno

    from flava.io import locks

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locks.fcntl, "flock", no_locks)
    with RunDir(tmp_path / "run").lock():
        pass
    err = capsys.readouterr().err
    assert err == f"note: {tmp_path / 'run'} is on a file system that takes no locks (No locks available): nothing " \
                  "stops a second run from writing there at the same time\n", err
    monkeypatch.setattr(locks.fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.EWOULDBLOCK, "busy")))
    with pytest.raises(flava.errors.ConfigError, match="is in use by another flava run"):
        with RunDir(tmp_path / "run").lock():
            pass


# --------------------------------------------------------------------------- one clear line, nothing left behind


def test_resume_of_a_directory_without_a_run_is_refused(tmp_path, capsys):
    code = cli(["pretrain", "--output", str(tmp_path / "nothere"), "--resume", "--max-steps", "5"])
    assert "holds no run to continue" in one_line_error(capsys, code)
    assert not (tmp_path / "nothere").exists()


def test_resume_with_the_preset_a_demo_run_started_from_is_no_change(tmp_path):
    # The demo run's own codebook is not the preset's empty one: the same command plus --resume was refused.
    from flava.cli.pretrain import _refuse_config_on_resume
    from flava.config import to_dict
    from flava.errors import ConfigError
    from flava.train.presets import train_config

    run = tmp_path / "run"
    run.mkdir()
    saved = train_config("small")
    saved.codebook = str(run / "codebook")
    (run / "train_config.json").write_text(json.dumps(to_dict(saved)))
    _refuse_config_on_resume("small", run, train_config("small"))
    with pytest.raises(ConfigError, match=r"--resume --config tiny would change the run's settings \(.*model"):
        _refuse_config_on_resume("tiny", run, train_config("tiny"))


def test_a_resume_may_change_how_the_data_is_fetched_but_not_which_data_it_is(tmp_path):
    # Resuming after an outage with a longer wait, or with a cache, had needed --override; milestones too.
    import copy

    from flava.errors import ConfigError
    from flava.train.presets import train_config
    from flava.train.run import _accept_changes

    saved = train_config("tiny")
    cfg = copy.deepcopy(saved)
    cfg.data.outage_minutes, cfg.data.cache_dir, cfg.data.cache_limit_gb = 120, str(tmp_path / "cache"), 5
    cfg.keep_every = 1000
    entry = _accept_changes(saved, cfg, tmp_path, override=False)
    assert entry["override"] is False and set(entry["changes"]) == {"data.outage_minutes", "data.cache_dir",
                                                                    "data.cache_limit_gb", "keep_every"}
    cfg.data.lanes = 8
    with pytest.raises(ConfigError, match=r"--resume would change the run's settings \(.*data\.lanes"):
        _accept_changes(saved, cfg, tmp_path, override=False)


def test_a_seed_out_of_range_is_one_line_and_a_prepare_that_wrote_nothing_is_taken_over(train_data, tmp_path,
                                                                                          capsys):
    # numpy's generators refuse negative seeds: each was a traceback from deep in the data pipeline.
    for args in (["pretrain", "--output", str(tmp_path / "run"), "--set", "seed=-1", "--max-steps", "1"],
                 ["pretrain", "--output", str(tmp_path / "run"), "--set", "seed=18446744073709551616"],
                 ["train-codebook", "--images", "demo", "--output", str(tmp_path / "cb"), "--seed", "-1"],
                 ["prepare", "--pairs", str(train_data / "pairs_clean.csv"), "--output", str(tmp_path / "p"),
                  "--seed", "-1"]):
        assert re.search(r"seed must lie in \[0, 8796093022207\]; got (-1|18446744073709551616)",
                         one_line_error(capsys, cli(args))), args
    assert not any(tmp_path.iterdir())
    # A prepare that failed before its first unit left only its settings; the corrected command was
    # refused as "unfinished shards prepared from other settings" for good.
    out = tmp_path / "p"
    out.mkdir()
    (out / "prepare_settings.json").write_text(json.dumps({"kind": "pairs", "settings": {"seed": -1}, "codebook": None,
                                                          "inputs": ["elsewhere.csv"]}))
    args = ["prepare", "--pairs", str(train_data / "pairs_clean.csv"), "--output", str(out), "--workers", "1",
            "--size", "24"]
    # Another prepare writing there holds it: a second is refused, not let take over its folder.
    from flava.io.locks import hold

    with hold(out / ".lock", "held", "test"):
        assert "is in use by another flava run" in one_line_error(capsys, cli(args))
    assert cli(args) == 0
    assert json.loads((out / "prepare_settings.json").read_text())["settings"]["seed"] == 0
    assert json.loads((out / "prepare_report.json").read_text())["samples"] == 16


@pytest.mark.slow  # a real server or CLI process
def test_a_plain_path_is_a_list_of_sources_and_a_failed_start_leaves_nothing(train_data, tmp_path, capsys):
    from conftest import pretrain_args

    args = pretrain_args(train_data, tmp_path / "run")
    args[args.index(f'data.pairs=["{train_data / "pairs.csv"}"]')] = f"data.pairs={train_data / 'pairs.csv'}"
    assert cli(args + ["--max-steps", "1"]) == 0
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["data"]["pairs"] == [
        str(train_data / "pairs.csv")]
    capsys.readouterr()
    args = pretrain_args(train_data, tmp_path / "failed")
    args[args.index(f'data.pairs=["{train_data / "pairs.csv"}"]')] = f"data.pairs={tmp_path / 'nope.csv'}"
    code = cli(args + ["--max-steps", "1"])
    assert "nope.csv" in one_line_error(capsys, code)
    assert not (tmp_path / "failed").exists()


@pytest.mark.slow  # a real server or CLI process
def test_a_source_smaller_than_a_batch_is_said_at_the_start(train_data, tmp_path, capsys):
    from conftest import pretrain_args

    assert cli(pretrain_args(train_data, tmp_path / "run", batch_size=20) + ["--max-steps", "1"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    # One of its 17 rows names a missing file: said at the start, and the batch compared with what is left.
    assert re.search(r"note: data.pairs \S+pairs.csv: 1 of its 17 image files do not exist; those samples are "
                     r"skipped and counted \(a table's relative paths are read from its folder\)", out)
    assert re.search(r"note: data.pairs \S+pairs.csv holds about 16 usable samples, fewer than a batch of 20: every "
                     r"batch repeats samples \(a pair twice in a batch is its own negative to the contrastive "
                     r"objective\)", out)
    assert re.search(r"note: data.images \S+img holds \d+ samples, fewer than a batch of 20: every batch repeats "
                     r"samples; give more data or a smaller data.batch_size", out)
    assert "data.text" not in out  # 30 texts fill a batch of 20


@pytest.mark.slow  # a real server or CLI process
def test_evaluating_a_unimodal_stage_says_what_it_left_untrained(train_data, tmp_path, capsys):
    from conftest import pretrain_args
    from flava.cli.evaluate import untrained_note

    text = tmp_path / "text"
    assert cli(pretrain_args(train_data, text) + ["--set", "stage=text-mlm", "--max-steps", "1"]) == 0
    capsys.readouterr()
    # Its zero-shot score read as the model's, with no word that no step trained its image encoder.
    assert cli(["evaluate", "--model", str(text), "--suite", str(tmp_path / "none.json"), "--output",
                str(tmp_path / "e")]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "was written by a text-mlm stage, which trains the text encoder alone: the image and multimodal " \
           "encoders are as initialised, and so are the projections" in out
    joint = tmp_path / "joint"
    assert cli(pretrain_args(train_data, joint) + ["--max-steps", "1"]) == 0
    assert untrained_note(str(joint)) is None and untrained_note(str(tmp_path / "nothing")) is None


@pytest.mark.slow  # a real server or CLI process
def test_config_show_piped_prints_every_description_whole():
    from flava.config import describe
    from flava.train.presets import demo_config

    out = subprocess.run([sys.executable, "-m", "flava.cli", "config", "show"], env=env(), capture_output=True,
                         text=True, timeout=60, check=True).stdout.splitlines()
    for key, value, doc in describe(demo_config()):  # what `config show` shows without --config
        assert f"{key} = {json.dumps(value)}  # {doc}" in out, key


def test_a_mistyped_relative_model_path_is_named_as_a_missing_directory(tmp_path, capsys, monkeypatch):
    (tmp_path / "runs" / "pretrain").mkdir(parents=True)
    (tmp_path / "t.txt").write_text("a text\n")
    monkeypatch.chdir(tmp_path)
    code = cli(["embed", "--model", "runs/pretrian", "--texts", "t.txt", "--output", "emb"])
    err = one_line_error(capsys, code)
    assert "checkpoint directory runs/pretrian does not exist; did you mean runs/pretrain?" in err
    assert "hub" not in err.lower()


def test_finetune_refuses_to_replace_a_task_model_unless_told(tmp_path, capsys):
    from flava.finetune.heads import TextClassifier, TextHead
    from flava.finetune.taskmodel import save_task_model

    model = flava.FlavaModel(flava.preset("tiny"))
    clf = TextClassifier(model.text_tower(), TextHead(model.config.text.hidden_size, 2, 0.0))
    save_task_model(clf, tmp_path / "t1", tokenizer=model.processor.tokenizer, label_names=["a", "b"],
                    max_text_length=16)
    before = (tmp_path / "t1" / "model.safetensors").read_bytes()
    code = cli(["finetune", "--model", str(tmp_path / "none"), "--task", "image-classification",
                "--train", str(tmp_path), "--output", str(tmp_path / "t1")])
    err = one_line_error(capsys, code)
    assert "holds a task model for text-classification" in err and "--replace" in err
    assert (tmp_path / "t1" / "model.safetensors").read_bytes() == before
    # One of the same kind too: a rerun would discard a finished fine-tuning.
    code = cli(["finetune", "--model", str(tmp_path / "none"), "--task", "text-classification",
                "--train", str(tmp_path), "--output", str(tmp_path / "t1")])
    assert "fine-tuning text-classification would replace it" in one_line_error(capsys, code)
    # A failed --replace keeps the task model as it was, leaving nothing of its own in it (its lock was left).
    names = sorted(os.listdir(tmp_path / "t1"))
    code = cli(["finetune", "--model", str(tmp_path / "none"), "--task", "text-classification",
                "--train", str(tmp_path), "--output", str(tmp_path / "t1"), "--replace"])
    assert "does not exist" in one_line_error(capsys, code)
    assert sorted(os.listdir(tmp_path / "t1")) == names
    # Named where a pretrained model is wanted, a task model is said to be one.
    (tmp_path / "t.txt").write_text("a text\n")
    err = one_line_error(capsys, cli(["embed", "--model", str(tmp_path / "t1"), "--texts", str(tmp_path / "t.txt"),
                                      "--output", str(tmp_path / "e")]))
    assert "is a task model (flava finetune), not a pretrained model" in err
    # --resume where nothing was stopped says so alone, not first that the task model will be replaced.
    (tmp_path / "train.csv").write_text("text,label\n")
    code = cli(["finetune", "--model", str(tiny(tmp_path / "m", 0)), "--task", "text-classification", "--train",
                str(tmp_path / "train.csv"), "--output", str(tmp_path / "t1"), "--resume"])
    said = capsys.readouterr()
    assert code == 2 and "holds no stopped fine-tuning" in said.err and "will be replaced" not in said.out
    # A table with a header alone is said to hold no row, not to be too small to split.
    code = cli(["finetune", "--model", str(tmp_path / "m"), "--task", "text-classification", "--train",
                str(tmp_path / "train.csv"), "--output", str(tmp_path / "t2")])
    assert f"{tmp_path / 'train.csv'} has no rows" in one_line_error(capsys, code)


def test_finetune_refuses_a_text_length_it_cannot_use_before_any_work_and_records_where_its_inputs_are(
        tmp_path, capsys, monkeypatch):
    # --max-text-length was recorded and ignored for image-classification, and one past the text
    # encoder was refused after the progress bar had begun; a --replace that was then refused had
    # said first that the task model would be replaced; task.json named the model as typed ("m").
    tiny(tmp_path / "m", 0)
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"text {i},{'ab'[i % 2]}\n" for i in range(12)))
    monkeypatch.chdir(tmp_path)
    code = cli(["finetune", "--model", "m", "--task", "image-classification", "--train", "train.csv",
                "--output", "t", "--max-text-length", "8"])
    assert "--max-text-length truncates texts, and an image-classification model reads none" in \
        one_line_error(capsys, code)
    base = ["finetune", "--model", "m", "--task", "text-classification", "--train", "train.csv", "--output", "t",
            "--epochs", "1", "--head-only"]
    assert cli(base) == 0
    info = json.loads((tmp_path / "t" / "task.json").read_text())["finetune"]
    assert info["source_model"] == str(tmp_path / "m") and info["data"]["train"] == str(tmp_path / "train.csv")
    capsys.readouterr()
    code = cli([*base, "--replace", "--max-text-length", "1000"])
    said = capsys.readouterr()
    assert code == 2 and "max_text_length 1000 exceeds the 64 tokens the text encoder takes" in said.err
    assert "fine-tuning" not in said.out and "will be replaced" not in said.out


def test_an_output_that_cannot_be_written_is_named_as_given_not_by_the_probe_file():
    # Said as "cannot use /proc/.flava-write-check-27528", a file the user never named.
    from flava.errors import OutputError
    from flava.io.files import check_writable

    with pytest.raises(OutputError, match=r"^cannot use /proc/q7: No such file or directory; "):
        check_writable("/proc/q7")



@pytest.mark.parametrize("command", [["init", "--config", "tiny"], ["export-hf", "MODEL"],
                                     ["index", "--embeddings", "E"], ["embed", "--model", "MODEL", "--texts", "T"]])
def test_an_output_where_nothing_can_be_made_is_one_line_before_any_work(tmp_path, capsys, command):
    # Under /proc, init, export-hf, index and embed ended in a FileNotFoundError traceback from
    # their first mkdir; a link to nothing was called "a file is in the way".
    tiny(tmp_path / "m", 0)
    (tmp_path / "t.txt").write_text("a caption\n")
    argv = [{"MODEL": str(tmp_path / "m"), "E": str(tmp_path / "e"), "T": str(tmp_path / "t.txt")}.get(a, a)
            for a in command]
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    cases = {"/proc/q7/run": "cannot use /proc/q7/run: No such file or directory; nothing can be made there",
             str(tmp_path / "gone"): f"{tmp_path / 'gone'} is a link to {tmp_path / 'nowhere'}, which does not exist",
             str(tmp_path / "gone" / "run"): f"{tmp_path / 'gone'} is a link to {tmp_path / 'nowhere'}, which",
             # A URL had become a local folder named `s3:` (prepare --output s3://...).
             "s3://bucket/run": "s3://bucket/run is a remote place; outputs are written to a local or mounted"}
    for output, said in cases.items():
        code = cli([*argv[:1], *(argv[1:] + [output] if argv[0] == "export-hf" else argv[1:] + ["--output", output])])
        assert said in one_line_error(capsys, code)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gone", "m", "t.txt"]

def test_an_output_replaced_whole_is_never_the_current_folder(tmp_path, capsys, monkeypatch):
    # A task model, an index and a codebook are moved into place whole: `--output .` renamed the
    # folder a shell stood in (or failed after the work with "PosixPath('.') has an empty name").
    import numpy as np

    from flava.errors import OutputError
    from flava.retrieval.index import index_from_arrays

    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for output in (".", ".."):
        with pytest.raises(OutputError, match=rf"^--output {re.escape(output)} is the current folder or holds it"):
            index_from_arrays(np.eye(4, 8, dtype=np.float32), list("abcd"), output)
    code = cli(["finetune", "--model", str(tmp_path / "m"), "--task", "text-classification", "--train",
                str(tmp_path / "t.csv"), "--output", "."])
    assert "--output . is the current folder or holds it" in one_line_error(capsys, code)
    assert os.listdir(tmp_path / "here") == []


def test_finetune_refuses_a_val_fraction_beside_val(tmp_path, capsys):
    # The fraction was not used, without a word.
    code = cli(["finetune", "--model", str(tmp_path / "m"), "--task", "text-classification", "--train",
                str(tmp_path / "t.csv"), "--val", str(tmp_path / "v.csv"), "--val-fraction", "0.5", "--output",
                str(tmp_path / "o")])
    assert "--val-fraction 0.5 carves validation out of --train, and --val gives it: drop one" in \
        one_line_error(capsys, code)
    assert not (tmp_path / "o").exists()


def test_one_finetune_writes_an_output_at_a_time_and_a_failed_start_leaves_none(tmp_path, capsys):
    from flava.io.runs import RunDir

    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"text {i},{i % 2}\n" for i in range(20)))
    args = ["finetune", "--model", str(tmp_path / "none"), "--task", "text-classification", "--train",
            str(tmp_path / "train.csv"), "--output"]
    with RunDir(tmp_path / "busy").lock():  # another fine-tuning writing there
        err = one_line_error(capsys, cli([*args, str(tmp_path / "busy")]))
    assert "is in use by another flava run" in err and (tmp_path / "busy" / ".lock").is_file()
    err = one_line_error(capsys, cli([*args, str(tmp_path / "new" / "sub" / "out")]))  # the model does not exist
    assert "does not exist" in err and not (tmp_path / "new").exists()
    # The lock left in a folder by a failed start on it (created before) is no foreign file.
    (tmp_path / "kept").mkdir()
    err = one_line_error(capsys, cli([*args, str(tmp_path / "kept")]))
    err = one_line_error(capsys, cli([*args, str(tmp_path / "kept")]))
    assert "does not exist" in err and "other files" not in err


def test_prepare_of_input_with_no_usable_sample_is_an_error(tmp_path, capsys):
    (tmp_path / "fake.tar").write_text("this is a text file, not a tar\n" * 40)
    code = cli(["prepare", "--pairs", str(tmp_path / "fake.tar"), "--output", str(tmp_path / "prep"),
                "--workers", "1"])
    err = one_line_error(capsys, code)
    assert "no usable sample" in err and "not a tar archive (or damaged at its start)" in err
    assert not (tmp_path / "prep").exists()


def test_a_thirty_million_pixel_strip_is_counted_not_fatal(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (30_000_000, 1), (200, 10, 10)).save(folder / "strip.png")
    assert (folder / "strip.png").stat().st_size < 200_000
    for i in range(2):
        Image.new("RGB", (40, 30), (10, 200 - 50 * i, 10)).save(folder / f"ok{i}.png")
    model = tiny(tmp_path / "m", 0)
    assert cli(["embed", "--model", str(model), "--images", str(folder), "--output", str(tmp_path / "emb")]) == 0
    summary = json.loads((tmp_path / "emb" / "embed.json").read_text())
    assert summary["embedded"] == 2 and summary["failed"] == {"extreme aspect ratio": 1}


# --------------------------------------------------------------------------- server bounds


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real `flava serve` on 127.0.0.1 over a tiny model, with short timeouts; its log in a file."""
    root = tmp_path_factory.mktemp("serve")
    model = tiny(root / "model", 0)
    words = [f"a text about thing {i}" for i in range(8)]
    (root / "t.txt").write_text("\n".join(words) + "\n")
    assert cli(["embed", "--model", str(model), "--texts", str(root / "t.txt"), "--output", str(root / "emb")]) == 0
    assert cli(["index", "--embeddings", str(root / "emb"), "--output", str(root / "idx")]) == 0
    log = open(root / "log.txt", "w")
    proc = subprocess.Popen([sys.executable, "-m", "flava.cli", "serve", "--index", str(root / "idx"), "--port", "0",
                             "--max-classes", "400", "--header-timeout", "1", "--body-timeout", "1",
                             "--threads", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(env(), PYTHONUNBUFFERED="1"))
    deadline, url = time.monotonic() + 90, None
    while url is None and time.monotonic() < deadline and proc.poll() is None:
        text = (root / "log.txt").read_text()
        if "listening on " in text:
            url = text.split("listening on ")[1].split()[0].rstrip("/")
        time.sleep(0.1)
    if url is None:
        proc.kill()
        pytest.fail("flava serve did not start:\n" + (root / "log.txt").read_text())
    host, port = url.split("//")[1].split(":")
    yield {"url": url, "host": host, "port": int(port), "log": root / "log.txt", "proc": proc}
    proc.kill()
    proc.wait(10)
    log.close()


def http(server, method: str, path: str, body: bytes = b"", ctype: str | None = None, timeout: float = 60):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(server["url"] + path, data=body or None, method=method)
    if ctype:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def classify_form(classes: list[str]) -> tuple[bytes, str]:
    import io

    from PIL import Image
    from test_serve import multipart

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="PNG")
    return multipart({"classes": ",".join(classes), "templates": "clip"}, [("image", "x.png", buf.getvalue())])


@pytest.mark.slow  # a real server or CLI process
def test_a_slow_classify_does_not_hold_search_and_class_names_are_bounded_and_cached(server):
    import threading

    body, ctype = classify_form([f"class {i}" for i in range(401)])
    status, answer = http(server, "POST", "/classify", body, ctype)
    assert status == 400 and "at most 400" in answer["error"]

    classes = [f"thing number {i}" for i in range(300)]  # 5,400 prompts, 3 classes per model call
    body, ctype = classify_form(classes)
    done = {}

    def slow():
        start = time.perf_counter()
        done["status"], done["answer"] = http(server, "POST", "/classify", body, ctype)
        done["seconds"] = time.perf_counter() - start

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.3)
    waits = []
    while thread.is_alive():
        start = time.perf_counter()
        status, _ = http(server, "GET", "/search?q=a+text&k=3")
        assert status == 200
        waits.append(time.perf_counter() - start)
    thread.join()
    assert done["status"] == 200 and len(done["answer"]["results"][0]["classes"]) == 5, done
    # Each search waited for one short model call, not for the whole classification.
    assert len(waits) >= 5 and max(waits) < done["seconds"] / 4, (waits, done["seconds"])
    start = time.perf_counter()
    assert http(server, "POST", "/classify", body, ctype)[0] == 200
    assert time.perf_counter() - start < done["seconds"] / 3  # the class names' embeddings were cached


def raw_socket(server):
    import socket

    s = socket.create_connection((server["host"], server["port"]), timeout=10)
    return s


@pytest.mark.slow  # a real server or CLI process
def test_half_a_header_is_closed_and_a_stalled_body_is_answered_408(server):
    s = raw_socket(server)
    start = time.monotonic()
    s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # never finished
    assert s.recv(1024) == b""  # closed by the server
    assert 0.8 < time.monotonic() - start < 5
    s.close()

    s = raw_socket(server)
    s.sendall(b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: 200\r\n\r\n{\"texts\": [")
    start = time.monotonic()
    answer = b""
    while chunk := s.recv(4096):
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"stalled" in answer, answer
    assert time.monotonic() - start < 5
    s.close()


@pytest.mark.slow  # a real server or CLI process
def test_a_client_that_disconnects_mid_upload_is_counted_without_a_traceback(server):
    body, ctype = classify_form(["cat", "dog"])
    s = raw_socket(server)
    s.sendall(f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
              f"Content-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2])
    time.sleep(0.2)
    s.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        counts = http(server, "GET", "/metrics?format=json")[1]["requests"]
        gone = [r for r in counts if r["endpoint"] == "/classify" and r["status"] == 499]
        if gone:
            break
        time.sleep(0.1)
    assert gone and gone[0]["count"] == 1, counts
    assert not any(r["status"] == 500 for r in counts), counts
    log = server["log"].read_text()
    assert "Traceback" not in log and "ClientDisconnect" not in log, log


@pytest.mark.slow  # the demo codebook trained: end to end
def test_a_start_that_fails_after_training_the_demo_codebook_keeps_it(tmp_path, capsys, monkeypatch):
    import functools

    from rich.console import Console

    import flava.train.run as train_run
    from flava.train.presets import demo_config

    # An impossible device is refused before any work (the codebook was trained first, then lost).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = cli(["pretrain", "--output", str(tmp_path / "gpu"), "--set", "device=cuda"])
    assert "CUDA is not available" in one_line_error(capsys, code) and not (tmp_path / "gpu").exists()
    # So is a checkpoint to start from that is not there.
    code = cli(["pretrain", "--output", str(tmp_path / "typo"), "--set", "init_text=nope"])
    assert "nope does not exist" in one_line_error(capsys, code) and not (tmp_path / "typo").exists()
    # A mistake met after the codebook: the corrected command takes it instead of minutes more.
    monkeypatch.setattr(train_run, "DEMO_CODEBOOK_STEPS", 1)
    monkeypatch.setattr(train_run, "CodebookTraining",
                        functools.partial(train_run.CodebookTraining, batch_size=4, eval_images=4))
    out = tmp_path / "run"
    code = cli(["pretrain", "--output", str(out), "--set", "data.max_text_length=100000", "--max-steps", "1"])
    assert "data.max_text_length" in one_line_error(capsys, code)
    weights = out / "codebook" / "model.safetensors"
    assert weights.is_file() and not list(out.glob("*.json"))
    written = weights.stat().st_mtime_ns
    assert cli(["pretrain", "--output", str(out), "--max-steps", "1"]) == 0  # the corrected command
    assert "an earlier start trained" in capsys.readouterr().out and weights.stat().st_mtime_ns == written
    # A resume asking for another model keeps the run's codebook (it was deleted and trained again
    # for the new model, then the resume refused).
    code = cli(["pretrain", "--output", str(out), "--resume", "--config", "small", "--max-steps", "2"])
    assert "model.codebook.vocab_size" in one_line_error(capsys, code) and weights.stat().st_mtime_ns == written
    # One for other settings is trained again (the training itself is train-codebook's, tested there).
    trained = []
    monkeypatch.setattr(train_run, "run_train_codebook", lambda images, where, model, *a, **k: trained.append(model))
    cfg = demo_config()
    cfg.model.codebook.vocab_size = cfg.model.image.vocab_size = 64  # the corrected command asks for another
    train_run.ensure_demo_codebook(cfg, out / "codebook", Console(), say_kept=True)
    assert "trained for other model settings: training it again" in " ".join(capsys.readouterr().out.split())
    assert [m.codebook.vocab_size for m in trained] == [64] and not weights.exists()


def test_a_resume_whose_data_moved_says_how_to_name_where_it_went(train_data, tmp_path, capsys):
    # "X does not exist" alone, where --override --set data.pairs=NEW resumes on it (as
    # train-codebook's --resume takes the images given in their place).
    import shutil

    from conftest import pretrain_args

    shutil.copy(train_data / "pairs.csv", tmp_path / "pairs.csv")
    shutil.copytree(train_data / "img", tmp_path / "img")
    args = pretrain_args(train_data, tmp_path / "run")
    args[args.index(f'data.pairs=["{train_data / "pairs.csv"}"]')] = f'data.pairs=["{tmp_path / "pairs.csv"}"]'
    assert cli([*args, "--max-steps", "1"]) == 0
    (tmp_path / "moved").mkdir()
    (tmp_path / "pairs.csv").rename(tmp_path / "moved" / "pairs.csv")
    shutil.move(str(tmp_path / "img"), tmp_path / "moved" / "img")
    capsys.readouterr()
    code = cli(["pretrain", "--output", str(tmp_path / "run"), "--resume", "--max-steps", "2"])
    assert f"{tmp_path / 'pairs.csv'} does not exist: the run read it as data.pairs; if it moved, resume on it " \
           "there: --resume --override --set 'data.pairs=[\"NEW PATH\"]'" in one_line_error(capsys, code)
    assert cli(["pretrain", "--output", str(tmp_path / "run"), "--resume", "--max-steps", "2", "--override",
                "--set", f'data.pairs=["{tmp_path / "moved" / "pairs.csv"}"]']) == 0
