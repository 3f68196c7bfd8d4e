"""How much each data kind counts across steps (`data.mixing_schedule`).

- 'constant': every step draws its kind with the probabilities `data.mixing` (the paper's 0.70 /
  0.15 / 0.15);
- 'linear': the probabilities move in a straight line from `data.mixing` at the first step to
  `data.mixing_end` at the last;
- 'adaptive': each kind's share follows its loss progress, as dynamic weight average (Liu, Johns &
  Davison, CVPR 2019, eq. 7) weights objectives, but on the kinds' data share: at the end of each
  window of `data.mixing_window` steps, with r_k the ratio of kind k's mean step loss over the last
  window to the window before, p_k = m_k exp(r_k / T) / sum_i m_i exp(r_i / T), where m is
  `data.mixing` and T `data.mixing_temperature`. A kind whose loss stops falling gets more steps;
  one that keeps falling gets fewer; with every ratio equal p stays m. Until every kind with a share
  in m has two windows behind it p is m; a kind m gives no share keeps none.

The probabilities at a step are a function of the steps before it: the kinds' losses are averaged
over processes before they reach `observe`, so every process draws the same kind, and the state
is saved with the checkpoint, so a resumed run draws what the uninterrupted one would have. The
adaptive mode reads its window's sums on the host once per window (one host-device sync each
`mixing_window` steps).
"""

from __future__ import annotations

import numpy as np
import torch

from ...errors import CheckpointError


class KindMixing:
    def __init__(self, kinds: tuple[str, ...], start: np.ndarray, end: np.ndarray, data, max_steps: int,
                 device: torch.device):
        self.kinds, self.start, self.end = tuple(kinds), start, end
        self.mode, self.max_steps = data.mixing_schedule, max_steps
        self.window, self.temperature = data.mixing_window, data.mixing_temperature
        k = len(self.kinds)
        self.sum, self.count = torch.zeros(k, device=device), torch.zeros(k, device=device)
        """The current window's summed step losses and counted steps per kind (on the device)."""
        self.last, self.before = np.zeros(k), np.zeros(k)
        """Each kind's mean step loss over the last window and the one before (0: none yet)."""
        self.probs = start.copy()
        """The adaptive mode's probabilities for the steps after the last window's end."""

    def probs_at(self, step: int) -> np.ndarray:
        if self.mode == "linear":
            f = min(1.0, step / max(1, self.max_steps - 1))
            probs = (1 - f) * self.start + f * self.end
            return probs / probs.sum()
        return self.probs if self.mode == "adaptive" else self.start

    def observe(self, step: int, kind: str, loss: torch.Tensor, counts: torch.Tensor) -> None:
        """After step `step`: its kind, its total loss (averaged over processes; a device scalar)
        and whether it counts: steps whose update was skipped do not, nor those with a loss that
        measured nothing: `counts` (a bool tensor) says which."""
        if self.mode != "adaptive":
            return
        i = self.kinds.index(kind)
        ok = (counts & torch.isfinite(loss)).float()
        self.sum[i] += torch.nan_to_num(loss.detach().float()) * ok
        self.count[i] += ok
        if (step + 1) % self.window == 0:
            self.end_window()

    def end_window(self) -> None:
        sums, counts = self.sum.tolist(), self.count.tolist()  # the window's one host read
        mean = np.array([s / c if c > 0 else last for s, c, last in zip(sums, counts, self.last)])
        self.before, self.last = self.last, mean
        # A kind given no share never trains, so its means stay 0: only the others need two windows.
        shared = self.start > 0
        if (self.before[shared] > 0).all() and (self.last[shared] > 0).all():
            logits = np.full(len(self.kinds), -np.inf)  # a kind given no share keeps none
            logits[shared] = np.log(self.start[shared]) + (self.last[shared] / self.before[shared]) / self.temperature
            p = np.exp(logits - logits.max())
            self.probs = p / p.sum()
        self.sum.zero_()
        self.count.zero_()

    def state_dict(self) -> dict:
        if self.mode != "adaptive":
            return {}
        return {"kinds": list(self.kinds), "sum": self.sum.cpu(), "count": self.count.cpu(),
                "last": torch.from_numpy(self.last), "before": torch.from_numpy(self.before),
                "probs": torch.from_numpy(self.probs)}

    def load_state_dict(self, state: dict) -> None:
        if self.mode != "adaptive" or not state:  # a run that did not adapt its mix: start afresh
            return
        if state["kinds"] != list(self.kinds):
            raise CheckpointError(f"the checkpoint mixes the data kinds {', '.join(state['kinds'])}, this run "
                                  f"{', '.join(self.kinds)}: resume with the data it was started with")
        self.sum.copy_(state["sum"])
        self.count.copy_(state["count"])
        self.last, self.before = state["last"].numpy().copy(), state["before"].numpy().copy()
        self.probs = state["probs"].numpy().copy()
