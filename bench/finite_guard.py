"""What the training guard costs (dho_pipeline.finite_guard): per step, one fused pass over the gradients
(their L2 norm) and two flags left on the device; the host reads them once per metrics
window, where it syncs anyway.

    .venv/bin/python bench/finite_guard.py [--model ViT-B-16] [--device cpu] [--repeats 20]

1. The guard's per-step work against an AdamW step, on the gradients of the student's image tower
   (ViT-B/16 by default: 86M parameters; both passes are memory-bound, so the ratio carries over to GPUs).
2. A short training loop of a tiny student, three ways: no guard; the guard (flags read every 10
   steps); a per-step `isfinite(loss).item()`. On a CPU the last two cost the same; on a GPU the per-step
   read makes the host wait for the device every step, which the guard avoids (not measured here).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import save  # noqa: E402  (bench/common.py puts the repository on sys.path)

from dho_pipeline.clip_models import load_clip
from dho_pipeline.finite_guard import FiniteGuard


def _median_seconds(work, repeats: int, sync) -> float:
    times = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        work()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def guard_against_optimizer(model_name: str, device, repeats: int) -> dict:
    tower = load_clip(model_name, "none").model.visual.to(device)
    parameters = [p for p in tower.parameters() if p.requires_grad]
    for p in parameters:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = torch.optim.AdamW(parameters, lr=1e-6)
    guard = FiniteGuard(parameters)
    loss = torch.tensor(1.0, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def guarded():
        guard.add({}, loss)
        guard.end_step(0)

    guard_s = _median_seconds(guarded, repeats, sync)
    step_s = _median_seconds(optimizer.step, repeats, sync)
    return {"model": model_name, "parameters": sum(p.numel() for p in parameters), "guard_ms": guard_s * 1e3,
            "adamw_step_ms": step_s * 1e3, "guard_over_adamw": guard_s / step_s}


WARMUP_STEPS = 5


def training_loop(device, steps: int) -> dict:
    loaded = load_clip("dho-tiny-student", "none")
    size = loaded.preprocess.image_size
    figures = {}
    for mode in ("none", "guard", "per-step item"):
        torch.manual_seed(0)
        model = load_clip("dho-tiny-student", "none").model.visual.to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        guard = FiniteGuard(model.parameters())
        pixels = torch.randn(16, 3, *size, device=device)
        batch = {"labeled": {"keys": [str(i) for i in range(16)]}}
        for step in range(-WARMUP_STEPS, steps + 1):  # steps up to 0 warm up (first calls, allocator), untimed
            if step == 1:
                started = time.perf_counter()
            loss = model(pixels).square().mean()
            loss.backward()
            if mode == "guard":
                guard.add(batch, loss)
                guard.end_step(step)
                if step % 10 == 0:  # as train checks: at each metrics line
                    guard.check(0, report=None, write_report=False)
            elif mode == "per-step item" and not torch.isfinite(loss).item():
                raise RuntimeError("not finite")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        figures[mode] = (time.perf_counter() - started) / steps * 1e3
    return {"steps": steps, "ms_per_step": figures, "guard_overhead": figures["guard"] / figures["none"] - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    device = torch.device(args.device)
    passes = guard_against_optimizer(args.model, device, args.repeats)
    print(f"{passes['model']} ({passes['parameters'] / 1e6:.0f}M parameters) on {device}: guard {passes['guard_ms']:.1f} ms "
          f"per step, AdamW step {passes['adamw_step_ms']:.1f} ms: the guard is {passes['guard_over_adamw']:.2f}x "
          "an optimiser step")
    loop = training_loop(device, args.steps)
    per_step = ", ".join(f"{mode} {ms:.2f} ms" for mode, ms in loop["ms_per_step"].items())
    print(f"tiny student, {loop['steps']} steps on {device}: {per_step} per step; guard overhead "
          f"{loop['guard_overhead'] * 100:+.1f}%")
    save("finite_guard", {"passes": passes, "loop": loop})


if __name__ == "__main__":
    main()
