"""Training objectives: DHO and its baselines as loss parts, from the student's two heads' logits.

    dho          CE(ce_head(x_l), y) + KD(kd_head(x_l)) + KD(kd_head(x_u))   the paper's (weights 1:1:1)
    single-head  CE(ce_head(x_l), y) + KD(ce_head(x_l)) + KD(ce_head(x_u))   one head takes both losses
    ce           CE(ce_head(x_l), y)                                         labeled data only, no teacher
    kd           KD(kd_head(x_l)) + KD(kd_head(x_u))                         no labels

KD = KL(teacher_T || student_T) * T^2 against `TeacherTargets` (kd.kd_topk): a cached top-k with its
exact leftover mass, or every logit of a teacher run online (k = C, the plain full KL). The CE head
never sees unlabeled data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cache_reader import TeacherTargets
from .kd import TAIL_MODES, kd_topk

OBJECTIVES = ("dho", "single-head", "ce", "kd")


def kd_loss(student_logits: torch.Tensor, targets: TeacherTargets, temperature: float, tail: str) -> torch.Tensor:
    """KL(teacher || student) * T^2, batch mean, against typed teacher targets on the logits' device."""
    device = student_logits.device  # only what the loss reads moves (boxes, flips and keys stay)
    return kd_topk(student_logits, targets.topk_index.to(device, non_blocking=True),
                   targets.topk_logit.to(device, non_blocking=True),
                   targets.log_partition.to(device, non_blocking=True), temperature, tail)


@dataclass(frozen=True)
class Objective:
    """Which losses train which head, with what weights, at which KD temperature."""

    name: str = "dho"
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # CE on labeled, KD on labeled, KD on unlabeled
    temperature: float = 2.0
    tail: str = "bucket"  # the teacher's mass outside a cached top-k: kd.TAIL_MODES

    def __post_init__(self):
        if self.name not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, not {self.name!r}")
        if self.tail not in TAIL_MODES:
            raise ValueError(f"tail must be one of {TAIL_MODES}, not {self.tail!r}")
        if len(self.weights) != 3 or self.temperature <= 0:
            raise ValueError("weights takes three numbers and the temperature must be positive")

    @property
    def needs_teacher(self) -> bool:
        """Whether the objective distils (reads teacher targets and the unlabeled stream)."""
        return self.name != "ce"

    @property
    def needs_labels(self) -> bool:
        return self.name != "kd"

    def losses(self, ce_logits: torch.Tensor, kd_logits: torch.Tensor, labels: torch.Tensor,
               labeled: TeacherTargets | None = None, unlabeled: TeacherTargets | None = None) -> dict[str, torch.Tensor]:
        """Weighted loss parts for one micro-batch.

        ce_logits/kd_logits [n + m, C] hold the labeled samples first (n = len(labels)), then the
        unlabeled ones; `labeled`/`unlabeled` are their teacher targets (needed unless name == "ce").
        """
        w_ce, w_kd_labeled, w_kd_unlabeled = self.weights
        n = len(labels)
        parts = {}
        if self.needs_labels:
            parts["ce_labeled"] = w_ce * F.cross_entropy(ce_logits[:n].float(), labels.to(ce_logits.device, non_blocking=True))
        if self.needs_teacher:
            head = ce_logits if self.name == "single-head" else kd_logits
            parts["kd_labeled"] = w_kd_labeled * kd_loss(head[:n], labeled, self.temperature, self.tail)
            parts["kd_unlabeled"] = w_kd_unlabeled * kd_loss(head[n:], unlabeled, self.temperature, self.tail)
        return parts
