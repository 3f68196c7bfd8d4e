"""`flava train-codebook` end to end on a few generated images (some of them broken)."""

import json
import os
import re
import signal
import time

import numpy as np
import pytest
import torch
from PIL import Image

import flava
from flava.cli import main as cli
from flava.config import to_dict
from flava.errors import CheckpointError
from flava.io.checkpoint import save_checkpoint
from flava.io.runs import RunDir
from flava.train import codebook as codebook_module
from flava.train.codebook import token_usage


def make_images(directory, n=24, seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir()
    for i in range(n):
        arr = np.full((48, 48, 3), rng.integers(0, 255, 3), dtype=np.uint8)
        t, l = rng.integers(0, 30, 2)
        arr[t: t + 16, l: l + 16] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(directory / f"{i}.png")
    (directory / "broken.png").write_bytes(b"\x89PNG\r\n not really")
    (directory / "empty.jpg").write_bytes(b"")


@pytest.mark.slow
def test_train_codebook_command(tmp_path, capsys):
    make_images(tmp_path / "imgs")
    out = tmp_path / "tok"
    code = cli(["train-codebook", "--images", str(tmp_path / "imgs"), "--output", str(out), "--steps", "40",
                "--batch-size", "8", "--set", "codebook.vocab_size=64", "--set", "codebook.hidden_size=16"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "skipped 1 (unreadable image), 1 (empty image file)" in printed
    report = json.loads((out / "codebook_report.json").read_text())
    assert report["images"] == 24 and report["images_estimated"] is False  # a folder's files are counted
    assert report["end"]["reconstruction_mse"] < 0.5 * report["start"]["reconstruction_mse"]
    assert (out / "reconstructions.png").stat().st_size > 0
    lines = (out / "codebook_metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 39

    # The same command again would train over the finished codebook: refused, nothing touched.
    before = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    code = cli(["train-codebook", "--images", str(tmp_path / "imgs"), "--output", str(out), "--steps", "40"])
    assert code == 2 and "already holds a trained codebook" in capsys.readouterr().err
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == before
    # --resume --steps to train it longer: why it cannot, and what can.
    code = cli(["train-codebook", "--output", str(out), "--resume", "--steps", "80"])
    err = capsys.readouterr().err
    assert code == 2 and "training state is not kept" in err and "start a new run with more --steps" in err, err
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == before
    assert report["bad_records"] == {"unreadable image": 1, "empty image file": 1}

    # Shards: what is met while indexing one (here a shard cut short) is said too, as pretraining says it.
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(12):
            data = (tmp_path / "imgs" / f"{i}.png").read_bytes()
            info = tarfile.TarInfo(f"{i:04d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tar:
        cut = tar.getmembers()[9].offset_data + 10  # within the tenth image
    (tmp_path / "cut.tar").write_bytes(buf.getvalue()[:cut])
    assert cli(["train-codebook", "--images", str(tmp_path / "cut.tar"), "--output", str(tmp_path / "tok2"),
                "--steps", "6", "--batch-size", "4", "--set", "codebook.vocab_size=64",
                "--set", "codebook.hidden_size=16"]) == 0  # past the shard's end: where the cut is met
    cut_short = {"tar member past the end of its shard": 1}  # once: the cut is not also a corrupt shard
    said = " ".join(capsys.readouterr().out.split())
    # A reason met while indexing a shard names the first shard it was met in: where to look.
    assert f"skipped 1 (tar member past the end of its shard, e.g. in {tmp_path / 'cut.tar'})" in said
    report2 = json.loads((tmp_path / "tok2" / "codebook_report.json").read_text())
    # A shard without an index is sized from its first shard: an estimate, said to be one.
    assert report2["bad_records"] == cut_short and report2["images_estimated"] is True
    assert report2["bad_records_in"] == {"tar member past the end of its shard": str(tmp_path / "cut.tar")}

    assert cli(["info", str(out)]) == 0
    assert "an image codebook (`flava train-codebook`), not a model: 64 tokens" in " ".join(
        capsys.readouterr().out.split())

    codebook = flava.load_codebook(out)
    assert codebook.cfg.vocab_size == 64
    ids = codebook.token_ids(torch.rand(2, 3, 64, 64))
    assert ids.shape == (2, 64) and int(ids.max()) < 64


def test_train_codebook_errors(tmp_path, capsys):
    assert cli(["train-codebook", "--images", str(tmp_path / "nothing*.png"), "--output", str(tmp_path / "o")]) == 2
    assert "no image files match" in capsys.readouterr().err
    assert cli(["train-codebook", "--images", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err  # a path, not a pattern
    # Model settings as pretrain names them (model.image...) are taken: the image error comes, not 'model'.
    assert cli(["train-codebook", "--images", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o"),
                "--set", "model.image.image_size=96"]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"junk")
    assert cli(["train-codebook", "--images", str(tmp_path / "bad"), "--output", str(tmp_path / "o")]) == 2
    assert "bad: none of 1 records drawn from it makes a sample (1 unreadable image)" in capsys.readouterr().err
    imgs = tmp_path / "imgs"
    make_images(imgs, n=4)
    # One source named twice (it had trained on each image twice, counted twice); channels the
    # RGB images cannot have (it had failed at the first step, after its start-up).
    (tmp_path / "t.csv").write_text("image,caption\n" + "".join(f"{p},a square\n" for p in sorted(imgs.iterdir())))
    for given, said in ((["--images", str(imgs), str(imgs / ".")], f"train-codebook names {imgs / '.'} twice"),
                        # A table naming a folder's images: one stream of images, each drawn twice as often.
                        (["--images", str(imgs), "--pairs", str(tmp_path / "t.csv")],
                         f"is named by both {imgs} and {tmp_path / 't.csv'}; give each image once (it would be drawn "
                         "twice as often)"),
                        (["--images", str(imgs), "--set", "codebook.input_channels=1"],
                         "codebook.input_channels=1: training reads images as RGB, 3 channels; set it to 3")):
        assert cli(["train-codebook", *given, "--output", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_train_codebook_says_what_its_output_holds(tmp_path, capsys):
    # A model's checkpoint had been called "a trained codebook" (and "a finished codebook" under
    # --resume); a run that had not saved yet, "no codebook training to resume".
    cfg = flava.preset("tiny")
    save_checkpoint(tmp_path / "model", to_dict(cfg), {"model": flava.FlavaModel(cfg).state_dict()})
    make_images(tmp_path / "imgs", n=4)
    for resume in ([], ["--resume"]):
        assert cli(["train-codebook", "--images", str(tmp_path / "imgs"), "--output", str(tmp_path / "model"),
                    *resume]) == 2
        assert f"{tmp_path / 'model'} holds a model's checkpoint, not a codebook training; choose another --output" \
            in capsys.readouterr().err
    from flava.train.codebook import image_sources

    assert [s.name for s in image_sources([], ["demo"])] == ["easy-vqa train pairs"]  # it had been "missing"
    running = tmp_path / "running"
    with RunDir(running).lock():  # a run started, nothing saved yet
        assert cli(["train-codebook", "--images", str(tmp_path / "imgs"), "--output", str(running), "--resume"]) == 2
        assert f"{running} is in use by another flava run (pid {os.getpid()}" in capsys.readouterr().err


def test_the_evaluation_sample_takes_every_source_in_proportion_each_image_once(tmp_path):
    # Two sources of 8 images each: a sample of 16 was one batch drawn by weight, all from one of
    # them, each image twice.
    from flava.train.codebook import _evaluation_sample, image_sources

    for name, channel in (("red", 0), ("blue", 2)):
        (tmp_path / name).mkdir()
        for i in range(8):
            arr = np.zeros((32, 32, 3), dtype=np.uint8)
            arr[..., channel] = 100 + 10 * i
            Image.fromarray(arr).save(tmp_path / name / f"{i}.png")
    pixels = _evaluation_sample(image_sources([str(tmp_path / "red"), str(tmp_path / "blue")], []), 32, 1, 16)
    colours = {tuple(int(v) for v in p.reshape(3, -1).float().mean(1).round()) for p in pixels}
    assert len(pixels) == 16 and len(colours) == 16
    assert sum(c[0] > 0 for c in colours) == 8 and sum(c[2] > 0 for c in colours) == 8
    # Fewer wanted than there are: shared out, each source still in it.
    assert len(_evaluation_sample(image_sources([str(tmp_path / "red"), str(tmp_path / "blue")], []), 32, 1, 5)) == 5
    # A table with unreadable rows: the draw replaced them by repeats of the others; now each image is in it once.
    rows = [f"red/{i}.png,c" for i in range(8)] + ["red/gone.png,c", "blue/0.png,c"]
    (tmp_path / "t.csv").write_text("image,caption\n" + "\n".join(rows) + "\n")
    pixels = _evaluation_sample(image_sources([], [str(tmp_path / "t.csv")]), 32, 1, 10)
    assert len(pixels) == 9 and len({p.numpy().tobytes() for p in pixels}) == 9
    # Row groups of 16, 16 and 8: lanes over them wrapped around the short one, and 36 of 40 were in it.
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    images = []
    for i in range(40):
        png = io.BytesIO()
        Image.fromarray(np.full((32, 32, 3), (6 * i, 255 - 6 * i, 37 * i % 256), np.uint8)).save(png, "PNG")
        images.append({"image": png.getvalue()})
    pq.write_table(pa.Table.from_pylist(images), tmp_path / "groups.parquet", row_group_size=16)
    assert len(_evaluation_sample(image_sources([str(tmp_path / "groups.parquet")], []), 32, 1, 512)) == 40


def test_a_codebook_named_as_a_model_is_said_to_be_one(tmp_path, capsys):
    cfg = flava.preset("tiny")
    save_checkpoint(tmp_path / "tok", to_dict(cfg), {"codebook": flava.FlavaImageCodebook(cfg.codebook).state_dict()})
    (tmp_path / "texts.txt").write_text("a cat\n")
    for args in (["embed", "--model", str(tmp_path / "tok"), "--texts", str(tmp_path / "texts.txt"), "--output",
                  str(tmp_path / "e")],
                 ["export-hf", str(tmp_path / "tok"), str(tmp_path / "hf")]):
        assert cli(args) == 2
        said = capsys.readouterr()
        err = " ".join(said.err.split())
        assert "is an image codebook (flava train-codebook), not a model" in err and "damaged" not in err
        assert "embedding" not in said.out  # the refusal alone, no line of work about to start
    assert not (tmp_path / "e").exists() and not (tmp_path / "hf").exists()
    # A trained codebook (its decoder beside it) is no model `flava init` may write over.
    (tmp_path / "tok" / "decoder.safetensors").write_bytes(b"the decoder")
    before = {p.name: p.read_bytes() for p in (tmp_path / "tok").iterdir()}
    assert cli(["init", "--config", "tiny", "--output", str(tmp_path / "tok")]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=r"holds files this command does not write \(decoder.safetensors\)"):
        flava.FlavaModel(cfg).save_pretrained(tmp_path / "tok")
    assert {p.name: p.read_bytes() for p in (tmp_path / "tok").iterdir()} == before
    # A run directory names its latest checkpoint, as it does for models.
    run = RunDir(tmp_path / "run")
    save_checkpoint(run.step(3), to_dict(cfg), {"codebook": flava.FlavaImageCodebook(cfg.codebook).state_dict()})
    run.point_latest(3, run.step(3))
    assert flava.load_codebook(run.root).cfg.vocab_size == cfg.codebook.vocab_size


def test_token_usage_against_a_direct_count():
    ids = torch.tensor([0, 0, 1, 3, 3, 3])
    u = token_usage(ids, vocab_size=5)
    p = np.array([2, 1, 0, 3, 0]) / 6
    want = np.exp(-sum(x * np.log(x) for x in p if x > 0))
    assert abs(u["perplexity"] - want) < 1e-9 and u["codes_used"] == 3 / 5 and u["codes_used_count"] == 3


def test_train_codebook_resumes_exactly(tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file, save_file

    from flava.train import codebook

    make_images(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)  # images named relative to it: the resume below runs elsewhere
    args = ["train-codebook", "--images", "imgs", "--steps", "12", "--batch-size", "4",
            "--save-every", "4", "--set", "codebook.vocab_size=32", "--set", "codebook.hidden_size=8"]
    assert cli([*args, "--output", str(tmp_path / "whole")]) == 0

    real = codebook.CodebookRun.train_step

    def crash_at_step_6(self):
        if self.step == 6:
            raise RuntimeError("killed")
        return real(self)

    monkeypatch.setattr(codebook.CodebookRun, "train_step", crash_at_step_6)
    try:
        cli([*args, "--output", str(tmp_path / "cut")])
    except RuntimeError:
        pass
    monkeypatch.setattr(codebook.CodebookRun, "train_step", real)
    state = json.loads((tmp_path / "cut" / "training" / "state.json").read_text())
    assert state["step"] == 4
    # Not asked to resume: refused, nothing lost.
    assert cli([*args, "--output", str(tmp_path / "cut")]) == 2
    assert "--resume" in capsys.readouterr().err and (tmp_path / "cut" / "training" / "state.json").is_file()
    # Named as a codebook or a model before it is finished: said to be one, with the command that finishes it.
    with pytest.raises(CheckpointError, match=r"training has not finished \(step 4 of 12\).*--resume --output"):
        flava.load_codebook(tmp_path / "cut")
    assert cli(["info", str(tmp_path / "cut")]) == 2
    assert "image codebook whose training has not finished" in capsys.readouterr().err
    # Weights holding a NaN (saved as a run diverged): refused in one line, the state kept.
    from flava.io.checkpoint import write_checksums

    training = tmp_path / "cut" / "training"
    good = (training / "weights.safetensors").read_bytes()
    weights = load_file(str(training / "weights.safetensors"))
    next(v for v in weights.values() if v.is_floating_point()).view(-1)[0] = float("nan")
    save_file(weights, str(training / "weights.safetensors"))
    write_checksums(training)
    assert cli(["train-codebook", "--output", str(tmp_path / "cut"), "--resume"]) == 2
    assert "hold NaN or infinite values" in capsys.readouterr().err
    (training / "weights.safetensors").write_bytes(good)
    write_checksums(training)
    monkeypatch.chdir(tmp_path.parent)
    assert cli(["train-codebook", "--output", str(tmp_path / "cut"), "--resume"]) == 0
    assert "resuming the codebook training" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    want, got = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("whole", "cut"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert not (tmp_path / "cut" / "training").exists()  # the finished codebook replaced the state
    lines = [json.loads(x)["step"] for x in (tmp_path / "cut" / "codebook_metrics.jsonl").read_text().splitlines()]
    assert lines == sorted(set(lines))  # rows after the save were not logged twice
    # A resume of nothing names the path.
    assert cli([*args, "--output", str(tmp_path / "typo"), "--resume"]) == 2
    assert "holds no codebook training to resume" in capsys.readouterr().err
    # A resume may change how long the run is: stopped at 4 of 12, it finishes at 6.
    monkeypatch.setattr(codebook.CodebookRun, "train_step", crash_at_step_6)
    with pytest.raises(RuntimeError):
        cli([*args, "--output", str(tmp_path / "short")])
    monkeypatch.setattr(codebook.CodebookRun, "train_step", real)
    capsys.readouterr()
    # Not below where it stopped: that would save a codebook finished at step 4 of 2.
    assert cli([*args[:3], "--output", str(tmp_path / "short"), "--resume", "--steps", "2"]) == 2
    assert "--steps 2 is below the step the codebook training" in capsys.readouterr().err
    assert (tmp_path / "short" / "training" / "state.json").is_file()
    assert cli([*args[:3], "--output", str(tmp_path / "short"), "--resume", "--steps", "6"]) == 0
    assert "steps 12 -> 6" in capsys.readouterr().out
    lines = [json.loads(x)["step"] for x in (tmp_path / "short" / "codebook_metrics.jsonl").read_text().splitlines()]
    assert lines[-1] == 5 and (tmp_path / "short" / "model.safetensors").is_file()


def test_a_resume_below_the_step_reached_is_refused_before_any_note(tmp_path, capsys):
    """`--resume --steps 2` at step 5 said "note: steps 40 -> 2 (the schedules now run to that)",
    then refused."""
    import dataclasses

    from flava.config import to_dict
    from flava.train.codebook import CodebookTraining

    make_images(tmp_path / "imgs")
    (tmp_path / "cb" / "training").mkdir(parents=True)
    (tmp_path / "cb" / "training" / "state.json").write_text(json.dumps({
        "model": to_dict(flava.preset("tiny")), "settings": dataclasses.asdict(CodebookTraining(steps=40)),
        "images": [str(tmp_path / "imgs")], "pairs": [], "step": 5}))
    assert cli(["train-codebook", "--output", str(tmp_path / "cb"), "--resume", "--steps", "2"]) == 2
    out, err = capsys.readouterr()
    assert "note" not in out and "--steps 2 is below the step the codebook training in" in err
    assert "reached (5): a run cannot go back; resume with --steps 5 or more" in " ".join(err.split())


def test_train_codebook_help_says_the_training_defaults(capsys):
    from flava.train.codebook import CodebookTraining

    with pytest.raises(SystemExit):
        cli(["train-codebook", "--help"])
    said = " ".join(capsys.readouterr().out.split())
    d = CodebookTraining()
    for option, value in (("--steps", d.steps), ("--batch-size", d.batch_size), ("--lr", d.lr)):
        own = said.split(f"{option} {option.strip('-').upper().replace('-', '_')}")[-1].split(" --")[0]
        assert f"(default {value:g}" in own, (option, own)
    with pytest.raises(SystemExit):
        cli(["serve", "--help"])
    from flava.serve.app import create_app
    import inspect

    k = inspect.signature(create_app).parameters["default_k"].default
    assert f"a search without k gets {k})" in " ".join(capsys.readouterr().out.split())


def test_images_that_fail_or_stall_mid_run_end_it_with_the_steps_done_saved(tmp_path, monkeypatch, capsys, one_thread):
    from safetensors.torch import load_file

    from flava.train import codebook

    make_images(tmp_path / "imgs")
    whole = {f: f.read_bytes() for f in (tmp_path / "imgs").iterdir()}
    args = ["train-codebook", "--images", str(tmp_path / "imgs"), "--steps", "12", "--batch-size", "4",
            "--save-every", "4", "--eval-images", "4", "--set", "codebook.vocab_size=32", "--set",
            "codebook.hidden_size=8"]
    assert cli([*args, "--output", str(tmp_path / "whole")]) == 0
    real = codebook.CodebookRun.train_step

    def store_down_at_step_6(self):  # the images turn to junk, as a network file system's might
        if self.step == 6:
            for f in whole:
                f.write_bytes(b"<html>503</html>")
        return real(self)

    monkeypatch.setattr(codebook.CodebookRun, "train_step", store_down_at_step_6)
    capsys.readouterr()
    assert cli([*args, "--output", str(tmp_path / "cut")]) == 2
    assert re.search(r"; step 6 is saved in \S*cut/training: once the data is readable, continue with --resume$",
                     capsys.readouterr().err.strip())
    monkeypatch.setattr(codebook.CodebookRun, "train_step", real)
    for f, data in whole.items():
        f.write_bytes(data)
    assert cli([*args, "--output", str(tmp_path / "cut"), "--resume"]) == 0
    # The same command resumed: nothing is ignored (the image tokens set to the codebook's 32 had
    # read as a --set the resume ignored).
    assert "ignored" not in capsys.readouterr().out
    want, got = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("whole", "cut"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    # A stop requested while a step's images are awaited (a stalled store) is taken at once, with
    # the steps done saved: a scheduler's grace period does not wait for the read to give up.
    from flava.data.pipeline import _Draws

    real_draw = _Draws._sample

    def stalls_at_step_7(self, *args, **kwargs):  # an image read that hangs, in this process (no workers)
        if not stalled and run_at[0] == 6:
            stalled.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)
        return real_draw(self, *args, **kwargs)

    def step_seen(self):
        run_at[0] = self.step
        return real(self)

    stalled, run_at = [], [0]
    monkeypatch.setattr(_Draws, "_sample", stalls_at_step_7)
    monkeypatch.setattr(codebook.CodebookRun, "train_step", step_seen)
    capsys.readouterr()
    assert cli([*args, "--output", str(tmp_path / "stopped")]) == 143
    assert time.monotonic() - stalled[0] < 20
    assert "stopped by SIGTERM at step 6 of 12; saved in" in capsys.readouterr().err
    monkeypatch.setattr(_Draws, "_sample", real_draw)
    assert cli([*args, "--output", str(tmp_path / "stopped"), "--resume"]) == 0
    got = load_file(str(tmp_path / "stopped" / "model.safetensors"))
    assert all(torch.equal(want[k], got[k]) for k in want)

    # Stopped while its evaluation sample is read, before any step: nothing is saved (it had
    # saved step 0, and the same command was then refused for want of --resume).
    def stalls_at_once(self, *args, **kwargs):
        if not early:
            early.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)
        return real_draw(self, *args, **kwargs)

    early = []
    monkeypatch.setattr(_Draws, "_sample", stalls_at_once)
    assert cli([*args, "--output", str(tmp_path / "early")]) == 143
    assert "stopped by SIGTERM before the first step; nothing to save: run the same command again to start it" in \
        capsys.readouterr().err
    monkeypatch.setattr(_Draws, "_sample", real_draw)
    assert cli([*args, "--output", str(tmp_path / "early")]) == 0

    # Stopped after the last step, in its final evaluation: every step is saved and the resume
    # evaluates and writes the codebook (the stop had been said, then ignored, with exit status 0).
    real_evaluate = codebook.CodebookRun.evaluate

    def stopped_in_final(self, stoppable=False):
        if stoppable and not late:
            late.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(self, stoppable)

    late = []
    monkeypatch.setattr(codebook.CodebookRun, "evaluate", stopped_in_final)
    capsys.readouterr()
    assert cli([*args, "--output", str(tmp_path / "late")]) == 143
    assert "stopped by SIGTERM after the last step, before the final evaluation; every step is saved in" in \
        " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "late" / "model.safetensors").exists()
    assert cli([*args, "--output", str(tmp_path / "late"), "--resume"]) == 0
    got = load_file(str(tmp_path / "late" / "model.safetensors"))
    assert all(torch.equal(want[k], got[k]) for k in want)


REAL_STEP = (codebook_module.CodebookRun.train_step, codebook_module._gumbel_softmax)  # under any patch of them


def _diverging_at(monkeypatch, steps, crash_at=None):
    """Make the steps in `steps` diverge (their decoder inputs NaN, so their loss and gradients),
    and the step `crash_at` end the process as a kill would."""
    from flava.train import codebook

    real_step, real_gumbel = REAL_STEP
    at = [0]

    def step(self):
        if self.step == crash_at:
            raise RuntimeError("killed")
        at[0] = self.step
        return real_step(self)

    def gumbel(*args, **kwargs):
        z = real_gumbel(*args, **kwargs)
        return z * float("nan") if at[0] in steps else z

    monkeypatch.setattr(codebook.CodebookRun, "train_step", step)
    monkeypatch.setattr(codebook, "_gumbel_softmax", gumbel)


def _finite(path):
    from safetensors.torch import load_file

    weights = load_file(str(path))
    return weights and all(torch.isfinite(v).all() for v in weights.values())


CODEBOOK_ARGS = ["--steps", "12", "--batch-size", "4", "--save-every", "4", "--eval-images", "4",
                 "--set", "codebook.vocab_size=32", "--set", "codebook.hidden_size=8"]


def test_a_non_finite_step_is_skipped_counted_and_resumed_exactly(tmp_path, monkeypatch, capsys):
    """A NaN step had updated the weights with NaN: every later step and the finished codebook were NaN."""
    from safetensors.torch import load_file

    from flava.train import codebook

    make_images(tmp_path / "imgs")
    args = ["train-codebook", "--images", str(tmp_path / "imgs"), *CODEBOOK_ARGS]
    _diverging_at(monkeypatch, {2, 3, 6})
    watched, real = [], codebook.CodebookRun.train_step

    def watch(self):  # the weights around a skipped step
        before = [p.detach().clone() for p in self.encoder.state_dict().values()] if self.step == 2 else None
        row = real(self)
        if before is not None:
            watched.append(all(torch.equal(a, p) for a, p in zip(before, self.encoder.state_dict().values())))
        return row

    monkeypatch.setattr(codebook.CodebookRun, "train_step", watch)
    assert cli([*args, "--output", str(tmp_path / "whole")]) == 0
    assert watched == [True] and "updates skipped for a non-finite loss or gradient: 3" in capsys.readouterr().out
    assert _finite(tmp_path / "whole" / "model.safetensors") and _finite(tmp_path / "whole" / "decoder.safetensors")
    assert json.loads((tmp_path / "whole" / "codebook_report.json").read_text())["nonfinite_steps"] == 3

    # A save due while updates are skipped (steps 2 and 3: at step 4, or at a stop) waits for a finite step.
    _diverging_at(monkeypatch, {2, 3, 6}, crash_at=5)
    with pytest.raises(RuntimeError):
        cli([*args, "--output", str(tmp_path / "cut")])
    assert not (tmp_path / "cut" / "training").exists()
    skipping = codebook.CodebookRun.train_step

    def stop_at_step_3(self):  # before its batch is drawn: the step is not taken
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return skipping(self)

    monkeypatch.setattr(codebook.CodebookRun, "train_step", stop_at_step_3)
    capsys.readouterr()
    assert cli([*args, "--output", str(tmp_path / "cut")]) == 143
    assert "stopped by SIGTERM at step 3 of 12; its latest updates were skipped (not finite), so nothing was saved: " \
           "run the same command again, with a lower --lr if it diverges" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "cut" / "training").exists()
    _diverging_at(monkeypatch, {2, 3, 6}, crash_at=9)
    with pytest.raises(RuntimeError):
        cli([*args, "--output", str(tmp_path / "cut")])
    state = json.loads((tmp_path / "cut" / "training" / "state.json").read_text())
    assert state["step"] == 8 and state["nonfinite_steps"] == 3
    _diverging_at(monkeypatch, {2, 3, 6})
    capsys.readouterr()
    assert cli(["train-codebook", "--output", str(tmp_path / "cut"), "--resume"]) == 0
    assert "updates skipped for a non-finite loss or gradient: 3" in capsys.readouterr().out
    want, got = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("whole", "cut"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_a_diverging_run_stops_keeps_its_last_save_and_resumes_with_a_lower_lr(tmp_path, monkeypatch, capsys):
    """A diverging run trained on NaN to its end, saving NaN weights over its only save, which its
    resume then refused as damaged: all its work was lost."""
    make_images(tmp_path / "imgs")
    args = ["train-codebook", "--images", str(tmp_path / "imgs"), *CODEBOOK_ARGS]
    out = tmp_path / "cb"
    _diverging_at(monkeypatch, range(5, 100))
    assert cli([*args, "--output", str(out), "--log-every", "1"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "the loss or its gradients were not finite for 5 steps in a row (steps 5-9; " \
           "their updates were skipped, --max-nonfinite-steps), so the codebook training stopped; its latest save " \
           f"(step 4 in {out / 'training'}, made after a finite step) is kept: continue it with a lower learning " \
           "rate, --resume --lr 0.0002 (now 0.002)" in err
    assert json.loads((out / "training" / "state.json").read_text())["step"] == 4
    assert _finite(out / "training" / "weights.safetensors")
    monkeypatch.undo()
    assert cli(["train-codebook", "--output", str(out), "--resume", "--lr", "0.0002"]) == 0
    said = capsys.readouterr().out
    assert "note: resuming with lr 0.002 -> 0.0002" in said and "ignored" not in said
    assert _finite(out / "model.safetensors")
    assert json.loads((out / "codebook_report.json").read_text())["settings"]["lr"] == 0.0002

    # Diverging for real (a learning rate far too high): stopped before any save, which is said, at the
    # save it was due (nothing logged in between), however long the run.
    code = cli([*args, "--output", str(tmp_path / "high"), "--lr", "1e30", "--steps", "100", "--max-nonfinite-steps",
                "2"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "2 steps in a row" in err and err.endswith(
        "so the codebook training stopped; nothing was saved yet: run it again with a lower learning rate, "
        "--lr 1e+29 (now 1e+30)"), err
    assert not (tmp_path / "high" / "training").exists() and not (tmp_path / "high" / "model.safetensors").exists()


def test_a_resume_takes_new_save_every_and_log_every(tmp_path, monkeypatch, capsys):
    """They were ignored ("note: ... ignored: log_every, save_every"), as pretrain's resume takes them."""
    make_images(tmp_path / "imgs")
    out = tmp_path / "cb"
    _diverging_at(monkeypatch, (), crash_at=6)
    with pytest.raises(RuntimeError):
        cli(["train-codebook", "--images", str(tmp_path / "imgs"), *CODEBOOK_ARGS, "--output", str(out)])
    assert json.loads((out / "training" / "state.json").read_text())["step"] == 4
    _diverging_at(monkeypatch, (), crash_at=7)
    capsys.readouterr()
    with pytest.raises(RuntimeError):
        cli(["train-codebook", "--output", str(out), "--resume", "--save-every", "2", "--log-every", "1"])
    said = capsys.readouterr().out
    assert "note: resuming with log_every 50 -> 1, save_every 4 -> 2" in said and "ignored" not in said, said
    state = json.loads((out / "training" / "state.json").read_text())
    assert state["step"] == 6 and state["settings"]["save_every"] == 2
    rows = [json.loads(x)["step"] for x in (out / "codebook_metrics.jsonl").read_text().splitlines()]
    assert rows == [0, 4, 5, 6]
    # A save of an earlier release (its AdamW unfused, which cannot skip a step on the device) resumes too.
    from flava.io.checkpoint import write_checksums

    optimizer = torch.load(out / "training" / "optimizer.pt", weights_only=True)
    for group in optimizer["param_groups"]:
        group.update(fused=None, foreach=None)
    torch.save(optimizer, out / "training" / "optimizer.pt")
    write_checksums(out / "training")
    # So is the outage wait (it had been neither taken nor said to be ignored); the seed is the run's own.
    monkeypatch.undo()
    assert cli(["train-codebook", "--output", str(out), "--resume", "--seed", "3", "--outage-minutes", "5"]) == 0
    said = capsys.readouterr().out
    assert "note: resuming with outage_minutes 30 -> 5" in said and "ignored: seed" in said
    assert json.loads((out / "codebook_report.json").read_text())["settings"]["outage_minutes"] == 5


def test_a_resume_whose_data_is_gone_reads_the_data_named_in_its_place(tmp_path, monkeypatch, capsys):
    """Moved (or mounted elsewhere on another node), the data could not be named: the run's own path
    was read and "does not exist" ended it."""
    import shutil

    from safetensors.torch import load_file

    make_images(tmp_path / "imgs")
    shutil.copytree(tmp_path / "imgs", tmp_path / "same")
    assert cli(["train-codebook", "--images", str(tmp_path / "same"), *CODEBOOK_ARGS, "--output",
                str(tmp_path / "whole")]) == 0
    _diverging_at(monkeypatch, (), crash_at=6)
    with pytest.raises(RuntimeError):
        cli(["train-codebook", "--images", str(tmp_path / "imgs"), *CODEBOOK_ARGS, "--output", str(tmp_path / "cut")])
    monkeypatch.undo()
    (tmp_path / "imgs").rename(tmp_path / "moved")
    capsys.readouterr()
    assert cli(["train-codebook", "--output", str(tmp_path / "cut"), "--resume", "--images",
                str(tmp_path / "moved")]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert f"note: the run's images ({tmp_path / 'imgs'}) are gone: reading {tmp_path / 'moved'} in their place" in said
    want, got = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("whole", "cut"))
    assert "ignored" not in said and all(torch.equal(want[k], got[k]) for k in want)


def test_a_stop_at_once_after_the_last_step_keeps_every_step(tmp_path, monkeypatch, capsys):
    """A second Ctrl-C in the final evaluation lost every step since the last periodic save."""
    import signal

    from safetensors.torch import load_file

    from flava import stopping
    from flava.train import codebook

    make_images(tmp_path / "imgs")
    args = ["train-codebook", "--images", str(tmp_path / "imgs"), *CODEBOOK_ARGS, "--save-every", "5"]
    assert cli(args + ["--output", str(tmp_path / "whole")]) == 0
    monkeypatch.setattr(stopping, "REPEAT_WINDOW_S", 0.0)
    evaluate, calls = codebook.CodebookRun.evaluate, []

    def interrupted_at_the_end(self, stoppable=False):
        calls.append(self.step)
        if len(calls) == 2:  # the final evaluation (the first scores the start)
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return evaluate(self, stoppable)

    monkeypatch.setattr(codebook.CodebookRun, "evaluate", interrupted_at_the_end)
    capsys.readouterr()
    assert cli(args + ["--output", str(tmp_path / "cut")]) == 130
    assert "saved step 12 in" in capsys.readouterr().err
    assert json.loads((tmp_path / "cut" / "training" / "state.json").read_text())["step"] == 12
    monkeypatch.undo()
    assert cli(["train-codebook", "--output", str(tmp_path / "cut"), "--resume"]) == 0
    want, got = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("whole", "cut"))
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_source_of_no_readable_image_is_named_alone(tmp_path, capsys):
    """The message named every source ("no image of GOOD, BAD could be read"), the good ones too."""
    make_images(tmp_path / "good")
    (tmp_path / "bad").mkdir()
    for i in range(2):
        (tmp_path / "bad" / f"{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    assert cli(["train-codebook", "--images", str(tmp_path / "good"), str(tmp_path / "bad"), "--output",
                str(tmp_path / "o"), *CODEBOOK_ARGS]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"no image of {tmp_path / 'bad'} could be read" in err and str(tmp_path / "good") not in err, err


def test_the_outage_wait_is_set_and_named_by_its_flag(tmp_path, monkeypatch, capsys):
    """The wait's messages named outage_minutes, which no flag set and --set refused as an unknown key."""
    from flava.data import sources

    make_images(tmp_path / "imgs")
    assert cli(["train-codebook", "--images", str(tmp_path / "imgs"), "--output", str(tmp_path / "o"), "--set",
                "outage_minutes=1"]) == 2
    err = capsys.readouterr().err
    assert "--set outage_minutes: outage_minutes is a training setting, not the model's; give it as " \
           "--outage-minutes" in err and len(err.strip().splitlines()) == 1, err
    # A store that cannot serve the images now: waited for as long as --outage-minutes says.
    monkeypatch.setattr(sources, "OUTAGE_PAUSES_S", (0.05, 0.1))
    monkeypatch.setattr(sources, "open_shard", lambda shard: sources.Opened([], failure=f"{shard.name}: 503",
                                                                            passing=True))
    assert cli(["train-codebook", "--images", str(tmp_path / "imgs"), "--output", str(tmp_path / "o"),
                "--outage-minutes", "0.005"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"waiting for the store: reading it again in 0\.05 s \(0 s of up to 0 s, --outage-minutes\)", err)
    assert "could not serve it for 0 s (the wait allowed: --outage-minutes=0.005; a shard that fails so for good " \
           "is passed over with 0)" in err
    assert not (tmp_path / "o").exists()


def test_a_table_without_usable_rows_and_an_infinite_lr_are_refused_in_one_line(tmp_path, capsys):
    """A table of a header alone, or of a row without its image, had ended in a ZeroDivisionError's
    traceback; --lr inf was taken (and every step's loss was NaN) where --lr nan was refused."""
    (tmp_path / "hdr.csv").write_text("image,caption\n")
    (tmp_path / "noimage.csv").write_text("image,caption\n,a cat\n")
    make_images(tmp_path / "imgs", n=4)
    for given, said in ((["--pairs", str(tmp_path / "hdr.csv")], f"{tmp_path / 'hdr.csv'} holds no samples; give "
                         "data that has some (a table needs rows under its header)"),
                        (["--pairs", str(tmp_path / "noimage.csv")], f"{tmp_path / 'noimage.csv'} holds no usable "
                         "sample (1 table row without an image); fix those rows"),
                        (["--images", str(tmp_path / "imgs"), "--lr", "inf"], "lr must lie in (0, inf); got inf"),
                        (["--images", str(tmp_path / "imgs"), "--lr", "nan"], "lr must lie in (0, inf); got nan")):
        assert cli(["train-codebook", *given, "--output", str(tmp_path / "o"), "--steps", "2"]) == 2
        err = capsys.readouterr().err
        assert said in " ".join(err.split()) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
