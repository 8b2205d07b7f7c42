"""Figures derived from the H100 runs' JSON, and the student's FLOPs counted in training mode.

    BENCH_OUT=bench/results/h100-2026-11-26 .venv/bin/python bench/h100_figures.py

Runs on a CPU in under a minute; reads bench/results/h100-2026-11-26/run{1,2}-*.json (written by
bench/gpu_check.py on the H100) and writes `derived.json` beside them: every ratio, MFU and TFLOP/s
figure that BENCHMARKS.md quotes but the runs did not write themselves.

Student FLOPs (ViT-B-16-quickgelu at 224 px, random weights, the DHO student's two 1000-class heads):
counted with torch.utils.flop_counter.FlopCounterMode over one image's forward *and backward* in
training mode, with scaled-dot-product attention forced to its math backend so that the counter sees
the attention's matrix products (it has no formula for the fused CPU attention kernel, and under
inference mode open_clip's nn.MultiheadAttention takes a fused fast path the counter does not see at
all: that count, 22.5 GFLOP, is the forward without attention or its projections). Cross-checked
against the analytic count (2 x multiply-adds of every matrix product). The optimiser step and
element-wise work are not counted (the usual MFU convention).
"""

from __future__ import annotations

import json
from contextlib import nullcontext

import torch
from common import REPO, analytic_vit_flops, save

RUNS = REPO / "bench" / "results" / "h100-2026-11-26"
STUDENT = "ViT-B-16-quickgelu"
CLASSES = 1000
IMAGENET = 1_281_167


def run_json(run: int, section: str) -> dict:
    return json.loads((RUNS / f"run{run}-{section}.json").read_text())


def student_flops() -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from dho_pipeline.clip_models import load_clip
    from dho_pipeline.student import DualHeadStudent

    visual = load_clip(STUDENT, "none").model.visual
    student = DualHeadStudent(visual, visual.output_dim, CLASSES)  # heads' values do not change FLOPs
    image = torch.randn(1, 3, 224, 224)

    def count(train: bool, backward: bool, math_attention: bool) -> tuple[int, dict]:
        student.train(train)
        attention = sdpa_kernel(SDPBackend.MATH) if math_attention else nullcontext()
        grad = torch.enable_grad() if train else torch.inference_mode()
        with grad, attention, FlopCounterMode(display=False) as counter:
            ce, kd = student(image)
            if backward:
                (ce.sum() + kd.sum()).backward()
        student.zero_grad(set_to_none=True)
        return counter.get_total_flops(), {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}

    inference, inference_ops = count(False, False, False)
    forward_default, _ = count(True, False, False)
    forward, forward_ops = count(True, False, True)
    train_step, train_ops = count(True, True, True)
    return {
        "model": STUDENT, "image_size": 224, "classes": CLASSES,
        "method": "FlopCounterMode, one image, training mode, forward + backward, SDPA math backend (CPU)",
        "training_forward_backward": train_step, "training_forward_backward_by_op": train_ops,
        "training_forward": forward, "training_forward_by_op": forward_ops,
        "training_forward_fused_attention": forward_default,
        "inference_forward": inference, "inference_forward_by_op": inference_ops,
        "analytic_forward": analytic_vit_flops(visual, CLASSES, heads=2),
    }


def student_throughput(flops: dict) -> dict:
    per_sample = flops["training_forward_backward"]
    out = {}
    for run in (1, 2):
        env, train = run_json(run, "env"), run_json(run, "train")
        rate = train["comparison"]["cached_samples_per_second"]
        flop_rate = rate * per_sample
        out[f"run{run}"] = {"cached_samples_per_second": rate, "tflop_per_second": flop_rate / 1e12,
                            "mfu_datasheet": flop_rate / env["peak_bf16_flops"],
                            "mfu_measured_matmul": flop_rate / env["measured_bf16_matmul_flops"]}
    old = 3 * flops["inference_forward"] * out["run2"]["cached_samples_per_second"]  # what was published
    out["published_before"] = {"gflop_per_image": 3 * flops["inference_forward"] / 1e9, "tflop_per_second": old / 1e12,
                               "mfu_datasheet": old / run_json(2, "env")["peak_bf16_flops"],
                               "note": "3 x the inference-mode forward count: misses attention and its projections"}
    windows = run_json(2, "train")["runs"]["cached-b256"]["windows"]
    batch = run_json(2, "train")["comparison"]["batch"]
    out["compiled_over_eager"] = out["run2"]["cached_samples_per_second"] / out["run1"]["cached_samples_per_second"]
    out["run2_first_window_seconds"] = windows[0]["step"] * 2 * batch / windows[0]["samples_per_second"]
    return out


def teacher_figures() -> dict:
    model1, model2 = run_json(1, "teacher_model")["variants"], run_json(2, "teacher_model")["variants"]
    compiled1 = run_json(1, "teacher_compile")
    env1, env2 = run_json(1, "env"), run_json(2, "env")
    flops = run_json(2, "teacher_model")["flops_per_image"]["used"]
    peak = env2["peak_bf16_flops"]
    ips = {"run1_compiled": compiled1["images_per_second"], "run2_runner": model2["runner_bf16_compiled"]["256"]["images_per_second"]}
    cache2 = run_json(2, "cache_teacher")["figures"]
    return {
        "flops_per_image": flops,
        "bf16_over_autocast_run1_b256": model1["eager_bf16"]["256"]["images_per_second"] / model1["eager_autocast"]["256"]["images_per_second"],
        "runner_over_eager_bf16_run2": ips["run2_runner"] / model2["eager_bf16"]["256"]["images_per_second"],
        "runner_over_autocast_run2": ips["run2_runner"] / model2["eager_autocast"]["256"]["images_per_second"],
        "compiled_over_eager_run1": compiled1["speedup_over_eager"],
        "images_per_second_at_60pct_datasheet": 0.6 * peak / flops,
        "images_per_second_at_60pct_measured_matmul": {"run1": 0.6 * env1["measured_bf16_matmul_flops"] / flops,
                                                        "run2": 0.6 * env2["measured_bf16_matmul_flops"] / flops},
        "mfu_measured_matmul": {"run1_compiled": ips["run1_compiled"] * flops / env1["measured_bf16_matmul_flops"],
                                "run2_runner": ips["run2_runner"] * flops / env2["measured_bf16_matmul_flops"]},
        "share_of_60pct_datasheet_rate": {k: v / (0.6 * peak / flops) for k, v in ips.items()},
        "run2_faster_than_run1_percent": {  # the same eager variant in the two runs: run-to-run spread
            name: 100 * (model2[name]["256"]["images_per_second"] / model1[name]["256"]["images_per_second"] - 1)
            for name in ("eager_autocast", "eager_bf16")},
        "imagenet_minutes_per_view_run2": IMAGENET / cache2["steady_images_per_second"] / 60,
        "decode_headroom_run2": cache2["compute_seconds_total"] / cache2["read_seconds_per_worker"],
    }


def main() -> None:
    flops = student_flops()
    figures = {"student_flops": flops, "student": student_throughput(flops), "teacher": teacher_figures(),
               "sources": sorted(str(p.relative_to(REPO)) for p in RUNS.glob("run*.json"))}
    gflop = {k: flops[k] / 1e9 for k in ("inference_forward", "training_forward_fused_attention", "training_forward",
                                        "training_forward_backward", "analytic_forward")}
    print("student GFLOP per image: " + ", ".join(f"{k} {v:.2f}" for k, v in gflop.items()))
    for run in ("run1", "run2"):
        s = figures["student"][run]
        print(f"{run}: {s['cached_samples_per_second']:.1f} samples/s -> {s['tflop_per_second']:.1f} TFLOP/s, "
              f"MFU {s['mfu_datasheet']:.1%} (datasheet), {s['mfu_measured_matmul']:.1%} (measured matmul)")
    print(json.dumps(figures["teacher"], indent=1))
    save("derived", figures)


if __name__ == "__main__":
    main()
