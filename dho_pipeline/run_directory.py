"""A training run's directory: one run at a time, and continued only as it was started.

- `locked`: `RUN/train.lock`, an exclusive kernel lock (processes.exclusive_lock) held by the main
  process for the whole run; a second run on the same directory, `--resume` included, is refused at
  once, naming the holder's pid and host. It dies with its holder, so it is never stale.
- `check_continuation`: a directory holding checkpoints is continued only with `--resume`, the same
  trajectory settings (config.json) and the same manifest, split and cache, compared by content
  (inputs.json: their fingerprints), so inputs that merely moved are accepted.
- `record_start`: config.json and inputs.json, written when the run starts.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import UserError
from .hashing import fingerprint_json
from .jsonfiles import read_json, write_text_atomically
from .processes import exclusive_lock

INPUTS = ("manifest", "split", "cache")
_REMEDY = "it is written when a run starts: restore it, or start the run again in another --out"


@contextmanager
def locked(out: Path) -> Iterator[None]:
    def refusal(holder: str) -> str:
        return (f"run directory {out} is in use by {holder} (a train running there; a second train or --resume "
                "cannot join it); wait for it to end or stop it, or choose another --out")

    with exclusive_lock(Path(out) / "train.lock", refusal):
        yield


def input_fingerprints(manifest, split, reader, paths: dict) -> dict:
    """The run's inputs by content (the cache by its spec, as student.pt records it; None when the
    teacher runs online), and the paths they were given as (for messages)."""
    return {"manifest": manifest.fingerprint, "split": split.fingerprint,
            "cache": fingerprint_json(reader.spec.to_attrs()) if reader else None,
            "paths": {name: str(paths[name]) for name in INPUTS}}


def check_continuation(out: Path, *, resume: bool, has_checkpoints: bool, settings: dict, trajectory: tuple,
                       inputs: dict) -> None:
    if has_checkpoints and not resume:
        raise UserError(f"{out} already holds a training run; pass --resume to continue it, or choose another --out")
    if resume and (out / "config.json").exists():
        previous = read_json(out / "config.json", "run config", _REMEDY)
        # A setting added after the run started is absent from its config.json: nothing to compare.
        changed = [k for k in trajectory if k in previous and previous[k] != settings[k]]
        if changed:
            raise UserError(f"--resume: {out} was trained with different {', '.join(changed)}; resume with the same settings")
    if resume and has_checkpoints and (out / "inputs.json").exists():
        previous = read_json(out / "inputs.json", "run inputs record", _REMEDY)
        for name in INPUTS:
            if previous.get(name) != inputs[name]:
                raise UserError(
                    f"--resume: {out} was trained on another {name} ({previous['paths'][name]}, "
                    f"{_short(previous.get(name))}; now {inputs['paths'][name]}, {_short(inputs[name])}); "
                    f"resume with the {name} it started with, or choose another --out")


def record_start(out: Path, settings: dict, inputs: dict) -> None:
    """Main process: the resolved settings and the inputs' fingerprints."""
    write_text_atomically(out / "config.json", json.dumps(settings, indent=2) + "\n")
    write_text_atomically(out / "inputs.json", json.dumps(inputs, indent=2) + "\n")


def _short(fingerprint: str | None) -> str:
    return "no cache (teacher online)" if fingerprint is None else f"fingerprint {fingerprint[:19]}"
