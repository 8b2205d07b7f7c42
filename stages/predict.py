"""Classify image files with a student checkpoint: the model card's inference path.

    dho-pipeline predict --checkpoint vit_b_10.pt photo.jpg [more.png ...] [--topk 5] [--json]

Each image: resize the shortest side and centre-crop to the student's input (bicubic), CLIP mean/std,
both heads, combined with the checkpoint's alpha and beta.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dho_pipeline.errors import UserError

from .options import setting


@dataclass(frozen=True, kw_only=True)
class Config:
    checkpoint: Path = setting(help="Student checkpoint (ours or a released one).")
    images: tuple[Path, ...] = setting(argument=True, help="Image files.")
    topk: int = setting(5, help="Classes shown per image.")
    student: str | None = setting(None, help="Architecture when the checkpoint does not record it: ViT-B-16, "
                                  "ViT-L-14, ViT-L-14-336px, RN50, or an open_clip name.")
    classnames: Path | None = setting(None, default_text="the checkpoint's, or ImageNet's for 1000 classes",
                                      help="Class names, one per line.")
    device: str | None = setting(None, default_text="cuda if available, else cpu", help="Device.")

    def __post_init__(self):
        if self.topk < 1:
            raise UserError(f"--topk must be a positive number of classes, not {self.topk}")


def run(config: Config) -> list[dict]:
    import numpy as np
    import torch

    from dho_pipeline.pixels import Normalizer
    from dho_pipeline.student_checkpoint import load_student
    from dho_pipeline.student import combine_heads
    from dho_pipeline.prompts import read_classnames
    from dho_pipeline.views import center_box, decode_rgb, describe_decode_error, render_view

    # Every image is read and decoded before anything is printed: a bad one stops the run cleanly.
    images = []
    for path in config.images:
        try:
            images.append(decode_rgb(Path(path).read_bytes()))
        except FileNotFoundError:
            raise UserError(f"image {path} does not exist") from None
        except Exception as error:
            raise UserError(f"image {path} cannot be decoded ({describe_decode_error(error)})") from None
    classnames = read_classnames(config.classnames) if config.classnames else None
    loaded = load_student(config.checkpoint, student=config.student, classnames=classnames)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pixels = np.stack([render_view(image, center_box(*image.size), False, loaded.preprocess.image_size) for image in images])
    normalize = Normalizer(loaded.preprocess.mean, loaded.preprocess.std, device)
    with torch.no_grad():
        ce_logits, kd_logits = loaded.model.to(device)(normalize(torch.from_numpy(pixels)))
    probabilities = combine_heads(ce_logits, kd_logits, loaded.alpha, loaded.beta).cpu()
    k = min(config.topk, probabilities.shape[-1])
    results = []
    for path, row in zip(config.images, probabilities):
        top = row.topk(k)
        results.append({
            "image": str(path),
            "predictions": [
                {"class": int(i), "name": loaded.classnames[int(i)], "probability": float(p)}
                for p, i in zip(top.values, top.indices)
            ],
        })
    return results
