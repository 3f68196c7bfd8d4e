"""What a balancing method supplies to the loop."""

from __future__ import annotations

import math

import torch


class Balancer:
    """One weight per objective (1 unless the method changes it); `names` are every objective
    the run trains, of all kinds, in a fixed order."""

    surgery = False
    """Whether the loop hands the method each objective's gradient on the shared encoders
    (`combine_gradients`) in place of their sum."""
    learns = False
    """Whether `observe` reads the step's losses (then the loop says which measured anything)."""
    method = ""
    """Its name in `METHODS`, saved with its state."""

    def __init__(self, names: list[str], objectives, device: torch.device):
        self.names, self.device = list(names), device
        self.index = {n: i for i, n in enumerate(self.names)}
        self.weights = torch.ones(len(self.names), device=device)
        self._positions: dict[tuple[str, ...], torch.Tensor] = {}

    def positions(self, names) -> torch.Tensor:
        """The device tensor of `names`' indices, made once per data kind: making one from a host
        list each step would be a blocking copy, a host-device sync."""
        key = tuple(names)
        if key not in self._positions:
            self._positions[key] = torch.tensor([self.index[n] for n in key], device=self.device)
        return self._positions[key]

    def factors(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The factor each of the step's losses is multiplied by (device scalars)."""
        return {n: self.weights[self.index[n]] for n in losses}

    def total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss the step back-propagates."""
        f = self.factors(losses)
        return sum(f[n] * v for n, v in losses.items())

    def observe(self, step: int, losses: dict[str, torch.Tensor], finite: torch.Tensor,
                measured: torch.Tensor | None = None) -> None:
        """After the step: its losses (as given to `total`, averaged over micro-batches and
        processes, detached), whether it updated (a bool tensor; no host read) and which losses
        measured anything (a bool per loss; None: all). A masked objective with nothing masked
        reads 0: no measurement, and no loss of 0 to learn from."""

    @staticmethod
    def _counted(finite: torch.Tensor, values: torch.Tensor, measured: torch.Tensor | None) -> torch.Tensor:
        """Which of a step's losses count: all of an updated step's if every one is finite, less
        those that measured nothing."""
        ok = finite & torch.isfinite(values).all()
        return ok if measured is None else ok & measured

    def unusable(self) -> str | None:
        """Why the method's factors are what made the loss non-finite (a weight that is not), with
        the setting to change; None when they are usable. Read once a run diverges (a host read)."""
        factors = self.factors(self.names)
        bad = {n: float(f) for n, f in factors.items() if not math.isfinite(float(f))}
        if not bad:
            return None
        said = ", ".join(f"{n} {v:g}" for n, v in bad.items())
        return (f"objectives.balancing='{self.method}' weighs objectives by factors no longer usable ({said}): "
                f"{self.fix}")

    fix = ""
    """What to change when `unusable` says so."""

    def combine_gradients(self, grads: list[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """The shared encoders' gradient from the objectives' (one flat vector each)."""
        return torch.stack(grads).sum(0)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def _own(self, state: dict) -> bool:
        """Whether `state` is this method's. A run resumed with another method (`--override`) starts
        it afresh; checkpoints from before the method was recorded are told by their keys."""
        saved = state.get("method") or ("uncertainty" if "log_var" in state else "dwa" if "weights" in state else "")
        return saved == self.method

    def _check_names(self, state: dict) -> None:
        from ...errors import CheckpointError

        if state.get("names", self.names) != self.names:
            raise CheckpointError(f"the checkpoint balances the objectives {', '.join(state['names'])}, this run "
                                  f"{', '.join(self.names)}: resume with the objectives it was started with")
