"""Stage two against the cache vs with the teacher run online, with a ViT-H:ViT-B-like compute ratio.

    .venv/bin/python bench/online_speedup.py [--steps 30]

The student and teacher are ViTs sized so that one teacher forward costs about 10x one student
forward+backward, as ViT-H/14 at 378 px (about 1.0 TFLOP) does against ViT-B/16 at 224 px (about
0.1 TFLOP); the ratio is measured with torch's FLOP counter and printed. Same student, data, batch and
steps; step time from the runs' own metrics (after warm-up). Prints samples/s both ways and the speedup.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from common import save, write_class_lists, write_jpeg_shards

SIZE = 64
STUDENT = {"embed_dim": 64, "quick_gelu": True,
           "vision_cfg": {"image_size": SIZE, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1}}
TEACHER = {"embed_dim": 128, "quick_gelu": True,
           "vision_cfg": {"image_size": SIZE, "layers": 4, "width": 256, "head_width": 64, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1}}


def flops(config_path: Path, backward: bool) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from dho_pipeline.clip_models import load_clip

    visual = load_clip(str(config_path), "none").model.visual
    x = torch.randn(1, 3, SIZE, SIZE)
    with FlopCounterMode(display=False) as counter:
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
                      pretrained="none", batch_size=args.batch_size, epochs=100, max_steps=args.steps, workers=0,
                      log_every=5)
        train.run(train.Config(cache=folder / "c.zarr", out=folder / "warm", **{**common, "max_steps": 5}))
        train.run(train.Config(cache=folder / "c.zarr", out=folder / "cached", **common))
        train.run(train.Config(cache=None, out=folder / "online", teacher_online=True,
                               teacher=str(folder / "bench-teacher.json"), teacher_pretrained="none",
                               classnames=folder / "classes.txt", templates=folder / "templates.txt", **common))
        cached, cached_wait = throughput(folder / "cached", 5)
        online, online_wait = throughput(folder / "online", 5)
    print(f"student steps: cached {cached:.1f} samples/s ({100 * cached_wait:.0f}% of the time reading data), "
          f"teacher online {online:.1f} samples/s ({100 * online_wait:.0f}% reading data): speedup {cached / online:.2f}x")
    save("online_speedup", {"flop_ratio_teacher_fwd_to_student_fwd_bwd": ratio, "cached_samples_per_second": cached,
                            "online_samples_per_second": online, "speedup": cached / online, "steps": args.steps,
                            "cached_data_wait_fraction": cached_wait, "online_data_wait_fraction": online_wait,
                            "batch_size": args.batch_size, "image_size": SIZE})


if __name__ == "__main__":
    main()
