"""Data sources and the batch pipeline: bad records skipped and counted, exact resumption,
the same batches with and without loader workers, the global batch the same on any number of
processes."""

import dataclasses
import io
import json
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from flava.data.batch import ImageBatch, PairBatch, TextBatch
from flava.data.pipeline import BatchStream, Layout, choose_lanes
from flava.data.registry import open_source
from flava.data.samples import SampleMaker, SampleSpec
from flava.data.sources import csv_pairs, image_folder
from flava.data.tars import tar_pairs
from flava.data.texts import text_file
from flava.errors import DataError

SPEC = SampleSpec(image_size=32, codebook_image_size=32, grid=4, max_text_length=16)


def png_bytes(seed: int, size=40) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size + 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def csv_dataset(tmp_path):
    rows = []
    for i in range(12):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(i))
        rows.append((f"{i}.png", f"a picture number {i}" + " more" * (i % 5)))  # texts of several lengths
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "cut.png").write_bytes(png_bytes(99)[:60])
    rows += [("missing.png", "gone"), ("zero.png", "empty file"), ("cut.png", "truncated"),
             ("3.png", "   "), ("4.png", "word " * 1000)]
    with open(tmp_path / "pairs.tsv", "w") as f:
        f.write("image\tcaption\n" + "".join(f"{a}\t{b}\n" for a, b in rows))
    return tmp_path / "pairs.tsv"


def stream(source, kind="pairs", **kw):
    return BatchStream(kind, source, SampleMaker(SPEC, seed=0), batch_size=kw.pop("batch_size", 4), seed=1, **kw)


def test_bad_records_are_skipped_and_counted(csv_dataset):
    s = stream(csv_pairs(str(csv_dataset)))
    batches = [s.next_batch() for _ in range(6)]  # 24 samples: more than an epoch of 17 records
    assert all(isinstance(b, PairBatch) and len(b) == 4 for b in batches)
    b = batches[0]
    assert b.pixel_values.shape == (4, 3, 32, 32) and b.codebook_pixels.shape == (4, 3, 32, 32)
    assert b.patch_mask.shape == (4, 16) and b.patch_mask.sum(1).eq(6).all()
    assert b.input_ids[:, 0].eq(101).all() and (b.attention_mask.sum(1) <= 16).all()
    # Pixels cross processes as uint8; on the device they are the codebook's input range.
    assert b.pixel_values.dtype == b.codebook_pixels.dtype == torch.uint8
    on_device = b.to("cpu")
    assert on_device.codebook_pixels.dtype == torch.float32 and on_device.pixel_values.dtype == torch.float32
    assert (on_device.codebook_pixels >= 0.1 - 1e-6).all() and (on_device.codebook_pixels <= 0.9 + 1e-6).all()
    # The first epoch visits every record: each bad one was met, counted once as a record, and
    # replaced by a good record of the same shard, so every batch is full.
    reasons = {"missing image file", "empty image file", "unreadable image", "empty caption", "over-long caption"}
    assert set(s.skipped) == reasons and all(len(s.bad[r]) == 1 for r in reasons)
    assert sum(s.skipped.values()) >= 5 and s.draws == 6 and s.samples == 24


def test_resume_from_a_position_gives_the_same_batches(csv_dataset):
    src = csv_pairs(str(csv_dataset))
    a = stream(src)
    first = a.next_batch()
    state = a.state()
    rest = [a.next_batch() for _ in range(4)]
    b = stream(src)
    b.load_state(state)
    for want in rest:
        got = b.next_batch()
        for name in ("pixel_values", "input_ids", "masked_input_ids", "mlm_labels", "patch_mask", "codebook_pixels"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert b.skipped == a.skipped
    assert not torch.equal(first.pixel_values, rest[0].pixel_values)
    # The same file with rows removed: one shard still, but positions in it index other samples.
    lines = csv_dataset.read_text().splitlines()
    shorter = csv_dataset.with_name("shorter.tsv")
    shorter.write_text("\n".join(lines[:-3]) + "\n")
    with pytest.raises(DataError, match="holds 14 samples but the run was saved with 17: the data changed"):
        stream(csv_pairs(str(shorter))).load_state(state)


def test_a_text_file_edited_between_a_save_and_its_resume_is_refused(tmp_path):
    # Byte ranges are a text source's shards: a line added at the top kept their count, and the
    # saved positions read other lines, silently.
    notes = tmp_path / "notes.txt"
    notes.write_text("".join(f"note number {i} about a red square\n" for i in range(40)))
    a = stream(text_file(str(notes)), "text")
    a.next_batch()
    state = a.state()
    rest = a.next_batch()
    b = stream(text_file(str(notes)), "text")
    b.load_state(state)
    assert torch.equal(b.next_batch().masked_input_ids, rest.masked_input_ids)
    notes.write_text("A NEW FIRST LINE\n" + notes.read_text())
    with pytest.raises(DataError, match=r"holds 1,367 bytes but the run was saved with 1,350: the data changed"):
        stream(text_file(str(notes)), "text").load_state(state)


def test_a_table_edited_between_a_save_and_its_resume_is_refused(csv_dataset):
    # Other captions in as many rows: the resume was accepted without a word, and the saved
    # positions read the new captions. A table is checked by its size in bytes, as text is.
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = csv_dataset.with_name("texts.parquet")
    pq.write_table(pa.table({"text": [f"a sentence number {i}" for i in range(20)]}), parquet)
    for source, kind, edit in [
        (lambda: csv_pairs(str(csv_dataset)), "pairs",
         lambda: csv_dataset.write_text(csv_dataset.read_text().replace("a picture number 0", "another caption"))),
        (lambda: open_source("text", str(parquet)), "text",
         lambda: pq.write_table(pa.table({"text": [f"other words {i}" for i in range(20)]}), parquet))]:
        a = stream(source(), kind)
        a.next_batch()
        state = a.state()
        edit()
        assert source().known_size == state["size"]  # as many rows: only the bytes tell
        with pytest.raises(DataError, match=r"holds [\d,]+ bytes but the run was saved with [\d,]+: the data changed"):
            stream(source(), kind).load_state(state)
        # A run saved before tables' sizes were recorded still resumes.
        stream(source(), kind).load_state({**state, "bytes": None, "digest": None})
    # As many bytes too (a caption retyped): a CSV's digest tells.
    state = stream(csv_pairs(str(csv_dataset)), "pairs").state()
    csv_dataset.write_text(csv_dataset.read_text().replace("another caption", "ANOTHER caption"))
    with pytest.raises(DataError, match=r"was edited since the run was saved \(as many bytes\): the data changed"):
        stream(csv_pairs(str(csv_dataset)), "pairs").load_state(state)
    stream(csv_pairs(str(csv_dataset)), "pairs").load_state({**state, "digest": None})  # saved before digests


def test_loader_workers_do_not_change_the_batches(csv_dataset):
    src = csv_pairs(str(csv_dataset))
    plain, workers = stream(src), stream(src, num_workers=2)
    lengths = set()
    for _ in range(4):
        x, y = plain.next_batch(), workers.next_batch()
        # Every field: the workers' parts are padded to one text length when merged.
        for f in dataclasses.fields(x):
            a, b = getattr(x, f.name), getattr(y, f.name)
            assert (torch.equal(a, b) if torch.is_tensor(a) else a == b), f.name
        lengths.add(x.input_ids.shape[1])
        lengths.update(int(n) for n in x.attention_mask.sum(1))
    assert len(lengths) > 3  # captions of several lengths, so the merge pads
    assert plain.draws == workers.draws and plain.skipped == workers.skipped


def test_image_folders_and_shards_changed_between_a_save_and_its_resume_are_refused(tmp_path):
    # As many images under other names, or a shard written again with other samples under its
    # name: the saved positions index other images, and the resume had been accepted silently.
    folder = tmp_path / "images"
    (folder / "cats").mkdir(parents=True)
    for i in range(6):
        (folder / "cats" / f"{i}.png").write_bytes(png_bytes(i, size=12))
    a = stream(open_source("images", str(folder)), "images")
    a.next_batch()
    state = a.state()
    stream(open_source("images", str(folder)), "images").load_state(state)  # unchanged: resumes
    (folder / "cats" / "0.png").rename(folder / "cats" / "zero.png")
    with pytest.raises(DataError, match=r"holds other files than the run was saved with \(as many\): the data changed"):
        stream(open_source("images", str(folder)), "images").load_state(state)
    stream(open_source("images", str(folder)), "images").load_state({**state, "names": None})  # saved before

    shards = shard_set(tmp_path, shards=2, per=5)
    a = stream(shards)
    a.next_batch()
    state = a.state()
    stream(shard_set(tmp_path, shards=2, per=5)).load_state(state)  # written again alike: resumes
    with pytest.raises(DataError, match=r"holds [\d,]+ bytes but the run was saved with [\d,]+: the data changed"):
        # (tarfile pads a tar to 10 KiB blocks: its size tells edits past them)
        stream(shard_set(tmp_path, shards=2, per=30)).load_state(state)


def test_the_codebook_views_are_the_model_views_resized_and_pixels_cross_as_they_lie(csv_dataset):
    # The codebook's view is the model's view resized again, one call per batch; pixels stay
    # channels-last from the workers' batches to the device, where the copy to floats transposes.
    import torch.nn.functional as F

    spec = dataclasses.replace(SPEC, codebook_image_size=16)
    src = csv_pairs(str(csv_dataset))

    def make(workers):
        return BatchStream("pairs", src, SampleMaker(spec, seed=0), batch_size=5, seed=1, num_workers=workers)
    plain, workers = make(0), make(2)
    for _ in range(3):
        x, y = plain.next_batch(), workers.next_batch()
        for b in (x, y):
            pixels = b.pixel_values
            assert pixels.is_contiguous(memory_format=torch.channels_last) and not pixels.is_contiguous()
            assert b.codebook_pixels.shape == (5, 3, 16, 16) and b.codebook_pixels.dtype == torch.uint8
        for f in dataclasses.fields(x):
            a, b = getattr(x, f.name), getattr(y, f.name)
            assert (torch.equal(a, b) if torch.is_tensor(a) else a == b), f.name
        for i in range(5):
            one = x.pixel_values[i:i + 1].contiguous(memory_format=torch.channels_last)
            alone = F.interpolate(one, size=(16, 16), mode="bicubic", antialias=True)
            assert torch.equal(alone, x.codebook_pixels[i:i + 1])
        moved, flat = x.to("cpu"), dataclasses.replace(x, pixel_values=x.pixel_values.contiguous(),
                                                      codebook_pixels=x.codebook_pixels.contiguous()).to("cpu")
        assert moved.pixel_values.is_contiguous() and moved.codebook_pixels.is_contiguous()
        assert torch.equal(moved.pixel_values, flat.pixel_values)
        assert torch.equal(moved.codebook_pixels, flat.codebook_pixels)


def test_a_codebook_view_larger_than_the_models_is_resized_from_the_crop_not_upscaled(tmp_path):
    # Patches under 8 px: the codebook reads more pixels than the model; its view comes from the
    # crop itself, at the pixels `flava prepare` tokenises, not from the model's smaller view.
    from flava.data.transforms import crop_resize, random_resized_crop_box

    rng = np.random.default_rng(3)
    path = tmp_path / "a.png"
    Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(path)
    spec = dataclasses.replace(SPEC, codebook_image_size=64)
    maker = SampleMaker(spec, seed=5)
    samples = [maker("images", path, (0, k)) for k in range(3)]
    for k, sample in enumerate(samples):
        draw = np.random.default_rng([5, 0, k])
        left, top, w, h = random_resized_crop_box(90, 70, draw, spec.crop_scale)
        model, codebook = crop_resize(np.array(Image.open(path)), (left, top, left + w, top + h), 32, 64)
        assert torch.equal(sample["pixel_values"], model) and torch.equal(sample["codebook_pixels"], codebook)
    batch = maker.collate("images", samples)
    assert batch.codebook_pixels.shape == (3, 3, 64, 64)
    assert torch.equal(batch.codebook_pixels, torch.stack([s["codebook_pixels"] for s in samples]))
    assert batch.codebook_pixels.is_contiguous(memory_format=torch.channels_last)


def shard_set(tmp_path, shards=4, per=5):
    for k in range(shards):
        with tarfile.open(tmp_path / f"s{k}.tar", "w") as tar:
            for i in range(per):
                add(tar, f"k{k}_{i}.png", png_bytes(10 * k + i, size=12))
                add(tar, f"k{k}_{i}.txt", f"shard {k} sample {i}".encode())
    return tar_pairs(str(tmp_path) + "/s{0..%d}.tar" % (shards - 1))


def test_the_global_batch_is_the_same_on_any_number_of_processes(tmp_path):
    src = shard_set(tmp_path)
    assert len(src.shards) == 4 and choose_lanes(4, 4) == 4 and choose_lanes(6, 4) == 3
    one = stream(src, batch_size=4, lanes=4)
    two = [stream(src, batch_size=2, rank=r, world=2, lanes=4) for r in range(2)]
    assert Layout(4, 4, 1, 2).slots == range(2, 4) and {two[1].layout.lane(s) for s in two[1].layout.slots} == {2, 3}
    seen = []
    for _ in range(10):  # two epochs of 20 samples
        whole, parts = one.next_batch(), [t.next_batch() for t in two]
        assert torch.equal(whole.input_ids, pad_to(torch.cat([pad_to(p.input_ids, whole.input_ids.shape[1])
                                                              for p in parts]), whole.input_ids.shape[1]))
        assert torch.equal(whole.pixel_values, torch.cat([p.pixel_values for p in parts]))
        assert torch.equal(whole.patch_mask, torch.cat([p.patch_mask for p in parts]))
        seen += [tuple(row.tolist()) for row in whole.input_ids]
    assert len(set(seen[:20])) == 20 and len(set(seen[20:])) == 20  # each epoch: every sample once
    # Two processes' saved states continue on one process, and one process's on two.
    more = [one.next_batch() for _ in range(3)]
    again = stream(src, batch_size=4, lanes=4)
    saved = [t.state() for t in two]
    again.load_states(saved)
    assert again.draws == 10
    for want in more:
        assert torch.equal(again.next_batch().pixel_values, want.pixel_values)
    split = [stream(src, batch_size=2, rank=r, world=2, lanes=4) for r in range(2)]
    for t in split:
        t.load_states([again.state()])
    want = one.next_batch()
    assert torch.equal(torch.cat([t.next_batch().pixel_values for t in split]), want.pixel_values)
    # The same data.batch_size on 2 processes: the run keeps its global batch of 4, 2 per process, says so.
    elastic = [stream(src, batch_size=4, rank=r, world=2, lanes=4) for r in range(2)]
    for t in elastic:
        t.load_states([one.state()])
        assert t.batch_size == 2 and t.layout.global_batch == 4 and "global batch of 4: 2 per process" in t.notes[0]
    want = one.next_batch()
    assert torch.equal(torch.cat([t.next_batch().pixel_values for t in elastic]), want.pixel_values)
    with pytest.raises(DataError, match="global batch of 4 samples, which 3 processes cannot share evenly"):
        stream(src, batch_size=4, rank=0, world=3, lanes=4).load_states([one.state()])
    changed = stream(src, batch_size=2, lanes=2)  # a batch size changed on purpose: a new pass, said so
    changed.load_states([one.state()])
    assert changed.draws == 0 and "starts a new pass" in changed.notes[0] and len(changed.next_batch()) == 2


def pad_to(t, width):
    return torch.nn.functional.pad(t, (0, width - t.shape[1]))


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards(tmp_path):
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for i in range(5):
            add(tar, f"s{i}.png", png_bytes(i))
            add(tar, f"s{i}.txt", f"caption {i}".encode())
        add(tar, "j.png", png_bytes(9))
        add(tar, "j.json", json.dumps({"caption": "from json"}).encode())
        add(tar, "lonely.png", png_bytes(10))  # no caption: not a sample
        add(tar, "broken.png", b"not a png")
        add(tar, "broken.txt", b"a caption for a broken image")
    full = (tmp_path / "shard-000.tar").read_bytes()
    (tmp_path / "shard-001.tar").write_bytes(full[: len(full) // 2])  # cut mid-shard
    src = tar_pairs(str(tmp_path / "shard-*.tar"))
    assert src.rejected["incomplete tar sample"] >= 1 and src.rejected["truncated tar shard"] == 1
    s = stream(src, batch_size=3, lanes=1)
    for _ in range(4):
        assert len(s.next_batch()) == 3
    assert s.skipped["unreadable image"] >= 1
    # What indexing rejected is reported per shard as the stream reaches it.
    assert {"incomplete tar sample", "truncated tar shard"} <= {r for c in s.rejected.values() for r in c}
    # Shards of images alone read as pairs: the refusal says they are image data.
    with tarfile.open(tmp_path / "images-000.tar", "w") as tar:
        add(tar, "a.png", png_bytes(1))
    with pytest.raises(DataError, match=r"\(met: 1 incomplete tar sample; e\.g\. \S+\); a shard of images without "
                                        r"captions is image data$"):
        stream(tar_pairs(str(tmp_path / "images-000.tar")), batch_size=1, lanes=1).next_batch()


def test_image_folders_and_text_files(tmp_path):
    for cls in ("cats", "dogs"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "img" / cls / f"{i}.png").write_bytes(png_bytes(i))
    src = image_folder(str(tmp_path / "img"))
    assert src.classes == ["cats", "dogs"] and sorted(r.label for r in src.records) == [0, 0, 0, 1, 1, 1]
    batch = stream(src, kind="images").next_batch()
    assert isinstance(batch, ImageBatch) and batch.pixel_values.shape == (4, 3, 32, 32)

    (tmp_path / "a.txt").write_text("first text\n\nsecond text\n")
    (tmp_path / "b.jsonl").write_text('{"text": "third"}\nnot json\n{"text": "fourth"}\n')
    txt = text_file(str(tmp_path / "*.*"))
    assert sorted(txt.records) == ["first text", "fourth", "second text", "third"]
    assert txt.rejected == {"unreadable json line": 1}
    tb = stream(txt, kind="text", batch_size=2).next_batch()
    assert isinstance(tb, TextBatch) and tb.masked_input_ids.shape[0] == 2
    with pytest.raises(DataError, match="nothing does not exist"):
        text_file(str(tmp_path / "nothing"))
    (tmp_path / "notes.md").write_text("not a text corpus\n")
    with pytest.raises(DataError, match="no .txt or .jsonl"):
        text_file(str(tmp_path / "notes.md"))
    # A text corpus given as images or pairs was read as a tar shard and called damaged.
    with pytest.raises(DataError, match=r"a.txt is text, not images: .* text is for pretraining's data.text \(or embed's --texts\)"):
        open_source("images", str(tmp_path / "a.txt"))
    with pytest.raises(DataError, match=r"a.txt is text, not pairs"):
        open_source("pairs", str(tmp_path / "a.txt"))
    # ... and images or shards given as the other kinds ("no tar shards match" a folder of images).
    from PIL import Image

    (tmp_path / "photos" / "cats").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "cats" / "0.png")
    with tarfile.open(tmp_path / "shard.tar", "w"):
        pass
    for kind, spec, said in (("pairs", "photos", "holds images without captions, which are image data (--images; "
                                                 "data.images in a training config)"),
                             ("pairs", "photos/*/*.png", "holds images without captions"),
                             ("text", "photos", "holds images or shards, not text (give them as data.images or "
                                                "data.pairs)"),
                             ("text", "shard.tar", "holds images or shards, not text")):
        with pytest.raises(DataError, match=re.escape(f"{tmp_path / spec} {said}")):
            open_source(kind, str(tmp_path / spec))


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zst"])
def test_a_compressed_text_file_cut_short_keeps_its_lines_before_the_cut(tmp_path, suffix):
    import bz2
    import functools
    import gzip
    import lzma

    import zstandard

    # xz's cheapest preset: its default spends 1 ms setting up each of the many members below.
    xz = functools.partial(lzma.compress, preset=0)
    compress = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": xz, ".zst": zstandard.compress}[suffix]
    lines = [f"text number {i} of a corpus" for i in range(100_000)]
    whole = compress("\n".join(lines).encode() + b"\n")
    # Files joined by cat (gzip members, zstd frames) read as one.
    (tmp_path / f"whole.txt{suffix}").write_bytes(whole + compress(b"one more\n"))
    src = text_file(str(tmp_path / f"whole.txt{suffix}"))
    assert src.records == [*lines, "one more"] and not src.rejected
    # A download cut short kept nothing: the file readers raise at the cut, and zstd's gave the cut
    # line as a text.
    (tmp_path / f"cut.txt{suffix}").write_bytes(whole[: len(whole) * 3 // 4])
    src = text_file(str(tmp_path / f"cut.txt{suffix}"))
    assert src.rejected == {"truncated compressed text": 1}
    assert len(src.records) > len(lines) // 2 and src.records == lines[: len(src.records)]
    # Thousands of members, as pbzip2 and bgzip write them.
    (tmp_path / f"many.txt{suffix}").write_bytes(b"".join(compress(f"{line}\n".encode()) for line in lines[:3000]))
    assert text_file(str(tmp_path / f"many.txt{suffix}")).records == lines[:3000]
    # After the last member: zeros are padding; other bytes are counted, and the text before them is whole.
    tail = compress(b"last line without a newline")
    (tmp_path / f"padded.txt{suffix}").write_bytes(tail + bytes(64))
    src = text_file(str(tmp_path / f"padded.txt{suffix}"))
    assert src.records == ["last line without a newline"] and not src.rejected
    (tmp_path / f"trailing.txt{suffix}").write_bytes(tail + b"not compressed at all")
    src = text_file(str(tmp_path / f"trailing.txt{suffix}"))
    assert src.records == ["last line without a newline"] and src.rejected == {"bytes after compressed text": 1}


def test_image_files_and_globs_are_one_source_of_every_image_they_name(tmp_path):
    from flava.data.registry import open_stream

    for c in ("red", "blue"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "imgs" / c / f"{i}.png").write_bytes(png_bytes(10 * len(c) + i, size=12))
    maker = SampleMaker(SPEC, seed=0)
    # A glob was read as a folder's name (a traceback); files listed were a source each, drawing whole
    # batches of one image.
    globbed = open_stream("images", [str(tmp_path / "imgs" / "*" / "*.png")], maker, 6, seed=0)
    listed = open_stream("images", [str(p) for p in sorted((tmp_path / "imgs").rglob("*.png"))], maker, 6, seed=0)
    for ks in (globbed, listed):
        assert len(ks.streams) == 1 and ks.streams[0].source.known_size == 6
        pixels = ks.next_batch().pixel_values
        assert len({bytes(p.numpy()) for p in pixels}) == 6  # six images, not one six times
    with pytest.raises(DataError, match=r"p.csv is a table: .* is pair data \(--pairs; data.pairs in a training config\)"):
        open_source("images", str(tmp_path / "p.csv"))
    # A source named twice is refused, not drawn twice as often; under two names (a path through
    # another folder, a link), both are said (the message had named the second twice).
    with pytest.raises(DataError, match=r"data.images names .*red twice; give each source once"):
        open_stream("images", [str(tmp_path / "imgs" / "red"), str(tmp_path / "imgs" / "red")], maker, 6, seed=0)
    (tmp_path / "link").symlink_to(tmp_path / "imgs" / "red")
    for other in (tmp_path / "imgs" / "blue" / ".." / "red", tmp_path / "link"):
        with pytest.raises(DataError, match=rf"data.images names \S*imgs/red and {re.escape(str(other))}, one source "
                                            rf"\(both are \S*imgs/red\); give each source once"):
            open_stream("images", [str(tmp_path / "imgs" / "red"), str(other)], maker, 6, seed=0)


def test_a_source_with_no_usable_sample_is_an_error(tmp_path):
    (tmp_path / "p.csv").write_text("image,caption\n" + "".join(f"missing{i}.png,x\n" for i in range(3)))
    s = stream(csv_pairs(str(tmp_path / "p.csv")), batch_size=2)
    with pytest.raises(DataError, match="no usable sample"):
        s.next_batch()


def test_demo_sources():
    import easy_vqa

    from flava.data.demo import bbc_news_text, demo_image_source, easy_vqa_captions, easy_vqa_pairs

    captions = easy_vqa_captions("train")
    questions, answers, ids = easy_vqa.get_train_questions()
    named = {"circle", "rectangle", "triangle", "red", "green", "blue", "black", "gray", "teal", "yellow", "brown"}
    checked = 0
    for q, a, i in zip(questions, answers, ids):
        if i in captions and a in named:  # every open answer agrees with the made caption
            assert a in captions[i].split(), (q, a, captions[i])
            checked += 1
    assert checked > 9000 and len(easy_vqa_pairs("train")) > 3000 and len(easy_vqa_pairs("test")) > 800
    assert len(demo_image_source()) > 3500  # 4,000 training images less the 400 held out, + photographs
    text = bbc_news_text()
    assert len(text) > 5000 and min(len(t) for t in text.records) >= 40


def test_loader_workers_by_default_share_the_cores_of_a_gpu_host_by_the_kinds_steps(train_data, tmp_path,
                                                                                      monkeypatch):
    # One worker a kind had been the default everywhere: on a 16-core GPU host the step waited for
    # the pairs' one worker.
    from flava.data import pipeline
    from flava.train.trainer import Trainer
    from conftest import tiny_run

    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(pipeline, "_cpu_quota", lambda: None)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    shares = {"pairs": 0.7, "images": 0.15, "text": 0.15}
    assert pipeline.auto_workers(shares) == {"pairs": 8, "images": 2, "text": 2}  # 15 spare cores, 8 at most
    assert pipeline.auto_workers({"images": 1.0}) == {"images": 8}
    monkeypatch.setattr(pipeline, "_cpu_quota", lambda: 3.5)  # a container's quota: 4 cores' worth at most
    assert pipeline.usable_cores() == 4 and pipeline.auto_workers(shares) == {"pairs": 2, "images": 1, "text": 1}
    monkeypatch.setattr(pipeline, "_cpu_quota", lambda: None)
    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: set(range(96)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # eight GPUs' processes share the host's cores
    assert pipeline.auto_workers(shares) == {"pairs": 7, "images": 1, "text": 1}
    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert pipeline.auto_workers(shares) == {"pairs": 1, "images": 1, "text": 1}  # never none
    # On the CPU the step needs the cores: one a kind, as before, unless set.
    cfg = tiny_run(train_data, "pairs.csv")
    cfg.data.num_workers = None
    trainer = Trainer(cfg, tmp_path / "run")
    assert {k: s.streams[0].num_workers for k, s in trainer.streams.items()} == {k: 1 for k in trainer.kinds}
    assert not [n for n in trainer.notes if "loader workers" in n]
    cfg.data.num_workers = 0
    assert all(s.streams[0].num_workers == 0 for s in Trainer(cfg, tmp_path / "run0").streams.values())
    # A kind's workers are shared by its sources by weight, one at least: not each source the kind's.
    from flava.data.registry import open_stream
    from flava.train.config import SourceSpec

    specs = [SourceSpec(str(train_data / "pairs.csv"), 0.3), SourceSpec(str(train_data / "pairs_clean.csv"), 0.7)]
    kind = open_stream("pairs", specs, trainer.stage.sample_maker(), 4, seed=0, kind_workers=8)
    assert [s.num_workers for s in kind.streams] == [2, 5]
    kind = open_stream("pairs", specs, trainer.stage.sample_maker(), 4, seed=0, num_workers=3)
    assert [s.num_workers for s in kind.streams] == [3, 3]


def test_multicrop_batches_are_the_same_with_workers(tmp_path):
    from flava.data.multicrop import MultiCropSpec
    from flava.data.samples import MultiCropMaker
    from flava.data.tars import tar_source

    shard_set(tmp_path)
    src = tar_source("images", str(tmp_path) + "/s{0..3}.tar")
    maker = MultiCropMaker(MultiCropSpec(global_size=16, local_size=8, local_crops=2), seed=0)
    # One lane: the workers share its slots, so their crop-major parts must be re-joined image by image.
    plain, workers = (BatchStream("images", src, maker, batch_size=3, seed=1, lanes=1, num_workers=n) for n in (0, 2))
    for _ in range(3):
        x, y = plain.next_batch(), workers.next_batch()
        assert x.global_crops.shape == (6, 3, 16, 16) and x.local_crops.shape == (6, 3, 8, 8)
        assert torch.equal(x.global_crops, y.global_crops) and torch.equal(x.local_crops, y.local_crops)
    # Crops left for the device to colour (a GPU run's): uint8 and their colour rows, joined as the
    # crops are; coloured on their way, the crops the workers finish.
    spec = maker.spec
    raw = MultiCropMaker(spec, seed=0, colour_on_device=True)
    later = BatchStream("images", src, raw, batch_size=3, seed=1, lanes=1, num_workers=2)
    plain = BatchStream("images", src, maker, batch_size=3, seed=1, lanes=1, num_workers=0)
    for _ in range(2):
        x, y = plain.next_batch(), later.next_batch()
        assert y.global_crops.dtype == torch.uint8 and y.global_colour.shape == y.local_colour.shape == (6, 12)
        done = y.to("cpu", mean=spec.mean, std=spec.std)
        assert torch.allclose(done.global_crops, x.global_crops, atol=1e-5)
        assert torch.allclose(done.local_crops, x.local_crops, atol=1e-5)


def test_workers_fill_runs_of_slots_and_hand_their_parts_over_in_one_buffer():
    # Parts taken in turn join in slot order: dealt in turn, the slots of two workers interleaved
    # and every batch was gathered again in the training process (a uint8 gather: 8.6 ms at 64).
    from flava.data.batch import PairBatch
    from flava.data.multicrop import MultiCropBatch
    from flava.data.pipeline import Layout, Packed

    for batch, lanes, world, workers in [(64, 8, 1, 2), (64, 8, 1, 3), (64, 64, 2, 5), (6, 1, 1, 4), (8, 2, 2, 3)]:
        for rank in range(world):
            layout = Layout(batch, lanes, rank, world)
            owner = layout.owners(workers)
            order = [owner[s] for s in layout.slots]
            assert order == sorted(order) and set(order) <= set(range(workers)), (batch, lanes, world, workers)
            if len({layout.lane(s) for s in layout.slots}) >= workers:  # whole lanes: a shard read by one worker
                assert all(len({owner[s] for s in layout.slots if layout.lane(s) == j}) == 1
                           for j in {layout.lane(s) for s in layout.slots})
    # Balanced by slots where a process holds only part of a lane (20 slots: lanes of 8, 8 and 4).
    for layout, most in ((Layout(160, 20, 0, 8), 12), (Layout(136, 17, 0, 8), 9), (Layout(64, 8), 24)):
        load = np.bincount(list(layout.owners(2 if most != 24 else 3).values()))
        assert load.max() <= most, (layout, load)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, generator=g)
    part = PairBatch(pixels, torch.randint(0, 999, (3, 5), generator=g), torch.ones(3, 5, dtype=torch.int64),
                     torch.rand(3, 4, generator=g) < 0.5, torch.randint(0, 999, (3, 5), generator=g),
                     torch.full((3, 5), -100), codebook_pixels=pixels)
    for pixels_as in (pixels, pixels.contiguous(memory_format=torch.channels_last)):
        lying = dataclasses.replace(part, pixel_values=pixels_as, codebook_pixels=pixels_as)
        back = Packed.of(lying).unpacked()
        for f in dataclasses.fields(part):
            a, b = getattr(lying, f.name), getattr(back, f.name)
            assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), f.name
            assert a is None or a.stride() == b.stride(), f.name  # channels-last crosses as it lies
        assert back.codebook_pixels is back.pixel_values  # one copy still
    crops = MultiCropBatch(torch.randn(4, 3, 8, 8, generator=g), None)
    again = Packed.of(crops).unpacked()
    assert torch.equal(again.global_crops, crops.global_crops) and again.local_crops is None
    assert Packed.of(None) is None
    # Parts that arrive out of slot order are still joined in it.
    from flava.data.samples import merge_batches

    pad = {"input_ids": 0, "masked_input_ids": 0, "attention_mask": 0, "mlm_labels": -100}
    slots = [[1], [0, 2]]
    parts = []
    for rows in slots:
        fields = {f.name: getattr(part, f.name)[rows] for f in dataclasses.fields(part)
                  if isinstance(getattr(part, f.name), torch.Tensor)}
        parts.append((rows, dataclasses.replace(part, **{**fields, "codebook_pixels": fields["pixel_values"]})))
    joined = merge_batches(parts, pad)
    assert torch.equal(joined.pixel_values, part.pixel_values) and torch.equal(joined.input_ids, part.input_ids)
    assert joined.codebook_pixels is joined.pixel_values
    lying = [(rows, dataclasses.replace(p, pixel_values=p.pixel_values.contiguous(memory_format=torch.channels_last)))
             for rows, p in parts]
    joined = merge_batches(lying, pad)
    assert torch.equal(joined.pixel_values, part.pixel_values)
    assert joined.pixel_values.is_contiguous(memory_format=torch.channels_last)
    from flava.data.multicrop import MultiCropSpec
    from flava.data.samples import MultiCropMaker

    whole = MultiCropBatch(torch.arange(10.0).view(10, 1, 1, 1), torch.arange(5.0).view(5, 1, 1, 1))  # 5 images
    rows = {"global": lambda s: [c * 5 + i for c in range(2) for i in s], "local": lambda s: list(s)}
    pieces = [(s, MultiCropBatch(whole.global_crops[rows["global"](s)], whole.local_crops[rows["local"](s)]))
              for s in ([1, 3], [0, 2, 4])]
    back = MultiCropMaker(MultiCropSpec(8, 4, local_crops=1), 0).merge(pieces)
    assert torch.equal(back.global_crops, whole.global_crops) and torch.equal(back.local_crops, whole.local_crops)


def test_large_jpegs_are_decoded_at_a_reduced_scale_with_the_same_crop(tmp_path):
    from flava.data.decode import open_image
    from flava.data.transforms import crop_resize

    y, x = np.mgrid[0:768, 0:1024]
    arr = np.stack([np.sin(x / 37.0), np.cos(y / 23.0), np.sin((x + y) / 51.0)], -1) * 100 + 128
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, "JPEG", quality=95)
    (tmp_path / "big.jpg").write_bytes(buf.getvalue())
    full = open_image(tmp_path / "big.jpg")
    asked = []
    small = open_image(tmp_path / "big.jpg", draft=lambda w, h: asked.append((w, h)) or (w // 3, h // 3))
    assert asked == [(1024, 768)] and small.size == (512, 384)  # the largest DCT scale that still covers
    box = (100, 50, 900, 700)
    (want,) = crop_resize(full, box, 64)
    want = want.float()
    got = crop_resize(small, tuple(v / 2 for v in box), 64)[0].float()
    assert want.dtype == torch.float32 and got.shape == (3, 64, 64)
    assert (want - got).abs().mean() < 2.0  # the same picture, within JPEG's own error


def test_jpegs_are_decoded_only_at_the_dct_scales_faster_than_the_whole():
    # libjpeg-turbo decodes 1/8, 1/4 and 1/2 with its SIMD kernels; 3/8 costs more than 1/2, and
    # 5/8-7/8 more than the whole image (7/8 about twice). A crop of 90-100 % of a 256-px photograph,
    # resized to 224, had been decoded at 7/8 whenever the box was the image's whole width.
    import skimage.data

    from flava.data.decode import decode_crop, decode_rgb
    from flava.data.members import Blob
    from flava.data.transforms import crop_resize

    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).resize((256, 256), Image.BICUBIC).save(buf, "JPEG", quality=90)
    data = Blob(buf.getvalue())
    whole = decode_rgb(data)
    for least, side in (((224, 224), 256), ((200, 100), 256), ((96, 96), 128), ((128, 128), 128), ((64, 40), 64),
                        ((33, 33), 64), ((32, 32), 32), ((1, 1), 32)):
        assert decode_rgb(data, draft=lambda w, h: least).shape == (side, side, 3), least
    box = (0.0, 10.0, 256.0, 240.0)
    (got,) = decode_crop(data, lambda w, h: box, 224)
    assert torch.equal(got, crop_resize(whole, box, 224)[0])  # the very pixels of the whole decode


def test_crops_of_one_image_share_each_dct_scales_decode():
    # flava prepare tokenises 4 boxes an image, each as training decodes it: boxes needing one DCT
    # scale share its decode (`memo`), the very pixels of decoding each alone.
    import simplejpeg
    import skimage.data

    from flava.data.decode import decode_crop
    from flava.data.members import Blob

    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).resize((320, 256), Image.BICUBIC).save(buf, "JPEG", quality=90)
    data = Blob(buf.getvalue())
    boxes = [(0.0, 0.0, 300.0, 250.0), (10.0, 5.0, 310.0, 240.0), (0.0, 0.0, 100.0, 80.0), (50.0, 40.0, 130.0, 120.0)]
    calls = []
    real = simplejpeg.decode_jpeg
    try:
        simplejpeg.decode_jpeg = lambda *a, **k: calls.append(k) or real(*a, **k)
        alone = [decode_crop(data, lambda w, h, b=b: b, 64, 16) for b in boxes]
        assert len(calls) == 4
        calls.clear()
        memo: dict = {}
        shared = [decode_crop(data, lambda w, h, b=b: b, 64, 16, memo=memo) for b in boxes]
    finally:
        simplejpeg.decode_jpeg = real
    assert [(k["min_width"], k["min_height"]) for k in calls] == [(160, 128), (320, 256)]  # 1/2, then whole
    assert all(torch.equal(a, b) for x, y in zip(alone, shared) for a, b in zip(x, y))


def test_crop_resize_is_pils_bicubic():
    import skimage.data

    from flava.data.transforms import crop_resize

    im = Image.fromarray(skimage.data.astronaut())
    for box, size in [((10, 20, 400, 410), 224), ((0, 0, 512, 512), 56), ((100, 100, 300, 260), 224)]:
        want = np.asarray(im.resize((size, size), Image.BICUBIC, box=box)).astype(float)
        got = crop_resize(im, box, size)[0].permute(1, 2, 0).numpy().astype(float)
        assert np.abs(want - got).mean() < 0.1, box  # rounding differences in a few pixels


def test_crop_resize_gives_the_pixels_of_torchs_kernel_on_the_crop_as_it_lies():
    # The crop is copied to channels-last for the vectorised kernel: the pixels must be those the
    # generic kernel gives on the crop's view of the image, which batches were made of before.
    import skimage.data
    import torch.nn.functional as F

    from flava.data.transforms import crop_resize

    arr = np.ascontiguousarray(skimage.data.astronaut()[3:, 5:])  # odd sizes: no aligned rows
    rng = np.random.default_rng(0)
    for _ in range(12):
        left, top = (int(v) for v in rng.integers(0, 200, 2))
        right, bottom = left + int(rng.integers(40, 300)), top + int(rng.integers(40, 300))
        view = torch.from_numpy(arr[top:bottom, left:right]).permute(2, 0, 1)[None]
        assert not view.is_contiguous(memory_format=torch.channels_last)
        for size, got in zip((224, 56), crop_resize(arr, (left, top, right, bottom), 224, 56)):
            assert torch.equal(got, F.interpolate(view, size=(size, size), mode="bicubic", antialias=True)[0])


def test_a_jpeg_only_pil_reads_is_cut_where_the_crop_was_chosen_once(tmp_path):
    # Junk before a marker: libjpeg-turbo (strict) refuses it, PIL decodes it. The crop is chosen
    # once; choosing again would draw another box (and another prepared crop's targets).
    import skimage.data

    from flava.data.decode import decode_crop

    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    at = data.index(b"\xff\xdb")  # the first quantisation table
    (tmp_path / "junk.jpg").write_bytes(data[:at] + b"\x12\x34\x56" + data[at:])
    rng, calls = np.random.default_rng(0), []

    def choose(width, height):
        calls.append((width, height))
        left, top = (int(v) for v in rng.integers(0, 200, 2))
        return left, top, left + 300, top + 300

    got = decode_crop(tmp_path / "junk.jpg", choose, 64)[0]
    assert calls == [(512, 512)]
    # The same box of the same picture decoded by libjpeg-turbo from the intact file.
    (tmp_path / "intact.jpg").write_bytes(data)
    rng = np.random.default_rng(0)
    assert torch.equal(got, decode_crop(tmp_path / "intact.jpg", choose, 64)[0])


def test_jpegs_decode_to_pils_pixels_and_others_through_pil(tmp_path):
    import skimage.data

    from flava.data.decode import decode_rgb, open_image
    from flava.data.members import BadSample

    photo = Image.fromarray(skimage.data.astronaut())
    for name, image in (("rgb.jpg", photo), ("grey.jpg", photo.convert("L")), ("cmyk.jpg", photo.convert("CMYK")),
                        ("photo.png", photo)):
        image.save(tmp_path / name)
        got = decode_rgb(tmp_path / name)
        assert got.shape == (512, 512, 3) and got.dtype == np.uint8 and got.flags.writeable
        assert np.array_equal(got, np.asarray(open_image(tmp_path / name))), name
    # A reduced decode covers what was asked for, at a smaller size.
    small = decode_rgb(tmp_path / "rgb.jpg", draft=lambda w, h: (w // 3, h // 3))
    assert 512 // 3 <= small.shape[1] < 512 and 512 // 3 <= small.shape[0] < 512
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "rgb.jpg").read_bytes()[:3000])
    with pytest.raises(BadSample, match="unreadable image"):
        decode_rgb(tmp_path / "cut.jpg")


@pytest.mark.parametrize("kind", ["pairs", "images", "text"])
def test_an_empty_source_is_refused_not_read_as_the_working_folder(kind, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "0.tar").write_bytes(b"")  # what "" would have named: the folder it runs in
    with pytest.raises(DataError, match=f"an empty {kind} source names nothing"):
        open_source(kind, " ")


def _sideways(image: Image.Image, orientation: int, fmt: str = "JPEG") -> bytes:
    """`image` saved with EXIF `orientation` (as a phone stores a photograph taken turned)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def test_a_photograph_stored_sideways_is_read_upright_as_its_exif_orientation_says(tmp_path):
    # Every orientation, by libjpeg-turbo (RGB JPEGs) and by PIL (CMYK JPEGs, PNGs), full and at a
    # reduced DCT scale: the pixels of PIL's exif_transpose, sizes and crop boxes the upright image's.
    from PIL import ImageOps

    from flava.data.decode import decode_crop, decode_rgb, jpeg_orientation, open_image
    from flava.data.transforms import crop_resize

    y, x = np.mgrid[0:96, 0:160]
    stored = Image.fromarray(np.stack([x * 1.5, y * 2.5, x + y], -1).astype(np.uint8))  # 160 wide, 96 high
    for orientation in range(1, 9):
        for mode, fmt in (("RGB", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG")):
            path = tmp_path / f"o{orientation}{mode}.{fmt.lower()}"
            path.write_bytes(_sideways(stored.convert(mode), orientation, fmt))
            if fmt == "JPEG":
                assert jpeg_orientation(path.read_bytes()) == orientation
            with Image.open(path) as im:
                want = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
            assert want.shape[:2] == ((96, 160) if orientation < 5 else (160, 96))
            where = (orientation, mode, fmt)
            assert np.array_equal(decode_rgb(path), want), where
            assert np.array_equal(np.asarray(open_image(path)), want), where
            asked = []
            half = decode_rgb(path, draft=lambda w, h: asked.append((w, h)) or (w // 2, 1))
            assert asked == [want.shape[1::-1]], where  # the draft sizes the upright image
            if fmt == "JPEG":  # 1/2 scale each way: the width asked for decides it
                assert half.shape[:2] == (want.shape[0] // 2, want.shape[1] // 2), where
            box = (10.0, 20.0, 70.0, 90.0)  # in the upright image's pixels; 64 px: a whole decode
            assert torch.equal(decode_crop(path, lambda w, h: box, 64)[0], crop_resize(want.copy(), box, 64)[0]), where
    assert jpeg_orientation(_sideways(stored, 1)) == 1
    # An image a pixel wide, flipped: its upright copy has no negative stride for torch to refuse.
    for size, orientation in (((1, 1), 2), ((8, 8), 2), ((1, 5), 4), ((5, 1), 7)):
        path = tmp_path / f"thin{size}{orientation}.jpg"
        path.write_bytes(_sideways(Image.new("RGB", size, (200, 30, 90)), orientation))
        crop = decode_crop(path, lambda w, h: (0.0, 0.0, float(w), float(h)), 2)[0]
        assert crop.shape == (3, 2, 2) and abs(int(crop[0, 0, 0]) - 200) < 8, (size, orientation)
        assert decode_crop(path, lambda w, h: (0.0, 0.0, w / 8, h / 8), 1)[0].shape == (3, 1, 1)
    plain = io.BytesIO()
    stored.save(plain, "JPEG")
    assert jpeg_orientation(plain.getvalue()) == 1
    # A damaged EXIF segment is read as no orientation, not a failed image, by libjpeg-turbo's path
    # and PIL's (CMYK) alike, without Pillow's warnings about it.
    import warnings

    for mode in ("RGB", "CMYK"):
        for junk in (b"XXXX", b"II*\x00\x08\x00\x00\x00\xff\xff"):
            broken = bytearray(_sideways(stored.convert(mode), 6))
            at = broken.index(b"Exif\x00\x00") + 6
            broken[at:at + len(junk)] = junk
            (tmp_path / "broken.jpg").write_bytes(bytes(broken))
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert jpeg_orientation(bytes(broken)) == 1
                assert decode_rgb(tmp_path / "broken.jpg").shape == (96, 160, 3), (mode, junk)


def test_inference_and_prepare_see_a_sideways_photograph_upright_and_an_image_in_memory_as_given(tmp_path):
    import skimage.data
    from PIL import ImageOps

    import flava.data.prepare as prepare
    from flava.data.members import Blob
    from flava.data.processor import Processor

    upright = Image.fromarray(skimage.data.astronaut()).crop((0, 0, 512, 320))
    data = _sideways(upright.transpose(Image.Transpose.ROTATE_90), 6)  # stored turned, tagged to be turned back
    (tmp_path / "phone.jpg").write_bytes(data)
    processor = Processor(image_size=64)
    with Image.open(tmp_path / "phone.jpg") as im:
        shown = ImageOps.exif_transpose(im)
        assert shown.size == (512, 320)
        assert torch.equal(processor.image(tmp_path / "phone.jpg"), processor.image(shown))
        # An image in memory is used as it is: the caller holds its pixels (and may have turned them).
        assert processor.image(im).shape == processor.image(shown).shape
        assert not torch.equal(processor.image(im), processor.image(shown))
    # flava prepare writes it upright, without the tag: the same picture whoever reads it.
    out = prepare._resized(Blob(data, ".jpg"), 160)
    assert out.size == (256, 160)
    want = shown.resize((256, 160), Image.BICUBIC)
    assert np.abs(np.asarray(out, dtype=float) - np.asarray(want, dtype=float)).mean() < 1.0


def test_an_orientation_xmp_gives_is_taken_by_libjpeg_turbos_path_as_by_pils():
    # Pillow takes XMP's tiff:Orientation where EXIF has none; the two decoders must agree.
    from flava.data.decode import decode_rgb, jpeg_orientation, open_image
    from flava.data.members import Blob

    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    buf = io.BytesIO()
    Image.new("RGB", (40, 20), (200, 10, 10)).save(buf, "JPEG", xmp=xmp)
    data = buf.getvalue()
    assert jpeg_orientation(data) == 6
    assert decode_rgb(Blob(data)).shape == (40, 20, 3) and open_image(data).size == (20, 40)


def test_a_listing_says_the_column_it_chose_and_counts_rows_by_what_they_lack(tmp_path):
    # A parquet's `caption` was taken over its `txt` without a word; a JSONL row without a caption
    # was an "empty caption" and one without an image a "csv row"; a folder named as an image was
    # "does not exist" at the start and "unreadable image" at the end.
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flava.data.decode import decode
    from flava.data.members import BadSample
    from flava.data.registry import missing_files

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    pq.write_table(pa.table({"jpg": [png.getvalue()], "txt": ["a"], "caption": ["b"]}), tmp_path / "two.parquet")
    assert open_source("pairs", str(tmp_path / "two.parquet")).listing_notes == [
        "its captions are column 'caption' (also there: txt); to read another, name it: ?caption=COLUMN"]
    assert open_source("pairs", str(tmp_path / "two.parquet") + "?caption=txt").listing_notes == []
    (tmp_path / "a.png").write_bytes(png.getvalue())
    (tmp_path / "t.jsonl").write_text('{"image": "a.png", "caption": "ok"}\n{"image": "a.png"}\n{"caption": "x"}\n'
                                      '{"image": ".", "caption": "a folder"}\n')
    source = csv_pairs(str(tmp_path / "t.jsonl"))
    assert source.listing_rejected == {"table row without a caption": 1, "table row without an image": 1}
    assert missing_files(source) == (0, 2)
    with pytest.raises(BadSample, match="image path is a folder"):
        decode(tmp_path)
