"""Tiny CLIPs for the demo: contrastive pretraining on captioned digits, and compact weight files.

The demo needs a teacher that stands in for a web-pretrained VLM (clearly better at zero-shot than the
student starts) and a weak student. Both are tiny open_clip models pretrained here with open_clip's
own contrastive loss on the demo's *pretrain* part only, with captions such as "a photo of the number
seven.". Pretraining runs single-threaded from fixed seeds, so the same command reproduces the shipped
weights bit for bit (on the same torch version).

Compact files: nearly all of a tiny CLIP's parameters are its 49,408-row token-embedding table, of which
the captions use a few dozen rows. Those rows are the only ones training changes (the embedding is
excluded from weight decay, and Adam leaves parameters with zero gradient untouched), so a compact
file stores every other tensor plus just the used rows; loading rebuilds the model from the same seed
and puts them back. `--pretrained` takes them as they are (clip_models.load_clip expands them in memory);
`expand_compact` writes an ordinary open_clip weights file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..prompts import fill_template

TOKEN_TABLE = "token_embedding.weight"


def _open_clip_model(name: str, seed: int):
    from ..clip_models import _open_clip, _quiet_open_clip_logging

    open_clip = _open_clip()
    with torch.random.fork_rng(devices=[]), _quiet_open_clip_logging():
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None)
    return model, open_clip.get_tokenizer(name)


def _augmented(images, keys, policy, epoch: int, rng, size, mean, std) -> torch.Tensor:
    """One view per image for this epoch: half the images whole, half a fresh random crop + flip,
    drawn and rendered exactly as the pipeline's views are (a web-pretrained VLM has seen crops)."""
    from ..views import draw_view, render_view

    rendered = []
    for image, key in zip(images, keys):
        view = 0 if rng.uniform() < 0.5 else 1 + epoch
        box, flip = draw_view(policy, "pretrain", key, view, *image.size)
        rendered.append(render_view(image, box, flip, size))
    pixels = (np.stack(rendered).astype(np.float32) / 255 - mean) / std
    return torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())


def pretrain(name: str, images: list, labels: np.ndarray, classnames: list[str], templates: list[str], *,
             epochs: int, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
             crop_scale: tuple[float, float] = (0.5, 1.0), progress=None):
    """Contrastive pretraining of open_clip model `name` on PIL images with captions made from their
    labels, under the pipeline's own view augmentation. Returns (model, token ids the captions use)."""
    from open_clip.loss import ClipLoss

    from ..views import VIEW0_CENTER_SQUARE, ViewPolicy

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-for-bit reproducible on CPU
    try:
        model, tokenizer = _open_clip_model(name, seed)
        size = tuple(model.visual.image_size) if not isinstance(model.visual.image_size, int) else (model.visual.image_size,) * 2
        mean = np.array(model.visual.preprocess_cfg["mean"], np.float32)
        std = np.array(model.visual.preprocess_cfg["std"], np.float32)
        policy = ViewPolicy(num_views=epochs + 1, seed=seed, view0=VIEW0_CENTER_SQUARE, crop_scale=crop_scale)
        keys = [f"image{i}" for i in range(len(images))]
        captions = {(c, t): tokenizer([fill_template(templates[t], classnames[c])])[0]
                    for c in range(len(classnames)) for t in range(len(templates))}
        used_tokens = sorted({int(i) for tokens in captions.values() for i in tokens.tolist()})
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and n != TOKEN_TABLE]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or n == TOKEN_TABLE]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
        loss_fn = ClipLoss()
        rng = np.random.default_rng(seed)
        steps = epochs * max(1, len(images) // batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
        model.train()
        for epoch in range(epochs):
            pixels = _augmented(images, keys, policy, epoch, rng, size, mean, std)
            order = rng.permutation(len(images))
            for start in range(0, len(order) - batch_size + 1, batch_size):
                batch = order[start : start + batch_size]
                texts = torch.stack([captions[(int(labels[i]), int(rng.integers(len(templates))))] for i in batch])
                image_features, text_features, logit_scale = model(pixels[batch], texts)
                loss = loss_fn(image_features, text_features, logit_scale)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
            if progress:
                progress(epoch, loss.item())
        model.eval()
        return model, used_tokens
    finally:
        torch.set_num_threads(threads)


def save_compact(model, used_tokens: list[int], path: Path, *, name: str, seed: int, about: dict) -> None:
    """Every tensor but the token table, plus its used rows (see the module docstring)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != TOKEN_TABLE}
    ids = torch.tensor(used_tokens, dtype=torch.int64)
    state["token_rows.ids"] = ids
    state["token_rows.values"] = model.state_dict()[TOKEN_TABLE][ids].contiguous()
    metadata = {"model": name, "seed": str(seed), "about": json.dumps(about)}
    save_file(state, str(path), metadata=metadata)


def is_compact(path: str | Path) -> bool:
    """Whether `path` is a compact weights file (a safetensors file holding `token_rows.*`)."""
    if not str(path).endswith(".safetensors"):
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return COMPACT_ROWS <= set(handle.keys()) and "model" in (handle.metadata() or {})
    except Exception:  # not a readable safetensors file: whoever loads it reports that
        return False


COMPACT_ROWS = {"token_rows.ids", "token_rows.values"}


def compact_state_dict(path: str | Path) -> tuple[str, dict]:
    """(open_clip model name, its full state dict) from a compact file (see the module docstring)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        state = {k: handle.get_tensor(k) for k in handle.keys()}
    model, _ = _open_clip_model(metadata["model"], int(metadata["seed"]))
    full = model.state_dict()
    table = full[TOKEN_TABLE].clone()
    table[state.pop("token_rows.ids")] = state.pop("token_rows.values")
    full.update(state)
    full[TOKEN_TABLE] = table
    return metadata["model"], full


def expand_compact(path: Path, out: Path) -> dict:
    """Rebuild the full open_clip state dict from a compact file and save it as `out` (safetensors)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    _, full = compact_state_dict(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in full.items()}, str(out))
    return {"model": metadata["model"], **json.loads(metadata["about"])}
