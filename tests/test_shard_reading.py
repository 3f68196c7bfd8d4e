"""What a user plants in shards, tables and folders comes back as planted: every sample paired
with its own caption, every shard read once, what cannot be read counted or refused in one line."""

import io
import json
import tarfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from PIL import Image

import flava
from flava.cli import main as cli
from flava.retrieval.embed import read_embeddings


def png(value: int, size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def tar_of(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_tables_captions_that_are_not_text_are_counted_not_trained_on_as_python_text(tmp_path):
    from flava.data.sources import csv_pairs

    (tmp_path / "a.png").write_bytes(png(10))
    rows = [{"image": "a.png", "caption": "a real caption"}, {"image": "a.png", "caption": ["first", "second"]},
            {"image": "a.png", "caption": {"en": "x"}}, {"image": "a.png", "caption": True},
            {"image": "a.png", "caption": 5}, {"image": "a.png", "caption": None}, {"image": "a.png"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = csv_pairs(str(tmp_path / "p.jsonl"))
    # Empty ones stay records: the sample makers count them as empty captions, as for a CSV's empty cell;
    # a row without the key has no caption at all, and is counted so.
    assert [r.caption for r in src.records] == ["a real caption", ""]
    assert src.rejected == {"caption is not text": 4, "table row without a caption": 1}


@pytest.mark.slow  # an embed run end to end
def test_embed_counts_a_text_tables_null_and_non_text_rows_without_a_traceback(tiny_model, tmp_path, capsys):
    rows = [{"caption": "a red square"}, {"caption": None}, {"caption": 5}, {"caption": ["a", "b"]}, {},
            {"caption": "a blue square"}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli(["embed", "--model", str(tiny_model), "--texts", str(tmp_path / "t.jsonl"),
                "--output", str(tmp_path / "e")]) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    emb = read_embeddings(tmp_path / "e")
    assert [m["caption"] for m in emb.metadata] == ["a red square", "a blue square"]
    report = json.loads((tmp_path / "e" / "embed.json").read_text())
    assert report["failed"] == {"empty text": 2, "caption is not text": 2}
    assert [f["row"] for f in report["failures"]] == [1, 2, 3, 4]


def captions_by_image(source) -> dict[int, str]:
    """{the image's pixel value: its caption} of every record (the test images are flat colours)."""
    from flava.data.decode import decode_rgb
    from flava.data.sources import read_caption

    return {int(decode_rgb(r.image)[0, 0, 0]): read_caption(r.caption) for r in source.records}


def test_a_repeated_key_starts_another_sample_and_never_replaces_the_image_a_caption_was_written_for(tmp_path):
    from flava.data.registry import open_source

    pairs = [(f"0000{i}.png", png(10 * i + 10)) for i in range(4)] + \
        [(f"0000{i}.txt", f"caption {i}".encode()) for i in range(4)]
    # A stray second image under key 00001, with no caption of its own: counted, not paired.
    tar_of(tmp_path / "dup.tar", pairs + [("00001.png", png(200))])
    src = open_source("pairs", str(tmp_path / "dup.tar"))
    assert captions_by_image(src) == {10: "caption 0", 20: "caption 1", 30: "caption 2", 40: "caption 3"}
    assert src.rejected == {"incomplete tar sample": 1}
    # Two shards joined with `tar -A` repeat every key: both halves are read, each pair kept whole.
    second = [(f"0000{i}.png", png(10 * i + 110)) for i in range(4)] + \
        [(f"0000{i}.txt", f"other {i}".encode()) for i in range(4)]
    tar_of(tmp_path / "joined.tar", pairs + second)
    src = open_source("pairs", str(tmp_path / "joined.tar"))
    assert captions_by_image(src) == {**{10 * i + 10: f"caption {i}" for i in range(4)},
                                      **{10 * i + 110: f"other {i}" for i in range(4)}}
    assert len(src.records) == 8 and not src.rejected
    # A key holding a dot: said so, not "incomplete".
    tar_of(tmp_path / "dots.tar", [("photo0.v2.png", png(5)), ("photo0.v2.txt", b"x")])
    assert open_source("pairs", str(tmp_path / "dots.tar")).rejected == {
        "tar sample whose key holds a dot (a key ends at its name's first dot: rename a.b.jpg a_b.jpg)": 1}
    # Four such samples under one key (dir/img.v0.png ... dir/img.v3.png) are four lost, not one.
    tar_of(tmp_path / "dots4.tar", [(f"dir/img.v{i}.{ext}", png(5) if ext == "png" else b"x") for i in range(4)
                                    for ext in ("png", "txt")])
    assert open_source("pairs", str(tmp_path / "dots4.tar")).rejected == {
        "tar sample whose key holds a dot (a key ends at its name's first dot: rename a.b.jpg a_b.jpg)": 4}


def test_shards_compressed_whole_are_read_named_alone_or_in_a_folder_and_a_cut_one_keeps_its_whole_samples(tmp_path):
    import bz2
    import gzip
    import lzma

    from flava.data.registry import open_source

    def shard(k):
        return [m for i in range(3)
                for m in ((f"{k}{i}.png", png(10 * k + i, 64)), (f"{k}{i}.txt", f"c{k}{i}".encode()))]
    folder = tmp_path / "mixed"
    folder.mkdir()
    plain = tar_of(folder / "0.tar", shard(1)).read_bytes()
    tar = tar_of(tmp_path / "t.tar", shard(2)).read_bytes()
    for name, pack in (("1.tar.gz", gzip.compress), ("2.tgz", gzip.compress), ("3.tar.bz2", bz2.compress),
                       ("4.tar.xz", lzma.compress)):
        (folder / name).write_bytes(pack(tar))
        alone = open_source("pairs", str(folder / name))
        assert captions_by_image(alone) == {20 + i: f"c2{i}" for i in range(3)} and not alone.rejected, name
    src = open_source("pairs", str(folder))
    assert len(src.shards) == 5 and len(src.records) == 15 and not src.rejected
    assert captions_by_image(src) == {**{10 + i: f"c1{i}" for i in range(3)}, **{20 + i: f"c2{i}" for i in range(3)}}
    # Cut inside its last member: the samples before the cut, and the shard counted as cut short.
    cut = gzip.compress(plain)
    (tmp_path / "cut.tar.gz").write_bytes(cut[:len(cut) * 2 // 3])
    short = open_source("pairs", str(tmp_path / "cut.tar.gz"))
    assert captions_by_image(short) == {10: "c10"} and short.rejected == {"tar member past the end of its shard": 1}


def test_an_img2dataset_folder_is_read_as_its_shards_and_a_folder_mixing_shards_and_images_is_refused(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from flava.data.registry import open_source
    from flava.errors import DataError

    out = tmp_path / "i2d"  # what img2dataset writes: shards, each with its metadata table and stats
    out.mkdir()
    for k in range(2):
        tar_of(out / f"0000{k}.tar", [(f"0000{k}000{i}.png", png(10 * k + i)) for i in range(3)]
               + [(f"0000{k}000{i}.txt", f"c{k}{i}".encode()) for i in range(3)])
        pq.write_table(pa.Table.from_pylist([{"url": "http://x", "caption": "c", "key": "k", "status": "success"}]),
                       out / f"0000{k}.parquet")
        (out / f"0000{k}_stats.json").write_text("{}")
    src = open_source("pairs", str(out))
    assert len(src.records) == 6 and captions_by_image(src)[11] == "c11"
    assert len(open_source("images", str(out)).records) == 6
    (out / "stray.jpg").write_bytes(png(1))
    for kind in ("pairs", "images"):
        with pytest.raises(DataError, match=r"i2d holds both shards \(00000\.tar\) and image files \(stray\.jpg\): "
                                            r"name the shards alone \(.*i2d/\*\.tar\), or move the shards out"):
            open_source(kind, str(out))
    # A class folder with an archive beside its classes: refused the same way, naming the suffix to name.
    classes = tmp_path / "cls"
    for name in ("cat", "dog"):
        (classes / name).mkdir(parents=True)
        (classes / name / "0.png").write_bytes(png(5))
    tar_of(tmp_path / "backup.tar", [("cat/0.png", png(5))])
    (classes / "backup.tar.gz").write_bytes(gzip.compress((tmp_path / "backup.tar").read_bytes()))
    with pytest.raises(DataError, match=r"cls holds both shards \(backup\.tar\.gz\) and image files \(.*0\.png\): "
                                        r"name the shards alone \(.*cls/\*\.tar\.gz\)"):
        open_source("images", str(classes))
    # Parquet beside a shard that is not its metadata's, in a folder whose name holds ".tar": parquet, as before.
    data = tmp_path / "my.tarball_data"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist([{"image": png(i), "caption": f"c{i}"} for i in range(4)]),
                   data / "train.parquet")
    tar_of(data / "images.tar", [("k.png", png(1)), ("k.txt", b"x")])
    assert len(open_source("pairs", str(data)).records) == 4


def test_a_shard_named_by_two_sources_is_refused_in_one_line(tmp_path, capsys):
    from flava.data.registry import open_stream
    from flava.data.samples import SampleMaker, SampleSpec
    from flava.errors import DataError

    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(2):
        tar_of(shards / f"0000{k}.tar", [(f"{k}{i}.png", png(k + i)) for i in range(3)]
               + [(f"{k}{i}.txt", b"a caption") for i in range(3)])
    spec = SampleSpec.for_model(flava.preset("tiny"), flava.config.ObjectivesConfig(), 16, 0.9)
    for specs in ([str(shards), str(shards / "00000.tar")], [str(shards), str(shards / "*.tar")],
                  [str(shards / "0000{0..1}.tar"), f"{tmp_path}/./shards/00001.tar"]):
        with pytest.raises(DataError, match=r"data\.pairs: the shard .*0000[01]\.tar is named by both .* and .*; "
                                            r"give each shard once \(a weight draws one more often\)"):
            open_stream("pairs", specs, SampleMaker(spec, 0), 2, 0)
    # Two columns of one parquet file are two sources, not one named twice.
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"image": png(i), "en": f"e{i}", "de": f"d{i}"} for i in range(4)]),
                   tmp_path / "x.parquet")
    open_stream("pairs", [f"{tmp_path}/x.parquet?caption=en", f"{tmp_path}/x.parquet?caption=de"],
                SampleMaker(spec, 0), 2, 0)
    # prepare and train-codebook refuse it alike.
    code = cli(["prepare", "--pairs", str(shards), str(shards / "00001.tar"), "--output", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "named by both" in err and "Traceback" not in err
    assert not (tmp_path / "p").exists()
    code = cli(["train-codebook", "--pairs", str(shards), "--images", str(shards / "00000.tar"), "--output",
                str(tmp_path / "cb"), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "train-codebook: the shard" in err and "named by both" in err


def test_an_image_file_named_by_two_sources_is_refused_and_a_table_may_name_one_twice(tmp_path, capsys):
    # A folder and a glob in it had drawn those images twice as often (prepare wrote 50 samples of 40).
    from flava.data.registry import open_source, open_stream
    from flava.data.samples import SampleMaker, SampleSpec
    from flava.errors import DataError

    maker = SampleMaker(SampleSpec.for_model(flava.preset("tiny"), flava.config.ObjectivesConfig(), 16, 0.9), 0)
    (tmp_path / "imgs").mkdir()
    for i in range(4):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(png(i))
    for specs in ([str(tmp_path / "imgs"), str(tmp_path / "imgs" / "1*.png")],
                  [str(tmp_path / "imgs" / "*.png"), f"{tmp_path}/./imgs/2.png"]):
        with pytest.raises(DataError, match=r"the image .*[12]\.png is named by both .* and .*; give each image once"):
            open_stream("images", specs, maker, 2, 0)
    code = cli(["prepare", "--images", str(tmp_path / "imgs"), str(tmp_path / "imgs" / "3.png"),
                "--output", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "the image" in err and "named by both" in err, err
    # Pairs may share an image (captions of one photograph); two folders are two sets of files.
    (tmp_path / "pairs.csv").write_text("image,caption\n" + "".join(f"imgs/0.png,caption {i}\n" for i in range(3)))
    assert len(open_source("pairs", str(tmp_path / "pairs.csv")).records) == 3
    (tmp_path / "more").mkdir()
    for i in range(2):
        (tmp_path / "more" / f"{i}.png").write_bytes(png(i))
    open_stream("images", [str(tmp_path / "imgs"), str(tmp_path / "more")], maker, 2, 0)


def test_an_empty_shard_a_link_and_tars_joined_with_cat_are_counted_by_what_they_are(tmp_path):
    import gzip

    from flava.data.registry import open_source

    tar_of(tmp_path / "00000.tar", [("a.png", png(1)), ("a.txt", b"x")])
    tar_of(tmp_path / "00001.tar", [])
    with tarfile.open(tmp_path / "00002.tar", "w") as tar:
        for name, data in (("b.png", png(2)), ("b.txt", b"y"), ("c.png", png(3)), ("c.txt", b"z")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (("d.png", "b.png"), ("c.json", "c.txt")):  # d lost for it; c whole without it
            link = tarfile.TarInfo(name)
            link.type, link.linkname = tarfile.SYMTYPE, target
            tar.addfile(link)
        tar.addfile(tarfile.TarInfo("d.txt"), io.BytesIO(b""))
    src = open_source("pairs", str(tmp_path))
    assert len(src.records) == 3
    assert src.rejected == {"empty tar shard": 1,
                            "tar sample whose image or caption is a link (links in shards are not followed)": 1}
    # Two tars joined with cat (or two gzipped ones): the reader stops at the first's end, and says so.
    joined = tmp_path / "joined"
    joined.mkdir()
    a, b = (tar_of(tmp_path / f"{k}.tar", [(f"{k}.png", png(9)), (f"{k}.txt", b"w")]).read_bytes() for k in "ef")
    (joined / "0.tar").write_bytes(a + b)
    (joined / "1.tar.gz").write_bytes(gzip.compress(a) + gzip.compress(b))
    src = open_source("pairs", str(joined))
    assert len(src.records) == 2 and src.rejected == {
        "data after the end of a tar shard (tars joined with cat: join them with tar -A)": 2}
    # A plain tar whose first member's name begins as a bzip2 stream does ("BZh9..."): read as the tar it is.
    tar_of(tmp_path / "bz.tar", [("BZh91AY&SY.png", png(4)), ("BZh91AY&SY.txt", b"v")])
    assert len(open_source("pairs", str(tmp_path / "bz.tar")).records) == 1


def test_a_prepare_rerun_on_an_input_that_grew_is_refused_not_reported_finished(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(png(10))
    table = tmp_path / "t.csv"
    table.write_text("image,caption\n" + "".join(f"a.png,caption {i}\n" for i in range(6)))
    args = ["prepare", "--pairs", str(table), "--output", str(tmp_path / "p"), "--size", "16", "--workers", "1"]
    assert cli(args) == 0
    capsys.readouterr()
    assert cli(args) == 0  # the same input: nothing to do, and said so as before
    with table.open("a") as f:
        f.write("a.png,caption 6\na.png,caption 7\n")
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"{table} changed since {tmp_path / 'p'} was prepared from it (then 6 samples; now 8 samples): prepare " \
           "into a new directory" in err
    # Edited in place, as many rows: other captions (a rerun after a stop had mixed old and new ones).
    first = "image,caption\n" + "".join(f"a.png,caption {i}\n" for i in range(6))
    edited = first.replace("caption 0", "a longer caption")
    table.write_text(edited)
    assert cli(args) == 2
    assert f"(then {len(first)} bytes; now {len(edited)} bytes, as many samples)" in capsys.readouterr().err
    # As many bytes too (a caption retyped): the rerun had printed the earlier run's table as its own.
    table.write_text(first.replace("caption 5", "CAPTION 5"))
    assert cli(args) == 2
    assert f"{table} changed since {tmp_path / 'p'} was prepared from it (edited, {len(first):,} bytes as " \
           "before)" in capsys.readouterr().err
    table.write_text(first)
    assert cli(args) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "was prepared before from these inputs, unchanged: nothing was done" in out
    # An output an earlier release prepared recorded the counts alone: those are compared.
    mark = tmp_path / "p" / "prepare_settings.json"
    settings = json.loads(mark.read_text())
    mark.write_text(json.dumps({**settings, "held": [h[:2] for h in settings["held"]]}))
    assert cli(args) == 0


def test_a_prepare_rerun_makes_again_a_unit_whose_shard_is_gone_or_cut(tmp_path, capsys):
    """A unit had counted as done by its sidecar alone: a rerun called the output finished with a
    shard missing, and pretraining trained on the others."""
    (tmp_path / "a.png").write_bytes(png(10))
    table = tmp_path / "t.csv"
    table.write_text("image,caption\n" + "".join(f"a.png,caption {i}\n" for i in range(10)))
    out = tmp_path / "p"
    args = ["prepare", "--pairs", str(table), "--output", str(out), "--size", "16", "--workers", "1",
            "--shard-size", "4"]
    assert cli(args) == 0
    whole = {f.name: f.read_bytes() for f in out.glob("0*.*")}
    (out / "00001.tar").unlink()
    (out / "00002.tar").write_bytes(whole["00002.tar"][:1024])
    capsys.readouterr()
    assert cli(args) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "note: 2 units made again: 00001.tar is missing; 00002.tar holds 1,024 bytes where" in said, said
    assert {f.name: f.read_bytes() for f in out.glob("0*.*")} == whole  # made as before
    assert sum(s["nsamples"] for s in json.loads((out / "index.json").read_text())["shardlist"]) == 10


def test_an_unfinished_prepare_of_an_earlier_release_is_finished_only_where_its_units_are_this_listings(tmp_path,
                                                                                                          capsys):
    # Its manifest records no `held`; a folder's listing changed since (hidden files passed over).
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(3):
        tar_of(shards / f"0000{k}.tar", [(f"{k}.png", png(k)), (f"{k}.txt", b"x")])
    args = ["prepare", "--pairs", str(shards), "--output", str(tmp_path / "p"), "--size", "16", "--workers", "1"]

    def as_an_earlier_release_left_it(out=tmp_path / "p", since_image_size=False):
        manifest = json.loads((out / "prepare_settings.json").read_text())
        manifest.pop("held", None)
        manifest.pop("decoded", None)  # recorded since crops are decoded at libjpeg-turbo's fast scales alone
        if not since_image_size:
            manifest["settings"].pop("image_size", None)  # recorded since image tokens follow training's view
        (out / "prepare_settings.json").write_text(json.dumps(manifest))
        for name in ("index.json", "prepare_report.json", "00002.json", "00002.tar"):
            (out / name).unlink(missing_ok=True)

    assert cli(args) == 0
    as_an_earlier_release_left_it()
    assert cli(args) == 0  # shards named as before: finished
    assert json.loads((tmp_path / "p" / "index.json").read_text())["shardlist"][2]["nsamples"] == 1
    as_an_earlier_release_left_it()
    (shards / "00000.tar").rename(shards / "._00000.tar")  # now passed over: unit 0 is another shard
    capsys.readouterr()
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "unfinished prepare started by an earlier flava" in err
    # With image tokens, whose pixels that release chose otherwise: refused, not finished with others.
    (shards / "._00000.tar").rename(shards / "00000.tar")
    import torch

    from flava.config import preset, to_dict
    from flava.io.checkpoint import save_checkpoint

    cfg = preset("tiny")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "cb", to_dict(cfg), {"codebook": flava.FlavaImageCodebook(cfg.codebook).state_dict()})
    tokens = ["prepare", "--pairs", str(shards), "--output", str(tmp_path / "t"), "--size", "16", "--workers", "1",
              "--codebook", str(tmp_path / "cb"), "--config", "tiny"]
    assert cli(tokens) == 0
    as_an_earlier_release_left_it(tmp_path / "t")
    capsys.readouterr()
    assert cli(tokens) == 2
    assert "holds shards an earlier flava began preparing, whose image tokens describe the image before it was " \
           "stored" in capsys.readouterr().err
    tokens[tokens.index(str(tmp_path / "t"))] = str(tmp_path / "t2")
    assert cli(tokens) == 0
    as_an_earlier_release_left_it(tmp_path / "t2", since_image_size=True)  # some crops decoded at 7/8 scale then
    capsys.readouterr()
    assert cli(tokens) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "holds shards an earlier flava began preparing, whose image " \
        "tokens were made of some crops decoded otherwise than training now decodes them" in err
    # Finished by that release and run again: its index still says its tokens are of before, and
    # training's note about them stays.
    tokens[tokens.index(str(tmp_path / "t2"))] = str(tmp_path / "t3")
    assert cli(tokens) == 0
    for name, at in (("prepare_settings.json", lambda d: d), ("index.json", lambda d: d["flava"])):
        recorded = json.loads((tmp_path / "t3" / name).read_text())
        del at(recorded)["decoded"]
        (tmp_path / "t3" / name).write_text(json.dumps(recorded))
    (tmp_path / "t3" / "00001.tar").unlink()  # a unit to do again
    assert cli(tokens) == 0
    assert "decoded" not in json.loads((tmp_path / "t3" / "index.json").read_text())["flava"]


def _block_sums(pixels):
    """A stand-in image tokenizer that any pixel's change alters: each 8-px block's sum."""
    b, c, h, w = pixels.shape
    return (pixels.long().reshape(b, c, h // 8, 8, w // 8, 8).sum((1, 3, 5)) % 65536).reshape(b, -1)


def test_prepared_image_tokens_are_those_of_the_pixels_training_shows_the_model(tmp_path):
    # They were tokenised from the image before it was stored as JPEG, at full resolution, where
    # training decodes the stored JPEG at a reduced DCT scale: with a trained codebook 3-9 % of the
    # targets described other pixels than the model's.
    from flava.data.decode import decode_crop
    from flava.data.members import Blob
    from flava.data.prepare import PrepareSettings, prepare
    from flava.data.registry import open_source
    import torch

    from flava.data.samples import SampleMaker, SampleSpec
    from flava.data.sources import open_shard
    from flava.data.transforms import codebook_view

    rng = np.random.default_rng(0)
    rows = ["image,caption"]
    for i in range(3):  # detail at several scales: smooth shapes, an edge, grain
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        arr = np.asarray(Image.fromarray(small).resize((300, 260), Image.BICUBIC)).astype(np.float64)
        arr[40 + 20 * i: 120 + 20 * i, 30:200] = rng.integers(0, 256, 3)
        arr += rng.normal(0, 30, arr.shape)
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,picture {i}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    # The model's view and the codebook's: one size (the tiny preset), the codebook's smaller (base's
    # shape: it reads the model's view resized), larger (patches under 8 px: it reads the crop).
    for image_size, codebook_size in ((64, 64), (96, 48), (32, 64)):
        out = tmp_path / f"p{image_size}-{codebook_size}"
        settings = PrepareSettings(crops=3, codebook_image_size=codebook_size, image_size=image_size)
        prepare("pairs", [open_source("pairs", str(tmp_path / "pairs.csv"))], out, settings,
                lambda: _block_sums, "block sums", grid=codebook_size // 8, image_size=image_size)
        samples: dict = {}
        with tarfile.open(out / "00000.tar") as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
        compared = 0
        for sample in samples.values():
            boxes, stored = np.load(io.BytesIO(sample["crops.npy"])), np.load(io.BytesIO(sample["tokens.npy"]))
            for box, tokens in zip(boxes, stored):
                # What a step decodes for this box (`SampleMaker._image`), and the codebook's view of it (`collate`).
                def choose(w, h, box=box):
                    return tuple(float(v) for v in box * np.array([w, h] * 2))
                if codebook_size > image_size:
                    view = decode_crop(Blob(sample["jpg"], "jpg"), choose, image_size, codebook_size)[1]
                else:
                    view = codebook_view(decode_crop(Blob(sample["jpg"], "jpg"), choose, image_size)[0][None],
                                         codebook_size)[0]
                assert np.array_equal(_block_sums(view[None])[0].numpy(), tokens), (image_size, codebook_size)
                compared += 1
        assert compared == 3 * 3
        # Trained on them, a sample's pixels and targets are one box's, its pixels those of the decode
        # the tokens were made from (which covers the codebook's view where that is the larger).
        maker = SampleMaker(SampleSpec(image_size, codebook_size, codebook_size // 8, 16), seed=0)
        for i, record in enumerate(open_shard(open_source("pairs", str(out)).shards[0]).records):
            got = maker("pairs", record, (0, i))
            jpg = record.image.read()
            boxes = np.load(io.BytesIO(record.prepared.crops.read()))
            tokens = np.load(io.BytesIO(record.prepared.tokens.read()))
            k = next(k for k in range(len(boxes)) if np.array_equal(tokens[k], got["image_targets"].numpy()))
            (want,) = decode_crop(Blob(jpg, "jpg"), lambda w, h: tuple(float(v) for v in boxes[k] * np.array([w, h] * 2)),
                                  image_size, side=max(image_size, codebook_size))
            assert torch.equal(got["pixel_values"], want), (image_size, codebook_size, i)


def test_tables_named_where_they_cannot_be_read_as_one_are_said_to_be_tables(tmp_path):
    from flava.data.registry import open_source
    from flava.errors import DataError

    (tmp_path / "csvs").mkdir()
    for name in ("a.csv", "b.tsv"):
        (tmp_path / "csvs" / name).write_text("image,caption\nx.png,a caption\n")
    table = tmp_path / "csvs" / "a.csv"
    cases = [("pairs", f"{table}?image=img&caption=text", r"a\.csv: a CSV, TSV or JSONL table's columns are found by "
                                                            r"their names .*\?COLUMN=NAME is for parquet"),
             ("pairs", str(tmp_path / "csvs"), r"csvs names 2 table\(s\) \(a\.csv, b\.tsv\): a table is a source of "
                                               r"its own: name each"),
             ("pairs", str(tmp_path / "csvs" / "*.csv"), r"names 1 table\(s\) \(.*a\.csv\)"),
             ("text", str(table), r"a\.csv is a table: text sources are \.txt files")]
    for kind, spec, said in cases:  # each had been "no tar shards match" or "no .txt or .jsonl files match"
        with pytest.raises(DataError, match=said):
            open_source(kind, spec)


def test_a_tables_missing_image_files_are_estimated_from_a_sample_at_the_start(tmp_path):
    from flava.data import registry
    from flava.data.registry import missing_files, open_source

    (tmp_path / "a.png").write_bytes(png(1))
    rows = [("a.png" if i % 4 == 0 else f"gone{i}.png") for i in range(40)]
    (tmp_path / "t.csv").write_text("image,caption\n" + "".join(f"{r},a caption\n" for r in rows))
    assert missing_files(open_source("pairs", str(tmp_path / "t.csv"))) == (30, 40)
    (tmp_path / "big.csv").write_text("image,caption\n" + "".join(f"{r},a caption\n" for r in rows * 10))
    missing, checked = missing_files(open_source("pairs", str(tmp_path / "big.csv")))
    assert checked == registry.MISSING_CHECKED and 0.6 < missing / checked < 0.9  # a seeded sample of 400
    tar_of(tmp_path / "s.tar", [("k.png", png(1)), ("k.txt", b"x")])
    assert missing_files(open_source("pairs", str(tmp_path / "s.tar"))) == (0, 0)  # shards hold their images


def test_shards_and_text_of_fewer_samples_than_a_batch_are_said_at_the_start(tmp_path):
    # Said of tables alone (their size is listed): a shard of 2 pairs or a text file of 2 lines under a
    # batch of 8 repeated samples in every batch unsaid, its start line "size read as it streams".
    from types import SimpleNamespace

    from flava.data import pipeline
    from flava.data.pipeline import BatchStream
    from flava.data.registry import open_source
    from flava.data.samples import SampleMaker, SampleSpec
    from flava.train.accounting import source_notes
    from flava.train.run import _described

    maker = SampleMaker(SampleSpec(image_size=32, codebook_image_size=32, grid=4, max_text_length=16), 0)

    def start(kind, path, batch):
        stream = BatchStream(kind, open_source(kind, str(path)), maker, batch, seed=0)
        stream.probe()
        return _described(stream, 1), source_notes({kind: SimpleNamespace(streams=[stream])}, batch)

    tar_of(tmp_path / "s.tar", [("a.png", png(1)), ("a.txt", b"a cat"), ("b.png", png(2)), ("b.txt", b"a dog")])
    assert start("pairs", tmp_path / "s.tar", 8) == (
        f"{tmp_path / 's.tar'} (1 shard, 2 samples, 1 lane)",
        [f"data.pairs {tmp_path / 's.tar'} holds 2 samples, fewer than a batch of 8: every batch repeats samples (a "
         "pair twice in a batch is its own negative to the contrastive objective); give more data or a smaller "
         "data.batch_size"])
    (tmp_path / "t.txt").write_text("one line\ntwo line\n")
    assert start("text", tmp_path / "t.txt", 8)[1] == [
        f"data.text {tmp_path / 't.txt'} holds 2 samples, fewer than a batch of 8: every batch repeats samples; give "
        "more data or a smaller data.batch_size"]
    assert start("text", tmp_path / "t.txt", 2) == (f"{tmp_path / 't.txt'} (1 shard, 2 samples, 1 lane)", [])
    # Shards the probe did not read are counted where they are small; beyond that nothing is said
    # (an estimate is not a count).
    (tmp_path / "d").mkdir()
    for i in range(3):
        tar_of(tmp_path / "d" / f"{i}.tar", [(f"{i}.png", png(i)), (f"{i}.txt", b"a square")])
    assert start("pairs", tmp_path / "d", 8)[1] == [
        f"data.pairs {tmp_path / 'd'} holds 3 samples, fewer than a batch of 8: every batch repeats samples (a pair "
        "twice in a batch is its own negative to the contrastive objective); give more data or a smaller "
        "data.batch_size"]
    with mock.patch.object(pipeline, "COUNTED_BYTES", 1000):  # the two 10 KiB shards left: up to 10 pairs
        assert "holds 3 samples, fewer than a batch of 16" in start("pairs", tmp_path / "d", 16)[1][0]
        assert start("pairs", tmp_path / "d", 4) == (f"{tmp_path / 'd'} (3 shards, size read as it streams, 2 lanes)",
                                                     [])


def test_small_habits_of_hand_made_data_are_read_as_meant(tmp_path):
    from flava.data.registry import open_source
    from flava.data.sources import csv_pairs

    # A BOM before a text file's first line (Windows' Notepad), a JSONL's too: not part of the text.
    (tmp_path / "t.txt").write_bytes("\ufefffirst line\nsecond line\n".encode())
    (tmp_path / "t.jsonl").write_bytes('\ufeff{"text": "first"}\n{"text": "second"}\n'.encode())
    for name in ("t.txt", "t.jsonl"):
        src = open_source("text", str(tmp_path / name))
        assert [r for r in src.records][0] in ("first line", "first") and not src.rejected, name
    # A .json caption whose `caption` is empty beside a `text`: the text.
    tar_of(tmp_path / "s.tar", [("k.png", png(1)), ("k.json", json.dumps({"caption": "", "text": "real"}).encode())])
    assert captions_by_image(open_source("pairs", str(tmp_path / "s.tar"))) == {1: "real"}
    # "a.png, a caption" and " a.png": the path without the space a hand-written table puts after commas.
    (tmp_path / "a.png").write_bytes(png(3))
    (tmp_path / "p.csv").write_text("caption,image\na caption, a.png\n")
    assert [r.image for r in csv_pairs(str(tmp_path / "p.csv")).records] == [tmp_path / "a.png"]


def test_a_shard_folder_passes_over_macos_leftovers(tmp_path):
    from flava.data.registry import open_source

    tar_of(tmp_path / "00000.tar", [("k.png", png(1)), ("k.txt", b"x")])
    (tmp_path / "._00000.tar").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # a Mac's resource fork beside it
    (tmp_path / "._stray.jpg").write_bytes(b"\x00\x05\x16\x07")
    src = open_source("pairs", str(tmp_path))
    assert [Path(s.url).name for s in src.shards] == ["00000.tar"] and len(src.records) == 1 and not src.rejected


def test_a_parquet_source_with_a_column_named_twice_is_one_line(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flava.data.registry import open_source
    from flava.errors import DataError

    caps = pa.array(["a", "b"])
    columns = [pa.array([png(1), png(2)]), caps, caps]
    pq.write_table(pa.Table.from_arrays(columns, names=["image", "caption", "caption"]), tmp_path / "dup.parquet")
    with pytest.raises(DataError, match=r"dup\.parquet.* names column 'caption' 2 times; rename or remove all but one"):
        open_source("pairs", str(tmp_path / "dup.parquet"))
    assert cli(["prepare", "--pairs", str(tmp_path / "dup.parquet"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_shards_members_are_listed_as_tarfile_lists_them_in_every_header_format_and_damage(tmp_path):
    """The loader walks plain tar headers itself (tarfile's objects cost half a small shard's
    reading); what it lists must be tarfile's, and what it cannot read plainly is tarfile's to read."""
    from flava.data.tars import _listing, _plain_listing

    def listed_by_tarfile(data: bytes) -> list:
        out = []
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                for i in tar:
                    out.append((i.name, i.offset_data, i.size, i.isfile(), i.issym() or i.islnk()))
        except tarfile.TarError:
            out.append("error")
        return out

    def listed_by_us(data: bytes) -> list:
        out = []
        try:
            out.extend(_listing(io.BytesIO(data), len(data)))
        except tarfile.TarError:
            out.append("error")
        return out

    rng = np.random.default_rng(0)
    names = ["a.jpg", "a.txt", "folder/", "d/b.jpg", "@l.jpg", "é.jpg", "x" * 120 + ".jpg", "p/" * 60 + "q.txt"]
    made = {}
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        for mtime in (0, 1.7e9 + 0.25):  # a float time gives every member a pax header in the pax format
            b = io.BytesIO()
            with tarfile.open(fileobj=b, mode="w", format=fmt) as tar:
                for name in names:
                    info = tarfile.TarInfo(name.strip("@/"))
                    info.mtime = mtime
                    if name.endswith("/"):
                        info.type = tarfile.DIRTYPE
                    elif name.startswith("@"):
                        info.type, info.linkname = tarfile.SYMTYPE, "a.jpg"
                    else:
                        info.size = int(rng.integers(0, 1500))
                    try:
                        tar.addfile(info, io.BytesIO(bytes(info.size)) if info.isfile() else None)
                    except ValueError:  # a name the format cannot hold
                        pass
            made[fmt, mtime] = b.getvalue()
    walked = 0
    for (fmt, mtime), data in made.items():
        assert listed_by_us(data) == listed_by_tarfile(data), (fmt, mtime)
        plain = _plain_listing(io.BytesIO(data), len(data))
        walked += plain is not None
        # Cut anywhere, or a header damaged: the same members, or the same failure, as tarfile's.
        for cut in [*range(0, len(data), 512), *rng.integers(1, len(data), 20)]:
            assert listed_by_us(data[:cut]) == listed_by_tarfile(data[:cut]), (fmt, mtime, cut)
        damaged = bytearray(data)
        damaged[1024 + 130] ^= 0x7
        assert listed_by_us(bytes(damaged)) == listed_by_tarfile(bytes(damaged))
    # The formats shards are written in are walked, not left to tarfile: ustar (webdataset's
    # writer), pax with per-member headers (tarfile's default), GNU without long names.
    plain_ustar = tar_of(tmp_path / "u.tar", [("k.jpg", b"1"), ("k.txt", b"2")]).read_bytes()
    assert _plain_listing(io.BytesIO(plain_ustar), len(plain_ustar)) is not None
    assert _plain_listing(io.BytesIO(made[tarfile.PAX_FORMAT, 1.7e9 + 0.25]),
                          len(made[tarfile.PAX_FORMAT, 1.7e9 + 0.25])) is not None
    assert walked >= 3


def test_shards_named_but_not_there_are_said_at_the_start_and_hold_nothing_in_a_sources_size(tmp_path):
    # A brace range past the last shard written: each missing one was sized as the first, so the
    # source was drawn more often than its like (83 % against 17 % for two sources of 52).
    from types import SimpleNamespace

    from flava.data.registry import estimated_size, missing_shards, open_source
    from flava.train.accounting import source_notes

    for k in range(3):
        tar_of(tmp_path / f"{k:05d}.tar", [(f"{k}_{i}.{e}", png(k * 10 + i) if e == "png" else b"a cat")
                                           for i in range(4) for e in ("png", "txt")])
    src = open_source("pairs", str(tmp_path) + "/{00000..00009}.tar")
    assert missing_shards(src) == list(range(3, 10)) and estimated_size(src) == 12
    notes = source_notes({"pairs": SimpleNamespace(streams=[SimpleNamespace(source=src, probed_size=None)])}, 4)
    assert notes == [f"data.pairs {src.name}: 7 of its 10 shards do not exist (e.g. {tmp_path / '00003.tar'}); they "
                     "hold nothing, and are counted as missing when reached"]
    assert missing_shards(open_source("pairs", str(tmp_path))) == []


def test_prepare_says_a_tables_stray_quotes_and_names_the_first_sample_of_each_reason_it_dropped(tmp_path, capsys):
    # A stray quote closed lines later by an inch mark took three rows into one caption without a word;
    # prepare counted what it dropped but never said which; a table's paths written relative to the
    # working folder were told to be "a CSV of image,caption".
    for name in "abcde":
        (tmp_path / f"{name}.png").write_bytes(png(10))
    (tmp_path / "q.tsv").write_text('image\tcaption\na.png\tfirst\nb.png\t"Big sale on TVs\nc.png\tthird\n'
                                    'd.png\ta TV with a 55"\ne.png\tlast\nnothere.png\tgone\n')
    assert cli(["prepare", "--pairs", str(tmp_path / "q.tsv"), "--output", str(tmp_path / "q"), "--size", "16",
                "--workers", "1"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"note: {tmp_path / 'q.tsv'}: 1 row holds a quoted cell over several lines that read alone as rows (the " \
           "first, lines 3-5)" in out
    assert f"first missing image file: {tmp_path / 'nothere.png'}" in out
    report = json.loads((tmp_path / "q" / "prepare_report.json").read_text())
    assert report["first_dropped"] == {"missing image file": str(tmp_path / "nothere.png")}
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "t.csv").write_text("image,caption\nsub/a.png,one\n")
    assert cli(["prepare", "--pairs", str(tmp_path / "sub" / "t.csv"), "--output", str(tmp_path / "s"),
                "--workers", "1"]) == 2
    assert f"(1 missing image file; the first: {tmp_path / 'sub' / 'sub' / 'a.png'}): a table's relative image " \
           "paths are read from its folder" in capsys.readouterr().err


def test_a_brace_range_of_more_shards_than_any_data_set_is_refused_before_it_is_built():
    # {00000..99999999}, digits to spare, had built 100 million names (20 GB) without a word, and no
    # SIGTERM stopped it.
    from flava.data.shards import expand_urls
    from flava.errors import DataError

    assert len(expand_urls("s3://b/{000..999}-{a,b}.tar")) == 2000
    with pytest.raises(DataError, match=r"http://h/A/\{00000..99999999\}.tar names 100,000,000 shards with its "
                                        r"braces, more than 10,000,000: check the range"):
        expand_urls("http://h/A/{00000..99999999}.tar")


def test_a_cache_that_cannot_hold_a_shard_is_said_and_the_shard_read_without_it(tmp_path, monkeypatch, capsys):
    # A full cache disk had counted every shard it could not hold as unreadable (the run exiting 0
    # after 3 of 12 shards), and a cache_dir that is a file as every shard missing.
    from flava.data import shards
    from flava.errors import DataError

    monkeypatch.setattr(shards, "_fetch", lambda url: b"the shard's bytes")
    (tmp_path / "afile").write_text("")
    cache = shards.ShardCache(str(tmp_path / "afile"), 2**30)  # nothing can be made inside a file
    assert cache.get("http://h/0.tar") == b"the shard's bytes" and cache.get("http://h/1.tar") == b"the shard's bytes"
    err = capsys.readouterr().err
    assert err.count("note: data.cache_dir=") == 1 and "a shard it cannot hold is read without it" in err, err
    with pytest.raises(DataError, match=rf"data.cache_dir={tmp_path / 'afile'} cannot be used \(File exists\)"):
        shards.check_cache_dir(str(tmp_path / "afile"))
    shards.check_cache_dir(str(tmp_path / "fresh" / "cache"))  # made where it can be
    assert (tmp_path / "fresh" / "cache").is_dir() and not list((tmp_path / "fresh" / "cache").iterdir())
