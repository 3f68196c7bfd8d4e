"""Ways to combine a step's objectives (`objectives.balancing`): one module per method, named
in `METHODS`.

FLAVA trains one data kind per step, so the losses a step combines are those of its kind (pairs:
contrastive, ITM, MMM image, MMM text; images: MIM; text: MLM). Methods that weight objectives
(uncertainty, DWA) keep one weight per objective over the whole run and apply the step's; a
method that works on gradients (PCGrad) acts among the objectives of the step. How much each kind
counts across steps is `data.mixing` (and `data.mixing_schedule`).

A balancer's numbers stay on the device and change from the step's losses after they are
averaged over processes, so every process holds the same state without a host-device sync.
"""

from __future__ import annotations

from .base import Balancer
from .dwa import DynamicWeightAverage
from .fixed import Fixed
from .pcgrad import PCGrad, project_conflicting
from .uncertainty import UncertaintyWeighting

METHODS: dict[str, type[Balancer]] = {"fixed": Fixed, "uncertainty": UncertaintyWeighting,
                                      "dwa": DynamicWeightAverage, "pcgrad": PCGrad}

__all__ = ["METHODS", "Balancer", "DynamicWeightAverage", "Fixed", "PCGrad", "UncertaintyWeighting",
           "project_conflicting"]
