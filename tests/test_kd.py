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


def kl_written_out(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum_c p_c (log p_c - log q_c) per row, in float64, with 0 log 0 = 0."""
    p, q = p.double(), q.double()
    return torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p)).sum(-1)


def test_full_kl_is_the_papers_loss_written_out():
    """KL(softmax(t/T) || softmax(s/T)) * T^2, batch mean: teacher first, times T^2."""
    teacher, student = clip_like_logits(8, 50), clip_like_logits(8, 50, seed=1)
    p, q = torch.softmax(teacher.double() / T, -1), torch.softmax(student.double() / T, -1)
    expected = kl_written_out(p, q).mean() * T**2
    assert kd_full(student, teacher, T).item() == pytest.approx(expected.item(), rel=1e-5)
    # The reverse KL and a loss without T^2 miss by over 100 times that tolerance.
    assert abs(kl_written_out(q, p).mean() * T**2 - expected) > 1e-3 * expected
    assert abs(expected / T**2 - expected) > 1e-3 * expected


@pytest.mark.parametrize("tail", ["bucket", "uniform"])
def test_topk_loss_is_the_kl_of_the_docstring_written_out(tail):
    """k < C: the teacher's exact top-k probabilities plus its leftover mass, kept as one "other" class
    (bucket) or spread evenly over the classes outside its top-k (uniform); never renormalised."""
    k, classes = 10, 50
    teacher, student = clip_like_logits(8, classes), clip_like_logits(8, classes, seed=1)
    indices, values, log_z = topk_of(teacher, k)
    p_all, q_all = torch.softmax(teacher.double() / T, -1), torch.softmax(student.double() / T, -1)
    p_top, q_top = p_all.gather(-1, indices), q_all.gather(-1, indices)
    p_rest, q_rest = 1 - p_top.sum(-1, keepdim=True), 1 - q_top.sum(-1, keepdim=True)
    if tail == "bucket":
        expected = kl_written_out(torch.cat([p_top, p_rest], -1), torch.cat([q_top, q_rest], -1))
    else:
        p = (p_rest / (classes - k)).expand(-1, classes).scatter(-1, indices, p_top)
        expected = kl_written_out(p, q_all)
    expected = expected.mean() * T**2
    assert kd_topk(student, indices, values, log_z, T, tail).item() == pytest.approx(expected.item(), rel=1e-4)
    # Renormalising the teacher onto its top-k (what the cache's log-partitions exist to avoid) differs.
    renormalised = kl_written_out(p_top / p_top.sum(-1, keepdim=True), q_top / q_top.sum(-1, keepdim=True))
    assert abs(renormalised.mean() * T**2 - expected) > 1e-2 * expected


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


@pytest.mark.parametrize("tail", ["bucket", "uniform"])
def test_float16_top_logits_that_overshoot_the_partition_stay_finite(tail):
    """A confident teacher whose float16-rounded top logit exceeds its exact value: the stored top-k
    probabilities then sum past 1 (checked below), the leftover mass is clamped to 0, and loss and
    gradient stay finite and equal the float32 loss up to that rounding."""
    teacher = torch.zeros(4, 20)
    teacher[:, 0] = 30.012  # float16 rounds it up to 30.015625
    indices, values, log_z = topk_of(teacher, 3)
    assert (torch.exp(values.half().float() / T - log_z[:, None]).sum(-1) > 1).all()  # the case under test
    student = clip_like_logits(4, 20).requires_grad_()
    loss = kd_topk(student, indices, values.half(), log_z, T, tail)
    (gradient,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and torch.isfinite(gradient).all()
    assert loss.item() == pytest.approx(kd_topk(student, indices, values, log_z, T, tail).item(), rel=1e-3)


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
    # The KD head's bias is scaled by 100 too (as in the released checkpoints).
    with torch.no_grad():
        student.kd_head.bias.copy_(torch.tensor([0.01, -0.02]))
    assert torch.allclose(student(torch.tensor([[3.0, 4.0, 0.0]]))[1], torch.tensor([[61.0, 158.0]]))
    # The inference rule: alpha * softmax(ce) + (1 - alpha) * softmax(kd / beta), written out.
    ce, kd = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[30.0, 20.0, 25.0]])
    expected = 0.3 * ce.exp() / ce.exp().sum() + 0.7 * (kd / 4).exp() / (kd / 4).exp().sum()
    assert torch.allclose(combine_heads(ce, kd, 0.3, 4.0), expected)
    assert torch.allclose(combine_heads(ce, kd, 1.0, 0.5), torch.softmax(ce, -1))
