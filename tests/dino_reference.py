"""DINO's training step as the reference implementation (facebookresearch/dino: main_dino.py,
utils.py, vision_transformer.py) defines it, written from its rules for tests/test_dino_reference.py
and sharing no code with `flava.objectives.dino` or `flava.train.dino`:

- head: Linear layers with GELU between them to a bottleneck, L2 normalisation, then a
  weight-normalised linear layer without bias, weight = g * v / ||v|| row by row, g fixed to 1
  (`norm_last_layer`);
- the teacher sees the two global crops, the student every crop; a backbone pass per crop
  resolution, the head over all rows (MultiCropWrapper);
- loss: the mean over every (teacher global crop i, student crop j != i) pair of the
  cross-entropy between softmax((t - center) / teacher_temp) and softmax(s / 0.1), each averaged
  over the images; then center <- 0.9 center + 0.1 mean(teacher outputs);
- teacher temperature: np.linspace over the warm-up epochs, then constant, indexed by epoch;
- AdamW over two groups: weights (decayed) and biases / 1-d parameters (not decayed); learning
  rate, weight decay and teacher momentum from cosine schedules;
- each parameter's gradient clipped to a norm on its own; the last layer's gradient dropped
  during the first `freeze_last_layer` epochs; then the teacher's EMA over every parameter.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class RefHead(nn.Module):
    """DINOHead(use_bn=False, norm_last_layer=True)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, bottleneck: int, layers: int):
        super().__init__()
        widths = [in_dim] + [hidden] * (layers - 1) + [bottleneck]
        parts: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            parts.append(nn.Linear(a, b))
            if i < layers - 1:
                parts.append(nn.GELU())
        self.mlp = nn.Sequential(*parts)
        self.weight_v = nn.Parameter(torch.empty(out_dim, bottleneck))
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return F.linear(x, self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True))


class RefNetwork(nn.Module):
    """MultiCropWrapper: the backbone's CLS (after its final norm) per crop resolution, then the head."""

    def __init__(self, backbone: nn.Module, head: RefHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        feats = [self.backbone(x, interpolate_pos_encoding=x.shape[-1] != crops[0].shape[-1]).last_hidden_state[:, 0]
                 for x in crops]
        return self.head(torch.cat(feats))


def cosine_scheduler(base: float, final: float, epochs: int, niter: int, warmup_epochs: int = 0,
                     start_warmup: float = 0.0) -> np.ndarray:
    """utils.cosine_scheduler."""
    warmup = np.linspace(start_warmup, base, warmup_epochs * niter) if warmup_epochs else np.array([])
    iters = np.arange(epochs * niter - len(warmup))
    return np.concatenate((warmup, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))))


def teacher_temp_schedule(warmup_temp: float, temp: float, warmup_epochs: int, epochs: int) -> np.ndarray:
    """DINOLoss.teacher_temp_schedule."""
    return np.concatenate((np.linspace(warmup_temp, temp, warmup_epochs), np.ones(epochs - warmup_epochs) * temp))


def dino_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, center: torch.Tensor, ncrops: int,
              teacher_temp: float, student_temp: float = 0.1) -> torch.Tensor:
    """DINOLoss.forward (without its center update)."""
    student = (student_out / student_temp).chunk(ncrops)
    teacher = F.softmax((teacher_out - center) / teacher_temp, dim=-1).detach().chunk(2)
    total, terms = 0.0, 0
    for iq, q in enumerate(teacher):
        for v in range(ncrops):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(student[v], dim=-1), dim=-1).mean()
            terms += 1
    return total / terms


def updated_center(center: torch.Tensor, teacher_out: torch.Tensor, momentum: float = 0.9) -> torch.Tensor:
    """DINOLoss.update_center on one process."""
    return center * momentum + teacher_out.sum(0, keepdim=True) / len(teacher_out) * (1 - momentum)


def params_groups(model: nn.Module) -> tuple[list[str], list[str]]:
    """utils.get_params_groups, by name: (regularized, not regularized)."""
    regularized, not_regularized = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (not_regularized if name.endswith(".bias") or len(p.shape) == 1 else regularized).append(name)
    return regularized, not_regularized


def clip_gradients(model: nn.Module, clip: float) -> None:
    """utils.clip_gradients: each parameter's gradient on its own."""
    for p in model.parameters():
        if p.grad is not None:
            coef = clip / (p.grad.norm(2) + 1e-6)
            if coef < 1:
                p.grad.mul_(coef)


def cancel_gradients_last_layer(epoch: int, model: RefNetwork, freeze_last_layer: int) -> None:
    if epoch >= freeze_last_layer:
        return
    for n, p in model.named_parameters():
        if "weight_v" in n or "weight_g" in n:
            p.grad = None


@torch.no_grad()
def ema(student: nn.Module, teacher: nn.Module, m: float) -> None:
    for ps, pt in zip(student.parameters(), teacher.parameters()):
        pt.mul_(m).add_((1 - m) * ps.detach())
