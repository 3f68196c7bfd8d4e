"""Fine-tuning: the task readers on hand-written files, pair encoding, VQA targets, and tiny
fine-tuning runs that must learn, pick the best validation state and leave the caller's model alone."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from flava import FlavaModel, preset
from flava.data.tokenizer import TextTokenizer, default_tokenizer_file
from flava.errors import ConfigError, DataError
from flava.finetune.loop import finetune_multimodal, finetune_text
from flava.finetune.settings import FinetuneSettings
from flava.finetune.text import encode_pairs
from flava.finetune.examples import MultimodalData, MultimodalExample, TextData, TextExample
from flava.evaluate.readers.multimodal import (
    answer_vocabulary,
    easy_vqa_data,
    normalize_answer,
    read_hateful_memes,
    read_snli_ve,
    read_vqa,
    vqa_soft_scores,
)
from flava.evaluate.readers.text import read_glue, read_text_classification


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer(max_length=32)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return FlavaModel(preset("tiny")).eval()


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- GLUE readers


def tsv(*cells):
    return "\t".join(cells)


GLUE_FILES = {
    # CoLA: no header; source, label, original annotation, sentence.
    "CoLA": ("train.tsv", "dev.tsv", None, [
        (tsv("gj04", "1", "", "Our friends won't buy this analysis."), "Our friends won't buy this analysis.", None, 1),
        (tsv("gj04", "0", "*", "They drank the pub."), "They drank the pub.", None, 0),
    ]),
    "SST-2": ("train.tsv", "dev.tsv", tsv("sentence", "label"), [
        (tsv("a gripping , \"funny\" film ", "1"), "a gripping , \"funny\" film ", None, 1),
        (tsv("dull", "0"), "dull", None, 0),
    ]),
    "MRPC": ("train.tsv", "dev.tsv", tsv("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"), [
        (tsv("1", "702876", "702977", "He said \"no\" .", "He refused ."), "He said \"no\" .", "He refused .", 1),
        (tsv("0", "2108705", "2108831", "Yucaipa owned it .", "It sold ."), "Yucaipa owned it .", "It sold .", 0),
    ]),
    "QQP": ("train.tsv", "dev.tsv", tsv("id", "qid1", "qid2", "question1", "question2", "is_duplicate"), [
        (tsv("1", "3", "4", "How do I learn?", "How can I learn?", "1"), "How do I learn?", "How can I learn?", 1),
        (tsv("2", "5", "6", "Why is the sky blue?", "What is rain?", "0"), "Why is the sky blue?", "What is rain?", 0),
    ]),
    "STS-B": ("train.tsv", "dev.tsv", tsv("index", "genre", "filename", "year", "old_index", "source1", "source2",
                                          "sentence1", "sentence2", "score"), [
        (tsv("0", "main-captions", "MSRvid", "2012test", "0001", "none", "none", "A plane takes off.",
             "An air plane is taking off.", "5.000"), "A plane takes off.", "An air plane is taking off.", 5.0),
        (tsv("1", "main-captions", "MSRvid", "2012test", "0004", "none", "none", "A man plays a flute.",
             "A man slices cheese.", "0.500"), "A man plays a flute.", "A man slices cheese.", 0.5),
    ]),
    "MNLI": ("train.tsv", "dev_matched.tsv", tsv("index", "promptID", "pairID", "genre", "sentence1_binary_parse",
                                                 "sentence2_binary_parse", "sentence1_parse", "sentence2_parse",
                                                 "sentence1", "sentence2", "label1", "gold_label"), [
        (tsv("0", "31193", "31193n", "government", "( ( x ) )", "( y )", "(ROOT x)", "(ROOT y)", "Conceptually cream.",
             "Product and geography.", "neutral", "neutral"), "Conceptually cream.", "Product and geography.", 2),
        (tsv("1", "101457", "101457e", "telephone", "( a )", "( b )", "(ROOT a)", "(ROOT b)", "you know during",
             "You lose the things.", "entailment", "entailment"), "you know during", "You lose the things.", 1),
    ]),
    "QNLI": ("train.tsv", "dev.tsv", tsv("index", "question", "sentence", "label"), [
        (tsv("0", "When?", "In 1990.", "entailment"), "When?", "In 1990.", 0),
        (tsv("1", "Who?", "Nobody knows why.", "not_entailment"), "Who?", "Nobody knows why.", 1),
    ]),
    "RTE": ("train.tsv", "dev.tsv", tsv("index", "sentence1", "sentence2", "label"), [
        (tsv("0", "No weapons were found.", "Weapons were found.", "not_entailment"), "No weapons were found.",
         "Weapons were found.", 1),
        (tsv("1", "A cat sat.", "An animal sat.", "entailment"), "A cat sat.", "An animal sat.", 0),
    ]),
    "WNLI": ("train.tsv", "dev.tsv", tsv("index", "sentence1", "sentence2", "label"), [
        (tsv("0", "I stuck a pin.", "The pin had a hole.", "1"), "I stuck a pin.", "The pin had a hole.", 1),
        (tsv("1", "John lifted Tom.", "Tom was heavy.", "0"), "John lifted Tom.", "Tom was heavy.", 0),
    ]),
}


@pytest.mark.parametrize("name", list(GLUE_FILES))
def test_glue_readers_follow_each_task_layout(tmp_path, name):
    train_file, dev_file, header, rows = GLUE_FILES[name]
    head = [header] if header else []
    # Train: 10 copies of the rows (to carve validation from); dev: the rows once.
    write(tmp_path / train_file, head + [r[0] for r in rows] * 5)
    write(tmp_path / dev_file, head + [r[0] for r in rows])
    task = read_glue(name, tmp_path, val_fraction=0.2, seed=3)
    assert task.name == name
    assert (len(task.train), len(task.val), len(task.test)) == (8, 2, 2)
    for ex, (_, text, text2, label) in zip(task.test, rows):
        assert (ex.text, ex.text2, ex.label) == (text, text2, label)
    assert task.regression == (name == "STS-B")
    expected_metric = {"CoLA": "matthews_corrcoef", "MRPC": "f1", "QQP": "f1", "STS-B": "pearson"}.get(name, "accuracy")
    assert task.metrics[0] == expected_metric


def test_glue_split_is_seeded_and_bad_rows_are_named(tmp_path):
    header = tsv("id", "qid1", "qid2", "question1", "question2", "is_duplicate")
    good = [tsv(str(i), "1", "2", f"question {i}?", f"other {i}?", str(i % 2)) for i in range(20)]
    write(tmp_path / "train.tsv", [header] + good + ["21\t1\t2\tbroken line"])  # QQP ships a few of these
    write(tmp_path / "dev.tsv", [header] + good[:4])
    a, b = read_glue("qqp", tmp_path, seed=1), read_glue("QQP", tmp_path, seed=1)
    assert [e.text for e in a.val] == [e.text for e in b.val] and len(a.val) == 2 and len(a.train) == 18
    assert a.notes == ["1 train row(s) with missing fields skipped"]
    assert {e.text for e in read_glue("qqp", tmp_path, seed=2).val} != {e.text for e in a.val}

    write(tmp_path / "dev.tsv", [header, tsv("9", "1", "2", "q?", "r?", "maybe")])
    with pytest.raises(DataError, match=r"dev.tsv, line 2: label 'maybe'"):
        read_glue("qqp", tmp_path)
    write(tmp_path / "dev.tsv", [tsv("id", "question1", "is_duplicate")])
    with pytest.raises(DataError, match="no column 'question2'"):
        read_glue("qqp", tmp_path)
    with pytest.raises(ConfigError, match="unknown GLUE task"):
        read_glue("squad", tmp_path)
    (tmp_path / "rte").mkdir()
    with pytest.raises(DataError, match="train.tsv does not exist"):
        read_glue("rte", tmp_path / "rte")


def test_mnli_is_the_mean_of_matched_and_mismatched(tmp_path, model, tokenizer):
    _, _, header, rows = GLUE_FILES["MNLI"]
    write(tmp_path / "train.tsv", [header] + [r[0] for r in rows] * 5)
    write(tmp_path / "dev_matched.tsv", [header] + [r[0] for r in rows])
    only_matched = read_glue("mnli", tmp_path)
    assert only_matched.test_parts is None and len(only_matched.test) == 2
    assert only_matched.notes == ["dev_mismatched.tsv absent: scored on dev_matched.tsv alone (the paper reports "
                                  "the mean of matched and mismatched)"]
    # Three mismatched rows, one of each label: parts of unequal size, so the mean of the parts
    # differs from the accuracy over both.
    labels = ("neutral", "entailment", "contradiction")
    write(tmp_path / "dev_mismatched.tsv", [header] + [
        tsv(str(i), "1", f"{i}e", "fiction", "( a )", "( b )", "(ROOT a)", "(ROOT b)", f"premise {i}",
            f"hypothesis {i}", label, label) for i, label in enumerate(labels)])
    task = read_glue("mnli", tmp_path)
    assert task.test_parts == {"matched": 2, "mismatched": 3} and task.notes == []
    want = ["Conceptually cream.", "you know during"] + [f"premise {i}" for i in range(3)]
    assert [e.text for e in task.test] == want
    r = finetune_text(model, task, FinetuneSettings(max_steps=1, batch_size=4), tokenizer)
    truth = np.array([e.label for e in task.test])
    m, mm = (float(np.mean(r.predictions[s] == truth[s])) for s in (slice(0, 2), slice(2, 5)))
    assert r.test_metrics == {"accuracy": (m + mm) / 2, "accuracy (matched)": m, "accuracy (mismatched)": mm}


def test_generic_text_reader(tmp_path):
    write(tmp_path / "train.csv", ["text,text2,label", "a,b,sport", '"x, y",z,tech', "c,d,sport"])
    write(tmp_path / "val.tsv", ["text\ttext2\tlabel", "e\tf\ttech"])
    write(tmp_path / "test.csv", ["text,text2,label", "g,h,sport"])
    task = read_text_classification(tmp_path / "train.csv", tmp_path / "val.tsv", tmp_path / "test.csv")
    assert task.label_names == ["sport", "tech"] and task.metrics == ("accuracy",)
    assert [(e.text, e.text2, e.label) for e in task.train] == [("a", "b", 0), ("x, y", "z", 1), ("c", "d", 0)]
    assert (task.val[0].text2, task.val[0].label) == ("f", 1)
    write(tmp_path / "test.csv", ["text,text2,label", "g,h,politics"])
    with pytest.raises(DataError, match=r"test.csv, line 2: label 'politics' is not in the label set"):
        read_text_classification(tmp_path / "train.csv", tmp_path / "val.tsv", tmp_path / "test.csv")
    write(tmp_path / "num.csv", ["text,label"] + [f"t{i},{v}" for i, v in enumerate((10, 2, 1, 2, 10))])
    task = read_text_classification(tmp_path / "num.csv", None, tmp_path / "num.csv", val_fraction=0.4)
    assert task.label_names == ["1", "2", "10"] and len(task.val) == 2 and task.test[0].label == 2
    # A split of another shape than train's (pairs against single texts) is refused: the model reads one.
    write(tmp_path / "single.csv", ["text,label", "g,sport"])
    with pytest.raises(DataError, match=r"single\.csv has no text2 column but the training file .*train\.csv has: a "
                                        r"model trained on sentence pairs is scored on the same; add the column"):
        read_text_classification(tmp_path / "train.csv", None, tmp_path / "single.csv")
    with pytest.raises(DataError, match=r"val\.tsv has a text2 column but the training file .*single\.csv has none: "
                                        r"a model trained on single texts is scored on the same; drop the column"):
        read_text_classification(tmp_path / "single.csv", tmp_path / "val.tsv", None)
    # An empty label is no class and an empty text nothing to learn: skipped and said, each by what it lacks.
    write(tmp_path / "gaps.csv", ["text,label", "a,sport", "b,", "  ,tech", "c,tech", "d,sport"])
    task = read_text_classification(tmp_path / "gaps.csv", None, tmp_path / "gaps.csv", val_fraction=0.4)
    assert task.label_names == ["sport", "tech"] and len(task.train) + len(task.val) == 3
    assert any(n.endswith("gaps.csv): 1 with an empty label, 1 with an empty text") and n.startswith("2 train row(s)")
               for n in task.notes), task.notes


def test_validation_and_test_examples_that_are_training_examples_are_said(tmp_path):
    # The train file given as the test, rows copied into it, one image named two ways: each had
    # scored the model on what it trained on, unsaid (and a carve had put one image in both splits).
    import os

    from flava.evaluate.readers.user_files import read_image_classification, read_multimodal_table

    write(tmp_path / "train.csv", ["text,label"] + [f"text {i},{'ab'[i % 2]}" for i in range(10)])
    write(tmp_path / "test.csv", ["text,label", "text 1,b", "text 2,a", "new,a"])
    task = read_text_classification(tmp_path / "train.csv", tmp_path / "train.csv", tmp_path / "test.csv")
    assert "10 of the 10 validation examples are also training examples (the same text): the validation score " \
           "flatters the model" in task.notes
    assert "2 of the 3 test examples are also training examples (the same text): the test score flatters the " \
           "model" in task.notes
    task = read_text_classification(tmp_path / "test.csv", None, None, val_fraction=0.34)
    assert not any("also training examples" in n for n in task.notes), task.notes
    (tmp_path / "img").mkdir()
    rows = ["image,label"]
    for i in range(6):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "img" / f"{i}.png")
        rows.append(f"{tmp_path / 'img' / f'{i}.png'},{'ab'[i % 2]}")
    write(tmp_path / "images.csv", rows)
    write(tmp_path / "images_test.csv", ["image,label", "img/0.png,a", "img/5.png,b"])
    task = read_image_classification(tmp_path / "images.csv", None, tmp_path / "images_test.csv", val_fraction=0.34)
    assert "2 of the 2 test examples are also training examples (the same image file): the test score flatters " \
           "the model" in task.notes, task.notes
    # Image and text rows naming one image as written two ways stay on one side of the carve.
    write(tmp_path / "pairs.csv", ["image,text,label"] + [
        f"{f'img/{i % 3}.png' if i % 2 else tmp_path / 'img' / f'{i % 3}.png'},question {i},{'ab'[i % 2]}"
        for i in range(12)])
    data = read_multimodal_table(tmp_path / "pairs.csv", val_fraction=0.34)
    assert not {os.path.realpath(e.image) for e in data.train} & {os.path.realpath(e.image) for e in data.val}


def test_look_alike_labels_stay_classes_and_are_said(tmp_path):
    # "pos" beside "Pos", "1" beside "01" and "1.0" had become separate classes without a word.
    from flava.evaluate.readers.user_files import read_image_classification, read_multimodal_table

    labels = ["pos"] * 3 + ["Pos", "neg", "neg ", " neg"]
    write(tmp_path / "words.csv", ["text,label"] + [f"text {i},{lab}" for i, lab in enumerate(labels)])
    task = read_text_classification(tmp_path / "words.csv", tmp_path / "words.csv", None)
    assert task.label_names == ["Pos", "neg", "pos"]  # not merged; " neg" is "neg", as ever
    assert "labels 'pos' (3 rows), 'Pos' (1 row) look alike but are 2 classes; write them one way to merge" \
        in task.notes, task.notes
    assert sum("look alike" in n for n in task.notes) == 1
    write(tmp_path / "numbers.jsonl", [json.dumps({"text": f"t{i}", "label": v})
                                       for i, v in enumerate([1, 1, "01", 1.0, 2, 2])])
    task = read_text_classification(tmp_path / "numbers.jsonl", tmp_path / "numbers.jsonl", None)
    assert task.label_names == ["01", "1", "1.0", "2"]
    assert "labels '1' (2 rows), '01' (1 row), '1.0' (1 row) look alike but are 3 classes; write them one way " \
           "to merge" in task.notes, task.notes
    # Image and text tables, read by the same code.
    png(tmp_path / "a.png")
    write(tmp_path / "pairs.csv", ["image,text,label", "a.png,q1,yes", "a.png,q2,Yes ", "a.png,q3,no"])
    task = read_multimodal_table(tmp_path / "pairs.csv", tmp_path / "pairs.csv")
    assert task.label_names == ["Yes", "no", "yes"]
    assert any(n.startswith("labels 'Yes' (1 row), 'yes' (1 row) look alike") for n in task.notes), task.notes
    for name, n in (("cat", 2), ("Cat", 1), ("dog", 2)):  # class folders: counted in images
        for i in range(n):
            png(tmp_path / "pets" / name / f"{i}.png")
    task = read_image_classification(tmp_path / "pets", tmp_path / "pets")
    assert "labels 'cat' (2 images), 'Cat' (1 image) look alike but are 2 classes; write them one way to " \
           "merge" in task.notes, task.notes


def test_json_labels_are_read_as_json_writes_them_and_a_list_is_refused(tmp_path):
    # JSON's true was Python's "True" (a CSV's "true" was then another label), and a list a class "[1]".
    write(tmp_path / "flags.jsonl", [json.dumps({"text": f"t{i}", "label": i % 2 == 0}) for i in range(6)])
    write(tmp_path / "flags.csv", ["text,label", "u,true", "v,false"])
    task = read_text_classification(tmp_path / "flags.jsonl", None, tmp_path / "flags.csv", val_fraction=0.34)
    assert task.label_names == ["false", "true"] and [e.label for e in task.test] == [1, 0]
    write(tmp_path / "listed.jsonl", [json.dumps({"text": "a", "label": "x"}), json.dumps({"text": "b", "label": [1]})])
    with pytest.raises(DataError, match=r"listed.jsonl, line 2: the label \[1\] is a list; a label is one text or "
                                        r"number$"):
        read_text_classification(tmp_path / "listed.jsonl", None, None)


def test_an_empty_class_folder_is_named_not_dropped_unsaid(tmp_path):
    from flava.evaluate.readers.user_files import read_image_classification
    from flava.evaluate.task_spec import image_folder

    for c in ("red", "blue"):
        for i in range(3):
            png(tmp_path / "train" / c / f"{i}.png")
    (tmp_path / "train" / "green").mkdir()
    (tmp_path / "train" / ".cache").mkdir()  # passed over by every folder walk: no class, nothing to say
    task = read_image_classification(tmp_path / "train", tmp_path / "train")
    assert task.label_names == ["blue", "red"]
    said = f"in {tmp_path / 'train'}: 1 class folder(s) with no image in them left out: 'green'"
    assert said in task.notes, task.notes
    notes = []  # the linear probe's and zero-shot's folders
    assert image_folder(tmp_path / "train", "task 1", notes=notes)[2] == ["blue", "red"]
    assert notes == [said]


def test_a_carve_that_leaves_a_handful_to_train_on_is_warned_about(tmp_path):
    write(tmp_path / "train.csv", ["text,label"] + [f"text {i},{'ab'[i % 2]}" for i in range(20)])
    task = read_text_classification(tmp_path / "train.csv", None, None, val_fraction=0.95)
    assert len(task.train) == 1
    assert "warning: val_fraction 0.95 leaves 1 of 20 examples to train on; lower it (--val-fraction) or give " \
           "--val" in task.notes, task.notes
    task = read_text_classification(tmp_path / "train.csv", None, None, val_fraction=0.5)
    assert not any(n.startswith("warning") for n in task.notes), task.notes


# --------------------------------------------------------------------------- pairs and VQA targets


def test_pair_encoding_matches_bert(tokenizer):
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=str(default_tokenizer_file()))
    a = ["The cat sat on the mat.", "short", "word " * 40]
    b = ["A cat is sitting.", "a much longer second sentence than the first one", "other " * 40]
    enc = encode_pairs(tokenizer, a, b, max_length=24)
    want = ref(a, b, truncation="longest_first", max_length=24, padding="longest", return_tensors="pt",
               return_token_type_ids=True)
    assert torch.equal(enc.input_ids, want["input_ids"])
    assert torch.equal(enc.token_type_ids, want["token_type_ids"])
    assert torch.equal(enc.attention_mask, want["attention_mask"])
    ids = enc.input_ids[0][enc.attention_mask[0].bool()].tolist()
    assert ids[0] == 101 and ids.count(102) == 2 and ids[-1] == 102
    sep = ids.index(102)
    assert enc.token_type_ids[0, : sep + 1].eq(0).all() and enc.token_type_ids[0, sep + 1: len(ids)].eq(1).all()
    assert enc.input_ids.shape[1] == 24 and enc.input_ids[2].tolist().count(102) == 2  # truncation keeps both [SEP]
    single = encode_pairs(tokenizer, ["The cat sat on the mat."])
    assert torch.equal(single.input_ids, tokenizer(["The cat sat on the mat."]).input_ids)
    assert single.token_type_ids.eq(0).all()
    assert tokenizer.tok.truncation["max_length"] == 32  # the shared tokenizer is left as it was


def test_vqa_soft_scores_and_vocabulary():
    vocab = answer_vocabulary(["yes", "no", "2", "yes", "no", "yes", "red"], min_count=2)
    assert vocab == ["yes", "no"]
    vocab = answer_vocabulary(["b", "a", "c", "a", "b", "d"], max_answers=3)
    assert vocab == ["a", "b", "c"]  # frequency, then alphabetical
    index = {"d": 0, "b": 1, "c": 2}  # not "a": an article, which the answers' processing drops
    humans = ["d"] * 2 + ["b"] * 4 + ["c"] + ["zzz"] * 3
    assert vqa_soft_scores(humans, index) == {0: 2 / 3, 1: 1.0, 2: 1 / 3}
    assert vqa_soft_scores(["d"], index) == {0: 1 / 3}  # one annotator of ten: VQAv2 rule
    assert vqa_soft_scores(["zzz"], index) == {}


def test_vqa_answers_processed_as_the_official_evaluator():
    cases = {
        # punctuation: a mark touching a space goes, else it becomes a space; periods go unless a digit follows
        "yes.": "yes", "yes!": "yes", "it's a dog!": "it's dog", "black/white": "black white",
        "black / white": "black white", "red,white": "red white", "t-shirt": "t shirt", "(a) 5": "5",
        "a.m.": "am", "3.5": "3.5", ".5": ".5", "don't.": "don't", "@home?": "home",
        # a comma between digits anywhere removes every mark instead: "t-shirt" loses its hyphen too
        "1,000": "1000", "1,000.5": "1000.5", "t-shirt 1,5": "tshirt 15", "1, 000": "1 000",
        "." * 40: "." * 8,  # the evaluator removes at most 32 periods
        # newlines and tabs, case, number words (whole words only), articles
        "\tTwo\n dogs ": "2 dogs", "none": "0", "Ten": "10", "eleven": "eleven", "one hundred": "1 hundred",
        "someone": "someone", "The cat": "cat", "an apple": "apple", "theater": "theater",
        # what the processing would empty keeps its text: multiple-choice letters stay apart
        "A": "a", "The": "the", " ? ": "?",
        # contractions: each with exactly one apostrophe missing, plus the table's reversed entry
        "dont": "don't", "Cant": "can't", "couldnt've": "couldn't've", "couldn'tve": "couldn't've",
        "couldntve": "couldntve", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "ow's'at": "'ow's'at",
        "'ow'sat": "'ow's'at", "twas": "'twas", "somebody'd": "somebodyd", "shed": "shed", "im": "im",
        "lets": "lets", "shes": "shes", "wed": "wed", "yall": "y'all",
    }
    assert {a: normalize_answer(a) for a in cases} == cases
    from flava.evaluate.readers.multimodal import _CONTRACTIONS

    assert len(_CONTRACTIONS) == 114  # 92 forms with 113 apostrophes, and "somebody'd"
    # Idempotent on its own output (below the 32-period cap), so vocabulary entries process to themselves.
    words = sorted(set(_CONTRACTIONS) | set(_CONTRACTIONS.values())) + list(cases)
    marks = ["", " ", ".", ",", "!", " - ", "/", "(", ") ", "1,0", "2.5", ". ", "the ", "Two", "\t"]
    strings = words + [a + m + b for a in words[::7] + marks for m in marks for b in marks + words[::11]]
    strings = [s for s in strings if s.count(".") <= 32]
    assert len(strings) > 5000
    assert [s for s in strings if normalize_answer(normalize_answer(s)) != normalize_answer(s)] == []


def test_vqa_accuracy_normalizes_only_when_annotators_disagree():
    from flava.evaluate.readers.multimodal import vqa_accuracy_scores

    vocab = {"2": 0, "yes": 1, "no": 2}
    # Ten identical strings are compared lower-cased only: "two" is no vocabulary entry, so "2" scores
    # 0 (exactly as the evaluator scores the prediction "2"); trimming still applies.
    assert vqa_accuracy_scores(["Two"] * 10, vocab) == {}
    assert vqa_accuracy_scores(["Two"] * 9 + [" Two\n"], {"two": 5}) == {5: 1.0}
    assert vqa_accuracy_scores(["yes"] * 10, vocab) == vqa_accuracy_scores(["Yes"] * 10, vocab) == {1: 1.0}
    # One annotator differs: every answer is processed, and "Two" and "two." are both "2".
    assert vqa_accuracy_scores(["Two"] * 9 + ["two."], vocab) == {0: 1.0}
    assert vqa_accuracy_scores(["Yes"] * 4 + ["yes!"] * 3 + ["No"] * 3, vocab) == {1: 1.0, 2: pytest.approx(0.9)}
    # Other numbers of answers and the training targets: always processed.
    assert vqa_accuracy_scores(["Two"] * 3, vocab) == {0: 1.0}
    assert vqa_soft_scores(["Two"] * 10, vocab) == {0: 1.0}
    assert vqa_soft_scores(["Two", "two.", "No"], vocab) == {0: 2 / 3, 2: 1 / 3}


def test_vqa_table_answers(tmp_path):
    from flava.evaluate.readers.user_files import read_multimodal_table

    for i in range(4):
        png(tmp_path / f"{i}.png")
    train = [{"image": "0.png", "question": "how many?", "answers": ["Two", "two", "2.", "3"]},
             {"image": "1.png", "question": "is it?", "answer": "Yes."}]
    val = [{"image": "2.png", "question": "how many?", "answers": ["Two"] * 10},
           {"image": "2.png", "question": "how many?", "answers": ["Two"] * 9 + ["2"]},
           {"image": "3.png", "question": "is it?", "answer": "YES"}]
    write(tmp_path / "train.jsonl", [json.dumps(r) for r in train])
    write(tmp_path / "val.jsonl", [json.dumps(r) for r in val])
    task = read_multimodal_table(tmp_path / "train.jsonl", tmp_path / "val.jsonl", kind="vqa")
    assert task.label_names == ["2", "yes"]
    assert [e.answers for e in task.train] == [{0: 1.0}, {1: 1.0}]
    assert [e.answers for e in task.val] == [{}, {0: 1.0}, {1: 1.0}]  # one given answer is processed


def test_predict_reads_a_vqa_tables_answers_as_the_model_names_them(tmp_path):
    from types import SimpleNamespace

    from flava.cli.predict import _table_inputs

    rows = [{"image": "a.png", "question": "how many?", "answer": "Two"},
            {"image": "a.png", "question": "how many?", "answers": ["two.", "Two", "3"]},
            {"image": "a.png", "question": "which?", "answer": "A"}]
    write(tmp_path / "q.jsonl", [json.dumps(r) for r in rows])
    vqa = SimpleNamespace(task="vqa", uses_text=True, uses_images=True, pairs=False)
    assert _table_inputs(tmp_path / "q.jsonl", vqa).labels == ["2", "2", "a"]  # a model trained on "Two" says "2"


def test_predict_scores_a_vqa_table_as_finetuning_does(tmp_path, monkeypatch, capsys):
    """`flava predict` scores VQA rows against the truth the reader gives fine-tuning (the `answers`
    list before `answer`) by the VQA score, not by matching the one `answer` column."""
    from types import SimpleNamespace

    import flava.finetune.load
    from flava.cli import main
    from flava.evaluate.readers.user_files import read_multimodal_table

    png(tmp_path / "a.png")
    rows = [{"image": "a.png", "question": "which?", "answer": "b", "answers": ["a", "a", "a", "b"]},
            {"image": "a.png", "question": "which?", "answers": ["a"] * 2 + ["b"] * 8},  # official: 0.6
            {"image": "a.png", "question": "which?", "answer": "A"},
            {"image": "a.png", "question": "which?", "answers": ["b"]}]
    write(tmp_path / "q.jsonl", [json.dumps(r) for r in rows])
    train = [{"image": "a.png", "question": "which?", "answer": a} for a in ("a", "b", "c")]
    write(tmp_path / "train.jsonl", [json.dumps(r) for r in train])
    task = read_multimodal_table(tmp_path / "train.jsonl", tmp_path / "q.jsonl", tmp_path / "q.jsonl", kind="vqa")
    finetuned = [e.answers.get(task.label_names.index("a"), 0.0) for e in task.test]
    assert finetuned == [1.0, pytest.approx(0.6), 1.0, 0.0]

    def predict(texts=None, texts2=None, images=None, top_k=3, batch_size=32, progress=None):
        return [{"label": "a", "score": 0.5, "top": [{"label": "a", "score": 0.5}]} for _ in texts]

    model = SimpleNamespace(task="vqa", uses_text=True, uses_images=True, pairs=False, predict=predict)
    monkeypatch.setattr(flava.finetune.load, "load_task", lambda path, device=None: model)
    out = tmp_path / "preds.jsonl"
    assert main(["predict", "--model", "m", "--input", str(tmp_path / "q.jsonl"), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"VQA score {100 * sum(finetuned) / 4:.1f} % on 4 labelled inputs" in printed and "accuracy" not in printed
    # The label written is the answers' majority, not the `answer` column beside them.
    assert [json.loads(line)["true_label"] for line in out.read_text().splitlines()] == ["a", "b", "a", "b"]
    # A CSV keeps a row's list as JSON (it was Python's repr: ['a', 'a']).
    preds = tmp_path / "elsewhere" / "preds.csv"
    preds.parent.mkdir()
    assert main(["predict", "--model", "m", "--input", str(tmp_path / "q.jsonl"), "--output", str(preds)]) == 0
    import csv

    written = list(csv.DictReader(preds.open()))
    assert json.loads(written[0]["answers"]) == ["a", "a", "a", "b"] and written[2]["answers"] == ""
    assert written[0]["image"] == str(tmp_path / "a.png")  # the file read, wherever the output goes
    # ... which a CSV table's reader takes as the list it is: the same truth and the same score again.
    capsys.readouterr()
    assert main(["predict", "--model", "m", "--input", str(preds)]) == 0
    assert f"VQA score {100 * sum(finetuned) / 4:.1f} % on 4 labelled inputs" in capsys.readouterr().out
    again = read_multimodal_table(tmp_path / "train.jsonl", preds, preds, kind="vqa")
    assert [e.answers for e in again.test] == [e.answers for e in task.test]


def test_a_vqa_tables_misspelt_column_is_named_with_the_nearest(tmp_path):
    from flava.evaluate.readers.user_files import read_multimodal_table

    png(tmp_path / "0.png")
    write(tmp_path / "q.jsonl", [json.dumps({"image": "0.png", "questoin": "how many?", "answer": "2"})])
    with pytest.raises(DataError, match=r"q.jsonl has no column 'text' or 'question' \(columns: image, questoin, "
                                        r"answer; the nearest is 'questoin'\)"):
        read_multimodal_table(tmp_path / "q.jsonl", kind="vqa")
    # An empty cell of a column that is there is no misspelling: the row is skipped and counted.
    write(tmp_path / "e.jsonl", [json.dumps({"image": "", "image_id": 3, "question": "how many?", "answer": "2"})])
    with pytest.raises(DataError, match=r"e.jsonl has no usable row: its 1 row\(s\) were skipped \(1 with an empty "
                                        r"image\)$"):
        read_multimodal_table(tmp_path / "e.jsonl", kind="vqa")


def test_easy_vqa_task_splits_by_image():
    task = easy_vqa_data(val_fraction=0.2, seed=0, limit=300)
    assert (len(task.train), len(task.val), len(task.test)) == (300, 300, 300) and task.kind == "vqa"
    assert not {e.image for e in task.train} & {e.image for e in task.val}
    assert all(list(e.answers.values()) == [1.0] for e in task.train)
    assert len(task.label_names) == 13 and task.label_names[0] in ("yes", "no")
    again = easy_vqa_data(val_fraction=0.2, seed=0, limit=300)
    assert [e.text for e in again.val] == [e.text for e in task.val]


# --------------------------------------------------------------------------- multimodal readers


def png(path, color=(255, 0, 0), size=20):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


def test_vqa_reader(tmp_path):
    for split in ("train2014", "val2014"):
        for i in range(4):
            png(tmp_path / split / f"COCO_{split}_{i:012d}.jpg")
        qs = [{"image_id": i, "question": f"q{i}?", "question_id": 10 * i + k} for i in range(4) for k in range(2)]
        anns = [{"question_id": q["question_id"], "image_id": q["image_id"],
                 "multiple_choice_answer": "yes" if q["question_id"] % 2 else "two",
                 "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                             for j, a in enumerate(["yes"] * 5 + ["Two"] * 2 + ["no"] * 3)]} for q in qs]
        (tmp_path / f"q_{split}.json").write_text(json.dumps({"data_subtype": split, "questions": qs}))
        (tmp_path / f"a_{split}.json").write_text(json.dumps({"annotations": anns}))
    args = [tmp_path / "q_train2014.json", tmp_path / "a_train2014.json", tmp_path / "train2014",
            tmp_path / "q_val2014.json", tmp_path / "a_val2014.json", tmp_path / "val2014"]
    task = read_vqa(*args, val_fraction=0.25, min_answer_count=1)
    # 3 and 3 majority answers in train ("two" processed as the official evaluator does): ties alphabetical
    assert task.label_names == ["2", "yes"]
    assert (len(task.train), len(task.val), len(task.test)) == (6, 2, 8)
    # Trained on min(1, n/3); scored by the official accuracy, averaged over the 10 leave-one-out
    # subsets ("two": 2 humans -> 0.6, not 2/3). "no" is not in the vocabulary.
    assert task.train[0].answers == {1: 1.0, 0: 2 / 3} and task.test[0].answers == {1: 1.0, 0: pytest.approx(0.6)}
    from flava.evaluate.readers.multimodal import vqa_accuracy_scores

    for n, want in ((1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0)):
        assert vqa_accuracy_scores(["x"] * n + ["y"] * (10 - n), {"x": 0})[0] == pytest.approx(want)
    # The evaluator compares ten identical answers as written: ten "Two" give "2" nothing, nine and a "two." 1.
    anns[0]["answers"] = [{"answer": "Two", "answer_confidence": "yes", "answer_id": j + 1} for j in range(10)]
    anns[1]["answers"] = anns[0]["answers"][:9] + [{"answer": "two.", "answer_confidence": "yes", "answer_id": 10}]
    (tmp_path / "a_val2014.json").write_text(json.dumps({"annotations": anns}))
    quirk = read_vqa(*args, val_fraction=0.25, min_answer_count=1)
    assert [e.answers for e in quirk.test[:2]] == [{}, {0: 1.0}] and quirk.label_names == task.label_names
    assert task.train[0].image.name.startswith("COCO_train2014_")
    (tmp_path / "val2014" / "COCO_val2014_000000000002.jpg").unlink()
    with pytest.raises(DataError, match="2 image file"):  # two questions about the missing image
        read_vqa(*args, val_fraction=0.25, min_answer_count=1)


def test_snli_ve_and_hateful_memes_readers(tmp_path):
    images = tmp_path / "flickr"
    for i in range(3):
        png(images / f"{100 + i}.jpg")
    for name, labels in (("snli_ve_train.jsonl", ["entailment", "neutral", "-", "contradiction"]),
                         ("snli_ve_dev.jsonl", ["neutral"]), ("snli_ve_test.jsonl", ["contradiction"])):
        write(tmp_path / name, [json.dumps({"Flickr30K_ID": str(100 + i % 3), "sentence1": "premise",
                                            "sentence2": f"hyp {i}", "gold_label": lab, "pairID": f"p{i}"})
                                for i, lab in enumerate(labels)])
    task = read_snli_ve(tmp_path, images)
    assert [e.label for e in task.train] == [0, 1, 2] and task.train[2].text == "hyp 3"
    assert task.train[0].image == images / "100.jpg"
    assert task.notes == ["1 train row(s) without a gold label ('-') skipped"]
    bad = {"Flickr30K_ID": "100", "sentence2": "h", "gold_label": "maybe"}
    write(tmp_path / "snli_ve_dev.jsonl", [json.dumps(bad)])
    with pytest.raises(DataError, match="snli_ve_dev.jsonl, line 1: gold_label 'maybe'"):
        read_snli_ve(tmp_path, images)

    hm = tmp_path / "hm"
    for i in range(4):
        png(hm / "img" / f"{i}.png")
    rows = [json.dumps({"id": i, "img": f"img/{i}.png", "label": i % 2, "text": f"meme {i}"}) for i in range(4)]
    for name in ("train.jsonl", "dev_seen.jsonl", "test_seen.jsonl"):
        write(hm / name, rows)
    task = read_hateful_memes(hm)
    assert task.metrics == ("auroc", "accuracy") and task.test[3].label == 1 and task.test[3].text == "meme 3"
    write(hm / "dev_seen.jsonl", rows[:1] + rows[2:3])  # only class 0: AUROC is undefined
    with pytest.raises(DataError, match="AUROC needs both classes in the val split"):
        read_hateful_memes(hm)
    write(hm / "dev_seen.jsonl", rows)
    (hm / "img" / "3.png").unlink()
    with pytest.raises(DataError, match=r"3 image file\(s\) do not exist \(1 in train, 1 in val, 1 in test\), "
                                         r"e.g. .*3.png \(train\)"):
        read_hateful_memes(hm)


# --------------------------------------------------------------------------- fine-tuning runs

WORDS = "red green blue house tree river stone cloud paper window chair table music light road".split()


def keyword_examples(n, seed, flip=False):
    """Label 1 iff the text contains 'banana' (0 iff, with `flip`)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = list(rng.choice(WORDS, size=5))
        label = i % 2
        if label:
            words[rng.integers(0, 5)] = "banana"
        out.append(TextExample(" ".join(words), 1 - label if flip else label))
    return out


def keyword_task(n_train=128, flip_eval=False):
    val = keyword_examples(64, 1, flip_eval)
    return TextData("keyword", keyword_examples(n_train, 0), val, val if flip_eval else keyword_examples(64, 2),
                    ["absent", "present"], ("accuracy", "f1", "matthews_corrcoef"))


@pytest.mark.slow
def test_text_finetune_learns_and_leaves_the_model_alone(model, tokenizer):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = torch.get_rng_state()
    settings = FinetuneSettings(lr=1e-3, epochs=4, batch_size=16, seed=0)
    seen = []
    result = finetune_text(model, keyword_task(), settings, tokenizer, on_step=lambda *a: seen.append(a))
    assert result.test_metrics["accuracy"] >= 0.9 and result.test_metrics["matthews_corrcoef"] > 0.8
    assert result.steps == 32 == len(result.train_loss) and seen[-1][:2] == (32, 32)
    assert result.eval_steps == [8, 16, 24, 32] and result.metric == "accuracy"
    assert result.confusion.sum() == 64 and result.confusion.shape == (2, 2)
    assert result.predictions.shape == (64,) and result.probabilities.shape == (64, 2)
    assert np.trace(result.confusion) / 64 == pytest.approx(result.test_metrics["accuracy"])
    # The caller's model, its mode and the global RNG are untouched.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and not model.training
    assert torch.equal(torch.get_rng_state(), rng_before)
    settings.max_steps = settings.eval_every = 3
    once, again = (finetune_text(model, keyword_task(), settings, tokenizer) for _ in range(2))
    assert once.train_loss == again.train_loss and once.eval_steps == [3]  # same seed, same run


@pytest.mark.slow
def test_best_validation_state_scores_the_test(model, tokenizer):
    # Validation (= test) labels are the opposite of train's: the more the model learns, the
    # worse validation gets, so the best state is an early one, not the final one.
    settings = FinetuneSettings(lr=3e-3, epochs=4, batch_size=16, eval_every=2, warmup_fraction=0.0)
    result = finetune_text(model, keyword_task(64, flip_eval=True), settings, tokenizer)
    best = max(range(len(result.eval_steps)), key=lambda j: (result.val_curve[j], -result.val_losses[j]))
    assert result.eval_steps == [2, 4, 6, 8, 10, 12, 14, 16]
    assert result.best_step == result.eval_steps[best] and result.best_val == result.val_curve[best]
    assert result.val_curve[-1] < result.best_val  # so restoring the best state matters
    # Test data = validation data: scored with the restored state it gives the best value again.
    assert result.test_metrics["accuracy"] == result.best_val
    assert result.val_metrics[best]["accuracy"] == result.best_val


def test_a_tie_on_the_validation_metric_goes_to_the_lower_validation_loss(model, tokenizer):
    # One validation example: its accuracy is 0 or 1, so evaluations tie, and the first state that
    # answered it (kept before, however little it had trained) is not the one most sure of it.
    task = keyword_task(32)
    task.val = task.val[:1]
    settings = FinetuneSettings(lr=1e-3, epochs=2, batch_size=8, eval_every=1, warmup_fraction=0.0,
                                train_encoders=False)
    result = finetune_text(model, task, settings, tokenizer)
    tied = [j for j, v in enumerate(result.val_curve) if v == result.best_val]
    assert len(tied) > 1 and len(result.val_losses) == len(result.eval_steps) == 8
    best = min(tied, key=lambda j: result.val_losses[j])
    assert best != tied[0] and result.best_step == result.eval_steps[best]


def test_the_validation_loss_in_chunks_is_the_whole_splits(monkeypatch):
    # VQA's dense targets over all of VQAv2 val would not fit at once: the loss is summed by chunks.
    from flava.finetune import loop
    from flava.finetune.splits import Split

    n, k = 10, 5
    split = Split(torch.zeros((n, 3), dtype=torch.long), torch.arange(n) % k, [{i % k: 1.0, 0: 0.3} for i in range(n)])
    logits = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    whole = {kind: float(loop._loss(kind, logits, split, torch.arange(n), k)) for kind in ("vqa", "classification")}
    monkeypatch.setattr(loop, "VQA_SCORE_CHUNK", 3)
    for kind, want in whole.items():
        assert loop._val_loss(kind, logits, split, k) == pytest.approx(want, rel=1e-6)


@pytest.mark.slow
def test_regression_head(model, tokenizer):
    rng = np.random.default_rng(0)

    def examples(n):
        out = []
        for _ in range(n):
            k = int(rng.integers(0, 5))
            out.append(TextExample(" ".join(["banana"] * k + list(rng.choice(WORDS, size=5 - k))), float(k)))
        return out

    task = TextData("count", examples(96), examples(32), examples(32), [], ("pearson", "spearman"))
    result = finetune_text(model, task, FinetuneSettings(lr=2e-3, epochs=4, batch_size=16), tokenizer)
    assert result.test_metrics["pearson"] > 0.8 and result.confusion is None and result.probabilities is None
    assert result.predictions.dtype == np.float64


def colour_examples(n, seed, vqa=False):
    """Label = the colour of a noisy image (red 0 / blue 1); the text says nothing about it."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = i % 2
        arr = rng.integers(0, 60, (40, 40, 3)).astype(np.uint8)
        arr[..., 0 if label == 0 else 2] += 180
        image = Image.fromarray(arr)
        text = f"what colour is the {rng.choice(WORDS)}?"
        out.append(MultimodalExample(image, text, answers={label: 1.0}) if vqa
                   else MultimodalExample(image, text, label))
    return out


@pytest.mark.slow
def test_multimodal_frozen_and_full(model, tokenizer):
    task = MultimodalData("colour", colour_examples(64, 0), colour_examples(32, 1), colour_examples(32, 2),
                          ["red", "blue"], ("auroc", "accuracy"))
    frozen = finetune_multimodal(model, task, FinetuneSettings(lr=1e-3, epochs=3, batch_size=16,
                                                                train_encoders=False), tokenizer)
    assert frozen.test_metrics["auroc"] > 0.95 and frozen.test_metrics["accuracy"] > 0.85
    assert frozen.feature_seconds > 0 and frozen.metric == "auroc"
    # Frozen: the copied encoders kept the caller's weights.
    sd = frozen.model.flava.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())

    vqa = MultimodalData("colour-vqa", colour_examples(64, 0, True), colour_examples(32, 1, True),
                         colour_examples(32, 2, True), ["red", "blue", "green"], ("vqa_score",), "vqa")
    full = finetune_multimodal(model, vqa, FinetuneSettings(lr=5e-4, epochs=3, batch_size=16), tokenizer)
    assert full.test_metrics["vqa_score"] > 0.85 and full.confusion.shape == (3, 3)
    assert full.train_loss[-1] < full.train_loss[0] and full.feature_seconds == 0
    changed = full.model.flava.state_dict()
    assert not torch.equal(changed["image_encoder.patch_embed.weight"], model.image_encoder.patch_embed.weight)
    assert torch.equal(changed["image_projection.weight"], model.image_projection.weight)  # off the CLS_M path


def test_questions_about_one_image_sum_its_gradient_in_the_same_order_every_time(model):
    # Several questions about one image share its image-encoder pass; indexing's backward added
    # their gradients atomically across threads on the CPU: two full VQA fine-tunings of one seed
    # (and a resumed one) differed in 71 of 98 tensors.
    from flava.finetune.heads import MultimodalClassifier, MultimodalHead

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        clf = MultimodalClassifier(model, MultimodalHead(model.config.multimodal.hidden_size, 64, 3, 0.0))
        size = model.config.image.image_size
        inputs = {"pixel_values": torch.randn(2, 3, size, size), "image_index": torch.arange(48) % 2,
                  "input_ids": torch.randint(1000, 2000, (48, 12)),
                  "attention_mask": torch.ones(48, 12, dtype=torch.long),
                  "token_type_ids": torch.zeros(48, 12, dtype=torch.long)}

        def grad():
            clf.zero_grad(set_to_none=True)
            clf(**inputs).sum().backward()
            return clf.flava.image_to_mm_projection.weight.grad.clone()

        first = grad()
        assert all(torch.equal(grad(), first) for _ in range(30))
    finally:
        torch.set_num_threads(threads)


def test_image_cache_gives_the_eval_transform_exactly(tmp_path):
    from flava.data.transforms import eval_transform
    from flava.finetune.splits import image_cache

    examples = colour_examples(3, 0)
    examples.append(MultimodalExample(png(tmp_path / "a.png", (10, 200, 30), size=50), "q", 0))
    examples.append(MultimodalExample(tmp_path / "a.png", "same file again", 1))
    images, (rows,) = image_cache([examples], 32)
    assert rows.tolist() == [0, 1, 2, 3, 3] and images.pixels.dtype == torch.uint8
    pixels, inverse = images.batch(torch.tensor([3, 0, 3]))
    assert inverse.tolist() == [1, 0, 1] and pixels.shape == (2, 3, 32, 32)
    assert torch.equal(pixels[0], eval_transform(examples[0].image, 32))
    assert torch.equal(pixels[1], eval_transform(Image.open(tmp_path / "a.png"), 32))


def test_every_unusable_image_is_counted_and_the_first_five_named(tmp_path):
    # The first broken file had been the only one named: a folder of them took a run each to find.
    from flava.finetune.splits import image_cache

    examples = colour_examples(1, 0)
    for i in range(7):
        (tmp_path / f"broken{i}.png").write_bytes(b"not a png")
        examples.append(MultimodalExample(tmp_path / f"broken{i}.png", "q", 0))
    with pytest.raises(DataError) as e:
        image_cache([examples], 32)
    message = str(e.value)
    assert message.startswith("7 of the 8 images cannot be used; the first 5: ") and "\n" not in message
    assert all(f"broken{i}.png (unreadable image)" in message for i in range(5))
    assert "broken5" not in message and message.endswith("broken4.png (unreadable image); fix or remove them from "
                                                          "the task")


def test_a_regression_reports_its_mean_absolute_error_beside_the_correlations():
    from flava.finetune.splits import Split, split_scores

    split = Split([], torch.tensor([1.0, 2.0, 4.0]))
    scores = split_scores("regression", ("pearson", "spearman"), torch.tensor([[2.0], [3.0], [5.0]]), split, 1)[0]
    assert scores["pearson"] == pytest.approx(1.0) and scores["mae"] == pytest.approx(1.0)  # off by one, r = 1


# --------------------------------------------------------------------------- errors before work


def test_errors_before_training(model, tokenizer, tmp_path):
    task = keyword_task(8)
    s = FinetuneSettings(epochs=1)
    for bad, match in ((FinetuneSettings(lr=0), "lr"), (FinetuneSettings(batch_size=0), "batch_size"),
                       (FinetuneSettings(warmup_fraction=1.0), "warmup_fraction"),
                       (FinetuneSettings(max_text_length=500), "max_text_length"),
                       (FinetuneSettings(max_text_length=2), "max_text_length .* 2 leaves no room for text: texts "
                                                             "need at least 3")):
        with pytest.raises(ConfigError, match=match):
            finetune_text(model, task, bad, tokenizer)
    # Below the special tokens, the tokenizers library truncates nothing: refused, not run untruncated.
    pairs = TextData("p", [TextExample(e.text, e.label, "and a second text") for e in task.train], task.val,
                     task.test, task.label_names, task.metrics)
    with pytest.raises(ConfigError, match="sentence pairs need at least 5"):
        finetune_text(model, pairs, FinetuneSettings(max_text_length=4), tokenizer)
    with pytest.raises(ConfigError, match="FlavaModel"):
        finetune_text(model.text_encoder, task, s, tokenizer)
    empty = TextData("t", task.train, [], task.test, task.label_names, task.metrics)
    with pytest.raises(DataError, match="empty val split"):
        finetune_text(model, empty, s, tokenizer)
    wrong = TextData("t", task.train + [TextExample("x", 2)], task.val, task.test, task.label_names, task.metrics)
    with pytest.raises(DataError, match=r"train example 8: label 2 is not a class index in \[0, 2\)"):
        finetune_text(model, wrong, s, tokenizer)
    with pytest.raises(DataError, match="needs at least two"):
        finetune_text(model, TextData("t", task.train, task.val, task.test, ["only"], task.metrics), s, tokenizer)
    with pytest.raises(ConfigError, match="a classification task but asks for pearson"):
        finetune_text(model, TextData("t", task.train, task.val, task.test, task.label_names, ("pearson",)), s,
                      tokenizer)
    examples = colour_examples(4, 0)
    examples[1] = MultimodalExample(tmp_path / "nowhere.png", "q", 0)
    mm = MultimodalData("m", examples, examples, examples, ["red", "blue"], ("accuracy",))
    with pytest.raises(DataError, match="nowhere.png"):
        finetune_multimodal(model, mm, s, tokenizer)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    examples[1] = MultimodalExample(tmp_path / "broken.png", "q", 0)
    with pytest.raises(DataError, match="broken.png: unreadable image"):
        finetune_multimodal(model, mm, s, tokenizer)


@pytest.mark.slow
def test_the_text_tower_trains_whatever_the_source_model_froze():
    frozen = FlavaModel(preset("tiny")).requires_grad_(False)
    tower = frozen.text_tower().requires_grad_(True)
    assert all(p.requires_grad for n, p in tower.named_parameters() if ".pooler." not in n)
    assert not any(p.requires_grad for n, p in tower.named_parameters() if ".pooler." in n)


def test_a_vqa_rows_empty_or_null_answers_are_no_answers(tmp_path, capsys):
    from flava.cli import main
    from flava.errors import DataError
    from flava.evaluate.readers.user_files import read_multimodal_table

    png(tmp_path / "a.png")
    rows = [{"image": "a.png", "question": "which?", "answers": ["a", None, "", "a"]},
            {"image": "a.png", "question": "which?", "answers": [], "answer": "b"}]
    write(tmp_path / "train.jsonl", [json.dumps(r) for r in rows])
    task = read_multimodal_table(tmp_path / "train.jsonl", tmp_path / "train.jsonl", kind="vqa")
    assert task.label_names == ["a", "b"]  # no "None" answer; the empty list's row takes its `answer`
    assert [e.answers for e in task.val] == [{0: pytest.approx(2 / 3)}, {1: 1.0}]  # two annotators of "a"
    # A row with neither is named (it was min() of an empty sequence, a traceback).
    write(tmp_path / "bad.jsonl", [json.dumps({"image": "a.png", "question": "which?", "answers": []})])
    with pytest.raises(DataError, match=r"bad.jsonl has no usable row: its 1 row\(s\) were skipped \(1 with an empty "
                                        r"answer\)"):
        read_multimodal_table(tmp_path / "bad.jsonl", kind="vqa")
    import flava

    flava.FlavaModel(flava.preset("tiny")).save_pretrained(tmp_path / "model")
    assert main(["finetune", "--model", str(tmp_path / "model"), "--task", "vqa", "--train",
                 str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl has no usable row" in err and len(err.strip().splitlines()) == 1


def test_rows_skipped_for_an_empty_cell_take_no_class_with_them(tmp_path):
    # A label whose every row was skipped (an empty text or text2) had still been a class with no
    # example, and let one-class data pass as two; a test file all skipped was "an empty test split".
    write(tmp_path / "ghost.csv", ["text,label", "a,pos", "b,neg", "c,pos", "d,neg", ",neutral"])
    task = read_text_classification(tmp_path / "ghost.csv", None, None, val_fraction=0.25)
    assert task.label_names == ["neg", "pos"]
    assert any(n.startswith("label(s) 'neutral' left with no training row") for n in task.notes), task.notes
    write(tmp_path / "one.csv", ["text,text2,label", "a,,pos", "b,x,neg", "c,y,neg"])
    with pytest.raises(DataError, match=r"one.csv: only label\(s\) 'neg' are left once rows with an empty cell were "
                                        r"skipped \(1 with an empty text2\); 'pos' had no usable row"):
        read_text_classification(tmp_path / "one.csv", None, None)
    write(tmp_path / "unl.csv", ["text,label", "great,", "awful,"])
    with pytest.raises(DataError, match=r"unl.csv has no usable row: its 2 row\(s\) were skipped \(2 with an empty "
                                        r"label\)$"):
        read_text_classification(tmp_path / "ghost.csv", None, tmp_path / "unl.csv")
    # A text that is a list or a boolean had been trained on as "['good', 'movie']" or "True".
    for cell, kind in ((["good", "movie"], "list"), (True, "boolean")):
        write(tmp_path / "odd.jsonl", [json.dumps({"text": "fine", "label": "a"}),
                                       json.dumps({"text": cell, "label": "b"})])
        said = re.escape(json.dumps(cell))
        with pytest.raises(DataError, match=rf"odd.jsonl, line 2: the text {said} is a {kind}; "):
            read_text_classification(tmp_path / "odd.jsonl", None, None)
    # "²" is a digit to str.isdigit, not to int: it had ended in a traceback.
    write(tmp_path / "sup.csv", ["text,label", "a,1", "b,²", "c,1", "d,²", "e,1", "f,²"])
    assert read_text_classification(tmp_path / "sup.csv", None, None).label_names == ["1", "²"]
    # "+1" is no integer to the class order, as earlier releases read it: a task model's classes keep their order.
    from flava.evaluate.readers.labels import class_names

    assert class_names(["+1", "-1"]) == ["+1", "-1"] and class_names(["10", "-2", "3"]) == ["-2", "3", "10"]


def test_classes_a_split_holds_that_training_does_not_are_said(tmp_path):
    # Forty distinct scores read as forty classes: validation held only classes never trained on, unsaid.
    write(tmp_path / "scores.csv", ["text,label"] + [f"item {i},{i / 7:.3f}" for i in range(40)])
    task = read_text_classification(tmp_path / "scores.csv", None, None)
    assert any("the 40 labels are numbers, nearly one per training row" in n and "--task text-regression" in n
               for n in task.notes), task.notes
    assert any(n.startswith("4 of the 4 validation examples have a class no training example has") for n in task.notes)
    write(tmp_path / "ok.csv", ["text,label"] + [f"item {i},{'ab'[i % 2]}" for i in range(40)])
    assert not any("no training example has" in n or "numbers" in n
                   for n in read_text_classification(tmp_path / "ok.csv", None, None).notes)


def test_image_and_multimodal_tables_skip_and_count_an_empty_cell(tmp_path):
    # One empty cell had stopped an image or image-text fine-tuning, where text tables skip and count it.
    from flava.evaluate.readers.user_files import read_image_classification, read_multimodal_table

    for i in range(4):
        png(tmp_path / f"{i}.png", color=(60 * i, 0, 0))
    write(tmp_path / "img.csv", ["image,label", "0.png,a", "1.png,b", "2.png,a", "3.png,b", ",a", "1.png,", ","])
    task = read_image_classification(tmp_path / "img.csv", tmp_path / "img.csv")
    # A row is counted once, by all it lacks.
    counts = "1 with an empty image, 1 with an empty label, 1 with an empty image and label"
    assert len(task.train) == 4 and any(n.startswith("3 train row(s) skipped") and n.endswith(f"img.csv): {counts}")
                                        for n in task.notes), task.notes
    write(tmp_path / "mm.csv", ["image,question,label", "0.png,q,a", "1.png,q,b", "2.png,,a", "3.png,q,"])
    task = read_multimodal_table(tmp_path / "mm.csv", tmp_path / "mm.csv")
    assert len(task.train) == 2 and any(n.endswith("mm.csv): 1 with an empty text, 1 with an empty label")
                                        for n in task.notes), task.notes
    write(tmp_path / "mm.jsonl", [json.dumps({"image": "0.png", "text": {"a": 1}, "label": "x"})])
    with pytest.raises(DataError, match=r"mm.jsonl, line 1: the text \{\"a\": 1\} is a mapping"):
        read_multimodal_table(tmp_path / "mm.jsonl")
