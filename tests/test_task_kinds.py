"""A task kind is a record: one registered in this file runs through the suite and the report
with no change to either, and every built-in kind is found in its own module."""

import json

import numpy as np
import pytest

from flava.config import preset
from flava.data.tokenizer import TextTokenizer
from flava.errors import ConfigError, DataError
from flava.evaluate.kinds import TaskKind, register, task_kinds
from flava.evaluate.pictures import beside, confusion_picture
from flava.evaluate.report import write_report
from flava.evaluate.results import Measured
from flava.evaluate.suite import load_suite, run_suite
from flava.model import FlavaModel


def _read(t):
    words = t.spec.get("words")
    if not isinstance(words, list) or len(words) < 2:
        raise DataError(f"{t.where}: words takes a list of at least two words")
    return [str(w) for w in words]


def _run(words, model, tokenizer, progress):
    # How often the text encoder tells each word from the next by its CLS state: a tiny but real
    # measurement, so the test exercises the model it is given.
    from flava.evaluate.features import text_cls_features

    cls = text_cls_features(model, words, tokenizer)
    distinct = float(np.mean([not np.allclose(a, b) for a, b in zip(cls, cls[1:])]))
    progress(len(words), len(words))
    confusion = np.eye(len(words), dtype=int)
    return Measured({"distinct": 100 * distinct}, {"distinct": distinct}, [f"{len(words)} words"],
                    detail={"confusion": confusion, "words": words})


def _pictures(result, base):
    return [confusion_picture(result, result.detail["confusion"], result.detail["words"],
                              beside(base, "-words.png"))]


@pytest.fixture
def word_kind():
    kind = register(TaskKind("distinct-words", frozenset({"words"}), lambda spec: "language", _read,
                             lambda words: f"{len(words)} words", _run, _pictures))
    yield kind
    task_kinds().pop(kind.name)


def test_a_kind_registered_here_runs_through_the_suite_and_the_report(word_kind, tmp_path):
    suite = load_suite({"name": "words", "tasks": [{"kind": "distinct-words", "name": "w",
                                                    "words": ["cat", "dog", "tree"]}]}, base=tmp_path)
    (task,) = suite.tasks
    assert (task.kind, task.domain, task.size) == ("distinct-words", "language", "3 words")
    model = FlavaModel(preset("tiny")).eval()
    seen = []
    (result,) = run_suite(suite, model, TextTokenizer(max_length=16), "tiny", lambda t: lambda d, n: seen.append(d)).tasks
    assert seen == [3] and result.notes == ["3 words"]
    assert result.scores["distinct"] == pytest.approx(100 * result.metrics["distinct"])
    md = write_report([run_suite(suite, model, TextTokenizer(max_length=16), "tiny")], tmp_path / "report")
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    (row,) = report["results"][0]["tasks"]
    assert row["kind"] == "distinct-words" and row["pictures"] == ["w-words.png"]
    assert (tmp_path / "report" / "w-words.png").stat().st_size > 1000
    assert report["results"][0]["domain_averages"] == {"language": pytest.approx(result.scores["distinct"])}
    assert "### w (distinct-words, language" in md.read_text()


def test_a_registered_kind_checks_its_keys_and_data(word_kind, tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'word'; did you mean 'words'"):
        load_suite({"tasks": [{"kind": "distinct-words", "word": ["a", "b"]}]}, base=tmp_path)
    with pytest.raises(DataError, match="task 1: words takes a list"):
        load_suite({"tasks": [{"kind": "distinct-words", "words": "cat"}]}, base=tmp_path)
    with pytest.raises(ValueError, match="registered twice"):
        register(word_kind)


def test_every_built_in_kind_lives_in_its_own_module():
    kinds = task_kinds()
    assert set(kinds) >= {"retrieval", "zero-shot", "linear-probe", "finetune-text", "finetune-multimodal"}
    for name, kind in kinds.items():
        assert kind.read.__module__ == f"flava.evaluate.kinds.{name.replace('-', '_')}"


def test_a_limit_is_a_seeded_choice_of_every_class_and_is_checked(tmp_path):
    # The packaged sets list their training items class by class: the first 300 BBC articles
    # are all one class, and a digits prefix is skewed too.
    bbc = load_suite({"tasks": [{"kind": "finetune-text", "data": "bbc-news", "limit": 300}]}).tasks[0].data
    assert len(bbc.data.train) == 300 and len({e.label for e in bbc.data.train}) == 5
    probe = load_suite({"tasks": [{"kind": "linear-probe", "data": "bbc-news", "modality": "text", "limit": 200,
                                   "seed": 3}]}).tasks[0].data
    assert len(probe.train[0]) == 200 and len(set(probe.train[1].tolist())) == 5 and probe.seed == 3
    shots = load_suite({"tasks": [{"kind": "zero-shot", "data": "easy-vqa-shapes", "limit": 30}]}).tasks[0].data
    assert len(shots.images) == len(shots.labels) == 30
    for bad in ("100", 0, True):
        with pytest.raises(ConfigError, match=r"limit must be a positive whole number \(or null: no limit\)"):
            load_suite({"tasks": [{"kind": "linear-probe", "data": "digits", "limit": bad}]})


def test_zero_shot_class_names_must_differ():
    with pytest.raises(ConfigError, match="class names must differ; 'shape' name two classes"):
        load_suite({"tasks": [{"kind": "zero-shot", "data": "easy-vqa-shapes", "class_names": ["shape", "shape", "x"]}]})
