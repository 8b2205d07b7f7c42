"""A student as a ready-to-use image classifier: the Python API (`from dho_pipeline import load_student`).

    from PIL import Image
    from dho_pipeline import load_student

    student = load_student("runs/b16/student-calibrated.pt")   # or an export folder / .safetensors
    probabilities = student.predict([Image.open("photo.jpg")])  # [1, num_classes], rows sum to 1
    print(student.classnames[probabilities[0].argmax()])

`student` is a torch module: `student(pixels)` maps a preprocessed batch to the mixed probabilities
`alpha * softmax(ce) + (1 - alpha) * softmax(kd / beta)`; `student.outputs(pixels)` also returns both heads'
logits (what the ONNX export computes). `student.preprocess` turns a PIL image into one such input
(resize the shortest side and centre-crop, bicubic, the model's mean and std): exactly what `predict` and
`evaluate` feed the student.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .clip_models import Preprocess
from .student import combine_heads


class ImagePreprocess:
    """PIL image -> float tensor [3, H, W], normalised: the student's evaluation view."""

    def __init__(self, spec: Preprocess):
        self.spec = spec
        self.image_size = spec.image_size
        self.mean, self.std = spec.mean, spec.std

    def pixels(self, image) -> np.ndarray:
        """uint8 [H, W, 3] before normalisation (the data pipeline's form)."""
        from .views import center_box, render_view, to_rgb

        image = to_rgb(image)
        return render_view(image, center_box(*image.size, self.spec.crop_fraction), False, self.image_size)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> float [B, 3, H, W], with the arithmetic `evaluate` uses."""
        from .pixels import Normalizer

        return Normalizer(self.mean, self.std, pixels.device)(pixels).contiguous()

    def __call__(self, image) -> torch.Tensor:
        return self.normalize(torch.from_numpy(self.pixels(image).copy())[None])[0]

    def __repr__(self) -> str:
        s = self.spec
        return (f"ImagePreprocess(size={s.image_size}, resize shortest side + centre crop, {s.interpolation}, "
                f"mean={s.mean}, std={s.std})")


class StudentClassifier(nn.Module):
    """A dual-head student with its classes, head mix and preprocessing."""

    def __init__(self, student: nn.Module, *, classnames: list[str], preprocess: Preprocess, alpha: float, beta: float,
                 architecture: str):
        super().__init__()
        self.student = student
        self.classnames = list(classnames)
        self.preprocess = ImagePreprocess(preprocess)
        self.alpha, self.beta = float(alpha), float(beta)
        self.architecture = architecture

    def outputs(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mixed probabilities, CE-head logits, KD-head logits) for a preprocessed batch [B, 3, H, W]."""
        ce_logits, kd_logits = self.student(pixels)
        return combine_heads(ce_logits, kd_logits, self.alpha, self.beta), ce_logits, kd_logits

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.outputs(pixels)[0]

    @torch.no_grad()
    def predict(self, images) -> torch.Tensor:
        """Mixed class probabilities [N, num_classes] (on the CPU) for PIL images (one, or a list) or a batch
        already preprocessed (a tensor [N, 3, H, W], e.g. `torch.stack([student.preprocess(i) for i in images])`)."""
        if not isinstance(images, torch.Tensor):
            images = [images] if not isinstance(images, (list, tuple)) else images
            images = torch.stack([self.preprocess(image) for image in images]) if images else torch.zeros(0)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected PIL images or a preprocessed batch [N, 3, H, W], got a tensor of shape "
                             f"{tuple(images.shape)}")
        self.eval()
        device = next(self.parameters()).device
        return self(images.to(device)).cpu()

    def top(self, probabilities: torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
        """The k most likely (class name, probability) per row of `predict`'s output."""
        values, indices = probabilities.topk(min(k, probabilities.shape[-1]), dim=-1)
        return [[(self.classnames[i], float(p)) for p, i in zip(row_p, row_i.tolist())]
                for row_p, row_i in zip(values, indices)]


def classifier_of(loaded) -> StudentClassifier:
    """A StudentClassifier from student_checkpoint.LoadedStudent."""
    return StudentClassifier(loaded.model, classnames=loaded.classnames, preprocess=loaded.preprocess,
                             alpha=loaded.alpha, beta=loaded.beta, architecture=loaded.architecture).eval()


def load_student(path: str | Path, *, student: str | None = None, classnames: list[str] | None = None) -> StudentClassifier:
    """A student from any file `train`, `calibrate` or `export` writes (a checkpoint, an open_clip export folder,
    a .safetensors export), or a released DHO checkpoint, as a classifier on the CPU in eval mode. `student` names
    the architecture of a released checkpoint if its weights do not tell; `classnames` overrides the classes."""
    from .student_checkpoint import load_student as load_student_checkpoint

    return classifier_of(load_student_checkpoint(path, student=student, classnames=classnames))
