"""Data sources and the batch pipeline: bad records skipped and counted, exact resumption,
the same batches with and without loader workers, disjoint process shards."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from flava.data.batch import ImageBatch, PairBatch, TextBatch
from flava.data.pipeline import BatchStream, SampleMaker, SampleSpec, StreamOrder
from flava.data.sources import csv_pairs, image_folder, tar_pairs, text_file
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
        rows.append((f"{i}.png", f"a picture number {i}"))
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
    batches = [s.next_batch() for _ in range(6)]  # 24 samples: more than an epoch of 12 good ones
    assert all(isinstance(b, PairBatch) and len(b) == 4 for b in batches)
    b = batches[0]
    assert b.pixel_values.shape == (4, 3, 32, 32) and b.codebook_pixels.shape == (4, 3, 32, 32)
    assert b.patch_mask.shape == (4, 16) and b.patch_mask.sum(1).eq(6).all()
    assert b.input_ids[:, 0].eq(101).all() and (b.attention_mask.sum(1) <= 16).all()
    assert (b.codebook_pixels >= 0.1 - 1e-6).all() and (b.codebook_pixels <= 0.9 + 1e-6).all()
    # Two epochs of 17 records hold 24 good ones: every bad record was met once or twice.
    assert set(s.skipped) == {"missing image file", "empty image file", "unreadable image", "empty caption",
                              "over-long caption"}
    assert all(n in (1, 2) for n in s.skipped.values())
    assert sum(s.skipped.values()) == s.position - 24 and 17 < s.position <= 34


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


def test_loader_workers_do_not_change_the_batches(csv_dataset):
    src = csv_pairs(str(csv_dataset))
    plain, workers = stream(src), stream(src, num_workers=2)
    for _ in range(4):
        x, y = plain.next_batch(), workers.next_batch()
        assert torch.equal(x.pixel_values, y.pixel_values) and torch.equal(x.mlm_labels, y.mlm_labels)
    assert plain.position == workers.position and plain.skipped == workers.skipped


def test_processes_split_the_global_stream_in_batch_blocks():
    single = StreamOrder(10, seed=3, rank=0, world=1, block=4)
    ranks = [StreamOrder(10, seed=3, rank=r, world=2, block=2) for r in range(2)]
    stream = [single.at(p) for p in range(12)]
    # Batch b of each rank, concatenated in rank order, is batch b of the single process.
    for b in range(3):
        joined = [ranks[r].at(2 * b + i) for r in range(2) for i in range(2)]
        assert joined == stream[4 * b: 4 * b + 4]
    first_epoch = [ranks[r].at(p)[0] for r in range(2) for p in range(4)] + [ranks[0].at(4)[0], ranks[0].at(5)[0]]
    assert sorted(first_epoch) == list(range(10))  # one epoch: every record once, over both processes
    assert stream[10][1] == 1  # the eleventh entry starts the next epoch, in a new order
    with pytest.raises(DataError, match="cannot fill a batch"):
        StreamOrder(3, seed=0, rank=0, world=2, block=2)


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
    assert src.rejected["incomplete tar sample"] >= 1
    s = stream(src, batch_size=3)
    for _ in range(4):
        assert len(s.next_batch()) == 3
    assert s.skipped["unreadable image"] >= 1


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
    with pytest.raises(DataError, match="no .txt or .jsonl"):
        text_file(str(tmp_path / "nothing"))


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
    assert len(demo_image_source()) > 4000
    text = bbc_news_text()
    assert len(text) > 5000 and min(len(t) for t in text.records) >= 40
