"""Defects a tester met bringing their own data to pretraining: shards and parquet in sub-folders
left out, a folder named with brackets read as a glob, zstd shards called corrupt, remote parquet
said to match nothing, links that drew an image or a shard twice, a FIFO that hung the run."""

import io
import os
import tarfile
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from PIL import Image

from flava.data.decode import _image_bytes
from flava.data.members import BadSample
from flava.data.registry import check_disjoint, open_source
from flava.data.sources import bad_rows_said
from flava.errors import DataError


def jpeg(i: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (24, 24), (10 * i % 256, 40, 90)).save(out, "JPEG")
    return out.getvalue()


def tar_bytes(first: int, n: int = 3) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for i in range(first, first + n):
            for name, data in ((f"{i:05d}.jpg", jpeg(i)), (f"{i:05d}.txt", f"picture {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_shards_and_parquet_in_sub_folders_are_read(tmp_path):
    # The README says folders are searched through their sub-folders; shards and parquet were read
    # from the top only (2 of 3 shards trained on, unsaid; a dataset's data/train/ "matched nothing").
    (tmp_path / "wds" / "p1").mkdir(parents=True)
    (tmp_path / "wds" / "p2").mkdir()
    (tmp_path / "wds" / "00000.tar").write_bytes(tar_bytes(0))
    (tmp_path / "wds" / "p1" / "00000.tar").write_bytes(tar_bytes(10))
    (tmp_path / "wds" / "p2" / "00001.tar").write_bytes(tar_bytes(20))
    src = open_source("pairs", str(tmp_path / "wds"))
    assert len(src.shards) == 3 and len(src.records) == 9
    (tmp_path / "pq" / "data" / "train").mkdir(parents=True)
    table = pa.table({"jpg": [jpeg(i) for i in range(4)], "txt": [f"row {i}" for i in range(4)]})
    pq.write_table(table, tmp_path / "pq" / "data" / "train" / "part-0.parquet")
    pq.write_table(table, tmp_path / "pq" / "data" / "part-1.parquet")
    assert len(open_source("pairs", str(tmp_path / "pq")).records) == 8


def test_a_path_with_brackets_that_exists_is_a_name_not_a_glob(tmp_path):
    (tmp_path / "wds [v1]").mkdir()
    for k in range(2):
        (tmp_path / "wds [v1]" / f"0000{k}.tar").write_bytes(tar_bytes(10 * k))
    assert len(open_source("pairs", str(tmp_path / "wds [v1]")).shards) == 2
    assert len(open_source("pairs", str(tmp_path / "wds [v1]" / "00000.tar")).records) == 3
    (tmp_path / "plain").mkdir()
    for k in range(3):
        (tmp_path / "plain" / f"0000{k}.tar").write_bytes(tar_bytes(10 * k))
    assert len(open_source("pairs", str(tmp_path / "plain" / "0000[01].tar")).shards) == 2  # still a glob
    (tmp_path / "txt [v1]").mkdir()
    (tmp_path / "txt [v1]" / "t.txt").write_text("one\ntwo\n")
    assert len(open_source("text", str(tmp_path / "txt [v1]" / "t.txt")).records) == 2


def test_zstd_shards_are_read(tmp_path):
    # Read as a plain tar, a .tar.zst was "1 corrupt tar shard"; in a folder it was left out unsaid.
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "00000.tar").write_bytes(tar_bytes(0))
    (tmp_path / "z" / "00001.tar.zst").write_bytes(zstandard.ZstdCompressor().compress(tar_bytes(10)))
    alone = open_source("pairs", str(tmp_path / "z" / "00001.tar.zst"))
    assert len(alone.records) == 3 and not alone.rejected
    assert len(open_source("pairs", str(tmp_path / "z")).records) == 6


def test_remote_parquet_is_said_to_be_read_locally():
    with pytest.raises(DataError, match=r"parquet is read from local files; copy it here"):
        open_source("pairs", "http://127.0.0.1:9/pq_bytes.parquet")


def test_links_never_draw_an_image_or_a_shard_twice(tmp_path):
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    for i in range(4):
        (imgs / f"{i}.jpg").write_bytes(jpeg(i))
    os.symlink("0.jpg", imgs / "zz_link.jpg")  # beside its target
    os.symlink("../1.jpg", imgs / "sub" / "link2.jpg")
    os.symlink("../outside.jpg", imgs / "sub" / "out.jpg")  # the only name of a file outside: kept
    (tmp_path / "outside.jpg").write_bytes(jpeg(9))
    src = open_source("images", str(imgs))
    assert sorted(Path(r.image).name for r in src.records) == ["0.jpg", "1.jpg", "2.jpg", "3.jpg", "out.jpg"]
    assert src.rejected == {"image named twice (a link)": 2}
    assert bad_rows_said(src) == "2 of its 7 image files are left out: 2 image named twice (a link)"
    # A folder beside another holding a link to it; a shard named through a linked folder.
    (tmp_path / "more").mkdir()
    os.symlink("../imgs", tmp_path / "more" / "a")
    with pytest.raises(DataError, match="is named by both"):
        check_disjoint([open_source("images", str(tmp_path / s)) for s in ("imgs", "more")], "data.images")
    (tmp_path / "wds").mkdir()
    (tmp_path / "wds" / "00000.tar").write_bytes(tar_bytes(0))
    os.symlink("wds", tmp_path / "wds_link")
    with pytest.raises(DataError, match="the shard .* is named by both"):
        check_disjoint([open_source("pairs", str(tmp_path / "wds")),
                        open_source("pairs", str(tmp_path / "wds_link" / "00000.tar"))], "data.pairs")


def test_a_fifo_among_images_is_a_bad_sample_not_a_wait(tmp_path):
    fifo = tmp_path / "zz.jpg"
    os.mkfifo(fifo)
    said = []

    def read():
        try:
            _image_bytes(fifo)
        except BadSample as e:
            said.append(str(e))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    if reader.is_alive():  # the old read waited for a writer: give it one, so the thread ends
        with open(fifo, "wb"):
            pass
        reader.join(5)
        pytest.fail("reading a FIFO named as an image waited for a writer")
    assert said == ["not a regular file"]
