"""How many steps a training run takes, and its learning rate at each, as pure functions.

Two learning-rate schedules (`LR_SCHEDULES`) and two ways of counting an epoch's steps (`EPOCH_STEPS`),
each pair being ours and the DHO reference's (erjui/DHO train_imgnet_semi.py); docs/fidelity.md
measures how far apart they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import UserError

LR_SCHEDULES = ("warmup-cosine", "reference")
EPOCH_STEPS = ("floor", "reference")
REFERENCE_START_FACTOR = 0.01  # LinearLR's start_factor in the reference


def warmup_cosine(step: int, *, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from 0 to `base_lr`, then a half cosine to 0 at `total_steps`.

    The warm-up is capped at a tenth of the run, so that a short run is not all warm-up. (The DHO
    reference multiplies a warm-up and a cosine that both start at step 0, so its cosine already decays
    during the warm-up: `reference_warmup_cosine`; here the cosine starts after it.)
    """
    warmup = min(warmup_steps, max(1, total_steps // 10))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def reference_warmup_cosine(step: int, *, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The reference's schedule in closed form: torch's ChainedScheduler of LinearLR(start_factor 0.01,
    total_iters = warmup) and CosineAnnealingLR(T_max = total - warmup, eta_min 0), both stepped after
    every optimiser step from step 0, so their factors multiply:

        lr(i) = base * (0.01 + 0.99 * min(i, warmup) / warmup) * (1 + cos(pi * i / (total - warmup))) / 2

    The cosine reaches 0 at step total - warmup and rises again over the last `warmup` steps (a second
    half-period), as the reference's does. `step` counts optimiser steps from 0.
    """
    period = total_steps - warmup_steps
    if period <= 0 or warmup_steps < 1:
        raise UserError(
            f"the reference lr schedule needs more steps ({total_steps}) than warm-up steps ({warmup_steps}), "
            "and at least one warm-up step: lower --warmup-steps, or use --lr-schedule warmup-cosine"
        )
    warmup = REFERENCE_START_FACTOR + (1 - REFERENCE_START_FACTOR) * min(step, warmup_steps) / warmup_steps
    return base_lr * warmup * (1 + math.cos(math.pi * step / period)) / 2


def learning_rate(schedule: str, step: int, *, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The lr of optimiser step `step` (from 0) under `schedule` (one of LR_SCHEDULES)."""
    function = {"warmup-cosine": warmup_cosine, "reference": reference_warmup_cosine}[schedule]
    return function(step, base_lr=base_lr, warmup_steps=warmup_steps, total_steps=total_steps)


@dataclass(frozen=True)
class StepPlan:
    """Step arithmetic of a run, identical on every process."""

    steps_per_epoch: int  # optimiser steps in one pass over the unlabeled set
    total_steps: int

    @classmethod
    def of(cls, *, num_unlabeled: int, batch_size: int, epochs: int, rounding: str = "floor",
           world: int = 1) -> "StepPlan":
        """`rounding` "floor": whole global batches only, N_u // batch_size. "reference": as the reference's
        loop over its unlabeled DataLoader, whose DistributedSampler pads each of the `world` processes to
        ceil(N_u / world) samples and whose last, short batch still counts: ceil(ceil(N_u / world) / (batch_size /
        world)) (ImageNet 1%: 4,954 steps per epoch where floor gives 4,953)."""
        if rounding == "reference":
            per_process = -(-num_unlabeled // world)
            steps_per_epoch = max(1, -(-per_process // max(1, batch_size // world)))
        elif rounding == "floor":
            steps_per_epoch = max(1, num_unlabeled // batch_size)
        else:
            raise UserError(f"epoch step rounding must be one of {', '.join(EPOCH_STEPS)}, not {rounding!r}")
        return cls(steps_per_epoch, steps_per_epoch * epochs)

    def epoch_of(self, step: int) -> int:
        """The epoch (from 0) that optimiser step `step` (counted from 1) belongs to."""
        return (step - 1) // self.steps_per_epoch if step else 0
