"""Training guard: a non-finite loss or gradient stops training, naming the step and its samples.

Checking `isfinite(loss).item()` every step would make the host wait for the device every step (the
training loop otherwise syncs once per metrics window). Instead each step leaves two flags on the
device: the loss is not finite; the gradient's L2 norm is not finite (torch's fused per-tensor norms,
the pass clip_grad_norm_ makes, before the optimiser step; NaN and inf propagate into it, and a float32
norm overflows only past 1.8e19, where a run has diverged anyway). The host keeps the step's sample
keys. `check`, called where the host syncs anyway (each metrics line, before every checkpoint,
evaluation and the final save), reads the flags of the steps since the last check in one transfer. A
non-finite step therefore never reaches a checkpoint or `student.pt`: the steps after it (NaN weights)
are discarded with it, and the newest checkpoint on disk is the last good state.

Under fp16 loss scaling (`gradients=False`) an infinite gradient is the scaler's overflow signal: the
scaler skips that optimiser step and lowers its scale, so only the loss is checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import UserError

SHOWN_KEYS = 6  # keys named in the error line; all of them go to the report file


class FiniteGuard:
    def __init__(self, parameters, *, num_processes: int = 1, gradients: bool = True):
        self.parameters = [p for p in parameters if p.requires_grad] if gradients else []
        self.num_processes = num_processes
        self._flags: list[torch.Tensor] = []  # per step: bool [2] on the device (loss, gradient)
        self._steps: list[int] = []
        self._keys: list[dict[str, list[str]]] = []  # per step: stream -> sample keys
        self._loss: torch.Tensor | None = None
        self._step_keys: dict[str, list[str]] = {}

    def add(self, batches: dict, loss: torch.Tensor) -> None:
        """Each micro-step: its batches (their "keys") and its loss."""
        for name, batch in batches.items():
            self._step_keys.setdefault(name, []).extend(batch["keys"])
        loss = loss.detach().float()
        self._loss = loss if self._loss is None else self._loss + loss

    def end_step(self, step: int) -> None:
        """After the step's backward passes, before the optimiser step: its flags, on the device."""
        grads = [p.grad for p in self.parameters if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2))) if grads else self._loss
        self._flags.append(torch.stack([~torch.isfinite(self._loss), ~torch.isfinite(norm.float())]))
        self._steps.append(step)
        self._keys.append(self._step_keys)
        self._loss, self._step_keys = None, {}

    def check(self, saved_step: int, *, report: Path, write_report: bool = True) -> None:
        """Raise a one-line UserError if a step since the last check had a non-finite loss or gradient
        (on any process); `saved_step` is the newest checkpoint's step (0: none), which stays; `report`
        receives every key of the step (written by the process with `write_report`)."""
        if not self._flags:
            return
        flags = torch.stack(self._flags).int()
        if self.num_processes > 1:  # every process stops at the same step, naming every process's samples
            from accelerate.utils import reduce

            flags = reduce(flags, reduction="sum")
        flags = flags.cpu()
        bad = torch.nonzero(flags.any(dim=1)).flatten()
        if len(bad) == 0:
            self._flags, self._steps, self._keys = [], [], []
            return
        first = int(bad[0])
        step, keys = self._steps[first], self._gather(self._keys[first])
        what = "the loss" if flags[first, 0] else "the gradient norm (the loss was finite)"
        listed = [key for stream in keys.values() for key in stream]
        if write_report:
            report.write_text(json.dumps({"step": step, "non_finite": what, "keys": keys}, indent=1) + "\n")
        saved = f"the newest checkpoint, step {saved_step}, stays" if saved_step else "no checkpoint was written"
        shown = ", ".join(repr(k) for k in listed[:SHOWN_KEYS]) + (", ..." if len(listed) > SHOWN_KEYS else "")
        raise UserError(
            f"step {step}: {what} is not finite; training stopped, {saved}. The step's {len(listed)} samples: "
            f"{shown} (all in {report}). Lower --lr, or check those samples"
        )

    def _gather(self, keys: dict[str, list[str]]) -> dict[str, list[str]]:
        if self.num_processes == 1:
            return keys
        import torch.distributed as dist

        every: list = [None] * self.num_processes
        dist.all_gather_object(every, keys)
        return {name: [k for part in every for k in part.get(name, [])] for name in keys}
