"""One micro-batch's forward and backward in the loop: whole, or in `optim.contrastive_chunks`
chunks back-propagated one after another (`Stage.forward_chunks`), with each objective's
gradient on the shared encoders where the balancing method or the diagnostics need it. `t` is the
`Trainer` whose step this is.

With chunks, only the last chunk of the step's last micro-batch all-reduces the gradients (DDP's
no_sync, FSDP's gradient sync off before it); the losses logged are the chunks' sums (each chunk's
share of the micro-batch's loss), the metrics their means, and the objectives' gradients for the
diagnostics and gradient surgery are the chunks' sums, so PCGrad projects the micro-batch's
gradients as it would unchunked.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import ConfigError
from ..syncs import sync_free
from .balancing.diagnostics import gradient_report
from .balancing.gradients import combine_shared, objective_gradients


def check_chunks(cfg, stage) -> None:
    """Refuse a chunk count the stage or the batch cannot take, in one line."""
    n, batch = cfg.optim.contrastive_chunks, cfg.data.batch_size
    if n == 1:
        return
    if not stage.chunkable:
        raise ConfigError(f"optim.contrastive_chunks={n} splits a pretraining batch into chunks, but stage {cfg.stage} "
                          "computes its loss over the whole batch at once: set optim.contrastive_chunks=1")
    if batch % n:
        fits = ", ".join(str(d) for d in range(1, batch + 1) if batch % d == 0)
        raise ConfigError(f"optim.contrastive_chunks={n} must divide data.batch_size={batch} (each process's batch) "
                          f"into equal chunks: choose one of {fits}, or another data.batch_size")


def micro_seed(seed: int, step: int, micro: int, accum: int) -> int:
    """The seed of micro-batch `micro` of `step` (its ITM negatives, PCGrad's order): distinct for
    every (step, micro) of a run, and for up to 31 micro-batches the seeds runs always had."""
    return seed * 1_000_003 + step * max(31, accum) + micro


def micro_step(t, batch, generator: torch.Generator, step: int, micro: int, measure: bool):
    """Forward and backward of micro-batch `micro` of `step` (`batch` on the host: it is moved to
    the device whole or chunk by chunk, each part's counts read on the host). Returns its numbers
    (detached: total, losses..., metrics..., balancing factors...), their names ((losses, metrics
    and factors)) and, when `measure`, the gradient diagnostics (else None)."""
    cfg = t.cfg
    accum, n = cfg.optim.grad_accumulation, cfg.optim.contrastive_chunks
    plain = cfg.objectives.balancing == "fixed"
    surgery = t.balancer.surgery
    # Copies: the backward may accumulate into these tensors in place.
    kept = [None if p.grad is None else p.grad.clone() for ps in t.shared.values() for p in ps] if surgery else []
    size = len(batch) // n
    parts = [t._to_device(batch)] if n == 1 else [t._to_device(batch.rows(slice(i * size, (i + 1) * size)))
                                                  for i in range(n)]
    outputs = _outputs(t, parts, generator, step)
    grads, total, losses, metrics = None, 0.0, {}, {}
    for i in range(n):
        last = micro == accum - 1 and i == n - 1
        with contextlib.nullcontext() if last else t._no_sync():
            # Accelerators: no host reads in the forward (flava.syncs); on the CPU they cost nothing.
            with t.autocast(), sync_free(t.device.type != "cpu"):
                out = next(outputs)
            part = out.total if plain else t.balancer.total(out.losses)
            if t.shared and (measure or surgery):
                grads = _summed(grads, objective_gradients(t, out.losses, accum))
            t.scaler.scale(part / accum).backward()
        total = total + part.detach().float()
        for name, v in out.losses.items():
            losses[name] = losses.get(name, 0.0) + v.detach().float()
        for name, v in out.metrics.items():
            metrics[name] = metrics.get(name, 0.0) + v.detach().float() / n
    if surgery:
        combine_shared(t, grads, kept, torch.Generator().manual_seed(micro_seed(cfg.seed, step, micro, accum)))
    report = None
    if measure and grads:
        # In the loss's own units: the loss scale and the accumulation divided out.
        scale = t.scaler.get_scale() if t.scaler.is_enabled() else 1.0
        report = gradient_report(grads, scale / accum)
    if not plain and n > 1:  # a method's total need not be linear in the losses (uncertainty adds s)
        total = t.balancer.total(losses).float()
    factors = {} if plain else {f"balancing_{k}": f for k, f in t.balancer.factors(losses).items()}
    values = torch.stack([total, *losses.values(), *metrics.values(), *(f.float() for f in factors.values())])
    return values, (list(losses), [*metrics, *factors]), report


def _outputs(t, parts: list, generator: torch.Generator, step: int):
    """The stage's outputs for the micro-batch, one per part, each computed when asked for."""
    if len(parts) == 1:
        yield t.stage.forward(t.module, parts[0], generator, step)
    else:
        yield from t.stage.forward_chunks(t.module, parts, generator, step)


def _summed(a: dict | None, b: dict) -> dict:
    """Per-objective, per-encoder gradients of two chunks added."""
    if a is None:
        return b
    for name, by in b.items():
        mine = a.setdefault(name, {})
        for enc, g in by.items():
            mine[enc] = mine[enc] + g if enc in mine else g
    return a
