"""KD fidelity of a top-k cache: loss and gradient against the full KL at T = 2, per k and tail mode.

    BENCH_OUT=bench/results/cpu-2026-11-30 .venv/bin/python bench/kd_fidelity.py

Two synthetic teachers over 1000 classes, every view drawn independently (bench/common.py): CLIP-like
logits with a flat tail ("flat") and with a structured tail ("structured"). The student is the teacher
plus independent Gaussian noise: sd 3 logits (a student still learning) and sd 1 (nearly converged).
For each k and tail mode: the loss relative to the full KL, the cosine between its gradient (w.r.t. the
student's logits) and the full KL's, and their norm ratio. Renormalising onto the top-k (never done by
dho-pipeline) is shown for contrast. Correlated views, real digit logits and students that differ from
the teacher systematically: bench/kd_correlated.py.

JSON: results.<teacher>.<sd3|sd1>.<k> = {teacher_mass_outside_topk, bucket: {loss_ratio, grad_cosine,
grad_norm_ratio}, uniform: {...}, renormalised: {grad_cosine}}.
"""

from __future__ import annotations

import argparse

import torch
from common import clip_like_logits, save, structured_clip_like_logits

from dho_pipeline.kd import kd_full, kd_topk

T = 2.0
KS = [5, 10, 20, 50, 100, 200]


def fidelity(teacher: torch.Tensor, student: torch.Tensor, k: int) -> dict:
    """Top-k KD (teacher logits rounded to float16, as cached) against the full KL, for one k."""
    teacher = teacher.double()
    student = student.double().detach().requires_grad_()
    full = kd_full(student, teacher, T)
    full_grad = torch.autograd.grad(full, student)[0].flatten()
    values, indices = teacher.topk(k, dim=-1)
    log_z = torch.logsumexp(teacher / T, dim=-1)
    row = {}
    for tail in ("bucket", "uniform"):
        loss = kd_topk(student, indices, values.half().double(), log_z, T, tail)
        grad = torch.autograd.grad(loss, student)[0].flatten()
        row[tail] = {"loss_ratio": (loss / full).item(),
                     "grad_cosine": torch.nn.functional.cosine_similarity(grad, full_grad, 0).item(),
                     "grad_norm_ratio": (grad.norm() / full_grad.norm()).item()}
    renormalised = torch.full_like(teacher, -1e4).scatter(-1, indices, values)
    grad = torch.autograd.grad(kd_full(student, renormalised, T), student)[0].flatten()
    row["renormalised"] = {"grad_cosine": torch.nn.functional.cosine_similarity(grad, full_grad, 0).item()}
    p = torch.softmax(teacher / T, dim=-1)
    row["teacher_mass_outside_topk"] = (1 - p.gather(-1, indices).sum(-1)).mean().item()
    return row


def print_header(label: str) -> None:
    print(f"\n{label}, T = {T:g}: loss and gradient norm / full KL's, gradient cosine")
    print(f"{'k':>5} {'mass outside':>13} {'bucket loss':>12} {'bucket cos':>11} {'bucket |g|':>11} "
          f"{'uniform loss':>13} {'uniform cos':>12} {'uniform |g|':>12} {'renorm cos':>11}")


def print_row(k: int, row: dict) -> None:
    b, u = row["bucket"], row["uniform"]
    print(f"{k:>5} {row['teacher_mass_outside_topk']:>13.3f} {b['loss_ratio']:>12.3f} {b['grad_cosine']:>11.4f} "
          f"{b['grad_norm_ratio']:>11.3f} {u['loss_ratio']:>13.3f} {u['grad_cosine']:>12.4f} "
          f"{u['grad_norm_ratio']:>12.3f} {row['renormalised']['grad_cosine']:>11.4f}")


def sweep(label: str, teacher: torch.Tensor, student: torch.Tensor, ks=KS) -> dict:
    print_header(label)
    rows = {}
    for k in [k for k in ks if k < teacher.shape[-1]]:
        rows[str(k)] = fidelity(teacher, student, k)
        print_row(k, rows[str(k)])
    return rows


def noisy(teacher: torch.Tensor, sd: float, seed: int = 0) -> torch.Tensor:
    noise = torch.randn(teacher.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return teacher.double() + sd * noise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    teachers = {"flat": torch.from_numpy(clip_like_logits(args.rows)),
                "structured": torch.from_numpy(structured_clip_like_logits(args.rows))}
    results = {}
    for name, teacher in teachers.items():
        results[name] = {}
        for sd in (3, 1):
            label = f"{name} tail, student = teacher + N(0, {sd}^2) ({len(teacher)} views)"
            results[name][f"sd{sd}"] = sweep(label, teacher, noisy(teacher, sd))
    save("kd_fidelity", {"temperature": T, "rows": args.rows, "results": results})


if __name__ == "__main__":
    main()
