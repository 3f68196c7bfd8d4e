"""'dwa': dynamic weight average.

Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019, eq. 7:
w_k(t) = K exp(r_k(t-1) / T) / sum_i exp(r_i(t-1) / T), with r_k(t-1) = L_k(t-1) / L_k(t-2) the
ratio of objective k's average loss over the last two periods and K the number of objectives;
w_k = 1 for the first two periods. An objective whose loss falls slowly gains weight.

Here a period is `objectives.dwa_window` steps (the paper's epoch). An objective joins the
weighting once it has two periods behind it; K counts those, of all kinds, and each step applies
its kind's weights (the joined ones sum to K over all kinds, not over a step's). Until it joins, an
objective weighs 1: at the start, and throughout for one whose kind never trains (no data, no
share of the mix). An objective whose kind drew no step in a period keeps its previous average
(ratio 1 next). L_k is the configured, weighted loss averaged over micro-batches and processes;
steps whose update was skipped do not count, nor a step's loss that measured nothing (a masked
objective with nothing masked).
"""

from __future__ import annotations

import torch

from .base import Balancer


class DynamicWeightAverage(Balancer):
    learns = True
    method = "dwa"

    def __init__(self, names, objectives, device):
        super().__init__(names, objectives, device)
        self.temperature, self.window = objectives.dwa_temperature, objectives.dwa_window
        k = len(self.names)
        self.sum, self.count = torch.zeros(k, device=device), torch.zeros(k, device=device)
        self.last, self.before = torch.zeros(k, device=device), torch.zeros(k, device=device)
        """The average loss of the last period and of the one before (0: none yet)."""

    def observe(self, step, losses, finite, measured=None):
        idx = self.positions(losses)
        values = torch.stack([v.detach().float() for v in losses.values()])
        ok = self._counted(finite, values, measured).float()
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
        # K: the objectives with two periods behind them; the rest weigh 1 (the paper's start).
        # Softmax of ratio / T, shifted by the largest ratio first and divided below it only: a
        # temperature float32 holds as 0 (1e-50) had made every weight NaN (0 / 0), for good.
        shifted = ratio - torch.where(both, ratio, float("-inf")).max()
        logits = torch.where(both, torch.where(shifted < 0, shifted / self.temperature, 0.0), float("-inf"))
        weights = both.sum() * torch.softmax(logits, 0)
        self.weights = torch.where(both, weights, torch.ones_like(weights))
        self.sum.zero_()
        self.count.zero_()

    def state_dict(self):
        return {"method": self.method, "names": self.names,
                **{k: getattr(self, k).cpu() for k in ("weights", "sum", "count", "last", "before")}}

    def load_state_dict(self, state):
        if not self._own(state):  # a checkpoint of a run that did not balance this way: start afresh
            return
        self._check_names(state)
        for key in ("weights", "sum", "count", "last", "before"):
            getattr(self, key).copy_(state[key])
