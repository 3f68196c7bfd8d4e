"""The contract between the training loop and a stage: what a stage supplies.

A stage (joint, text-mlm, image-mim, image-dino, or one of yours) owns what differs between
them: the modules it trains and saves, how they are wrapped for DDP/FSDP, which parameters the
optimizer steps at what rate and weight decay, how their gradients are clipped, the forward that
returns losses, what follows the optimizer step (DINO's EMA teacher, the contrastive logit
scale's clamp) and any state its checkpoints must carry beyond the weights. The loop
(`train.trainer`) owns the rest once: data, autocast, accumulation, the non-finite guard,
logging and checkpointing.

Pass an instance as `Trainer(cfg, output, stage=...)` to train a stage the registry does not
know; `cfg.stage` then only names the data kinds it draws, unless the stage says otherwise.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..distributed import data_parallel
from ..errors import ConfigError
from ..loading import Checkpoint
from .presets import Optimisation, scaled_optimisation

# The data kinds each built-in stage draws from.
STAGE_KINDS = {"joint": ("pairs", "images", "text"), "text-mlm": ("text",), "image-mim": ("images",),
               "image-dino": ("images",)}


@dataclass
class StageOutput:
    """One micro-batch's result: the loss to back-propagate, and what to log of it."""

    total: torch.Tensor
    """The scalar the loop scales, divides by the accumulation count and back-propagates."""
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    """Named losses (logged under `losses`)."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Other scalars averaged like the losses (logged under `metrics`)."""


class Stage(ABC):
    """A stage's defaults: one module trained whole, not wrapped on one process, no extra state.

    `model` (set by `build`) is the module checkpoints save; it carries `config` and `objectives`
    (the run's, recorded with the weights) and its parts are those of `io.checkpoint.PARTS`.
    """

    name = "stage"
    model: nn.Module
    chunkable = False
    """Whether `forward_chunks` can split a micro-batch (`optim.contrastive_chunks`)."""

    def __init__(self, cfg):
        self.cfg = cfg

    # ---- what it trains on

    def kinds(self) -> tuple[str, ...]:
        """The data kinds the stage draws from, before those without data are left out."""
        if self.cfg.stage not in STAGE_KINDS:
            raise ConfigError(f"unknown stage {self.cfg.stage!r}; choose one of {', '.join(STAGE_KINDS)}")
        return STAGE_KINDS[self.cfg.stage]

    def trained_kinds(self) -> set[str]:
        """The kinds some objective of this stage has a positive weight on."""
        return set(self.kinds())

    @abstractmethod
    def sample_maker(self):
        """What turns a record into a sample (crops, masks, tokens) for the data streams."""

    # ---- what it builds

    @abstractmethod
    def build(self, own: Checkpoint | None = None) -> dict[str, str]:
        """Create `self.model` (on the CPU) and return what was initialised from elsewhere, by
        encoder, as sentences the run prints. `own`: the run's checkpoint it resumes from, whose
        weights replace the model's: the model is built as that run built it (`cfg.model`, the
        codebook and tokenizer `own` holds) without reading what the run started from. A stage
        whose build takes no `own` is built as at its start on a resume too."""

    def open_data(self, streams: dict, world: int) -> list[str] | None:
        """Once the streams are open: refuse data the stage cannot train on, or read what it
        needs to know of it. Returns notes for the run's start, if any."""

    def block_stacks(self) -> list[nn.Module]:
        """The transformer stacks activation checkpointing applies to."""
        return []

    def wrap(self, world: int, device: torch.device) -> nn.Module:
        """The module the forward runs through: `self.model`, or its DDP/FSDP form."""
        if world == 1:
            return self.model
        return data_parallel(self.model, device)

    def optimized(self) -> tuple[nn.Module, tuple[str, ...]]:
        """The module whose parameters the optimizer steps, and the name prefixes of those that
        learn at `optim.init_lr_scale` x lr."""
        return self.model, ()

    def optimisation(self, global_batch: int) -> Optimisation:
        """The peak rate and warm-up the run trains with: `optim`'s, scaled to the global batch
        as `train.presets` says."""
        return scaled_optimisation(self.cfg.optim, global_batch, self.cfg.max_steps)

    def weight_decay(self, step: int) -> float:
        """The weight decay of the decayed parameters at step `step`: `optim.weight_decay`."""
        return self.cfg.optim.weight_decay

    def objective_names(self) -> list[str]:
        """Every loss the stage may return (all kinds), in a fixed order: what a balancing
        method (`objectives.balancing`) weights. Empty: only 'fixed' applies."""
        return []

    def shared_parameters(self) -> dict[str, list[nn.Parameter]]:
        """The trained parameters several objectives meet in, by encoder: where the gradient
        diagnostics and gradient surgery look. Empty: neither applies."""
        return {}

    # ---- the step

    @abstractmethod
    def forward(self, module: nn.Module, batch, generator: torch.Generator, step: int) -> StageOutput:
        """The losses of one micro-batch of step `step` (0-based), run through `module`."""

    def forward_chunks(self, module: nn.Module, parts: list, generator: torch.Generator,
                       step: int) -> Iterator[StageOutput]:
        """`forward` of a micro-batch given as equal parts (`optim.contrastive_chunks`), one output
        per part, each yielded before the next part runs (the loop back-propagates it first); the
        parts' losses add up to the micro-batch's. Only where `chunkable`: a run of any other stage
        with chunks is refused at start (`train.backward`), so this is never reached from a run."""
        raise TypeError(f"stage {type(self).__name__} is not chunkable: it computes its losses over the whole batch")

    def clip(self) -> torch.Tensor:
        """Clip the (unscaled) gradients; returns their global norm before clipping, which is
        logged. Here: the global norm of every parameter's gradient, to `optim.grad_clip`."""
        c = self.cfg.optim.grad_clip
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), c if c > 0 else float("inf"))

    def before_update(self, step: int) -> None:
        """After clipping, before the optimizer step (e.g. gradients a schedule cancels)."""

    def after_update(self, step: int, finite: torch.Tensor) -> dict[str, float]:
        """After the optimizer step; extra metrics to log. `finite` (a bool tensor on the device)
        says whether it updated: reading it on the host syncs with the device, which the loop
        otherwise does only on logged steps."""
        return {}

    # ---- checkpoints

    def state_dict(self) -> dict:
        """State the stage keeps outside `model` that a resumed run needs."""
        return {}

    def write_files(self, directory) -> None:
        """Files a checkpoint carries beside the weights (the model's own tokenizer), written into
        the checkpoint directory being made."""

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s result."""
