"""Folders walked for images, text and parquet: what is read, what is passed over and what is said."""

import io
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flava.cli import main as cli
from flava.cli.predict import read_inputs
from flava.data.arrow import arrow_text
from flava.data.images import find_images
from flava.data.sources import image_folder
from flava.data.texts import text_file
from flava.errors import DataError
from flava.evaluate.readers.user_files import read_image_classification
from flava.retrieval.embed import image_inputs


def image_bytes(seed: int, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def put(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


def test_hidden_entries_and_macos_leftovers_are_passed_over_by_every_folder_walk(tmp_path):
    root = tmp_path / "photos"
    for i, cls in enumerate(("cats", "dogs")):
        put(root / cls / f"{i}.png", image_bytes(i))
        put(root / cls / f"{i + 2}.png", image_bytes(i + 2))
    copies = [put(root / ".ipynb_checkpoints" / "0-checkpoint.png", image_bytes(5)),
              put(root / ".cache" / "x.png", image_bytes(6)),
              put(root / "cats" / ".hidden.png", image_bytes(7)),
              put(root / "cats" / "._0.png", b"\0\5\26\7 AppleDouble"),
              put(root / "__MACOSX" / "cats" / "._0.png", b"\0\5\26\7 AppleDouble")]
    real = sorted(root.glob("[a-z]*/[0-9].png"))
    assert len(real) == 4 and find_images([root]) == real
    # Neither a class for training (sources), fine-tuning, evaluation nor embed's and classify's labels.
    src = image_folder(str(root))
    assert src.classes == ["cats", "dogs"] and [r.image for r in src.records] == real
    assert read_image_classification(root, root).label_names == ["cats", "dogs"]
    assert {row["label"] for row in image_inputs([str(root)]).metadata} == {"cats", "dogs"}
    # A glob's wildcards pass over dot-names already; __MACOSX is passed over there too.
    assert find_images([f"{root}/**/*.png"]) == real
    # A file named explicitly is read, hidden or not.
    assert find_images([copies[2]]) == [copies[2]]

    put(tmp_path / "texts" / "notes.txt", "one\ntwo\n")
    put(tmp_path / "texts" / ".ipynb_checkpoints" / "notes-checkpoint.txt", "one\ntwo\n")
    put(tmp_path / "texts" / "__MACOSX" / "._notes.txt", "\0\5\26\7")
    assert [s.url for s in text_file(str(tmp_path / "texts")).shards] == [str(tmp_path / "texts" / "notes.txt")]

    pq.write_table(pa.table({"text": ["a", "b"]}), put(tmp_path / "pq" / "data.parquet", b""))
    put(tmp_path / "pq" / "._data.parquet", b"\0\5\26\7 AppleDouble")  # read as parquet, it was a damaged file
    assert [s.file.path for s in arrow_text(str(tmp_path / "pq")).shards] == [str(tmp_path / "pq" / "data.parquet")]


def test_every_image_suffix_is_found_and_the_other_files_are_said(tiny_model, tmp_path, capsys):
    root = tmp_path / "photos"
    # JPEG's other names (Windows' browsers save .jfif), the PPM family, icons: each a class of its own
    kinds = (("a.jfif", "JPEG", "RGB"), ("b.jpe", "JPEG", "RGB"), ("c.jif", "JPEG", "RGB"), ("d.ppm", "PPM", "RGB"),
             ("e.pgm", "PPM", "L"), ("f.pbm", "PPM", "1"), ("g.ico", "ICO", "RGB"), ("h.png", "PNG", "RGB"))
    for i, (name, fmt, mode) in enumerate(kinds):
        put(root / ("jpeg" if fmt == "JPEG" else "other") / name, image_bytes(i, fmt, mode))
    put(root / "other" / "notes.txt", "a note")
    put(root / "jpeg" / "README", "no suffix")
    put(root / "jpeg" / "IMG_1.HEIC", b"\0\0\0\x18ftypheic")
    put(root / "other" / ".DS_Store", b"\0\0\0\1Bud1")  # passed over as every dot-name is, not said
    found = find_images([root])
    assert [f.name for f in found] == ["a.jfif", "b.jpe", "c.jif", "d.ppm", "e.pgm", "f.pbm", "g.ico", "h.png"]
    left_out: Counter = Counter()
    assert find_images([root], left_out) == found and left_out == {".heic": 1, "no suffix": 1, ".txt": 1}
    said = "(3 other files left out: .heic 1, .txt 1, no suffix 1)"

    assert cli(["embed", "--model", str(tiny_model), "--images", str(root), "--output", str(tmp_path / "emb")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"embedding 8 image input(s) {said} with" in out
    assert json.loads((tmp_path / "emb" / "embed.json").read_text())["embedded"] == 8  # each one decoded
    assert cli(["classify", "--model", str(tiny_model), "--images", str(root), "--labels", "--templates", "none"]) == 0
    assert f"classifying 8 image(s) {said} into 2 classes" in " ".join(capsys.readouterr().out.split())
    # finetune says it under its count of examples, predict in its table's title
    data = read_image_classification(root, root)
    assert len(data.train) == 8 and f"in {root}: {said[1:-1]}" in data.notes
    task = SimpleNamespace(task="image-classification", uses_text=False, uses_images=True, pairs=False)
    inputs = read_inputs([str(root)], task)
    assert len(inputs.images) == 8 and inputs.left_out == left_out
    # and where no image is left, what there is is named
    put(tmp_path / "phone" / "IMG_2.heic", b"\0\0\0\x18ftypheic")
    with pytest.raises(DataError, match=r"^no image files match \S+phone \(1 other file left out: \.heic 1\)$"):
        find_images([tmp_path / "phone"])


def test_linked_folders_are_followed_once_and_a_linked_image_is_named_where_it_is_counted(tiny_model, tmp_path,
                                                                                          capsys):
    store = tmp_path / "store"
    for i, cls in enumerate(("cats", "dogs")):
        put(store / cls / f"{i}.png", image_bytes(i))
    root = tmp_path / "train"  # a dataset assembled with ln -s: one class a folder, the other a link
    put(root / "cats" / "0.png", image_bytes(0))
    (root / "dogs").symlink_to(store / "dogs", target_is_directory=True)
    (root / "cats" / "again").symlink_to(root, target_is_directory=True)  # a loop: not followed
    (root / "cats" / "up").symlink_to("..", target_is_directory=True)
    assert find_images([root]) == [root / "cats" / "0.png", root / "dogs" / "1.png"]
    src = image_folder(str(root))
    assert src.classes == ["cats", "dogs"] and [r.label for r in src.records] == [0, 1]
    # A link beside its target: embedded once, and the one left out is named in embed.json as counted.
    photos = tmp_path / "photos"
    put(photos / "a.png", image_bytes(3))
    (photos / "b.png").symlink_to(photos / "a.png")
    assert cli(["embed", "--model", str(tiny_model), "--images", str(photos), "--output", str(tmp_path / "e")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"left out: 1 image named twice (named in {tmp_path / 'e' / 'embed.json'})" in out
    summary = json.loads((tmp_path / "e" / "embed.json").read_text())
    assert summary["embedded"] == 1 and summary["failed"] == {"image named twice": 1}
    assert summary["failures"] == [{"image_path": str(photos / "b.png"), "error": "image named twice",
                                    "same_as": str(photos / "a.png")}]


def test_a_link_to_a_folder_beside_it_is_not_walked_again(tmp_path):
    # `current -> v2`, a common layout: each image once, under the folder that holds it.
    root = tmp_path / "lk"
    put(root / "v2" / "cat" / "r1.png", image_bytes(1))
    put(root / "v1" / "cat" / "r0.png", image_bytes(0))
    (root / "current").symlink_to("v2", target_is_directory=True)
    (root / "v2" / "also").symlink_to(root / "v1", target_is_directory=True)  # walked already: once
    assert find_images([root]) == [root / "v1" / "cat" / "r0.png", root / "v2" / "cat" / "r1.png"]
    src = image_folder(str(root))
    assert src.classes == ["v1", "v2"] and len(src.records) == 2
