"""Bad inputs and damaged runs, each reproduced first: bad records are counted and trained around,
user errors end in one line, a run owns its directory and its settings, divergence is caught,
and a resume survives damage."""

import argparse
import io
import json
import shutil
import os
import re
import stat
import struct
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import flava
from conftest import narrow_args, pretrain_args
from flava.cli import main as cli
from flava.config import preset, to_dict
from flava.data.pipeline import BatchStream
from flava.data.samples import SampleMaker, SampleSpec
from flava.data.decode import open_image
from flava.data.sources import csv_pairs, read_caption
from flava.data.tars import tar_pairs
from flava.data.texts import text_file
from flava.errors import CheckpointError, ConfigError, DataError
from flava.io.runs import RunDir, resolve


def spec():
    return SampleSpec(image_size=32, codebook_image_size=32, grid=4, max_text_length=16)


def png(color=(200, 10, 10), size=(24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def raw_members(members: list[tuple[str, bytes]]) -> bytes:
    """Tar members without the end-of-archive blocks, to splice damage after them."""
    out = b""
    for name, data in members:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        out += info.tobuf(format=tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512)
    return out


def one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# --------------------------------------------------------------------------- data


def test_non_string_texts_and_captions_are_counted_not_fatal(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"text": 5}\n{"text": null}\n{"text": "fine"}\n[1, 2]\n{"text": "also"}\n')
    src = text_file(str(tmp_path / "t.jsonl"))
    assert src.records == ["fine", "also"]
    assert src.rejected == {"json line without a text string in 'text'": 3}
    members = [("a.png", png()), ("a.json", b'{"caption": 5}'), ("b.png", png()), ("b.json", b'{"caption": "ok"}')]
    write_tar(tmp_path / "s.tar", members)
    records = tar_pairs(str(tmp_path / "s.tar")).records
    with pytest.raises(flava.data.members.BadSample, match="caption is not text"):
        read_caption(records[0].caption)
    stream = BatchStream("pairs", tar_pairs(str(tmp_path / "s.tar")), SampleMaker(spec(), 0), 1, seed=0)
    for _ in range(3):
        stream.next_batch()
    assert set(stream.skipped) == {"caption is not text"}


def test_one_bad_csv_row_or_a_huge_caption_spoils_nothing_else(tmp_path):
    Image.new("RGB", (24, 24)).save(tmp_path / "a.png")
    rows = b"image,caption\na.png,good one\na.png,bad \xff\xfe bytes\na.png," + b"x" * 200_000 + b"\na.png,fine\n"
    (tmp_path / "p.csv").write_bytes(rows)
    src = csv_pairs(str(tmp_path / "p.csv"))
    assert [r.caption[:4] for r in src.records] == ["good", "xxxx", "fine"]
    assert src.rejected == {"undecodable csv row": 1}
    maker = SampleMaker(spec(), 0)
    with pytest.raises(flava.data.members.BadSample, match="over-long caption"):
        maker("pairs", src.records[1], (1, 0))


def test_a_cut_shard_is_counted_and_a_giant_member_is_refused(tmp_path):
    members = [(f"{i:03d}.{ext}", data) for i in range(20) for ext, data in (("png", png()), ("txt", b"cap"))]
    write_tar(tmp_path / "full.tar", members)
    data = (tmp_path / "full.tar").read_bytes()
    # Cut at a header boundary: the start of sample 12's first member.
    with tarfile.open(tmp_path / "full.tar") as tar:
        cut = next(m.offset for m in tar.getmembers() if m.name == "012.png")
    (tmp_path / "cut.tar").write_bytes(data[:cut])
    src = tar_pairs(str(tmp_path / "cut.tar"))
    assert len(src.records) == 12 and src.rejected == {"truncated tar shard": 1}
    assert tar_pairs(str(tmp_path / "full.tar")).rejected == {}
    # Cut inside that member: counted once, as it is (it was also 'corrupt tar shard').
    (tmp_path / "cut.tar").write_bytes(data[:cut + 512 + 10])
    src = tar_pairs(str(tmp_path / "cut.tar"))
    assert len(src.records) == 12 and src.rejected == {"tar member past the end of its shard": 1}

    header = tarfile.TarInfo("big.png")
    header.size = 1 << 40  # a header claiming a 1 TiB member
    (tmp_path / "giant.tar").write_bytes(raw_members(members[:4]) + header.tobuf(format=tarfile.GNU_FORMAT)
                                         + b"\0" * 4096)
    src = tar_pairs(str(tmp_path / "giant.tar"))
    assert len(src.records) == 2
    assert src.rejected["tar member past the end of its shard"] == 1


def test_sixteen_bit_greys_keep_their_range_and_bombs_are_refused_before_decoding(tmp_path, monkeypatch):
    grey = np.full((8, 8), 32768, dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    rgb = np.asarray(open_image(tmp_path / "g16.png"))
    assert rgb.shape == (8, 8, 3) and abs(int(rgb[0, 0, 0]) - 128) <= 1  # was clipped to 255

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 13000, 13000, 1, 0, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
    (tmp_path / "bomb.png").write_bytes(bomb)
    with pytest.raises(flava.data.members.BadSample, match="image too large"):
        open_image(tmp_path / "bomb.png")
    # A phone's 45-108 MP JPEG is decoded at the largest DCT scale within the limit, not refused, by
    # PIL's path and by training's libjpeg-turbo path alike: the limits lowered here, as such a
    # photograph meets them (ours, 40 MP, and PIL's own bomb limit, 89 MP). A PNG as large is refused.
    import flava.data.decode as decode_module
    from flava.data.decode import decode_rgb, jpeg_within_limit

    assert jpeg_within_limit(9000, 5000) == (4500, 2500) and jpeg_within_limit(12000, 9000) == (6000, 4500)
    assert jpeg_within_limit(4000, 3000) is None
    monkeypatch.setattr(decode_module, "MAX_IMAGE_PIXELS", 2_000_000)
    Image.new("RGB", (2001, 1201), (20, 120, 220)).save(tmp_path / "odd.jpg", quality=80)
    photo = open_image(tmp_path / "odd.jpg")  # odd sides: PIL scales by whole sides
    assert photo.size == (1001, 601) and photo.getpixel((10, 10)) == pytest.approx((20, 120, 220), abs=3)
    assert np.array_equal(decode_rgb(tmp_path / "odd.jpg"), np.asarray(photo))
    assert decode_rgb(tmp_path / "odd.jpg", draft=lambda w, h: (w // 16, h // 16)).shape == (151, 251, 3)
    Image.new("CMYK", (2001, 1201)).save(tmp_path / "cmyk.jpg", quality=80)  # libjpeg-turbo's path cannot: PIL's
    assert open_image(tmp_path / "cmyk.jpg").size == (1001, 601)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    Image.new("RGB", (3000, 2000), (20, 120, 220)).save(tmp_path / "big.jpg", quality=80)
    assert open_image(tmp_path / "big.jpg").size == (1500, 1000) == decode_rgb(tmp_path / "big.jpg").shape[1::-1]
    wide = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 9000, 5000, 8, 2, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
    with pytest.raises(flava.data.members.BadSample, match="image too large"):
        open_image(wide)

    (tmp_path / "c.txt").write_bytes(b"first line\nbroken \xff line\nthird line\n")
    src = text_file(str(tmp_path / "c.txt"))
    assert src.records == ["first line", "third line"] and src.rejected == {"undecodable text line": 1}


def test_a_bad_record_is_counted_once_however_often_it_is_drawn(tmp_path):
    Image.new("RGB", (24, 24)).save(tmp_path / "a.png")
    rows = ["image,caption"] + [f"a.png,caption {i}" if i not in (2, 5) else "a.png," for i in range(8)]
    (tmp_path / "p.csv").write_text("\n".join(rows) + "\n")
    stream = BatchStream("pairs", csv_pairs(str(tmp_path / "p.csv")), SampleMaker(spec(), 0), 2, seed=0)
    for _ in range(12):  # three epochs
        stream.next_batch()
    # Each epoch meets both at their places (a replacement may draw one again): six draws or more.
    assert stream.skipped["empty caption"] >= 6
    assert {k: len(v) for k, v in stream.bad.items()} == {"empty caption": 2}


@pytest.mark.slow
def test_naming_only_pairs_trains_only_pairs_and_says_so(train_data, tmp_path, capsys):
    args = pretrain_args(train_data, tmp_path / "run", "pairs_clean.csv")
    for kind in ("images", "text"):
        i = next(i for i, a in enumerate(args) if a.startswith(f"data.{kind}="))
        del args[i - 1:i + 1]
    assert cli(args + ["--max-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "no images data given" in out and "no text data given" in out and "demo" not in out
    kinds = {json.loads(line)["kind"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()}
    assert kinds == {"pairs"}


def test_named_data_the_run_never_reads_is_said_at_the_start(train_data):
    # Listed as used at the start and counted 0 at the end, with no word why.
    from conftest import tiny_run
    from flava.train.kinds import trained_kinds

    pairs, images, text = (str(train_data / p) for p in ("pairs.csv", "img", "text.txt"))
    kinds, notes = trained_kinds(_with(tiny_run(train_data), mixing=[1, 0, 0]))
    assert kinds == ("pairs", "images", "text")  # read as before: the note says it
    assert notes == [f"data.images ({images}) and data.text ({text}) are named but not read: data.mixing gives them "
                     "a share of 0; leave them out or give them a share"]
    _, notes = trained_kinds(_with(tiny_run(train_data), mixing=[0.5, 0, 0.5], mixing_schedule="linear",
                                   mixing_end=[0.5, 0.5, 0]))
    assert notes == []  # images get a share by the end
    _, notes = trained_kinds(_with(tiny_run(train_data, stage="text-mlm")))
    assert notes == [f"data.pairs ({pairs}) and data.images ({images}) are named but not read: stage text-mlm trains "
                     "on text alone; leave them out or choose a stage that reads them (joint)"]
    _, notes = trained_kinds(_with(tiny_run(train_data)))
    assert notes == []


@pytest.mark.slow  # a `flava pretrain` run
def test_a_kind_given_no_share_is_said_once_not_noted_as_small(train_data, tmp_path, capsys):
    (tmp_path / "two.txt").write_text("one line\ntwo line\n")
    args = pretrain_args(train_data, tmp_path / "run", "pairs_clean.csv")
    args[args.index(f'data.text=["{train_data / "text.txt"}"]')] = f'data.text=["{tmp_path / "two.txt"}"]'
    assert cli(args + narrow_args() + ["--max-steps", "1", "--set", "data.mixing=[1,0,0]"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "are named but not read: data.mixing gives them a share of 0" in out
    assert "two.txt holds 2 samples" not in out  # it is never read


def _with(cfg, **data):
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


# --------------------------------------------------------------------------- runs


def test_a_second_writer_is_refused(train_data, tmp_path, capsys):
    with RunDir(tmp_path / "run").lock():
        code = cli(pretrain_args(train_data, tmp_path / "run") + ["--max-steps", "1"])
    err = one_line_error(capsys, code)
    assert "in use by another flava run (pid" in err


def test_data_with_no_usable_sample_is_one_line_with_loader_workers_too(train_data, tmp_path, capsys):
    (tmp_path / "header.csv").write_text("image,caption\n")
    args = pretrain_args(train_data, tmp_path / "a", pairs=str(tmp_path / "header.csv")) + ["--max-steps", "1"]
    assert "header.csv holds no samples" in one_line_error(capsys, cli(args))
    (tmp_path / "blank.csv").write_text("image,caption\n,a cat\n,a dog\n")  # every row rejected, and why
    args = pretrain_args(train_data, tmp_path / "a", pairs=str(tmp_path / "blank.csv")) + ["--max-steps", "1"]
    err = one_line_error(capsys, cli(args))
    assert "blank.csv holds no usable sample (2 " in err and "header" not in err
    (tmp_path / "bad").mkdir()
    for i in range(3):
        (tmp_path / "bad" / f"{i}.png").write_bytes(b"not a picture")
    args = pretrain_args(train_data, tmp_path / "b")
    for kind in ("pairs", "text"):  # images alone: the first step draws them
        i = next(i for i, a in enumerate(args) if a.startswith(f"data.{kind}="))
        del args[i - 1:i + 1]
    args += ["--max-steps", "1", "--set", f'data.images=["{tmp_path / "bad"}"]', "--set", "data.num_workers=1"]
    # Found by the source's probe before any worker starts.
    assert "bad: none of 3 records drawn from it makes a sample" in one_line_error(capsys, cli(args))


def test_a_table_none_of_whose_images_exist_names_one_looked_for(train_data, tmp_path):
    # Its paths written relative to the working folder, not to the table's: the refusal named no
    # path, and so not where they had been looked for.
    (tmp_path / "sub").mkdir()
    shutil.copy(train_data / "pairs_clean.csv", tmp_path / "sub" / "p.csv")
    stream = BatchStream("pairs", csv_pairs(str(tmp_path / "sub" / "p.csv")), SampleMaker(spec(), 0), 2, seed=0)
    with pytest.raises(DataError) as caught:
        stream.probe()
    assert re.fullmatch(rf"\S+p\.csv: none of 16 records drawn from it makes a sample \(16 missing image file: e\.g\. "
                        rf"{tmp_path / 'sub'}/img/a/\d+\.png does not exist; a table's relative paths are read "
                        r"from its folder\); fix the data or leave the source out", str(caught.value))


def test_a_loader_workers_error_is_its_own_one_line():
    # Met in a worker, the DataLoader re-raises it with the worker's whole traceback as its message.
    from torch.utils.data import DataLoader, IterableDataset

    from flava.data.pipeline import _unwrapped

    class Failing(IterableDataset):
        def __iter__(self):
            raise DataError("shards/x: no usable sample in 100 records drawn to replace a bad one of shard 3")

    with pytest.raises(DataError) as caught:
        next(iter(DataLoader(Failing(), batch_size=None, num_workers=1)))
    assert "Traceback" in str(caught.value)
    assert str(_unwrapped(caught.value)) == "shards/x: no usable sample in 100 records drawn to replace a bad one " \
        "of shard 3"


@pytest.mark.slow  # three `flava pretrain` starts: end to end
def test_one_image_as_the_image_data_is_refused(train_data, tmp_path, capsys):
    # Every images batch was that image repeated, plain or weighted.
    image = train_data / "img" / "a" / "3.png"
    folder = tmp_path / "other"
    folder.mkdir()
    for i in (1, 2):
        shutil.copy(train_data / "img" / "a" / f"{i}.png", folder)
    for spec, beside in ((f'["{image}"]', False), (f'[{{"path": "{image}", "weight": 2}}]', False),
                         (f'["{folder}", "{image}"]', True)):
        args = pretrain_args(train_data, tmp_path / "run") + narrow_args() + ["--max-steps", "1", "--set",
                                                                              f"data.images={spec}"]
        err = " ".join(one_line_error(capsys, cli(args)).split())
        assert "3.png is a source of one image: every images batch drawn from it would repeat it" in err
        assert ("move it into a folder beside it" in err) == beside
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_source_with_no_usable_sample_is_refused_before_training(train_data, tmp_path, capsys):
    # Drawn at its first turn (step 40 of one user's run) it failed the run there, and its resume.
    (tmp_path / "allbad").mkdir()
    for i in range(2):
        (tmp_path / "allbad" / f"{i}.jpg").write_bytes(b"\xff\xd8 not a picture")
    images = f'data.images=["{train_data / "img"}", "{tmp_path / "allbad"}"]'
    args = pretrain_args(train_data, tmp_path / "run") + ["--max-steps", "1", "--set", images]
    err = " ".join(one_line_error(capsys, cli(args)).split())
    assert "allbad: none of 2 records drawn from it makes a sample (2 unreadable image); fix the data or leave " \
        "the source out" in err
    assert not (tmp_path / "run" / "checkpoints").exists()
    codebook = ["train-codebook", "--images", str(train_data / "img"), str(tmp_path / "allbad" / "0.jpg"),
                str(tmp_path / "allbad" / "1.jpg"), "--output", str(tmp_path / "cb"), "--steps", "2"]
    err = " ".join(one_line_error(capsys, cli(codebook)).split())
    assert "none of 2 records drawn from it makes a sample (2 unreadable image)" in err
    # Junk listed first (a folder unzipped on a Mac: __MACOSX/._*.jpg) does not condemn a source.
    (tmp_path / "mixed").mkdir()
    for i in range(120):
        (tmp_path / "mixed" / f"a_junk_{i:03d}.jpg").write_bytes(b"")
    for i in range(30):
        (train_data / "img" / "a" / f"{i % 16}.png").link_to(tmp_path / "mixed" / f"z_good_{i:02d}.png")
    images = f'data.images=["{tmp_path / "mixed"}"]'
    assert cli(pretrain_args(train_data, tmp_path / "run2") + ["--max-steps", "1", "--set", images]) == 0


def test_a_file_where_the_checkpoints_go_is_refused_before_training(train_data, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("mine")
    err = one_line_error(capsys, cli(pretrain_args(train_data, tmp_path / "run") + ["--max-steps", "1"]))
    assert "run/checkpoints is a file; choose another output" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step was trained


def test_a_start_refused_by_the_lock_leaves_the_holders_new_directory(train_data, tmp_path, capsys, monkeypatch):
    # Two runs started at the same moment on a new --output: both find no directory, one takes
    # the lock. The other's failed-start cleanup must not remove what the holder is writing.
    import flava.train.run as run_module

    out, start = tmp_path / "new", run_module.run_pretrain

    def the_other_run_locks_first(*args, **kwargs):
        with RunDir(out).lock():
            (out / "being-written").write_text("the holder's")
            return start(*args, **kwargs)

    monkeypatch.setattr(run_module, "run_pretrain", the_other_run_locks_first)
    err = one_line_error(capsys, cli(pretrain_args(train_data, out) + ["--max-steps", "1"]))
    assert "in use by another flava run (pid" in err
    assert (out / "being-written").read_text() == "the holder's"


@pytest.mark.slow
def test_a_stop_in_the_last_step_ends_the_run_and_max_steps_cannot_go_back(train_data, tmp_path, capsys, monkeypatch):
    import signal

    from flava.train import trainer

    step = trainer.micro_step

    def sigterm_in_the_last_step(owner, *args, **kwargs):  # its batch drawn: a stop then waits for the step
        if owner.step + 1 == owner.cfg.max_steps:
            os.kill(os.getpid(), signal.SIGTERM)  # recorded by the command's handler, acted on after the step
        return step(owner, *args, **kwargs)

    monkeypatch.setattr(trainer, "micro_step", sigterm_in_the_last_step)
    run = tmp_path / "run"
    assert cli(pretrain_args(train_data, run) + ["--max-steps", "2"]) == 0  # finished, not "stopped" (143)
    assert (run / "summary.json").is_file() and (run / "checkpoints" / "step_00000002").is_dir()
    capsys.readouterr()
    monkeypatch.setattr(trainer, "micro_step", step)
    history = (run / "config_history.jsonl").read_text() if (run / "config_history.jsonl").exists() else ""
    err = one_line_error(capsys, cli(["pretrain", "--output", str(run), "--resume", "--max-steps", "1"]))
    assert "--max-steps 1 is below the step the run reached (2)" in err
    assert ((run / "config_history.jsonl").read_text() if (run / "config_history.jsonl").exists() else "") == history


@pytest.mark.slow
def test_a_run_that_goes_on_past_its_summary_drops_it_and_max_steps_at_its_stop_ends_it(train_data, tmp_path, capsys,
                                                                                       monkeypatch):
    # Finished at 2, resumed for 4 and stopped at 3: summary.json still held step 2's results; then
    # --max-steps 3 said "already finished at step 3; nothing to do", wrote no summary and left
    # train_config.json at max_steps 4.
    import signal

    from flava.train import trainer

    step = trainer.micro_step

    def sigterm_in_step_3(owner, *args, **kwargs):
        if owner.step + 1 == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # recorded by the command's handler, acted on after the step
        return step(owner, *args, **kwargs)

    run = tmp_path / "run"
    assert cli(pretrain_args(train_data, run) + narrow_args() + ["--max-steps", "2"]) == 0
    assert (run / "summary.json").is_file()
    monkeypatch.setattr(trainer, "micro_step", sigterm_in_step_3)
    assert cli(["pretrain", "--output", str(run), "--resume", "--max-steps", "4"]) == 143
    assert (run / "checkpoints" / "step_00000003").is_dir() and not (run / "summary.json").exists()
    monkeypatch.setattr(trainer, "micro_step", step)
    capsys.readouterr()
    assert cli(["pretrain", "--output", str(run), "--resume", "--max-steps", "3"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "the run stopped at step 3, which max_steps 3 makes its last; ending it there" in out, out
    assert "already finished" not in out and "losses: the run's first and last values" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["samples_by_source"]["pairs"] and set(summary["last"]) == set(summary["first"])
    assert json.loads((run / "train_config.json").read_text())["max_steps"] == 3
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert cli(["pretrain", "--output", str(run), "--resume", "--max-steps", "3"]) == 0
    assert "the run already finished at step 3 (max_steps 3)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.slow
def test_samples_are_counted_by_the_source_that_gave_them_across_a_resume_that_names_another(train_data, tmp_path,
                                                                                              capsys):
    # After `--resume --override` changed data.pairs, summary.json and the closing line credited every
    # pairs sample to the new source ("pairs: 12 from again.csv" when 8 came from pairs.csv).
    rows = (train_data / "pairs.csv").read_text().splitlines()
    again = tmp_path / "again.csv"  # the same rows, by absolute paths: a table of the same size elsewhere
    again.write_text("\n".join([rows[0]] + [f"{train_data / r}" for r in rows[1:]]) + "\n")
    run = tmp_path / "run"
    only_pairs = ["--set", "data.images=[]", "--set", "data.text=[]"]
    assert cli(pretrain_args(train_data, run) + narrow_args() + only_pairs + ["--max-steps", "2"]) == 0
    capsys.readouterr()
    assert cli(["pretrain", "--output", str(run), "--resume", "--max-steps", "3", "--override",
                "--set", f'data.pairs=["{again}"]']) == 0
    out = " ".join(capsys.readouterr().out.split())
    seen = json.loads((run / "summary.json").read_text())["samples_by_source"]["pairs"]
    assert seen == {str(train_data / "pairs.csv"): 8, str(again): 4}, seen
    assert f"pairs: 8 from {train_data / 'pairs.csv'}, 4 from {again}" in out, out
    # A second resume keeps what each gave; a new batch size (a new order) keeps what came before it.
    assert cli(["pretrain", "--output", str(run), "--resume", "--max-steps", "4", "--override",
                "--set", "data.batch_size=2"]) == 0
    seen = json.loads((run / "summary.json").read_text())["samples_by_source"]["pairs"]
    assert seen == {str(train_data / "pairs.csv"): 8, str(again): 6}, seen


@pytest.mark.slow
def test_other_data_no_resume_can_follow_is_refused_once_pointing_to_a_new_run(train_data, tmp_path, capsys):
    # `--resume --set data.pairs=OTHER` was sent to pass --override, and then refused with "the data
    # changed; resume with the same data": a dead end. Data the saved positions cannot index is
    # refused in one line, with or without --override, naming the way on: a new run from this one.
    run = tmp_path / "run"
    only_pairs = ["--set", "data.images=[]", "--set", "data.text=[]"]
    assert cli(pretrain_args(train_data, run) + narrow_args() + only_pairs + ["--max-steps", "2"]) == 0
    capsys.readouterr()
    clean = train_data / "pairs_clean.csv"  # 16 rows, where the run's table has 17
    for override in ([], ["--override"]):
        err = " ".join(one_line_error(capsys, cli(["pretrain", "--output", str(run), "--resume", "--max-steps", "3",
                                                    *override, "--set", f'data.pairs=["{clean}"]'])).split())
        assert "holds 16 samples but the run was saved with 17: the data changed" in err, err
        assert f"--output NEW --set init={run}" in err and "--override" not in err, err
    assert not (run / "config_history.jsonl").exists()
    # The way it names: the new data in a new run from this one's weights.
    new = ["pretrain", "--output", str(tmp_path / "new"), "--set", f"init={run}", "--set", f'data.pairs=["{clean}"]',
           *only_pairs, "--set", "data.batch_size=4", "--set", "data.num_workers=0", "--max-steps", "1"]
    assert cli(new) == 0
    # Data of the run's shape can be followed: --override is the way, and the run says where it reads.
    same = tmp_path / "same.csv"
    rows = (train_data / "pairs.csv").read_text().replace("colour 3", "another colour").splitlines()
    same.write_text("\n".join([rows[0]] + [f"{train_data / r}" for r in rows[1:]]) + "\n")
    capsys.readouterr()
    err = one_line_error(capsys, cli(["pretrain", "--output", str(run), "--resume", "--max-steps", "3",
                                      "--set", f'data.pairs=["{same}"]']))
    assert "pass --override" in err, err
    assert cli(["pretrain", "--output", str(run), "--resume", "--max-steps", "3", "--override",
                "--set", f'data.pairs=["{same}"]']) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"the pairs data is now {same} (the run was saved on {train_data / 'pairs.csv'}): the run reads on " \
           "from its saved positions, in the new data" in out, out


@pytest.mark.slow
def test_a_stop_at_once_names_the_last_save_and_counts_from_the_first_signal(train_data, tmp_path, capsys,
                                                                            monkeypatch):
    # A second Ctrl-C after the stop's save had completed said "nothing was saved since the last save"
    # without naming it, "after 13 s" counted from the command's start, and at start-up it said the same
    # when nothing was ever saved.
    import signal

    from flava import stopping
    from flava.train import run as run_module
    from flava.train import trainer

    monkeypatch.setattr(stopping, "REPEAT_WINDOW_S", 0.0)  # a second signal at once is a second request
    resolve_device = run_module.resolve_device

    def two_sigints(*args):
        time.sleep(1.2)  # the command has run a while: the seconds said are the signals'
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(run_module, "resolve_device", two_sigints)
    run = tmp_path / "run"
    assert cli(pretrain_args(train_data, run) + narrow_args() + ["--max-steps", "3"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "flava pretrain: stopped at once by a second SIGINT 0 s after the first; nothing was " \
                          "saved: run the same command again to start the run", err
    monkeypatch.setattr(run_module, "resolve_device", resolve_device)
    save = trainer.Trainer.save

    sent = []

    def sigint_then_another_after_the_save(owner):
        if owner.step == 2:
            sent.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGINT)  # the stop's save, then a second Ctrl-C
        target = save(owner)
        if owner.step == 2:
            sent.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGINT)
        return target

    monkeypatch.setattr(trainer.Trainer, "save", sigint_then_another_after_the_save)
    assert cli(pretrain_args(train_data, run) + narrow_args() + ["--max-steps", "3", "--set", "save_every=2"]) == 130
    err = " ".join(capsys.readouterr().err.split())
    said = re.search(r"stopped at once by a second SIGINT (\d+) s after the first; saved (\S+): continue with the "
                     r"same command and --resume", err)
    assert said and said[2] == str(run / "checkpoints" / "step_00000002"), err
    assert abs(int(said[1]) - (sent[1] - sent[0])) <= 0.6, (err, sent)  # the save's time (more on a busy host)


@pytest.mark.parametrize("command, leaves", [
    ("prepare", "the units finished are kept: run the same command again to finish the rest"),
    ("embed", "the parts finished are kept: run the same command again to finish the rest"),
    ("ablate", "the runs finished are kept, and the run in progress from its last checkpoint: run the same command "
               "again to continue"),
    ("finetune", "nothing was saved: run the same command again to start the fine-tuning"),
    ("finetune --resume", "nothing was saved since the stopped state it resumed from: continue with the same command "
                          "and --resume"),
])
def test_a_stop_at_once_says_what_each_command_leaves(command, leaves, tmp_path, capsys, monkeypatch):
    # Every command but pretrain said "nothing was saved since the last save", which a command that
    # keeps its finished units, parts or runs does not mean. The command's work is two Ctrl-Cs here:
    # what is said comes from the command's own set-up and the CLI.
    import importlib
    import signal

    from flava import stopping

    monkeypatch.setattr(stopping, "REPEAT_WINDOW_S", 0.0)

    def two_sigints(*args):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    name, *flags = command.split()
    # finetune says what it leaves as it starts (it depends on --resume): its work is what is replaced.
    monkeypatch.setattr(importlib.import_module(f"flava.cli.{name}"), "_finetune" if name == "finetune" else "run",
                        two_sigints)
    out = str(tmp_path / "out")
    argv = {"prepare": ["--images", "x", "--output", out], "embed": ["--model", "m", "--texts", "x", "--output", out],
            "ablate": ["--output", out], "finetune": ["--task", "image-classification", "--model", "m", "--train", "x",
                                                      "--output", out]}[name]
    assert cli([name, *argv, *flags]) == 130
    err = " ".join(capsys.readouterr().err.split())
    assert err == f"flava {name}: stopped at once by a second SIGINT 0 s after the first; {leaves}", err


@pytest.mark.slow
def test_a_stop_at_once_of_train_codebook_names_its_last_save(train_data, tmp_path, capsys, monkeypatch):
    import signal

    from flava import stopping
    from flava.train import codebook

    monkeypatch.setattr(stopping, "REPEAT_WINDOW_S", 0.0)
    out = tmp_path / "cb"
    args = ["train-codebook", "--images", str(train_data / "img"), "--output", str(out), "--batch-size", "4",
            "--num-workers", "0", "--set", "codebook.hidden_size=8", "--set", "codebook.vocab_size=64",
            "--steps", "4", "--save-every", "2"]
    train_step = codebook.CodebookRun.train_step

    def two_sigints_at(step):
        def patched(run):
            if run.step == step:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
            return train_step(run)
        return patched

    monkeypatch.setattr(codebook.CodebookRun, "train_step", two_sigints_at(1))
    assert cli(args) == 130
    err = " ".join(capsys.readouterr().err.split())
    assert err.endswith("nothing was saved: run the same command again to start the training"), err
    assert not (out / "training").exists()
    monkeypatch.setattr(codebook.CodebookRun, "train_step", two_sigints_at(3))  # after the save at step 2
    assert cli(args) == 130
    err = " ".join(capsys.readouterr().err.split())
    assert err.endswith(f"saved step 2 in {out / 'training'}: continue with the same command and --resume"), err
    assert cli(args + ["--resume"]) == 130  # it resumes at step 2 and is stopped at step 3 again
    err = " ".join(capsys.readouterr().err.split())
    assert err.endswith("nothing was saved since the state it resumed from: continue with the same command and "
                        "--resume"), err
    monkeypatch.setattr(codebook.CodebookRun, "train_step", train_step)
    assert cli(args + ["--resume"]) == 0
    # The demo codebook a pretraining run trains first is continued by the same command, not --resume.
    import functools

    import flava.train.run as train_run

    monkeypatch.setattr(train_run, "DEMO_CODEBOOK_STEPS", 4)
    monkeypatch.setattr(train_run, "CodebookTraining",
                        functools.partial(train_run.CodebookTraining, batch_size=4, eval_images=4, save_every=2))
    monkeypatch.setattr(codebook.CodebookRun, "train_step", two_sigints_at(3))
    run = tmp_path / "run"
    assert cli(["pretrain", "--output", str(run), "--max-steps", "1"]) == 130
    err = " ".join(capsys.readouterr().err.split())
    assert err.endswith(f"saved step 2 in {run / 'codebook' / 'training'}: run the same command again to "
                        "continue"), err


@pytest.mark.slow
def test_weighted_sources_changed_on_resume_are_recorded_and_shown(tmp_path, capsys):
    # {"path": ..., "weight": w} sources could not be written as JSON: a resume with --override that
    # changed them ended in a traceback after saving the new settings unrecorded (a plain resume then
    # trained on them unsaid), and `config show` failed on any of them.
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text("".join(f"{name} sentence number {i}\n" for i in range(40)))
    run = tmp_path / "run"

    def weighted(a: int) -> str:
        return f'data.text=[{{"path":"{tmp_path / "a.txt"}","weight":{a}}},{{"path":"{tmp_path / "b.txt"}","weight":1}}]'

    assert cli(["pretrain", "--output", str(run), "--max-steps", "1", "--set", "stage=text-mlm", "--set",
                "data.batch_size=4", "--set", "tensorboard=false", "--set", weighted(1)]) == 0
    assert cli(["pretrain", "--output", str(run), "--resume", "--override", "--max-steps", "2", "--set",
                weighted(9)]) == 0
    history = [json.loads(x) for x in (run / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["changes"]["data.text"] == [
        [{"path": str(tmp_path / "a.txt"), "weight": w}, {"path": str(tmp_path / "b.txt"), "weight": 1.0}]
        for w in (1.0, 9.0)]
    capsys.readouterr()
    assert cli(["config", "show", "--set", weighted(3)]) == 0
    assert f'data.text = [{{"path": "{tmp_path / "a.txt"}", "weight": 3.0}}' in capsys.readouterr().out


@pytest.mark.slow
def test_resume_keeps_the_runs_settings(train_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(pretrain_args(train_data, run, batch_size=4) + ["--max-steps", "2", "--set", "save_every=1"]) == 0
    # No flags but the output: the run's own data, batch and codebook, not the demo defaults.
    assert cli(["pretrain", "--output", str(run), "--resume", "--max-steps", "3"]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["samples"] == 4
    capsys.readouterr()
    # A preset's settings on resume: refused at once, not after a demo codebook for the preset's data.
    code = cli(["pretrain", "--output", str(run), "--resume", "--config", "tiny", "--max-steps", "4"])
    err = " ".join(one_line_error(capsys, code).split())
    assert "codebook: " in err and not (run / "codebook").exists()
    assert "--config gives every setting, its preset's defaults too" in err and "drop --config" in err
    code = cli(["pretrain", "--output", str(run), "--resume", "--max-steps", "4", "--set", "data.batch_size=8"])
    err = one_line_error(capsys, code)
    assert "data.batch_size: 4 -> 8" in err and "--override" in err
    assert cli(["pretrain", "--output", str(run), "--resume", "--max-steps", "4", "--set", "data.batch_size=8",
                "--override"]) == 0
    history = [json.loads(x) for x in (run / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["override"] and history[-1]["changes"]["data.batch_size"] == [4, 8]
    assert json.loads((run / "train_config.json").read_text())["data"]["batch_size"] == 8
    # What no resume can change is refused even with --override, and the history records only what was made:
    # another codebook was recorded and never used (the checkpoints hold the run's), and other weight shapes
    # were blamed on the checkpoint ("the model weights do not match the config").
    recorded = (run / "config_history.jsonl").read_text()
    capsys.readouterr()
    for change, said in ((f"codebook={tmp_path}", "cannot change codebook: "),
                         ("model.codebook.hidden_size=64", "cannot change model.codebook.hidden_size: "),
                         ("model.text.num_layers=3", "cannot change model.text.num_layers: 2 -> 3: its checkpoints "
                                                     "hold weights of other shapes"),
                         ("objectives.contrastive=sigmoid", "cannot change objectives.contrastive: 'softmax' -> "
                                                            "'sigmoid': its checkpoints hold weights of other shapes")):
        for override in (["--override"], []):  # without it, not first sent to pass --override
            err = " ".join(one_line_error(capsys, cli(["pretrain", "--output", str(run), "--resume", "--max-steps",
                                                        "5", *override, "--set", change])).split())
            assert said in err and "start a new run" in err, err
            assert (run / "config_history.jsonl").read_text() == recorded
            assert f"--set init={run} --set codebook=" in err or "codebook" not in change
    # A finished run makes no change: none is recorded (it was, with train_config.json left as it was).
    capsys.readouterr()
    assert cli(["pretrain", "--output", str(run), "--resume", "--override", "--set", "optim.lr=1e-4"]) == 0
    assert "already finished at step 4" in capsys.readouterr().out
    assert (run / "config_history.jsonl").read_text() == recorded
    # A checkpoint's config edited after it was written is named, not read as the model's.
    config = RunDir(run).latest() / "config.json"
    config.write_text(config.read_text().replace('"num_layers": 2', '"num_layers": 3', 1))
    capsys.readouterr()
    err = one_line_error(capsys, cli(["info", str(run)]))
    assert "config.json is not the file that was written" in err and "delete checksums.json" in err


@pytest.mark.slow
def test_a_run_started_from_checkpoints_resumes_with_other_objectives_and_says_nothing_of_its_sources(
        train_data, tmp_path, capsys):
    first = tmp_path / "first"
    assert cli(pretrain_args(train_data, first) + narrow_args() + ["--max-steps", "1"]) == 0
    for key in ("init", "init_text"):
        run = tmp_path / key
        args = pretrain_args(train_data, run) + narrow_args()
        if key == "init":  # it brings the model: no model.* settings beside it
            args = [a for i, a in enumerate(args) if not (a.startswith("model.") or args[i + 1:i + 2] and
                                                          args[i + 1].startswith("model."))]
        assert cli(args + ["--max-steps", "1", "--set", f"{key}={first}"]) == 0
        capsys.readouterr()
        assert cli(["pretrain", "--output", str(run), "--resume", "--max-steps", "2", "--override", "--set",
                    "objectives.balancing=dwa"]) == 0
        out = " ".join(capsys.readouterr().out.split())
        # A resume reads none of its sources again, and said it did whenever it recorded no change.
        assert "resumed from step 1" in out and f"init_text={first}" not in out, out
        assert cli(["pretrain", "--output", str(run), "--resume", "--max-steps", "3"]) == 0
        out = " ".join(capsys.readouterr().out.split())
        assert "resumed from step 2" in out and f"init_text={first}" not in out, out
    err = " ".join(one_line_error(capsys, cli(["pretrain", "--output", str(tmp_path / "init"), "--resume", "--override",
                                               "--max-steps", "4", "--set", "model.projection_dim=16"])).split())
    assert f"a run started from init={first} takes its model from it" in err


@pytest.mark.slow
def test_finished_runs_and_impossible_settings(train_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(pretrain_args(train_data, run) + ["--max-steps", "1"]) == 0
    summary = (run / "summary.json").read_text()
    capsys.readouterr()
    assert cli(["pretrain", "--output", str(run), "--resume"]) == 0
    assert "already finished at step 1" in capsys.readouterr().out
    assert (run / "summary.json").read_text() == summary
    for bad, name in (("keep_last=-1", "keep_last"), ("keep_last=0", "keep_last"), ("data.batch_size=0", "batch_size"),
                      ("save_every=0", "save_every"), ("log_every=0", "log_every"),
                      ("optim.grad_accumulation=0", "grad_accumulation"), ("data.mixing=[0.5,0.5]", "mixing"),
                      ("data.num_workers=-1", "num_workers"), ("optim.lr=-1", "optim.lr"),
                      ("optim.lr=NaN", "optim.lr"), ("data.outage_minutes=inf", "outage_minutes"),
                      ("keep_every=-1", "keep_every")):
        code = cli(pretrain_args(train_data, tmp_path / name) + ["--set", bad])
        assert name in one_line_error(capsys, code), bad
    code = cli(pretrain_args(train_data, tmp_path / "neg") + ["--max-steps", "-5"])
    assert "max_steps" in one_line_error(capsys, code)


@pytest.mark.slow
def test_a_zero_weight_leaves_its_kind_out(train_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(pretrain_args(train_data, run) + ["--max-steps", "6", "--set", "objectives.mim_weight=0"]) == 0
    assert "every objective on images has weight 0" in capsys.readouterr().out
    kinds = {json.loads(x)["kind"] for x in (run / "metrics.jsonl").read_text().splitlines()}
    assert "images" not in kinds


@pytest.mark.slow
def test_divergence_stops_the_run_and_no_checkpoint_holds_non_finite_weights(train_data, tmp_path, capsys):
    run = tmp_path / "run"
    code = cli(pretrain_args(train_data, run) + ["--max-steps", "20", "--set", "optim.lr=1e30",
                                                  "--set", "optim.warmup_steps=0", "--set", "save_every=1",
                                                  "--set", "max_nonfinite_steps=2", "--set", "optim.grad_clip=0"])
    err = one_line_error(capsys, code)
    assert "not finite" in err and "2 in a row" in err
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["update_skipped"] and rows[-1]["nonfinite_steps"] >= 2
    for ckpt in RunDir(run).step_dirs():
        weights = flava.loading.read_checkpoint(ckpt).parts["model"]
        assert all(torch.isfinite(v).all() for v in weights.values())


@pytest.mark.slow
def test_non_finite_weights_are_never_saved(train_data, tmp_path):
    from test_pretrain_processes import train_config

    from flava.train.trainer import Trainer

    t = Trainer(train_config(train_data, "pairs_clean.csv"), tmp_path / "run")
    t.step = 1
    t.save()
    with torch.no_grad():
        t.model.model.logit_scale.fill_(float("nan"))
    t.step = 2
    with pytest.raises(CheckpointError, match="logit_scale is not finite.*step_00000001 is intact"):
        t.save()
    assert [p.name for p in RunDir(tmp_path / "run").step_dirs()] == ["step_00000001"]


@pytest.mark.slow
def test_a_full_disk_inside_torch_or_safetensors_is_one_line(train_data, tmp_path, capsys, monkeypatch):
    import flava.train.checkpoint as ckpt

    calls = []

    def full(*a, **k):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\nmore lines")
        return torch_save(*a, **k)

    torch_save = torch.save
    monkeypatch.setattr(ckpt.torch, "save", full)
    code = cli(pretrain_args(train_data, tmp_path / "run") + ["--max-steps", "4", "--set", "save_every=2"])
    err = one_line_error(capsys, code)
    assert "unexpected pos" in err and "step_00000002 is intact" in err


@pytest.mark.slow  # end to end: commands run one after another
def test_a_run_folder_is_read_from_its_newest_intact_checkpoint_whatever_befell_latest_json(tmp_path, capsys):
    # `flava info`, `flava.load` and `embed` had read a run through latest.json alone: one missing (a
    # second Ctrl-C as the first save began) was "a run with no checkpoint yet"; a damaged newest
    # checkpoint, or a pointer to a missing one, failed without naming the intact step_N --resume takes.
    from flava.io.checkpoint import write_checksums

    run = RunDir(tmp_path / "run")
    for step in (10, 20):
        torch.manual_seed(step)
        flava.FlavaModel(preset("tiny")).save_pretrained(run.step(step))
        (run.step(step) / "trainer_state.pt").write_bytes(b"state")
        write_checksums(run.step(step))

    def loaded(where=run.root):
        return RunDir.step_of(resolve(where))

    capsys.readouterr()
    assert cli(["info", str(run.root)]) == 0
    err = capsys.readouterr().err
    assert "latest.json is missing" in err and "using step_00000020" in err and len(err.splitlines()) == 1, err
    assert loaded() == 20
    # A damaged training state leaves the weights usable; damaged weights are passed over, and said.
    (run.step(20) / "trainer_state.pt").write_bytes(b"cut")
    run.point_latest(20, run.step(20))
    assert loaded() == 20 and capsys.readouterr().err == ""
    # A file unlike its checksum that reads whole may have been changed on purpose: refused, naming both ways.
    config = run.step(20) / "config.json"
    written = config.read_text()
    config.write_text(written.replace('"num_layers": 2', '"num_layers": 3', 1))
    err = one_line_error(capsys, cli(["info", str(run.root)]))
    assert "config.json is not the file that was written" in err and "delete checksums.json" in err, err
    assert f"{run.step(10)} is intact: name it to use it" in err
    config.write_text(written)
    weights_file = run.step(20) / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:1000])
    from safetensors.torch import load_file

    want = load_file(run.step(10) / "model.safetensors")["model.text_projection.weight"]
    assert torch.equal(flava.load(run.root).text_projection.weight, want)
    err = capsys.readouterr().err
    assert "step_00000020 is damaged (model.safetensors is not the file that was written" in err, err
    assert "using step_00000010, its newest intact checkpoint" in err and len(err.splitlines()) == 1
    # latest.json naming a checkpoint that is gone; the run's checkpoints/ folder named instead of the run.
    shutil.rmtree(run.step(20))
    run.point_latest(30, run.step(30))
    assert loaded(run.checkpoints) == 10
    err = capsys.readouterr().err
    assert "latest.json points to step_00000030, which is not a checkpoint; using step_00000010" in err, err
    # No intact checkpoint at all: one line naming what is wrong with each; none at all: none yet.
    (run.step(10) / "config.json").write_text('{"format": ')
    code = cli(["info", str(run.root)])
    err = one_line_error(capsys, code)
    assert "holds no usable checkpoint" in err and "step_00000010 is damaged (config.json" in err
    shutil.rmtree(run.step(10))
    run.pointer.unlink()
    with pytest.raises(CheckpointError, match="is a run with no checkpoint yet"):
        flava.load(run.root)


@pytest.mark.slow
def test_resume_survives_damage(train_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(pretrain_args(train_data, run) + narrow_args() + ["--max-steps", "4", "--set", "save_every=1",
                                                                  "--set", "keep_last=4"]) == 0
    reference = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    layout = RunDir(run)

    def resume_to(step: int) -> list[dict]:
        assert cli(["pretrain", "--output", str(run), "--resume", "--max-steps", str(step)]) == 0, capsys.readouterr()
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]

    # A partial trailing metrics line, a truncated newest trainer state, a leftover staging directory.
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    state = layout.step(4) / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    (layout.checkpoints / ".step_00000005.abc.tmp").mkdir()
    rows = resume_to(5)
    out = " ".join(capsys.readouterr().out.split())
    assert "step_00000004 is damaged" in out and "resumed from step 3" in out
    assert not (layout.checkpoints / ".step_00000005.abc.tmp").exists()
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[3]["loss"] == pytest.approx(reference[3]["loss"], abs=1e-6)

    # A missing streams.json and a damaged latest.json.
    (layout.step(5) / "streams.json").unlink()
    layout.pointer.write_text("{not json")
    rows = resume_to(6)
    out = " ".join(capsys.readouterr().out.split())  # lines wrap at 110 columns wherever the path ends
    assert "latest.json is damaged" in out and "step_00000005 is damaged" in out
    assert "name a checkpoints/step_N directory" not in out  # a model's advice, nothing --resume can do
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow  # two runs
def test_a_damaged_checkpoint_a_resume_passed_over_never_takes_an_intact_ones_place(train_data, tmp_path, capsys):
    # Resumed from step 4 past a damaged step 5, the next save had kept the damaged one among the
    # newest two and removed step 4, the only intact one before it.
    run, layout = tmp_path / "run", RunDir(tmp_path / "run")
    assert cli(pretrain_args(train_data, run) + narrow_args() + ["--max-steps", "5", "--set", "save_every=2",
                                                                  "--set", "keep_last=2"]) == 0
    assert [p.name for p in layout.step_dirs()] == ["step_00000004", "step_00000005"]
    weights = layout.step(5) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert cli(["pretrain", "--output", str(run), "--resume", "--max-steps", "6"]) == 0
    assert "resumed from step 4" in " ".join(capsys.readouterr().out.split())
    assert [p.name for p in layout.step_dirs()] == ["step_00000004", "step_00000006"]


def test_absurd_model_sizes_are_refused_before_allocating(tmp_path):
    cfg = to_dict(preset("tiny"))
    cfg["text"]["num_layers"] = 10_000_000
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"format": "flava", "model": cfg}))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="GiB for its float32 weights"):
        flava.load(tmp_path / "m")
    big = preset("tiny")
    big.image.hidden_size = 10**9
    big.image.num_heads = 1
    with pytest.raises(ConfigError, match="more than this machine"):
        flava.FlavaModel(big)


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        flava.FlavaModel(preset("tiny")).save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "m" / "model.safetensors").stat().st_mode) == 0o644


def test_presets_and_the_settings_are_discoverable(capsys):
    from flava.cli.pretrain import settings

    args = argparse.Namespace(output="x", resume=False, override=False, config="small", set=None, max_steps=None,
                              save_every=None)
    assert settings(args).model.image.hidden_size == 384
    assert cli(["config", "show", "--config", "small"]) == 0
    out = capsys.readouterr().out
    for key in ("optim.lr", "model.image.hidden_size", "objectives.contrastive", "max_nonfinite_steps"):
        assert key in out, key
    assert "Peak learning rate" in out and "384" in out

    # A settings file over a preset it names; a mistyped preset is said to be neither.
    from flava.train.presets import train_config

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "mine.json"
        f.write_text('{"preset": "tiny", "data": {"batch_size": 4}, "max_steps": 7}')
        cfg = train_config(str(f))
        assert cfg.model.image.hidden_size == train_config("tiny").model.image.hidden_size and cfg.max_steps == 7
        assert cfg.data.batch_size == 4 and cfg.optim.lr == train_config("tiny").optim.lr
        f.write_text('{"data": {"batch_size": 4}}')  # without one, the paper's defaults: the base model
        assert train_config(str(f)).model.image.hidden_size == 768
    assert cli(["config", "show", "--config", "smal"]) == 2
    assert "--config smal is neither a preset (tiny, small, base) nor a settings file; did you mean 'small'?" in \
        " ".join(capsys.readouterr().err.split())


def test_an_output_that_cannot_be_written_is_refused_in_one_line_before_any_work(train_data, tmp_path, capsys):
    # A file where the output folder (or a folder on its path) should be: refused before the model
    # is even read (the model path here does not exist), so no work is done and lost.
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine\n")
    nowhere = str(tmp_path / "no-model")
    for args in (["pretrain", "--output", str(blocker), "--config", "tiny"],
                 ["pretrain", "--output", str(blocker / "run"), "--config", "tiny"],
                 ["evaluate", "--model", nowhere, "--suite", "demo", "--output", str(blocker)],
                 ["finetune", "--model", nowhere, "--task", "text-classification", "--train", nowhere,
                  "--output", str(blocker / "task")],
                 ["classify", "--model", nowhere, "--images", str(train_data / "img"), "--classes", "a,b",
                  "--output", str(blocker / "p.csv")],
                 ["predict", "--model", nowhere, "--input", str(train_data / "text.txt"),
                  "--output", str(blocker / "p.csv")]):
        err = one_line_error(capsys, cli(args))
        assert str(blocker) in err and ("in the way" in err or "is a file" in err), (args, err)
    assert blocker.read_text() == "mine\n"


@pytest.mark.slow
def test_a_run_that_failed_before_its_first_checkpoint_starts_again(train_data, tmp_path, capsys, monkeypatch):
    from flava.train.trainer import Trainer

    (tmp_path / "blank.txt").write_text("\n   \n\n")
    run = tmp_path / "run"
    text_only = ["--max-steps", "2", "--set", "data.mixing=[0,0,1]", "--set", "stage=text-mlm"]
    # Data with nothing usable: refused before the run starts (its probe), nothing left behind.
    err = one_line_error(capsys, cli(pretrain_args(train_data, run) + text_only
                                      + ["--set", f'data.text=["{tmp_path / "blank.txt"}"]']))
    assert "blank.txt: no shard holds a usable record" in err and not run.exists()
    # A run that fails at its first step (a shard gone since the start) has written its settings.
    step = Trainer.train_step

    def fails(self, *args, **kwargs):
        raise DataError("shards/00003.tar went missing")
    monkeypatch.setattr(Trainer, "train_step", fails)
    err = one_line_error(capsys, cli(pretrain_args(train_data, run) + text_only))
    assert "went missing" in err and (run / "train_config.json").is_file()
    # --resume says so too (it started again without a word), and fails as the run did.
    code = cli(["pretrain", "--output", str(run), "--resume"])
    said = capsys.readouterr()
    assert code == 2 and "went missing" in said.err
    assert "holds a run that saved no checkpoint; starting it again" in " ".join(said.out.split())
    monkeypatch.setattr(Trainer, "train_step", step)
    # The corrected command: nothing to resume, so it starts the run again (no --resume, no refusal).
    assert cli(pretrain_args(train_data, run) + text_only) == 0
    assert "holds a run that saved no checkpoint; starting it again" in " ".join(capsys.readouterr().out.split())
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_shards_none_of_which_opens_are_refused_with_the_first_ones_reason(train_data, tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(2):
        (shards / f"{k:05d}.tar").write_bytes(b"<html>an error page saved as a shard</html>" * 20)
    err = one_line_error(capsys, cli(pretrain_args(train_data, tmp_path / "run") + [
        "--set", f'data.pairs=["{shards}"]', "--set", "data.mixing=[1,0,0]", "--max-steps", "1"]))
    assert re.search(r"no shard holds a usable record \(met: 2 not a tar archive \(or damaged at its start\); e\.g\. "
                     r"\S*/shards/0000[01]\.tar\)$", err.strip()), err


def test_model_settings_beside_init_are_refused_not_ignored(train_data, tmp_path, capsys):
    code = cli(pretrain_args(train_data, tmp_path / "run") + ["--set", f"init={tmp_path / 'ckpt'}",
                                                              "--set", "model.image.hidden_size=256"])
    err = one_line_error(capsys, code)
    assert "model.image.hidden_size would be ignored" in err and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_resumed_runs_summary_is_the_whole_runs(train_data, tmp_path, capsys):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    steps = ["--set", "seed=5", "--set", "save_every=2", *narrow_args()]
    assert cli(pretrain_args(train_data, whole) + steps + ["--max-steps", "5"]) == 0
    assert cli(pretrain_args(train_data, cut) + steps + ["--max-steps", "2"]) == 0
    assert cli(pretrain_args(train_data, cut) + steps + ["--max-steps", "5", "--resume"]) == 0
    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, cut))
    assert a["first"] == pytest.approx(b["first"], abs=1e-6) and a["last"] == pytest.approx(b["last"], abs=1e-6)
    assert set(a["first"]) == set(a["last"])


def test_init_says_where_the_checkpoints_model_differs_from_the_configs(tmp_path):
    from flava.train.config import TrainConfig
    from flava.train.pretraining import PretrainingStage

    def stage(model):
        s = PretrainingStage(TrainConfig(model=model, init=str(tmp_path)))
        s.build()
        return s

    cfg = preset("tiny")
    cfg.image.image_size = 96
    flava.FlavaModel(cfg).save_pretrained(tmp_path)
    assert stage(preset("tiny")).initialised["model"] == (f"the whole model from init={tmp_path}; its settings, not "
                                                          "the config's: image.image_size 96 (the config's 64)")
    same = stage(cfg)
    assert same.initialised["model"] == f"the whole model from init={tmp_path}"
    assert same.model.model.config.image.image_size == 96


def test_a_run_named_with_relative_paths_resumes_from_any_folder(train_data, tmp_path, monkeypatch, capsys):
    import shutil

    shutil.copytree(train_data, tmp_path / "d")
    monkeypatch.chdir(tmp_path)
    args = [a.replace(str(train_data), "d") for a in pretrain_args(train_data, tmp_path / "run") + narrow_args()]
    args[args.index('data.images=["d/img"]')] = 'data.images=["d/img/a/*.png"]'  # a glob too
    assert "codebook=d/codebook" in args and 'data.pairs=["d/pairs.csv"]' in args
    assert cli(args + ["--max-steps", "2"]) == 0
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["codebook"] == str(tmp_path / "d" / "codebook")
    assert saved["data"]["pairs"] == [str(tmp_path / "d" / "pairs.csv")]
    assert saved["data"]["images"] == [str(tmp_path / "d" / "img" / "a" / "*.png")]
    # A run saved by a release that kept the paths as given: the same command again changes nothing.
    (tmp_path / "run" / "train_config.json").write_text(json.dumps(
        {**saved, "codebook": "d/codebook", "data": {**saved["data"], "text": ["d/text.txt"]}}))
    assert cli(args + ["--max-steps", "3", "--resume"]) == 0
    history = (tmp_path / "run" / "config_history.jsonl").read_text()
    assert "max_steps" in history and "codebook" not in history and "data" not in history  # no change recorded
    monkeypatch.chdir(tmp_path.parent)  # elsewhere, the run's own settings still find the codebook
    assert cli(["pretrain", "--output", str(tmp_path / "run"), "--resume", "--max-steps", "4"]) == 0
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_codebook_trained_at_another_scale_than_the_models_grid_is_said(train_data):
    from conftest import tiny_run
    from flava.train.pretraining import PretrainingStage

    cfg = tiny_run(train_data)
    size = cfg.model.codebook_image_size  # the training codebook's own
    stage = PretrainingStage(cfg)
    stage.build()
    assert "codebook" not in stage.initialised
    cfg = tiny_run(train_data)
    cfg.model.image.image_size = cfg.model.image.image_size * 3 // 2
    stage = PretrainingStage(cfg)
    stage.build()
    grid = cfg.model.image.grid_size
    assert f"was trained on {size}-px images ({size // 8}x{size // 8} tokens), but this model's {grid}x{grid} patch " \
           f"grid gives it {grid * 8}-px ones" in stage.initialised["codebook"]


def test_a_resumed_run_reads_only_its_own_directory(train_data, tmp_path, capsys):
    # A run started from other checkpoints (a whole model, single encoders, a codebook) resumes
    # from its own checkpoints alone: the sources of a weeks-long run may be gone by its resume.
    import shutil

    shutil.copytree(train_data / "codebook", tmp_path / "cb")
    source = tmp_path / "source"
    given = pretrain_args(train_data, source) + narrow_args()  # the runs below take their model from it
    # The codebook's own settings differ from the config's: its checkpoints say the codebook's.
    i = given.index("model.codebook.hidden_size=8")
    capsys.readouterr()
    assert cli(given[:i - 1] + given[i + 1:] + ["--max-steps", "1"]) == 0
    assert json.loads((RunDir(source).latest() / "config.json").read_text())["model"]["codebook"]["hidden_size"] == 8
    said = " ".join(capsys.readouterr().out.split())  # the config's own, unused, said so
    assert f"note: codebook={train_data / 'codebook'} keeps its own settings (hidden_size 8): model.codebook's " \
           "(hidden_size " in said and "do not apply to it" in said

    def args(run, init=source, text=source):  # the model's settings come from init
        given = pretrain_args(train_data, run)
        pairs = [given[i:i + 2] for i in range(3, len(given), 2)]
        return given[:3] + [x for flag, value in pairs if not value.startswith("model.")
                            for x in (flag, value.replace(str(train_data / "codebook"), str(tmp_path / "cb")))] + \
            ["--set", f"init={init}", "--set", f"init_text={text}", "--set", "optim.init_lr_scale=0.5"]

    inside = RunDir(source).latest()  # a file in a checkpoint names it too
    assert cli(args(tmp_path / "whole", inside / "model.safetensors", inside / "config.json") + ["--max-steps", "3"]) == 0
    assert cli(args(tmp_path / "run") + ["--max-steps", "2"]) == 0
    shutil.move(source, tmp_path / "gone")
    shutil.move(tmp_path / "cb", tmp_path / "cb-gone")
    assert cli(["pretrain", "--output", str(tmp_path / "run"), "--resume", "--max-steps", "3"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    whole = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["loss"] == pytest.approx(whole[-1]["loss"], abs=1e-6)
    assert rows[-1]["lr"] == whole[-1]["lr"]


def test_a_new_run_into_a_folder_of_other_files_is_refused(train_data, tmp_path, capsys):
    # An image folder given as --output: the run's loss plot would have become a training image.
    shutil.copytree(train_data / "img" / "a", tmp_path / "photos")
    before = sorted(p.name for p in (tmp_path / "photos").iterdir())
    err = one_line_error(capsys, cli(pretrain_args(train_data, tmp_path / "photos") + ["--max-steps", "1"]))
    assert "already holds other files (e.g. 0.png); choose a new or empty --output" in err
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == before


@pytest.mark.slow
def test_a_stop_while_a_later_micro_batch_is_awaited_undoes_the_step_and_resumes_exactly(train_data, tmp_path,
                                                                                        monkeypatch, one_thread):
    # With gradient accumulation a stalled read may come at any micro-batch: the stop gives the wait
    # up, and the step's earlier micro-batches (their draws, random numbers and gradients) are undone.
    import signal
    import time

    from conftest import tiny_run

    from flava import stopping
    from flava.data import pipeline
    from flava.train.trainer import Trainer

    def cfg():
        c = tiny_run(train_data, max_steps=4, save_every=100, log_every=1, tensorboard=False)
        c.data.mixing, c.optim.grad_accumulation = [1.0, 0.0, 0.0], 2
        c.model.text.dropout = 0.1  # random numbers the undone micro-batch drew
        return c

    reference = [r["loss"] for r in Trainer(cfg(), tmp_path / "ref").fit()]
    draw, stalled = [0], []
    real_draw, real_sample = pipeline.KindStream.next_batch, pipeline._Draws._sample

    def counted(self):
        draw[0] = self.draws
        return real_draw(self)

    def stalls_at_step_3s_second_micro_batch(self, *args):
        if draw[0] == 5 and not stalled:
            stalled.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)
        return real_sample(self, *args)

    monkeypatch.setattr(pipeline.KindStream, "next_batch", counted)
    monkeypatch.setattr(pipeline._Draws, "_sample", stalls_at_step_3s_second_micro_batch)
    cut = Trainer(cfg(), tmp_path / "run")
    with stopping.handling():
        cut.fit()
    assert cut.stopped == signal.SIGTERM and cut.step == 2 and time.monotonic() - stalled[0] < 20
    monkeypatch.undo()
    again = Trainer(cfg(), tmp_path / "run")
    assert again.resume() and again.step == 2
    assert [r["loss"] for r in again.fit()] == pytest.approx(reference[2:], abs=1e-6)


def test_data_that_fails_mid_run_ends_it_with_the_steps_done_saved_and_resumable(train_data, tmp_path,
                                                                                 one_thread):
    # A store gone down mid-run (here: its shards turned to junk) ended the run with the steps
    # since the last checkpoint lost; they are saved, and the resume continues as if never cut.
    from conftest import narrow, tiny_run

    from flava.train.trainer import Trainer

    # Two sources of pairs, drawn by weight: a failed draw must not move the choice between them.
    rng = np.random.default_rng(0)
    for k in range(4):
        (tmp_path / f"source-{k % 2}").mkdir(exist_ok=True)
        write_tar(tmp_path / f"source-{k % 2}" / f"{k:05d}.tar", [(f"{k}{i:03d}.{ext}", data) for i in range(8)
                                                                  for ext, data in (
            ("png", png(tuple(int(c) for c in rng.integers(0, 255, 3)))), ("txt", f"colour {k} {i}".encode()))])
    whole = {f: f.read_bytes() for f in tmp_path.glob("source-*/*.tar")}

    def cfg():
        c = narrow(tiny_run(train_data, max_steps=6, save_every=100, log_every=1, tensorboard=False))
        c.data.pairs = [{"path": str(tmp_path / f"source-{k}"), "weight": 0.5} for k in range(2)]
        c.data.mixing = [1.0, 0.0, 0.0]
        return c

    reference = [r["loss"] for r in Trainer(cfg(), tmp_path / "ref").fit()]
    cut = Trainer(cfg(), tmp_path / "run")

    def junk_after_step_3(row):
        if row["step"] == 3:
            for f in whole:
                f.write_bytes(b"<html>503 Service Unavailable</html>" * 40)

    cut.log = junk_after_step_3
    with pytest.raises(DataError, match=r"; step 3 is saved in \S*step_00000003: once the data is readable, "
                                        r"continue with --resume$"):
        cut.fit()
    for f, data in whole.items():
        f.write_bytes(data)
    again = Trainer(cfg(), tmp_path / "run")
    assert again.resume() and again.step == 3
    assert [r["loss"] for r in again.fit()] == pytest.approx(reference[3:], abs=1e-6)


def test_a_model_that_cannot_be_built_is_refused_before_the_demo_codebook_is_trained(tmp_path, capsys, monkeypatch):
    # With no data and no codebook named, a run trains the demo images' codebook first (minutes on a
    # CPU): a model setting its encoders cannot take had been refused only after it.
    import flava.train.run as run_module

    monkeypatch.setattr(run_module, "run_train_codebook", lambda *a, **k: pytest.fail("the codebook was trained"))
    for setting, said in (("model.image.num_heads=3", "image.hidden_size (128) must be divisible by image.num_heads "
                                                      "(3)"),
                          ("model.image.patch_size=128", "image.patch_size (128) must be at most image.image_size")):
        code = cli(["pretrain", "--output", str(tmp_path / "run"), "--max-steps", "1", "--set", setting])
        assert said in " ".join(one_line_error(capsys, code).split())
        assert not (tmp_path / "run" / "codebook").exists()
