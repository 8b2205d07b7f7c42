"""Export a student checkpoint's weights as safetensors, with a JSON of everything else needed to use it.

    dho-pipeline export runs/b16/student-calibrated.pt --format safetensors [--out model.safetensors]

Writes `<out>` (the state dict: backbone.*, ce_head.*, kd_head.*) and `<out minus suffix>.json`:
architecture (open_clip model name), preprocessing, alpha, beta and the class names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dho_pipeline.errors import UserError

from .options import setting


@dataclass(frozen=True, kw_only=True)
class Config:
    checkpoint: Path = setting(argument=True, help="Student checkpoint.")
    out: Path | None = setting(None, default_text="CHECKPOINT with .safetensors", help="Weights file to write.")
    format: str = setting("safetensors", choices=("safetensors",), help="Export format.")
    student: str | None = setting(None, help="Architecture when the checkpoint does not record it: ViT-B-16, "
                                  "ViT-L-14, ViT-L-14-336px, RN50, or an open_clip name.")
    classnames: Path | None = setting(None, default_text="the checkpoint's, or ImageNet's for 1000 classes",
                                      help="Class names, one per line.")


def run(config: Config) -> dict:
    from safetensors.torch import save_file

    from dho_pipeline.student_checkpoint import load_student
    from dho_pipeline.prompts import read_classnames

    if config.format != "safetensors":
        raise UserError(f"--format {config.format!r} is not supported; use safetensors")
    classnames = read_classnames(config.classnames) if config.classnames else None
    loaded = load_student(config.checkpoint, student=config.student, classnames=classnames)
    out = Path(config.out) if config.out else Path(config.checkpoint).with_suffix(".safetensors")
    sidecar = out.with_suffix(".json")
    state = {k: v.contiguous() for k, v in loaded.model.state_dict().items()}
    temporary = out.with_name(f".{out.name}.tmp")
    save_file(state, str(temporary), metadata={"format": "dho-pipeline-student"})
    temporary.replace(out)
    description = {
        "format": "dho-pipeline-student", "version": 1, "architecture": loaded.architecture,
        "preprocess": loaded.preprocess.to_json(), "alpha": loaded.alpha, "beta": loaded.beta,
        "classnames": loaded.classnames, "weights": out.name, "head": loaded.head,
        "inference": "p = alpha * softmax(ce_head(f)) + (1 - alpha) * softmax(100 * kd_head(f / |f|) / beta)"
        if loaded.head == "cosine" else "p = alpha * softmax(ce_head(f)) + (1 - alpha) * softmax(kd_head(f) / beta)",
    }
    sidecar.write_text(json.dumps(description, indent=2) + "\n")
    return {"weights": str(out), "description": str(sidecar)}
