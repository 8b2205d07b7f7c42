"""What several stages share: devices and precision, rank coordination, JSON-lines logs."""

from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, TypeVar

from dho_pipeline.errors import UserError

PRECISIONS = ("fp32", "bf16", "fp16")

log = logging.getLogger("dho_pipeline")
T = TypeVar("T")


def process_state(requested_device: str | None):
    """Accelerate's view of this process (rank, world size, device), joining a torchrun group if any.

    On machines without CUDA (or with --device cpu) Accelerate must be told `cpu=True`, else it
    ignores the launcher's environment and every rank believes it is alone.
    """
    import torch
    from accelerate import PartialState

    cpu = (requested_device or "").startswith("cpu") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def resolve_device(requested: str | None, default):
    """`--device` if given (a bare "cuda" means this rank's GPU), else the launcher's choice."""
    import torch

    if requested is None:
        return torch.device("cpu") if default.type == "cpu" else default
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {requested}: no CUDA device is available here; use --device cpu")
        if device.index is None:
            device = default if default.type == "cuda" else torch.device("cuda", 0)
    return device


def resolve_precision(requested: str | None, device) -> str:
    precision = requested or ("bf16" if device.type == "cuda" else "fp32")
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


def device_and_precision(requested_device: str | None, requested_precision: str | None):
    """This process's Accelerate state, its device and its precision, from --device and --precision."""
    state = process_state(requested_device)
    device = resolve_device(requested_device, state.device)
    return state, device, resolve_precision(requested_precision, device)


def precision_dtype(precision: str):
    """The torch dtype that a precision name stands for (weights cast for inference take it)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def resolve_compile(requested: bool | None, device) -> bool:
    """`--compile/--no-compile` if given, else on for GPUs: compiling takes ~30 s per model there and pays
    for itself within minutes (BENCHMARKS.md, GPU); on a CPU it rarely does."""
    return device.type == "cuda" if requested is None else requested


def autocast(device, precision: str):
    import torch

    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def on_main_then_share(state, work: Callable[[], T]) -> T:
    """Run `work` on the main process only and hand its result (or its UserError) to every rank.

    Without this, a refusal on rank 0 (a locked cache, a mismatched spec) would leave the other ranks
    waiting at the next barrier until the collective timeout.
    """
    outcome: list = [None]
    if state.is_main_process:
        try:
            outcome[0] = ("ok", work())
        except UserError as error:
            outcome[0] = ("error", str(error))
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(outcome, from_process=0)
    status, value = outcome[0]
    if status == "error":
        raise UserError(value)
    return value


def leave_process_group() -> None:
    """After a command succeeded under torchrun: wait for every rank, then close the group. A gloo group
    left to interpreter exit can abort a rank ("terminate called without an active exception") after
    its work is done, failing the whole launch."""
    if "torch" not in sys.modules:  # commands that never imported torch have no group
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def class_list(given: Path | None, manifest) -> tuple[list[str], str]:
    """The class names a stage uses, and where they came from: the file given, else the manifest's (the
    classes.txt beside its shards), else ImageNet's 1000 CLIP class names."""
    from dho_pipeline.package_data import IMAGENET_CLASSNAMES
    from dho_pipeline.prompts import read_classnames

    if given is not None:
        return read_classnames(given), str(given)
    if manifest.classnames is not None:
        return list(manifest.classnames), "the manifest's class names"
    return read_classnames(IMAGENET_CLASSNAMES), "ImageNet's 1000 class names, the default"


def reduce_sum(state, tensor):
    """Sum a tensor over all processes (a no-op alone); the result is on the CPU."""
    if state.num_processes == 1:
        return tensor
    from accelerate.utils import reduce

    return reduce(tensor.to(state.device), reduction="sum").cpu()


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line; a single O_APPEND write, so lines from several ranks never interleave."""
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)


class MetricsWindow:
    """What `train` logs every few steps: mean loss parts, samples/s, and the share of time spent waiting
    for data. Loss parts are summed on the device, so logging costs one sync per window, not per step."""

    def __init__(self):
        self.sums: dict = {}
        self.steps = self.samples = 0
        self.data_seconds = 0.0
        self.started = time.perf_counter()

    def add(self, losses: dict, scale: float) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float() * scale

    def record(self, step: int, epoch: int, lr: float) -> dict:
        """The window's metrics line; the window starts again."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        parts = {name: value.item() / max(1, self.steps) for name, value in self.sums.items()}
        record = {"step": step, "epoch": epoch, "lr": lr, **parts, "loss": sum(parts.values()),
                  "samples_per_second": self.samples / elapsed, "data_wait_fraction": self.data_seconds / elapsed}
        self.__init__()
        return record
