"""`flava evaluate`: suites are checked whole before any task runs; a small suite of every kind
runs end to end into a report whose averages follow from its task scores."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

import flava
from flava.cli import main as cli
from flava.config import preset
from flava.evaluate.suite import load_suite


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220)}
    rows = ["image,caption"]
    for split, n in (("train", 12), ("test", 6)):
        for name, rgb in colours.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                arr = np.full((40, 40, 3), rgb, dtype=np.uint8)
                arr[i % 30: i % 30 + 8, 5:13] = 255
                Image.fromarray(arr).save(root / split / name / f"{i}.png")
                if split == "test" and i < 3:
                    rows.append(f"test/{name}/{i}.png,a {name} square number {i}")
                    rows.append(f"test/{name}/{i}.png,{name} picture {i}")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    words = {"sport": "match goal team", "music": "song band album"}
    for split, n in (("train", 20), ("val", 6), ("test", 8)):
        lines = ["text,label"] + [f"the {words[c].split()[i % 3]} story {i},{c}" for c in words for i in range(n)]
        (root / f"text_{split}.csv").write_text("\n".join(lines) + "\n")
    cfg = preset("tiny")
    flava.FlavaModel(cfg).save_pretrained(root / "model")
    return root


def write_suite(root, tasks, name="s.json"):
    path = root / name
    path.write_text(json.dumps({"name": "t", "tasks": tasks}))
    return path


TASKS = [
    {"kind": "retrieval", "name": "pairs retrieval", "csv": "pairs.csv"},
    {"kind": "zero-shot", "name": "colour zero-shot", "folder": "test", "templates": "short"},
    {"kind": "linear-probe", "name": "colour probe", "modality": "image", "train": "train", "test": "test"},
    {"kind": "linear-probe", "name": "topic probe", "modality": "text", "train": "text_train.csv",
     "val": "text_val.csv", "test": "text_test.csv"},
    {"kind": "finetune-text", "name": "topic fine-tune", "train": "text_train.csv", "val": "text_val.csv",
     "test": "text_test.csv", "settings": {"epochs": 2, "batch_size": 8, "lr": 1e-3}},
]


@pytest.mark.slow
def test_a_suite_runs_end_to_end_into_a_report(suite_dir, tmp_path, capsys):
    suite = write_suite(suite_dir, TASKS)
    out = tmp_path / "report"
    assert cli(["evaluate", "--model", str(suite_dir / "model"), "--suite", str(suite), "--output", str(out),
                "--compare-untrained"]) == 0
    printed = capsys.readouterr().out
    assert "macro average" in printed and "colour probe" in printed
    # Said before the seconds to minutes of reading the suite's data, not only after them.
    assert printed.index(f"reading suite {suite}'s data and checking it") < printed.index("data read and checked")
    report = json.loads((out / "report.json").read_text())
    assert report["models"] == ["model", "untrained"]
    res = report["results"][0]
    assert [t["name"] for t in res["tasks"]] == [t["name"] for t in TASKS]
    # Averages follow from the rows: domains over score rows, macro over domains.
    for domain, avg in res["domain_averages"].items():
        rows = [v for t in res["tasks"] if t["domain"] == domain for v in t["scores"].values()]
        assert avg == pytest.approx(np.mean(rows))
    assert res["macro_average"] == pytest.approx(np.mean(list(res["domain_averages"].values())))
    retrieval = res["tasks"][0]
    assert set(retrieval["scores"]) == {"TR R@1", "TR R@5", "IR R@1", "IR R@5"}
    assert retrieval["scores"]["TR R@1"] == pytest.approx(100 * retrieval["metrics"]["image_to_text_R@1"])
    probe = res["tasks"][2]
    assert probe["scores"]["top-1"] > 90  # colour is linearly readable even from random features
    for t in res["tasks"]:
        for pic in t["pictures"]:
            assert (out / pic).stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "| macro average |" in md and "![pairs retrieval]" in md


@pytest.mark.parametrize("task, error", [
    ({"kind": "retrieval", "data": "coco"}, "no packaged data set 'coco' for retrieval"),
    ({"kind": "retrieval", "csv": "nowhere.csv"}, "does not exist"),
    ({"kind": "linear-probe", "modality": "image", "data": "digits", "limt": 5}, "did you mean 'limit'"),
    ({"kind": "linear-prob", "data": "digits"}, "did you mean 'linear-probe'"),
    ({"kind": "linear-probe", "modality": "text", "train": "text_train.csv", "test": "bad_labels.csv"},
     "labels \\['politics'\\] outside the training labels"),
    ({"kind": "finetune-text", "train": "text_train.csv", "test": "empty.csv"}, "no rows|empty"),
    ({"kind": "linear-probe", "modality": "image", "train": "train", "test": "extra_class"}, "outside the training"),
    # One class: zero-shot would score a certain 100 % into the averages; a probe has nothing to tell apart.
    ({"kind": "zero-shot", "folder": "one_class"}, "needs at least two classes; found only 'red'"),
    # Found while the data is checked, not when its task runs after the others.
    ({"kind": "zero-shot", "folder": "broken"}, r"broken/red/bad.png is not a readable image; remove or replace it"),
    # Every unreadable file is counted and the first few named: one run per broken file had found them.
    ({"kind": "zero-shot", "folder": "broken_many"},
     r"7 of the 9 images are not readable images; the first 5: (\S+/bad\d.png, ){4}\S+/bad\d.png; remove or replace them"),
    ({"kind": "linear-probe", "modality": "text", "train": "one_label.csv", "test": "one_label.csv"},
     "at least two classes in train; found only 'sport'"),
    ({"kind": "finetune-text", "data": "bbc-news", "settings": {"epoch": 1}},
     r"task \d+: unknown config key 'settings.epoch'; did you mean 'settings.epochs'"),  # the whole key, once
    ({"kind": "finetune-text", "data": "bbc-news", "lr_sweep": []}, "lr_sweep takes a list of positive"),
    ({"kind": "finetune-text", "data": "bbc-news", "lr_sweep": [1e-4, "3e-4"]}, "lr_sweep takes a list"),
    ({"kind": "finetune-text", "data": "bbc-news", "lr_sweep": [1e-4], "settings": {"lr": 1e-3}},
     "either settings.lr or lr_sweep"),
    ({"kind": "finetune-text", "data": "bbc-news", "lr_sweep": [1e-4, 0.0001]}, r"lr_sweep names a rate twice"),
])
def test_bad_suites_fail_before_any_work(suite_dir, tmp_path, capsys, task, error):
    (suite_dir / "bad_labels.csv").write_text("text,label\na story,politics\n")
    (suite_dir / "empty.csv").write_text("text,label\n")
    (suite_dir / "one_label.csv").write_text("text,label\na match,sport\na goal,sport\n")
    for name in ("red", "blue"):
        (suite_dir / "broken" / name).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(suite_dir / "broken" / name / "0.png")
    (suite_dir / "broken" / "red" / "bad.png").write_bytes(b"not a png")
    for name in ("red", "blue"):
        (suite_dir / "broken_many" / name).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(suite_dir / "broken_many" / name / "0.png")
    for i in range(7):
        (suite_dir / "broken_many" / "red" / f"bad{i}.png").write_bytes(b"not a png")
    (suite_dir / "one_class" / "red").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(suite_dir / "one_class" / "red" / "0.png")
    if not (suite_dir / "extra_class" / "green").exists():
        for name in ("red", "green"):
            (suite_dir / "extra_class" / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(suite_dir / "extra_class" / name / "0.png")
    # A good task first: the bad one must stop the suite before the good one runs.
    suite = write_suite(suite_dir, [TASKS[2], task], name="bad.json")
    out = tmp_path / "report"
    assert cli(["evaluate", "--model", str(suite_dir / "model"), "--suite", str(suite), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flava evaluate: error: task 2") and len(err.strip().splitlines()) == 1, err
    import re

    assert re.search(error, err), err
    assert not out.exists()


def test_a_report_is_written_over_only_with_replace_and_lands_whole(suite_dir, tmp_path, capsys, monkeypatch):
    # `evaluate --output` wrote over an earlier report without asking, and a stop while writing
    # left a report half of one run and half of the other.
    from flava.evaluate import run as evaluate_run

    suite = write_suite(suite_dir, TASKS[:1], name="one.json")
    out = tmp_path / "report"
    args = ["evaluate", "--model", str(suite_dir / "model"), "--suite", str(suite), "--output", str(out)]
    assert cli(args) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert err == (f"flava evaluate: error: --output {out} holds a report already; name another folder, or add "
                   "--replace to write over it\n")
    write_report = evaluate_run.write_report

    def stopped(results, directory, labels):
        write_report(results, directory, labels)
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_run, "write_report", stopped)
    assert cli(args + ["--replace"]) == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first and os.listdir(tmp_path) == ["report"]
    monkeypatch.undo()
    # The earlier report's pictures the new one lacks go with it; nothing else is ever written over.
    report = json.loads((out / "report.json").read_text())
    report["results"][0]["tasks"][0]["pictures"].append("stale-task.png")
    (out / "report.json").write_text(json.dumps(report))
    (out / "stale-task.png").write_bytes(b"a picture of a task the new suite lacks")
    assert cli(args + ["--replace"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(first)
    (out / "NOTES.md").write_text("mine")
    capsys.readouterr()
    assert cli(args + ["--replace"]) == 2
    assert f"--output {out} holds other files than a report (e.g. NOTES.md)" in capsys.readouterr().err
    assert (out / "NOTES.md").read_text() == "mine" and (out / "report.json").is_file()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "plan.txt").write_text("mine")
    assert cli(args[:-1] + [str(notes)]) == 2
    assert "holds other files than a report (e.g. plan.txt)" in capsys.readouterr().err
    assert os.listdir(notes) == ["plan.txt"]
    # The current folder, empty, takes a report (it is not moved into place whole); a failed start
    # leaves no folder it made for its lock.
    monkeypatch.chdir(tmp_path / "notes")
    (notes / "plan.txt").unlink()
    assert cli(args[:-1] + ["."]) == 0 and (notes / "report.json").is_file()
    assert cli(["evaluate", "--model", str(tmp_path / "none"), "--suite", str(suite), "--output",
                str(tmp_path / "new" / "deep" / "report")]) == 2
    assert not (tmp_path / "new").exists()


def test_bad_model_or_suite_paths(suite_dir, tmp_path, capsys):
    suite = write_suite(suite_dir, TASKS[:1])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    assert cli(["evaluate", "--model", str(tmp_path / "notes"), "--suite", str(suite), "--output",
                str(tmp_path / "o")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert cli(["evaluate", "--model", str(suite_dir / "model"), "--suite", str(tmp_path / "none.json"),
                "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{tasks: [")
    with pytest.raises(flava.ConfigError, match="not valid JSON"):
        load_suite(tmp_path / "broken.json")
    with pytest.raises(flava.ConfigError, match="no tasks"):
        load_suite({"name": "x", "tasks": []})
    # A file's suite without a name of its own is called by the file's ("suite suite" in the report).
    (suite_dir / "colours.json").write_text(json.dumps({"tasks": TASKS[:1]}))
    assert load_suite(suite_dir / "colours.json").name == "colours"


@pytest.mark.slow
def test_the_demo_suite_names_only_packaged_data(monkeypatch):
    import easy_vqa

    listed = []
    for split in ("train", "test"):
        name = f"get_{split}_image_paths"
        lister = getattr(easy_vqa, name)
        monkeypatch.setattr(easy_vqa, name, lambda lister=lister: listed.append(1) or lister())
    suite = load_suite("demo")
    # Each of easy-vqa's image folders (4,000 and 1,000 files) is listed a few times, not once an image.
    assert 0 < len(listed) < 40
    kinds = {t.kind for t in suite.tasks}
    assert kinds == {"retrieval", "zero-shot", "linear-probe", "finetune-text", "finetune-multimodal"}
    assert {t.domain for t in suite.tasks} == {"vision", "language", "multimodal"}


@pytest.mark.slow
def test_an_lr_sweep_scores_the_rate_best_on_validation(suite_dir):
    from flava.data.tokenizer import TextTokenizer
    from flava.finetune.loop import finetune_text
    from flava.finetune.settings import FinetuneSettings
    from flava.evaluate.readers.text import read_text_classification

    model = flava.load(suite_dir / "model")
    tokenizer = TextTokenizer(max_length=model.config.text.max_position_embeddings)
    spec = {k: v for k, v in TASKS[4].items() if k != "settings"}
    spec.update(settings={"epochs": 6, "batch_size": 8}, lr_sweep=[1e-6, 3e-3])
    (prepared,) = load_suite({"name": "t", "tasks": [spec]}, base=suite_dir).tasks
    assert "learning rates 1e-06, 0.003" in prepared.size
    seen = []
    result = prepared.run(model, tokenizer, lambda done, total: seen.append((done, total)))
    # Progress runs over both fine-tunes as one task.
    assert seen[-1][0] == seen[-1][1] and len({t for _, t in seen}) == 1
    # The same fine-tunes one by one: the suite scores the one best on validation, whichever it is.
    task = read_text_classification(suite_dir / "text_train.csv", suite_dir / "text_val.csv",
                                    suite_dir / "text_test.csv", name="topic fine-tune")
    alone = {lr: finetune_text(model, task, FinetuneSettings(lr=lr, epochs=6, batch_size=8), tokenizer)
             for lr in (1e-6, 3e-3)}
    best = max(alone, key=lambda lr: alone[lr].best_val)
    assert alone[3e-3].best_val != alone[1e-6].best_val
    assert result.metrics == pytest.approx(alone[best].test_metrics)
    note = next(n for n in result.notes if n.startswith("learning rate"))
    assert note.startswith(f"learning rate {best:g} chosen on validation accuracy")
    assert f"1e-06: {alone[1e-6].best_val:.4f}" in note and f"0.003: {alone[3e-3].best_val:.4f}" in note


def test_a_suites_text_limit_cuts_every_models_texts(suite_dir):
    from rich.console import Console

    from flava.errors import ConfigError
    from flava.evaluate.run import evaluate_models

    model = flava.load(suite_dir / "model")  # 64 positions
    probe = TASKS[3]
    for limit, want in ((5, 5), (1000, 64), (None, 64)):
        spec = {"name": "t", "tasks": [probe], **({} if limit is None else {"max_text_length": limit})}
        suite = load_suite(spec, base=suite_dir)
        (task,) = suite.tasks
        seen, run = [], task.run
        task.run = lambda m, tokenizer, progress: (seen.append(tokenizer(["a " * 100]).input_ids.shape[1]),
                                                   run(m, tokenizer, progress))[1]
        (result,) = evaluate_models([("m", model, "tiny")], suite, Console(quiet=True))
        assert seen == [want] and result.tasks[0].scores
    with pytest.raises(ConfigError, match="max_text_length must be a whole number"):
        load_suite({"name": "t", "max_text_length": "long", "tasks": [probe]}, base=suite_dir)


@pytest.mark.parametrize("models", [1, 2])
def test_the_report_summary_is_one_markdown_table(tmp_path, models):
    from flava.evaluate.report import write_report
    from flava.evaluate.results import SuiteResult, TaskResult

    results = [SuiteResult("demo", f"m{j}", [TaskResult("digits probe", "linear-probe", "vision", {"top-1": 90.0 - j})])
               for j in range(models)]
    md = write_report(results, tmp_path / "r").read_text().splitlines()
    start = md.index(next(x for x in md if x.startswith("| task |")))
    table = md[start:md.index("", start)]
    assert table[1] == "|" + "---|" * (table[0].count("|") - 1)
    assert len({row.count("|") for row in table}) == 1, table  # every row has the header's cells


def test_better_and_worse_are_beyond_the_test_items_noise():
    from flava.evaluate.report import summary_rows, verdict
    from flava.evaluate.results import SuiteResult, TaskResult

    def suite(top1: float, n: int, corr: float = 50.0) -> SuiteResult:
        return SuiteResult("s", "m", [TaskResult("probe", "linear-probe", "vision", {"top-1": top1},
                                                 examples={"top-1": n}),
                                      TaskResult("sts", "finetune-text", "language", {"pearson": corr})])

    # One image in 60 (10.00 vs 8.33): noise. The same gap on 10,000 items is not.
    rows = summary_rows([suite(10.0, 60), suite(8.33, 60)])
    assert verdict(*rows[0][2:]) == "same" and rows[0][3] == pytest.approx(
        100 * np.hypot(np.sqrt(0.1 * 0.9 / 60), np.sqrt(0.0833 * 0.9167 / 60)))
    assert verdict(*summary_rows([suite(10.0, 10_000), suite(8.33, 10_000)])[0][2:]) == "better"
    # A correlation is no share of items: its rows and the averages over it keep the fixed rule.
    rows = {r[0]: r for r in summary_rows([suite(10.0, 60, 51.0), suite(8.33, 60, 50.0)])}
    assert rows["vision average"][3] is not None and rows["language average"][3] is None
    assert rows["macro average"][3] is None and verdict(*rows["language average"][2:]) == "better"


def test_a_test_folder_may_lack_some_of_the_training_classes(tmp_path):
    from flava.errors import DataError
    from flava.evaluate.task_spec import image_folder

    for split, classes in (("train", "abc"), ("test", "ac"), ("odd", "ad")):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8), "red").save(tmp_path / split / c / "0.png")
    _, _, classes = image_folder(tmp_path / "train", "task 1")
    images, labels, names = image_folder(tmp_path / "test", "task 1", classes)
    assert names == ["a", "b", "c"]
    assert [(p.parent.name, int(y)) for p, y in zip(images, labels)] == [("a", 0), ("c", 2)]
    with pytest.raises(DataError, match=r"has classes \['d'\] outside the training classes \['a', 'b', 'c'\]"):
        image_folder(tmp_path / "odd", "task 1", classes)


def test_a_linear_probe_reads_labels_as_finetune_does(tmp_path):
    # The probe had kept " sport" and "sport" apart, and ordered 10 before 2, where finetune did neither.
    from flava.cli.finetune import read_task

    lines = ["text,label"] + [f"story {i},{lab}" for i, lab in enumerate(["sport", " sport", "Sport", "music ",
                                                                           "music"])]
    (tmp_path / "words.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "numbers.csv").write_text("text,label\na,10\nb,2\nc,2\nd,10\n")
    # Given a validation split: five rows of three classes hold none out (refused as the suite is read).
    suite = load_suite({"tasks": [{"kind": "linear-probe", "modality": "text", "train": f, "val": f, "test": f,
                                   "name": f} for f in ("words.csv", "numbers.csv")]}, base=tmp_path)
    words, numbers = (t.data for t in suite.tasks)
    for f, probe in (("words.csv", words), ("numbers.csv", numbers)):
        assert probe.classes == read_task("text-classification", str(tmp_path / f), str(tmp_path / f), None, 0.1,
                                          0).label_names
    assert words.classes == ["Sport", "music", "sport"] and numbers.classes == ["2", "10"]
    assert words.train[1].tolist() == [2, 2, 0, 1, 1]
    assert words.notes == ["labels 'sport' (2 rows), 'Sport' (1 row) look alike but are 2 classes; write them one "
                           "way to merge"]


def test_a_zero_shot_folder_names_its_empty_class_folders(tmp_path):
    from flava.errors import ConfigError

    for c in ("red", "blue"):
        (tmp_path / "pets" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8), c).save(tmp_path / "pets" / c / "0.png")
    (tmp_path / "pets" / "green").mkdir()
    said = f"in {tmp_path / 'pets'}: 1 class folder(s) with no image in them left out: 'green'"
    task = {"kind": "zero-shot", "folder": "pets"}
    assert load_suite({"tasks": [task]}, base=tmp_path).tasks[0].data.notes == [said]
    # Three names for the three folders the user sees: the error says which one is not a class.
    with pytest.raises(ConfigError, match=re.escape(f"must list 2 names (one per class folder); {said}")):
        load_suite({"tasks": [{**task, "class_names": ["r", "g", "b"]}]}, base=tmp_path)


def _multimodal_tables(root):
    """VQA (JSONL, ten answers a question) and image-text classification (CSV) tables of the suite's
    colour squares, each split its own file."""
    for split in ("train", "test"):
        vqa, rows = [], ["image,text,label"]
        for colour in ("red", "blue"):
            for i in range(4 if split == "train" else 2):
                image = f"{split}/{colour}/{i}.png"
                vqa.append({"image": image, "question": "what colour is it?",
                            "answers": [colour.title()] * 7 + ["purple"] * 3})
                rows.append(f"{image},is it {colour}?,yes")
                rows.append(f"{image},is it {'blue' if colour == 'red' else 'red'}?,no")
        (root / f"mm_vqa_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in vqa))
        (root / f"mm_cls_{split}.csv").write_text("\n".join(rows) + "\n")
    (root / "mm_missing.jsonl").write_text(json.dumps({"image": "gone.png", "question": "what colour is it?",
                                                       "answer": "red"}) + "\n")
    (root / "broken.png").write_text("not a png")  # a test table naming it: found before any task runs
    (root / "mm_broken.jsonl").write_text(json.dumps({"image": "broken.png", "question": "what colour is it?",
                                                      "answer": "red"}) + "\n")


def test_finetune_multimodal_reads_a_users_tables_as_finetune_does(suite_dir):
    from flava.cli.finetune import read_task
    from flava.data.tokenizer import TextTokenizer

    _multimodal_tables(suite_dir)
    tasks = [{"kind": "finetune-multimodal", "name": "colour vqa", "task": "vqa", "train": "mm_vqa_train.jsonl",
              "test": "mm_vqa_test.jsonl", "settings": {"epochs": 1, "batch_size": 4}},
             {"kind": "finetune-multimodal", "name": "colour check", "task": "image-text-classification",
              "train": "mm_cls_train.csv", "test": "mm_cls_test.csv", "limit": 3}]
    vqa, cls = load_suite({"name": "t", "tasks": tasks}, base=suite_dir).tasks
    # The same examples, vocabulary and scores as `flava finetune --task vqa` reads from these files.
    alone = read_task("vqa", str(suite_dir / "mm_vqa_train.jsonl"), None, str(suite_dir / "mm_vqa_test.jsonl"), 0.1, 0)
    data = vqa.data.data
    assert data.kind == "vqa" and data.label_names == alone.label_names == ["blue", "red"]
    assert [(e.image, e.text, e.answers) for e in data.test] == [(e.image, e.text, e.answers) for e in alone.test]
    assert data.test[0].answers == {1: 1.0} and len(data.train) + len(data.val) == 8
    # `limit` caps each split, a seeded choice of its rows.
    assert cls.data.data.label_names == ["no", "yes"]
    assert (len(cls.data.data.train), len(cls.data.data.val), len(cls.data.data.test)) == (3, 2, 3)
    model = flava.load(suite_dir / "model")
    result = vqa.run(model, TextTokenizer(max_length=model.config.text.max_position_embeddings), lambda d, n: None)
    assert set(result.scores) == {"vqa_score"} and 0 <= result.metrics["vqa_score"] <= 1


@pytest.mark.parametrize("task, error", [
    ({"train": "mm_cls_train.csv", "test": "mm_cls_test.csv"},
     'tables need "task": "vqa" .* or "image-text-classification"'),
    ({"task": "VQA", "train": "mm_cls_train.csv", "test": "mm_cls_test.csv"}, "did you mean 'vqa'"),
    ({"task": "vqa", "train": "mm_vqa_train.jsonl", "test": "mm_missing.jsonl"},
     r"1 image file\(s\) do not exist \(1 in test\), e.g. .*gone.png \(test\)"),
    ({"task": "vqa", "train": "mm_vqa_train.jsonl", "test": "mm_broken.jsonl"},
     r"^task 1: .*broken.png is not a readable image"),
    ({"task": "classification", "train": "mm_cls_train.csv", "test": "mm_cls_test.csv"},
     "task 'classification' must be one of"),
    ({"task": "vqa", "train": "mm_vqa_train.jsonl"}, "needs train and test"),
    ({"task": "vqa", "test": "mm_vqa_test.jsonl"}, "needs train and test"),
    ({"data": "easy-vqa", "task": "vqa", "train": "mm_vqa_train.jsonl", "test": "mm_vqa_test.jsonl"},
     r"names several \(data, train, test, task\)"),
    ({"task": "vqa", "train": "mm_vqa_train.jsonl", "test": "missing.jsonl"},
     r"\.test: .*missing.jsonl does not exist"),
    ({"task": "vqa", "train": "mm_cls_train.csv", "test": "mm_cls_test.csv"},
     r"^task 1: .*mm_cls_train.csv has no column 'answer' or 'answers'"),
])
def test_a_users_multimodal_tables_are_checked_before_any_work(suite_dir, task, error):
    from flava.errors import ConfigError, DataError

    _multimodal_tables(suite_dir)
    with pytest.raises((ConfigError, DataError), match=error):
        load_suite({"name": "t", "tasks": [{"kind": "finetune-multimodal", **task}]}, base=suite_dir)


def test_two_unnamed_tasks_of_one_kind_are_told_to_take_names(suite_dir):
    _multimodal_tables(suite_dir)
    with pytest.raises(flava.ConfigError, match=r"two tasks are named 'finetune-multimodal'; .*\"name\" key"):
        load_suite({"tasks": [{"kind": "finetune-multimodal", "task": "vqa", "train": "mm_vqa_train.jsonl",
                               "test": "mm_vqa_test.jsonl"}] * 2}, base=suite_dir)


@pytest.mark.parametrize("task, error", [
    ({"kind": "retrieval", "data": "easy-vqa", "galleries": 0},
     "galleries must be a whole number of at least 1; got 0$"),
    ({"kind": "retrieval", "data": "easy-vqa", "galleries": -2}, "galleries must be a whole number of at least 1"),
    ({"kind": "retrieval", "data": "easy-vqa", "galleries": "abc"}, "galleries must be a whole number .*; got 'abc'"),
    ({"kind": "retrieval", "data": "easy-vqa", "galleries": True}, "galleries must be a whole number"),
    ({"kind": "retrieval", "karpathy": "k.json", "split": 5}, "split must be a non-empty string; got 5"),
    ({"kind": "retrieval", "csv": ""}, "csv must be a path"),
    ({"kind": "zero-shot", "folder": "test", "name": 5}, "name must be a non-empty string; got 5"),
    ({"kind": "zero-shot", "folder": 3}, "folder must be a path"),
    ({"kind": "zero-shot", "folder": "test", "class_names": "red,blue"}, "class_names must be a list of names"),
    ({"kind": "zero-shot", "folder": "test", "templates": 5}, "templates must be a template set's name"),
    ({"kind": "zero-shot", "folder": "test", "limit": 2.5}, "limit must be a positive whole number"),
    ({"kind": "linear-probe", "modality": 5, "data": "digits"}, "modality must be 'image' or 'text'; got 5"),
    ({"kind": "linear-probe", "train": ["train"], "test": "test"}, "train must be a path"),
    ({"kind": "linear-probe", "data": "digits", "seed": "x"}, "seed must be a whole number of at least 0; got 'x'"),
    ({"kind": "linear-probe", "data": "digits", "seed": -1}, "seed must be a whole number of at least 0"),
    ({"kind": "finetune-text", "data": "bbc-news", "settings": "fast"}, "settings must be an object; got 'fast'"),
    ({"kind": "finetune-text", "train": "text_train.csv", "test": "text_test.csv", "label_names": "sport"},
     "label_names must be a list of at least 2 distinct names"),
    ({"kind": "finetune-text", "train": "text_train.csv", "test": "text_test.csv", "regression": "false"},
     "regression must be true or false; got 'false'"),
    ({"kind": "finetune-text", "glue": 5, "dir": "."}, "glue must be a non-empty string"),
    ({"kind": "finetune-multimodal", "train": "t.csv", "test": "t.csv", "task": 5}, "task must be a non-empty string"),
    ({"kind": "finetune-multimodal", "hateful-memes": 7}, "hateful-memes must be a path"),
])
def test_every_tasks_fields_are_checked_before_any_data_is_read(suite_dir, monkeypatch, task, error):
    import dataclasses
    import re

    from flava.evaluate.kinds import task_kinds

    def unread(t):
        raise AssertionError("the task's data was read before its fields were checked")

    for name, kind in list(task_kinds().items()):
        monkeypatch.setitem(task_kinds(), name, dataclasses.replace(kind, read=unread))
    with pytest.raises(flava.ConfigError) as e:  # a good task first: its data is not read either
        load_suite({"tasks": [{"kind": "linear-probe", "data": "digits"}, task]}, base=suite_dir)
    message = str(e.value)
    assert message.startswith("task 2") and "\n" not in message and re.search(error, message), message


def test_a_string_of_label_names_is_named_as_such_not_split_into_letters(suite_dir):
    task = {"kind": "finetune-text", "train": "text_train.csv", "test": "text_test.csv", "label_names": "sport"}
    with pytest.raises(flava.ConfigError, match=r"task 1: label_names must be a list .*; got 'sport'$"):
        load_suite({"tasks": [task]}, base=suite_dir)
    with pytest.raises(flava.ConfigError, match="suite: settings must be an object"):
        load_suite({"settings": [1], "tasks": [{"kind": "linear-probe", "data": "digits"}]})
    # Numbers name classes as their text does (digit folders, a table's labels 0/1/2), as the readers take them.
    from flava.evaluate.suite import check_task

    check_task({"kind": "zero-shot", "folder": "digits", "class_names": [0, 1, 2.5, "three"]}, 0)
    check_task({**task, "label_names": [0, 1, 2]}, 0)
    for bad in ([0, "0"], [True, False], ["a", ""]):
        with pytest.raises(flava.ConfigError, match="label_names must be a list of at least 2 distinct names"):
            check_task({**task, "label_names": bad}, 0)


def test_every_built_in_kinds_value_keys_have_a_check():
    from flava.evaluate.kinds import task_kinds

    # data is checked against the kind's packaged sets, vqa and snli-ve objects and lr_sweep by their readers.
    checked_elsewhere = {"data", "vqa", "snli-ve", "lr_sweep"}
    for name, kind in task_kinds().items():
        if kind.read.__module__.startswith("flava.evaluate.kinds."):  # not a test's own kind
            assert kind.keys - checked_elsewhere <= set(kind.fields), name


def test_tasks_whose_names_differ_in_case_or_punctuation_draw_their_own_pictures():
    # "Colours A" and "colours-a" (or two names of Chinese characters, or "untrained zs" beside the
    # untrained model's "zs") had been drawn to one file, the second over the first.
    from types import SimpleNamespace

    from flava.evaluate.report import picture_stems

    def result(*names):
        return SimpleNamespace(tasks=[SimpleNamespace(name=n) for n in names])

    stems = picture_stems([result("Colours A", "colours-a", "颜色", "形状", "untrained zs"), result("zs")],
                          ["ours", "untrained"])
    flat = [s for d in stems for s in d.values()]
    assert len(set(flat)) == len(flat) == 6
    assert stems[0] == {"Colours A": "colours-a", "colours-a": "colours-a-2", "颜色": "task", "形状": "task-2",
                        "untrained zs": "untrained-zs"}
    assert stems[1] == {"zs": "untrained-zs-2"}


@pytest.mark.parametrize("task, error", [
    ({"kind": "zero-shot", "data": "easy-vqa-shapes", "folder": "test"}, r"names several \(data, folder\): keep one"),
    ({"kind": "linear-probe", "data": "digits", "train": "train", "test": "test"}, r"names several \(data, train\)"),
    ({"kind": "linear-probe", "data": "digits", "val": "test"}, "val goes with train, which this task does not name "
                                                               r"\(it reads data\): drop val"),
    ({"kind": "retrieval", "csv": "pairs.csv", "galleries": 7}, r"galleries goes with data, .* \(it reads csv\)"),
    ({"kind": "retrieval", "csv": "pairs.csv", "image_root": "/nowhere"}, "image_root goes with karpathy"),
    ({"kind": "finetune-text", "data": "bbc-news", "glue": "MRPC", "dir": "."}, r"names several \(data, glue\)"),
    ({"kind": "finetune-text", "data": "bbc-news", "label_names": ["a", "b"]}, "label_names goes with train"),
    ({"kind": "zero-shot", "data": "easy-vqa-shapes", "settings": {"epochs": 3}},
     "settings are fine-tuning's .*; a zero-shot task trains nothing"),
])
def test_a_key_no_part_of_a_task_reads_is_refused(suite_dir, task, error):
    # Each had been accepted and read by nothing: a folder beside packaged data evaluated the
    # packaged set, a glue beside bbc-news ran BBC News, galleries and split beside a csv did nothing.
    from flava.errors import ConfigError

    with pytest.raises(ConfigError, match=error):
        load_suite({"name": "t", "tasks": [task]}, base=suite_dir)


def test_a_source_key_given_as_null_names_no_source(suite_dir):
    # "data": null reads as absent (as the suite's checks read it), not as a second source.
    suite = load_suite({"tasks": [{"kind": "zero-shot", "data": None, "folder": "test", "name": "zs"}]}, base=suite_dir)
    assert suite.tasks[0].name == "zs"


def test_the_suites_settings_are_checked_whatever_its_tasks():
    from flava.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^suite: unknown config key 'settings.bogus_key'"):
        load_suite({"settings": {"bogus_key": 1}, "tasks": [{"kind": "zero-shot", "data": "easy-vqa-shapes"}]})


def test_a_linear_probe_cut_by_limit_is_refused_as_the_suite_is_read(suite_dir, tmp_path):
    # It had failed once its features were computed, after the tasks before it, and the report was lost;
    # the message named a class by its index and no task.
    from flava.errors import ConfigError

    probe = {"kind": "linear-probe", "name": "lp", "modality": "image", "train": "train", "test": "test"}
    with pytest.raises(ConfigError, match=r"^task 1 \(lp\): too few training examples \(3, by limit 3\) to hold out "
                                          r"a validation split; give a \"val\" split"):
        load_suite({"tasks": [{**probe, "limit": 3}]}, base=suite_dir)
    # Three classes of four images (listed class by class), cut to two images of two classes.
    from flava.evaluate.readers.splits import subsample

    for split in ("train", "test"):
        for c, rgb in enumerate(((200, 0, 0), (0, 200, 0), (0, 0, 200))):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (16, 16), rgb).save(tmp_path / split / f"c{c}" / f"{i}.png")
    seed = next(s for s in range(100) if len({i // 4 for i in subsample(list(range(12)), 2, s)}) == 2)
    with pytest.raises(ConfigError, match=r"^task 1 \(lp\): the test split holds classes the training split "
                                          r"\(limit 2\) lacks \('c\d'\): a linear probe only predicts classes it "
                                          r"trained on"):
        load_suite({"tasks": [{**probe, "val": "test", "limit": 2, "seed": seed}]}, base=tmp_path)
