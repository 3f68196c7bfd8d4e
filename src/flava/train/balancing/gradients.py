"""Each objective's gradient on the shared encoders, measured on the steps that need it (logged
steps for the diagnostics, every step for gradient surgery), and the surgery's combination
written back as the encoders' gradients. `t` is the `Trainer` whose step this is."""

from __future__ import annotations

import torch
import torch.distributed as dist


def objective_gradients(t, losses: dict[str, torch.Tensor], accum: int) -> dict[str, dict[str, torch.Tensor]]:
    """Each objective's gradient on each shared encoder it reaches, flat, as its term enters the
    update (balanced, scaled, divided by the accumulation) and averaged over processes."""
    factors = t.balancer.factors(losses)
    params = [p for ps in t.shared.values() for p in ps]
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, loss in losses.items():
        if not loss.requires_grad:
            continue
        term = t.scaler.scale(factors[name] * loss / accum)
        gs = iter(torch.autograd.grad(term, params, retain_graph=True, allow_unused=True))
        by_encoder = {enc: [next(gs) for _ in ps] for enc, ps in t.shared.items()}
        out[name] = {enc: torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                     for g, p in zip(gs_, t.shared[enc])])
                     for enc, gs_ in by_encoder.items() if any(g is not None for g in gs_)}
    if t.world > 1 and out:
        flat = torch.cat([g for by in out.values() for g in by.values()])
        dist.all_reduce(flat)
        flat /= t.world
        parts = iter(flat.split([g.numel() for by in out.values() for g in by.values()]))
        out = {n: {enc: next(parts) for enc in by} for n, by in out.items()}
    return out

def combine_shared(t, grads: dict[str, dict[str, torch.Tensor]], kept: list, order: torch.Generator) -> None:
    """Replace the summed gradient the backward left on each shared encoder by the balancing
    method's combination of the objectives' (plus what earlier micro-batches accumulated)."""
    params = [(enc, p) for enc, ps in t.shared.items() for p in ps]
    combined = {}
    for enc in t.shared:
        reaching = [by[enc] for by in grads.values() if enc in by]
        if reaching:
            combined[enc] = iter(t.balancer.combine_gradients(reaching, order).split(
                [p.numel() for p in t.shared[enc]]))
    for (enc, p), before in zip(params, kept):
        if enc in combined:
            g = next(combined[enc]).view_as(p).to(p.dtype)
            p.grad = g if before is None else before + g
