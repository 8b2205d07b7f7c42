"""KD fidelity of a top-k cache: loss and gradient against the full KL at T = 2, per k and tail mode.

    .venv/bin/python bench/kd_fidelity.py [--demo-cache demo-out/teacher.zarr]

Two teachers: CLIP-like logits over 1000 classes (bench/common.py) and, if given, the demo teacher's
real cached logits (10 digit classes; a `--topk all` cache). The student is the teacher plus Gaussian
noise: sd 3 logits (a student still learning, as in NOTES section 5) and sd 1 (nearly converged). For each k and tail mode:
the loss relative to the full KL, and the cosine between its gradient (w.r.t. the student's logits)
and the full KL's. Renormalising onto the top-k (never done by dho-pipeline) is shown for contrast.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from common import clip_like_logits, save, structured_clip_like_logits

from dho_pipeline.kd import kd_full, kd_topk

T = 2.0
KS = [5, 10, 20, 50, 100, 200]


def fidelity(teacher: torch.Tensor, k: int, noise_sd: float, seed: int = 0) -> dict:
    teacher = teacher.double()
    noise = torch.randn(teacher.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    student = (teacher + noise_sd * noise).requires_grad_()
    full = kd_full(student, teacher, T)
    full_grad = torch.autograd.grad(full, student)[0].flatten()
    values, indices = teacher.topk(k, dim=-1)
    log_z = torch.logsumexp(teacher / T, dim=-1)
    row = {}
    for tail in ("bucket", "uniform"):
        loss = kd_topk(student, indices, values.half().double(), log_z, T, tail)  # values rounded as cached
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


def demo_logits(path: str) -> torch.Tensor:
    from dho_pipeline.cache_store import TeacherCache

    cache = TeacherCache.open(path)
    if not cache.spec.full_logits:
        raise SystemExit(f"{path} is not a --topk all cache")
    rows = []
    for index in range(len(cache.spec.shards)):
        arrays = cache.read_shard(index, ("topk_index", "topk_logit"))
        full = np.zeros(arrays["topk_index"].shape, np.float32)
        np.put_along_axis(full, arrays["topk_index"].astype(np.int64), arrays["topk_logit"].astype(np.float32), axis=-1)
        rows.append(full.reshape(-1, full.shape[-1]))
    return torch.from_numpy(np.concatenate(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--demo-cache", help="a demo teacher cache made with --topk all (demo-out/teacher.zarr)")
    args = parser.parse_args()
    teachers = {"clip-like, 1000 classes": torch.from_numpy(clip_like_logits(args.rows)),
                "clip-like with a structured tail, 1000 classes": torch.from_numpy(structured_clip_like_logits(args.rows))}
    if args.demo_cache:
        teachers["demo teacher, 10 digit classes"] = demo_logits(args.demo_cache)
    results = {}
    for name, teacher in teachers.items():
        for noise_sd in (3.0, 1.0):
            label = f"{name}, student = teacher + N(0, {noise_sd:g}^2)"
            print(f"\n{label} ({len(teacher)} views), T = {T:g}: loss and gradient norm / full KL's, gradient cosine")
            print(f"{'k':>5} {'mass outside':>13} {'bucket loss':>12} {'bucket cos':>11} {'bucket |g|':>11} "
                  f"{'uniform loss':>13} {'uniform cos':>12} {'uniform |g|':>12} {'renorm cos':>11}")
            results[label] = {}
            for k in [k for k in KS if k <= teacher.shape[-1]] or [teacher.shape[-1]]:
                row = fidelity(teacher, k, noise_sd)
                results[label][str(k)] = row
                b, u = row["bucket"], row["uniform"]
                print(f"{k:>5} {row['teacher_mass_outside_topk']:>13.3f} {b['loss_ratio']:>12.3f} {b['grad_cosine']:>11.4f} "
                      f"{b['grad_norm_ratio']:>11.3f} {u['loss_ratio']:>13.3f} {u['grad_cosine']:>12.4f} "
                      f"{u['grad_norm_ratio']:>12.3f} {row['renormalised']['grad_cosine']:>11.4f}")
    save("kd_fidelity", {"temperature": T, "results": results})


if __name__ == "__main__":
    main()
