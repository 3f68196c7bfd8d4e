"""AdamW with FLAVA's decay rules, and the warmup-then-cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

# Parameters that are not weights of a matmul: decaying them only pulls them toward zero.
NO_DECAY_NAMES = ("cls_token", "dist_token", "register_tokens", "pos_embed", "mask_token", "logit_scale")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Norms, biases, the image encoder's CLS, distillation, register, position and mask tokens
    and the logit scale are not decayed (the text encoder's position and token-type tables are,
    as BERT's are)."""
    return param.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES or name.endswith(".bias")


def build_optimizer(model: nn.Module, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    scaled: tuple[str, ...] = (), scale: float = 1.0) -> torch.optim.AdamW:
    """AdamW over the trained parameters; those whose names start with one of `scaled` learn at
    `scale` x `lr` (the schedule scales every group alike). The first group is always the
    full-rate decayed one, the rate a run logs."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {(d, s): [] for s in (False, True) for d in (True, False)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            slow = bool(scaled) and scale != 1.0 and name.startswith(scaled)
            groups[(not no_weight_decay(name, p), slow)].append(p)
    params = [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr": lr * (scale if slow else 1.0),
               "decayed": decay} for (decay, slow), ps in groups.items() if ps or not slow]
    # The fused kernel updates every tensor in one pass; it exists for CPU and CUDA tensors.
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, fused=True)


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    """Give the decayed groups of a `build_optimizer` optimizer this weight decay (a schedule's
    value); the others stay at 0."""
    for group in optimizer.param_groups:
        # Groups restored from checkpoints written before groups were marked: decayed ones decay.
        if group.get("decayed", group["weight_decay"] > 0):
            group["weight_decay"] = weight_decay


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """LambdaLR factor: linear warmup from 0 to 1, then cosine down to `min_ratio`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor
