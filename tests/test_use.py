"""Using a model: hub ids through a laid-out cache, the processor, embed / index / search /
classify, as a user runs them."""

import csv
import io
import json
import os
import shutil
from pathlib import Path
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import flava
from flava.cli import main as cli
from flava.io.files import building
from flava.io.runs import RunDir
from flava.retrieval.embed import read_embeddings
from flava.retrieval.index import VectorIndex, choose_factory, index_from_arrays

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """FOLDER/<colour>/<i>.png: 4 noisy squares per colour."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir()
        for i in range(4):
            arr = np.clip(np.array(rgb) + rng.normal(0, 20, (48, 56, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


def lay_out_hub_cache(cache, repo_id, files_from):
    """huggingface_hub's cache layout: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(files_from, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_a_hub_id_loads_offline_from_a_laid_out_cache(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert cli(["export-hf", str(tiny_model), str(tmp_path / "hf")]) == 0
    lay_out_hub_cache(tmp_path / "hub", "acme/flava-tiny", tmp_path / "hf")
    model = flava.load("acme/flava-tiny")
    ours = flava.load(tiny_model)
    for (k, a), b in zip(ours.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    proc = flava.Processor.from_pretrained("acme/flava-tiny")
    assert proc.image_size == ours.config.image.image_size
    assert proc.tokenizer_path.parent.name.startswith("0123456789")  # the snapshot's own tokenizer.json
    # ...and through a command's --model.
    (tmp_path / "t.txt").write_text("a red square\na blue square\n")
    assert cli(["embed", "--model", "acme/flava-tiny", "--texts", str(tmp_path / "t.txt"),
                "--output", str(tmp_path / "emb")]) == 0
    e = read_embeddings(tmp_path / "emb")
    assert e.model == "acme/flava-tiny"
    np.testing.assert_allclose(e.vectors, ours.encode_text(["a red square", "a blue square"]).numpy(), atol=1e-5)

    capsys.readouterr()
    assert cli(["embed", "--model", "acme/not-there", "--texts", str(tmp_path / "t.txt"),
                "--output", str(tmp_path / "emb2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'acme/not-there' is not in" in err and "HF_HUB_OFFLINE" in err and "huggingface-cli download" in err


def test_processor_and_raw_inputs_match_the_tensor_path(tiny_model, photos):
    model = flava.load(tiny_model)
    files = sorted(photos.rglob("*.png"))[:3]
    pixels = model.processor.images(files)
    assert pixels.shape == (3, 3, 64, 64)
    from flava.data.transforms import eval_transform
    assert torch.equal(pixels[0], eval_transform(Image.open(files[0]), 64))
    with torch.no_grad():
        want = model.encode_image(pixels)
    got = model.encode_image([Image.open(f) for f in files])
    assert not got.requires_grad and torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(model.encode_image(str(files[0])), want[:1], atol=1e-6)
    tok = model.processor.texts(["a cat", "a much longer sentence about a dog"])
    assert tok.input_ids.shape[0] == 2 and tok.attention_mask[0].sum() < tok.attention_mask[1].sum()
    with torch.no_grad():
        want = model.encode_text(tok.input_ids, tok.attention_mask)
    assert torch.allclose(model.encode_text(["a cat", "a much longer sentence about a dog"]), want, atol=1e-6)
    batch = model.processor(images=files[:2], text=["x", "y"])
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask"}
    with pytest.raises(flava.DataError, match="cannot use image .*missing"):
        model.processor.images([files[0], files[0].parent / "nope.png"])


def test_load_takes_a_run_directory(tiny_model, tmp_path):
    run = RunDir(tmp_path / "run")
    shutil.copytree(tiny_model, run.step(7))
    run.point_latest(7, run.step(7))
    assert torch.equal(flava.load(tmp_path / "run").logit_scale, flava.load(tiny_model).logit_scale)


def test_embed_is_resumable_and_reports_bad_images(tiny_model, photos, tmp_path, capsys):
    images = tmp_path / "imgs"
    shutil.copytree(photos, images)
    (images / "red" / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "emb"
    args = ["embed", "--model", str(tiny_model), "--images", str(images), "--output", str(out), "--part-size", "5",
            "--batch-size", "3"]
    assert cli(args) == 0
    text = capsys.readouterr().out
    assert "wrote 12 embedding(s)" in text and "1 unreadable image" in text
    summary = json.loads((out / "embed.json").read_text())
    assert summary["embedded"] == 12 and summary["failed"] == {"unreadable image": 1}
    assert summary["failures"][0]["image_path"].endswith("broken.png")
    full = read_embeddings(out)
    assert full.vectors.shape == (12, 128) and len(full.metadata) == 12
    model = flava.load(tiny_model)
    for vec, row in zip(full.vectors, full.metadata):
        assert row["label"] == row["image_path"].split("/")[-2]
        np.testing.assert_allclose(vec, model.encode_image(row["image_path"])[0].numpy(), atol=1e-5)

    # An interrupted run: the last part never finished. The rerun keeps the others and redoes it.
    marker = sorted((out / "parts").glob("*.json"))[-1]
    marker.unlink()
    (out / "embed.json").unlink()
    kept = {p: p.stat().st_mtime_ns for p in (out / "img_emb").glob("*.npy") if p.stem[-5:] != marker.stem}
    assert cli(args) == 0
    assert "2 of 3 part(s) were already done" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    again = read_embeddings(out)
    np.testing.assert_array_equal(again.vectors, full.vectors)
    assert again.metadata == full.metadata

    # Other inputs into the same directory are refused, naming what differs.
    assert cli(["embed", "--model", str(tiny_model), "--images", str(photos / "red"), "--output", str(out)]) == 2
    assert "holds embeddings of other inputs" in capsys.readouterr().err


def test_pairs_give_comparable_image_and_text_embeddings(tiny_model, photos, tmp_path):
    rows = ["image,caption,source"] + [f"{p},a {p.parent.name} square,test" for p in sorted(photos.rglob("*.png"))]
    rows.append(f"{photos / 'red' / '0.png'},,test")  # empty caption: left out and counted
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    assert cli(["embed", "--model", str(tiny_model), "--pairs", str(tmp_path / "pairs.csv"), "--output",
                str(tmp_path / "emb"), "--float16"]) == 0
    img, txt = read_embeddings(tmp_path / "emb", "image"), read_embeddings(tmp_path / "emb", "text")
    assert len(img.vectors) == len(txt.vectors) == 12
    assert np.load(tmp_path / "emb" / "img_emb" / "img_emb_00000.npy").dtype == np.float16
    assert img.metadata[0]["caption"] == "a blue square" and img.metadata[0]["source"] == "test"
    assert json.loads((tmp_path / "emb" / "embed.json").read_text())["failed"] == {"empty text": 1}
    model = flava.load(tiny_model)
    np.testing.assert_allclose(txt.vectors[0], model.encode_text("a blue square")[0].numpy(), atol=2e-3)
    # Same space: the cosine of an image with a text is the dot product of the two stored vectors.
    cos = float(model.encode_image(img.metadata[0]["image_path"])[0] @ model.encode_text("a blue square")[0])
    assert abs(float(img.vectors[0] @ txt.vectors[0]) - cos) < 2e-3


def test_index_search_and_add_through_the_commands(tiny_model, photos, tmp_path, capsys):
    for name in ("red", "green"):
        assert cli(["embed", "--model", str(tiny_model), "--images", str(photos / name),
                    "--output", str(tmp_path / f"emb_{name}")]) == 0
    assert cli(["index", "--embeddings", str(tmp_path / "emb_red"), "--output", str(tmp_path / "idx")]) == 0
    assert cli(["index", "--embeddings", str(tmp_path / "emb_green"), "--output", str(tmp_path / "idx"), "--add"]) == 0
    index = VectorIndex.open(tmp_path / "idx")
    assert len(index) == 8 and index.factory == "Flat" and index.model == str(tiny_model.resolve())
    capsys.readouterr()
    assert cli(["index", "--embeddings", str(tmp_path / "emb_green"), "--output", str(tmp_path / "idx"), "--add"]) == 2
    assert "already in the index" in capsys.readouterr().err
    shutil.copytree(tmp_path / "emb_red", tmp_path / "copy_of_red")  # the same inputs, elsewhere
    assert cli(["index", "--embeddings", str(tmp_path / "copy_of_red"), "--output", str(tmp_path / "idx"),
                "--add"]) == 2
    assert "embedded the same inputs as" in capsys.readouterr().err and len(VectorIndex.open(tmp_path / "idx")) == 8

    query = photos / "green" / "2.png"
    assert cli(["search", "--index", str(tmp_path / "idx"), "--image", str(query), "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and hits[0]["item"] == str(query.resolve()) and hits[0]["score"] > 0.999
    assert hits[0]["metadata"] == {"image_path": str(query.resolve())} and hits[0]["position"] == 4 + 2
    # Scores are the exact cosines, best first.
    model = flava.load(tiny_model)
    everything = np.concatenate([read_embeddings(tmp_path / f"emb_{n}").vectors for n in ("red", "green")])
    cos = everything @ model.encode_image(query)[0].numpy()
    assert [h["position"] for h in hits] == list(np.argsort(-cos)[:3])
    np.testing.assert_allclose([h["score"] for h in hits], np.sort(cos)[::-1][:3], atol=1e-5)

    assert cli(["search", "--index", str(tmp_path / "idx"), "--text", "a green square", "-k", "2"]) == 0
    assert "2 nearest of 8" in capsys.readouterr().out
    assert cli(["search", "--index", str(tmp_path / "idx"), "--text", " ", "-k", "2"]) == 2
    assert "empty" in capsys.readouterr().err
    assert cli(["search", "--index", str(tmp_path / "idx"), "--image", str(photos)]) == 2
    assert "a folder; give one image file" in capsys.readouterr().err


def test_index_add_skips_the_items_already_in_the_index(tiny_model, photos, tmp_path, capsys):
    """A folder that grew, embedded again and added: the items the index holds are skipped and
    counted, the new ones added, each position's vector its own item's."""
    folder, emb, idx = tmp_path / "imgs", tmp_path / "emb", tmp_path / "idx"
    folder.mkdir()
    red = sorted((photos / "red").glob("*.png"))
    for p in red[:2]:
        shutil.copy(p, folder / p.name)
    assert cli(["embed", "--model", str(tiny_model), "--images", str(folder), "--output", str(tmp_path / "e0")]) == 0
    assert cli(["index", "--embeddings", str(tmp_path / "e0"), "--output", str(idx)]) == 0
    for p in red[2:]:
        shutil.copy(p, folder / p.name)
    assert cli(["embed", "--model", str(tiny_model), "--images", str(folder), "--output", str(emb)]) == 0
    capsys.readouterr()
    assert cli(["index", "--embeddings", str(emb), "--output", str(idx), "--add"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert f"added 2 vectors of {emb} to {idx}: 4 vectors (Flat); skipped 2 items already in the index" in said
    index = VectorIndex.open(idx)
    paths = [str((folder / p.name).resolve()) for p in red]
    assert [index.item(i) for i in range(len(index))] == paths
    run = read_embeddings(emb)
    assert [m["image_path"] for m in run.metadata] == paths
    np.testing.assert_allclose(np.stack([index.vector(i) for i in range(4)]), run.vectors, atol=1e-6)
    assert [h.item for h in index.search(run.vectors[3:], 4)[0]][0] == paths[3]  # each hit once
    assert len({h.item for h in index.search(run.vectors[3:], 4)[0]}) == 4
    # Nothing new: refused in one line, the index as it was.
    assert cli(["embed", "--model", str(tiny_model), "--images", str(folder / red[0].name), "--output",
                str(tmp_path / "one")]) == 0
    capsys.readouterr()
    err = _one_line(capsys, cli(["index", "--embeddings", str(tmp_path / "one"), "--output", str(idx), "--add"]))
    assert f"all 1 items of {tmp_path / 'one'} are already in the index {idx}; nothing to add" in err
    assert len(VectorIndex.open(idx)) == 4
    # Texts: a line the index holds is skipped, whichever file it came from; an output folder embedded
    # anew (other inputs) is no run already added.
    (tmp_path / "a.txt").write_text("a red circle\na blue square\n")
    (tmp_path / "b.txt").write_text("a blue square\na green star\na red circle\n")
    embed = ["embed", "--model", str(tiny_model), "--output", str(tmp_path / "t"), "--texts"]
    assert cli(embed + [str(tmp_path / "a.txt")]) == 0
    assert cli(["index", "--embeddings", str(tmp_path / "t"), "--output", str(tmp_path / "tidx")]) == 0
    shutil.rmtree(tmp_path / "t")
    assert cli(embed + [str(tmp_path / "b.txt")]) == 0
    assert cli(["index", "--embeddings", str(tmp_path / "t"), "--output", str(tmp_path / "tidx"), "--add"]) == 0
    texts = VectorIndex.open(tmp_path / "tidx")
    assert [texts.item(i) for i in range(len(texts))] == ["a red circle", "a blue square", "a green star"]
    np.testing.assert_allclose(texts.vector(2), read_embeddings(tmp_path / "t").vectors[1], atol=1e-6)


def test_index_add_adds_again_an_image_changed_since_it_was_indexed(tiny_model, photos, tmp_path, capsys):
    """Another picture saved over a path the index holds, or a shard rewritten in place (its items
    keep their shard#offset), is not 'already in the index': the index holds another picture's
    vector there. The new vector is added and counted, with how to drop the old one."""
    folder, idx = tmp_path / "g", tmp_path / "idx"
    folder.mkdir()
    red, blue = sorted((photos / "red").glob("*.png")), sorted((photos / "blue").glob("*.png"))
    for i in range(3):
        shutil.copy(red[i], folder / f"r{i}.png")
    embed = ["embed", "--model", str(tiny_model), "--output"]
    assert cli(embed + [str(tmp_path / "e1"), "--images", str(folder)]) == 0
    assert cli(["index", "--embeddings", str(tmp_path / "e1"), "--output", str(idx)]) == 0
    shutil.copy(blue[0], folder / "r0.png")
    shutil.copy(red[3], folder / "new.png")
    assert cli(embed + [str(tmp_path / "e2"), "--images", str(folder)]) == 0
    capsys.readouterr()
    assert cli(["index", "--embeddings", str(tmp_path / "e2"), "--output", str(idx), "--add"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert (f"added 2 vectors of {tmp_path / 'e2'} to {idx}: 5 vectors (Flat); skipped 2 items already in the index; "
            "1 item changed since it was indexed: added again; rebuild the index to drop the old vectors") in said
    index, run = VectorIndex.open(idx), read_embeddings(tmp_path / "e2")
    r0 = str((folder / "r0.png").resolve())
    assert [i for i in range(len(index)) if index.item(i) == r0] == [0, 4]
    new_r0 = run.vectors[[m["image_path"] for m in run.metadata].index(r0)]
    np.testing.assert_allclose(index.vector(4), new_r0, atol=1e-6)
    assert index.search(new_r0, 1)[0][0].position == 4  # the picture at r0 now is found as r0
    # Only saved over, embedded again into the same output (which re-embeds the part): the same run
    # and inputs, but not the same vectors.
    shutil.copy(blue[1], folder / "r1.png")
    assert cli(embed + [str(tmp_path / "e2"), "--images", str(folder)]) == 0
    capsys.readouterr()
    assert cli(["index", "--embeddings", str(tmp_path / "e2"), "--output", str(idx), "--add"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert ("added 1 vector of" in said and "6 vectors (Flat); skipped 3 items already in the index; 1 item changed "
            "since it was indexed: added again" in said), said
    assert VectorIndex.open(idx).item(5) == str((folder / "r1.png").resolve())
    # A shard rewritten in place: the same members at the same offsets, the first another picture.

    def shard(pictures):
        with tarfile.open(tmp_path / "00000.tar", "w") as tar:
            for i, p in enumerate(pictures):
                png = io.BytesIO()
                Image.open(p).save(png, "PNG", compress_level=0)  # stored: the same size for the same shape
                for name, data in ((f"s{i}.png", png.getvalue()), (f"s{i}.txt", b"a square")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))

    shard(red[:2])
    assert cli(embed + [str(tmp_path / "s1"), "--pairs", str(tmp_path / "00000.tar")]) == 0
    assert cli(["index", "--embeddings", str(tmp_path / "s1"), "--output", str(tmp_path / "sidx")]) == 0
    shard([blue[0], red[1]])
    assert cli(embed + [str(tmp_path / "s2"), "--pairs", str(tmp_path / "00000.tar")]) == 0
    keys = [m["image_path"] for m in read_embeddings(tmp_path / "s2").metadata]
    assert keys == [m["image_path"] for m in read_embeddings(tmp_path / "s1").metadata] and "#" in keys[0]
    capsys.readouterr()
    assert cli(["index", "--embeddings", str(tmp_path / "s2"), "--output", str(tmp_path / "sidx"), "--add"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert ("added 1 vector of" in said and "3 vectors (Flat); skipped 1 item already in the index; 1 item changed "
            "since it was indexed: added again" in said), said
    assert VectorIndex.open(tmp_path / "sidx").item(2) == keys[0]


@pytest.mark.slow  # end to end: commands run one after another
def test_index_add_judges_a_local_image_changed_by_its_file_not_its_vector(tiny_model, photos, tmp_path, capsys):
    """embed records each local image file's size and modification time; index --add judges by them:
    the same pictures embedded elsewhere (another device or precision: vectors a little off) are not
    added twice, and a picture saved over is added again however close its vector. A run or an index
    of an older version, without them, is still read and judged by vector."""
    import pyarrow.parquet as pq

    from flava.retrieval.index import SAME_VECTOR

    folder, idx = tmp_path / "g", tmp_path / "idx"
    folder.mkdir()
    red, blue = sorted((photos / "red").glob("*.png")), sorted((photos / "blue").glob("*.png"))
    for i in range(3):
        shutil.copy(red[i], folder / f"r{i}.png")
    embed = ["embed", "--model", str(tiny_model), "--images", str(folder), "--output"]
    assert cli(embed + [str(tmp_path / "e1")]) == 0
    run = read_embeddings(tmp_path / "e1")
    st = os.stat(folder / "r0.png")
    assert run.files[0] == (st.st_size, st.st_mtime_ns) and run.metadata[0] == {"image_path": str(folder / "r0.png")}
    assert cli(["index", "--embeddings", str(tmp_path / "e1"), "--output", str(idx)]) == 0
    for copy in ("idx_old_run", "idx_old_index"):
        shutil.copytree(idx, tmp_path / copy)
    assert VectorIndex.open(idx).metadata(0) == {"image_path": str(folder / "r0.png")}  # no bookkeeping shown

    shutil.copy(blue[0], folder / "r1.png")  # saved over
    assert cli(embed + [str(tmp_path / "e2")]) == 0
    # As another device would embed them: r0 and r2 a little off, r1 as close as float noise to the old r1.
    npy = tmp_path / "e2" / "img_emb" / "img_emb_00000.npy"
    vectors, rng = np.load(npy), np.random.default_rng(0)
    for i in (0, 2):
        noise = rng.normal(size=vectors.shape[1])
        moved = vectors[i] + 0.03 * noise / np.linalg.norm(noise)
        vectors[i] = moved / np.linalg.norm(moved)
        assert float(vectors[i] @ run.vectors[i]) < SAME_VECTOR
    vectors[1] = run.vectors[1]
    np.save(npy, vectors)
    capsys.readouterr()
    assert cli(["index", "--embeddings", str(tmp_path / "e2"), "--output", str(idx), "--add"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert (f"added 1 vector of {tmp_path / 'e2'} to {idx}: 4 vectors (Flat); skipped 2 items already in the index; "
            "1 item changed since it was indexed: added again; rebuild the index to drop the old vectors; changes "
            "judged by file size and time") in said, said
    assert VectorIndex.open(idx).item(3) == str(folder / "r1.png")

    # A run of an older version (no file columns): read as before, judged by vector.
    for part in (tmp_path / "e2" / "metadata").glob("*.parquet"):
        pq.write_table(pq.read_table(part).select(["image_path"]), part)
    assert read_embeddings(tmp_path / "e2").files == [None] * 3
    assert cli(["index", "--embeddings", str(tmp_path / "e2"), "--output", str(tmp_path / "idx_old_run"),
                "--add"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert ("skipped 1 item already in the index; 2 items changed since they were indexed: added again; rebuild the "
            "index to drop the old vectors; changes judged by vector (no file size and time recorded)") in said, said
    # An index of an older version: the same.
    for part in (tmp_path / "idx_old_index" / "metadata").glob("*.parquet"):
        pq.write_table(pq.read_table(part).select(["image_path"]), part)
    shutil.rmtree(tmp_path / "e2")
    assert cli(embed + [str(tmp_path / "e2")]) == 0
    capsys.readouterr()
    assert cli(["index", "--embeddings", str(tmp_path / "e2"), "--output", str(tmp_path / "idx_old_index"),
                "--add"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "1 item changed since it was indexed" in said and "changes judged by vector (no file size" in said, said


def test_index_add_finds_the_items_held_from_the_run_not_by_reading_every_row(tiny_model, tmp_path, capsys,
                                                                               monkeypatch):
    """Which of a run's items an index holds is found by one vectorised pass over the index's key
    column, each metadata file's own text column: only the run's rows and the candidates found are
    read whole (`item_key`), not every row of the index (500k rows had taken 6 s and 300 MB)."""
    import flava.retrieval.index as index_module

    (tmp_path / "t.txt").write_text("a red circle\nline 1234\na green star\n")
    assert cli(["embed", "--model", str(tiny_model), "--texts", str(tmp_path / "t.txt"), "--output",
                str(tmp_path / "e")]) == 0
    run = read_embeddings(tmp_path / "e")
    rng = np.random.default_rng(0)
    big = index_from_arrays(rng.normal(size=(5000, run.vectors.shape[1])), None, tmp_path / "idx", model=run.model,
                            modality="text", checkpoint=run.checkpoint, text_field="text",
                            metadata=[{"text": f"line {i}"} for i in range(5000)])
    big.add(rng.normal(size=(2, run.vectors.shape[1])), [{"caption": "a red circle"}, {"caption": "line 7"}], "other")
    calls = []
    real = index_module.item_key
    monkeypatch.setattr(index_module, "item_key", lambda *a: calls.append(a) or real(*a))
    capsys.readouterr()
    assert cli(["index", "--embeddings", str(tmp_path / "e"), "--output", str(tmp_path / "idx"), "--add"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "added 1 vector of" in said and "5003 vectors" in said and "skipped 2 items already in the index" in said
    assert len(calls) <= 3 + 2, len(calls)  # the run's 3 rows and the 2 rows found, of 5002
    index = VectorIndex.open(tmp_path / "idx")
    assert index.item(5002) == "a green star"
    np.testing.assert_allclose(index.vector(5002), run.vectors[2], atol=1e-6)


def test_shard_pairs_keep_their_captions_and_keys_through_index_and_search(tiny_model, photos, tmp_path, capsys):
    # A WebDataset shard's captions (.txt and .json) and sample keys reach the metadata, as a table's captions do.
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for i, p in enumerate(sorted(photos.rglob("*.png"))[:3]):
            caption = f"a {p.parent.name} square".encode()
            sidecar = [(f"s{i}.json", json.dumps({"url": f"http://example.org/{i}.png", "width": 48, "key": f"s{i}",
                                                  "caption": caption.decode()}).encode())] if i == 1 else []
            for name, data in ((f"s{i}.png", p.read_bytes()),
                               (f"s{i}.json", json.dumps({"caption": caption.decode()}).encode()) if i == 2
                               else (f"s{i}.txt", caption), *sidecar):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert cli(["embed", "--model", str(tiny_model), "--pairs", str(tmp_path / "00000.tar"),
                "--output", str(tmp_path / "emb")]) == 0
    meta = read_embeddings(tmp_path / "emb", "text").metadata
    assert [(m["caption"], m["key"]) for m in meta] == [("a blue square", "s0"), ("a blue square", "s1"),
                                                        ("a blue square", "s2")]
    # img2dataset's .json beside a .txt caption: its fields kept, those the sample has already not twice.
    assert meta[1] == {"caption": "a blue square", "key": "s1", "url": "http://example.org/1.png", "width": "48",
                       "image_path": meta[1]["image_path"]}, meta[1]
    assert cli(["index", "--embeddings", str(tmp_path / "emb"), "--which", "text",
                "--output", str(tmp_path / "idx")]) == 0
    capsys.readouterr()
    assert cli(["search", "--index", str(tmp_path / "idx"), "--text", "a blue square", "-k", "1", "--json"]) == 0
    hit = json.loads(capsys.readouterr().out)[0]
    assert hit["item"] == "a blue square" and hit["metadata"]["key"] in ("s0", "s1", "s2")


def test_a_rerun_embeds_again_a_part_whose_image_changed_and_refuses_int8_into_float_vectors(tiny_model, photos,
                                                                                               tmp_path, capsys):
    images = tmp_path / "imgs"
    shutil.copytree(photos / "red", images)
    out = tmp_path / "emb"
    args = ["embed", "--model", str(tiny_model), "--images", str(images), "--output", str(out), "--part-size", "2"]
    assert cli(args) == 0
    before = read_embeddings(out).vectors
    shutil.copy(photos / "blue" / "0.png", images / "3.png")  # the last part's image replaced under its name
    capsys.readouterr()
    assert cli(args) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "1 of 2 part(s) were already done and kept" in said and "1 part(s) done before were embedded again" in said
    after = read_embeddings(out).vectors
    np.testing.assert_array_equal(after[:3], before[:3])
    np.testing.assert_allclose(after[3], flava.load(tiny_model).encode_image(images / "3.png")[0].numpy(), atol=1e-5)
    # An image named twice (its folder and itself) is embedded once, and the other is counted.
    assert cli(["embed", "--model", str(tiny_model), "--images", str(images), str(images / "0.png"), "--output",
                str(tmp_path / "twice")]) == 0
    summary = json.loads((tmp_path / "twice" / "embed.json").read_text())
    assert summary["embedded"] == 4 and summary["failed"] == {"image named twice": 1}
    assert cli(args + ["--int8"]) == 2
    assert "holds embeddings of other inputs or settings (int8: False -> True)" in capsys.readouterr().err
    int8 = ["embed", "--model", str(tiny_model), "--images", str(images), "--output", str(tmp_path / "q")]
    assert cli(int8 + ["--int8"]) == 0
    assert json.loads((tmp_path / "q" / "embed.json").read_text())["int8"] is True
    # And back: a float run, which records no int8, into int8 vectors names the setting too.
    capsys.readouterr()
    err = _one_line(capsys, cli(int8))
    assert "holds embeddings of other inputs or settings (int8: True -> False); choose another" in err


@pytest.mark.slow  # end to end: commands run one after another
def test_index_add_refuses_int8_vectors_into_a_float_index_and_back(tiny_model, photos, tmp_path, capsys):
    """One checkpoint's int8 and float vectors differ: never mixed in one index, refused in one line
    naming both kinds and the fix, the index unchanged."""
    embed = ["embed", "--model", str(tiny_model), "--output"]
    floats, ints = tmp_path / "f", tmp_path / "q"
    assert cli(embed + [str(floats), "--images", str(photos / "red")]) == 0
    assert cli(embed + [str(ints), "--images", str(photos / "green"), "--int8"]) == 0
    fidx, qidx = tmp_path / "fidx", tmp_path / "qidx"
    assert cli(["index", "--embeddings", str(floats), "--output", str(fidx)]) == 0
    assert cli(["index", "--embeddings", str(ints), "--output", str(qidx)]) == 0
    capsys.readouterr()
    err = _one_line(capsys, cli(["index", "--embeddings", str(ints), "--output", str(fidx), "--add"]))
    assert (f"{ints} holds int8 embeddings (embed --int8) but the index {fidx} holds float embeddings (embed without "
            f"--int8); one index never mixes the two, whose vectors differ: embed again without --int8, or build a "
            f"new index from {ints}") in " ".join(err.split())
    err = _one_line(capsys, cli(["index", "--embeddings", str(floats), "--output", str(qidx), "--add"]))
    assert "holds float embeddings (embed without --int8) but the index" in err and "embed again with --int8" in err
    # An index of an older version, which records no kind: the run it was built from says it.
    info = json.loads((fidx / "index.json").read_text())
    del info["int8"]
    (fidx / "index.json").write_text(json.dumps(info))
    assert "holds int8 embeddings" in _one_line(capsys, cli(["index", "--embeddings", str(ints), "--output",
                                                             str(fidx), "--add"]))
    assert len(VectorIndex.open(fidx)) == len(VectorIndex.open(qidx)) == 4
    # Searched, an int8 index's queries are embedded by the int8 model, as its vectors were (the float
    # model's had ranked them); serving a float index with --int8 is refused, an int8 one is int8.
    from rich.console import Console

    from flava.cli import build_parser
    from flava.cli.embed import load_for_inference
    from flava.cli.serve import build_app
    from flava.retrieval.embed import Embedder

    capsys.readouterr()
    assert cli(["search", "--index", str(qidx), "--text", "a green square", "-k", "4", "--json"]) == 0
    got = [h["score"] for h in json.loads(capsys.readouterr().out)]
    scores = {int8: [round(h.score, 6) for h in VectorIndex.open(qidx).search(
        Embedder(load_for_inference(str(tiny_model), None, int8)).texts(["a green square"]), 4)[0]]
        for int8 in (True, False)}
    assert got == scores[True] and scores[True] != scores[False]
    with pytest.raises(flava.ConfigError, match=f"the index {fidx} holds float embeddings \\(embed without "
                       "--int8\\): serve it without --int8"):
        build_app(build_parser().parse_args(["serve", "--index", str(fidx), "--int8"]), Console(file=io.StringIO()))
    said = io.StringIO()
    build_app(build_parser().parse_args(["serve", "--index", str(qidx)]), Console(file=said, width=400))
    assert "holds int8 embeddings (embed --int8): the model is served int8" in said.getvalue()
    assert "(int8)" in said.getvalue().splitlines()[-1]  # model: NAME (int8)


@pytest.mark.slow  # end to end: commands run one after another
def test_index_add_refuses_another_modality_or_dimension(tiny_model, photos, tmp_path, capsys):
    """A pair run's texts asked for with --which into an index of images (each text had been added
    under its image's path), or vectors of another dimension: refused in one line with the fix."""
    embed = ["embed", "--model", str(tiny_model), "--output"]
    floats, fidx = tmp_path / "f", tmp_path / "fidx"
    assert cli(embed + [str(floats), "--images", str(photos / "red")]) == 0
    assert cli(["index", "--embeddings", str(floats), "--output", str(fidx)]) == 0
    (tmp_path / "p.csv").write_text(f"image,caption\n{photos / 'blue' / '0.png'},a blue square\n")
    assert cli(embed + [str(tmp_path / "p"), "--pairs", str(tmp_path / "p.csv")]) == 0
    capsys.readouterr()
    err = _one_line(capsys, cli(["index", "--embeddings", str(tmp_path / "p"), "--which", "text", "--output",
                                 str(fidx), "--add"]))
    assert (f"the index {fidx} holds image vectors, not text ones: leave out --which text to add {tmp_path / 'p'}'s "
            f"image vectors, or build a text index") in " ".join(err.split())
    assert len(VectorIndex.open(fidx)) == 4

    # Vectors of another dimension under the same model name (an index that records no checkpoint).
    run = read_embeddings(floats)
    index_from_arrays(np.eye(2, 8, dtype=np.float32), ["x", "y"], tmp_path / "narrow", model=run.model)
    err = _one_line(capsys, cli(["index", "--embeddings", str(floats), "--output", str(tmp_path / "narrow"), "--add"]))
    assert (f"{floats} holds {run.vectors.shape[1]}-dimensional embeddings but the index {tmp_path / 'narrow'} holds "
            f"8-dimensional ones: embed with the index's model ({run.model}), or build a new index from "
            f"{floats}") in " ".join(err.split())


def test_a_pair_tables_image_urls_are_named_never_fetched_nor_read_as_paths(tiny_model, photos, tmp_path, capsys):
    red = sorted((photos / "red").glob("*.png"))[0]
    (tmp_path / "p.csv").write_text(f"url,caption\nhttp://example.com/a.png,a thing\n{red},a red square\n")
    assert cli(["embed", "--model", str(tiny_model), "--pairs", str(tmp_path / "p.csv"),
                "--output", str(tmp_path / "emb")]) == 0
    summary = json.loads((tmp_path / "emb" / "embed.json").read_text())
    assert summary["embedded"] == 1 and summary["failed"] == {"image URL, not downloaded": 1}
    assert summary["failures"][0]["image_path"] == "http://example.com/a.png"
    (tmp_path / "all.csv").write_text("url,caption\nhttp://example.com/a.png,a\nhttps://example.com/b.jpg,b\n")
    capsys.readouterr()
    assert cli(["embed", "--model", str(tiny_model), "--pairs", str(tmp_path / "all.csv"),
                "--output", str(tmp_path / "emb2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "its images are URLs (http://example.com/a.png, ...), which flava does not fetch" in err


def test_an_empty_image_cell_and_a_dangling_link_are_named_as_the_user_wrote_them(tiny_model, photos, tmp_path,
                                                                                   capsys):
    red = sorted((photos / "red").glob("*.png"))[0]
    (tmp_path / "p.csv").write_text(f"image,caption\n{red},a red square\n,no image here\n  ,blank\n")
    assert cli(["embed", "--model", str(tiny_model), "--pairs", str(tmp_path / "p.csv"),
                "--output", str(tmp_path / "emb")]) == 0
    summary = json.loads((tmp_path / "emb" / "embed.json").read_text())
    # An empty path was the table's own folder, reported as an unreadable image.
    assert summary["embedded"] == 1 and summary["failed"] == {"no image path": 2}
    assert [(f["image_path"], f["caption"]) for f in summary["failures"]] == [("", "no image here"), ("", "blank")]
    (tmp_path / "none.csv").write_text("image,caption\n,a\n")
    assert "none.csv: no row names an image" in _one_line(capsys, cli(
        ["embed", "--model", str(tiny_model), "--pairs", str(tmp_path / "none.csv"), "--output", str(tmp_path / "e2")]))
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(red, folder / "red.png")
    (folder / "dangling.png").symlink_to(tmp_path / "gone.png")
    assert cli(["embed", "--model", str(tiny_model), "--images", str(folder), "--output", str(tmp_path / "e3")]) == 0
    summary = json.loads((tmp_path / "e3" / "embed.json").read_text())
    assert summary["failed"] == {"missing image file": 1}
    assert summary["failures"][0]["image_path"] == str(folder / "dangling.png")  # not its target's name


def test_embed_leaves_out_and_names_a_tables_bad_rows_as_it_does_bad_images(tiny_model, photos, tmp_path, capsys):
    # One bad row of a bulk input stopped the whole command.
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n{"text": "b"\n{"text": "c"}\n')
    assert cli(["embed", "--model", str(tiny_model), "--texts", str(tmp_path / "t.jsonl"),
                "--output", str(tmp_path / "e1")]) == 0
    summary = json.loads((tmp_path / "e1" / "embed.json").read_text())
    assert summary["embedded"] == 2 and summary["failed"] == {"unreadable json line": 1}
    assert summary["failures"][0]["line"] == f"{tmp_path / 't.jsonl'}, line 2"
    red = sorted((photos / "red").glob("*.png"))[0]
    (tmp_path / "p.csv").write_text(f"image,caption\n{red},a red square\n{red},a,b\n")
    assert cli(["embed", "--model", str(tiny_model), "--pairs", str(tmp_path / "p.csv"),
                "--output", str(tmp_path / "e2")]) == 0
    summary = json.loads((tmp_path / "e2" / "embed.json").read_text())
    assert summary["embedded"] == 1 and summary["failed"] == {"malformed csv row": 1}
    (tmp_path / "bad.jsonl").write_text("{bad\n")
    err = _one_line(capsys, cli(["embed", "--model", str(tiny_model), "--texts", str(tmp_path / "bad.jsonl"),
                                 "--output", str(tmp_path / "e3")]))
    assert "bad.jsonl: no row could be read (the first bad: line 1: not valid JSON" in err


def test_a_missing_value_is_never_shown_as_none(tiny_model, tmp_path, capsys):
    rows = [{"text": "a red square", "id": "1", "tags": ["x", "y"], "o": {"a": "b"}, "ok": True, "n": 3},
            {"text": "a blue square", "id": None}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli(["embed", "--model", str(tiny_model), "--texts", str(tmp_path / "t.jsonl"),
                "--output", str(tmp_path / "emb")]) == 0
    meta = read_embeddings(tmp_path / "emb").metadata
    assert meta[1]["id"] is None  # not the text "None"
    # A text table's other cells as --pairs writes them: JSON, not Python's "['x', 'y']" or "True".
    assert {k: meta[0][k] for k in ("tags", "o", "ok", "n")} == {"tags": '["x", "y"]', "o": '{"a": "b"}',
                                                                 "ok": "true", "n": "3"}
    assert cli(["index", "--embeddings", str(tmp_path / "emb"), "--output", str(tmp_path / "idx")]) == 0
    capsys.readouterr()
    assert cli(["search", "--index", str(tmp_path / "idx"), "--text", "a blue square", "-k", "2"]) == 0
    assert "None" not in capsys.readouterr().out
    bare = index_from_arrays(np.eye(2, 8, dtype=np.float32), None, tmp_path / "bare", modality="text",
                             metadata=[{"caption": None}, {"other": "x"}])
    assert [bare.item(0), bare.item(1)] == ["", ""]
    assert [h.item for h in bare.search(np.eye(1, 8, dtype=np.float32), k=2)[0]] == ["", ""]


def test_a_text_file_is_read_as_utf8_lines_and_an_image_named_as_texts_is_refused(tiny_model, photos, tmp_path,
                                                                                     capsys):
    # An image named with --texts had been embedded as '\x89PNG' and the like, and a line that is not
    # UTF-8 as '\ufffd', without a word.
    err = _one_line(capsys, cli(["embed", "--model", str(tiny_model), "--texts", str(photos / "red" / "0.png"),
                                 "--output", str(tmp_path / "img")]))
    assert f"{photos / 'red' / '0.png'} holds binary data, not text (an image? name images with --images)" in err
    assert not (tmp_path / "img").exists()
    (tmp_path / "t.txt").write_bytes(b"\xef\xbb\xbfa red square\n\xff\xfe not text\r\na blue square\rlast\n")
    assert cli(["embed", "--model", str(tiny_model), "--texts", str(tmp_path / "t.txt"),
                "--output", str(tmp_path / "emb")]) == 0
    assert [m["caption"] for m in read_embeddings(tmp_path / "emb").metadata] == ["a red square", "a blue square",
                                                                                  "last"]
    report = json.loads((tmp_path / "emb" / "embed.json").read_text())
    assert report["failures"] == [{"line": f"{tmp_path / 't.txt'}, line 2", "error": "undecodable text line",
                                   "detail": "the line holds bytes that are not UTF-8 text; save the file as UTF-8"}]
    assert "left out: 1 undecodable text line" in capsys.readouterr().out
    (tmp_path / "u16.txt").write_text("a red square\n", encoding="utf-16")  # Notepad's "Unicode"
    err = _one_line(capsys, cli(["embed", "--model", str(tiny_model), "--texts", str(tmp_path / "u16.txt"),
                                 "--output", str(tmp_path / "u")]))
    assert f"{tmp_path / 'u16.txt'} is UTF-16 text: save it as UTF-8" in err
    (tmp_path / "empty.txt").write_text("")
    err = _one_line(capsys, cli(["embed", "--model", str(tiny_model), "--texts", str(tmp_path / "empty.txt"),
                                 "--output", str(tmp_path / "e")]))
    assert "empty.txt is empty" in err


def test_a_failed_input_is_named_by_its_line_in_the_file(tiny_model, photos, tmp_path, capsys):
    # Failures had been named by a 0-based "row" among the inputs, which a line left out shifts,
    # where a table's bad rows are named "FILE, line N".
    (tmp_path / "t.txt").write_bytes(b"\xff not text\nfirst\n  \nthird\n")
    assert cli(["embed", "--model", str(tiny_model), "--texts", str(tmp_path / "t.txt"),
                "--output", str(tmp_path / "t")]) == 0
    failures = json.loads((tmp_path / "t" / "embed.json").read_text())["failures"]
    assert [f.get("line") for f in failures] == [f"{tmp_path / 't.txt'}, line 1", f"{tmp_path / 't.txt'}, line 3"]
    (tmp_path / "p.csv").write_text(f"image,caption\n{photos / 'red' / '0.png'},a red square\n\"nothere.png\",\"two\n"
                                    f"lines\"\n{photos / 'red' / '0.png'},\n")
    assert cli(["embed", "--model", str(tiny_model), "--pairs", str(tmp_path / "p.csv"),
                "--output", str(tmp_path / "p")]) == 0
    failures = json.loads((tmp_path / "p" / "embed.json").read_text())["failures"]
    assert [(f["line"], f["error"]) for f in failures] == [(f"{tmp_path / 'p.csv'}, line 4", "missing image file"),
                                                           (f"{tmp_path / 'p.csv'}, line 5", "empty text")]
    capsys.readouterr()
    (tmp_path / "none.csv").write_text("image,caption\nnothere.png,x\n")
    err = _one_line(capsys, cli(["embed", "--model", str(tiny_model), "--pairs", str(tmp_path / "none.csv"),
                                 "--output", str(tmp_path / "n")]))
    assert f"the first: {tmp_path / 'none.csv'}, line 2 ({tmp_path / 'nothere.png'}): missing image file" in err


def test_a_text_tables_column_keeps_its_name(tiny_model, photos, tmp_path, capsys):
    (tmp_path / "t.csv").write_text("text,id,caption\nhello world,1,not the text\na blue square,2,\n")
    assert cli(["embed", "--model", str(tiny_model), "--texts", str(tmp_path / "t.csv"),
                "--output", str(tmp_path / "emb")]) == 0
    assert read_embeddings(tmp_path / "emb").metadata[0] == {"text": "hello world", "id": "1",
                                                             "caption": "not the text"}
    assert cli(["index", "--embeddings", str(tmp_path / "emb"), "--output", str(tmp_path / "idx")]) == 0
    # A pair run's texts added beside it keep their caption column: each row's item is its own text.
    (tmp_path / "pairs.csv").write_text(f"image,caption\n{photos / 'red' / '0.png'},a red square\n")
    assert cli(["embed", "--model", str(tiny_model), "--pairs", str(tmp_path / "pairs.csv"),
                "--output", str(tmp_path / "pairs")]) == 0
    assert cli(["index", "--embeddings", str(tmp_path / "pairs"), "--which", "text", "--output", str(tmp_path / "idx"),
                "--add"]) == 0
    index = VectorIndex.open(tmp_path / "idx")
    assert [index.item(i) for i in range(3)] == ["hello world", "a blue square", "a red square"]
    capsys.readouterr()
    assert cli(["search", "--index", str(tmp_path / "idx"), "--text", "hello world", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert sorted(h["item"] for h in hits) == ["a blue square", "a red square", "hello world"]
    assert hits[0]["item"] == "hello world" and hits[0]["metadata"]["text"] == "hello world"


def test_a_parquet_pair_tables_other_columns_are_kept_as_a_csvs_are(tiny_model, photos, tmp_path):
    # They were dropped without a word: only the image and caption came through.
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = [str(photos / "red" / f"{i}.png") for i in range(2)]
    blobs = [open(p, "rb").read() for p in paths]
    for name, images in (("paths", paths), ("bytes", blobs)):
        pq.write_table(pa.table({"image": images, "caption": ["one", "two"], "src": ["web", None], "n": [3, 4],
                                 "image_path": ["theirs", "also theirs"]}), tmp_path / f"{name}.parquet")
        assert cli(["embed", "--model", str(tiny_model), "--pairs", str(tmp_path / f"{name}.parquet"),
                    "--output", str(tmp_path / name)]) == 0
        meta = read_embeddings(tmp_path / name).metadata
        assert [{k: v for k, v in m.items() if k != "image_path"} for m in meta] == [
            {"caption": "one", "src": "web", "n": "3", "input_image_path": "theirs"},
            {"caption": "two", "src": None, "n": "4", "input_image_path": "also theirs"}], name
        if name == "paths":  # the image's own column is embed's, as a CSV's is
            assert [m["image_path"] for m in meta] == paths
    # A caption named by ?caption=: the table's own `caption` and `input_caption` both kept; lists as JSON.
    pq.write_table(pa.table({"image": paths, "txt": ["one", "two"], "caption": ["c1", "c2"],
                             "input_caption": ["i1", "i2"], "tags": [["a", "b"], []]}), tmp_path / "named.parquet")
    assert cli(["embed", "--model", str(tiny_model), "--pairs", f"{tmp_path / 'named.parquet'}?caption=txt",
                "--output", str(tmp_path / "named")]) == 0
    assert read_embeddings(tmp_path / "named").metadata[0] == {
        "image_path": paths[0], "caption": "one", "input_input_caption": "c1", "input_caption": "i1",
        "tags": '["a", "b"]'}
    (tmp_path / "pairs.csv").write_text(f"image,caption,image_path,_file_size\n{paths[0]},one,theirs,USER\n")
    assert cli(["embed", "--model", str(tiny_model), "--pairs", str(tmp_path / "pairs.csv"),
                "--output", str(tmp_path / "csv")]) == 0
    # A column named as embed's bookkeeping (_file_size) is kept too; it had been overwritten unsaid.
    assert read_embeddings(tmp_path / "csv").metadata == [{"image_path": paths[0], "caption": "one",
                                                           "input_image_path": "theirs", "input__file_size": "USER"}]


def test_embed_refuses_when_nothing_could_be_embedded(tiny_model, photos, tmp_path, capsys):
    (tmp_path / "pairs.csv").write_text(f"image,caption\nnope.png,a thing\ngone.png,another\n"
                                        f"{photos / 'red' / '0.png'},\n")
    out = tmp_path / "emb"
    args = ["embed", "--model", str(tiny_model), "--pairs", str(tmp_path / "pairs.csv"), "--output", str(out)]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("flava embed: error: none of the 3 inputs could be embedded")
    assert "2 missing image file, 1 empty text" in err
    assert not out.exists()  # nothing an index would take for a result, nothing a rerun would skip
    out.mkdir()  # a directory given empty is left empty
    assert cli(args) == 2 and not any(out.iterdir())
    # Mended, the same command embeds what it now can.
    shutil.copy(photos / "red" / "1.png", tmp_path / "nope.png")
    assert cli(args) == 0 and len(read_embeddings(out).vectors) == 1


def test_an_index_build_stopped_while_adding_leaves_no_index_and_its_rerun_builds_it(tmp_path, monkeypatch):
    # A stop while the vectors were added had left an index of none that looked finished (search
    # found "0 of 0"), and the rerun was refused as an existing index.
    vectors = np.eye(4, 8, dtype=np.float32)
    out = tmp_path / "idx"
    add = VectorIndex.add

    def stopped(self, *args, **kwargs):
        add(self, vectors[:1], [{"image_path": "half"}])
        raise KeyboardInterrupt

    monkeypatch.setattr(VectorIndex, "add", stopped)
    with pytest.raises(KeyboardInterrupt):
        index_from_arrays(vectors, list("abcd"), out)
    assert not out.exists() and os.listdir(tmp_path) == []
    out.mkdir()  # a folder given empty stays so
    with pytest.raises(KeyboardInterrupt):
        index_from_arrays(vectors, list("abcd"), out)
    assert os.listdir(tmp_path) == ["idx"] and not any(out.iterdir())
    monkeypatch.setattr(VectorIndex, "add", add)
    (tmp_path / ".idx.k1lled_x.tmp").mkdir()  # what a build killed outright leaves beside its output
    (tmp_path / ".idx.v2.k3j8q0wp.tmp").mkdir()  # another output's staging folder (idx.v2), not this one's
    index_from_arrays(vectors, list("abcd"), out)
    assert sorted(os.listdir(tmp_path)) == [".idx.v2.k3j8q0wp.tmp", "idx"]
    opened = VectorIndex.open(out)
    assert len(opened) == 4 and opened.path == out


def test_two_builds_of_one_index_at_once_are_refused_not_raced(tmp_path):
    # Two builds into one new output both passed its "already exists" check; the second then
    # replaced the first's index. The lock beside the output is an OS lock: a second open file
    # taking it is refused as another process would be.
    vectors = np.eye(4, 8, dtype=np.float32)
    out = tmp_path / "idx"
    with building(out, "--output"):
        with pytest.raises(flava.ConfigError, match=rf"^{out} is in use by another flava run \(pid {os.getpid()} "
                           r"on .+\); wait for it to end, or choose another --output$"):
            index_from_arrays(vectors, list("abcd"), out)
        assert os.listdir(tmp_path) == [".idx.lock"]
    assert os.listdir(tmp_path) == []  # the lock beside the output goes with its build
    assert len(index_from_arrays(vectors, list("abcd"), out)) == 4
    assert os.listdir(tmp_path) == ["idx"]


def test_large_collections_get_an_approximate_index_within_the_budget(tmp_path):
    assert choose_factory(1000, 64, 2**30) == ("Flat", 1)
    factory, nprobe = choose_factory(1_000_000, 768, 2**34)
    assert factory == "IVF4096,Flat" and nprobe == 256
    factory, _ = choose_factory(1_000_000, 768, 2**28)  # 256 MiB: product-quantized codes
    assert factory.startswith("IVF4096,PQ") and 1_000_000 * (int(factory.split("PQ")[1]) + 8) * 1.1 <= 2**28
    with pytest.raises(flava.InputError, match="raise --memory"):
        choose_factory(1_000_000, 768, 2**20)
    with pytest.raises(flava.InputError, match="need 12 KiB exactly, over the memory budget of 1 KiB"):
        choose_factory(24, 128, 2**10)  # small sizes said as they are (was "0 MiB")

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(50, 32))
    vectors = centers[rng.integers(0, 50, 120_000)] + 0.05 * rng.normal(size=(120_000, 32))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = index_from_arrays(vectors, None, tmp_path / "ivf", memory="1GB")
    assert index.factory.startswith("IVF") and len(index) == 120_000
    queries = vectors[:50] + 0.01 * rng.normal(size=(50, 32))
    exact = np.argmax(queries @ vectors.T, axis=1)
    found = [hits[0].position for hits in index.search(queries.astype(np.float32), 1)]
    assert np.mean(np.array(found) == exact) >= 0.9
    np.testing.assert_allclose(index.vector(7), vectors[7], atol=1e-6)  # IVF,Flat stores vectors whole
    reopened = VectorIndex.open(tmp_path / "ivf")
    np.testing.assert_allclose(reopened.vector(119_999), vectors[119_999], atol=1e-6)
    assert [h.position for h in reopened.search(queries[:5].astype(np.float32), 3)[0]] == \
        [h.position for h in index.search(queries[:5].astype(np.float32), 3)[0]]


def test_classify_a_labelled_folder(tiny_model, photos, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    assert cli(["classify", "--model", str(tiny_model), "--images", str(photos), "--labels", "--templates",
                "a {} square.|a square of {}.", "--top-k", "2", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and "on 12 labelled image(s) (chance 33.3 %)" in text
    assert (tmp_path / "preds_confusion.png").stat().st_size > 1000
    import csv
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 12 and {r["true_label"] for r in rows} == set(COLOURS)
    # The probabilities are the softmax of scale x cosine against the templates' mean embedding.
    model = flava.load(tiny_model)
    classes = sorted(COLOURS)
    t = torch.stack([model.encode_text([f"a {c} square.", f"a square of {c}."]).mean(0) for c in classes])
    t = torch.nn.functional.normalize(t, dim=-1)
    first = rows[0]
    with torch.no_grad():
        p = torch.softmax(model.logit_scale.exp() * model.encode_image(first["image"])[0] @ t.T, dim=0)
    assert first["prediction"] == classes[int(p.argmax())]
    assert abs(float(first["score"]) - float(p.max())) < 1e-4
    # predict's columns and format: one script reads both commands' files.
    assert list(first) == ["image", "true_label", "prediction", "score", "top", "error"]
    top = [t.split(":") for t in first["top"].split("|")]
    assert len(top) == 2 and top[0][0] == first["prediction"] and abs(float(top[0][1]) - float(p.max())) < 1e-4
    # The same classes named with --classes score as read from the folders (underscores read as spaces
    # in the prompts either way; named, they had been prompted with the underscores).
    for colour in COLOURS:
        shutil.copytree(photos / colour, tmp_path / "lab" / f"dark_{colour}")
    scores = []
    for named in ([], ["--classes", ",".join(f"dark_{c}" for c in sorted(COLOURS))]):
        assert cli(["classify", "--model", str(tiny_model), "--images", str(tmp_path / "lab"), "--labels",
                    "--output", str(tmp_path / f"lab{len(named)}.csv"), *named]) == 0
        rows = csv.DictReader((tmp_path / f"lab{len(named)}.csv").open())
        scores.append([(r["prediction"], r["score"]) for r in rows])
    assert scores[0] == scores[1] and scores[0][0][0].startswith("dark_")
    assert cli(["classify", "--model", str(tiny_model), "--images", str(photos), "--classes", "a,b",
                "--templates", "no braces"]) == 2
    assert "exactly one {}" in capsys.readouterr().err
    assert cli(["classify", "--model", str(tiny_model), "--images", str(photos), "--classes", "a,b",
                "--templates", str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt: no such file" in capsys.readouterr().err
    assert cli(["classify", "--model", str(tiny_model), "--images", str(photos), "--classes", "a"]) == 2
    assert "two or more classes" in capsys.readouterr().err
    assert cli(["classify", "--model", str(tiny_model), "--images", str(photos), "--classes", "nope.txt"]) == 2
    assert "classes file nope.txt: no such file" in capsys.readouterr().err  # not a class named nope.txt
    (tmp_path / "empty.txt").write_text("\n")
    assert cli(["classify", "--model", str(tiny_model), "--images", str(photos), "--classes", "a,b",
                "--templates", str(tmp_path / "empty.txt")]) == 2
    assert "separated by '|'" in capsys.readouterr().err  # the separator templates take, not commas
    import flava.cli.embed as cli_embed

    def not_loaded(*a):
        raise AssertionError("the model was loaded before the classes were checked")

    for classes, said in (("a,,b", "classes 'a,,b' holds an empty name between ','s"), ("a,b,a", "'a' is named twice")):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(cli_embed, "load_for_inference", not_loaded)
            assert cli(["classify", "--model", str(tiny_model), "--images", str(photos), "--classes", classes]) == 2
        assert said in capsys.readouterr().err
    first = sorted(photos.iterdir())[0]
    loose = next(p for p in sorted(first.iterdir()))
    assert cli(["classify", "--model", str(tiny_model), "--images", str(first), "--classes", "a,b", "--labels"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{loose.name} is in no class sub-folder" in err and "name every class" not in err
    # Without --output nothing is written; the table shows paths within the folder, and the truth.
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert cli(["classify", "--model", str(tiny_model), "--images", str(photos), "--labels"]) == 0
    finally:
        os.chdir(here)
    shown = " ".join(capsys.readouterr().out.split())
    assert "the first 10 of 12; --output FILE.csv writes them all" in shown and "accuracy" in shown
    assert any(f"{c}/" in shown for c in COLOURS)
    assert not list(tmp_path.glob("predictions*"))


def test_classify_never_writes_over_its_inputs_nor_over_a_file_without_replace(tiny_model, photos, tmp_path,
                                                                                capsys):
    classes = tmp_path / "classes.csv"
    classes.write_text("red\nblue\n")
    args = ["classify", "--model", str(tiny_model), "--images", str(photos / "red"), "--classes", str(classes)]
    err = _one_line(capsys, cli(args + ["--output", str(classes), "--replace"]))
    assert f"--output {classes} is an input of this command" in err and classes.read_text() == "red\nblue\n"
    notes = tmp_path / "notes.csv"
    notes.write_text("mine\n")
    err = _one_line(capsys, cli(args + ["--output", str(notes)]))
    assert f"--output {notes} exists; name another file, or add --replace" in err and notes.read_text() == "mine\n"
    assert cli(args + ["--output", str(notes), "--replace"]) == 0
    assert notes.read_text().startswith("image,prediction")
    # With --labels, the confusion matrix picture beside --output is held to the same rules: it had
    # been written over any file of its name, an image being classified among them.
    lab = tmp_path / "lab"
    for colour in ("red", "blue"):
        shutil.copytree(photos / colour, lab / colour)
    shutil.copy(photos / "red" / "0.png", lab / "red" / "p_confusion.png")
    labelled = ["classify", "--model", str(tiny_model), "--images", str(lab), "--labels"]
    picture = lab / "red" / "p_confusion.png"
    before = picture.read_bytes()
    err = _one_line(capsys, cli(labelled + ["--output", str(lab / "red" / "p.csv"), "--replace"]))
    assert f"the confusion matrix picture {picture} is an input of this command" in err
    assert picture.read_bytes() == before and not (lab / "red" / "p.csv").exists()
    (tmp_path / "q_confusion.png").write_bytes(b"mine")
    err = _one_line(capsys, cli(labelled + ["--output", str(tmp_path / "q.csv")]))
    assert f"the confusion matrix picture {tmp_path / 'q_confusion.png'} exists; name another file, or add " \
           "--replace" in err and (tmp_path / "q_confusion.png").read_bytes() == b"mine"
    assert cli(labelled + ["--output", str(tmp_path / "q.csv"), "--replace"]) == 0
    assert (tmp_path / "q_confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_a_resized_model_processes_images_at_its_new_size():
    m = flava.FlavaModel(flava.preset("tiny")).eval()
    size = m.config.image.image_size
    m.encode_image([Image.new("RGB", (50, 50))])  # the processor exists before the resize
    m.resize_image(2 * size)
    assert m.processor.image_size == 2 * size and m.encode_image([Image.new("RGB", (50, 50))]).shape[0] == 1


def test_the_datas_text_is_shown_as_written_never_as_markup(tiny_model, photos, tmp_path, capsys):
    from rich.console import Console

    from flava.evaluate.results import SuiteResult, TaskResult
    from flava.evaluate.run import results_table

    rows = [{"text": "photo [/credits] x", "id": "[red]7"}, {"text": "[bold]loud[/bold] y", "id": "8"}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli(["embed", "--model", str(tiny_model), "--texts", str(tmp_path / "t.jsonl"),
                "--output", str(tmp_path / "emb")]) == 0
    assert cli(["index", "--embeddings", str(tmp_path / "emb"), "--output", str(tmp_path / "idx")]) == 0
    capsys.readouterr()
    # A closing tag no tag opened was a traceback (rich's MarkupError); a tag that matched was eaten.
    assert cli(["search", "--index", str(tmp_path / "idx"), "--text", "photo", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "photo [/credits] x" in out and "[bold]loud[/bold] y" in out and "[red]7" in out
    # Class names (a folder's) and a suite's task names too.
    for name, colour in (("[bold]odd", "red"), ("even", "blue")):
        (tmp_path / "marked" / name).mkdir(parents=True)
        Image.new("RGB", (16, 16), colour).save(tmp_path / "marked" / name / "0.png")
    assert cli(["classify", "--model", str(tiny_model), "--images", str(tmp_path / "marked"), "--labels"]) == 0
    assert "[bold]odd" in capsys.readouterr().out
    console = Console(record=True, width=120)
    console.print(results_table([SuiteResult("s", "m", [TaskResult("[/x] probe", "linear-probe", "vision",
                                                                   {"top-1": 50.0})])], ["m"], "t"))
    from flava.evaluate.run import print_plan
    from flava.evaluate.suite import PreparedTask, Suite

    print_plan(Suite("[/s]", [PreparedTask("[/x] probe", "linear-probe", "vision", "[bold]3 rows")]), console)
    shown = console.export_text()
    assert shown.count("[/x] probe") == 2 and "suite [/s]" in shown and "[bold]3 rows" in shown
    # A table's column names are the data's too, and a file name is a fine-tune's task name.
    (tmp_path / "sized.csv").write_text("text,size [px]\nphoto,3\n")
    assert cli(["embed", "--model", str(tiny_model), "--texts", str(tmp_path / "sized.csv"),
                "--output", str(tmp_path / "emb2")]) == 0
    assert cli(["index", "--embeddings", str(tmp_path / "emb2"), "--output", str(tmp_path / "idx2")]) == 0
    capsys.readouterr()
    assert cli(["search", "--index", str(tmp_path / "idx2"), "--text", "photo", "-k", "1"]) == 0
    assert "size [px]" in capsys.readouterr().out


def _one_line(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_embed_counts_add_up_for_a_shard_with_an_incomplete_sample(tiny_model, photos, tmp_path):
    shard = tmp_path / "shard-0.tar"
    with tarfile.open(shard, "w") as tar:
        def put(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for i, p in enumerate(sorted(photos.rglob("*.png"))[:3]):
            put(f"{i:04d}.png", p.read_bytes())
            put(f"{i:04d}.txt", b"a square")
        put("0003.png", b"not a png")  # unreadable
        put("0003.txt", b"a square")
        put("0004.png", (photos / "red" / "0.png").read_bytes())  # no caption: left out while listing
    assert cli(["embed", "--model", str(tiny_model), "--pairs", str(shard), "--output", str(tmp_path / "e")]) == 0
    summary = json.loads((tmp_path / "e" / "embed.json").read_text())
    assert summary["embedded"] == 3 and sum(summary["failed"].values()) == 2, summary["failed"]
    assert summary["samples"] == summary["embedded"] + sum(summary["failed"].values()) == 5


def test_index_add_needs_an_index_and_leaves_other_folders_alone(tiny_model, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("a red circle\na blue square\n")
    emb = tmp_path / "emb"
    assert cli(["embed", "--model", str(tiny_model), "--texts", str(tmp_path / "t.txt"), "--output", str(emb)]) == 0
    capsys.readouterr()
    err = _one_line(capsys, cli(["index", "--embeddings", str(emb), "--output", str(tmp_path / "new"), "--add"]))
    assert "is not a vector index" in err and f"--output {tmp_path / 'new'}` (without --add)" in err
    assert not (tmp_path / "new").exists()
    before = sorted(p.name for p in emb.iterdir())
    err = _one_line(capsys, cli(["index", "--embeddings", str(emb), "--output", str(emb), "--add"]))
    assert "holds `flava embed` output" in err and "--output NEW_DIR`" in err  # a command that can work
    assert sorted(p.name for p in emb.iterdir()) == before  # no lock left in an embeddings folder
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    err = _one_line(capsys, cli(["index", "--embeddings", str(emb), "--output", str(tmp_path / "other"), "--add"]))
    assert "--output NEW_DIR` (without --add)" in err


def test_non_finite_weights_and_vectors_are_refused(tiny_model, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan"
    shutil.copytree(tiny_model, bad)
    (bad / "checksums.json").unlink(missing_ok=True)
    weights = load_file(bad / "model.safetensors")
    weights["model.text_projection.weight"][0, 0] = float("nan")
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "t.txt").write_text("a red circle\na blue square\n")
    err = _one_line(capsys, cli(["embed", "--model", str(bad), "--texts", str(tmp_path / "t.txt"), "--output",
                                 str(tmp_path / "e_nan")]))
    assert "NaN or infinite" in err and "text_projection.weight" in err
    # Vectors made otherwise (an earlier release, another tool) are refused by the index.
    emb = tmp_path / "emb"
    assert cli(["embed", "--model", str(tiny_model), "--texts", str(tmp_path / "t.txt"), "--output", str(emb)]) == 0
    part = next((emb / "text_emb").glob("*.npy"))
    vectors = np.load(part)
    vectors[1, 3] = np.inf
    np.save(part, vectors)
    capsys.readouterr()
    err = _one_line(capsys, cli(["index", "--embeddings", str(emb), "--output", str(tmp_path / "idx")]))
    assert "1 of 2 text embeddings are not finite" in err and "row 1" in err


def test_the_hints_of_index_search_and_embed_point_where_they_should(tiny_model, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("a red circle\na blue square\n")
    emb, idx = tmp_path / "emb", tmp_path / "idx"
    err = _one_line(capsys, cli(["embed", "--model", str(tiny_model), "--texts", str(tmp_path / "t.txt"),
                                 "--output", str(emb), "--batch-size", "0"]))
    assert "batch_size must be at least 1" in err and not emb.exists()  # refused before the output is made
    assert cli(["embed", "--model", str(tiny_model), "--texts", str(tmp_path / "t.txt"), "--output", str(emb)]) == 0
    capsys.readouterr()
    err = _one_line(capsys, cli(["search", "--index", str(emb), "--text", "a circle"]))
    assert "holds `flava embed` output, not a vector index" in err and "--output NEW_DIR`" in err
    (tmp_path / "file.csv").write_text("x\n")
    err = _one_line(capsys, cli(["index", "--embeddings", str(emb), "--output", str(tmp_path / "file.csv")]))
    assert "already exists" in err and "--add" not in err  # a file is no index to add to
    assert cli(["index", "--embeddings", str(emb), "--output", str(idx)]) == 0
    capsys.readouterr()
    assert "--add" in _one_line(capsys, cli(["index", "--embeddings", str(emb), "--output", str(idx)]))
    # The index's model moved away: said as that, not as a mistyped folder near some other one.
    shutil.copytree(tiny_model, tmp_path / "model")
    assert cli(["embed", "--model", str(tmp_path / "model"), "--texts", str(tmp_path / "t.txt"),
                "--output", str(tmp_path / "emb2")]) == 0
    assert cli(["index", "--embeddings", str(tmp_path / "emb2"), "--output", str(tmp_path / "idx2")]) == 0
    (tmp_path / "model").rename(tmp_path / "moved")
    capsys.readouterr()
    err = _one_line(capsys, cli(["search", "--index", str(tmp_path / "idx2"), "--text", "a circle"]))
    assert f"was made with {tmp_path / 'model'}" in err and "which is gone (moved or deleted)" in err
    assert "name where it is now with --model" in err and "did you mean" not in err
    assert cli(["search", "--index", str(tmp_path / "idx2"), "--text", "a circle", "--model",
                str(tmp_path / "moved")]) == 0


def test_classify_refuses_classes_the_models_tokenizer_reads_alike(tiny_model, photos, capsys):
    """An uncased tokenizer reads 'Cat' as 'cat', and every emoji as [UNK]: such classes tied exactly."""
    base = ["classify", "--model", str(tiny_model), "--images", str(photos / "red"), "--templates", "none"]
    code = cli(base + ["--classes", "Cat,dog,cat,CAT"])
    said = capsys.readouterr()
    assert code == 2 and said.out == "" and "Traceback" not in said.err, said  # refused before any work
    assert said.err.strip().endswith("classes 'Cat', 'cat' and 'CAT' are the same to this model's tokenizer (each "
                                     "reads as 'cat'), so they would tie; name classes it tells apart"), said
    assert len(said.err.strip().splitlines()) == 1
    err = _one_line(capsys, cli(base + ["--classes", "\N{CAT FACE},\N{DOG FACE}"]))
    assert "classes '\N{CAT FACE}' and '\N{DOG FACE}' are the same" in err and "reads as '[UNK]'" in err
    # Prompted with underscores read as spaces, dark_red and "dark red" are one prompt: they tie too.
    err = _one_line(capsys, cli(base + ["--classes", "dark_red,dark red,blue"]))
    assert "classes 'dark_red' and 'dark red' are the same to this model's tokenizer" in err
    assert cli(base + ["--classes", "cat,dog"]) == 0


def test_classify_writes_the_files_it_read_as_predict_names_them(tiny_model, photos, tmp_path, monkeypatch):
    monkeypatch.chdir(photos.parent)  # images named relative to here: the output names them whole
    out = tmp_path / "p.csv"
    assert cli(["classify", "--model", str(tiny_model), "--images", f"{photos.name}/red", "--classes", "a,b",
                "--output", str(out)]) == 0
    assert [r["image"] for r in csv.DictReader(out.open())] == [str(p) for p in sorted((photos / "red").iterdir())]


def test_classify_names_each_unusable_image_once(tiny_model, photos, tmp_path, capsys):
    images = tmp_path / "imgs"
    shutil.copytree(photos / "red", images)
    (images / "broken.png").write_bytes(b"not a png")
    Image.new("RGB", (5000, 10)).save(images / "wide.png")  # readable, refused for its shape
    assert cli(["classify", "--model", str(tiny_model), "--images", str(images), "--classes", "a,b"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "2 image(s) could not be used (unreadable, or refused for their size or shape)" in said
    line = said.split("could not be used")[1]
    assert line.count("broken.png") + line.count("wide.png") == 1, line  # the path once, with its reason
    # None usable: refused in one line (it had ended 0, a table of errors its result), nothing written.
    err = _one_line(capsys, cli(["classify", "--model", str(tiny_model), "--images", str(images / "broken.png"),
                                 str(images / "wide.png"), "--classes", "a,b", "--output", str(tmp_path / "p.csv")]))
    assert "none of the 2 image(s) could be used, e.g." in err and not (tmp_path / "p.csv").exists()


def test_an_image_whose_name_is_not_utf8_is_counted_not_a_traceback(tiny_model, photos, tmp_path, capsys):
    # Its name cannot go into parquet, embed.json or a UTF-8 table: embed and classify --output had
    # ended in a UnicodeEncodeError traceback, and embed's half-made output refused the rerun.
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(photos / "red" / "0.png", folder / "ok.png")
    bad = os.fsdecode(bytes(folder) + b"/bad\xffname.png")
    shutil.copy(photos / "blue" / "0.png", bad)
    assert cli(["embed", "--model", str(tiny_model), "--images", str(folder), "--output", str(tmp_path / "e")]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "1 other file left out: 1 with a name that is not UTF-8 (rename them)" in said, said
    assert [Path(m["image_path"]).name for m in read_embeddings(tmp_path / "e").metadata] == ["ok.png"]
    assert cli(["classify", "--model", str(tiny_model), "--images", str(folder), "--classes", "red,blue",
                "--output", str(tmp_path / "c.csv")]) == 0
    assert [r["image"] for r in csv.DictReader(open(tmp_path / "c.csv"))] == [str(folder / "ok.png")]
    err = _one_line(capsys, cli(["embed", "--model", str(tiny_model), "--images", bad, "--output",
                                 str(tmp_path / "e2")]))
    assert "no image files match" in err and "not UTF-8" in err, err


def test_texts_that_name_a_folder_or_a_device_say_what_they_are(tiny_model, tmp_path, capsys):
    # Both had been "text file X does not exist".
    for path, said in ((tmp_path, f"{tmp_path} is a folder; --texts takes one file"),
                       ("/dev/null", "text file /dev/null is not a regular file (a device or a pipe)"),
                       (tmp_path / "no.txt", f"text file {tmp_path / 'no.txt'} does not exist")):
        err = _one_line(capsys, cli(["embed", "--model", str(tiny_model), "--texts", str(path), "--output",
                                     str(tmp_path / "e")]))
        assert said in err, err


def test_two_embed_runs_never_write_one_output_at_once(tiny_model, photos, tmp_path, capsys):
    # Both had found it empty and gone ahead, or one had said it "already holds other files".
    from flava.io.locks import hold

    out = tmp_path / "e"
    out.mkdir()
    with hold(out / ".lock", str(out), "wait", remove=True):  # another embed, writing there now
        err = _one_line(capsys, cli(["embed", "--model", str(tiny_model), "--images", str(photos), "--output",
                                     str(out)]))
        assert f"{out} is in use by another flava run (pid {os.getpid()}" in err
        assert "wait for the other `flava embed` to end" in err
    assert list(out.iterdir()) == []
    assert cli(["embed", "--model", str(tiny_model), "--images", str(photos), "--output", str(out)]) == 0
    assert not (out / ".lock").exists() and len(read_embeddings(out).metadata) == 12
    # A run that could embed nothing leaves no folder it made (its inputs listed, none decoded).
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"\x89PNG\r\n not an image")
    err = _one_line(capsys, cli(["embed", "--model", str(tiny_model), "--images", str(tmp_path / "broken"),
                                 "--output", str(tmp_path / "made")]))
    assert "none of the 1 inputs could be embedded" in err and not (tmp_path / "made").exists()


def test_a_product_quantized_index_scores_by_cosine_and_finds_an_indexed_vector_first(tmp_path, monkeypatch):
    # Its inner products are of vectors the codes lengthened: "cosines" past 1 (1.003), and an indexed
    # image searched with its own vector not first. The shortlist is ranked again by cosine.
    import flava.retrieval.index as index_module

    monkeypatch.setattr(index_module, "choose_factory", lambda n, dim, memory: ("IVF4,PQ8x6", 4))
    rng = np.random.default_rng(0)
    # Embeddings as a model's are: clustered, near neighbours closer than the codes' error.
    centres = rng.standard_normal((20, 32))
    v = (centres[rng.integers(0, 20, 2000)] + 0.15 * rng.standard_normal((2000, 32))).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    index = index_from_arrays(v, None, tmp_path / "pq", modality="text")
    hits = index.search(v[:200], k=5)
    scores = np.array([[h.score for h in row] for row in hits])
    assert scores.max() <= 1 + 1e-6 and (np.diff(scores, axis=1) <= 1e-7).all()
    first = sum(row[0].position == i for i, row in enumerate(hits))
    assert first >= 50, first  # 69 of 200 here; ranked by the codes' inner products, 2 (and scores to 1.047)
