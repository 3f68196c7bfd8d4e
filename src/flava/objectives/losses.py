"""FLAVA's losses as functions of model outputs and labels.

Nothing here knows the model's structure: a masked-prediction loss is given the states and a
head to apply; a contrastive loss is given embeddings. Nothing here modifies its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batch import IGNORE_INDEX
from ..distributed import gather_local_grad, gather_with_grad, mean_over_processes, world
from ..syncs import select_positions


@dataclass
class Losses:
    """Weighted losses by objective name (only those that applied) and their sum."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_parts(cls, parts: dict[str, torch.Tensor], like: torch.Tensor) -> "Losses":
        total = sum(parts.values()) if parts else like.new_zeros(())
        return cls(total=total, parts=dict(parts))

    def named(self) -> dict[str, torch.Tensor]:
        return dict(self.parts)

    def __getattr__(self, name: str) -> torch.Tensor:
        """`losses.mim` for `losses.parts["mim"]`."""
        parts = self.__dict__.get("parts", {})
        if name in parts:
            return parts[name]
        raise AttributeError(f"no {name!r} loss in this step (it has {', '.join(parts) or 'none'})")


@dataclass
class ContrastiveResult:
    loss: torch.Tensor
    logits_per_image: torch.Tensor
    """[B_local, B_global] this rank's images against every rank's texts."""
    logits_per_text: torch.Tensor
    labels: torch.Tensor
    """Column of each local row's positive: rank * B + arange(B)."""


def float32(like: torch.Tensor):
    """A block whose matmuls run in float32 under autocast: contrastive logits at a scale of 100
    rounded to bfloat16 are off by a tenth (and the loss with them)."""
    return torch.autocast(like.device.type, enabled=False)


def global_contrastive_loss(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    logit_scale: torch.Tensor,
    gather_features: bool = True,
    rows: torch.Tensor | None = None,
) -> ContrastiveResult:
    """Symmetric InfoNCE of normalised embeddings against the global batch.

    With several processes, each scores its own rows against all processes' columns; features
    are gathered with gradient, or, with `gather_features` false, without (only the process's own
    columns get gradient: the paper's "local" contrastive loss, Table C.1). `rows`
    (boolean, local) keeps a subset of rows in the loss, every column stays a candidate.
    """
    rank = world().rank
    B = image_embeddings.shape[0]
    gathered = gather_with_grad if gather_features else gather_local_grad
    all_images, all_texts, offset = gathered(image_embeddings), gathered(text_embeddings), rank * B
    scale = logit_scale.exp()
    with float32(image_embeddings):
        logits_per_image = scale * image_embeddings.float() @ all_texts.float().T
        logits_per_text = scale * text_embeddings.float() @ all_images.float().T
    labels = offset + torch.arange(B, device=image_embeddings.device)
    li, lt, lab = logits_per_image, logits_per_text, labels
    if rows is not None:
        li, lt, lab = li[rows], lt[rows], lab[rows]
    loss = (F.cross_entropy(li, lab) + F.cross_entropy(lt, lab)) / 2
    return ContrastiveResult(loss, logits_per_image, logits_per_text, labels)


class SigmoidContrastiveHead(nn.Module):
    """SigLIP's learned temperature t = exp(logit_scale) and bias, initialised as the paper does
    (t = 10, b = -10) so the many negative pairs start near their target. A holder of parameters
    the loss reads, with no forward of its own (FSDP leaves it replicated)."""

    def __init__(self, scale: float = math.log(10.0), bias: float = -10.0):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor([scale]))
        self.logit_bias = nn.Parameter(torch.tensor([bias]))


def sigmoid_contrastive_loss(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
                             head: SigmoidContrastiveHead, gather_features: bool = True) -> ContrastiveResult:
    """SigLIP (Zhai et al., 2023): every image-text pair of the global batch is a binary
    match/mismatch problem, -log sigmoid(z_ij (t x_i . y_j + b)) with z_ij = 1 on the diagonal
    and -1 elsewhere, summed over texts and averaged over images.

    Each process scores its own images against every process's texts (gathered with gradient, or
    without for all but its own with `gather_features` false) and divides by its own image count:
    with gradients averaged over processes this is exactly the one-process loss over the whole batch.
    """
    rank = world().rank
    B = image_embeddings.shape[0]
    all_texts = (gather_with_grad if gather_features else gather_local_grad)(text_embeddings)
    offset = rank * B
    with float32(image_embeddings):
        logits = head.logit_scale.exp() * image_embeddings.float() @ all_texts.float().T + head.logit_bias
    labels = offset + torch.arange(B, device=image_embeddings.device)
    columns = torch.arange(logits.shape[1], device=logits.device)
    signs = torch.where(columns[None, :] == labels[:, None], 1.0, -1.0)
    loss = -F.logsigmoid(signs * logits).sum() / B
    return ContrastiveResult(loss, logits, logits.T, labels)


def masked_prediction_loss(states: torch.Tensor, labels: torch.Tensor, head, bound: int | None = None,
                           total: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of `head` at the positions whose label is not IGNORE_INDEX, averaged over the
    selected positions of all processes (see `mean_over_processes`; `total`: over that many).

    `states` [..., D] and `labels` [...] align position by position; the head runs on the
    selected positions only. Under `sync_free()` it runs on `bound` positions (at least the
    selected ones, a number the host knows; all when None), the extra ones left out of the mean.
    """
    index, valid = select_positions(labels != IGNORE_INDEX, bound)
    logits = head(states[index])
    targets = labels[index] if valid is None else labels[index].masked_fill(~valid, IGNORE_INDEX)
    values = F.cross_entropy(logits.float(), targets, reduction="none")
    return mean_over_processes(values, logits, None if valid is None else valid.sum(), total)


def itm_loss(logits: torch.Tensor, labels: torch.Tensor, total: torch.Tensor | None = None) -> torch.Tensor:
    """Binary match (1) / mismatch (0) cross-entropy over [R, 2] logits, averaged over the rows of
    all processes (`total`: over that many); rows labelled IGNORE_INDEX (no negative to draw) are
    left out."""
    values = F.cross_entropy(logits.float(), labels, reduction="none")
    return mean_over_processes(values, logits, (labels != IGNORE_INDEX).sum(), total)


def targets_at(mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Labels that are `targets` where `mask` is set and IGNORE_INDEX elsewhere (a new tensor)."""
    return torch.where(mask.to(torch.bool), targets, torch.full_like(targets, IGNORE_INDEX))
