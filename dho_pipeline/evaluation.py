"""Evaluating a dual-head student: logits of both heads over a data set, and accuracies from them."""

from __future__ import annotations

import torch

from .student import combine_heads


@torch.no_grad()
def collect_logits(model, batches, normalize, autocast) -> dict[str, torch.Tensor]:
    """Run the model over batches ({"pixels", "labels", "ids"}); CE/KD logits on the CPU in fp32."""
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {"ce": [], "kd": [], "labels": [], "ids": []}
    for batch in batches:
        with autocast():
            ce_logits, kd_logits = model(normalize(batch["pixels"]))
        parts["ce"].append(ce_logits.float().cpu())
        parts["kd"].append(kd_logits.float().cpu())
        parts["labels"].append(batch["labels"])
        parts["ids"].append(batch["ids"])
    return {name: torch.cat(values) if values else torch.zeros(0) for name, values in parts.items()}


def topk_correct(probabilities: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    k = min(k, probabilities.shape[-1])
    return int((probabilities.topk(k, dim=-1).indices == labels.unsqueeze(-1)).any(dim=-1).sum())


def head_accuracies(logits: dict[str, torch.Tensor], alpha: float = 0.5, beta: float = 0.5) -> dict[str, float]:
    """Top-1 of the CE head, the KD head and their alpha/beta mix."""
    labels = logits["labels"]
    n = max(1, len(labels))
    return {
        "ce": topk_correct(logits["ce"], labels, 1) / n,
        "kd": topk_correct(logits["kd"], labels, 1) / n,
        "mix": topk_correct(combine_heads(logits["ce"], logits["kd"], alpha, beta), labels, 1) / n,
    }
