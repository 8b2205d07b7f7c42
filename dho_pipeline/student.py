"""The DHO student: a CLIP image tower with two linear heads.

    ce_logits = ce_head(f)                      # trained with cross-entropy on labeled images
    kd_logits = kd_head(normalize(f)) * 100     # trained to match the teacher (bias scaled by 100 too)

Both heads start from the student's own text tower: for each class, the mean over the prompt templates
of its (un-normalised) text embeddings; biases zero. State-dict keys are exactly `backbone.*`,
`ce_head.weight/bias`, `kd_head.weight/bias`, the released checkpoints' format (model card in
`shared/seed/`). At inference the heads combine as
`alpha * softmax(ce) + (1 - alpha) * softmax(kd / beta)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KD_SCALE = 100.0


class DualHeadStudent(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.ce_head = nn.Linear(feature_dim, num_classes)
        self.kd_head = nn.Linear(feature_dim, num_classes)

    @torch.no_grad()
    def init_heads(self, class_embeddings: torch.Tensor) -> None:
        """Both heads from [num_classes, feature_dim] text embeddings; biases zero."""
        for head in (self.ce_head, self.kd_head):
            head.weight.copy_(class_embeddings)
            head.bias.zero_()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(images)
        return self.ce_head(features), self.kd_head(F.normalize(features, dim=-1)) * KD_SCALE


def combine_heads(ce_logits: torch.Tensor, kd_logits: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """The paper's inference rule: class probabilities from both heads."""
    return alpha * F.softmax(ce_logits.float(), dim=-1) + (1 - alpha) * F.softmax(kd_logits.float() / beta, dim=-1)


def build_student(loaded, classnames: list[str], templates: list[str], device="cpu") -> DualHeadStudent:
    """A student from an open_clip model (clip_models.LoadedClip): image tower plus text-initialised heads.

    The text tower runs on `device` (1000 classes x 7 templates take a while on a CPU).
    """
    from .clip_models import class_text_embeddings

    embeddings = class_text_embeddings(loaded, classnames, templates, normalize=False, device=device)
    student = DualHeadStudent(loaded.model.visual, embeddings.shape[1], len(classnames))
    student.init_heads(embeddings)
    return student
