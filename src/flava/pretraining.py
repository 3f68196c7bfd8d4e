"""PretrainingModel: FlavaModel + heads + frozen image tokenizer + the five objectives.

One `forward(batch)` for each batch kind:

- pairs: global contrastive on the unmasked pair (CLS only), then one multimodal pass over the
  masked pair for ITM and MMM; ITM negatives reuse the masked states of other pairs, so they
  cost no extra unimodal pass;
- images: MIM from the image encoder;
- text: MLM from the text encoder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .codebook import FlavaImageCodebook
from .config import FlavaConfig, ObjectivesConfig, from_dict, to_dict
from .data.batch import ImageBatch, PairBatch, TextBatch
from .errors import CheckpointError, ConfigError, InputError
from .losses import (
    IGNORE_INDEX,
    Losses,
    gather,
    gather_with_grad,
    global_contrastive_loss,
    itm_loss,
    masked_prediction_loss,
    targets_at,
    world,
)
from .model.flava import LOGIT_SCALE_MAX, FlavaModel
from .model.heads import PretrainingHeads


def validate_objectives(o: ObjectivesConfig) -> ObjectivesConfig:
    if o.itm_negatives not in ("swap", "hard"):
        raise ConfigError(f"objectives.itm_negatives {o.itm_negatives!r} must be 'swap' or 'hard'")
    for name in ("global_contrastive", "itm", "mmm_image", "mmm_text", "mim", "mlm"):
        if getattr(o, f"{name}_weight") < 0:
            raise ConfigError(f"objectives.{name}_weight must not be negative")
    for name in ("itm_negative_probability", "image_mask_ratio", "text_mask_probability"):
        if not 0 <= getattr(o, name) <= 1:
            raise ConfigError(f"objectives.{name} must lie in [0, 1]")
    return o


@dataclass
class ItmPairs:
    """Which (image, text) pair each multimodal row holds, and whether it matches."""

    image_index: torch.Tensor
    """[R] rows of the image states the multimodal encoder reads."""
    text_index: torch.Tensor
    labels: torch.Tensor
    """[R] 1 for a matched pair, 0 for a negative."""
    image_offset: int = 0
    """Where this process's own images start in `image_index`'s numbering (global indices)."""
    text_offset: int = 0


@dataclass
class PretrainingOutput:
    losses: Losses
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached diagnostics, e.g. ITM accuracy, contrastive top-1."""


def same_text(ids_a: torch.Tensor, mask_a: torch.Tensor, ids_b: torch.Tensor, mask_b: torch.Tensor) -> torch.Tensor:
    """[A, B] True where two texts have the same tokens (padding ignored)."""
    L = max(ids_a.shape[1], ids_b.shape[1])

    def key(ids, mask):
        k = ids.masked_fill(mask == 0, -1)
        return F.pad(k, (0, L - k.shape[1]), value=-1)

    return (key(ids_a, mask_a)[:, None, :] == key(ids_b, mask_b)[None, :, :]).all(-1)


def swap_negatives(input_ids: torch.Tensor, attention_mask: torch.Tensor, probability: float,
                   generator: torch.Generator | None = None) -> ItmPairs:
    """The original recipe: with `probability` a pair's caption becomes another pair's caption
    whose text differs (a pair with no differing caption in the batch stays matched)."""
    B = input_ids.shape[0]
    device = input_ids.device
    candidates = ~same_text(input_ids, attention_mask, input_ids, attention_mask)
    flip = torch.rand(B, generator=generator, device=device) < probability
    flip &= candidates.any(1)
    weights = candidates.float()
    weights[~flip] = 1.0  # rows that stay matched draw a dummy sample
    drawn = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    rows = torch.arange(B, device=device)
    text_index = torch.where(flip, drawn, rows)
    return ItmPairs(rows, text_index, (~flip).long())


def hard_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, same: torch.Tensor,
                   generator: torch.Generator | None = None, own: slice | None = None) -> ItmPairs:
    """ALBEF: for every image a negative text, for every text a negative image, drawn with
    probability softmax(similarity), never one with the same text.

    `sim_*` and `same` are [G, G] over the global batch, drawn identically on every process;
    `own` keeps the rows this process holds (its positives, its images' negative texts, its
    texts' negative images). Rows are positives, then image->text, then text->image negatives.
    """
    G = sim_i2t.shape[0]
    own = own or slice(0, G)
    rows = torch.arange(G, device=sim_i2t.device)
    mine = torch.zeros(G, dtype=torch.bool, device=rows.device)
    mine[own] = True
    pairs = [(rows[mine], rows[mine], torch.ones(int(mine.sum()), dtype=torch.long, device=rows.device))]
    for sim, image_side in ((sim_i2t, True), (sim_t2i, False)):
        weights = sim.float().softmax(dim=1).masked_fill(same, 0.0)
        ok = weights.sum(1) > 0
        if not ok.any():
            continue
        drawn = torch.multinomial(weights[ok], 1, generator=generator).squeeze(1)
        anchor, keep = rows[ok], mine[ok]
        anchor, drawn = anchor[keep], drawn[keep]
        zeros = torch.zeros_like(anchor)
        pairs.append((anchor, drawn, zeros) if image_side else (drawn, anchor, zeros))
    image_index, text_index, labels = (torch.cat(t) for t in zip(*pairs))
    return ItmPairs(image_index, text_index, labels, own.start, own.start)


class PretrainingModel(nn.Module):
    """Everything one pretraining step needs; the codebook is frozen and never trained here."""

    def __init__(
        self,
        config: FlavaConfig,
        objectives: ObjectivesConfig | None = None,
        model: FlavaModel | None = None,
        heads: PretrainingHeads | None = None,
        codebook: FlavaImageCodebook | None = None,
    ):
        super().__init__()
        self.config = config
        self.objectives = validate_objectives(objectives or ObjectivesConfig())
        self.model = model if model is not None else FlavaModel(config)
        self.heads = heads if heads is not None else PretrainingHeads(config)
        self.codebook = codebook
        if codebook is not None:
            if codebook.cfg.vocab_size != config.image.vocab_size:
                raise ConfigError(
                    f"the image codebook has {codebook.cfg.vocab_size} tokens but the MIM/MMM heads predict "
                    f"image.vocab_size={config.image.vocab_size}; make them equal"
                )
            codebook.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.codebook is not None:
            self.codebook.eval()
        return self

    # ------------------------------------------------------------------ targets

    def image_targets(self, batch: PairBatch | ImageBatch) -> torch.Tensor:
        """[B, num_patches] token ids: given in the batch, or computed by the frozen codebook."""
        if batch.image_targets is not None:
            return batch.image_targets
        if self.codebook is None:
            raise InputError(
                "MIM/MMM need image targets but this model has no image codebook and the batch has no "
                "image_targets: load one (flava.load_codebook) or train one with `flava train-tokenizer`"
            )
        if batch.codebook_pixels is None:
            raise InputError("the batch has neither image_targets nor codebook_pixels for the image codebook")
        with torch.no_grad():
            ids = self.codebook.token_ids(batch.codebook_pixels)
        n = batch.patch_mask.shape[1]
        if ids.shape[1] != n:
            raise InputError(
                f"the codebook gives {ids.shape[1]} tokens per image but the image has {n} patches; the codebook "
                f"input must be {8 * int(n ** 0.5)} px for this patch grid"
            )
        return ids

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.clamp(0.0, LOGIT_SCALE_MAX)

    # ------------------------------------------------------------------ forward

    def forward(self, batch: PairBatch | ImageBatch | TextBatch,
                generator: torch.Generator | None = None) -> PretrainingOutput:
        if isinstance(batch, PairBatch):
            return self._pairs(batch, generator)
        if isinstance(batch, ImageBatch):
            return self._images(batch)
        if isinstance(batch, TextBatch):
            return self._texts(batch)
        raise InputError(f"unknown batch type {type(batch).__name__}; expected PairBatch, ImageBatch or TextBatch")

    def _images(self, b: ImageBatch) -> PretrainingOutput:
        parts = {}
        w = self.objectives.mim_weight
        if w > 0:
            out = self.model.image_encoder(b.pixel_values, b.patch_mask)
            labels = targets_at(b.patch_mask, self.image_targets(b))
            parts["mim"] = w * masked_prediction_loss(out.last_hidden_state[:, 1:], labels, self.heads.mim)
        return PretrainingOutput(Losses.from_parts(parts, b.pixel_values))

    def _texts(self, b: TextBatch) -> PretrainingOutput:
        parts = {}
        w = self.objectives.mlm_weight
        if w > 0:
            out = self.model.text_encoder(b.masked_input_ids, b.attention_mask, skip_padding=True)
            parts["mlm"] = w * masked_prediction_loss(out.last_hidden_state, b.mlm_labels, self.heads.mlm)
        return PretrainingOutput(Losses.from_parts(parts, b.attention_mask.float()))

    def _pairs(self, b: PairBatch, generator: torch.Generator | None) -> PretrainingOutput:
        o, m = self.objectives, self.model
        parts, metrics = {}, {}
        hard = o.itm_weight > 0 and o.itm_negatives == "hard"
        need_mm = o.itm_weight > 0 or o.mmm_image_weight > 0 or o.mmm_text_weight > 0
        scale = self.logit_scale()

        img_e = txt_e = None
        if o.global_contrastive_weight > 0 or hard:
            img_e = m.image_embedding(m.image_encoder(b.pixel_values, cls_only=True))
            txt_e = m.text_embedding(m.text_encoder(b.input_ids, b.attention_mask, cls_only=True))
        if o.global_contrastive_weight > 0:
            c = global_contrastive_loss(img_e, txt_e, scale, o.gather_with_grad)
            parts["global_contrastive"] = o.global_contrastive_weight * c.loss
            with torch.no_grad():
                metrics["contrastive_top1"] = (c.logits_per_image.argmax(1) == c.labels).float().mean()

        if not need_mm:
            return PretrainingOutput(Losses.from_parts(parts, b.pixel_values), metrics)

        img_m = m.image_encoder(b.pixel_values, b.patch_mask)
        txt_m = m.text_encoder(b.masked_input_ids, b.attention_mask, skip_padding=True)
        img_mm = m.image_to_mm_projection(img_m.pre_norm_hidden_state)
        txt_mm = m.text_to_mm_projection(txt_m.pre_norm_hidden_state)
        text_mask = b.attention_mask
        B = img_mm.shape[0]

        if hard:
            pairs, img_mm, txt_mm, text_mask = self._hard_pairs(b, img_e, txt_e, scale, img_mm, txt_mm, generator)
        elif o.itm_weight > 0:
            pairs, txt_mm, text_mask = self._swap_pairs(b, txt_mm, generator)
        else:
            rows = torch.arange(B, device=img_mm.device)
            pairs = ItmPairs(rows, rows, torch.ones_like(rows))
        mm = m.multimodal_encoder(img_mm[pairs.image_index], txt_mm[pairs.text_index],
                                  text_mask[pairs.text_index], skip_padding=True)

        if o.itm_weight > 0:
            logits = self.heads.itm(mm.cls)
            parts["itm"] = o.itm_weight * itm_loss(logits, pairs.labels)
            with torch.no_grad():
                metrics["itm_accuracy"] = (logits.argmax(1) == pairs.labels).float().mean()
        # MMM reads matched rows only; they hold pair i in row i for both recipes.
        positive = pairs.labels == 1
        if o.mmm_image_weight > 0:
            labels = targets_at(b.patch_mask, self.image_targets(b))
            parts["mmm_image"] = o.mmm_image_weight * masked_prediction_loss(
                mm.image_patches[positive], labels[pairs.image_index[positive] - pairs.image_offset],
                self.heads.mmm_image)
        if o.mmm_text_weight > 0:
            # Texts are padded to the longest across processes: pad the labels alike.
            mlm_labels = F.pad(b.mlm_labels, (0, mm.layout.num_text_tokens - b.mlm_labels.shape[1]),
                               value=IGNORE_INDEX)
            parts["mmm_text"] = o.mmm_text_weight * masked_prediction_loss(
                mm.text[positive], mlm_labels[pairs.text_index[positive] - pairs.text_offset],
                self.heads.mmm_text)
        return PretrainingOutput(Losses.from_parts(parts, b.pixel_values), metrics)

    @staticmethod
    def _global_texts(b: PairBatch, txt_mm: torch.Tensor):
        """Every process's token ids and mask, padded to the longest text across processes, and
        this process's multimodal-input text states padded alike."""
        L = b.input_ids.shape[1]
        pad = 0
        if world()[1] > 1:
            longest = torch.tensor([L], device=b.input_ids.device)
            torch.distributed.all_reduce(longest, op=torch.distributed.ReduceOp.MAX)
            pad = int(longest) - L
        ids, mask = F.pad(b.input_ids, (0, pad)), F.pad(b.attention_mask, (0, pad))
        return gather(ids), gather(mask), F.pad(txt_mm, (0, 0, 0, pad))

    def _swap_pairs(self, b, txt_mm, generator):
        """Swapped captions drawn over the global batch with the same generator on every process,
        so N processes pick exactly the negatives one process with the whole batch would."""
        rank = world()[0]
        B = b.input_ids.shape[0]
        all_ids, all_mask, txt_mm = self._global_texts(b, txt_mm)
        with torch.no_grad():
            g = swap_negatives(all_ids, all_mask, self.objectives.itm_negative_probability, generator)
        own = slice(rank * B, (rank + 1) * B)
        pairs = ItmPairs(g.image_index[own] - rank * B, g.text_index[own], g.labels[own], 0, rank * B)
        return pairs, gather_with_grad(txt_mm), all_mask

    def _hard_pairs(self, b, img_e, txt_e, scale, img_mm, txt_mm, generator):
        rank = world()[0]
        B = img_mm.shape[0]
        all_ids, all_mask, txt_mm = self._global_texts(b, txt_mm)
        with torch.no_grad():
            all_img_e, all_txt_e = gather(img_e), gather(txt_e)
            same = same_text(all_ids, all_mask, all_ids, all_mask)
            sim = scale * all_img_e @ all_txt_e.T
            pairs = hard_negatives(sim, sim.T, same, generator, own=slice(rank * B, (rank + 1) * B))
        return pairs, gather_with_grad(img_mm), gather_with_grad(txt_mm), all_mask

    # ------------------------------------------------------------------ io

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        from .storage import save_model

        parts = {"model": self.model, "heads": self.heads}
        if self.codebook is not None:
            parts["codebook"] = self.codebook
        save_model(directory, self.config, parts, extra={"objectives": to_dict(self.objectives)})


def pretraining_from_checkpoint(ckpt, objectives: ObjectivesConfig | None = None,
                                codebook: FlavaImageCodebook | None = None) -> tuple[PretrainingModel, list[str]]:
    """Build from a read checkpoint; returns the model and notes on parts that were initialised."""
    from .storage import build_loaded

    notes = []
    if objectives is None:
        objectives = from_dict(ObjectivesConfig, ckpt.extra.get("objectives", {}), "objectives")
    cfg, parts = ckpt.config, ckpt.parts
    model = build_loaded(lambda: FlavaModel(cfg), parts["model"], "model", ckpt.path)
    if parts.get("heads"):
        heads = build_loaded(lambda: PretrainingHeads(cfg), parts["heads"], "heads", ckpt.path)
    else:
        heads = PretrainingHeads(cfg)
        notes.append("the checkpoint has no pretraining heads; they are newly initialised")
    if codebook is None and parts.get("codebook"):
        codebook = build_loaded(lambda: FlavaImageCodebook(cfg.codebook), parts["codebook"], "codebook", ckpt.path)
    if codebook is None:
        notes.append("the checkpoint has no image codebook; MIM/MMM need one (flava train-tokenizer)")
    try:
        pm = PretrainingModel(ckpt.config, objectives, model, heads, codebook)
    except ConfigError as e:
        raise CheckpointError(f"{ckpt.path}: {e}") from None
    return pm, notes
