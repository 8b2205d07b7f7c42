"""How the demo's training settings were chosen: on the digits' train part only, never on the test part.

    .venv/bin/python bench/demo_tuning.py --demo demo-out --work bench-out/tuning --results bench-out/tuning \
        dho:8:30:2e-3:16:10:0 ce:8:30:2e-3:16:10:0 online:0:30:2e-3:16:10:0 ...

A run is `objective:views:epochs:lr:batch:percent:seed` (objective dho, ce, single-head, or online for DHO
with the teacher run online). Each trains the demo's student through the command line on the train part
(`--demo`: a folder where `dho-pipeline demo` has run, for its train manifest and weights), with a split
that holds out 20 images per class (200) that are never trained on, not even as unlabeled images, and
measures each head and the mix on those 200 (`calibrate --split`: the CE and KD heads, the mix at alpha =
beta = 0.5, and the calibrated mix, which is optimistic: chosen on the same 200). Also each run's CPU
seconds (one torch thread: load-independent where wall time is not). Writes one JSON line per run to
<work>/runs.jsonl and everything to <results>/demo_tuning.json with its provenance (bench/common.py).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import time
from pathlib import Path

from common import save

HOLDOUT_PER_CLASS = 20  # the validation slice of the train part


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="objective:views:epochs:lr:batch:percent:seed")
    parser.add_argument("--demo", type=Path, required=True, help="a folder where `dho-pipeline demo` has run")
    parser.add_argument("--work", type=Path, default=Path("bench-out/tuning"))
    parser.add_argument("--results", type=Path, help="folder for demo_tuning.json (default: --work)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from dho_pipeline.cache_store import TeacherCache
    from dho_pipeline.demo.digits import CROP_SCALE
    from dho_pipeline.stages.cli import main as cli_main

    def cli(*words) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            cli_main.main(args=[str(w) for w in words], standalone_mode=False)

    demo, work = args.demo, args.work
    work.mkdir(parents=True, exist_ok=True)
    crop = ",".join(f"{v:g}" for v in CROP_SCALE)
    teacher_weights = demo / "weights" / "tiny-teacher.safetensors"
    teacher = ["--teacher", "dho-tiny-teacher", "--templates", demo / "templates.txt"]

    def cache(views: int, seed: int) -> Path:
        path = work / f"cache-v{views}-s{seed}.zarr"
        try:
            if not TeacherCache.open(path).incomplete_shards():
                return path
        except Exception:
            pass
        cli("cache-teacher", "--manifest", demo / "train.json", "--out", path, *teacher, "--pretrained", teacher_weights,
            "--views", views, "--topk", "all", "--seed", seed, "--crop-scale", crop, "--workers", "0")
        return path

    def split(percent: str, seed: str) -> Path:
        path = work / f"split-{percent}-s{seed}-h{HOLDOUT_PER_CLASS}.json"
        if not path.exists():
            cli("split", "--manifest", demo / "train.json", "--percent", percent, "--seed", seed,
                "--holdout", HOLDOUT_PER_CLASS, "--out", path)
        return path

    rows = []
    for spec in args.runs:
        objective, views, epochs, lr, batch, percent, seed = spec.split(":")
        run = work / "runs" / spec.replace(":", "_")
        shutil.rmtree(run, ignore_errors=True)
        held_out = split(percent, seed)
        common = ["--manifest", demo / "train.json", "--split", held_out, "--student", "dho-tiny-student",
                  "--pretrained", demo / "weights" / "tiny-student.safetensors", "--epochs", epochs, "--batch-size", batch,
                  "--lr", lr, "--seed", seed, "--workers", "0", "--log-every", 10, "--out", run]
        source = ["--cache", cache(int(views), int(seed)), "--objective", objective] if objective != "online" else \
            ["--teacher-online", "--teacher-pretrained", teacher_weights, *teacher, "--crop-scale", crop]
        wall, cpu = time.perf_counter(), time.process_time()
        cli("train", *common, *source)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        cli("calibrate", "--checkpoint", run / "student.pt", "--data", demo / "train.json", "--split", held_out,
            "--out", run / "calibrated.pt", "--workers", "0")
        report = json.loads((run / "calibrated.pt.calibration.json").read_text())
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        last = [m for m in metrics if "loss" in m][-1]
        row = {"spec": spec, "val_images": report["samples"], "ce": report["accuracy"]["ce"], "kd": report["accuracy"]["kd"],
               "mix_cal": report["accuracy"]["mix"], "mix_05": report["paper_setting"]["accuracy"],
               "alpha": report["alpha"], "beta": report["beta"],
               "final_losses": {k: round(v, 3) for k, v in last.items() if k.startswith(("ce_", "kd_"))},
               "train_wall": round(wall, 1), "train_cpu": round(cpu, 1), "load": os.getloadavg()[0]}
        rows.append(row)
        with open(work / "runs.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row))
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
    save("demo_tuning", {"holdout_per_class": HOLDOUT_PER_CLASS, "runs": rows}, out=args.results or args.work)


if __name__ == "__main__":
    main()
