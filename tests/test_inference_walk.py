"""Defects a tester met in the inference workflows: a long class list, an image of several
captions indexed once a caption, a text file's byte-order mark, malformed memory budgets, `--add`
with `--memory`, a checkpoint's config for `init`, classify and evaluate prompting one folder
otherwise, a folder given as a table."""

import json

import numpy as np
import pytest
from PIL import Image

from flava.cli import main
from flava.errors import InputError
from flava.retrieval.classify import read_list, templates_from
from flava.retrieval.embed import read_embeddings
from flava.retrieval.index import VectorIndex, parse_memory


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_a_class_or_template_list_longer_than_a_file_name_is_a_list():
    # Path(value).is_file() raised ENAMETOOLONG for twenty class names: a traceback.
    classes = ",".join(f"class number {i}" for i in range(20))
    assert len(classes) > 255 and read_list(classes, "classes") == [f"class number {i}" for i in range(20)]
    templates = "|".join(f"a photo of the big {{}} in the picture number {i}" for i in range(8))
    assert len(templates) > 255 and len(templates_from(templates)) == 8


def test_a_path_too_long_is_one_line(tmp_path, capsys):
    long = tmp_path / ("x" * 300)
    assert main(["embed", "--model", "tiny", "--images", str(long / "a.png"), "--output", str(tmp_path / "e")]) == 2
    err = one_line(capsys)
    assert "name too long" in err.lower() and "shorten it" in err, err


@pytest.mark.parametrize("text", ["1.2.3GB", ".", "1e400", "4 GB GB", ""])
def test_a_malformed_memory_budget_is_refused_in_words(text):
    with pytest.raises(InputError, match="is not a size; write e.g. 4GB or 512MB"):
        parse_memory(text)


def test_memory_budgets_that_are_sizes():
    assert parse_memory("4GB") == 4 * 2**30 and parse_memory(".5GiB") == 2**29
    assert parse_memory("2e9") == 2_000_000_000 and parse_memory("1.5m") == 3 * 2**19


@pytest.fixture(scope="module")
def walk(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("walk")
    for name, colour in (("dark_red", (200, 0, 0)), ("light_green", (0, 200, 0)), ("navy_blue", (0, 0, 200))):
        (root / "cls" / name).mkdir(parents=True)
        for i in range(3):
            shade = tuple(min(255, c + 20 * i) for c in colour)
            Image.new("RGB", (40, 40), shade).save(root / "cls" / name / f"{i}.png")
    return root


def test_an_image_of_several_captions_is_indexed_once(tiny_model, walk, tmp_path, capsys):
    # COCO's layout: every caption a row. Its image's vector came back once a caption.
    img = walk / "cls" / "dark_red"
    rows = ["image,caption", f"{img}/0.png,a red square", f"{img}/0.png,a crimson box", f"{img}/0.png,red thing",
            f"{img}/1.png,another red", f"{img}/1.png,red again", f"{img}/2.png,a third"]
    (tmp_path / "coco.csv").write_text("\n".join(rows) + "\n")
    assert main(["embed", "--model", str(tiny_model), "--pairs", str(tmp_path / "coco.csv"), "--output",
                 str(tmp_path / "e"), "--device", "cpu"]) == 0
    assert len(read_embeddings(tmp_path / "e", "image").vectors) == 6
    capsys.readouterr()
    assert main(["index", "--embeddings", str(tmp_path / "e"), "--output", str(tmp_path / "i")]) == 0
    assert "indexed 3 image vectors" in capsys.readouterr().out.replace("\n", " ")
    index = VectorIndex.open(tmp_path / "i")
    assert sorted(index.metadata(i)["image_path"] for i in range(len(index))) == \
        [f"{img}/0.png", f"{img}/1.png", f"{img}/2.png"]
    # Adding a run of the same images again adds none; nor do repeats within a new run.
    rows2 = ["image,caption", f"{img}/2.png,the third again"]
    rows2 += [f"{walk}/cls/navy_blue/0.png,blue {i}" for i in range(3)]
    (tmp_path / "more.csv").write_text("\n".join(rows2) + "\n")
    assert main(["embed", "--model", str(tiny_model), "--pairs", str(tmp_path / "more.csv"), "--output",
                 str(tmp_path / "e2"), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["index", "--embeddings", str(tmp_path / "e2"), "--output", str(tmp_path / "i"), "--add"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "added 1 vector" in out and "4 vectors" in out and "skipped 3 items" in out, out


def test_a_text_files_byte_order_mark_is_not_text(tiny_model, tmp_path, capsys):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfgoal match\r\nchip code\r\nsoup\r\n")
    (tmp_path / "plain.txt").write_text("goal match\nchip code\nsoup\n")
    for name in ("bom", "plain"):
        assert main(["embed", "--model", str(tiny_model), "--texts", str(tmp_path / f"{name}.txt"), "--output",
                     str(tmp_path / f"e-{name}"), "--device", "cpu"]) == 0
    bom = read_embeddings(tmp_path / "e-bom")
    assert [m["caption"] for m in bom.metadata] == ["goal match", "chip code", "soup"]
    np.testing.assert_array_equal(bom.vectors, read_embeddings(tmp_path / "e-plain").vectors)
    assert main(["index", "--embeddings", str(tmp_path / "e-bom"), "--output", str(tmp_path / "i")]) == 0
    capsys.readouterr()
    assert main(["index", "--embeddings", str(tmp_path / "e-plain"), "--output", str(tmp_path / "i"), "--add"]) == 2
    assert "already in the index" in one_line(capsys)


def test_add_refuses_a_memory_budget_it_would_ignore(tiny_model, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("one\ntwo\n")
    (tmp_path / "u.txt").write_text("three\n")
    for name in ("t", "u"):
        assert main(["embed", "--model", str(tiny_model), "--texts", str(tmp_path / f"{name}.txt"), "--output",
                     str(tmp_path / f"e-{name}"), "--device", "cpu"]) == 0
    assert main(["index", "--embeddings", str(tmp_path / "e-t"), "--output", str(tmp_path / "i")]) == 0
    before = json.loads((tmp_path / "i" / "index.json").read_text())
    capsys.readouterr()
    assert main(["index", "--embeddings", str(tmp_path / "e-u"), "--output", str(tmp_path / "i"), "--add",
                 "--memory", "banana"]) == 2
    assert "leave out --memory with --add" in one_line(capsys)
    assert json.loads((tmp_path / "i" / "index.json").read_text()) == before


def test_init_takes_a_checkpoints_own_config(tiny_model, tmp_path, capsys):
    # The README says init takes a model's config file; a checkpoint's was read as training settings.
    assert main(["init", "--config", str(tiny_model / "config.json"), "--output", str(tmp_path / "m")]) == 0
    model = json.loads((tmp_path / "m" / "config.json").read_text())["model"]
    assert model == json.loads((tiny_model / "config.json").read_text())["model"]


def test_classify_prompts_folder_names_as_evaluate_does(tiny_model, walk, tmp_path, capsys, monkeypatch):
    # evaluate's zero-shot task prompts dark_red as "dark red"; classify --labels had prompted "dark_red"
    # and scored the same folder otherwise. The prompts each embeds are compared.
    import flava.evaluate.zero_shot as zero_shot

    prompted = []
    original = zero_shot.text_embeddings

    def recording(model, prompts, *args, **kwargs):
        prompted.append(list(prompts))
        return original(model, prompts, *args, **kwargs)

    monkeypatch.setattr(zero_shot, "text_embeddings", recording)
    assert main(["classify", "--model", str(tiny_model), "--images", str(walk / "cls"), "--labels", "--templates",
                 "short", "--output", str(tmp_path / "c.csv")]) == 0
    suite = {"name": "us", "tasks": [{"kind": "zero-shot", "folder": str(walk / "cls"), "templates": "short"}]}
    (tmp_path / "suite.json").write_text(json.dumps(suite))
    assert main(["evaluate", "--model", str(tiny_model), "--suite", str(tmp_path / "suite.json"), "--output",
                 str(tmp_path / "r")]) == 0
    classify, evaluate = prompted[0], prompted[-1]
    assert classify == evaluate and all(p.endswith(("dark red.", "light green.", "navy blue.")) for p in classify)
    labels = (tmp_path / "c.csv").read_text()
    assert "dark_red" in labels and "dark red" not in labels  # the labels stay the folders' names


def test_a_folder_given_as_a_table_is_called_a_folder(tiny_model, walk, tmp_path, capsys):
    assert main(["finetune", "--model", str(tiny_model), "--task", "vqa", "--train", str(walk / "cls"), "--output",
                 str(tmp_path / "ft"), "--max-steps", "1"]) == 2
    assert "not a folder" in one_line(capsys)
