"""'uncertainty': homoscedastic uncertainty weighting.

Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry
and Semantics", CVPR 2018. Each objective k has a learned log-variance s_k and the loss is
sum_k exp(-s_k) L_k + s_k (the paper's form for classification-like losses, without its 1/2):
an objective whose loss stays high is trusted less, and the +s_k term keeps s_k from growing
without bound. At the optimum exp(s_k) = L_k.

Here: the network's gradient is that of sum_k exp(-s_k) L_k over the step's objectives (those
of its data kind), with s held fixed during the step; s_k then takes one Adam step on
d/ds_k = 1 - exp(-s_k) L_k with L_k the loss averaged over micro-batches and processes, so every
process holds the same s. Objectives of other kinds keep theirs. A step whose update was skipped
(non-finite) leaves s and Adam's moments as they were, and so does a loss that measured nothing
(a masked objective with nothing masked). L_k is the configured, weighted loss.
"""

from __future__ import annotations

import torch

from .base import Balancer

BETAS, EPS = (0.9, 0.999), 1e-8


class UncertaintyWeighting(Balancer):
    learns = True
    method = "uncertainty"

    def __init__(self, names, objectives, device):
        super().__init__(names, objectives, device)
        self.lr = objectives.uncertainty_lr
        k = len(self.names)
        self.log_var = torch.zeros(k, device=device)
        self.m, self.v, self.t = (torch.zeros(k, device=device) for _ in range(3))

    @property
    def fix(self) -> str:
        return f"lower objectives.uncertainty_lr (now {self.lr:g})"

    def factors(self, losses):
        w = torch.exp(-self.log_var)
        return {n: w[self.index[n]] for n in losses}

    def total(self, losses):
        # +s_k carries no gradient for the network; it makes the total the paper's objective.
        return super().total(losses) + sum(self.log_var[self.index[n]] for n in losses)

    def observe(self, step, losses, finite, measured=None):
        idx = self.positions(losses)
        values = torch.stack([v.detach().float() for v in losses.values()])
        s = self.log_var[idx]
        grad = 1 - torch.exp(-s) * values
        t = self.t[idx] + 1
        m = BETAS[0] * self.m[idx] + (1 - BETAS[0]) * grad
        v = BETAS[1] * self.v[idx] + (1 - BETAS[1]) * grad * grad
        new = s - self.lr * (m / (1 - BETAS[0] ** t)) / ((v / (1 - BETAS[1] ** t)).sqrt() + EPS)
        ok = self._counted(finite, new, measured)
        for state, value in ((self.log_var, new), (self.m, m), (self.v, v), (self.t, t)):
            state[idx] = torch.where(ok, value, state[idx])

    def state_dict(self):
        return {"method": self.method, "names": self.names, "log_var": self.log_var.cpu(), "m": self.m.cpu(), "v": self.v.cpu(),
                "t": self.t.cpu()}

    def load_state_dict(self, state):
        if not self._own(state):  # a checkpoint of a run that did not balance this way: start afresh
            return
        self._check_names(state)
        for key in ("log_var", "m", "v", "t"):
            getattr(self, key).copy_(state[key])
