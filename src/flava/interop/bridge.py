"""The loss bridge: FLAVA's losses for the inputs transformers' FlavaForPreTraining takes.

For checking this project against transformers and for migrating code written for it. The
losses follow transformers' rules (which differ from `PretrainingModel`'s: no ITM negatives are
drawn, labels come from the caller) and carry its `loss_info` names.
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError, InputError
from ..objectives.losses import global_contrastive_loss, itm_loss, masked_prediction_loss, targets_at
from ..objectives.registry import active

def pretraining_losses(
    pretraining_model,
    *,
    input_ids: torch.Tensor | None = None,
    input_ids_masked: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    bool_masked_pos: torch.Tensor | None = None,
    mlm_labels: torch.Tensor | None = None,
    mim_labels: torch.Tensor | None = None,
    itm_labels: torch.Tensor | None = None,
    codebook_pixel_values: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """FLAVA's losses for the inputs `transformers.FlavaForPreTraining.forward` takes, under its
    rules and with its `loss_info` names; for checking against it and for migrating.

    Which losses apply follows transformers: MIM and MLM only for unimodal inputs, MMM and ITM when
    both are given; pairs labelled 0 by `itm_labels` are left out of MMM and of the contrastive
    rows. The weights are the pretraining model's objectives. Inputs are never modified.
    """
    pm = pretraining_model
    m, heads, o = pm.model, pm.heads, pm.objectives
    # The chosen objectives transformers has, by our name: their weights and transformers' names.
    chosen = [r for r in active(o) if r.transformers_name]
    w = {r.name: getattr(o, r.weight) for r in chosen}
    names = {r.name: r.transformers_name for r in chosen}
    if input_ids_masked is None:
        input_ids_masked = input_ids
    out: dict[str, torch.Tensor] = {}

    image_masked = text_masked = mm = None
    if pixel_values is not None:
        image_masked = m.encode_image_tokens(pixel_values, bool_masked_pos)
    if input_ids_masked is not None:
        text_masked = m.encode_text_tokens(input_ids_masked, attention_mask, skip_padding=attention_mask is not None)
    if image_masked is not None and text_masked is not None:
        mm = m.fuse(image_masked, text_masked, skip_padding=True)
    if image_masked is not None and mim_labels is None:
        if pm.codebook is None:
            raise CheckpointError("no mim_labels given and the pretraining model has no image codebook")
        if codebook_pixel_values is None:
            raise InputError("codebook_pixel_values are needed to compute mim_labels")
        mim_labels = pm.codebook.token_ids(codebook_pixel_values)
    flat = (lambda t: t.reshape(t.shape[0], -1) if t is not None else None)
    mim_labels, patch_mask = flat(mim_labels), flat(bool_masked_pos)

    if "mim" in w and image_masked is not None and mm is None and mim_labels is not None:
        labels = targets_at(patch_mask, mim_labels)
        out["mim"] = w["mim"] * masked_prediction_loss(
            image_masked.patches, labels, heads.mim)
    if "mlm" in w and text_masked is not None and mm is None and mlm_labels is not None:
        out["mlm"] = w["mlm"] * masked_prediction_loss(text_masked.last_hidden_state, mlm_labels, heads.mlm)

    keep = None
    if mm is not None and "itm" in w:
        logits = heads.itm(mm.cls)
        if itm_labels is not None:
            positive = itm_labels.ne(0)
            keep = positive | ~positive.any()  # transformers keeps every pair when none matches
            out["itm"] = w["itm"] * itm_loss(logits, itm_labels)
    rows = keep if keep is not None else slice(None)
    if mm is not None and "mmm_image" in w and mim_labels is not None:
        labels = targets_at(patch_mask, mim_labels)[rows]
        out["mmm_image"] = w["mmm_image"] * masked_prediction_loss(
            mm.image_patches[rows], labels, heads.mmm_image)
    if mm is not None and "mmm_text" in w and mlm_labels is not None:
        out["mmm_text"] = w["mmm_text"] * masked_prediction_loss(mm.text[rows], mlm_labels[rows], heads.mmm_text)
    if pixel_values is not None and input_ids is not None and "global_contrastive" in w:
        img_e = m.image_embedding(m.encode_image_tokens(pixel_values, cls_only=True))
        txt_e = m.text_embedding(m.encode_text_tokens(input_ids, attention_mask, cls_only=True))
        out["global_contrastive"] = w["global_contrastive"] * global_contrastive_loss(
            img_e, txt_e, pm.logit_scale(), o.gather_with_grad, rows=keep).loss
    return {names[k]: v for k, v in out.items()}
