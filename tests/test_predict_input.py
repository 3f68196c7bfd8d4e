"""`flava predict` on awkward inputs: an output folder not there yet, labels the model does not know,
blank lines of a .txt, a regression table's target that is not a number. The task models are tiny
and untrained (a random head on the tiny preset's encoder): these tests are about predict's bookkeeping."""

import csv
import re

import numpy as np
import pytest
import torch
from PIL import Image

import flava
from flava.cli import main
from flava.data.tokenizer import TextTokenizer
from flava.finetune.heads import ImageClassifier, ImageHead, TextClassifier, TextHead
from flava.finetune.taskmodel import save_task_model
from flava.model.encoders import ImageEncoder, TextEncoder
from flava.model.flava import TextTower


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Task models saved as `flava finetune` saves them: text (neg, pos), regression, image (blue, red)."""
    root = tmp_path_factory.mktemp("predict_models")
    torch.manual_seed(0)
    cfg = flava.preset("tiny")
    tok = TextTokenizer(max_length=16)
    d = cfg.text.hidden_size
    save_task_model(TextClassifier(TextTower(TextEncoder(cfg.text)), TextHead(d, 2, 0.1)), root / "text",
                    tokenizer=tok, label_names=["neg", "pos"])
    save_task_model(TextClassifier(TextTower(TextEncoder(cfg.text)), TextHead(d, 1, 0.1)), root / "reg",
                    tokenizer=tok)
    save_task_model(ImageClassifier(ImageEncoder(cfg.image), ImageHead(cfg.image.hidden_size, 2, 0.1)),
                    root / "image", label_names=["blue", "red"])
    return root


def printed(capsys) -> tuple[str, str]:
    out, err = capsys.readouterr()
    return " ".join(out.split()), err  # rich wraps lines wherever a word ends


def rows_of(path):
    return list(csv.DictReader(path.open(encoding="utf-8")))


def test_predict_makes_the_output_folder_or_refuses_a_file_in_the_way_first(models, tmp_path, capsys):
    texts = tmp_path / "in.txt"
    texts.write_text("a banana\nthe tree\n")
    out = tmp_path / "not" / "yet" / "p.csv"
    assert main(["predict", "--model", str(models / "text"), "--input", str(texts), "--output", str(out)]) == 0
    assert [r["text"] for r in rows_of(out)] == ["a banana", "the tree"]
    capsys.readouterr()
    # A file where the folder would be: one line before any work, nothing written.
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    assert main(["predict", "--model", str(models / "text"), "--input", str(texts),
                 "--output", str(blocker / "p.csv")]) == 2
    shown, err = printed(capsys)
    assert err.count("\n") == 1 and f"{blocker} is a file; choose another output" in err
    assert "predictions" not in shown and blocker.read_text() == "keep me"


def test_predict_never_writes_over_its_input_nor_over_a_file_without_replace(models, tmp_path, capsys):
    table = tmp_path / "same.csv"
    table.write_text("text\na banana\nthe tree\n")
    before = table.read_text()
    for extra in ([], ["--replace"]):  # the input table had become the predictions
        assert main(["predict", "--model", str(models / "text"), "--input", str(table), "--output", str(table),
                     *extra]) == 2
        _, err = printed(capsys)
        assert err.count("\n") == 1 and f"--output {table} is an input of this command" in err
        assert table.read_text() == before
    notes = tmp_path / "notes.csv"
    notes.write_text("mine\n")
    args = ["predict", "--model", str(models / "text"), "--input", str(table), "--output", str(notes)]
    assert main(args) == 2
    shown, err = printed(capsys)
    assert f"--output {notes} exists; name another file, or add --replace to write over it" in err
    assert "predictions" not in shown and notes.read_text() == "mine\n"
    assert main(args + ["--replace"]) == 0
    assert [r["text"] for r in rows_of(notes)] == ["a banana", "the tree"]


def test_predict_does_not_score_labels_the_model_does_not_know(models, tmp_path, capsys):
    table = tmp_path / "news.csv"
    labels = ["neg", "pos", "neutral", "neg", "mixed", "pos", "neutral"]
    table.write_text("text,label\n" + "".join(f"text number {i},{t}\n" for i, t in enumerate(labels)))
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", str(models / "text"), "--input", str(table), "--output", str(out)]) == 0
    shown, _ = printed(capsys)
    rows = rows_of(out)
    assert [r["true_label"] for r in rows] == labels and all(r["prediction"] in ("neg", "pos") for r in rows)
    right = sum(r["prediction"] == r["true_label"] for r in rows)
    assert (f"accuracy {100 * right / 4:.1f} % ({right} of 4 labelled inputs; not scored: 3 labelled 'neutral', "
            f"'mixed', not among the model's labels (neg, pos))") in shown
    # None it knows: no accuracy at all, rather than 0.
    table.write_text("text,label\nsome text,neutral\nmore text,neutral\n")
    assert main(["predict", "--model", str(models / "text"), "--input", str(table)]) == 0
    shown, _ = printed(capsys)
    assert "no accuracy: the 2 labelled inputs are labelled 'neutral', not among the model's labels (neg, pos)" \
        in shown and "accuracy 0" not in shown
    # An image folder's class sub-folder the model was not trained on.
    rng = np.random.default_rng(0)
    for name in ("blue", "red", "green"):
        (tmp_path / "img" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "img" / name / f"{i}.png")
    out = tmp_path / "img.csv"
    assert main(["predict", "--model", str(models / "image"), "--input", str(tmp_path / "img"),
                 "--output", str(out)]) == 0
    shown, _ = printed(capsys)
    rows = rows_of(out)
    assert len(rows) == 6 and all(r["prediction"] for r in rows)
    right = sum(r["prediction"] == r["true_label"] for r in rows)
    assert (f"accuracy {100 * right / 4:.1f} % ({right} of 4 labelled inputs; not scored: 2 labelled 'green', not "
            f"among the model's labels (blue, red))") in shown


def test_predict_keeps_a_txt_inputs_blank_lines_as_inputs_not_used(models, tmp_path, capsys):
    texts = tmp_path / "in.txt"
    texts.write_text("a banana\n\n   \nthe tree\n")
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", str(models / "text"), "--input", str(texts), "--output", str(out)]) == 0
    shown, _ = printed(capsys)
    assert "(2 of 4 inputs)" in shown and "(not used)" in shown  # as a table's empty text is
    assert f"2 input(s) could not be used; predicted the other 2: #1: {texts}, line 2: no text" in shown
    rows = rows_of(out)
    assert [r["text"] for r in rows] == ["a banana", "", "   ", "the tree"]  # row N is line N
    assert [bool(r["prediction"]) for r in rows] == [True, False, False, True]
    assert rows[2]["error"] == f"{texts}, line 3: no text"
    texts.write_text("\n  \n")
    assert main(["predict", "--model", str(models / "text"), "--input", str(texts)]) == 2
    assert f"{texts} holds no text" in capsys.readouterr().err
    texts.write_bytes(b"a banana\ncaf\xe9 au lait\n")  # latin-1, not UTF-8: that line is named, not a traceback
    assert main(["predict", "--model", str(models / "text"), "--input", str(texts), "--output", str(out),
                 "--replace"]) == 0
    assert f"#1: {texts}, line 2: holds bytes that are not UTF-8 text" in printed(capsys)[0]
    assert [bool(r["prediction"]) for r in rows_of(out)] == [True, False]
    texts.write_text("a banana\fsplit nowhere\r\nthe tree\n")  # lines end at newlines only
    assert main(["predict", "--model", str(models / "text"), "--input", str(texts), "--output", str(out),
                 "--replace"]) == 0
    assert [r["text"] for r in rows_of(out)] == ["a banana\fsplit nowhere", "the tree"]
    texts.write_bytes(b"a banana\rthe tree\r")  # old Mac line endings: two lines, as training reads them
    assert main(["predict", "--model", str(models / "text"), "--input", str(texts), "--output", str(out),
                 "--replace"]) == 0
    assert [r["text"] for r in rows_of(out)] == ["a banana", "the tree"]
    texts.write_text("a banana\nthe tree\n", encoding="utf-16")  # as some editors and shells save text
    capsys.readouterr()
    assert main(["predict", "--model", str(models / "text"), "--input", str(texts)]) == 2
    assert "is not UTF-8 text (UTF-16, or holds NUL bytes); save it as UTF-8" in capsys.readouterr().err


def test_predict_refuses_a_regression_target_that_is_not_a_number_before_predicting(models, tmp_path, capsys):
    table = tmp_path / "reg.csv"
    out = tmp_path / "p.csv"
    for value, why in (("abc", "is not a number"), ("nan", "is not finite")):
        table.write_text(f"text,label\nfirst text,0.5\nsecond text,{value}\n")
        assert main(["predict", "--model", str(models / "reg"), "--input", str(table), "--output", str(out)]) == 2
        shown, err = printed(capsys)
        assert err == f"flava predict: error: {table}, line 3: target {value!r} {why}\n"
        assert "predictions" not in shown and not out.exists()


def test_predict_names_every_column_of_a_regression_table(models, tmp_path, capsys):
    table = tmp_path / "reg.csv"
    table.write_text("text,label\nfirst text,0.5\n,1\nthird text,2\n")
    assert main(["predict", "--model", str(models / "reg"), "--input", str(table)]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if " input " in line)
    assert [c.strip() for c in header.strip()[1:-1].split("┃")] == ["#", "input", "predicted value"]  # none blank
    said = re.search(r"Pearson (-?[\d.]+), Spearman (-?[\d.]+) on 2 labelled inputs", " ".join(out.split()))
    assert said and abs(float(said[1])) == abs(float(said[2])) == 1.0  # two points: both correlations are +-1


def test_predict_keeps_input_columns_named_as_its_own_under_another_name(models, tmp_path, capsys):
    # A column named as an output column (a rating called `score`, an earlier run's `prediction`)
    # was dropped without a word.
    import json

    table = tmp_path / "rated.csv"
    table.write_text("id,text,prediction,score,input_score\n7,a banana,MINE,99,x\n8,the tree,OURS,98,y\n")
    for out in (tmp_path / "p.csv", tmp_path / "p.jsonl"):
        assert main(["predict", "--model", str(models / "text"), "--input", str(table), "--output", str(out)]) == 0
        shown, _ = printed(capsys)
        assert ("note: the input's columns prediction, score are written as input_prediction, input_input_score: "
                "the predictions use those names") in shown
        rows = rows_of(out) if out.suffix == ".csv" else [json.loads(x) for x in out.read_text().splitlines()]
        assert [(r["id"], r["input_prediction"], r["input_input_score"], r["input_score"]) for r in rows] == \
            [("7", "MINE", "99", "x"), ("8", "OURS", "98", "y")]
        assert all(r["prediction"] in ("neg", "pos") and 0 < float(r["score"]) <= 1 for r in rows)


def test_predict_reads_a_parquet_tables_image_bytes_and_names_a_url_as_one(models, tmp_path, capsys):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    pngs = []
    for rgb in ((20, 20, 220), (220, 20, 20)):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), rgb).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    pq.write_table(pa.table({"image": pngs, "label": ["blue", "red"]}), tmp_path / "in.parquet")
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", str(models / "image"), "--input", str(tmp_path / "in.parquet"),
                 "--output", str(out)]) == 0
    rows = rows_of(out)
    assert [r["image"] for r in rows] == [f"{tmp_path / 'in.parquet'}, row {i}" for i in (1, 2)]  # not the bytes
    assert all(r["prediction"] in ("blue", "red") and not r.get("error") for r in rows)
    Image.open(io.BytesIO(pngs[0])).save(tmp_path / "0.png")
    (tmp_path / "in.csv").write_text("image,label\nhttp://example.com/a.png,blue\n0.png,blue\n")
    capsys.readouterr()
    assert main(["predict", "--model", str(models / "image"), "--input", str(tmp_path / "in.csv"),
                 "--output", str(out), "--replace"]) == 0
    rows = rows_of(out)
    assert rows[0]["error"] == "cannot use image http://example.com/a.png: image URL, not downloaded"
    assert rows[1]["prediction"] and not rows[1]["error"]


def test_predict_takes_an_image_glob_and_writes_one_header_whatever_the_rows(models, tmp_path, capsys):
    for i, rgb in enumerate(((20, 20, 220), (220, 20, 20), (20, 20, 200))):
        Image.new("RGB", (16, 16), rgb).save(tmp_path / f"{i}{'a' if i < 2 else 'b'}.png")
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", str(models / "image"), "--input", str(tmp_path / "*a.png"),
                 "--output", str(out)]) == 0  # quoted, as a shell passes a pattern that matched nothing
    assert [r["image"] for r in rows_of(out)] == [str(tmp_path / "0a.png"), str(tmp_path / "1a.png")]
    header = out.read_text().splitlines()[0]
    assert header == "image,prediction,score,top,error"  # `error` there, empty, when every input was used
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert main(["predict", "--model", str(models / "image"), "--input", str(tmp_path / "broken.png"),
                 str(tmp_path / "0a.png"), "--output", str(out), "--replace"]) == 0
    assert out.read_text().splitlines()[0] == header
    capsys.readouterr()
    assert main(["predict", "--model", str(models / "image"), "--input", str(tmp_path / "*c.png")]) == 2
    assert "no image files match" in capsys.readouterr().err


def test_predict_reads_a_table_as_fine_tuning_reads_it_and_refuses_a_table_among_images(models, tmp_path, capsys):
    # A visual-entailment table's `question` column, which fine-tuning trains on, was "no column
    # 'text'" to predict; a list or boolean text was predicted on as "['a', 'b']" or "True"; a table
    # named after an image was read as an image.
    from flava.finetune.heads import MultimodalClassifier, MultimodalHead

    torch.manual_seed(0)
    cfg = flava.preset("tiny")
    save_task_model(MultimodalClassifier(flava.FlavaModel(cfg), MultimodalHead(cfg.multimodal.hidden_size, 32, 2, 0.1)),
                    tmp_path / "ve", task="visual-entailment", tokenizer=TextTokenizer(max_length=16),
                    label_names=["contradiction", "entailment"])
    Image.new("RGB", (32, 32), (200, 0, 0)).save(tmp_path / "red.png")
    (tmp_path / "ve.csv").write_text("image,question,label\nred.png,the picture is red,entailment\n")
    assert main(["predict", "--model", str(tmp_path / "ve"), "--input", str(tmp_path / "ve.csv"),
                 "--output", str(tmp_path / "ve_out.csv")]) == 0
    [row] = rows_of(tmp_path / "ve_out.csv")
    assert row["question"] == "the picture is red" and row["prediction"] in ("contradiction", "entailment")
    (tmp_path / "odd.jsonl").write_text('{"text": ["good", "movie"]}\n{"text": true}\n{"text": "fine"}\n')
    assert main(["predict", "--model", str(models / "text"), "--input", str(tmp_path / "odd.jsonl"),
                 "--output", str(tmp_path / "odd_out.csv")]) == 0
    rows = rows_of(tmp_path / "odd_out.csv")
    assert [r["error"] for r in rows] == [
        f'{tmp_path / "odd.jsonl"}, line 1: the text ["good", "movie"] is a list; write it as one string',
        f"{tmp_path / 'odd.jsonl'}, line 2: the text true is a boolean; write it as one string", ""]
    assert rows[2]["prediction"] in ("neg", "pos")
    capsys.readouterr()
    assert main(["predict", "--model", str(models / "image"), "--input", str(tmp_path / "red.png"),
                 str(tmp_path / "ve.csv")]) == 2
    _, err = printed(capsys)
    assert err.count("\n") == 1 and "give one CSV/JSONL/TXT file or one folder as --input, or image files" in err


def test_a_task_model_refuses_a_tensor_or_a_mapping_of_inputs_in_one_error(models):
    # A [3, H, W] tensor was iterated into three error rows, and a dict of texts predicted by its keys.
    from flava.errors import InputError

    with pytest.raises(InputError, match=r"images must be an image .* got a tensor"):
        flava.load_task(models / "image").predict(images=torch.rand(3, 64, 64))
    with pytest.raises(InputError, match=r"texts must be a list, in order; got a dict"):
        flava.load_task(models / "text").predict(texts={"good movie": 1})
