"""PretrainingModel: FlavaModel + heads + frozen image codebook + the objectives' losses.

One `forward(batch)` for each batch kind. Each kind has a states object whose parts are
computed on first use, so only the encoders some active objective reads run, each once:

- pairs: the unmasked pair's CLS embeddings (contrastive, hard ITM negatives), then one
  multimodal pass over the masked pair for ITM and MMM; ITM negatives reuse the masked states of
  other pairs, so they cost no extra unimodal pass;
- images: the masked image encoder pass (MIM);
- text: the masked text encoder pass (MLM).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import FlavaConfig, ObjectivesConfig, check, to_dict
from ..data.batch import IGNORE_INDEX, ImageBatch, PairBatch, TextBatch
from ..distributed import gather, gather_with_grad, max_over_processes, world
from ..errors import ConfigError, InputError
from ..io.checkpoint import write_checkpoint_dir, write_checkpoint_files
from ..model.codebook import FlavaImageCodebook
from ..model.encoders import EncoderOutput, MultimodalOutput
from ..model.flava import LOGIT_SCALE_MAX, SAVED_FILES, FlavaModel, init_weights
from ..model.layers import take_rows
from .losses import Losses, float32, targets_at
from .negatives import ItmPairs, hard_negatives, same_text, swap_negatives
from .registry import active, chosen

if TYPE_CHECKING:
    from .chunks import Chunk


TARGETS = "targets/"
"""Prefix of the metrics that count each objective's targets in a batch (`PretrainingModel.forward`)."""

@dataclass
class PretrainingOutput:
    losses: Losses
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached diagnostics, e.g. ITM accuracy, contrastive top-1."""


class PretrainingHeads(nn.Module):
    """The heads of the objectives a config chose, each under its objective's name."""

    def __init__(self, config: FlavaConfig, objectives: ObjectivesConfig | None = None):
        super().__init__()
        for record in chosen(objectives or ObjectivesConfig()):
            if record.head is not None:
                self.add_module(record.name, record.head(config))
        init_weights(self, config.init_std)


# --------------------------------------------------------------------------- states by batch kind


class _States:
    def __init__(self, pm: "PretrainingModel", batch, chunk: Chunk | None = None):
        self.pm, self.batch, self.chunk = pm, batch, chunk
        self.model, self.objectives = pm.model, pm.objectives
        self.metrics: dict[str, torch.Tensor] = {}

    def batch_count(self, name: str) -> torch.Tensor | None:
        """When these rows are a chunk of a batch: the batch's count of objective `name`'s entries
        over every process (`Objective.count`), which its loss divides by; else None."""
        return None if self.chunk is None else self.chunk.counts[name]


class ImageStates(_States):
    @cached_property
    def masked(self) -> EncoderOutput:
        return self.model.encode_image_tokens(self.batch.pixel_values, self.batch.patch_mask)

    @cached_property
    def image_labels(self) -> torch.Tensor:
        """[B, num_patches] image token ids at masked patches, IGNORE_INDEX elsewhere."""
        return targets_at(self.batch.patch_mask, self.pm.image_targets(self.batch))


class TextStates(_States):
    @cached_property
    def masked(self) -> EncoderOutput:
        b = self.batch
        return self.model.encode_text_tokens(b.masked_input_ids, b.attention_mask, skip_padding=True,
                                             real_tokens=b.text_tokens)

    @property
    def labels(self) -> torch.Tensor:
        return self.batch.mlm_labels


@dataclass
class Fused:
    """The multimodal pass over masked pairs and ITM negatives."""

    multimodal: MultimodalOutput
    pairs: ItmPairs
    image_labels: torch.Tensor | None
    """[R, num_patches] MMM image labels of every row, IGNORE_INDEX throughout a row that does not
    hold a matched pair (None when MMM-image is off)."""
    text_labels: torch.Tensor | None
    """[R, num_text_tokens] MMM text labels alike (None when MMM-text is off)."""


def _matched_rows(labels: torch.Tensor, index: torch.Tensor, offset: int, matched: torch.Tensor) -> torch.Tensor:
    """[R, ...] this process's `labels` [B, ...] of the pair each matched row holds, IGNORE_INDEX in
    the other rows: a shape the host knows, where selecting the matched rows would not be."""
    own = (index - offset).clamp(0, labels.shape[0] - 1)  # other rows may point anywhere
    keep = matched.view(-1, *(1,) * (labels.dim() - 1))
    return torch.where(keep, labels[own], IGNORE_INDEX)


class PairStates(_States):
    def __init__(self, pm: "PretrainingModel", batch: PairBatch, generator: torch.Generator | None,
                 chunk: Chunk | None = None, contrastive_only: bool = False):
        super().__init__(pm, batch, chunk)
        self.generator, self.contrastive_only = generator, contrastive_only

    @cached_property
    def logit_scale(self) -> torch.Tensor:
        return self.pm.logit_scale()

    @property
    def contrastive_scale(self) -> torch.Tensor:
        """What the contrastive objective multiplies cosines by: exp of the (clamped) logit scale,
        SigLIP's own learned temperature under the sigmoid loss."""
        if self.objectives.contrastive == "sigmoid":
            return self.pm.heads.sigmoid_contrastive.logit_scale.exp().detach()
        return self.logit_scale.exp().detach()

    @cached_property
    def _image_passes(self) -> tuple[EncoderOutput, EncoderOutput] | None:
        """The masked images and the whole images' CLS states from one patch projection, when a
        step reads both (contrastive embeddings, for the loss or hard negatives, beside ITM or
        MMM: the objectives' weights say which) and is not a chunk's (whose contrastive pass is
        planned and replayed alone); else None and each pass is its own."""
        o, b = self.objectives, self.batch
        fused = o.itm_weight > 0 or o.mmm_image_weight > 0 or o.mmm_text_weight > 0
        whole = o.global_contrastive_weight > 0 or (o.itm_weight > 0 and o.itm_negatives == "hard")
        if self.chunk is not None or self.contrastive_only or not (fused and whole):
            return None
        return self.model.image_encoder.masked_and_whole(b.pixel_values, b.patch_mask)

    @cached_property
    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Contrastive image and text embeddings of the unmasked pairs."""
        m, b = self.model, self.batch
        whole = self._image_passes[1] if self._image_passes else m.encode_image_tokens(b.pixel_values, cls_only=True)
        image = m.image_embedding(whole)
        text = m.text_embedding(m.encode_text_tokens(b.input_ids, b.attention_mask, cls_only=True,
                                                     real_tokens=b.text_tokens))
        return image, text

    @cached_property
    def fused(self) -> Fused:
        o, m, b = self.objectives, self.model, self.batch
        masked = self._image_passes[0] if self._image_passes else m.encode_image_tokens(b.pixel_values, b.patch_mask)
        img_mm = m.image_to_multimodal(masked)
        txt_mm = m.text_to_multimodal(m.encode_text_tokens(b.masked_input_ids, b.attention_mask, skip_padding=True,
                                                           real_tokens=b.text_tokens))
        text_mask = b.attention_mask
        pairs = self.itm_pairs
        if o.itm_weight > 0:  # negatives read other processes' texts (and, hard, images)
            _, text_mask, pad = self.global_texts
            txt_mm = gather_with_grad(F.pad(txt_mm, (0, 0, 0, pad)))
            if o.itm_negatives == "hard":
                img_mm = gather_with_grad(img_mm)
        mm = m.fuse_tokens(take_rows(img_mm, pairs.image_index), take_rows(txt_mm, pairs.text_index),
                           text_mask[pairs.text_index], skip_padding=True)
        # Matched rows hold pair i in row i for both negative recipes.
        matched = pairs.labels == 1
        image_labels = text_labels = None
        if o.mmm_image_weight > 0:
            labels = targets_at(b.patch_mask, self.pm.image_targets(b))
            image_labels = _matched_rows(labels, pairs.image_index, pairs.image_offset, matched)
        if o.mmm_text_weight > 0:
            # Texts are padded to the longest across processes: pad the labels alike.
            mlm_labels = F.pad(b.mlm_labels, (0, mm.layout.num_text_tokens - b.mlm_labels.shape[1]),
                               value=IGNORE_INDEX)
            text_labels = _matched_rows(mlm_labels, pairs.text_index, pairs.text_offset, matched)
        return Fused(mm, pairs, image_labels, text_labels)

    @cached_property
    def itm_pairs(self) -> ItmPairs:
        """Which (image, text) pair each multimodal row holds: ITM's negatives drawn (those a chunk's
        plan drew, for a chunk), or each pair once without ITM."""
        o = self.objectives
        if self.chunk is not None and self.chunk.itm_pairs is not None:
            return self.chunk.itm_pairs
        if o.itm_weight > 0:
            return self._hard_pairs() if o.itm_negatives == "hard" else self._swap_pairs()
        rows = torch.arange(len(self.batch), device=self.batch.input_ids.device)
        return ItmPairs(rows, rows, torch.ones_like(rows))

    def matched_count(self, per_row: torch.Tensor, image: bool) -> torch.Tensor:
        """The sum of `per_row` [B] (a count for each of this process's pairs) over the pairs whose
        image (or text) the matched multimodal rows hold; read nowhere on the host."""
        p = self.itm_pairs
        index, offset = (p.image_index, p.image_offset) if image else (p.text_index, p.text_offset)
        own = (index - offset).clamp(0, per_row.shape[0] - 1)  # other rows may point anywhere
        return (per_row[own] * (p.labels == 1)).sum()

    @cached_property
    def global_texts(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Every process's token ids and mask, padded to the longest text across processes, and
        the padding this process's texts need for that."""
        b = self.batch
        L = b.input_ids.shape[1]
        pad = max_over_processes(L, b.input_ids.device) - L
        return gather(F.pad(b.input_ids, (0, pad))), gather(F.pad(b.attention_mask, (0, pad))), pad

    def _swap_pairs(self) -> ItmPairs:
        """Swapped captions drawn over the global batch with the same generator on every process,
        so N processes pick exactly the negatives one process with the whole batch would."""
        rank, B = world().rank, len(self.batch)
        all_ids, all_mask, _ = self.global_texts
        with torch.no_grad():
            g = swap_negatives(all_ids, all_mask, self.objectives.itm_negative_probability, self.generator)
        own = slice(rank * B, (rank + 1) * B)
        return ItmPairs(g.image_index[own] - rank * B, g.text_index[own], g.labels[own], 0, rank * B)

    def _hard_pairs(self) -> ItmPairs:
        rank, B = world().rank, len(self.batch)
        img_e, txt_e = self.embeddings
        all_ids, all_mask, _ = self.global_texts
        with torch.no_grad():
            all_img_e, all_txt_e = gather(img_e), gather(txt_e)
            same = same_text(all_ids, all_mask, all_ids, all_mask)
            # The contrastive logits (ALBEF's sim / temp): the scale itself, not its log; in float32,
            # as the loss's are (bf16 rounds them by up to 0.25, and the draws' weights by a quarter).
            with float32(all_img_e):
                sim = self.contrastive_scale * (all_img_e.float() @ all_txt_e.float().T)
            return hard_negatives(sim, sim.T, same, self.generator, own=slice(rank * B, (rank + 1) * B))


# --------------------------------------------------------------------------- the model


class PretrainingModel(nn.Module):
    """Everything one pretraining step needs; the codebook is frozen and never trained here."""

    @property
    def config(self) -> FlavaConfig:
        """The model's config, one object with it: what changes the model's (a processor's pixel
        statistics, a new image encoder) is what this saves."""
        return self.model.config

    @config.setter
    def config(self, value: FlavaConfig) -> None:
        self.model.config = value

    def __init__(
        self,
        config: FlavaConfig,
        objectives: ObjectivesConfig | None = None,
        model: FlavaModel | None = None,
        heads: PretrainingHeads | None = None,
        codebook: FlavaImageCodebook | None = None,
    ):
        super().__init__()
        if model is None:  # a preset's name or a config file, as FlavaModel takes them (the model's copy kept)
            model = FlavaModel(config)
            config = model.config
        elif not isinstance(config, FlavaConfig):
            raise ConfigError(f"PretrainingModel beside a model takes its FlavaConfig; got {type(config).__name__}")
        self.model = model
        self.objectives = check(objectives or ObjectivesConfig(), "objectives")
        self.heads = heads if heads is not None else PretrainingHeads(config, self.objectives)
        self.codebook = codebook
        if codebook is not None:
            # Fewer tokens than the heads predict are targets all the same, as transformers takes them
            # (a checkpoint's heads cannot be resized); more would name classes the heads lack.
            if codebook.cfg.vocab_size > config.image.vocab_size:
                raise ConfigError(
                    f"the image codebook has {codebook.cfg.vocab_size} tokens but the MIM/MMM heads predict "
                    f"image.vocab_size={config.image.vocab_size}; set model.image.vocab_size="
                    f"{codebook.cfg.vocab_size} (or use a codebook of {config.image.vocab_size} tokens)"
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
                "image_targets: load one (flava.load_codebook) or train one with `flava train-codebook`"
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

    def states(self, batch: PairBatch | ImageBatch | TextBatch, generator: torch.Generator | None = None,
               chunk: Chunk | None = None, contrastive_only: bool = False) -> tuple[_States, str]:
        """The batch's lazily computed states and its kind. `contrastive_only`: a chunk's plan, which
        reads a pair's contrastive embeddings and counts, never its masked pass."""
        if isinstance(batch, PairBatch):
            return PairStates(self, batch, generator, chunk, contrastive_only), "pairs"
        if isinstance(batch, ImageBatch):
            return ImageStates(self, batch, chunk), "images"
        if isinstance(batch, TextBatch):
            return TextStates(self, batch, chunk), "text"
        raise InputError(f"unknown batch type {type(batch).__name__}; expected PairBatch, ImageBatch or TextBatch")

    def forward(self, batch: PairBatch | ImageBatch | TextBatch, generator: torch.Generator | None = None,
                chunk: Chunk | None = None) -> PretrainingOutput:
        """The batch's weighted losses. With `chunk` (`batch` is one part of a batch that
        `objectives.chunks.plan_chunks` planned): each loss divides by the whole batch's count, and
        the contrastive loss is the whole batch's, back-propagated through this part's embeddings."""
        states, kind = self.states(batch, generator, chunk)
        like = batch.attention_mask.float() if kind == "text" else batch.pixel_values
        if chunk is not None:
            chunk.replay(states)
        parts = {}
        for record in active(self.objectives, (kind,)):
            head = getattr(self.heads, record.name) if record.head is not None else None
            if chunk is not None and record.count is None:
                parts[record.name] = chunk.contrastive_loss(states, head)
            else:
                parts[record.name] = getattr(self.objectives, record.weight) * record.loss(states, head)
        metrics = states.metrics if chunk is None else {**states.metrics, **chunk.metrics}
        # What each averaging loss averaged over (masked tokens and patches, ITM rows): a batch with
        # none (a short caption masks no token) has a loss of 0 that is no measurement.
        counted = [r for r in active(self.objectives, (kind,)) if r.count is not None]
        if counted:  # the whole batch's counts over every process (a chunk's plan holds them)
            counts = torch.stack([(r.count(states) if chunk is None else chunk.counts[r.name]).detach().float()
                                  for r in counted])
            if chunk is None and world().size > 1:
                dist.all_reduce(counts)
            metrics = {**metrics, **{f"{TARGETS}{r.name}": c for r, c in zip(counted, counts)}}
        return PretrainingOutput(Losses.from_parts(parts, like), metrics)

    # ------------------------------------------------------------------ io

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        parts = {"model": self.model.state_dict(), "heads": self.heads.state_dict()}
        if self.codebook is not None:
            parts["codebook"] = self.codebook.state_dict()
        def fill(tmp) -> None:
            write_checkpoint_files(tmp, to_dict(self.config), parts, extra={"objectives": to_dict(self.objectives)})
            self.model.save_tokenizer(tmp)
        write_checkpoint_dir(directory, fill, only=SAVED_FILES)
