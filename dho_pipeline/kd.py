"""Knowledge-distillation losses against a full or a top-k teacher, at temperature T.

All losses are `KL(teacher_T || student_T) * T^2`, averaged over the batch (PyTorch's "batchmean"),
as in the DHO reference. Against a top-k cache the teacher's top-k probabilities at T are exact,
`p_i = exp(z_i / T - logZ_T)`, and so is the mass left outside them, `r = 1 - sum_i p_i`. Two ways of
keeping that mass (never renormalising onto the top-k, which biases the gradient):

- "bucket": the classes outside the top-k form one "other" class, for teacher and student alike;
  the loss is the KL between these (k+1)-way distributions.
- "uniform": the teacher's leftover mass is spread evenly over the C - k classes outside its top-k;
  the loss is the KL over all C classes.

When k = C both equal the full KL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TAIL_MODES = ("bucket", "uniform")


def kd_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The reference loss: KL(softmax(t/T) || softmax(s/T)) * T^2, batch mean."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * temperature**2


def teacher_topk_log_probs(topk_logit: torch.Tensor, log_partition: torch.Tensor, temperature: float):
    """Exact teacher log-probabilities of the top-k classes and of "everything else" at T.

    topk_logit [B, K] (any float dtype), log_partition [B] = logsumexp(all logits / T).
    Returns (log_p_top [B, K], log_p_rest [B]); log_p_rest is -inf when nothing is left.
    """
    log_p_top = topk_logit.float() / temperature - log_partition.float().unsqueeze(-1)
    # Float16 logits can push the top-k sum a hair past 1; the rest is then (numerically) zero.
    log_p_top = log_p_top.clamp(max=0.0)
    p_rest = (1.0 - log_p_top.exp().sum(dim=-1)).clamp(min=0.0)
    return log_p_top, torch.log(p_rest)


def kd_topk(
    student_logits: torch.Tensor,
    topk_index: torch.Tensor,
    topk_logit: torch.Tensor,
    log_partition: torch.Tensor,
    temperature: float,
    tail: str = "bucket",
) -> torch.Tensor:
    """KL(teacher || student) * T^2 against a top-k teacher; see the module docstring for `tail`."""
    if tail not in TAIL_MODES:
        raise ValueError(f"tail must be one of {TAIL_MODES}, not {tail!r}")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)  # [B, C]
    log_p_top, log_p_rest = teacher_topk_log_probs(topk_logit, log_partition, temperature)
    index = topk_index.long()
    p_top = log_p_top.exp()
    kl = (torch.xlogy(p_top, p_top) - p_top * log_q.gather(-1, index)).sum(dim=-1)

    num_classes, k = student_logits.shape[-1], index.shape[-1]
    if k < num_classes:
        p_rest = log_p_rest.exp()
        outside = torch.ones_like(log_q, dtype=torch.bool).scatter_(-1, index, False)
        if tail == "bucket":
            # log of the student's mass outside the teacher's top-k, computed stably.
            log_q_rest = torch.logsumexp(log_q.masked_fill(~outside, float("-inf")), dim=-1)
            kl = kl + torch.xlogy(p_rest, p_rest) - p_rest * log_q_rest
        else:
            share = p_rest / (num_classes - k)  # teacher mass per class outside the top-k
            sum_log_q_rest = (log_q * outside).sum(dim=-1)
            kl = kl + (num_classes - k) * torch.xlogy(share, share) - share * sum_log_q_rest
    return kl.mean() * temperature**2


def log_partition_from_topk(topk_logit: torch.Tensor, temperature: float) -> torch.Tensor:
    """logsumexp(logits / T) when the cache holds every logit (a full-logit cache serves any T)."""
    return torch.logsumexp(topk_logit.float() / temperature, dim=-1)
