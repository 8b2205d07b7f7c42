"""Stage two against the cache vs with the teacher run online, with a ViT-H:ViT-B-like compute ratio.

    BENCH_OUT=bench/results/cpu-2026-11-30 .venv/bin/python bench/online_speedup.py [--steps 30]

The student and teacher are ViTs sized so that one teacher forward costs about 10x one student
forward+backward, as ViT-H/14 at 378 px (about 1.0 TFLOP) does against ViT-B/16 at 224 px (about
0.1 TFLOP); the ratio is measured with torch's FLOP counter and printed. Same student, data, batch and
steps, one thread. Step time without set-up: a 5-step and a --steps run of each mode, their difference in
this process's CPU seconds (the headline; the machine's cores are shared) and in wall-clock seconds; also
samples/s and the data-wait share from the runs' own metrics after 5 steps. JSON: cached / online
.{cpu,wall,metrics}_samples_per_second, .metrics_data_wait_fraction; speedup_{cpu,wall,metrics}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from common import Timer, save, write_class_lists, write_jpeg_shards

SIZE = 64
WARMUP = 5  # steps left out: model build, first calls, the first metrics window
STUDENT = {"embed_dim": 64, "quick_gelu": True,
           "vision_cfg": {"image_size": SIZE, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1}}
TEACHER = {"embed_dim": 128, "quick_gelu": True,
           "vision_cfg": {"image_size": SIZE, "layers": 4, "width": 256, "head_width": 64, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1}}


def flops(config_path: Path, backward: bool) -> float:
    """FLOPs of one image through the tower (and back), as torch's FLOP counter sees them with attention
    on its math backend (the counter has no formula for the fused CPU attention kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from dho_pipeline.clip_models import load_clip

    visual = load_clip(str(config_path), "none").model.visual.train(backward)
    x = torch.randn(1, 3, SIZE, SIZE)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = visual(x)
        if backward:
            out.sum().backward()
    return counter.get_total_flops()


def throughput(run_dir: Path, warmup_steps: int) -> tuple[float, float]:
    """Median samples/s and share of time waiting for data, after warm-up."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r and r["step"] > warmup_steps]
    return statistics.median(r["samples_per_second"] for r in rows), statistics.median(r["data_wait_fraction"] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    from dho_pipeline.stages import cache_teacher, manifest, split, train

    torch.set_num_threads(1)  # CPU time then counts work, not idle threads spinning

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        (folder / "bench-student.json").write_text(json.dumps(STUDENT))
        (folder / "bench-teacher.json").write_text(json.dumps(TEACHER))
        ratio = flops(folder / "bench-teacher.json", False) / flops(folder / "bench-student.json", True)
        print(f"teacher forward / student forward+backward FLOPs: {ratio:.1f} (target about 10)")
        paths = write_jpeg_shards(folder / "shards", 2, 320, size=(96, 80), num_classes=10)
        write_class_lists(folder)
        manifest.run(manifest.Config(shards=tuple(str(p) for p in paths), out=folder / "m.json"))
        cache_teacher.run(cache_teacher.Config(
            manifest=folder / "m.json", out=folder / "c.zarr", teacher=str(folder / "bench-teacher.json"),
            pretrained="none", classnames=folder / "classes.txt", templates=folder / "templates.txt", views=4,
            topk=100, workers=0,
        ))
        split.run(split.Config(manifest=folder / "m.json", percent=10, out=folder / "s.json"))
        common = dict(manifest=folder / "m.json", split=folder / "s.json", student=str(folder / "bench-student.json"),
                      pretrained="none", batch_size=args.batch_size, epochs=100, workers=0, log_every=5)
        modes = {"cached": dict(cache=folder / "c.zarr"),
                 "online": dict(cache=None, teacher_online=True, teacher=str(folder / "bench-teacher.json"),
                                teacher_pretrained="none", classnames=folder / "classes.txt",
                                templates=folder / "templates.txt")}
        train.run(train.Config(out=folder / "warm", max_steps=WARMUP, **modes["cached"], **common))  # first-call costs
        timers = {}
        for mode, extra in modes.items():  # a short and a long run: their difference is steps without set-up
            for steps in (WARMUP, args.steps):
                with Timer() as timers[mode, steps]:
                    train.run(train.Config(out=folder / f"{mode}-{steps}", max_steps=steps, **extra, **common))
        figures = {"flop_ratio_teacher_fwd_to_student_fwd_bwd": ratio, "steps": args.steps, "warmup_steps": WARMUP,
                   "batch_size": args.batch_size, "image_size": SIZE}
        for mode in modes:
            per_step = {clock: (getattr(timers[mode, args.steps], clock) - getattr(timers[mode, WARMUP], clock))
                        / (args.steps - WARMUP) for clock in ("cpu_seconds", "seconds")}
            rate, wait = throughput(folder / f"{mode}-{args.steps}", WARMUP)
            figures[mode] = {"cpu_samples_per_second": 2 * args.batch_size / per_step["cpu_seconds"],
                             "wall_samples_per_second": 2 * args.batch_size / per_step["seconds"],
                             "metrics_samples_per_second": rate, "metrics_data_wait_fraction": wait}
    for clock in ("cpu", "wall", "metrics"):
        figures[f"speedup_{clock}"] = (figures["cached"][f"{clock}_samples_per_second"]
                                       / figures["online"][f"{clock}_samples_per_second"])
    cached, online = figures["cached"], figures["online"]
    print(f"student steps, CPU time: cached {cached['cpu_samples_per_second']:.1f} samples/s, teacher online "
          f"{online['cpu_samples_per_second']:.1f} samples/s: speedup {figures['speedup_cpu']:.2f}x (wall-clock "
          f"{figures['speedup_wall']:.2f}x; from the runs' metrics {figures['speedup_metrics']:.2f}x, "
          f"{100 * cached['metrics_data_wait_fraction']:.0f}% / {100 * online['metrics_data_wait_fraction']:.0f}% "
          "of the time reading data)")
    save("online_speedup", figures)

if __name__ == "__main__":
    main()
