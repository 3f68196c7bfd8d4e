"""One record per pretraining objective; everything else about objectives derives from these.

A record names the objective, the batch kind it trains on, the config field of its weight,
its head (if it has one), its loss, whether it needs image-token targets (the dVAE codebook),
and its name in `transformers`' FlavaForPreTraining (None when transformers has no such loss).
Config validation, `Losses`, the heads a model carries, the loss bridge, the export and the
codebook check all read this table.

A loss is `loss(states, head) -> tensor`, unweighted; `states` is the batch kind's lazily
computed model states (`objectives.pretraining`), so encoders run only for objectives that
read them, and at most once per step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..config import FlavaConfig, ObjectivesConfig
from ..data.batch import IGNORE_INDEX
from ..model.heads import ITMHead, MaskedPredictionHead
from .losses import (
    SigmoidContrastiveHead,
    global_contrastive_loss,
    itm_loss,
    masked_prediction_loss,
    sigmoid_contrastive_loss,
)

Kind = Literal["pairs", "images", "text"]


@dataclass(frozen=True)
class Objective:
    name: str
    """Its key in `Losses`, metrics and the heads' state dict."""
    kind: Kind
    """The batch kind it trains on."""
    weight: str
    """The `ObjectivesConfig` field that weights it; 0 skips its computation."""
    loss: Callable[[Any, nn.Module | None], torch.Tensor]
    head: Callable[[FlavaConfig], nn.Module] | None = None
    image_tokens: bool = False
    """Whether it predicts image tokens (needs the codebook or precomputed targets)."""
    transformers_name: str | None = None
    """Its `loss_info` name (and `{name}_weight` config key) in transformers' FlavaForPreTraining."""
    applies: Callable[[ObjectivesConfig], bool] = lambda o: True
    """Whether this record is the one the config chose (alternatives share a weight field)."""
    masks: str | None = None
    """The `ObjectivesConfig` rate whose masked positions it predicts (at 0 it measures nothing)."""
    count: Callable[[Any], torch.Tensor] | None = None
    """How many entries its loss averages over in this process's batch (masked positions, ITM
    rows). A batch in chunks (`optim.contrastive_chunks`) divides each chunk's sum by the whole
    batch's count, so the chunks' losses add up to the batch's. None: its loss couples every row
    of the batch (the contrastive losses); a chunked step computes it once over the whole batch
    from cached embeddings (`objectives.chunks`)."""


# The batch's counts of masked patches and tokens, read on the host, bound the positions a
# masked-prediction head runs on under `sync_free()`.
def _mim(s, head) -> torch.Tensor:
    return masked_prediction_loss(s.masked.patches, s.image_labels, head, s.batch.masked_patches,
                                  s.batch_count("mim"))


def _mlm(s, head) -> torch.Tensor:
    return masked_prediction_loss(s.masked.last_hidden_state, s.labels, head, s.batch.masked_tokens,
                                  s.batch_count("mlm"))


def _softmax_contrastive(s, head) -> torch.Tensor:
    image, text = s.embeddings
    c = global_contrastive_loss(image, text, s.logit_scale, s.objectives.gather_with_grad)
    with torch.no_grad():
        s.metrics["contrastive_top1"] = (c.logits_per_image.argmax(1) == c.labels).float().mean()
    return c.loss


def _sigmoid_contrastive(s, head) -> torch.Tensor:
    image, text = s.embeddings
    c = sigmoid_contrastive_loss(image, text, head, s.objectives.gather_with_grad)
    with torch.no_grad():
        s.metrics["contrastive_top1"] = (c.logits_per_image.argmax(1) == c.labels).float().mean()
    return c.loss


def _itm(s, head) -> torch.Tensor:
    f = s.fused
    logits = head(f.multimodal.cls)
    with torch.no_grad():
        rows = (f.pairs.labels != IGNORE_INDEX).sum().clamp_min(1)
        s.metrics["itm_accuracy"] = (logits.argmax(1) == f.pairs.labels).sum() / rows
    return itm_loss(logits, f.pairs.labels, s.batch_count("itm"))


def _mmm_image(s, head) -> torch.Tensor:
    f = s.fused
    return masked_prediction_loss(f.multimodal.image_patches, f.image_labels, head, s.batch.masked_patches,
                                  s.batch_count("mmm_image"))


def _mmm_text(s, head) -> torch.Tensor:
    f = s.fused
    return masked_prediction_loss(f.multimodal.text, f.text_labels, head, s.batch.masked_tokens,
                                  s.batch_count("mmm_text"))


# The entries each loss above averages over (see `Objective.count`), counted on the device.
def _masked_patches(s) -> torch.Tensor:
    return s.batch.patch_mask.sum()


def _masked_tokens(s) -> torch.Tensor:
    return (s.labels != IGNORE_INDEX).sum()


def _itm_rows(s) -> torch.Tensor:
    return (s.itm_pairs.labels != IGNORE_INDEX).sum()


def _matched_masked_patches(s) -> torch.Tensor:
    return s.matched_count(s.batch.patch_mask.sum(1), image=True)


def _matched_masked_tokens(s) -> torch.Tensor:
    return s.matched_count((s.batch.mlm_labels != IGNORE_INDEX).sum(1), image=False)


def _mim_head(c: FlavaConfig) -> nn.Module:
    return MaskedPredictionHead(c.image.hidden_size, c.image.vocab_size, c.image.activation, c.image.layer_norm_eps)


def _mlm_head(c: FlavaConfig) -> nn.Module:
    return MaskedPredictionHead(c.text.hidden_size, c.text.vocab_size, c.text.activation, c.text.layer_norm_eps)


# MMM heads read the multimodal width; activation and epsilon follow the modality they predict.
def _mmm_image_head(c: FlavaConfig) -> nn.Module:
    return MaskedPredictionHead(c.multimodal.hidden_size, c.image.vocab_size, c.image.activation,
                                c.image.layer_norm_eps)


def _mmm_text_head(c: FlavaConfig) -> nn.Module:
    return MaskedPredictionHead(c.multimodal.hidden_size, c.text.vocab_size, c.text.activation, c.text.layer_norm_eps)


OBJECTIVES: tuple[Objective, ...] = (
    Objective("mim", "images", "mim_weight", _mim, _mim_head, image_tokens=True, transformers_name="mim",
              count=_masked_patches, masks="image_mask_ratio"),
    Objective("mlm", "text", "mlm_weight", _mlm, _mlm_head, transformers_name="mlm", count=_masked_tokens,
              masks="text_mask_probability"),
    Objective("global_contrastive", "pairs", "global_contrastive_weight", _softmax_contrastive,
              transformers_name="global_contrastive", applies=lambda o: o.contrastive == "softmax"),
    Objective("sigmoid_contrastive", "pairs", "global_contrastive_weight", _sigmoid_contrastive,
              lambda c: SigmoidContrastiveHead(), applies=lambda o: o.contrastive == "sigmoid"),
    Objective("itm", "pairs", "itm_weight", _itm, lambda c: ITMHead(c.multimodal.hidden_size),
              transformers_name="itm", count=_itm_rows),
    Objective("mmm_image", "pairs", "mmm_image_weight", _mmm_image, _mmm_image_head, image_tokens=True,
              transformers_name="mmm_image", count=_matched_masked_patches, masks="image_mask_ratio"),
    Objective("mmm_text", "pairs", "mmm_text_weight", _mmm_text, _mmm_text_head, transformers_name="mmm_text",
              count=_matched_masked_tokens, masks="text_mask_probability"),
)


def chosen(o: ObjectivesConfig) -> list[Objective]:
    """The records this config chose (whatever their weights): they define the heads a model has."""
    return [r for r in OBJECTIVES if r.applies(o)]


def active(o: ObjectivesConfig, kinds: Iterable[str] | None = None) -> list[Objective]:
    """The chosen records with a positive weight, of the given batch kinds (all when None)."""
    kinds = None if kinds is None else set(kinds)
    return [r for r in chosen(o) if getattr(o, r.weight) > 0 and (kinds is None or r.kind in kinds)]


def needs_image_tokens(o: ObjectivesConfig, kinds: Iterable[str] | None = None) -> bool:
    """Whether training these kinds needs image-token targets (a codebook or prepared tokens)."""
    return any(r.image_tokens for r in active(o, kinds))
