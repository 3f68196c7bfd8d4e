"""DINO self-distillation for the image encoder (Caron et al., 2021, "Emerging Properties in
Self-Supervised Vision Transformers"), which the FLAVA paper initialises its image encoder from.

A student (image encoder + `DinoHead`) is trained to give, on every crop of an image, the output
distribution a teacher gives on the image's *other* global crops (the paper's Eq. 3). The teacher
is never trained by gradient: it is an exponential moving average of the student (§3.1, momentum
0.996 -> 1 on a cosine), and its outputs are centred (a running mean of its own outputs is
subtracted, Eq. 4) and sharpened (a low temperature) so that neither one dimension nor the uniform
distribution can take over (collapse, §5.3).

The loss pairs views by position, so crops are batched crop-major ([crop 0 of every image, crop
1 of every image, ...]), as `flava.data.multicrop.collate_multicrop` builds them.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from ..config import ImageEncoderConfig
from ..distributed import gather, world
from ..errors import ConfigError, InputError
from ..model.encoders import ImageEncoder
from ..model.flava import init_weights, trunc_normal_
from .dino_config import DinoConfig

# --------------------------------------------------------------------------- head


class DinoHead(nn.Module):
    """DINO's projection head: an MLP (GELU) to a bottleneck, L2 normalisation, then a
    weight-normalised linear layer without bias to K dimensions. With `norm_last_layer` every row
    of that layer has norm 1 for good (its magnitude `original0` is fixed to 1 and not trained)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3, norm_last_layer: bool = True, init_std: float = 0.02):
        super().__init__()
        if layers == 1:
            self.mlp = nn.Sequential(nn.Linear(in_dim, bottleneck_dim))
        else:
            parts: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(layers - 2):
                parts += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            parts.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*parts)
        init_weights(self.mlp, init_std)
        # The last layer keeps PyTorch's default init for its direction, as the reference does.
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, in_dim] -> [N, out_dim] logits."""
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


# --------------------------------------------------------------------------- loss


class DinoLoss(nn.Module):
    """The DINO loss (Eq. 3): for each teacher global crop q and each student crop v != q,
    H(P_t(q), P_s(v)) = -sum_k P_t(q)_k log P_s(v)_k averaged over the images, then averaged over
    the pairs. P_t = softmax((t - center) / teacher_temp), P_s = softmax(s / student_temp). After
    the loss the center moves to m * center + (1 - m) * mean(teacher outputs over every process)
    (Eq. 4).
    """

    def __init__(self, config: DinoConfig):
        super().__init__()
        self.config = config
        self.register_buffer("center", torch.zeros(1, config.out_dim))
        self._started: bool | None = None
        """Whether the center has been set (read from it once: a resumed run's is)."""

    def teacher_temperature(self, epoch: float) -> float:
        """The reference schedule: linear from `warmup_teacher_temp` at epoch 0 to `teacher_temp` at
        epoch `warmup_teacher_temp_epochs - 1` (np.linspace over the warm-up epochs), constant
        after. `epoch` may be fractional (step / steps per epoch) for a per-step schedule."""
        cfg = self.config
        warmup = cfg.warmup_teacher_temp_epochs
        if epoch >= warmup:
            return cfg.teacher_temp
        if warmup == 1:
            return cfg.warmup_teacher_temp
        progress = min(1.0, max(0.0, epoch) / (warmup - 1))
        return cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * progress

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, epoch: float) -> torch.Tensor:
        """`student_out` [V*B, K] (V crops, the two global ones first), `teacher_out` [2*B, K], both
        crop-major. Returns the scalar loss and then updates the center."""
        if teacher_out.dim() != 2 or teacher_out.shape[0] % 2 or teacher_out.shape[0] == 0:
            raise InputError(f"teacher outputs must be [2*B, K] (two global crops per image); got "
                             f"{tuple(teacher_out.shape)}")
        B, K = teacher_out.shape[0] // 2, teacher_out.shape[1]
        rows = student_out.shape[0]
        if student_out.dim() != 2 or student_out.shape[1] != K or rows % B or rows < 2 * B:
            raise InputError(f"student outputs must be [V*{B}, {K}] with V >= 2 crops per image, the two "
                             f"global ones first; got {tuple(student_out.shape)}")
        V = rows // B
        # The contraction over B*K products is a matmul: keep it float32 under autocast.
        with torch.autocast(student_out.device.type, enabled=False):
            teacher = F.softmax((teacher_out.detach().float() - self.center) / self.teacher_temperature(epoch), -1)
            log_student = F.log_softmax(student_out.float() / self.config.student_temp, dim=-1)
            # ce[q, v]: cross-entropy of teacher crop q against student crop v, averaged over images.
            ce = -torch.einsum("qbk,vbk->qv", teacher.view(2, B, K), log_student.view(V, B, K)) / B
            # The mean over pairs of different views; a mask's fill, not its selection, which
            # would read the mask's count back from a GPU every step.
            same_view = torch.eye(2, V, dtype=torch.bool, device=ce.device)
            loss = ce.masked_fill(same_view, 0).sum() / (ce.numel() - 2)
        self.update_center(teacher_out)
        return loss

    @torch.no_grad()
    def start_center(self, teacher_out: torch.Tensor) -> None:
        """With `center_warm_start`, a center never set (a new run's zeros) becomes the mean of
        these teacher outputs over every process; otherwise nothing."""
        if not self.config.center_warm_start:
            return
        if self._started is None:
            self._started = bool(self.center.any())  # one host-device sync, at the first step
        if not self._started:
            self.center.copy_(batch_center(teacher_out))
            self._started = True

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """center <- m * center + (1 - m) * mean of the teacher outputs of every process."""
        m = self.config.center_momentum
        self.center.copy_(self.center * m + batch_center(teacher_out) * (1 - m))
        self._started = True


@torch.no_grad()
def batch_center(teacher_out: torch.Tensor) -> torch.Tensor:
    """[1, K]: the mean of the teacher outputs of every process."""
    total = teacher_out.detach().float().sum(dim=0, keepdim=True)
    count = teacher_out.shape[0]
    size = world().size
    if size > 1:
        # Every process holds a batch of the same size, so the global mean is sum / (count * size).
        dist.all_reduce(total)
        count *= size
    return total / count


@torch.no_grad()
def collapse_metrics(teacher_out: torch.Tensor, student_out: torch.Tensor, center: torch.Tensor,
                     teacher_temp: float, student_temp: float) -> dict[str, torch.Tensor]:
    """Signs of collapse (DINO §5.3), detached scalars:

    - `teacher_entropy`: mean entropy (nats) of the centred, sharpened teacher distribution; near
      log K is collapse to the uniform distribution, near 0 is sharp (or one-dimension collapse).
    - `kl_teacher_student`: mean KL(P_t || P_s) over the global crops (student rows in the same
      crop-major order as the teacher's); near 0 with a high entropy is uniform collapse.
    - `dims_in_use`: the share of the K dimensions that are the argmax of at least one teacher
      output in the batch of every process (one process's had made more processes look more
      collapsed): 1/K when every image maps to the same dimension.
    """
    t = teacher_out.detach().float()
    s = student_out.detach().float()[: t.shape[0]]
    log_pt = F.log_softmax((t - center.float()) / teacher_temp, dim=-1)
    pt = log_pt.exp()
    log_ps = F.log_softmax(s / student_temp, dim=-1)
    used = torch.zeros(t.shape[1], dtype=torch.bool, device=t.device)
    used[gather(pt.argmax(dim=-1))] = True
    return {
        "teacher_entropy": -(pt * log_pt).sum(-1).mean(),
        "kl_teacher_student": (pt * (log_pt - log_ps)).sum(-1).mean(),
        "dims_in_use": used.float().mean(),
    }


# --------------------------------------------------------------------------- teacher


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float,
                   finite: torch.Tensor | None = None) -> None:
    """The teacher's EMA rule, parameter by parameter: teacher <- m * teacher + (1 - m) * student.
    Both modules must have the same parameters in the same order (the teacher a copy of the student).
    `finite` (a bool tensor on the device): no update where it is False, decided on the device (a
    GPU step then waits on nothing), as a lerp of weight (1 - m) * finite."""
    s = [p.detach() for p in student.parameters()]
    t = list(teacher.parameters())
    if len(s) != len(t) or any(a.shape != b.shape for a, b in zip(s, t)):
        raise InputError("the teacher's parameters do not match the student's: the teacher must be a copy "
                         "of the student")
    if finite is not None:
        torch._foreach_lerp_(t, s, [finite.float() * (1.0 - momentum)] * len(t))
        return
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1.0 - momentum)


def momentum_schedule(base: float, final: float, total_steps: int) -> np.ndarray:
    """Teacher momentum for each step: a cosine from `base` at step 0 to `final` (DINO: 1) at the
    last step. (The reference's `cosine_scheduler` divides by the step count and so stops just
    short of `final`; this one ends on it.) DINO's weight decay follows the same cosine."""
    if total_steps < 1:
        raise ConfigError(f"a cosine schedule needs at least one step; got {total_steps}")
    if total_steps == 1:
        return np.array([base], dtype=np.float64)
    progress = np.arange(total_steps, dtype=np.float64) / (total_steps - 1)
    return final + 0.5 * (base - final) * (1.0 + np.cos(math.pi * progress))


# --------------------------------------------------------------------------- model


class DinoNetwork(nn.Module):
    """An image encoder (its CLS after the final LayerNorm, what FLAVA's image encoder gives as
    `last_hidden_state[:, 0]`) and a DinoHead. Like DINO's MultiCropWrapper, the backbone runs once
    per crop resolution and the head once over every row."""

    def __init__(self, backbone: ImageEncoder, head: DinoHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def features(self, crops: torch.Tensor, interpolate: bool) -> torch.Tensor:
        """[N, 3, H, W] -> [N, D] CLS states."""
        return self.backbone(crops, interpolate_pos_encoding=interpolate, cls_only=True).last_hidden_state[:, 0]

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None = None) -> torch.Tensor:
        """[2B, 3, S, S] global crops (at the encoder's image size) and [N*B, 3, s, s] local crops
        (any patch multiple: positions are interpolated) -> [(2 + N) * B, K], global rows first."""
        features = [self.features(global_crops, False)]
        if local_crops is not None and local_crops.shape[0]:
            features.append(self.features(local_crops, True))
        return self.head(torch.cat(features))


@dataclass
class DinoOutput:
    loss: torch.Tensor
    """The DINO loss of this step (with gradient to the student)."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached diagnostics: `collapse_metrics` and the teacher temperature."""


def init_image_encoder(encoder: ImageEncoder, std: float) -> None:
    """FLAVA's initialisation of a fresh image encoder (truncated normal weights and tokens)."""
    init_weights(encoder, std)
    for p in encoder.token_parameters():
        trunc_normal_(p, std)


class DinoModel(nn.Module):
    """Student, EMA teacher and loss of DINO for FLAVA's image encoder.

    The student is the given image encoder (or a fresh one from a config) plus a DinoHead; the
    teacher a deep copy that never requires gradients and always runs in eval mode (no dropout).
    The encoder's mask token and pooler, which DINO never reads, are frozen so that every trained
    parameter gets a gradient (data-parallel wrappers need no unused-parameter search).

    A training step: `out = model(global_crops, local_crops, epoch=e)`, `out.loss.backward()`,
    gradient clipping (DINO: 3.0), `model.cancel_last_layer_grad(e)`, optimizer step,
    `model.step_teacher(momentum[step])`.
    DINO releases the teacher's backbone (`model.teacher.backbone`) as its result.
    """

    def __init__(self, config: DinoConfig, encoder: ImageEncoder | ImageEncoderConfig, init_std: float = 0.02):
        super().__init__()
        if isinstance(encoder, ImageEncoderConfig):
            encoder = ImageEncoder(encoder)
            init_image_encoder(encoder, init_std)
        self.config = config.validate(encoder.cfg)
        unused = [encoder.mask_token, *encoder.pooler.parameters()]
        for p in unused:
            if p is not None:
                p.requires_grad_(False)
        head = DinoHead(encoder.cfg.hidden_size, config.out_dim, config.head_hidden_dim, config.head_bottleneck_dim,
                        config.head_layers, config.norm_last_layer, init_std)
        self.student = DinoNetwork(encoder, head)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False).eval()
        self.loss = DinoLoss(config)

    @property
    def local_crop_size(self) -> int:
        return self.config.local_size(self.student.backbone.cfg)

    def train(self, mode: bool = True) -> DinoModel:
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None = None, *,
                epoch: float, student: nn.Module | None = None) -> DinoOutput:
        """The teacher sees the two global crops of each image, the student every crop; `epoch`
        (may be fractional) sets the teacher temperature. Updates the loss's center. `student`:
        what to run the student through instead of `self.student` (its data-parallel wrapper;
        the teacher is never wrapped)."""
        if global_crops.dim() != 4 or global_crops.shape[0] % 2:
            raise InputError(f"global_crops must be [2*B, 3, H, W] (two crops per image, crop-major); got "
                             f"{tuple(global_crops.shape)}")
        with torch.no_grad():
            teacher_out = self.teacher(global_crops)
        self.loss.start_center(teacher_out)
        student_out = (student or self.student)(global_crops, local_crops)
        temperature = self.loss.teacher_temperature(epoch)
        # Measured against the center the loss is about to use, before it moves.
        metrics = collapse_metrics(teacher_out, student_out, self.loss.center, temperature, self.config.student_temp)
        metrics["teacher_temp"] = teacher_out.new_tensor(temperature, dtype=torch.float32)
        loss = self.loss(student_out, teacher_out, epoch)
        return DinoOutput(loss, metrics)

    def step_teacher(self, momentum: float, finite: torch.Tensor | None = None) -> None:
        """The EMA update of the teacher from the student (after the optimizer step); none where
        `finite` (see update_teacher) is False."""
        update_teacher(self.student, self.teacher, momentum, finite)

    def cancel_last_layer_grad(self, epoch: float) -> None:
        """Drop the gradient of the head's last layer during the first `freeze_last_layer` epochs
        (the reference's `cancel_gradients_last_layer`: it keeps early training stable)."""
        if epoch < self.config.freeze_last_layer:
            for p in self.student.head.last_layer.parameters():
                p.grad = None
