"""Stage `image-dino`: DINO self-distillation of the image encoder (`objectives.dino`) as a stage.

What is DINO's: the module a checkpoint saves (`DinoParts`: student, teacher and loss center, as
the `dino` part), the encoder's initialisation (`init_image`: a public image tower such as
facebook/dino-vitb16, whose architecture, image size and pixel statistics the model then takes,
or one of our checkpoints), multi-crop samples, how many steps make an epoch of DINO's
epoch-based schedules, DINO's optimisation (its learning rate scaled linearly from a batch of
256, a cosine weight-decay schedule, each parameter's gradient clipped on its own), the forward
on global and local crops, the last layer's frozen epochs and the teacher's EMA step after each
update. Under torchrun only the student is wrapped in DDP: the teacher follows it by EMA on every
process alike and the loss's center is averaged over processes by `DinoLoss.update_center`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import FlavaConfig, ObjectivesConfig
from ..data.samples import MultiCropMaker
from ..data.registry import estimated_size
from ..distributed import data_parallel, resolve_device
from ..errors import ConfigError
from ..loading import Checkpoint
from ..model.encoders import ImageEncoder
from ..objectives.dino import DinoModel, init_image_encoder, momentum_schedule
from .init import follow_image_tower, initialise_image_encoder
from .presets import Optimisation
from .stage import Stage, StageOutput

# DINO's learning rate is given for this global batch and scaled linearly (main_dino.py).
DINO_BATCH = 256
# The collapse metrics a step reports (DinoOutput.metrics), in this order.
METRICS = ("teacher_entropy", "kl_teacher_student", "dims_in_use", "teacher_temp")


class DinoParts(nn.Module):
    """What a DINO stage trains and saves: `dino` (student, teacher, center). `config` and
    `objectives` are the run's, recorded in its checkpoints like a joint run's."""

    def __init__(self, config: FlavaConfig, objectives: ObjectivesConfig, dino: DinoModel):
        super().__init__()
        self.config, self.objectives = config, objectives
        self.dino = dino


class DinoStage(Stage):
    """The student learns; the teacher follows by EMA (momentum on a cosine schedule to 1)."""

    name = "image-dino"

    def __init__(self, cfg):
        super().__init__(cfg)
        cfg.dino.validate(cfg.model.image)
        for name in ("init", "init_text", "init_multimodal"):
            if getattr(cfg, name):
                raise ConfigError(f"stage image-dino trains the image encoder alone and cannot use {name}; start its "
                                  "encoder with init_image (a public image tower or one of our checkpoints) instead")
        if cfg.distributed == "fsdp":
            raise ConfigError("stage image-dino runs with distributed=ddp (the teacher is an EMA copy of the whole "
                              "student); set distributed=ddp (in a recipe, for that stage alone: --stage-set "
                              "image-dino:distributed=ddp)")
        self.teacher_momentum = momentum_schedule(cfg.dino.momentum_teacher, 1.0, cfg.max_steps)
        self.decay = momentum_schedule(cfg.dino.weight_decay, cfg.dino.weight_decay_end, cfg.max_steps)

    def kinds(self) -> tuple[str, ...]:
        return ("images",)

    def trained_kinds(self) -> set[str]:
        return {"images"}  # DINO is the stage's one objective; the objectives' weights are the joint stages'

    def sample_maker(self):
        # On a GPU the crops' colour steps run there, batched: a worker's share of an image is then
        # its crops alone (benchmarks/multicrop.py).
        on_device = resolve_device(self.cfg.device).type != "cpu"
        return MultiCropMaker(self.cfg.dino.crop_spec(self.cfg.model.image), self.cfg.seed, colour_on_device=on_device)

    def build(self, own: Checkpoint | None = None) -> dict[str, str]:
        cfg = self.cfg
        if cfg.init_image and own is None:  # a public image tower decides the image encoder (and so the crops)
            cfg.model = follow_image_tower(cfg.model, cfg.init_image, cfg.init_image_size)
            cfg.dino.validate(cfg.model.image)
        encoder = ImageEncoder(cfg.model.image)
        init_image_encoder(encoder, cfg.model.init_std)
        loaded = {}
        if cfg.init_image and own is None:
            # Before DinoModel copies the student into the teacher, so both start from these weights.
            loaded["image"] = initialise_image_encoder(encoder, cfg.model, cfg.init_image)
        self.model = DinoParts(cfg.model, cfg.objectives, DinoModel(cfg.dino, encoder, cfg.model.init_std))
        return loaded

    def open_data(self, streams: dict, world: int) -> None:
        """The epoch length of DINO's schedules: `dino.steps_per_epoch`, else the image sources'
        size over the samples one step takes."""
        cfg = self.cfg
        if cfg.dino.steps_per_epoch:
            self.steps_per_epoch = cfg.dino.steps_per_epoch
            return
        self._per_step = cfg.data.batch_size * world * cfg.optim.grad_accumulation
        self._epoch_samples = sum(estimated_size(s.source) for s in streams["images"].streams)
        self.steps_per_epoch = max(1, self._epoch_samples // self._per_step)

    def state_dict(self) -> dict:
        # The epoch's samples as estimated at the run's start: a resumed run keeps its schedules'
        # pace though its shards, or how they are sized, changed since.
        return {} if self.cfg.dino.steps_per_epoch else {"epoch_samples": self._epoch_samples}

    def load_state_dict(self, state: dict) -> None:
        if "epoch_samples" in state and not self.cfg.dino.steps_per_epoch:
            self._epoch_samples = int(state["epoch_samples"])
            self.steps_per_epoch = max(1, self._epoch_samples // self._per_step)

    def block_stacks(self) -> list[nn.Module]:
        return [self.model.dino.student.backbone.transformer]

    def wrap(self, world: int, device: torch.device) -> nn.Module:
        student = self.model.dino.student
        if world == 1:
            return student
        # DinoModel freezes what DINO never reads, so every trained parameter gets a gradient.
        return data_parallel(student, device)

    def optimized(self) -> tuple[nn.Module, tuple[str, ...]]:
        return self.model.dino.student, ()

    def optimisation(self, global_batch: int) -> Optimisation:
        """DINO's linear rule: `dino.lr` per 256 images; `optim`'s warm-up and cosine."""
        o, d = self.cfg.optim, self.cfg.dino
        warmup = super().optimisation(global_batch).warmup_steps
        lr = d.lr * global_batch / DINO_BATCH
        return Optimisation(lr, warmup, (
            f"optimisation (DINO's): AdamW, lr {d.lr:g} per {DINO_BATCH} images x {global_batch:,}/{DINO_BATCH} = "
            f"{lr:.3g} (dino.lr; optim.lr is not used), {warmup:,} warm-up steps, then cosine to {o.min_lr_ratio:g} x "
            f"lr over {self.cfg.max_steps:,} steps; weight decay {d.weight_decay:g} -> {d.weight_decay_end:g} on a "
            f"cosine; each parameter's gradient clipped to norm {d.clip_grad:g}"))

    def weight_decay(self, step: int) -> float:
        return float(self.decay[min(step, len(self.decay) - 1)])

    def clip(self) -> torch.Tensor:
        """DINO's rule (`clip_gradients`): each parameter's gradient to norm `dino.clip_grad` on
        its own. Returns the global norm before clipping, for the log."""
        grads = [p.grad for p in self.model.dino.student.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.model.dino.loss.center.device)
        norms = torch._foreach_norm(grads)
        total = torch.linalg.vector_norm(torch.stack(norms))
        if self.cfg.dino.clip_grad > 0:
            torch._foreach_mul_(grads, [(self.cfg.dino.clip_grad / (n + 1e-6)).clamp(max=1.0) for n in norms])
        return total

    def epoch(self, step: int) -> float:
        return step / self.steps_per_epoch

    def forward(self, module: nn.Module, batch, generator: torch.Generator, step: int) -> StageOutput:
        out = self.model.dino(batch.global_crops, batch.local_crops, epoch=self.epoch(step), student=module)
        return StageOutput(out.loss, {"dino": out.loss}, {k: out.metrics[k] for k in METRICS})

    def before_update(self, step: int) -> None:
        self.model.dino.cancel_last_layer_grad(self.epoch(step))

    def after_update(self, step: int, finite: torch.Tensor) -> dict[str, float]:
        momentum = float(self.teacher_momentum[min(step, len(self.teacher_momentum) - 1)])
        # A skipped update leaves the student as it was; so does the teacher. On the CPU the exact
        # rule of the reference; on a GPU decided on the device (reading `finite` waits on the step).
        if finite.device.type != "cpu":
            self.model.dino.step_teacher(momentum, finite)
        elif bool(finite):
            self.model.dino.step_teacher(momentum)
        return {"teacher_momentum": momentum, "epoch": self.epoch(step)}
