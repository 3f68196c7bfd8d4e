"""What a user plants in shards, tables and folders comes back as planted: every sample paired
with its own caption, every shard read once, what cannot be read counted or refused in one line."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
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
    # Empty ones stay records: the sample makers count them as empty captions, as for a CSV's empty cell.
    assert [r.caption for r in src.records] == ["a real caption", "", ""]
    assert src.rejected == {"caption is not text": 4}


def test_embed_counts_a_text_tables_null_and_non_text_rows_without_a_traceback(tmp_path, capsys):
    torch.manual_seed(0)
    flava.FlavaModel(flava.preset("tiny")).save_pretrained(tmp_path / "m")
    rows = [{"caption": "a red square"}, {"caption": None}, {"caption": 5}, {"caption": ["a", "b"]}, {},
            {"caption": "a blue square"}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli(["embed", "--model", str(tmp_path / "m"), "--texts", str(tmp_path / "t.jsonl"),
                "--output", str(tmp_path / "e")]) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    emb = read_embeddings(tmp_path / "e")
    assert [m["caption"] for m in emb.metadata] == ["a red square", "a blue square"]
    report = json.loads((tmp_path / "e" / "embed.json").read_text())
    assert report["failed"] == {"empty text": 2, "caption is not text": 2}
    assert [f["row"] for f in report["failures"]] == [1, 2, 3, 4]
