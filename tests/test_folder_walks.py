"""Folders walked for images, text and parquet: what is read, what is passed over and what is said."""

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from flava.data.arrow import arrow_text
from flava.data.images import find_images
from flava.data.sources import image_folder
from flava.data.texts import text_file
from flava.evaluate.readers.user_files import read_image_classification
from flava.retrieval.embed import image_inputs


def image_bytes(seed: int, fmt: str = "PNG") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
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
