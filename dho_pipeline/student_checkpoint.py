"""Loading student checkpoints: ours, and the released DHO ones (vit_b_1.pt, vit_l_10.pt, ...).

Released checkpoints carry no architecture; their backbones were trained with OpenAI's `clip`
package, whose image towers are open_clip's OpenAI models *with QuickGELU* (same state-dict keys; the
plain-GELU models load the same weights without complaint and give different outputs). `--student`
names the architecture as the model card does (`ViT-B-16`, `ViT-L-14`, `ViT-L-14-336px`, `RN50`), or
any open_clip model; when neither the checkpoint nor the user says, it is read off the weights' shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoints import load_checkpoint_file, strip_module_prefix
from .clip_models import Preprocess, load_clip
from .errors import UserError
from .student import DualHeadStudent

# The model card's names for OpenAI CLIP towers, as open_clip models with the right activation.
CARD_ARCHITECTURES = {
    "ViT-B-16": "ViT-B-16-quickgelu",
    "ViT-B-32": "ViT-B-32-quickgelu",
    "ViT-L-14": "ViT-L-14-quickgelu",
    "ViT-L-14-336px": "ViT-L-14-336-quickgelu",
    "RN50": "RN50-quickgelu",
}


@dataclass
class LoadedStudent:
    model: DualHeadStudent
    architecture: str  # open_clip model name
    classnames: list[str]
    preprocess: Preprocess
    alpha: float
    beta: float
    checkpoint: dict  # everything else the file held (epoch, acc, our metadata)


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


def _classnames_for(path: Path, num_classes: int, meta: dict, classnames: list[str] | None) -> list[str]:
    if classnames is not None:
        names, source = classnames, "the class list given"
    elif meta.get("classnames"):
        names, source = meta["classnames"], "the checkpoint's class list"
    elif num_classes == 1000:
        from .package_data import IMAGENET_CLASSNAMES
        from .prompts import read_classnames

        names = read_classnames(IMAGENET_CLASSNAMES)
        source = "the ImageNet class list"
    else:
        raise UserError(f"checkpoint {path} has {num_classes}-class heads and no class names; pass --classnames")
    if len(names) != num_classes:
        raise UserError(f"checkpoint {path} has {num_classes}-class heads but {source} has {len(names)} names")
    return list(names)


def load_student(path: str | Path, *, student: str | None = None, classnames: list[str] | None = None) -> LoadedStudent:
    """A dual-head student from a checkpoint file, on the CPU, in eval mode."""
    path = Path(path)
    checkpoint = load_checkpoint_file(path)
    if not isinstance(checkpoint.get("model_state_dict"), dict):
        raise UserError(f"checkpoint {path} has no model_state_dict; is it a DHO student checkpoint?")
    state = strip_module_prefix(checkpoint["model_state_dict"])
    heads = ("ce_head.weight", "ce_head.bias", "kd_head.weight", "kd_head.bias")
    if not all(k in state for k in heads):
        raise UserError(f"checkpoint {path} lacks the dual heads ({', '.join(heads)})")
    meta = checkpoint.get("dho_pipeline") or {}
    recorded = (meta.get("student") or {}).get("model")
    architecture = student or recorded or detect_architecture(state)
    if architecture is None:
        raise UserError(f"checkpoint {path} does not say its architecture and its shapes are not a known one; pass --student")
    name = CARD_ARCHITECTURES.get(architecture, architecture)
    loaded = load_clip(name, "none", resize=None if recorded else "shortest")
    num_classes, feature_dim = state["ce_head.weight"].shape
    names = _classnames_for(path, num_classes, meta, classnames)
    model = DualHeadStudent(loaded.model.visual, feature_dim, num_classes)
    try:
        problems = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # same names, other shapes
        first = str(error).strip().splitlines()[-1].strip()
        raise UserError(f"checkpoint {path} does not fit {name} ({first}); pass the right --student") from None
    if problems.missing_keys or problems.unexpected_keys:
        sample = (problems.missing_keys or problems.unexpected_keys)[0]
        raise UserError(
            f"checkpoint {path} does not fit {name} ({len(problems.missing_keys)} missing, "
            f"{len(problems.unexpected_keys)} unexpected weights, e.g. {sample}); pass the right --student"
        )
    recorded_preprocess = (meta.get("student") or {}).get("preprocess")
    preprocess = loaded.preprocess
    if recorded_preprocess:
        preprocess = Preprocess(
            image_size=tuple(recorded_preprocess["image_size"]), resize_mode=recorded_preprocess["resize_mode"],
            interpolation=recorded_preprocess["interpolation"], mean=tuple(recorded_preprocess["mean"]),
            std=tuple(recorded_preprocess["std"]),
        )
    model.eval()
    return LoadedStudent(
        model=model, architecture=name, classnames=names, preprocess=preprocess,
        alpha=float(checkpoint.get("alpha", 0.5)), beta=float(checkpoint.get("beta", 0.5)), checkpoint=checkpoint,
    )

