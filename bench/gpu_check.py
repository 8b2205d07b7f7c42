#!/usr/bin/env python3
"""GPU check: teacher throughput and MFU, cache-teacher vs model only, cached vs online training.

On the device machine (one H100 or H200), from the repository root, with the wheels of
/work/shared/gpu/wheels (see its README; `regex` included) copied into the ignored folder `.whl/`:

    BENCH_COMMIT=<git rev-parse HEAD>[-dirty] bash bench/gpu_check.sh [--quick] [--budget 430]

(the device machine has no git: BENCH_COMMIT puts the commit into every JSON). The script stops
itself after --budget seconds (default 450; give the run tool ~60 s more for the install). Figures land
as JSON in --out (default $OUT, else bench-out/gpu), each file rewritten after every section, so a
timeout still leaves figures, each with its provenance (bench/common.py):

    env.json             devices, versions, the bf16 matrix product's measured FLOP rate
    teacher_model.json   section 1: ViT-H-14-378-quickgelu images/s per variant and batch, FLOPs, MFU
    cache_teacher.json   section 2: the real `cache-teacher` stage on generated JPEG shards
    train.json           section 3: ViT-B-16-quickgelu student steps, cached vs --teacher-online
    teacher_compile.json section 4: torch.compile of the best eager variant (compile capped)
    summary.json         headline figures against the targets, per-section status and time, the log

On a CPU the same code paths run with tiny models in a minute or two (no GPU needed):

    .venv/bin/python bench/gpu_check.py --toy

Sections (bench/gpu_teacher.py, bench/gpu_stages.py; each runs under a time cap, and an error or a
cap is recorded in its JSON before the next one runs):
 1 teacher_model: the teacher with random weights, wrapped in ZeroShotTeacher with a random 1000-class
   classifier; FLOPs per image; images/s for each batch size as fp32 weights + bf16 autocast and as
   bf16 weights; at the best batch the library's TeacherRunner (bf16, compiled: the stage's default)
   and cache-teacher's per-batch path; unless --quick also channels-last input, open_clip's SDPA block
   (vision `block_type: custom`, same weights) and kernel-time profiles.
 2 cache_teacher: generated shards (written by dho_pipeline.shard_writer in a process pool while
   section 1 runs), manifest, `stages.cache_teacher.run`; steady-state images/s from the teacher's
   own call times; per-shard read/compute/write seconds; the ratio to the model-only figure.
 3 train: split (10%), `stages.train.run` against the cache and with --teacher-online, same student,
   data and batch (256 + 256; 128 + 128 on OOM); samples/s from metrics.jsonl after warm-up.
 4 teacher_compile: torch.compile of section 1's best eager variant (skipped past --compile-cap).

The H100 runs of 2026-11-26 are in bench/results/h100-2026-11-26/ (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (bench/ on the path first: common puts the repository on it)
from gpu_run import Run, error_text, run_section, write_summary  # noqa: E402


def settings(toy: bool, compile_backend: str | None) -> dict:
    if toy:
        return dict(
            teacher="dho-tiny-teacher", student="dho-tiny-student", device="cpu", batches=[4, 8, 16],
            shards=2, per_shard=64, image=(64, 48), label_classes=20, gen_procs=2, workers=2,
            train_batches=[16, 8], cached_steps=8, online_steps=6, log_every=2, warmup_steps=2,
            measure_seconds=0.15, compile_backend=compile_backend or "aot_eager", stage_precision="bf16",
            stage_compile=True, budget=400.0,  # generous: the 2 shared CPU cores are often busy
            caps=dict(teacher_model=150, cache_teacher=80, train=120, teacher_compile=60),
        )
    return dict(
        teacher="ViT-H-14-378-quickgelu", student="ViT-B-16-quickgelu", device="cuda", batches=[64, 128, 256],
        shards=24, per_shard=512, image=(500, 375), label_classes=100, gen_procs=14, workers=14,
        train_batches=[256, 128], cached_steps=50, online_steps=20, log_every=5, warmup_steps=10,
        measure_seconds=2.5, compile_backend=compile_backend or "inductor", stage_precision=None,
        stage_compile=None, budget=450.0,
        caps=dict(teacher_model=170, cache_teacher=150, train=230, teacher_compile=150),
    )


def quiet_progress_bars() -> None:
    """The stages' progress bars would bury the log lines in the run tool's output tail."""
    import logging

    import tqdm

    class QuietBar(tqdm.tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, **{**k, "disable": True})

    tqdm.tqdm = QuietBar
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[dho_pipeline] %(message)s"))
    logger = logging.getLogger("dho_pipeline")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench-out/gpu", help="folder for the JSON figures")
    parser.add_argument("--toy", action="store_true", help="tiny models on the CPU: every code path in a minute or two")
    parser.add_argument("--work", default=None, help="scratch folder (shards, cache, runs); wiped at start")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole script (450; toy 400)")
    parser.add_argument("--quick", action="store_true",
                        help="section 1 at one batch size, no profiles or layout/attention variants (a rerun)")
    parser.add_argument("--compile-cap", type=float, default=90.0, help="skip torch.compile if compiling takes longer")
    parser.add_argument("--compile-backend", default=None, help="inductor (real) / aot_eager (toy)")
    parser.add_argument("--sections", default="teacher_model,cache_teacher,train,teacher_compile",
                        help="comma-separated subset, in this order")
    parser.add_argument("--inject-error", default=None, help="raise in this section (tests the error capture)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    import gpu_stages
    import gpu_teacher

    args = parse(argv)
    cfg = settings(args.toy, args.compile_backend)
    work = Path(args.work or ("/tmp/dho-gpu-check-toy" if args.toy else "/tmp/dho-gpu-check"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    run = Run(args, cfg, work)
    run.say(f"gpu_check {'TOY' if args.toy else 'REAL'}: out {run.out}, work {work}, budget {run.remaining():.0f}s")
    quiet_progress_bars()
    sections = {"teacher_model": gpu_teacher.section_teacher_model, "cache_teacher": gpu_stages.section_cache_teacher,
                "train": gpu_stages.section_train, "teacher_compile": gpu_teacher.section_teacher_compile}
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in sections]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; known: {', '.join(sections)}")
    if set(wanted) & {"teacher_model", "cache_teacher", "train"}:
        gpu_stages.start_data(run)  # a forked pool: before CUDA is initialised
    run.save("env", gpu_teacher.environment(run))

    import torch

    if not args.toy and not torch.cuda.is_available():
        run.say("no CUDA device: the real run needs one (use --toy on a CPU)")
        write_summary(run)
        return 2
    if args.toy:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    for name in wanted:
        run_section(run, name, sections[name])
    gpu_stages.stop_data(run)
    failed = [n for n, s in run.status.items() if s.get("status") != "ok"]
    run.say(f"done in {time.perf_counter() - run.started:.0f}s; sections not ok: {failed or 'none'}; figures in {run.out}")
    write_summary(run)
    return 0 if not failed else 1


if __name__ == "__main__":
    code = 3
    try:
        code = main()
    except SystemExit:
        sys.stdout.flush()
        raise
    except BaseException as error:  # noqa: BLE001 - whatever happens, leave a trace behind
        print(f"[gpu_check] FATAL {type(error).__name__}: {error}\n{error_text(error)}", flush=True)
        common.save("summary", {"fatal": error_text(error)}, out=Path(os.environ.get("OUT") or "bench-out/gpu"), quiet=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: leftover compile workers or loader threads must not hold the device
    # machine after the figures are written.
    os._exit(code)
