"""Stage `image-dino`: DINO self-distillation of the image encoder (`objectives.dino`) in the loop.

The trainer keeps its streams, checkpoints, metrics, guards and process set-up; what differs
lives here: the module a checkpoint saves (`DinoStage`: student, teacher and loss center, as the
`dino` part), the model's initialisation (`init_image`: a ViT such as facebook/dino-vitb16 or one
of our checkpoints), how many steps make an epoch of DINO's epoch-based schedules, and the step.
Under torchrun only the student is wrapped in DDP: the teacher follows it by EMA on every process
alike and the loss's center is averaged over processes by `DinoLoss.update_center`.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from ..config import FlavaConfig, ObjectivesConfig
from ..data.registry import estimated_size
from ..errors import ConfigError
from ..model.encoders import ImageEncoder
from ..objectives.dino import DinoConfig, DinoModel, init_image_encoder
from .init import initialise_image_encoder

if TYPE_CHECKING:
    from .config import TrainConfig
    from .trainer import Trainer

# The collapse metrics a step reports (DinoOutput.metrics), in this order.
METRICS = ("teacher_entropy", "kl_teacher_student", "dims_in_use", "teacher_temp")


class DinoStage(nn.Module):
    """What a DINO stage trains and saves: `dino` (student, teacher, center). `config` and
    `objectives` are the run's, recorded in its checkpoints like a joint run's."""

    def __init__(self, config: FlavaConfig, objectives: ObjectivesConfig, dino: DinoModel):
        super().__init__()
        self.config, self.objectives = config, objectives
        self.dino = dino


def check_stage(cfg: TrainConfig) -> None:
    """Settings a DINO stage cannot use, and the dino section against the image encoder."""
    cfg.dino.validate(cfg.model.image)
    for name in ("init", "init_text", "init_multimodal"):
        if getattr(cfg, name):
            raise ConfigError(f"stage image-dino trains the image encoder alone and cannot use {name}; start its "
                              "encoder with init_image (a ViT directory or one of our checkpoints) instead")
    if cfg.distributed == "fsdp":
        raise ConfigError("stage image-dino runs with distributed=ddp (the teacher is an EMA copy of the whole "
                          "student); set distributed=ddp")


def build_stage(cfg: TrainConfig) -> tuple[DinoStage, dict[str, str]]:
    """A fresh DINO stage for `cfg` (its encoder from `init_image` when set), and what was loaded."""
    encoder = ImageEncoder(cfg.model.image)
    init_image_encoder(encoder, cfg.model.init_std)
    loaded = {}
    if cfg.init_image:
        # Before DinoModel copies the student into the teacher, so both start from these weights.
        loaded["image"] = initialise_image_encoder(encoder, cfg.model, cfg.init_image)
    return DinoStage(cfg.model, cfg.objectives, DinoModel(cfg.dino, encoder, cfg.model.init_std)), loaded


def steps_per_epoch(cfg: DinoConfig, trainer: Trainer) -> int:
    """`dino.steps_per_epoch`, else the image sources' size over the samples one step takes."""
    if cfg.steps_per_epoch:
        return cfg.steps_per_epoch
    size = sum(estimated_size(s.source) for s in trainer.streams["images"].streams)
    per_step = trainer.cfg.data.batch_size * trainer.world * trainer.cfg.optim.grad_accumulation
    return max(1, size // per_step)


def wrap_student(trainer: Trainer) -> nn.Module:
    """The module the student runs through: itself, or its DDP form under torchrun."""
    student = trainer.model.dino.student
    if trainer.world == 1:
        return student
    from torch.nn.parallel import DistributedDataParallel

    # DinoModel freezes what DINO never reads, so every trained parameter gets a gradient.
    ids = [trainer.device.index] if trainer.device.type == "cuda" else None
    return DistributedDataParallel(student, device_ids=ids)


def train_step(t: Trainer) -> dict:
    """One DINO step: forward (teacher on the global crops, student on all), backward, clipping,
    the last layer's freeze, the optimizer step on the student, then the teacher's EMA step."""
    cfg, dino = t.cfg, t.model.dino
    epoch = t.step / t.steps_per_epoch
    accum = cfg.optim.grad_accumulation
    sums, samples = None, 0
    for micro in range(accum):
        batch = t.streams["images"].next_batch()
        crops = batch.global_crops.to(t.device)
        local = batch.local_crops.to(t.device) if batch.local_crops is not None else None
        samples += crops.shape[0] // 2
        with t._no_sync() if micro < accum - 1 else contextlib.nullcontext():
            with t._autocast():
                out = dino(crops, local, epoch=epoch, student=t.module)
            t.scaler.scale(out.loss / accum).backward()
        values = torch.stack([out.loss.detach().float(), *(out.metrics[k].float() for k in METRICS)])
        sums = values / accum if sums is None else sums + values / accum
    if t.world > 1:
        dist.all_reduce(sums)
        sums /= t.world
    t.scaler.unscale_(t.optimizer)
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_([p for p in dino.student.parameters() if p.requires_grad], clip)
    dino.cancel_last_layer_grad(epoch)
    values = torch.cat([sums, norm.detach().float().reshape(1).to(sums.device)]).tolist()  # one sync a step
    finite = math.isfinite(values[0]) and (math.isfinite(values[-1]) or t.scaler.is_enabled())
    if finite:
        t.scaler.step(t.optimizer)
    t.scaler.update()
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    momentum = float(t.teacher_momentum[min(t.step, len(t.teacher_momentum) - 1)])
    if finite:  # a skipped update leaves the student as it was; so does the teacher
        dino.step_teacher(momentum)
    t.step += 1
    t._guard(finite)
    return {"step": t.step, "kind": "images", "loss": values[0], "losses": {"dino": values[0]},
            "metrics": {**dict(zip(METRICS, values[1:-1])), "teacher_momentum": momentum, "epoch": epoch},
            "grad_norm": values[-1], "update_skipped": not finite, "nonfinite_steps": t.nonfinite_steps,
            "samples": samples * t.world, "lr": t.scheduler.get_last_lr()[0],
            "data_draws": {k: st.draws for k, st in t.streams.items()}}
