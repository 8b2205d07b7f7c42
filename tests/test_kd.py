"""KD losses on tensors: the maths the training stage relies on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dho_pipeline.kd import kd_full, kd_topk
from dho_pipeline.student import DualHeadStudent, combine_heads

T = 2.0


def clip_like_logits(batch: int, classes: int, seed: int = 0) -> torch.Tensor:
    """100 x cosines: unrelated classes ~0.17, a few related ~0.22, the true class ~0.29."""
    g = torch.Generator().manual_seed(seed)
    cos = 0.17 + 0.025 * torch.randn(batch, classes, generator=g)
    for row in range(batch):
        related = torch.randperm(classes, generator=g)[:9]
        cos[row, related[1:]] = 0.22 + 0.02 * torch.randn(8, generator=g)
        cos[row, related[0]] = 0.29
    return 100 * cos


def topk_of(teacher: torch.Tensor, k: int):
    values, indices = teacher.topk(k, dim=-1)
    return indices, values, torch.logsumexp(teacher / T, dim=-1)


@pytest.mark.parametrize("tail", ["bucket", "uniform"])
def test_topk_loss_equals_full_kl_when_k_is_every_class(tail):
    teacher, student = clip_like_logits(8, 50), clip_like_logits(8, 50, seed=1)
    full = kd_full(student, teacher, T)
    assert torch.allclose(kd_topk(student, *topk_of(teacher, 50), T, tail), full, rtol=1e-5)


def test_kd_is_zero_when_student_equals_teacher():
    teacher = clip_like_logits(8, 100)
    assert kd_full(teacher, teacher, T).abs() < 1e-5
    assert kd_topk(teacher, *topk_of(teacher, 10), T, "bucket").abs() < 1e-4
    # Uniform spreads the teacher's tail evenly, so it is 0 only for a student whose tail is flat too.
    flat = teacher.clone()
    indices, values, _ = topk_of(teacher, 10)
    rest_mass = 1 - torch.softmax(teacher / T, -1).gather(-1, indices).sum(-1, keepdim=True)
    outside = torch.ones_like(teacher, dtype=torch.bool).scatter_(-1, indices, False)
    log_share = torch.log(rest_mass / 90) + torch.logsumexp(teacher / T, -1, keepdim=True)
    flat = torch.where(outside, (log_share * T).expand_as(flat), teacher)
    assert kd_topk(flat, indices, values, torch.logsumexp(teacher / T, -1), T, "uniform").abs() < 1e-3


def test_topk_gradient_points_like_the_full_kl():
    teacher = clip_like_logits(16, 1000)
    noise = torch.randn(teacher.shape, generator=torch.Generator().manual_seed(1))
    student = (teacher + 3 * noise).requires_grad_()
    full_grad = torch.autograd.grad(kd_full(student, teacher, T), student)[0]
    for tail in ("bucket", "uniform"):
        grad = torch.autograd.grad(kd_topk(student, *topk_of(teacher, 100), T, tail), student)[0]
        assert F.cosine_similarity(grad.flatten(), full_grad.flatten(), dim=0) > 0.95
    # Renormalising onto the top-k, which we never do, points elsewhere.
    indices, values, _ = topk_of(teacher, 10)
    renormalised = torch.full_like(teacher, -1e4).scatter(-1, indices, values)
    grad = torch.autograd.grad(kd_full(student, renormalised, T), student)[0]
    bucket = torch.autograd.grad(kd_topk(student, *topk_of(teacher, 10), T, "bucket"), student)[0]
    assert F.cosine_similarity(grad.flatten(), full_grad.flatten(), dim=0) < \
           F.cosine_similarity(bucket.flatten(), full_grad.flatten(), dim=0) - 0.15


def test_float16_top_logits_stay_finite():
    teacher = clip_like_logits(4, 20)
    indices, values, log_z = topk_of(teacher, 20)
    loss = kd_topk(teacher + 0.01, indices, values.half(), log_z, T, "bucket")
    assert torch.isfinite(loss)


def test_losses_reach_only_their_heads():
    backbone = torch.nn.Linear(6, 4)
    student = DualHeadStudent(backbone, 4, 3)
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    ce_logits, kd_logits = student(x)
    ce_grads = torch.autograd.grad(F.cross_entropy(ce_logits, y), list(student.parameters()), allow_unused=True,
                                   retain_graph=True)
    named = dict(zip([n for n, _ in student.named_parameters()], ce_grads))
    assert named["kd_head.weight"] is None and named["ce_head.weight"] is not None and named["backbone.weight"] is not None
    teacher = torch.randn(5, 3)
    kd_grads = torch.autograd.grad(kd_full(kd_logits, teacher, T), list(student.parameters()), allow_unused=True)
    named = dict(zip([n for n, _ in student.named_parameters()], kd_grads))
    assert named["ce_head.weight"] is None and named["kd_head.weight"] is not None and named["backbone.weight"] is not None


def test_kd_head_normalises_features_and_scales_by_100():
    student = DualHeadStudent(torch.nn.Identity(), 3, 2)
    student.init_heads(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))
    ce, kd = student(torch.tensor([[3.0, 4.0, 0.0]]))
    assert torch.allclose(ce, torch.tensor([[3.0, 8.0]]))
    assert torch.allclose(kd, torch.tensor([[60.0, 160.0]]))  # (0.6, 0.8) . rows x 100
    probs = combine_heads(ce, kd, 1.0, 0.5)
    assert torch.allclose(probs, torch.softmax(ce, -1))
