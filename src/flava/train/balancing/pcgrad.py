"""'pcgrad': projecting conflicting gradients.

Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Algorithm 1: for each
objective i, in a random order over the others j, if g_i . g_j < 0 then g_i -= (g_i . g_j) /
|g_j|^2 g_j (g_j the original gradient); the update uses the sum of the projected gradients.

Here it acts on each shared encoder separately (image, text, multimodal: where objectives meet)
among the objectives of the step's data kind; parameters one objective alone reaches (its head)
keep their ordinary gradient. Image and text steps train one objective each, so it changes only
pair steps. The gradients are averaged over processes before projection and the order is drawn
from the step's generator, so every process projects alike. With gradient accumulation each
micro-batch is projected on its own; in chunks (`optim.contrastive_chunks`) the projection acts on
the sums of the chunks' gradients, the micro-batch's. It costs one extra backward per objective of
each pair step (of each chunk).
"""

from __future__ import annotations

import torch

from .base import Balancer


def project_conflicting(grads: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """PCGrad's projected gradients (flat vectors, one per objective); `generator` (a CPU one, so
    the order needs no device read) draws the order."""
    out = []
    for i, g in enumerate(grads):
        g = g.clone()
        others = [j for j in range(len(grads)) if j != i]
        for k in torch.randperm(len(others), generator=generator).tolist():
            h = grads[others[k]]
            dot = g @ h
            # Without a branch on the host: the projection is zero unless they conflict.
            g = g - torch.clamp(dot, max=0) / (h @ h).clamp(min=1e-20) * h
        out.append(g)
    return out


class PCGrad(Balancer):
    surgery = True
    method = "pcgrad"

    def combine_gradients(self, grads, generator):
        return torch.stack(project_conflicting(grads, generator)).sum(0)
