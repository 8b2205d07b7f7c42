"""Evaluating a dual-head student: logits over a data set, reducible statistics, the alpha/beta search.

Everything a report needs is computed as sums (correct counts, NLL sums, calibration bins, per-class
counts), so each process can evaluate its own slice of the data and a plain all-reduce of the sums
gives exactly the numbers a single process would: every sample counted once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .student import PAPER_ALPHA_BETA, combine_heads

ECE_BINS = 15
ALPHA_GRID = [round(0.05 * i, 2) for i in range(21)]  # the reference grid: 0, 0.05, ..., 1
BETA_GRID = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0]


@torch.no_grad()
def collect_logits(model, batches, normalize, autocast, progress: str | None = None) -> dict[str, torch.Tensor]:
    """Run the model over batches ({"pixels", "labels", "ids"}); CE/KD logits on the CPU in fp32.
    `progress`: a progress bar's label (none if None)."""
    from .progress import progress as bar

    model.eval()
    parts: dict[str, list[torch.Tensor]] = {"ce": [], "kd": [], "labels": [], "ids": []}
    total = len(batches) if hasattr(batches, "__len__") else None
    for batch in bar(batches, desc=progress, total=total, unit="batch", leave=False, show=progress is not None):
        with autocast():
            ce_logits, kd_logits = model(normalize(batch["pixels"]))
        parts["ce"].append(ce_logits.float().cpu())
        parts["kd"].append(kd_logits.float().cpu())
        parts["labels"].append(batch["labels"])
        parts["ids"].append(batch["ids"])
    return {name: torch.cat(values) if values else torch.zeros(0) for name, values in parts.items()}


def head_probabilities(logits: dict[str, torch.Tensor], alpha: float, beta: float) -> dict[str, torch.Tensor]:
    return {
        "ce": F.softmax(logits["ce"], dim=-1),
        "kd": F.softmax(logits["kd"], dim=-1),
        "mix": combine_heads(logits["ce"], logits["kd"], alpha, beta),
    }


def statistics_size(num_classes: int) -> int:
    return 3 * (3 + 3 * ECE_BINS + num_classes) + num_classes + 1


def sufficient_statistics(logits: dict[str, torch.Tensor], alpha: float, beta: float, num_classes: int) -> torch.Tensor:
    """One flat float64 vector of sums (see `finish_statistics`); add vectors to merge data slices.

    Per head (CE, KD, mix): correct top-1, correct top-5, NLL sum; per confidence bin: count,
    confidence sum, correct sum; correct per class. Then the per-class totals and the sample count.
    """
    labels = logits["labels"].long()
    if not len(labels):
        return torch.zeros(statistics_size(num_classes), dtype=torch.float64)
    rows = []
    for probabilities in head_probabilities(logits, alpha, beta).values():
        confidence, predicted = probabilities.max(dim=-1)
        correct = (predicted == labels).double()
        in_top5 = (probabilities.topk(min(5, num_classes), dim=-1).indices == labels.unsqueeze(-1)).any(-1)
        nll = -torch.log(probabilities.gather(-1, labels.unsqueeze(-1)).squeeze(-1).clamp_min(1e-12))
        bins = (confidence * ECE_BINS).long().clamp(max=ECE_BINS - 1)
        zeros = torch.zeros(ECE_BINS, dtype=torch.float64)
        rows += [
            torch.tensor([correct.sum(), in_top5.sum(), nll.sum()], dtype=torch.float64),
            torch.bincount(bins, minlength=ECE_BINS).double(),
            zeros.index_add(0, bins, confidence.double()),
            zeros.index_add(0, bins, correct),
            torch.bincount(labels, weights=correct, minlength=num_classes).double(),
        ]
    rows += [torch.bincount(labels, minlength=num_classes).double(), torch.tensor([float(len(labels))], dtype=torch.float64)]
    return torch.cat(rows)


def finish_statistics(stats: torch.Tensor, num_classes: int) -> dict:
    """Accuracies (top-1, top-5), NLL and ECE per head, and per-class counts, from summed statistics."""
    stats = stats.double().cpu()
    total = max(1.0, stats[-1].item())
    width = 3 + 3 * ECE_BINS + num_classes
    report = {"samples": int(stats[-1].item())}
    per_class_total = stats[3 * width : 3 * width + num_classes]
    for i, head in enumerate(("ce", "kd", "mix")):
        row = stats[i * width : (i + 1) * width]
        counts, confidence, correct = (row[3 + j * ECE_BINS : 3 + (j + 1) * ECE_BINS] for j in range(3))
        ece = sum(abs(correct[b] - confidence[b]).item() for b in range(ECE_BINS) if counts[b] > 0) / total
        report[head] = {
            "top1": row[0].item() / total,
            "top5": row[1].item() / total,
            "nll": row[2].item() / total,
            "ece": ece,
            "per_class_correct": [int(v) for v in row[3 + 3 * ECE_BINS :].tolist()],
        }
    report["per_class_total"] = [int(v) for v in per_class_total.tolist()]
    return report


def grid_scores(logits: dict[str, torch.Tensor], alphas: list[float], betas: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Correct top-1 counts and NLL sums of the mix for every (alpha, beta): two float64
    [len(alphas), len(betas)] tensors (sums, so slices of the data add up)."""
    labels = logits["labels"].long()
    counts = torch.zeros(len(alphas), len(betas), dtype=torch.float64)
    nll = torch.zeros(len(alphas), len(betas), dtype=torch.float64)
    if not len(labels):
        return counts, nll
    p_ce = F.softmax(logits["ce"].float(), dim=-1)
    for j, beta in enumerate(betas):
        p_kd = F.softmax(logits["kd"].float() / beta, dim=-1)
        for i, alpha in enumerate(alphas):
            mix = alpha * p_ce + (1 - alpha) * p_kd
            counts[i, j] = (mix.argmax(-1) == labels).sum()
            nll[i, j] = -torch.log(mix.gather(-1, labels.unsqueeze(-1)).clamp_min(1e-12)).double().sum()
    return counts, nll


def best_point(counts: torch.Tensor, alphas: list[float], betas: list[float],
               nll: torch.Tensor | None = None) -> tuple[float, float, float]:
    """The (alpha, beta) with the most correct. On a small held-out set many points tie on accuracy;
    given `nll` (the grid's NLL sums) ties go to the lowest held-out NLL, and what still ties to the
    point nearest the paper's (0.5, 0.5)."""
    best = counts.max().item()
    tied = [(i, j) for i in range(len(alphas)) for j in range(len(betas)) if counts[i, j].item() == best]
    if nll is not None:
        lowest = min(nll[i, j].item() for i, j in tied)
        # equal up to float rounding (alpha = 1 ignores beta: those points are the same mix)
        tied = [(i, j) for i, j in tied if nll[i, j].item() <= lowest + 1e-9 * max(1.0, abs(lowest))]
    a0, b0 = PAPER_ALPHA_BETA
    alpha, beta = min(((alphas[i], betas[j]) for i, j in tied),
                      key=lambda p: (abs(p[0] - a0) + abs(math.log(p[1] / b0)), p))
    return alpha, beta, best


def tied_at_best(counts: torch.Tensor) -> int:
    """How many grid points share the best accuracy (1: the accuracy alone chose the point)."""
    return int((counts == counts.max()).sum().item())


def refinement_grid(alpha: float, beta: float) -> tuple[list[float], list[float]]:
    """A finer grid around a coarse optimum: alpha +-0.05 by 0.01, beta x 0.8..1.25."""
    alphas = sorted({round(min(1.0, max(0.0, alpha + 0.01 * k)), 2) for k in range(-5, 6)})
    betas = sorted({round(beta * f, 4) for f in (0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2, 1.25)})
    return alphas, betas


def logits_on_samples(model, table, sample_ids, image_size, normalize, *, rank: int, world: int, batch_size: int,
                      workers: int, autocast, eval_view: str = "center-square", crop: float = 1.0,
                      progress: str | None = None) -> dict[str, torch.Tensor]:
    """CE/KD logits of a dual-head model on this process's share of `sample_ids` (rows of a
    student_data.SampleTable): process r takes ids r, r + world, ... Each image shows the student's
    evaluation view: `eval_view` "center-square" (the centred square, `crop` of the shorter side, one
    bicubic resize, rendered as in training) or "reference" (the reference's Resize(378) -> CenterCrop(378)
    -> Resize(224) chain)."""
    from .student_data import FiniteIdStream, StudentBatches, StudentLoader

    stream = FiniteIdStream(sample_ids, batch_size, rank, world)
    dataset = StudentBatches(table, stream, image_size, num_batches=stream.num_batches, eval_view=eval_view,
                             eval_crop=crop)
    loader = StudentLoader(dataset, min(workers, stream.num_batches))
    return collect_logits(model, loader, normalize, autocast, progress)


def student_logits_on(loaded, manifest, sample_ids, *, rank: int, world: int, batch_size: int, workers: int,
                      device, autocast, eval_view: str = "center-square", progress: str | None = None
                      ) -> dict[str, torch.Tensor]:
    """`logits_on_samples` for a loaded student (student_checkpoint.LoadedStudent) on a manifest."""
    from .pixels import Normalizer
    from .student_data import SampleTable

    normalize = Normalizer(loaded.preprocess.mean, loaded.preprocess.std, device)
    return logits_on_samples(loaded.model.to(device), SampleTable.from_manifest(manifest), sample_ids,
                             loaded.preprocess.image_size, normalize, rank=rank, world=world, batch_size=batch_size,
                             workers=workers, autocast=autocast, eval_view=eval_view,
                             crop=loaded.preprocess.crop_fraction, progress=progress)


def epoch_evaluator(eval_data, student, normalize, preprocess, classnames, *, rank: int, world: int, batch_size: int,
                    workers: int, autocast, reduce_sum, eval_view: str = "center-square"):
    """train --eval-data: a function that evaluates each head and the alpha = beta = 0.5 mix on a manifest,
    or None without one. Each process evaluates its share (`rank` of `world`); `reduce_sum` adds the
    statistics over processes, so each sample counts once."""
    if eval_data is None:
        return None
    import numpy as np

    from .manifest import load_manifest
    from .student_data import SampleTable

    eval_manifest = load_manifest(eval_data)
    eval_manifest.check_files()
    eval_manifest.check_labels(len(classnames), required=True)
    table = SampleTable.from_manifest(eval_manifest)

    def evaluate() -> dict:
        logits = logits_on_samples(
            student, table, np.arange(len(table.label)), preprocess.image_size, normalize, rank=rank, world=world,
            batch_size=batch_size, workers=workers, autocast=autocast, eval_view=eval_view,
            crop=preprocess.crop_fraction,
        )
        report = finish_statistics(reduce_sum(sufficient_statistics(logits, 0.5, 0.5, len(classnames))),
                                   len(classnames))
        return {head: report[head]["top1"] for head in ("ce", "kd", "mix")} | {"samples": report["samples"]}

    return evaluate
