"""Student checkpoints: one schema for the file `train` writes, `calibrate` rewrites and every command reads.

The file is the released DHO format (the model card's): a `torch.save` dict with `model_state_dict`
(keys `backbone.*`, `ce_head.weight/bias`, `kd_head.weight/bias`, possibly prefixed `module.`),
`epoch`, `acc`, `alpha` and `beta`. Ours adds the key `dho_pipeline`: `StudentMetadata` as plain
JSON-like values (architecture and preprocessing, class names and templates, the training config, the
fingerprints of cache, manifest and split, the labeled keys, what it was calibrated on), so the file
still loads with `torch.load(..., weights_only=True)` and with the model card's own code.

Released checkpoints (vit_b_1.pt, vit_l_10.pt, ...) carry no metadata and no architecture; their
backbones were trained with OpenAI's `clip` package, whose image towers are open_clip's OpenAI models
*with QuickGELU* (same state-dict keys; the plain-GELU models load the same weights without complaint
and give different outputs). `--student` names the architecture as the model card does (`ViT-B-16`,
`ViT-L-14`, `ViT-L-14-336px`, `RN50`), or any open_clip model; when neither the checkpoint nor the user
says, it is read off the weights' shapes.

The metadata names the backbone's family (open_clip or timm, dho_pipeline.backbones) and head kind
(cosine or linear); files written before those fields existed mean open_clip with cosine heads.
`student_from_checkpoint` builds the recorded backbone (random init) and loads the file's weights into it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints import load_checkpoint_file, load_exactly, save_atomically, strip_module_prefix
from .backbones import FAMILIES, StudentSpec, build_backbone, default_head
from .clip_models import Preprocess
from .errors import UserError
from .student import HEADS, PAPER_ALPHA_BETA, DualHeadStudent

FORMAT = "dho-pipeline-student"
VERSION = 1
HEAD_KEYS = ("ce_head.weight", "ce_head.bias", "kd_head.weight", "kd_head.bias")

# The model card's names for OpenAI CLIP towers, as open_clip models with the right activation.
CARD_ARCHITECTURES = {
    "ViT-B-16": "ViT-B-16-quickgelu",
    "ViT-B-32": "ViT-B-32-quickgelu",
    "ViT-L-14": "ViT-L-14-quickgelu",
    "ViT-L-14-336px": "ViT-L-14-336-quickgelu",
    "RN50": "RN50-quickgelu",
}


@dataclass(frozen=True, kw_only=True)
class StudentMetadata:
    """What dho-pipeline records beside the released fields (the payload's `dho_pipeline` key)."""

    model: str  # the backbone's model name within its family (open_clip name, or timm name with tag)
    pretrained: str  # the weights it started from
    preprocess: Preprocess
    classnames: list[str]
    templates: list[str]
    config: dict  # the training run's resolved config, as JSON
    cache_fingerprint: str | None  # None: trained with the teacher online
    manifest_fingerprint: str
    split_fingerprint: str
    steps: int
    finished: bool
    labeled_keys: list[str]  # so that `calibrate` can refuse images the student was trained on as labeled
    calibrated_on: dict | None = None  # set by `calibrate`: data, split, sample count, overlap
    # Added after version 1's first files, which lack them and mean open_clip with cosine heads.
    family: str = "open_clip"  # backbones.FAMILIES: how `model` is built
    head: str = "cosine"  # student.HEADS

    def to_payload(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION,
            "student": {"model": self.model, "pretrained": self.pretrained, "preprocess": self.preprocess.to_json(),
                        "family": self.family, "head": self.head},
            "classnames": list(self.classnames), "templates": list(self.templates), "config": self.config,
            "cache_fingerprint": self.cache_fingerprint, "manifest_fingerprint": self.manifest_fingerprint,
            "split_fingerprint": self.split_fingerprint, "steps": self.steps, "finished": self.finished,
            "labeled_keys": list(self.labeled_keys), "calibrated_on": self.calibrated_on,
        }

    @classmethod
    def minimal(cls, *, model: str, preprocess: Preprocess, classnames: list[str], source: str,
                pretrained: str = "openai", family: str = "open_clip", head: str = "cosine") -> "StudentMetadata":
        """Metadata for a student whose file carries none (a released checkpoint), as an export records it:
        architecture, preprocessing, classes and heads resolved; the training facts unknown (empty)."""
        return cls(model=model, pretrained=pretrained, preprocess=preprocess, classnames=list(classnames), templates=[],
                   config={"source": source}, cache_fingerprint=None, manifest_fingerprint="unknown",
                   split_fingerprint="unknown", steps=0, finished=True, labeled_keys=[], family=family, head=head)

    @classmethod
    def from_payload(cls, raw, path: Path) -> "StudentMetadata":
        where = f"checkpoint {path}: its dho_pipeline metadata"
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise UserError(f"{where} is not dho-pipeline's; was the file written by another tool?")
        if raw.get("version") != VERSION:
            raise UserError(f"{where} has version {raw.get('version')!r}; this tool reads version {VERSION}")
        try:
            student = raw["student"]
            metadata = cls(
                model=student["model"], pretrained=student["pretrained"],
                preprocess=Preprocess.from_json(student["preprocess"]), classnames=raw["classnames"],
                templates=raw["templates"], config=raw["config"], cache_fingerprint=raw["cache_fingerprint"],
                manifest_fingerprint=raw["manifest_fingerprint"], split_fingerprint=raw["split_fingerprint"],
                steps=raw["steps"], finished=raw["finished"], labeled_keys=raw["labeled_keys"],
                calibrated_on=raw["calibrated_on"], family=student.get("family", "open_clip"),
                head=student.get("head", "cosine"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise UserError(f"{where} is malformed ({type(error).__name__}: {error})") from None
        if metadata.family not in FAMILIES or metadata.head not in HEADS:
            raise UserError(f"{where} names an unknown backbone family {metadata.family!r} or head {metadata.head!r}")
        if not (isinstance(metadata.model, str) and _strings(metadata.classnames) and _strings(metadata.labeled_keys)):
            raise UserError(f"{where} is malformed (model, classnames or labeled_keys of the wrong type)")
        return metadata


@dataclass(frozen=True, kw_only=True)
class StudentCheckpoint:
    """A student checkpoint file: the released DHO fields, plus our metadata (None for a released file)."""

    state_dict: dict[str, torch.Tensor]  # backbone.*, ce_head.*, kd_head.* (no `module.` prefix)
    epoch: int
    acc: float | None  # the mix's top-1 where known (evaluation during training, or calibration)
    alpha: float
    beta: float
    metadata: StudentMetadata | None

    def to_payload(self) -> dict:
        payload = {"model_state_dict": self.state_dict, "epoch": self.epoch, "acc": self.acc,
                   "alpha": self.alpha, "beta": self.beta}
        if self.metadata is not None:
            payload["dho_pipeline"] = self.metadata.to_payload()
        return payload

    @classmethod
    def from_payload(cls, payload: dict, path: Path) -> "StudentCheckpoint":
        if not isinstance(payload.get("model_state_dict"), dict):
            raise UserError(f"checkpoint {path} has no model_state_dict; is it a DHO student checkpoint?")
        state = strip_module_prefix(payload["model_state_dict"])
        if not all(isinstance(state.get(k), torch.Tensor) for k in HEAD_KEYS):
            raise UserError(f"checkpoint {path} lacks the dual heads ({', '.join(HEAD_KEYS)})")
        alpha, beta = (payload.get(name, default) for name, default in zip(("alpha", "beta"), PAPER_ALPHA_BETA))
        if not (_number(alpha) and _number(beta)) or not 0 <= float(alpha) <= 1 or float(beta) <= 0:
            raise UserError(f"checkpoint {path}: alpha must be a number in [0, 1] and beta a positive number")
        metadata = payload.get("dho_pipeline")
        return cls(
            state_dict=state, epoch=int(payload.get("epoch") or 0),
            acc=float(payload["acc"]) if _number(payload.get("acc")) else None,
            alpha=float(alpha), beta=float(beta),
            metadata=None if metadata is None else StudentMetadata.from_payload(metadata, path),
        )

    @classmethod
    def load(cls, path: str | Path) -> "StudentCheckpoint":
        """Read a checkpoint (ours or a released one) safely: weights_only, every fault one line."""
        return cls.from_payload(load_checkpoint_file(path), Path(path))

    def save(self, path: str | Path) -> None:
        """Write whole or not at all (temporary name, then rename)."""
        save_atomically(self.to_payload(), Path(path))

    def calibrated(self, *, alpha: float, beta: float, acc: float, calibrated_on: dict) -> "StudentCheckpoint":
        """The same student with a chosen head mix, recording what it was chosen on."""
        metadata = self.metadata and dataclasses.replace(self.metadata, calibrated_on=calibrated_on)
        return dataclasses.replace(self, alpha=alpha, beta=beta, acc=acc, metadata=metadata)

    @property
    def labeled_keys(self) -> set[str]:
        """Keys the student was trained on as labeled (empty for a released checkpoint: unknown)."""
        return set(self.metadata.labeled_keys) if self.metadata else set()


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _strings(values) -> bool:
    return isinstance(values, list) and all(isinstance(v, str) for v in values)


@dataclass
class LoadedStudent:
    """A student ready to run: the model (CPU, eval mode) and everything needed to feed and read it."""

    model: DualHeadStudent
    architecture: str  # as --student names it: an open_clip model name, or timm:NAME
    classnames: list[str]
    preprocess: Preprocess
    alpha: float
    beta: float
    checkpoint: StudentCheckpoint

    @property
    def head(self) -> str:  # student.HEADS
        return self.model.head


def detect_architecture(state: dict) -> str | None:
    """The OpenAI CLIP tower whose shapes these backbone weights have, or None."""
    conv = state.get("backbone.conv1.weight")
    positions = state.get("backbone.positional_embedding")
    if conv is not None and positions is not None and conv.ndim == 4:
        width, patch, tokens = conv.shape[0], conv.shape[-1], positions.shape[0]
        return {
            (768, 16, 197): "ViT-B-16", (768, 32, 50): "ViT-B-32",
            (1024, 14, 257): "ViT-L-14", (1024, 14, 577): "ViT-L-14-336px",
        }.get((width, patch, tokens))
    if "backbone.attnpool.positional_embedding" in state and "backbone.layer4.2.conv3.weight" in state:
        return "RN50" if "backbone.layer3.5.conv3.weight" in state and "backbone.layer3.6.conv3.weight" not in state else None
    return None


def _classnames_for(path: Path, num_classes: int, metadata: StudentMetadata | None,
                    classnames: list[str] | None) -> list[str]:
    if classnames is not None:
        names, source = classnames, "the class list given"
    elif metadata is not None:
        names, source = metadata.classnames, "the checkpoint's class list"
    elif num_classes == 1000:
        from .package_data import IMAGENET_CLASSNAMES
        from .prompts import read_classnames

        names, source = read_classnames(IMAGENET_CLASSNAMES), "the ImageNet class list"
    else:
        raise UserError(f"checkpoint {path} has {num_classes}-class heads and no class names; pass --classnames")
    if len(names) != num_classes:
        raise UserError(f"checkpoint {path} has {num_classes}-class heads but {source} has {len(names)} names")
    return list(names)


def load_student(path: str | Path, *, student: str | None = None, classnames: list[str] | None = None) -> LoadedStudent:
    """A dual-head student from a checkpoint file, on the CPU, in eval mode."""
    path = Path(path)
    return student_from_checkpoint(read_student(path), path, student=student, classnames=classnames)


def student_from_checkpoint(checkpoint: StudentCheckpoint, path: Path, *, student: str | None = None,
                            classnames: list[str] | None = None) -> LoadedStudent:
    """Build the architecture a checkpoint records (or `student` names, or its weights' shapes show) and
    load its weights. `path` only names the checkpoint in messages."""
    state, metadata = checkpoint.state_dict, checkpoint.metadata
    if student is not None:
        spec = StudentSpec.parse(CARD_ARCHITECTURES.get(student, student))
    elif metadata is not None:
        spec = StudentSpec(metadata.family, metadata.model)
    else:
        detected = detect_architecture(state)
        if detected is None:
            raise UserError(f"checkpoint {path} does not say its architecture and its shapes are not a known one; pass --student")
        spec = StudentSpec.parse(CARD_ARCHITECTURES[detected])
    head = metadata.head if metadata else default_head(spec.family)
    # Released files (no metadata) came from OpenAI's CLIP: resize the shortest side and centre-crop.
    backbone = build_backbone(str(spec), "none", resize=None if metadata else "shortest")
    num_classes, feature_dim = state["ce_head.weight"].shape
    names = _classnames_for(path, num_classes, metadata, classnames)
    model = DualHeadStudent(backbone.module, feature_dim, num_classes, head=head)
    load_exactly(model, state, f"checkpoint {path} does not fit {spec}", "; pass the right --student")
    model.eval()
    return LoadedStudent(
        model=model, architecture=str(spec), classnames=names,
        preprocess=metadata.preprocess if metadata else backbone.preprocess,
        alpha=checkpoint.alpha, beta=checkpoint.beta, checkpoint=checkpoint,
    )


# ---- reading any student file: checkpoints and what `export` writes ------------------------------------

EXPORT_FORMAT = "dho-pipeline-student-export"
OPEN_CLIP_CONFIG = "open_clip_config.json"  # open_clip's hub layout (open_clip.constants)
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
HEADS_FILE = "dho_heads.safetensors"
DESCRIPTION_FILE = "dho_student.json"
FORMATS_TAKEN = ("a student checkpoint (.pt: ours or a released DHO one), an open_clip export folder "
                 "(`export --format open_clip`), or a .safetensors export with its .json (`export --format safetensors`)")


def export_description(checkpoint: StudentCheckpoint, **fields) -> dict:
    """The JSON that travels with exported weights: the checkpoint's released fields and our metadata, so that
    reading the export gives back the same StudentCheckpoint (the weights aside)."""
    description = {"format": EXPORT_FORMAT, "version": VERSION, **fields, "alpha": checkpoint.alpha,
                   "beta": checkpoint.beta, "epoch": checkpoint.epoch, "acc": checkpoint.acc}
    if checkpoint.metadata is not None:
        description["dho_pipeline"] = checkpoint.metadata.to_payload()
    return description


def read_student(path: str | Path) -> StudentCheckpoint:
    """The student in any file we run: a checkpoint, an open_clip export folder, or a .safetensors export
    (given as its .safetensors or its .json). Anything else is refused, naming the formats taken."""
    path = Path(path)
    if path.is_dir():
        if (path / DESCRIPTION_FILE).is_file() and (path / OPEN_CLIP_CONFIG).is_file():
            return _read_open_clip_folder(path)
        raise UserError(f"{path} is a folder but not an open_clip export of a student (no {DESCRIPTION_FILE} and "
                        f"{OPEN_CLIP_CONFIG}); this command takes {FORMATS_TAKEN}")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    kind = _sniff(path)
    if kind == "torch":
        return StudentCheckpoint.load(path)
    if kind == "safetensors":
        return _read_safetensors_export(path.with_suffix(".json"), weights=path)
    if kind == "json":
        return _read_safetensors_export(path)
    what = "an ONNX model (run it with onnxruntime)" if path.suffix == ".onnx" else "not a student file this tool reads"
    raise UserError(f"{path} is {what}; this command takes {FORMATS_TAKEN}")


def _sniff(path: Path) -> str | None:
    """Which format a file holds, from its first bytes (names can lie)."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch.save's zip, or a legacy pickle
        return "torch"
    if len(head) >= 10 and head[8:9] == b"{":  # safetensors: an 8-byte header length, then the JSON header
        return "safetensors"
    if head.lstrip()[:1] == b"{":
        return "json"
    return None


def _read_description(path: Path) -> dict:
    from .jsonfiles import read_json

    description = read_json(path, "export description", "export the student again with `dho-pipeline export`")
    if not isinstance(description, dict) or description.get("format") not in (EXPORT_FORMAT, FORMAT):
        raise UserError(f"{path} is not a dho-pipeline export description; this command takes {FORMATS_TAKEN}")
    return description


def _read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; export the student again")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{what} {path} is not a readable safetensors file ({error})") from None


def _from_description(description: dict, state: dict, path: Path, model: str | None = None) -> StudentCheckpoint:
    """A StudentCheckpoint from exported weights and their description; `model` overrides the architecture
    to build (an open_clip folder is its own architecture)."""
    payload = {"model_state_dict": state, **{k: description[k] for k in ("alpha", "beta", "epoch", "acc") if k in description}}
    metadata = description.get("dho_pipeline")
    if metadata is None and {"architecture", "preprocess", "classnames"} <= set(description):
        # a description of the first export version: architecture, preprocessing and classes only
        try:
            metadata = StudentMetadata.minimal(
                model=description["architecture"], preprocess=Preprocess.from_json(description["preprocess"]),
                classnames=description["classnames"], source=f"export {path}").to_payload()
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"export description {path} is malformed ({type(error).__name__}: {error})") from None
    if metadata is not None:
        payload["dho_pipeline"] = metadata if model is None else {**metadata, "student": {**metadata["student"], "model": model}}
    return StudentCheckpoint.from_payload(payload, path)


def _read_safetensors_export(description_path: Path, weights: Path | None = None) -> StudentCheckpoint:
    description = _read_description(description_path)
    if weights is None:
        weights = description_path.with_name(str(description.get("weights", description_path.with_suffix(".safetensors").name)))
    return _from_description(description, _read_safetensors(weights, "exported weights"), description_path)


def _read_open_clip_folder(folder: Path) -> StudentCheckpoint:
    """The image tower is the CLIP's `visual.*`; the heads are beside it. The folder is its own architecture
    (`local-dir:FOLDER`, open_clip's own loader), so it runs wherever it is copied."""
    description = _read_description(folder / DESCRIPTION_FILE)
    clip_state = _read_safetensors(folder / OPEN_CLIP_WEIGHTS, "open_clip weights")
    state = {"backbone." + k[len("visual."):]: v for k, v in clip_state.items() if k.startswith("visual.")}
    state.update(_read_safetensors(folder / HEADS_FILE, "head weights"))
    if not any(k.startswith("backbone.") for k in state):
        raise UserError(f"open_clip weights {folder / OPEN_CLIP_WEIGHTS} hold no image tower (visual.*)")
    return _from_description(description, state, folder, model=f"local-dir:{folder.resolve()}")
