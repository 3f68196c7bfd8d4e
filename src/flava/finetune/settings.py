"""What a fine-tuning run takes (FinetuneSettings, Resumable) and what it gives (FinetuneResult)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
from torch import nn

from ..config import NonNegative, PositiveInt, Range, Seed

# Confusion matrices of VQA tasks only for vocabularies small enough to read (easy-vqa's 13
# answers, not VQAv2's 3,129).
MAX_CONFUSION_ANSWERS = 100


TRAINING = "training"
"""OUTPUT/training/: the state of a fine-tuning stopped on request, which --resume continues."""


def data_identity(spec: str | None) -> dict | None:
    """What a fine-tuning's `--train`/`--val`/`--test` names, as a resume compares it: a file by its
    bytes (their count and digest), a folder of class folders by the names of the images below it,
    anything else (a packaged task) by its name. Where the data lies and how it is named (relative,
    absolute, through a link, copied elsewhere) does not matter; an edit does."""
    if spec is None:
        return None
    import hashlib
    import os

    path = Path(spec).expanduser()
    if path.is_file():
        digest = hashlib.blake2b(digest_size=8)
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return {"bytes": path.stat().st_size, "digest": digest.hexdigest()}
    if path.is_dir():
        from ..data.images import IMAGE_SUFFIXES
        from ..data.sources import names_digest

        names = []
        for folder, dirs, files in os.walk(path):
            dirs.sort()
            names += [os.path.relpath(os.path.join(folder, f), path) for f in sorted(files)
                      if f.lower().endswith(tuple(IMAGE_SUFFIXES))]
        return {"images": names_digest(names)}
    return {"name": spec}


@dataclass
class Resumable:
    """Where a fine-tuning keeps its state when it stops on request (SIGTERM/SIGINT), and what it
    was started with (a resumed run must match it)."""

    directory: Path
    started_with: dict


@dataclass
class FinetuneSettings:
    """How to fine-tune. The paper's values: VQAv2 lr 1e-4, SNLI-VE and Hateful Memes 1e-5, all
    with weight decay 0.01, batch 256, 2,000 warmup steps then cosine; GLUE follows RoBERTa
    (lr 1e-5 to 3e-5, batch 16 or 32, 6 % warmup, 10 epochs)."""

    lr: Annotated[float, Range(0, low_open=True)] = 1e-4
    """Peak learning rate. A frozen encoder's head trains well with about 1e-3."""
    epochs: PositiveInt = 3
    """Passes over the training split (fewer if `max_steps` stops earlier)."""
    batch_size: PositiveInt = 32
    """Training examples per step."""
    weight_decay: NonNegative = 0.01
    """AdamW weight decay (not applied to norms, biases and tokens)."""
    warmup_fraction: Annotated[float, Range(0, 1, high_open=True)] = 0.06
    """Share of the steps spent warming the learning rate up linearly; cosine decay to 0 after."""
    max_steps: PositiveInt | None = None
    """Stop after this many steps even within an epoch."""
    eval_every: PositiveInt | None = None
    """Evaluate on validation every this many steps; None: at the end of every epoch."""
    train_encoders: bool = True
    """Full fine-tuning; False trains the head alone on features computed once."""
    head_hidden: PositiveInt = 1536
    """Hidden width of the image + text head (the paper: 1536)."""
    head_dropout: Annotated[float, Range(0, 1, high_open=True)] = 0.1
    """Dropout inside the heads (RoBERTa's head uses 0.1)."""
    max_grad_norm: NonNegative = 1.0
    """Clip the gradient norm to this; 0 turns clipping off."""
    eval_batch_size: PositiveInt = 128
    """Examples per forward pass when computing features and evaluating."""
    max_text_length: PositiveInt | None = None
    """Tokens per text (pair) including [CLS]/[SEP]; default: the tokenizer's, capped by the model."""
    seed: Seed = 0
    """Seeds the head's initialisation, dropout and the order of training examples."""


@dataclass
class FinetuneResult:
    """What a fine-tuning run measured. Curves are for plotting: `train_loss[i]` is step i + 1's
    loss; `val_curve[j]` is the selection metric after step `eval_steps[j]`."""

    task: str
    metric: str
    """The validation metric that picked the checkpoint (the task's first)."""
    label_names: list[str]
    train_loss: list[float]
    eval_steps: list[int]
    val_curve: list[float]
    val_metrics: list[dict[str, float]]
    """Every metric of the task at each evaluation (a regression's with its mean absolute error, "mae")."""
    best_step: int
    best_val: float
    test_metrics: dict[str, float]
    """The task's metrics on test, scored with the best state (a test split in parts: the parts'
    means, and each part's as "accuracy (matched)"); a regression's "mae" beside them."""
    predictions: np.ndarray
    """Test predictions: class / answer indices, or values for regression."""
    probabilities: np.ndarray | None
    """[N, classes] softmax over the test split (single-label classification only)."""
    confusion: np.ndarray | None
    """[classes, classes] test confusion matrix, rows true, columns predicted (scikit-learn's
    layout); VQA: against each question's top answer, for vocabularies of at most
    MAX_CONFUSION_ANSWERS. None for regression."""
    train_encoders: bool
    steps: int
    seconds: float
    """Wall time of the whole run."""
    feature_seconds: float
    """Of which: computing frozen features (0 in full fine-tuning)."""
    model: nn.Module = field(repr=False)
    """The fine-tuned classifier (encoder copy + head) in the best state, in eval mode."""
    kind: str = "classification"
    """'classification', 'regression' or 'vqa'."""
    max_text_length: int | None = None
    """Tokens per text (pair) the model was trained with; None for image classification."""
    pairs: bool = False
    """Whether the text task's examples were sentence pairs."""
    val_losses: list[float] = field(default_factory=list)
    """The training loss on validation at each evaluation: a tie on `metric` goes to the lower."""

