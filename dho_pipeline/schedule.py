"""How many steps a training run takes, and its learning rate at each, as pure functions."""

from __future__ import annotations

import math
from dataclasses import dataclass


def warmup_cosine(step: int, *, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from 0 to `base_lr`, then a half cosine to 0 at `total_steps`.

    The warm-up is capped at a tenth of the run, so that a short run is not all warm-up. (The DHO
    reference multiplies a warm-up and a cosine that both start at step 0, so its cosine already decays
    during the warm-up; here the cosine starts after it.)
    """
    warmup = min(warmup_steps, max(1, total_steps // 10))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass(frozen=True)
class StepPlan:
    """Step arithmetic of a run, identical on every process."""

    steps_per_epoch: int  # optimiser steps in one pass over the unlabeled set
    total_steps: int

    @classmethod
    def of(cls, *, num_unlabeled: int, batch_size: int, epochs: int) -> "StepPlan":
        steps_per_epoch = max(1, num_unlabeled // batch_size)
        return cls(steps_per_epoch, steps_per_epoch * epochs)

    def epoch_of(self, step: int) -> int:
        """The epoch (from 0) that optimiser step `step` (counted from 1) belongs to."""
        return (step - 1) // self.steps_per_epoch if step else 0
