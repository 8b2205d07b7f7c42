"""The DHO student: an image backbone (dho_pipeline.backbones) with two linear heads on its features f.

Head kinds:
- `cosine` (the paper's ImageNet form):
      ce_logits = ce_head(f)                      # trained with cross-entropy on labeled images
      kd_logits = kd_head(normalize(f)) * 100     # trained to match the teacher (bias scaled by 100 too)
- `linear` (the reference's few-shot form): ce_head(f) and kd_head(f), no normalisation.

Initialisation: a CLIP backbone's heads start from its own text tower (for each class, the mean over the
prompt templates of its un-normalised text embeddings; biases zero), whatever the kind. A backbone without
a text tower (timm) keeps nn.Linear's default initialisation, as the reference's few-shot students do;
for a cosine head the KD head's bias is zeroed, since the x100 would turn its default (up to
1/sqrt(d)) into offsets of several logits. State-dict keys are exactly `backbone.*`,
`ce_head.weight/bias`, `kd_head.weight/bias`, the released checkpoints' format (model card in
`shared/seed/`). At inference the heads combine as
`alpha * softmax(ce) + (1 - alpha) * softmax(kd / beta)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KD_SCALE = 100.0


HEADS = ("cosine", "linear")
# What each head kind computes from the features f (for model cards and export descriptions).
KD_LOGITS = {"cosine": "100 * kd_head(f / |f|)", "linear": "kd_head(f)"}


def inference(head: str) -> str:
    return f"p = alpha * softmax(ce_head(f)) + (1 - alpha) * softmax({KD_LOGITS[head]} / beta)"


class DualHeadStudent(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, head: str = "cosine"):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, not {head!r}")
        self.backbone = backbone
        self.head = head
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
        if self.head == "linear":
            return self.ce_head(features), self.kd_head(features)
        return self.ce_head(features), self.kd_head(F.normalize(features, dim=-1)) * KD_SCALE


PAPER_ALPHA_BETA = (0.5, 0.5)  # the paper's fixed mix, and what a checkpoint without alpha/beta means


def combine_heads(ce_logits: torch.Tensor, kd_logits: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """The paper's inference rule: class probabilities from both heads."""
    return alpha * F.softmax(ce_logits.float(), dim=-1) + (1 - alpha) * F.softmax(kd_logits.float() / beta, dim=-1)


def build_student(backbone, classnames: list[str], templates: list[str], *, head: str = "cosine",
                  device="cpu") -> DualHeadStudent:
    """A student from a backbones.Backbone, with heads initialised as the module doc says.

    A CLIP text tower runs on `device` (1000 classes x 7 templates take a while on a CPU).
    """
    if backbone.clip is None:
        student = DualHeadStudent(backbone.module, backbone.feature_dim, len(classnames), head=head)
        if head == "cosine":
            with torch.no_grad():
                student.kd_head.bias.zero_()
        return student
    from .clip_models import class_text_embeddings

    embeddings = class_text_embeddings(backbone.clip, classnames, templates, normalize=False, device=device)
    student = DualHeadStudent(backbone.module, embeddings.shape[1], len(classnames), head=head)
    student.init_heads(embeddings)
    return student
