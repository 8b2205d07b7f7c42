"""Student backbones: an image tower from normalised images to pooled features, built from a name.

Two families, named by `--student`:
- **open_clip** (the ImageNet form): `ViT-B-16-quickgelu`, an open_clip model-config JSON, `local-dir:...`;
  `--pretrained` an open_clip tag (`openai`), a weights file, or `none` (clip_models.load_clip). The
  backbone is the CLIP image tower; its text tower initialises the heads.
- **timm** (`timm:resnet18`, `timm:mobilenetv2_100`, `timm:convnext_tiny`, any timm name, optionally with
  its tag: `timm:resnet18.tv_in1k`): built with `num_classes=0`, so the classifier is removed and the
  forward returns pooled features. `--pretrained` is a timm tag (`tv_in1k`), `default` (timm's default tag
  for the name), a local weights file (.pth, .bin, .safetensors; a classifier in it is dropped), or `none`.
  Preprocessing comes from timm's data config of those weights: input size, mean/std, interpolation, and
  crop_pct as the evaluation view's centre crop. There is no text tower.

A tag's weights are taken from the local Hugging Face cache (or torch hub's, for URL-only weights); when
they are not there and the hub cannot be reached, building fails at once with one line that says how to
pass a local file, instead of retrying for minutes.

Both `train` (building a student to train) and `student_checkpoint.load_student` (building the
architecture a checkpoint records, with `pretrained="none"`, before loading its weights) build here.
"""

from __future__ import annotations

import difflib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from . import hub
from .clip_models import LoadedClip, Preprocess, load_clip
from .errors import UserError
from .hashing import weights_fingerprint

FAMILIES = ("open_clip", "timm")
TIMM_PREFIX = "timm:"
# The weights files a timm model repository on the Hugging Face hub holds, in timm's order of preference.
_TIMM_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class StudentSpec:
    """Which backbone: its family and its name within the family."""

    family: str  # "open_clip" or "timm"
    name: str

    @classmethod
    def parse(cls, text: str) -> "StudentSpec":
        """`timm:NAME` is a timm model; anything else is open_clip's."""
        if text.startswith(TIMM_PREFIX):
            name = text[len(TIMM_PREFIX):]
            if not name:
                raise UserError("--student timm: needs a model name, e.g. timm:resnet18")
            return cls("timm", name)
        return cls("open_clip", text)

    def __str__(self) -> str:
        return f"{TIMM_PREFIX}{self.name}" if self.family == "timm" else self.name


def default_pretrained(student: str) -> str:
    """Weights a student starts from when none are named: OpenAI's for CLIP towers, timm's default tag."""
    return "default" if StudentSpec.parse(student).family == "timm" else "openai"


def default_head(family: str) -> str:
    """The heads each family has in the paper: cosine (ImageNet, CLIP students), linear (few-shot, timm CNNs)."""
    return "linear" if family == "timm" else "cosine"


@dataclass
class Backbone:
    spec: StudentSpec
    pretrained: str  # as given
    module: torch.nn.Module  # normalised images [B, 3, H, W] -> features [B, feature_dim]
    feature_dim: int | None  # None: known only from the text tower (some open_clip towers)
    preprocess: Preprocess
    weights_fingerprint: str
    clip: LoadedClip | None = None  # open_clip: the whole CLIP model, whose text tower initialises the heads


def build_backbone(student: str, pretrained: str, *, seed: int = 0, resize: str | None = None) -> Backbone:
    """A student backbone on the CPU in fp32: `student` as `--student` takes it (see the module doc).

    `resize` overrides an open_clip model's resize mode (released checkpoints: "shortest")."""
    spec = StudentSpec.parse(student)
    if spec.family == "timm":
        return _timm_backbone(spec, pretrained, seed)
    loaded = load_clip(spec.name, pretrained, resize=resize, seed=seed)
    return Backbone(spec=spec, pretrained=pretrained, module=loaded.model.visual,
                    feature_dim=getattr(loaded.model.visual, "output_dim", None), preprocess=loaded.preprocess,
                    weights_fingerprint=loaded.weights_fingerprint, clip=loaded)


# ---- timm -------------------------------------------------------------------------------------------


def _timm():
    import timm

    return timm


def _check_timm_name(name: str) -> None:
    timm = _timm()
    if not timm.is_model(name):
        base = name.split(".", 1)[0]
        close = difflib.get_close_matches(base, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown timm model {name!r}{hint}; see timm.list_models()")


def _known_tags(name: str) -> list[str]:
    base = name.split(".", 1)[0]
    return [tagged.split(".", 1)[1] for tagged in _timm().list_pretrained(f"{base}.*")]


def resolve_timm_weights(name: str, pretrained: str) -> tuple[str, str | None]:
    """(timm model name to build, local weights file or None), downloading only when the hub is reachable."""
    timm = _timm()
    _check_timm_name(name)
    if pretrained == "none":
        return name, None
    if os.path.isfile(pretrained):
        return name, pretrained
    if "." in name:  # the name carries its tag (resnet18.tv_in1k)
        if pretrained not in ("default", name.split(".", 1)[1]):
            raise UserError(f"timm:{name} names its weights already; drop the tag or --pretrained {pretrained}")
        tagged = name
    else:
        tagged = name if pretrained == "default" else f"{name}.{pretrained}"
    try:
        cfg = timm.models.get_pretrained_cfg(tagged)
    except RuntimeError:  # an unknown tag
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        tags = _known_tags(name)
        known = f"known tags: {', '.join(tags)}" if tags else "it has no pretrained weights in timm"
        raise UserError(f"--pretrained {pretrained!r} is neither a file nor a timm tag of {name} ({known}); "
                        "pass a weights file, a tag, 'default' or 'none'")
    what = f"weights for timm:{tagged}"
    if not cfg.hf_hub_id:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)  # where timm keeps them
        if cached.is_file():
            return tagged, str(cached)
        from timm.models._hub import download_cached_file

        return tagged, hub.download_from_url(cfg.url, lambda: download_cached_file(cfg.url), what=what)
    candidates = ([cfg.hf_hub_filename] if cfg.hf_hub_filename else []) + list(_TIMM_HUB_FILES)
    return tagged, hub.download_from_hub(cfg.hf_hub_id, candidates, what=what, library_name="timm")


def _timm_preprocess(model) -> Preprocess:
    cfg = _timm().data.resolve_model_data_config(model)
    _, height, width = cfg["input_size"]
    resize_mode = "squash" if cfg.get("crop_mode") == "squash" else "shortest"  # recorded; timm's "border" is neither
    return Preprocess(image_size=(int(height), int(width)), resize_mode=resize_mode,
                      interpolation=str(cfg["interpolation"]), mean=tuple(float(v) for v in cfg["mean"]),
                      std=tuple(float(v) for v in cfg["std"]), crop_fraction=float(cfg.get("crop_pct") or 1.0))


def _load_timm_weights(model, name: str, path: str) -> None:
    """Load a weights file into a classifier-less timm model, every weight accounted for.

    timm's own pretrained loader loads non-strictly once the classifier is removed (weights of another
    architecture would leave the model silently random), so the file is loaded here: timm's reader
    (safetensors or torch.load with weights_only; `state_dict` / `model` / EMA wrappers and `module.`
    prefixes undone), the classifier's weights dropped, and everything else must fit.
    """
    from timm.models import load_state_dict

    from .checkpoints import load_exactly

    try:
        state = load_state_dict(path)
    except pickle.UnpicklingError:  # weights_only refused it: the file holds code
        raise UserError(f"weights file {path} holds pickled objects that could run code, refused; use a plain "
                        "state-dict or safetensors file") from None
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise UserError(f"weights file {path} cannot be read ({first})") from None
    classifier = model.pretrained_cfg.get("classifier") or ()
    prefixes = tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier))
    state = {k: v for k, v in state.items() if not (prefixes and k.startswith(prefixes))}
    load_exactly(model, state, f"weights file {path} does not fit timm:{name}")


def _timm_backbone(spec: StudentSpec, pretrained: str, seed: int) -> Backbone:
    timm = _timm()
    name, weights = resolve_timm_weights(spec.name, pretrained)
    # Random init must be identical in every process (ranks of one run, and reruns). The model is built
    # from the (tagged) name, so that its data config is that of the weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = timm.create_model(name, pretrained=False, num_classes=0)
        except Exception as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            raise UserError(f"cannot build timm:{name} ({first})") from None
    if weights:
        _load_timm_weights(model, name, weights)
    model.eval()
    feature_dim = getattr(model, "head_hidden_size", None) or model.num_features
    # The name built (with the tag whose weights were loaded) is what a checkpoint records, so that the
    # architecture is rebuilt from the same timm config.
    return Backbone(spec=StudentSpec("timm", name), pretrained=pretrained, module=model, feature_dim=int(feature_dim),
                    preprocess=_timm_preprocess(model),
                    weights_fingerprint=weights_fingerprint(weights) if weights else f"random-init:seed={seed}")
