"""Checkpoints: whole or absent, and loaded without running pickled code.

- Student checkpoints (the released DHO format plus our metadata): their schema is
  dho_pipeline.student_checkpoint; they are saved with `save_atomically` and read with `load_checkpoint_file`.
- Training state: `RUN_DIR/checkpoints/step-NNNNNNNN/state.pt` with model, optimiser and data position.
  It is written under a temporary name and renamed when whole, so a checkpoint directory that exists
  is complete; resuming takes the newest one.

Every load here uses `weights_only=True`: a file carrying a pickled object that would run code is
refused with a clear error, and that code never runs.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path

import torch

from .errors import UserError

_STEP_DIR = re.compile(r"^step-(\d{8})$")


def load_checkpoint_file(path: str | Path) -> dict:
    """torch.load with weights_only=True and one-line errors for every way it can fail."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = _unpickler_detail(error)
        if _RUNS_CODE.search(detail):
            raise UserError(
                f"checkpoint {path} holds pickled objects that could run code, refused (weights_only load: {detail[:160]})"
            ) from None
        raise UserError(f"checkpoint {path} is not a PyTorch checkpoint, or is damaged ({detail[:160]})") from None
    except Exception as error:  # torch.load fails in many ways on a file that is no checkpoint (a text file: KeyError)
        first = (str(error).strip().splitlines() or [""])[0][:160]
        raise UserError(f"checkpoint {path} is not a PyTorch checkpoint, or is damaged ({type(error).__name__}: {first})") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"checkpoint {path} is not a dict of weights")
    return checkpoint


# What torch's weights-only unpickler says when a pickle would build an object, that is run code (a
# global, a reduce, a new object, a build); anything else it refuses (an unknown opcode) is damage.
_RUNS_CODE = re.compile(r"GLOBAL|reduce|create new object|Can only build", re.IGNORECASE)


def _unpickler_detail(error: Exception) -> str:
    """The weights-only unpickler's own reason, without torch's advice around it."""
    text = str(error)
    text = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else text
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def strip_module_prefix(state_dict: dict) -> dict:
    """Released checkpoints may carry DDP's `module.` prefix."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def _save(payload: dict, path: Path) -> None:
    """torch.save with its failures (a full disk surfaces as RuntimeError from the zip writer) as one line."""
    try:
        torch.save(payload, path)
    except (OSError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise UserError(
            f"writing checkpoint {path} failed ({first}); is the disk full? Free space and rerun "
            "(training resumes from the newest complete checkpoint)"
        ) from None


def save_atomically(payload: dict, path: Path) -> None:
    from .jsonfiles import atomic_path

    with atomic_path(path) as temporary:
        _save(payload, temporary)


def save_training_state(run_dir: Path, step: int, payload: dict, keep: int = 2) -> Path:
    """Write checkpoints/step-N/state.pt under a temporary name, rename when whole, prune old ones."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    temporary = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        _save(payload, temporary / "state.pt")
    except UserError:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    _discard(final)
    os.rename(temporary, final)
    for old in complete_training_states(run_dir)[:-keep]:
        _discard(old)
    return final


def _discard(directory: Path) -> None:
    """Delete a checkpoint directory without ever leaving a half-deleted step-N behind: it leaves the
    step-N names first (an atomic rename), and only then is it removed."""
    doomed = directory.with_name(f".discard-{directory.name}-{os.getpid()}")
    try:
        os.rename(directory, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def complete_training_states(run_dir: Path) -> list[Path]:
    """Complete training-state directories, oldest first (temporary ones are never listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def remove_partial_training_states(run_dir: Path) -> None:
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for leftover in [*root.glob(".tmp-step-*"), *root.glob(".discard-*")]:
            shutil.rmtree(leftover, ignore_errors=True)


def load_exactly(module: torch.nn.Module, state: dict, refusal: str, remedy: str = "") -> None:
    """Load `state` into `module`, every weight fitting: names missing on either side, or shapes that
    differ, are a UserError "<refusal> (what did not fit)<remedy>" rather than a partly loaded model."""
    try:
        problems = module.load_state_dict(state, strict=False)
    except RuntimeError as error:  # same names, other shapes
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = next((line for line in lines if "size mismatch" in line), lines[-1] if lines else "")
        raise UserError(f"{refusal} ({detail[:300]}){remedy}") from None
    if problems.missing_keys or problems.unexpected_keys:
        sample = (problems.missing_keys or problems.unexpected_keys)[0]
        raise UserError(f"{refusal} ({len(problems.missing_keys)} missing, {len(problems.unexpected_keys)} "
                        f"unexpected weights, e.g. {sample}){remedy}")
