"""Peak host memory of stage one and stage two as the data set grows 10x (same shard size).

    BENCH_OUT=bench/results/cpu-2026-11-30 .venv/bin/python bench/memory.py [--shards 3 --per-shard 64]

Each measurement is a fresh `dho-pipeline` process (no DataLoader workers, so one process holds all
the memory), its peak resident set size read from the kernel (GNU time). Stage one: cache-teacher over
N and 10N shards. Stage two: train for a fixed number of steps on N and 10N shards (10% labeled).
Expected: flat up to what must grow with the data: the manifest's per-sample lists, the sample
table (a few bytes per sample) and the labeled set's preloaded teacher rows.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from common import save, write_class_lists, write_jpeg_shards

CLI = str(Path(sys.executable).parent / "dho-pipeline")


def peak_mb(*args) -> float:
    result = subprocess.run(["/usr/bin/time", "-v", CLI, *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1)) / 1024


def measure(folder: Path, shards: int, per_shard: int, classes: Path, templates: Path) -> dict:
    paths = write_jpeg_shards(folder / "shards", shards, per_shard, size=(160, 120), num_classes=10)
    tag = f"n{shards}"
    subprocess.run([CLI, "manifest", *map(str, paths), "--out", str(folder / f"{tag}.json")], check=True, capture_output=True)
    stage_one = peak_mb("cache-teacher", "--manifest", folder / f"{tag}.json", "--out", folder / f"{tag}.zarr",
                        "--teacher", "dho-test-vit", "--pretrained", "none", "--classnames", classes,
                        "--templates", templates, "--views", 4, "--workers", 0)
    subprocess.run([CLI, "split", "--manifest", str(folder / f"{tag}.json"), "--percent", "10", "--out",
                    str(folder / f"{tag}-split.json")], check=True, capture_output=True)
    stage_two = peak_mb("train", "--cache", folder / f"{tag}.zarr", "--manifest", folder / f"{tag}.json", "--split",
                        folder / f"{tag}-split.json", "--out", folder / f"{tag}-run", "--student", "dho-tiny-student",
                        "--pretrained", "none", "--batch-size", 16, "--max-steps", 20, "--workers", 0)
    return {"shards": shards, "samples": shards * per_shard, "cache_teacher_peak_mb": stage_one, "train_peak_mb": stage_two}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--per-shard", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        write_class_lists(folder)
        small = measure(folder / "small", args.shards, args.per_shard, folder / "classes.txt", folder / "templates.txt")
        large = measure(folder / "large", 10 * args.shards, args.per_shard, folder / "classes.txt", folder / "templates.txt")
    for row in (small, large):
        print(f"{row['shards']:>4} shards ({row['samples']} images): cache-teacher peak {row['cache_teacher_peak_mb']:.0f} MB, "
              f"train peak {row['train_peak_mb']:.0f} MB")
    growth = {k: large[k] / small[k] for k in ("cache_teacher_peak_mb", "train_peak_mb")}
    print(f"10x the shards: cache-teacher {growth['cache_teacher_peak_mb']:.2f}x, train {growth['train_peak_mb']:.2f}x")
    save("memory", {"small": small, "large": large, "growth": growth})


if __name__ == "__main__":
    main()
