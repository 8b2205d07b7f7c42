"""Export a student in the formats people load, each read back by predict, evaluate and calibrate (ONNX aside).

    dho-pipeline export runs/b16/student-calibrated.pt --format open_clip --out b16-dho/   # then: hf upload REPO b16-dho
    dho-pipeline export runs/b16/student-calibrated.pt --format onnx                        # student-calibrated.onnx
    dho-pipeline export runs/b16/student-calibrated.pt --format safetensors                 # .safetensors + .json

- `open_clip`: a folder in open_clip's hub layout (`open_clip.create_model_and_transforms("local-dir:FOLDER")`
  loads the student's image tower), plus the heads, alpha, beta, class names, preprocessing and a model card
  (README.md). The text tower is the one the student started from (`--text-tower` to choose another).
- `onnx`: the whole classifier, preprocessed image batch -> mixed probabilities, CE and KD logits; dynamic
  batch; alpha, beta, classes and preprocessing in the model's metadata. Needs `pip install dho-pipeline[onnx]`.
- `safetensors`: the state dict (backbone.*, ce_head.*, kd_head.*) and a JSON of everything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dho_pipeline.errors import UserError

from .shared_settings import student_setting
from .options import check_choices, setting

FORMATS = ("open_clip", "onnx", "safetensors")
SUFFIX = {"open_clip": "-open_clip", "onnx": ".onnx", "safetensors": ".safetensors"}


@dataclass(frozen=True, kw_only=True)
class Config:
    checkpoint: Path = setting(argument=True, help="Student: a checkpoint, or any export this command wrote.")
    out: Path | None = setting(None, default_text="CHECKPOINT with -open_clip, .onnx or .safetensors",
                               help="Folder (open_clip) or file to write.")
    format: str = setting("safetensors", choices=FORMATS, help="Export format.")
    student: str | None = student_setting()
    classnames: Path | None = setting(None, default_text="the checkpoint's, or ImageNet's for 1000 classes",
                                      help="Class names, one per line.")
    text_tower: str | None = setting(None, default_text="the weights the student started from",
                                     help="open_clip format: text tower weights (open_clip tag, file, or 'none').")
    metrics: Path | None = setting(None, help="open_clip format: an `evaluate --json` report to quote in the model card.")

    def destination(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        source = Path(self.checkpoint)
        stem = source.name if source.is_dir() else source.stem
        return source.with_name(stem + SUFFIX[self.format])


def run(config: Config) -> dict:
    from dho_pipeline import exports
    from dho_pipeline.prompts import read_classnames
    from dho_pipeline.student_checkpoint import load_student

    check_choices(config)  # --format, given through Python rather than click
    classnames = read_classnames(config.classnames) if config.classnames else None
    source = Path(config.checkpoint)
    loaded = load_student(source, student=config.student, classnames=classnames)
    out = config.destination()
    if out.resolve() == source.resolve():
        raise UserError(f"--out {out} is the student being exported; choose another")
    if config.format == "safetensors":
        return exports.write_safetensors(loaded, source, out)
    if config.format == "onnx":
        return exports.write_onnx(loaded, out)
    return _open_clip(config, loaded, source, out)


def _open_clip(config: Config, loaded, source: Path, out: Path) -> dict:
    from dho_pipeline import exports
    from dho_pipeline.jsonfiles import read_json
    from dho_pipeline.model_card import model_card

    checkpoint = exports.with_metadata(loaded, source)
    text_weights = config.text_tower or checkpoint.metadata.pretrained
    evaluation = read_json(config.metrics, "evaluation report", "write one with `dho-pipeline evaluate --json > FILE`") \
        if config.metrics else None
    if evaluation is not None and not (isinstance(evaluation, dict) and "mix" in evaluation):
        raise UserError(f"evaluation report {config.metrics} is not an `evaluate --json` report")
    # The card names the text tower before the folder exists; writing the folder checks it loads.
    clip_name = loaded.architecture
    card = model_card(name=out.name, checkpoint_path=source, checkpoint=checkpoint, architecture=clip_name,
                      text_tower={"model": clip_name, "weights": text_weights}, evaluation=evaluation)
    return exports.write_open_clip_folder(loaded, source, out, text_weights=text_weights, card=card)
