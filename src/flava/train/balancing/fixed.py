"""'fixed': the losses summed as configured (`objectives.*_weight`), the paper's recipe."""

from __future__ import annotations

from .base import Balancer


class Fixed(Balancer):
    """Every factor is 1: the update is the sum of the configured, weighted losses."""

    method = "fixed"
