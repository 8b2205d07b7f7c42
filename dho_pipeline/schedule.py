"""The learning-rate schedule of a training run, as a pure function of the step."""

from __future__ import annotations

import math


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
