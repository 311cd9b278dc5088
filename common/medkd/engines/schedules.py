"""Learning-rate schedules of the papers that MONAI/PyTorch do not provide."""

from __future__ import annotations

from typing import Sequence

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["PiecewisePolyLR"]


class PiecewisePolyLR(LRScheduler):
    """``lr = bases[k] * (1 - it / total_iterations) ** power``, ``k`` = number of ``boundaries`` below the epoch.

    Graph Flow's schedule (its ``adjust_learning_rate_poly``): bases 3e-3 / 3e-4 / 3e-5 / 3e-6 for epochs <= 50,
    51-100, 101-150 and beyond (``boundaries=[50, 100, 150]``), poly power 0.9, set every iteration; the
    discriminator uses ``bases=[3e-5]``. The iteration count is clamped to ``total_iterations`` (the released
    paraphraser loop counted twice per iteration and ran past it). Step it once per iteration
    (``LrScheduleHandler(epoch_level=False)``); ``it`` is the number of steps taken, epochs are 1-based.

    Args:
        optimizer: its learning rate is overwritten (every parameter group gets the same value).
        bases: base learning rate of each epoch range (``len(boundaries) + 1`` values).
        boundaries: last epoch of each range but the last, increasing.
        total_iterations: iterations of the whole run (epochs x iterations per epoch).
        iterations_per_epoch: to tell the epoch from the iteration count.
        power: poly exponent.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, bases: Sequence[float], boundaries: Sequence[int],
                 total_iterations: int, iterations_per_epoch: int, power: float = 0.9, last_epoch: int = -1):
        if len(bases) != len(boundaries) + 1:
            raise ValueError(f"need len(boundaries) + 1 bases, got {len(bases)} bases and {len(boundaries)} boundaries")
        if list(boundaries) != sorted(boundaries):
            raise ValueError(f"boundaries must increase, got {list(boundaries)}")
        if total_iterations < 1 or iterations_per_epoch < 1:
            raise ValueError("total_iterations and iterations_per_epoch must be positive")
        self.bases, self.boundaries = [float(b) for b in bases], [int(b) for b in boundaries]
        self.total, self.per_epoch, self.power = int(total_iterations), int(iterations_per_epoch), float(power)
        super().__init__(optimizer, last_epoch)

    def value_at(self, iteration: int) -> float:
        """The learning rate after ``iteration`` steps."""
        it = min(max(int(iteration), 0), self.total)
        epoch = it // self.per_epoch + 1
        base = self.bases[sum(epoch > b for b in self.boundaries)]
        return base * (1.0 - it / self.total) ** self.power

    def get_lr(self) -> list[float]:
        return [self.value_at(self.last_epoch)] * len(self.optimizer.param_groups)
