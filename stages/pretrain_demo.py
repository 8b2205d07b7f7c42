"""Pretrain the demo's tiny CLIPs on the digits' pretrain part; reproduces the shipped weights bit for bit.

    dho-pipeline pretrain-demo-clips            # rewrite dho_pipeline/demo/weights/*.safetensors
    dho-pipeline pretrain-demo-clips --check    # retrain in a temporary folder, compare with the shipped files

Teacher: `dho-tiny-teacher` (ViT, 3 layers, width 96) on all 600 pretrain images, 60 epochs: it stands
in for a web-pretrained VLM. Student: `dho-tiny-student` (ViT, 2 layers, width 48) on 300 of them,
30 epochs: a weak start, as a CLIP ViT-B/16 is weaker than DFN5B ViT-H. Both see the pipeline's own
views (half whole images, half RandomResizedCrop at digits.CROP_SCALE with flips), as web-pretrained
VLMs have seen crops. These budgets were chosen by zero-shot accuracy on the *train* part (recorded in
each file's metadata), never on the test part. About 2.5 minutes on one CPU thread.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import dho_pipeline.demo
from dho_pipeline.errors import UserError

from .options import setting

SHIPPED = Path(dho_pipeline.demo.__file__).parent / "weights"  # the files pretrain-demo-clips reproduces
RECIPES = {
    # file stem: (open_clip model, pretrain images used, epochs, seed)
    "tiny-teacher": ("dho-tiny-teacher", 600, 60, 0),
    "tiny-student": ("dho-tiny-student", 300, 30, 1),
}


@dataclass(frozen=True, kw_only=True)
class Config:
    out: Path = setting(SHIPPED, cli=False, help="Folder of the weights files to write (or check).")
    check: bool = setting(False, help="Retrain in a scratch folder and compare with the shipped files.")


def _pixels(images, indices):
    import numpy as np

    from dho_pipeline.views import center_box, render_view

    mean = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
    std = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)
    rendered = np.stack([
        render_view(images[i], center_box(*images[i].size), False, (32, 32)) for i in indices
    ])
    return ((rendered.astype(np.float32) / 255 - mean) / std).transpose(0, 3, 1, 2).copy()


def zero_shot_accuracy(model, name: str, pixels, labels) -> float:
    import torch
    import torch.nn.functional as F

    from dho_pipeline.clip_models import LoadedClip, _open_clip, class_text_embeddings
    from dho_pipeline.demo.digits import CLASSNAMES, TEMPLATES

    loaded = LoadedClip(model=model, tokenizer=_open_clip().get_tokenizer(name), name=name, pretrained="",
                        weights_fingerprint="", preprocess=None)
    classifier = class_text_embeddings(loaded, CLASSNAMES, TEMPLATES, normalize=True)
    with torch.no_grad():
        features = F.normalize(model.encode_image(torch.from_numpy(pixels)), dim=-1)
    return float(((features @ classifier.T).argmax(1).numpy() == labels).mean())


def run(config: Config) -> dict:
    import click

    from dho_pipeline.demo.digits import CLASSNAMES, CROP_SCALE, TEMPLATES, load_digit_images, three_way_split
    from dho_pipeline.hashing import safetensors_fingerprint as content_fingerprint
    from dho_pipeline.demo.tiny_clip import pretrain, save_compact

    images, labels = load_digit_images(32)
    parts = three_way_split(len(images))
    train_pixels = _pixels(images, parts["train"])
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) if config.check else Path(config.out)
        folder.mkdir(parents=True, exist_ok=True)
        results = {}
        for stem, (name, count, epochs, seed) in RECIPES.items():
            chosen = parts["pretrain"][:count]
            model, used = pretrain(
                name, [images[i] for i in chosen], labels[chosen], CLASSNAMES, TEMPLATES, epochs=epochs, seed=seed,
                crop_scale=CROP_SCALE,
                progress=lambda e, loss, stem=stem: click.echo(f"[{stem}] epoch {e + 1}: loss {loss:.3f}", err=True),
            )
            accuracy = zero_shot_accuracy(model, name, train_pixels, labels[parts["train"]])
            about = {"pretrain_images": count, "epochs": epochs, "seed": seed, "crop_scale": list(CROP_SCALE),
                     "zero_shot_on_train_part": round(accuracy, 4)}
            path = folder / f"{stem}.safetensors"
            save_compact(model, used, path, name=name, seed=seed, about=about)
            results[stem] = {**about, "fingerprint": content_fingerprint(path)}
        if config.check:
            for stem, result in results.items():
                shipped = Path(config.out) / f"{stem}.safetensors"
                if not shipped.exists():
                    raise UserError(f"{shipped} does not exist; run without --check to create it")
                result["matches_shipped"] = content_fingerprint(shipped) == result["fingerprint"]
    return results
