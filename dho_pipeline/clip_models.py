"""Loading open_clip models (teachers and students) by name, config file or local weights, offline-safe.

- `model`: an open_clip model name (`ViT-H-14-378-quickgelu`), the path of an open_clip model-config
  JSON file (registered under its file stem), or `local-dir:`/`hf-hub:` as open_clip understands them.
  The tiny configs in `dho_pipeline/model_configs/` are always registered.
- `pretrained`: an open_clip tag (`dfn5b`, `openai`), a local weights file (the demo's compact files
  `dho_pipeline/demo/weights/*.safetensors` included, expanded in memory), or `none` (random init,
  seeded, for tests).

Weights for a tag are taken from the local Hugging Face cache when present, else downloaded with
huggingface_hub, which honours HF_HUB_OFFLINE, HTTPS_PROXY / NO_PROXY and HF_HOME. One short metadata
request (HF_HUB_ETAG_TIMEOUT seconds, default 10) comes first: when the hub cannot be reached, or
HF_HUB_OFFLINE is set, loading fails at once with a one-line error naming the `hf download` command,
instead of huggingface_hub's minutes of retries for a file it cannot find.

Preprocessing follows the weights' own (DFN5B: squash-resize to 378, bicubic, OpenAI mean/std), also
when the weights come from a local file: then it is taken from the model's known tags when they all
agree. `resize` overrides the resize mode.
"""

from __future__ import annotations

import difflib
import logging
import os
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from . import hub
from .errors import UserError
from .hashing import weights_fingerprint
from .jsonfiles import read_json
from .views import RESIZE_MODES

SHIPPED_CONFIG_DIR = Path(__file__).parent / "model_configs"


@dataclass(frozen=True, kw_only=True)
class Preprocess:
    """How a model wants its images: the input size and how an image is brought to it."""

    image_size: tuple[int, int]  # (height, width)
    resize_mode: str  # "squash" or "shortest" (resize shortest side, then centre-crop)
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # The evaluation view: the centred square of this share of the shorter side (timm's crop_pct: resize
    # the shorter side to size / crop_pct, centre-crop size). 1.0, the whole centred square, for CLIP.
    crop_fraction: float = 1.0

    def to_json(self) -> dict:
        value = {
            "image_size": list(self.image_size),
            "resize_mode": self.resize_mode,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }
        if self.crop_fraction != 1.0:  # absent means 1.0: files and cache specs written before stay identical
            value["crop_fraction"] = self.crop_fraction
        return value

    @classmethod
    def from_json(cls, value: dict) -> "Preprocess":
        return cls(image_size=tuple(value["image_size"]), resize_mode=value["resize_mode"],
                   interpolation=value["interpolation"], mean=tuple(value["mean"]), std=tuple(value["std"]),
                   crop_fraction=float(value.get("crop_fraction", 1.0)))


@dataclass
class LoadedClip:
    model: torch.nn.Module  # open_clip CLIP (both towers)
    tokenizer: object
    name: str  # the registered model name
    pretrained: str  # as given
    weights_fingerprint: str
    preprocess: Preprocess

    def describe(self) -> dict:
        return {"model": self.name, "pretrained": self.pretrained, "weights_fingerprint": self.weights_fingerprint}


_shipped_configs_registered = False


def _open_clip():
    """open_clip, imported on first use (it is slow to import) with our tiny configs registered."""
    global _shipped_configs_registered
    import open_clip

    if not _shipped_configs_registered:
        open_clip.add_model_config(SHIPPED_CONFIG_DIR)
        _shipped_configs_registered = True
    return open_clip


def resolve_model_name(model: str) -> str:
    """Register a config file if given one; check that a plain name is known to open_clip."""
    open_clip = _open_clip()
    if model.startswith(("local-dir:", "hf-hub:")):
        return model
    if model.endswith(".json") or os.path.sep in model:
        path = Path(model)
        config = read_json(path, "model config", "give an open_clip model-config JSON file")
        if not isinstance(config, dict) or not all(k in config for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise UserError(f"model config {path} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
        open_clip.add_model_config(path)
        return path.stem
    if model not in open_clip.list_models():
        close = difflib.get_close_matches(model, open_clip.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown open_clip model {model!r}{hint}; give a model name or a model-config JSON file")
    return model


def _preprocess_overrides(name: str, pretrained: str, resize: str | None) -> dict:
    """Preprocessing of the weights: the tag's own; for a local file or random init, what all the
    model's known tags agree on (DFN5B's ViT-H-14-378 has one tag: squash); else open_clip's default."""
    open_clip = _open_clip()
    keys = ("mean", "std", "interpolation", "resize_mode")
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) if pretrained != "none" else {}
    if not tag_cfg:  # a local file, or random init: what the model's known weights all use
        tags = [open_clip.get_pretrained_cfg(name, tag) for tag in open_clip.list_pretrained_tags_by_model(name)]
        agreed = [{k: cfg.get(k) for k in keys} for cfg in tags]
        if agreed and all(a == agreed[0] for a in agreed):
            tag_cfg = agreed[0]
    overrides = {k: tag_cfg[k] for k in keys if tag_cfg.get(k) is not None}
    if resize is not None:
        if resize not in RESIZE_MODES:
            raise UserError(f"--resize must be one of {', '.join(RESIZE_MODES)}, not {resize!r}")
        overrides["resize_mode"] = resize
    return overrides


def _hub_files(cfg: dict) -> tuple[str, list[str]] | None:
    """(repo, candidate file names) of a tag's weights on the Hugging Face hub, or None."""
    hub = cfg.get("hf_hub", "")
    if not hub:
        return None
    # open_clip's convention: "org/repo/" means the repo's default open_clip weights file.
    repo, filename = os.path.split(hub)
    return repo, [filename] if filename else list(_OPEN_CLIP_WEIGHT_FILES)


_OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                           "open_clip_pytorch_model.bin")


def resolve_weights(name: str, pretrained: str) -> str | None:
    """A local weights file for (model, pretrained): a file as given, the Hugging Face cache, or a download."""
    open_clip = _open_clip()
    if pretrained == "none":
        return None
    if os.path.isfile(pretrained):
        return pretrained
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        known = f"known tags: {', '.join(tags)}" if tags else "it has no known tags"
        raise UserError(
            f"--pretrained {pretrained!r} is neither a file nor a tag of {name} ({known}); "
            "pass a weights file, a tag, or 'none'"
        )
    files = _hub_files(cfg)
    what = f"weights for {name}/{pretrained}"
    if files is None:
        return hub.download_from_url(cfg["url"], lambda: open_clip.download_pretrained(cfg), what=what)
    repo, candidates = files
    return hub.download_from_hub(repo, candidates, what=what, library_name="open_clip")


@contextmanager
def _quiet_open_clip_logging():
    """open_clip logs routine facts (random init, config found) as root-logger warnings."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def load_clip(
    model: str,
    pretrained: str,
    *,
    resize: str | None = None,
    seed: int = 0,
    image_size: int | None = None,
) -> LoadedClip:
    """Build an open_clip model on the CPU in fp32 with its weights and preprocessing."""
    open_clip = _open_clip()
    name = resolve_model_name(model)
    weights = None if name.startswith(("local-dir:", "hf-hub:")) else resolve_weights(name, pretrained)
    overrides = _preprocess_overrides(name, pretrained, resize)
    compact = weights is not None and _is_compact(weights)
    # Random init must be identical in every process (ranks of one run, and reruns).
    with torch.random.fork_rng(devices=[]), _quiet_open_clip_logging():
        torch.manual_seed(seed)
        try:
            clip = open_clip.create_model(
                name,
                pretrained=None if compact else weights,
                force_preprocess_cfg=overrides,
                force_image_size=image_size,
            )
            if compact:
                _load_compact(clip, name, weights)
        except UserError:
            raise
        except pickle.UnpicklingError:  # open_clip loads with weights_only=True: the file holds code
            raise UserError(
                f"weights file {weights} holds pickled objects that could run code, refused; use a plain "
                "state-dict or safetensors file"
            ) from None
        except Exception as error:  # wrong weights for the architecture, unreadable file, ...
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            raise UserError(f"cannot build {name} with weights {weights or 'none'} ({first})") from None
    tokenizer = open_clip.get_tokenizer(name)
    cfg = clip.visual.preprocess_cfg
    size = cfg["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    preprocess = Preprocess(
        image_size=size,
        resize_mode=cfg["resize_mode"],
        interpolation=cfg["interpolation"],
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
    )
    if preprocess.resize_mode not in RESIZE_MODES:
        raise UserError(f"{name}: resize mode {preprocess.resize_mode!r} is not supported; pass --resize squash|shortest")
    fingerprint = weights_fingerprint(weights) if weights else f"random-init:seed={seed}"
    clip.eval()
    return LoadedClip(
        model=clip,
        tokenizer=tokenizer,
        name=name,
        pretrained=pretrained,
        weights_fingerprint=fingerprint,
        preprocess=preprocess,
    )


def _is_compact(weights: str) -> bool:
    from .demo.tiny_clip import is_compact

    return is_compact(weights)


def _load_compact(clip, name: str, weights: str) -> None:
    """A compact weights file (the demo's shipped tiny CLIPs: dho_pipeline/demo/tiny_clip.py), expanded in memory."""
    from .demo.tiny_clip import compact_state_dict

    made_for, state = compact_state_dict(weights)
    if made_for != name:
        raise UserError(f"weights file {weights} holds compact weights of {made_for}, not {name}; pass --teacher/--student {made_for}")
    clip.load_state_dict(state)


@torch.no_grad()
def class_text_embeddings(
    loaded: LoadedClip,
    classnames: list[str],
    templates: list[str],
    *,
    normalize: bool,
    renormalize: bool = True,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    show_progress: bool = True,
) -> torch.Tensor:
    """Template-averaged class text embeddings, [num_classes, dim], float32.

    normalize=True is the zero-shot classifier (each template's embedding normalised, averaged, and
    renormalised, as open_clip builds it; with renormalize=False the average is left as it is, as the
    DHO reference's DFN5B teacher leaves it); normalize=False is the plain template mean of the raw
    embeddings, which DHO uses to initialise the student's heads.
    """
    from .progress import progress
    from .prompts import fill_template

    model = loaded.model.to(device)
    texts = [fill_template(t, c) for c in classnames for t in templates]
    embeddings = []
    # 1000 classes x 7 templates take minutes on a CPU: show it
    starts = progress(range(0, len(texts), batch_size), desc=f"class embeddings ({len(classnames)} x {len(templates)})",
                      unit="batch", leave=False, show=show_progress)
    for start in starts:
        tokens = loaded.tokenizer(texts[start : start + batch_size]).to(device)
        embeddings.append(model.encode_text(tokens).float())
    per_text = torch.cat(embeddings).view(len(classnames), len(templates), -1)
    if normalize:
        per_text = torch.nn.functional.normalize(per_text, dim=-1)
        mean = per_text.mean(dim=1)
        return (torch.nn.functional.normalize(mean, dim=-1) if renormalize else mean).cpu()
    return per_text.mean(dim=1).cpu()
