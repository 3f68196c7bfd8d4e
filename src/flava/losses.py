"""FLAVA's five objectives as functions of model outputs and labels.

Nothing here knows the model's structure: a masked-prediction loss is given the states and a
head to apply; a contrastive loss is given embeddings. Nothing here modifies its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100
NAMES = ("mim", "mlm", "itm", "global_contrastive", "mmm_image", "mmm_text")


@dataclass
class Losses:
    """Weighted losses by name (None when an objective did not apply) and their sum."""

    total: torch.Tensor
    mim: torch.Tensor | None = None
    mlm: torch.Tensor | None = None
    itm: torch.Tensor | None = None
    global_contrastive: torch.Tensor | None = None
    mmm_image: torch.Tensor | None = None
    mmm_text: torch.Tensor | None = None

    @classmethod
    def from_parts(cls, parts: dict[str, torch.Tensor], like: torch.Tensor) -> "Losses":
        total = sum(parts.values()) if parts else like.new_zeros(())
        return cls(total=total, **parts)

    def named(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "total" and getattr(self, f.name) is not None}


# --------------------------------------------------------------------------- distributed


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends every rank's gradient back to the rank that owns the rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, size = world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows: (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Rows of every rank, concatenated in rank order (every rank must pass the same shape)."""
    return x if world()[1] == 1 else _GatherWithGrad.apply(x)


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """Like `gather_with_grad` without gradient."""
    if world()[1] == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world()[1])]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


# --------------------------------------------------------------------------- objectives


@dataclass
class ContrastiveResult:
    loss: torch.Tensor
    logits_per_image: torch.Tensor
    """[B_local, B_global] this rank's images against every rank's texts."""
    logits_per_text: torch.Tensor
    labels: torch.Tensor
    """Column of each local row's positive: rank * B + arange(B)."""


def global_contrastive_loss(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    logit_scale: torch.Tensor,
    gather_features: bool = True,
    rows: torch.Tensor | None = None,
) -> ContrastiveResult:
    """Symmetric InfoNCE of normalised embeddings against the global batch.

    With several processes, each scores its own rows against all processes' columns; features
    are gathered with gradient unless `gather_features` is false (then only locally). `rows`
    (boolean, local) keeps a subset of rows in the loss, every column stays a candidate.
    """
    rank, size = world()
    B = image_embeddings.shape[0]
    if gather_features and size > 1:
        all_images, all_texts = gather_with_grad(image_embeddings), gather_with_grad(text_embeddings)
        offset = rank * B
    else:
        all_images, all_texts, offset = image_embeddings, text_embeddings, 0
    scale = logit_scale.exp()
    logits_per_image = scale * image_embeddings @ all_texts.T
    logits_per_text = scale * text_embeddings @ all_images.T
    labels = offset + torch.arange(B, device=image_embeddings.device)
    li, lt, lab = logits_per_image, logits_per_text, labels
    if rows is not None:
        li, lt, lab = li[rows], lt[rows], lab[rows]
    loss = (F.cross_entropy(li, lab) + F.cross_entropy(lt, lab)) / 2
    return ContrastiveResult(loss, logits_per_image, logits_per_text, labels)


def mean_over_processes(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The mean of `values` over every process's entries, in the form data-parallel training needs.

    Each process returns sum_local * world / count_global: averaging these (as gradient
    averaging does) gives sum_global / count_global, so processes holding different numbers of
    masked tokens or ITM rows train exactly like one process with the whole batch. With no entry
    anywhere the result is a zero that still reaches `like`'s graph (every parameter used).
    Every process must call this the same number of times (it runs one all_reduce).
    """
    size = world()[1]
    zero = like.sum() * 0.0
    if size == 1:
        return values.mean() + zero if values.numel() else zero
    count = torch.tensor(float(values.numel()), device=values.device)
    dist.all_reduce(count)
    return values.sum() * size / count.clamp_min(1.0) + zero


def masked_prediction_loss(states: torch.Tensor, labels: torch.Tensor, head) -> torch.Tensor:
    """Cross-entropy of `head` at the positions whose label is not IGNORE_INDEX, averaged over the
    selected positions of all processes (see `mean_over_processes`).

    `states` [..., D] and `labels` [...] align position by position; the head runs on the
    selected positions only.
    """
    selected = labels != IGNORE_INDEX
    logits = head(states[selected])
    return mean_over_processes(F.cross_entropy(logits.float(), labels[selected], reduction="none"), logits)


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary match (1) / mismatch (0) cross-entropy over [R, 2] logits, averaged over the rows of
    all processes."""
    return mean_over_processes(F.cross_entropy(logits.float(), labels, reduction="none"), logits)


def targets_at(mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Labels that are `targets` where `mask` is set and IGNORE_INDEX elsewhere (a new tensor)."""
    return torch.where(mask.to(torch.bool), targets, torch.full_like(targets, IGNORE_INDEX))
