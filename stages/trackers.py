"""Experiment trackers for `train --report-to`: TensorBoard, Weights & Biases, MLflow, through Accelerate.

Accelerate silently drops a tracker that is not installed; here a chosen one that is missing is a one-line
error naming the extra to install. Both optional trackers work without a network by default:

- W&B runs offline into RUN_DIR/wandb/ unless WANDB_MODE says otherwise (`wandb sync RUN_DIR/wandb/offline-run-*`
  uploads it later; WANDB_MODE=online logs live).
- MLflow logs to MLFLOW_TRACKING_URI if set, else to a file store in RUN_DIR/mlruns (`mlflow ui --backend-store-uri
  RUN_DIR/mlruns`); MLflow 3 wants MLFLOW_ALLOW_FILE_STORE=true for that, which is set if unset.

Hyperparameters are logged as numbers where they are numbers (TensorBoard's hparams accept only scalars and
strings): lists of numbers become one entry per item (`loss_weights/0`, ...), None the string "none".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dho_pipeline.errors import UserError

from .common import log

TRACKERS = ("tensorboard", "wandb", "mlflow")
CHOICES = (*TRACKERS, "all", "none")
_INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install 'dho-pipeline[wandb]'",
            "mlflow": "pip install 'dho-pipeline[mlflow]'"}


def is_installed(name: str) -> bool:
    import importlib

    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def chosen_trackers(report_to: str) -> list[str]:
    """The trackers `--report-to` names; `all` is every one installed. A named one that is missing is an error."""
    if report_to == "none":
        return []
    if report_to == "all":
        return [name for name in TRACKERS if is_installed(name)]
    if report_to not in TRACKERS:
        raise UserError(f"--report-to must be one of {', '.join(CHOICES)}, not {report_to!r}")
    if not is_installed(report_to):
        raise UserError(f"--report-to {report_to}: {report_to} is not installed; {_INSTALL[report_to]}, "
                        "or choose another --report-to")
    return [report_to]


def init_kwargs(trackers: list[str], out: Path) -> dict:
    """Per-tracker arguments for Accelerator.init_trackers; points MLflow at its store."""
    kwargs = {}
    if "wandb" in trackers:
        mode = os.environ.get("WANDB_MODE", "offline")
        kwargs["wandb"] = {"dir": str(out), "mode": mode, "name": out.name}
        log.info("W&B logs %s into %s", mode, out / "wandb")
    if "mlflow" in trackers:
        import mlflow

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (out / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        kwargs["mlflow"] = {"run_name": out.name}
        log.info("MLflow logs to %s", uri)
    return kwargs


def hparams(config: dict) -> dict:
    """A run's config as tracker hyperparameters: scalars and strings only."""
    flat = {}
    for key, value in config.items():
        if value is None:
            flat[key] = "none"
        elif isinstance(value, (bool, int, float, str)):
            flat[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            flat.update({f"{key}/{i}": v for i, v in enumerate(value)})
        else:
            flat[key] = json.dumps(value, default=str)
    return flat
