"""'dwa': dynamic weight average.

Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019, eq. 7:
w_k(t) = K exp(r_k(t-1) / T) / sum_i exp(r_i(t-1) / T), with r_k(t-1) = L_k(t-1) / L_k(t-2) the
ratio of objective k's average loss over the last two periods and K the number of objectives;
w_k = 1 for the first two periods. An objective whose loss falls slowly gains weight.

Here a period is `objectives.dwa_window` steps (the paper's epoch); K counts every objective of
the run, of all kinds, and each step applies its kind's weights (they sum to K over all
objectives, not over a step's). An objective whose kind drew no step in a period keeps its
previous average (ratio 1 next). L_k is the configured, weighted loss averaged over micro-batches
and processes; steps whose update was skipped do not count.
"""

from __future__ import annotations

import torch

from .base import Balancer


class DynamicWeightAverage(Balancer):
    def __init__(self, names, objectives, device):
        super().__init__(names, objectives, device)
        self.temperature, self.window = objectives.dwa_temperature, objectives.dwa_window
        k = len(self.names)
        self.sum, self.count = torch.zeros(k, device=device), torch.zeros(k, device=device)
        self.last, self.before = torch.zeros(k, device=device), torch.zeros(k, device=device)
        """The average loss of the last period and of the one before (0: none yet)."""

    def observe(self, step, losses, finite):
        idx = self.positions(losses)
        values = torch.stack([v.detach().float() for v in losses.values()])
        ok = (finite & torch.isfinite(values).all()).float()
        self.sum[idx] += torch.nan_to_num(values) * ok
        self.count[idx] += ok
        if (step + 1) % self.window == 0:
            self.end_period()

    def end_period(self) -> None:
        """Shift the periods' averages and set the weights from their ratios."""
        seen = self.count > 0
        mean = torch.where(seen, self.sum / self.count.clamp(min=1), self.last)
        self.before, self.last = self.last, mean
        both = (self.before > 0) & (self.last > 0)
        ratio = torch.where(both, self.last / self.before.clamp(min=1e-12), torch.ones_like(mean))
        # Until every objective has two periods behind it the weights stay 1 (the paper's start).
        weights = len(self.names) * torch.softmax(ratio / self.temperature, 0)
        self.weights = torch.where(both.all(), weights, torch.ones_like(weights))
        self.sum.zero_()
        self.count.zero_()

    def state_dict(self):
        return {"names": self.names, **{k: getattr(self, k).cpu() for k in ("weights", "sum", "count", "last",
                                                                             "before")}}

    def load_state_dict(self, state):
        if not state:  # a checkpoint of a run that did not balance this way: start afresh
            return
        self._check_names(state)
        for key in ("weights", "sum", "count", "last", "before"):
            getattr(self, key).copy_(state[key])
