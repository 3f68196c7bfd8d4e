"""Image + text benchmarks: VQAv2 (answer vocabulary, soft scores), the packaged easy-vqa,
SNLI-VE and Hateful Memes."""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

from ...data.tables import Row, read_table
from ...errors import DataError
from ...io.files import read_json
from ...finetune.examples import MultimodalData, MultimodalExample, check_multimodal_data
from .splits import carve, check_limit, subsample, subsample_splits
# --------------------------------------------------------------------------- VQA


def answer_vocabulary(answers: Sequence[str], min_count: int = 1, max_answers: int | None = None) -> list[str]:
    """Answers ordered by frequency (ties alphabetically), those seen at least `min_count`
    times, at most `max_answers` of them. VQAv2 practice: the questions' majority answers of
    train, min_count 9 (3,129 answers)."""
    counts = Counter(answers)
    vocab = sorted((a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a))
    return vocab[:max_answers] if max_answers is not None else vocab


def vqa_soft_scores(human_answers: Sequence[str], vocab_index: dict[str, int]) -> dict[int, float]:
    """VQAv2 soft targets: an answer given by n annotators (after `normalize_answer`, as MMF builds
    its targets) scores min(1, n / 3); answers outside the vocabulary are dropped."""
    counts = Counter(normalize_answer(h) for h in human_answers)
    return {vocab_index[a]: min(1.0, n / 3) for a, n in counts.items() if a in vocab_index}


def vqa_accuracy_scores(human_answers: Sequence[str], vocab_index: dict[str, int]) -> dict[int, float]:
    """The official VQA accuracy of each answer, what validation and test are scored by: with the
    10 human answers VQAv2 has, min(1, n / 3) averaged over the 10 subsets that leave one human
    out (0.3, 0.6, 0.9 and 1 for 1, 2, 3 and 4+ humans); with another number of answers, min(1,
    n / 3) as the training targets. `human_answers` are as the annotators wrote them: the VQA
    challenge's evaluator (EvalAI's vqaEval.py) processes answers (and the prediction) only when the
    annotators disagree; when all ten wrote the same string it compares it lower-cased only (so ten
    "Yes" match "yes", ten "Two" never match "2")."""
    m = len(human_answers)
    if m != 10:
        return vqa_soft_scores(human_answers, vocab_index)
    stripped = [_stripped(h) for h in human_answers]
    agree = len(set(stripped)) == 1
    counts = Counter(h.lower() for h in stripped) if agree else Counter(normalize_answer(h) for h in stripped)
    return {vocab_index[a]: (n * min(1.0, (n - 1) / 3) + (m - n) * min(1.0, n / 3)) / m
            for a, n in counts.items() if a in vocab_index}


def vqa_row_targets(human_answers: Sequence[str], vocab_index: dict[str, int],
                    scores: Callable = vqa_accuracy_scores) -> dict[int, float]:
    """A table row's answer scores (`read_multimodal_table`, `flava predict`): one given answer is
    right outright when it equals after `normalize_answer`; more are scored by `scores`
    (`vqa_soft_scores` for training, the official accuracy for validation and test)."""
    if len(human_answers) == 1:
        a = normalize_answer(human_answers[0])
        return {vocab_index[a]: 1.0} if a in vocab_index else {}
    return scores(human_answers, vocab_index)


# The official VQA evaluator's answer processing (GT-Vision-Lab vqaEval.py), quirks included, so that
# scores match its own: the punctuation it handles (not the apostrophe or the period), number words,
# articles and the contractions it restores.
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
# Its period pattern "(?!<=\d)(\.)(?!\d)" has a mistyped lookbehind, so it is "a period not followed
# by a digit"; it passes re.UNICODE (32) as sub's count, so at most 32 periods go.
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
    he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've
    needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've
    somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll
    that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've
    weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've
    why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll
    you're you've""".split()


def _contractions() -> dict[str, str]:
    # The evaluator's table, for lower-cased words: each form with exactly one of its apostrophes
    # missing, plus its one entry the wrong way round. (Its table lacks she'd, we'd, I'm, let's, she's:
    # "shed", "wed", "im", "lets" and "shes" stay.)
    table = {"somebody'd": "somebodyd"}
    for form in _CONTRACTED:
        table.update({form[:i] + form[i + 1:]: form for i, c in enumerate(form) if c == "'"})
    return table


_CONTRACTIONS = _contractions()


def _stripped(answer: str) -> str:
    return answer.replace("\n", " ").replace("\t", " ").strip()


def _punctuation(text: str) -> str:
    # A mark that touches a space somewhere is removed everywhere, one that does not becomes a space
    # ("black/white" -> "black white"); a comma between digits anywhere ("1,000") removes every mark.
    remove_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        out = out.replace(p, "" if remove_all or p + " " in text or " " + p in text else " ")
    return _PERIOD.sub("", out, count=32)


def _digits_articles(text: str) -> str:
    words = (_NUMBERS.get(w, w) for w in text.lower().split())
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


@lru_cache(maxsize=1 << 16)  # VQAv2's millions of answers repeat a lot; about 10 us each otherwise
def normalize_answer(answer: str) -> str:
    """An answer as the VQA challenge's evaluator processes it (and MMF, FLAVA's code base, builds
    its answer vocabulary and targets): newlines and tabs to spaces, trimmed, punctuation, number
    words to digits, articles dropped, contractions restored ("Two dogs." -> "2 dogs", "dont" ->
    "don't"). An answer the processing would empty ("A", "the", "?") keeps its trimmed, lower-cased
    text: the evaluator makes all of them "", one answer, and multiple-choice letters would merge."""
    return _digits_articles(_punctuation(_stripped(answer))) or _stripped(answer).lower()


def easy_vqa_data(val_fraction: float | None = None, seed: int = 0, limit: int | None = None) -> MultimodalData:
    """easy-vqa (packaged): its train questions split by image into train and validation (by
    default the fixed held-out images of `flava.data.demo.easy_vqa_validation_ids`, else a seeded
    `val_fraction`), its test questions as test. Each question has one answer, which is a soft
    target of 1.0. The answer vocabulary is train's answers by frequency. `limit` caps the
    questions of each split (a seeded choice)."""
    import easy_vqa

    check_limit(limit)
    rows = {}
    for split in ("train", "test"):
        questions, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
        paths = getattr(easy_vqa, f"get_{split}_image_paths")()
        rows[split] = [(Path(paths[i]), q, normalize_answer(a), i) for q, a, i in zip(questions, answers, image_ids)]
    if val_fraction is None:  # the held-out images the demo's pretraining never sees
        from ...data.demo import easy_vqa_validation_ids

        held_out = easy_vqa_validation_ids()
        train = [r for r in rows["train"] if r[3] not in held_out]
        val = [r for r in rows["train"] if r[3] in held_out]
    else:
        train, val = carve(rows["train"], val_fraction, seed, group=lambda r: r[3])
    train, val, test = subsample_splits(train, val, rows["test"], limit, seed)
    vocab = answer_vocabulary([r[2] for r in train])
    index = {a: i for i, a in enumerate(vocab)}

    def examples(rs):
        # One given answer, so it is the right one outright (VQAv2's n/3 counts ten annotators).
        return [MultimodalExample(p, q, answers={index[a]: 1.0} if a in index else {}) for p, q, a, _ in rs]

    data = MultimodalData("easy-vqa", examples(train), examples(val), examples(test), vocab, ("vqa_score",), "vqa")
    check_multimodal_data(data)
    return data


def _read_json(path: Path) -> dict:
    return read_json(path, "annotation file", DataError, expect=dict)


def _vqa_split(questions_file: Path, annotations_file: Path, image_dir: Path) -> list[tuple]:
    """(image path, question, majority answer (normalized), human answers (as written: the official
    accuracy needs them so), image id) per question."""
    qdata, adata = _read_json(questions_file), _read_json(annotations_file)
    if "questions" not in qdata:
        raise DataError(f"{questions_file} has no 'questions' list; is it a VQAv2 questions file?")
    if "annotations" not in adata:
        raise DataError(f"{annotations_file} has no 'annotations' list; is it a VQAv2 annotations file?")
    if not image_dir.is_dir():
        raise DataError(f"image directory {image_dir} does not exist")
    subtype = qdata.get("data_subtype")
    by_question = {a["question_id"]: a for a in adata["annotations"]}
    out = []
    for q in qdata["questions"]:
        a = by_question.get(q["question_id"])
        if a is None:
            raise DataError(f"{annotations_file} has no annotation for question {q['question_id']} of "
                            f"{questions_file}; are they the same split?")
        image_id = int(q["image_id"])
        # COCO 2014 names (COCO_train2014_000000000009.jpg), else COCO 2017 names (000000000009.jpg).
        named = image_dir / f"COCO_{subtype}_{image_id:012d}.jpg" if subtype else None
        path = named if named is not None and named.is_file() else image_dir / f"{image_id:012d}.jpg"
        humans = [h["answer"] for h in a["answers"]]
        out.append((path, q["question"], normalize_answer(a["multiple_choice_answer"]), humans, image_id))
    return out


def read_vqa(train_questions: str | Path, train_annotations: str | Path, train_images: str | Path,
             test_questions: str | Path, test_annotations: str | Path, test_images: str | Path, *,
             val_fraction: float = 0.1, seed: int = 0, min_answer_count: int = 9,
             limit: int | None = None) -> MultimodalData:
    """VQAv2 from its JSON files (questions + annotations per split) and COCO image folders.
    Train on train2014 (minus a seeded validation share, split by image), test on val2014
    (test-dev needs the evaluation server). Answers (processed by `normalize_answer`): train's majority
    answers seen at least `min_answer_count` times; training targets: min(1, n/3) over the 10 human
    answers; validation and test scores: the official VQA accuracy (`vqa_accuracy_scores`)."""
    check_limit(limit)
    train = _vqa_split(Path(train_questions), Path(train_annotations), Path(train_images))
    test = _vqa_split(Path(test_questions), Path(test_annotations), Path(test_images))
    train, val = carve(train, val_fraction, seed, group=lambda r: r[4])
    train, val, test = subsample_splits(train, val, test, limit, seed)
    vocab = answer_vocabulary([r[2] for r in train], min_answer_count)
    if len(vocab) < 2:
        raise DataError(f"fewer than two answers occur {min_answer_count}+ times in {train_annotations}; "
                        f"lower min_answer_count")
    index = {a: i for i, a in enumerate(vocab)}

    def examples(rs, scores):
        return [MultimodalExample(p, q, answers=scores(h, index)) for p, q, _, h, _ in rs]

    # Trained on the soft targets, scored as the official evaluator scores.
    data = MultimodalData("VQAv2", examples(train, vqa_soft_scores), examples(val, vqa_accuracy_scores),
                          examples(test, vqa_accuracy_scores), vocab, ("vqa_score",), "vqa")
    check_multimodal_data(data)
    return data


# --------------------------------------------------------------------------- SNLI-VE, Hateful Memes


def _field(row: Row, key: str):
    if key not in row.values:
        raise DataError(f"{row.where} has no field {key!r}")
    return row.values[key]


SNLI_VE_LABELS = ("entailment", "neutral", "contradiction")


def read_snli_ve(directory: str | Path, image_root: str | Path, limit: int | None = None, seed: int = 0,
                 files: tuple[str, str, str] = ("snli_ve_train.jsonl", "snli_ve_dev.jsonl", "snli_ve_test.jsonl"),
                 ) -> MultimodalData:
    """SNLI-VE: jsonl files (train, dev = validation, test) whose rows hold `Flickr30K_ID`, the
    hypothesis `sentence2` and `gold_label`; the premise is the Flickr30K image
    `<image_root>/<Flickr30K_ID>.jpg`. Rows with SNLI's no-consensus label '-' are skipped."""
    check_limit(limit)
    directory, image_root = Path(directory), Path(image_root)
    if not image_root.is_dir():
        raise DataError(f"Flickr30K image directory {image_root} does not exist")
    index = {n: i for i, n in enumerate(SNLI_VE_LABELS)}
    splits, notes = [], []
    for split, name in zip(("train", "val", "test"), files):
        path, out, skipped = directory / name, [], 0
        for row in read_table(path).rows:
            label = str(_field(row, "gold_label"))
            if label == "-":
                skipped += 1
                continue
            if label not in index:
                raise DataError(f"{row.where}: gold_label {label!r} is not one of {', '.join(SNLI_VE_LABELS)}")
            image_id = str(_field(row, "Flickr30K_ID"))
            image = image_root / (image_id if image_id.endswith(".jpg") else f"{image_id}.jpg")
            out.append(MultimodalExample(image, str(_field(row, "sentence2")), index[label]))
        if skipped:
            notes.append(f"{skipped} {split} row(s) without a gold label ('-') skipped")
        splits.append(subsample(out, limit, seed + len(splits)))
    data = MultimodalData("SNLI-VE", *splits, list(SNLI_VE_LABELS), ("accuracy",), notes=notes)
    check_multimodal_data(data)
    return data


def read_hateful_memes(directory: str | Path, val_file: str = "dev_seen.jsonl", test_file: str = "test_seen.jsonl",
                       limit: int | None = None, seed: int = 0) -> MultimodalData:
    """Hateful Memes: train.jsonl, `val_file`, `test_file` in `directory`, rows with `img`
    (relative to `directory`), `text` and `label` (0 or 1). Metrics: AUROC (selects), accuracy."""
    check_limit(limit)
    directory = Path(directory)
    splits = []
    for name in ("train.jsonl", val_file, test_file):
        path, out = directory / name, []
        for row in read_table(path).rows:
            label = _field(row, "label")
            if label not in (0, 1) or isinstance(label, bool):
                raise DataError(f"{row.where}: label {label!r} is not 0 or 1 (a test file without "
                                f"labels cannot be scored; use one that has them)")
            out.append(MultimodalExample(directory / str(_field(row, "img")), str(_field(row, "text")), int(label)))
        splits.append(subsample(out, limit, seed + len(splits)))
    data = MultimodalData("Hateful Memes", *splits, ["not_hateful", "hateful"], ("auroc", "accuracy"))
    check_multimodal_data(data)
    return data
