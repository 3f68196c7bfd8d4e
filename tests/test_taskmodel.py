"""Task models: `flava finetune` keeps its result, `flava predict` and `flava.load_task` use it and
give exactly the in-memory classifier's outputs; damaged directories and bad images are reported."""

import csv
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import flava
from flava.cli import main
from flava.cli.finetune import read_task
from flava.data.tokenizer import TextTokenizer
from flava.data.transforms import eval_transform
from flava.errors import CheckpointError, ConfigError, DataError, InputError
from flava.finetune.examples import TextData, TextExample
from flava.finetune.loop import finetune_image, finetune_multimodal, finetune_text
from flava.finetune.settings import FinetuneSettings
from flava.finetune.load import load_task
from flava.finetune.taskmodel import save_task_model
from flava.finetune.text import encode_pairs
from flava.evaluate.readers.user_files import read_multimodal_table

WORDS = ["red", "green", "blue", "house", "tree", "river", "stone", "cloud", "paper", "window", "chair", "table",
         "music", "light", "road"]
COLOURS = {"red": (200, 30, 30), "blue": (30, 30, 200)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny checkpoint, keyword CSVs (label 'present' iff the text says banana), a colour image
    folder per split, an image + text CSV and a count-regression CSV."""
    root = tmp_path_factory.mktemp("taskdata")
    torch.manual_seed(0)
    flava.FlavaModel(flava.preset("tiny")).save_pretrained(root / "ckpt")
    rng = np.random.default_rng(0)
    for split, n in (("train", 96), ("test", 24)):
        with open(root / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for i in range(n):
                words = list(rng.choice(WORDS, 5))
                if i % 2:
                    words[rng.integers(0, 5)] = "banana"
                w.writerow([" ".join(words), "present" if i % 2 else "absent"])
    with open(root / "count.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for _ in range(48):
            k = int(rng.integers(0, 4))
            w.writerow([" ".join(["banana"] * k + list(rng.choice(WORDS, 5 - k))), k])
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        for name, colour in COLOURS.items():
            for i in range(n):
                arr = np.clip(np.array(colour) + rng.integers(-25, 25, (24, 24, 3)), 0, 255).astype(np.uint8)
                (root / "img" / split / name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(root / "img" / split / name / f"{i}.png")
    with open(root / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "text", "label"])
        for name in COLOURS:
            for i in range(12):
                w.writerow([f"img/train/{name}/{i}.png", f"is the {rng.choice(WORDS)} {name}?", "yes"])
                other = "blue" if name == "red" else "red"
                w.writerow([f"img/train/{name}/{i}.png", f"is the {rng.choice(WORDS)} {other}?", "no"])
    (root / "broken.png").write_bytes(b"not a png")
    return root


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer(max_length=64)


def probabilities(logits):
    return torch.softmax(logits.double(), dim=1)


def test_text_classifier_through_the_cli_equals_the_in_memory_model(data, tmp_path, capsys, tokenizer):
    out = tmp_path / "keyword"
    args = ["finetune", "--model", str(data / "ckpt"), "--task", "text-classification", "--train",
            str(data / "train.csv"), "--test", str(data / "test.csv"), "--output", str(out), "--epochs", "3",
            "--lr", "1e-3", "--batch-size", "16", "--seed", "3"]
    assert main(args) == 0
    printed = " ".join(capsys.readouterr().out.split())  # lines wrap at 110 columns wherever the path ends
    assert "best validation accuracy" in printed and f"flava predict --model {out}" in printed
    assert sorted(p.name for p in out.iterdir()) == ["checksums.json", "model.safetensors", "special_tokens_map.json",
                                                     "task.json", "tokenizer.json"]
    roles = json.loads((out / "special_tokens_map.json").read_text())
    assert roles["pad_token"] == "[PAD]" and roles["mask_token"] == "[MASK]"  # read back by load_task
    assert main(["info", str(out)]) == 0
    assert "a text-classification task model (`flava finetune`): 2 labels (absent, present)" in " ".join(
        capsys.readouterr().out.split())
    meta = json.loads((out / "task.json").read_text())
    assert meta["task"] == "text-classification" and meta["label_names"] == ["absent", "present"]
    assert list(meta["model"]) == ["text"] and meta["preprocessing"]["max_text_length"] == 64  # text tower only

    # The same run in memory: same data split, settings and seed give the same classifier.
    task = read_task("text-classification", str(data / "train.csv"), None, str(data / "test.csv"), 0.1, 3)
    result = finetune_text(flava.load(data / "ckpt"), task, FinetuneSettings(lr=1e-3, epochs=3, batch_size=16,
                                                                             seed=3), tokenizer)
    texts = [e.text for e in task.test]
    with torch.inference_mode():
        enc = encode_pairs(tokenizer, texts, max_length=64)
        want = probabilities(result.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                          token_type_ids=enc.token_type_ids))
    tm = flava.load_task(out)
    got = tm.predict(texts=texts, top_k=2, batch_size=7)
    assert tm.task == "text-classification" and tm.label_names == ["absent", "present"]
    assert [g["label"] for g in got] == [tm.label_names[i] for i in want.argmax(1).tolist()]
    assert np.allclose([g["score"] for g in got], want.max(1).values.numpy(), atol=1e-6, rtol=0)
    assert np.allclose([g["top"][1]["score"] for g in got], want.min(1).values.numpy(), atol=1e-6, rtol=0)
    assert meta["finetune"]["test_metrics"]["accuracy"] == result.test_metrics["accuracy"] >= 0.9

    # flava predict on a CSV: one row per input, the same predictions, accuracy from the label column.
    preds = tmp_path / "preds.csv"
    assert main(["predict", "--model", str(out), "--input", str(data / "test.csv"), "--output", str(preds)]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(preds.open()))
    assert [r["prediction"] for r in rows] == [g["label"] for g in got]
    assert np.allclose([float(r["score"]) for r in rows], [g["score"] for g in got], atol=1e-12)
    right = sum(r["prediction"] == r["true_label"] for r in rows)
    assert f"accuracy {100 * right / 24:.1f} % ({right} of 24 labelled inputs)" in printed and right >= 22
    assert rows[0]["top"].count("|") == 1  # two labels, both kept


def test_image_classifier_from_class_folders(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "colours"
    args = ["finetune", "--model", str(data / "ckpt"), "--task", "image-classification", "--train",
            str(data / "img" / "train"), "--val", str(data / "img" / "val"), "--output", str(out), "--epochs", "3",
            "--lr", "1e-2", "--batch-size", "8", "--head-only"]
    with monkeypatch.context() as m:  # refused before anything is read or written
        m.setattr(torch.cuda, "is_available", lambda: False)
        assert main(args + ["--device", "cuda"]) == 2
    assert "device 'cuda' was asked for but CUDA is not available; use --device cpu" in capsys.readouterr().err
    assert not out.exists()
    assert main(args) == 0
    assert f"model: {data / 'ckpt'} on cpu; head only" in capsys.readouterr().out
    meta = json.loads((out / "task.json").read_text())
    assert meta["task"] == "image-classification" and meta["label_names"] == ["blue", "red"]
    assert list(meta["model"]) == ["image"] and not (out / "tokenizer.json").exists()
    assert meta["finetune"]["test_metrics"] == {}  # no --test: nothing claims to be a test score
    capsys.readouterr()

    # An image folder with class sub-folders is scored; a broken file among good ones is reported.
    assert main(["predict", "--model", str(out), "--input", str(data / "img" / "test"), "--device", "cpu"]) == 0
    assert "accuracy 100.0 % (8 of 8 labelled inputs)" in capsys.readouterr().out
    assert main(["predict", "--model", str(out), "--input", str(data / "img" / "test"), "--device", "nope"]) == 2
    assert "--device 'nope' is no device: cpu, cuda, cuda:N or mps" in capsys.readouterr().err
    with monkeypatch.context() as m:  # said as pretrain says it
        m.setattr(torch.cuda, "is_available", lambda: False)
        assert main(["predict", "--model", str(out), "--input", str(data / "img" / "test"), "--device", "cuda"]) == 2
    assert "device 'cuda' was asked for but CUDA is not available; use --device cpu" in capsys.readouterr().err
    good = [data / "img" / "test" / "red" / "0.png", data / "img" / "test" / "blue" / "1.png"]
    preds = tmp_path / "p.jsonl"
    assert main(["predict", "--model", str(out), "--input", str(good[0]), str(data / "broken.png"), str(good[1]),
                 "--output", str(preds)]) == 0
    printed = capsys.readouterr().out
    assert "1 input(s) could not be used" in printed and "broken.png: unreadable image" in printed
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r.get("prediction") for r in rows] == ["red", None, "blue"] and "unreadable" in rows[1]["error"]
    # A name that is not UTF-8 is an error row: the output table cannot hold it (it was a traceback).
    odd = os.fsdecode(bytes(tmp_path) + b"/odd\xffname.png")
    shutil.copy(good[0], odd)
    assert main(["predict", "--model", str(out), "--input", odd, str(good[1]), "--output", str(preds),
                 "--replace"]) == 0
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r.get("prediction") for r in rows] == [None, "blue"], rows
    assert rows[0]["error"].endswith("odd\ufffdname.png: its name is not UTF-8; rename it"), rows[0]

    # The same image as a path, a PIL image and an array gives the same prediction: the same to the
    # bit alone; in one batch, to float precision (some CPUs' matmul kernels round a batch's first
    # row otherwise than the rest: 2e-10 apart in one machine's probabilities).
    tm = load_task(out)
    image = Image.open(good[0])
    alone = [tm.predict(images=[x])[0] for x in (good[0], image, np.asarray(image))]
    assert alone[0] == alone[1] == alone[2] and alone[0]["label"] == "red"
    got = tm.predict(images=[good[0], image, np.asarray(image), data / "missing.png"])
    assert [g["label"] for g in got[:3]] == ["red"] * 3 and "missing image file" in got[3]["error"]
    assert np.allclose([g["score"] for g in got[:3]], alone[0]["score"], atol=1e-7, rtol=0)
    assert tm.predict(images=good[1])[0]["label"] == "blue"  # a single image is a list of one


def test_image_csv_reader(data, tmp_path):
    table = tmp_path / "images.csv"
    table.write_text("image,label\n" + "".join(f"{data}/img/train/{c}/{i}.png,{c}\n" for c in COLOURS for i in range(5)))
    task = read_task("image-classification", str(table), None, str(data / "img" / "test"), 0.2, 0)
    assert task.label_names == ["blue", "red"] and (len(task.train), len(task.val), len(task.test)) == (8, 2, 8)
    assert {e.label for e in task.test} == {0, 1} and all(e.image.is_file() for e in task.train)
    (tmp_path / "val" / "green").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "green" / "0.png")
    with pytest.raises(DataError, match="label 'green' is not a class of the training data"):
        read_task("image-classification", str(table), str(tmp_path / "val"), None, 0.2, 0)


def test_image_finetune_full_saves_the_trained_encoder(data, tmp_path):
    model = flava.load(data / "ckpt")
    task = read_task("image-classification", str(data / "img" / "train"), str(data / "img" / "val"), None, 0.1, 0)
    result = finetune_image(model, task, FinetuneSettings(lr=1e-3, epochs=1, batch_size=8))
    assert result.steps == 3 and not torch.equal(result.model.encoder.patch_embed.weight,
                                                 model.image_encoder.patch_embed.weight)
    save_task_model(result, tmp_path / "img")
    tm = load_task(tmp_path / "img")
    files = [e.image for e in task.val]
    with torch.inference_mode():
        want = probabilities(result.model(torch.stack([eval_transform(Image.open(f), 64) for f in files])))
    got = tm.predict(images=files, batch_size=3)
    assert np.allclose([g["score"] for g in got], want.max(1).values.numpy(), atol=1e-6, rtol=0)
    assert [g["label"] for g in got] == [task.label_names[i] for i in want.argmax(1).tolist()]


def test_image_text_classifier(data, tmp_path, capsys, tokenizer):
    out = tmp_path / "colour-questions"
    assert main(["finetune", "--model", str(data / "ckpt"), "--task", "image-text-classification", "--train",
                 str(data / "pairs.csv"), "--output", str(out), "--max-steps", "4", "--batch-size", "8",
                 "--head-only", "--val-fraction", "0.25"]) == 0
    capsys.readouterr()
    meta = json.loads((out / "task.json").read_text())
    assert meta["label_names"] == ["no", "yes"] and meta["preprocessing"]["image_size"] == 64
    assert "multimodal" in meta["model"]  # the whole FlavaModel

    task = read_multimodal_table(data / "pairs.csv", val_fraction=0.25)
    # Validation is carved by image: both questions about an image fall on one side.
    assert not {e.image for e in task.train} & {e.image for e in task.val} and len(task.val) == 12
    # ... and the note counts images, then examples: a share of images is not that share of rows.
    images, held = len({e.image for e in task.train + task.val}), len({e.image for e in task.val})
    assert f"validation: a seeded 25% of the training images ({held} of {images}, with 12 of the " \
           f"{len(task.train) + 12} examples)" in task.notes
    result = finetune_multimodal(flava.load(data / "ckpt"), task, FinetuneSettings(
        lr=1e-3, max_steps=4, batch_size=8, train_encoders=False), tokenizer)
    tm = save_task_model(result, tmp_path / "mm", tokenizer=tokenizer)
    assert tm.task == "image-text-classification"
    loaded = load_task(tmp_path / "mm")
    images, texts = [e.image for e in task.val], [e.text for e in task.val]
    with torch.inference_mode():
        enc = encode_pairs(tokenizer, texts, max_length=64)
        pixels = torch.stack([eval_transform(Image.open(p), 64) for p in images])
        want = probabilities(result.model(pixel_values=pixels, image_index=torch.arange(len(images)),
                                          input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                          token_type_ids=enc.token_type_ids))
    got = loaded.predict(images=images, texts=texts)
    assert np.allclose([g["score"] for g in got], want.max(1).values.numpy(), atol=1e-6, rtol=0)
    with pytest.raises(InputError, match="needs texts"):
        loaded.predict(images=images)
    with pytest.raises(InputError, match="differ in length"):
        loaded.predict(images=images, texts=texts[:2])

    # flava predict on the CSV: the image column is read relative to the file.
    preds = tmp_path / "mm.csv"
    assert main(["predict", "--model", str(out), "--input", str(data / "pairs.csv"), "--output", str(preds)]) == 0
    rows = list(csv.DictReader(preds.open()))
    right = sum(r["prediction"] == r["true_label"] for r in rows)
    assert len(rows) == 48 and f"accuracy {100 * right / 48:.1f} % ({right} of 48 labelled inputs)" in capsys.readouterr().out
    assert rows[0]["image"].endswith("img/train/red/0.png") and rows[0]["text"].startswith("is the")


def test_text_regression(data, tmp_path, capsys, tokenizer):
    rng = np.random.default_rng(1)

    def examples(n):
        return [TextExample(" ".join(["banana"] * (k := int(rng.integers(0, 4))) + list(rng.choice(WORDS, 5 - k))),
                            float(k)) for _ in range(n)]

    task = TextData("count", examples(32), examples(8), examples(8), [], ("pearson", "spearman"))
    result = finetune_text(flava.load(data / "ckpt"), task, FinetuneSettings(lr=1e-3, epochs=1, batch_size=16),
                           tokenizer)
    for _ in range(2):  # an earlier task model is replaced whole
        save_task_model(result, tmp_path / "count", tokenizer=tokenizer)
    tm = load_task(tmp_path / "count")
    assert tm.task == "text-regression" and tm.label_names == []
    texts = [e.text for e in task.test]
    with torch.inference_mode():
        enc = encode_pairs(tokenizer, texts, max_length=64)
        want = result.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                            token_type_ids=enc.token_type_ids)[:, 0]
    got = tm.predict(texts=texts)
    assert all(set(g) == {"value"} for g in got)
    with pytest.raises(InputError, match=r"texts\[1\] is empty"):
        tm.predict(texts=["banana", "  "])
    assert np.allclose([g["value"] for g in got], want.numpy(), atol=1e-6, rtol=0)
    assert main(["predict", "--model", str(tmp_path / "count"), "--input", str(data / "count.csv")]) == 0
    assert "on 48 labelled inputs" in capsys.readouterr().out
    # A model of sentence pairs is pointed at inputs that hold pairs (a .txt holds one text a line).
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("text,text2,label\n" + "".join(f"{w} banana,{w},{i % 3}\n" for i, w in enumerate(WORDS * 2)))
    assert main(["finetune", "--model", str(data / "ckpt"), "--task", "text-regression", "--train", str(pairs),
                 "--output", str(tmp_path / "pairs"), "--max-steps", "1", "--head-only"]) == 0
    printed = " ".join(capsys.readouterr().out.split())  # as one line: the console wraps long ones
    assert "--input FILE.csv|FILE.jsonl [--output" in printed and "predict(texts=[...], texts2=[...])" in printed
    # A blank text is no input: an error row, not a prediction.
    (tmp_path / "blank.csv").write_text("id,text\n7,banana banana\n8,   \n")
    assert main(["predict", "--model", str(tmp_path / "count"), "--input", str(tmp_path / "blank.csv"),
                 "--output", str(tmp_path / "blank-out.csv")]) == 0
    assert "(not used)" in capsys.readouterr().out  # not a prediction of a class called "error"
    rows = list(csv.DictReader((tmp_path / "blank-out.csv").open()))
    assert rows[0]["error"] == "" and "no text" in rows[1]["error"] and rows[1]["value"] == ""
    assert [r["id"] for r in rows] == ["7", "8"]  # the input's other columns come along, to join on
    # A missing column is named with the columns in the file's order and the nearest one.
    (tmp_path / "notext.csv").write_text("txt,label\na,1\n")
    assert main(["predict", "--model", str(tmp_path / "count"), "--input", str(tmp_path / "notext.csv")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "has no column 'text' (columns: txt, label; the nearest is 'txt')" in err
    with pytest.raises(ConfigError, match="one output and no label names"):
        save_task_model(result, tmp_path / "bad", tokenizer=tokenizer, label_names=["a"])


def test_finetune_shows_a_regressions_mean_absolute_error(data, tmp_path, capsys):
    # Pearson and Spearman alone: a model off by a constant or a scale had looked perfect.
    assert main(["finetune", "--model", str(data / "ckpt"), "--task", "text-regression", "--train",
                 str(data / "count.csv"), "--test", str(data / "count.csv"), "--output", str(tmp_path / "out"),
                 "--max-steps", "1", "--head-only"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if " mae " in line)
    validation, test = map(float, re.findall(r"\d+\.\d+", row))
    meta = json.loads((tmp_path / "out" / "task.json").read_text())["finetune"]
    assert test == pytest.approx(meta["test_metrics"]["mae"], rel=1e-3)  # as measured, not x100
    assert validation == pytest.approx(meta["val_metrics"]["mae"], rel=1e-3)
    assert "scores x100; mae as measured" in " ".join(out.split())


def test_vqa_table_reader_and_top_answers(data, tmp_path, tokenizer):
    rows = [{"image": f"img/train/{c}/{i}.png", "question": "what colour?", "answers": [c, c, "purple"]}
            for c in COLOURS for i in range(4)]
    rows[0]["answers"] = ["red"]
    (data / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = read_multimodal_table(data / "vqa.jsonl", kind="vqa", val_fraction=0.25)
    assert task.label_names == ["blue", "red"] and task.metrics == ("vqa_score",)
    scores = {(str(e.image).split("/")[-2], tuple(sorted(e.answers.values()))) for e in task.train + task.val}
    assert ("red", (1.0,)) in scores and ("blue", (2 / 3,)) in scores  # one answer scores 1; two of three, 2/3
    # Ten annotators (VQAv2's count): trained on min(1, n/3), validated and tested by the official
    # VQA accuracy, where three of ten score 0.9.
    ten = [{"image": rows[i]["image"], "question": "what colour?", "answers": ["blue"] * n + ["red"] * (10 - n)}
           for i, n in ((1, 3), (5, 7))]
    (data / "ten.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ten))
    ten_task = read_multimodal_table(data / "vqa.jsonl", data / "ten.jsonl", data / "ten.jsonl", kind="vqa")
    assert [e.answers for e in ten_task.val + ten_task.test] == [{0: 0.9, 1: 1.0}, {0: 1.0, 1: 0.9}] * 2
    ten_task = read_multimodal_table(data / "ten.jsonl", kind="vqa", val_fraction=0.5)
    assert [e.answers for e in ten_task.train] == [{0: 1.0, 1: 1.0}]
    assert [sorted(e.answers.values()) for e in ten_task.val] == [[0.9, 1.0]]
    result = finetune_multimodal(flava.load(data / "ckpt"), task, FinetuneSettings(max_steps=1, batch_size=4),
                                 tokenizer)
    tm = save_task_model(result, tmp_path / "vqa", tokenizer=tokenizer)
    got = load_task(tmp_path / "vqa").predict(images=[data / rows[0]["image"]], texts=["what colour?"], top_k=5)
    assert tm.task == "vqa" and got[0]["top"][0]["label"] == got[0]["label"]
    assert sorted(t["label"] for t in got[0]["top"]) == ["blue", "red"] and 0 < got[0]["score"] < 1


def test_damaged_or_wrong_task_dirs(data, tmp_path, capsys, tokenizer):
    task = TextData("k", [TextExample("banana", 1), TextExample("tree", 0)] * 4, [TextExample("banana", 1)] * 2,
                    [TextExample("tree", 0)], ["absent", "present"], ("accuracy",))
    result = finetune_text(flava.load(data / "ckpt"), task, FinetuneSettings(max_steps=1, train_encoders=False),
                           tokenizer)
    good = tmp_path / "good"
    save_task_model(result, good, tokenizer=tokenizer)
    texts = tmp_path / "in.txt"
    texts.write_text("a banana\na tree\n")
    assert main(["predict", "--model", str(good), "--input", str(texts)]) == 0
    capsys.readouterr()

    weights = good / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["predict", "--model", str(good), "--input", str(texts)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "damaged: model.safetensors is not the file that was written" in err[0]
    (good / "task.json").unlink()
    with pytest.raises(CheckpointError, match="is not a task model: it has no task.json"):
        load_task(good)
    with pytest.raises(CheckpointError, match="pretrained checkpoint: fine-tune it"):
        load_task(data / "ckpt")
    assert main(["predict", "--model", str(tmp_path / "nowhere"), "--input", str(texts)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    # Never overwrite what is not a task model: checked before any training.
    assert main(["finetune", "--model", str(data / "ckpt"), "--task", "text-classification", "--train",
                 str(data / "train.csv"), "--output", str(data / "ckpt")]) == 2
    assert "not a task model; choose another output directory" in capsys.readouterr().err
    assert (data / "ckpt" / "config.json").is_file()
    assert main(["finetune", "--model", str(data / "ckpt"), "--task", "text-clasification", "--train",
                 str(data / "train.csv"), "--output", str(tmp_path / "x")]) == 2
    assert "did you mean 'text-classification'?" in capsys.readouterr().err
