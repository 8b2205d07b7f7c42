"""Writing a student in the formats people load: safetensors + JSON, an open_clip hub folder, ONNX.

Every format carries what is needed to use the student (architecture or graph, preprocessing, alpha, beta,
class names) and, except ONNX, everything our checkpoint records, so `predict`, `evaluate` and `calibrate`
read them back (student_checkpoint.read_student). Files are written under a temporary name and renamed,
with ordinary permissions (0644 under the usual umask; safetensors alone would write 0600).

The open_clip folder is open_clip's hub layout: `open_clip_config.json` (model_cfg, preprocess_cfg) and
`open_clip_model.safetensors`, a whole CLIP, since open_clip loads strictly: the student's image tower as
`visual.*`, and a text tower, by default the one of the weights the student started from (the student never
trained it; with the fine-tuned image tower its zero-shot use is not what DHO measures). Beside them:
`dho_heads.safetensors` (ce_head, kd_head), `dho_student.json` (alpha, beta, classes, preprocessing, our
metadata), `classnames.txt` and a model card `README.md`, so the folder is ready for `hf upload`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .errors import UserError
from .jsonfiles import atomic_path, write_text_atomically
from .student import KD_LOGITS, inference
from .student_checkpoint import (
    DESCRIPTION_FILE, HEADS_FILE, OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, LoadedStudent, StudentMetadata,
    export_description,
)

# The KD head's logits and the mix, by head kind (student.HEADS): cosine for CLIP students, linear for timm's.
ONNX_OUTPUTS = ("probs", "ce_logits", "kd_logits")


def _umask_mode() -> int:
    """The mode an ordinary new file gets here (0644 under umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _save_safetensors(state: dict, path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    try:
        with atomic_path(path) as temporary:
            save_file({k: v.detach().contiguous() for k, v in state.items()}, str(temporary), metadata=metadata)
            os.chmod(temporary, _umask_mode())  # safetensors creates files 0600
    except OSError as error:
        raise UserError(f"writing {path} failed ({error}); is the disk full?") from None


def with_metadata(loaded: LoadedStudent, source: Path):
    """The loaded student's checkpoint, with metadata filled in for a file that carries none (a released
    checkpoint): what was resolved to load it, so that the export loads back alone."""
    checkpoint = loaded.checkpoint
    if checkpoint.metadata is not None:
        return checkpoint
    import dataclasses

    from .backbones import StudentSpec

    spec = StudentSpec.parse(loaded.architecture)  # `timm:NAME` -> family timm, model NAME
    metadata = StudentMetadata.minimal(model=spec.name, family=spec.family, head=loaded.head,
                                       preprocess=loaded.preprocess, classnames=loaded.classnames,
                                       source=f"released checkpoint {source.name}")

    return dataclasses.replace(checkpoint, metadata=metadata)


def _description(loaded: LoadedStudent, source: Path, **fields) -> dict:
    return export_description(with_metadata(loaded, source), architecture=loaded.architecture,
                              preprocess=loaded.preprocess.to_json(), classnames=loaded.classnames,
                              head=loaded.head, inference=inference(loaded.head), **fields)


# ---- safetensors + JSON ------------------------------------------------------------------------------------


def write_safetensors(loaded: LoadedStudent, source: Path, out: Path) -> dict:
    """`out` (backbone.*, ce_head.*, kd_head.*) and `out` with .json (everything else)."""
    sidecar = out.with_suffix(".json")
    _save_safetensors(loaded.model.state_dict(), out, metadata={"format": "dho-pipeline-student"})
    write_text_atomically(sidecar, json.dumps(_description(loaded, source, weights=out.name), indent=2) + "\n")
    return {"weights": str(out), "description": str(sidecar)}


# ---- open_clip hub folder ----------------------------------------------------------------------------------


def open_clip_with_student_tower(loaded: LoadedStudent, text_weights: str):
    """A whole open_clip CLIP of the student's architecture: its image tower the student's backbone (loaded
    strictly), its text tower from `text_weights` (a tag, a file, or 'none')."""
    from .clip_models import load_clip

    if loaded.architecture.startswith("timm:"):
        raise UserError(f"{loaded.architecture} is a timm student: an open_clip folder holds CLIP towers only; "
                        "use --format onnx or safetensors")
    try:
        clip = load_clip(loaded.architecture, text_weights)
    except UserError as error:
        raise UserError(f"the text tower for the open_clip folder: {error}; or choose it with --text-tower "
                        "(a weights file, a tag, or 'none' for a random one)") from None
    backbone = {k[len("backbone."):]: v for k, v in loaded.model.state_dict().items() if k.startswith("backbone.")}
    try:
        clip.model.visual.load_state_dict(backbone, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0][:200]
        raise UserError(f"the student's backbone is not the image tower of open_clip's {clip.name} ({first}); "
                        "use --format onnx or safetensors") from None
    return clip


def write_open_clip_folder(loaded: LoadedStudent, source: Path, folder: Path, *, text_weights: str, card: str) -> dict:
    """The folder, written under a temporary name and renamed into place (an existing one is replaced)."""
    import open_clip

    clip = open_clip_with_student_tower(loaded, text_weights)
    p = loaded.preprocess
    config = {
        "model_cfg": open_clip.get_model_config(clip.name),
        "preprocess_cfg": {"mean": list(p.mean), "std": list(p.std), "interpolation": p.interpolation,
                           "resize_mode": p.resize_mode},
    }
    heads = {k: v for k, v in loaded.model.state_dict().items() if k.startswith(("ce_head.", "kd_head."))}
    text_tower = {"weights": text_weights, "model": clip.name, "weights_fingerprint": clip.weights_fingerprint}
    folder = Path(folder)
    temporary = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        temporary.mkdir(parents=True)
        _save_safetensors(clip.model.state_dict(), temporary / OPEN_CLIP_WEIGHTS)
        _save_safetensors(heads, temporary / HEADS_FILE, metadata={"format": "dho-pipeline-student-heads"})
        write_text_atomically(temporary / OPEN_CLIP_CONFIG, json.dumps(config, indent=2) + "\n")
        description = _description(loaded, source, text_tower=text_tower, open_clip_config=OPEN_CLIP_CONFIG,
                                   open_clip_weights=OPEN_CLIP_WEIGHTS, heads=HEADS_FILE)
        write_text_atomically(temporary / DESCRIPTION_FILE, json.dumps(description, indent=2) + "\n")
        write_text_atomically(temporary / "classnames.txt", "".join(f"{name}\n" for name in loaded.classnames))
        write_text_atomically(temporary / "README.md", card)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(temporary, folder)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return {"folder": str(folder), "text_tower": text_tower}


# ---- ONNX ---------------------------------------------------------------------------------------------------


class _AllOutputs(torch.nn.Module):
    """image -> (mixed probabilities, CE logits, KD logits)."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, image):
        return self.classifier.outputs(image)


def write_onnx(loaded: LoadedStudent, out: Path, *, opset: int | None = None) -> dict:
    """The whole classifier as one ONNX file: input `image` [batch, 3, H, W] (preprocessed), outputs `probs`,
    `ce_logits`, `kd_logits`, batch dynamic; alpha, beta, classes and preprocessing in its metadata."""
    import importlib.util

    if not all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript")):  # torch's exporter needs both
        raise UserError("--format onnx needs onnx and onnxscript: pip install 'dho-pipeline[onnx]'")
    import onnx

    from .classifier import classifier_of

    model = _AllOutputs(classifier_of(loaded)).eval()
    height, width = loaded.preprocess.image_size
    example = torch.zeros(2, 3, height, width)  # a batch of 2, so the exporter does not specialise on 1
    with atomic_path(out) as temporary:
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(
                model, (example,), dynamo=True, external_data=False, opset_version=opset, input_names=["image"],
                output_names=list(ONNX_OUTPUTS), dynamic_shapes={"image": {0: torch.export.Dim("batch")}},
            )
        proto = program.model_proto
        metadata = {"dho_pipeline": json.dumps({
            "format": "dho-pipeline-student-onnx", "architecture": loaded.architecture, "alpha": loaded.alpha,
            "beta": loaded.beta, "classnames": loaded.classnames, "preprocess": loaded.preprocess.to_json(),
            "inputs": "image: float32 [batch, 3, H, W], the view `preprocess` describes (centred square of crop_fraction "
                      "of the shorter side, resized), then (x/255 - mean)/std",
            "outputs": {"probs": inference(loaded.head), "ce_logits": "ce_head(f)", "kd_logits": KD_LOGITS[loaded.head]},
        })}
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save_model(proto, str(temporary))
        os.chmod(temporary, _umask_mode())
    return {"onnx": str(out), "opset": program.model_proto.opset_import[0].version}


class _quiet_exporter:
    """The dynamo exporter prints its progress ("[torch.onnx] Obtain model graph ...") to stdout."""

    def __enter__(self):
        import contextlib
        import io

        self._redirect = contextlib.redirect_stdout(io.StringIO())
        self._redirect.__enter__()

    def __exit__(self, *exc):
        return self._redirect.__exit__(*exc)
