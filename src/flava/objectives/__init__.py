"""The pretraining objectives: one record each (`registry`), their losses, ITM negatives, and the
PretrainingModel that computes them."""

from .losses import Losses
from .pretraining import PretrainingHeads, PretrainingModel, PretrainingOutput
from .registry import OBJECTIVES, Objective

__all__ = ["Losses", "OBJECTIVES", "Objective", "PretrainingHeads", "PretrainingModel", "PretrainingOutput"]
