"""gpu_check's stage sections: generated data, the real `cache-teacher` stage (section 2) and the real
`train` stage against the cache and with the teacher online (section 3).

Each section takes gpu_check's `Run` (bench/gpu_run.py). See bench/gpu_check.py for how to run them.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import torch
from common import jpeg_shard, write_class_lists
from gpu_run import CapExceeded, error_text, free_memory

# ---- generated data (written in the background while section 1 runs) --------------------------------


def start_data(run) -> None:
    """ImageNet-like JPEG shards, one per job, by bench/common.py's `jpeg_shard` (the project's own
    shard writer) in a forked process pool: started before CUDA is initialised."""
    cfg = run.cfg
    folder = run.work / "shards"
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder), s, cfg["per_shard"], tuple(cfg["image"]), cfg["label_classes"], 0) for s in range(cfg["shards"])]
    pool = multiprocessing.get_context("fork").Pool(cfg["gen_procs"])
    run.shared["data"] = {"pool": pool, "result": pool.map_async(jpeg_shard, jobs), "started": time.perf_counter(),
                          "folder": folder}
    run.say(f"generating {cfg['shards']} shards x {cfg['per_shard']} JPEGs {cfg['image']} with {cfg['gen_procs']} processes")


def wait_for_data(run) -> list[str]:
    data = run.shared["data"]
    if "paths" not in data:
        data["paths"] = sorted(data["result"].get(timeout=max(1.0, run.remaining())))
        data["pool"].close()
        data["pool"].join()
        data["seconds"] = time.perf_counter() - data["started"]
        data["bytes"] = sum(os.path.getsize(p) for p in data["paths"])
        run.say(f"data ready: {len(data['paths'])} shards, {data['bytes'] / 2**20:.0f} MiB, {data['seconds']:.1f}s after start")
    return data["paths"]


def stop_data(run) -> None:
    data = run.shared.get("data")
    if data and "paths" not in data:
        data["pool"].terminate()


def ensure_inputs(run) -> list[str]:
    """Shards, manifest, 1000 class names and one template: made once, used by sections 2 and 3."""
    from dho_pipeline.stages import manifest

    paths = wait_for_data(run)
    if "manifest" not in run.shared:
        started = time.perf_counter()
        manifest.run(manifest.Config(shards=tuple(paths), out=run.work / "manifest.json", workers=8))
        classes, templates = write_class_lists(run.work)
        run.shared.update(manifest=run.work / "manifest.json", classes=classes, templates=templates,
                          manifest_seconds=time.perf_counter() - started)
    return paths


# ---- section 2: the real cache-teacher stage ---------------------------------------------------------


class CallClock:
    """Times of the teacher's calls inside the stage (TeacherRunner.__call__) and of the teacher's
    construction (ZeroShotTeacher.__init__), recorded by wrapping both methods while the stage runs."""

    def __enter__(self):
        from dho_pipeline import teacher

        self.calls: list[tuple[float, int]] = []
        self.built: list[float] = []
        self.module = teacher
        self.originals = teacher.TeacherRunner.__call__, teacher.ZeroShotTeacher.__init__
        call, init = self.originals
        clock = self

        def timed_call(runner, images):
            clock.calls.append((time.perf_counter(), int(images.shape[0])))
            return call(runner, images)

        def timed_init(model, *args, **kwargs):
            init(model, *args, **kwargs)
            clock.built.append(time.perf_counter())

        teacher.TeacherRunner.__call__, teacher.ZeroShotTeacher.__init__ = timed_call, timed_init
        return self

    def __exit__(self, *exc):
        self.module.TeacherRunner.__call__, self.module.ZeroShotTeacher.__init__ = self.originals


def steady_figures(clock: CallClock, started: float, ended: float) -> dict:
    """Images/s between the second and the last teacher call (set-up, the first call's compile, pipeline
    fill and the writer's tail excluded; each call ends in .cpu(), so it is synced), and overall."""
    calls, built = clock.calls, clock.built
    images = sum(n for _, n in calls)
    figures = {"images": images, "batches": len(calls), "images_per_second_whole_run": images / (ended - started)}
    if built:
        figures["images_per_second_after_setup"] = images / (ended - built[0])
        figures["teacher_setup_seconds"] = built[0] - started
    if len(calls) >= 4:
        figures["steady_images_per_second"] = (images - calls[0][1] - calls[-1][1]) / (calls[-1][0] - calls[1][0])
        figures["first_call_seconds"] = calls[1][0] - calls[0][0]
    return figures


def shard_timings(cache: Path, workers: int, loop_seconds: float | None) -> dict:
    """Read / compute / write seconds from the stage's <cache>.timings.jsonl: input-bound or device-bound?"""
    path = Path(str(cache) + ".timings.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    read, compute, write = (sum(r[k] for r in rows) for k in ("read_seconds", "compute_seconds", "write_seconds"))
    return {"read_seconds_total": read, "compute_seconds_total": compute, "write_seconds_total": write,
            "read_seconds_per_worker": read / max(1, workers), "input_bound": read / max(1, workers) > compute,
            "device_busy_share_of_loop": compute / loop_seconds if loop_seconds else None,
            "per_shard": [{k: r.get(k) for k in ("shard", "images", "read_seconds", "compute_seconds", "write_seconds")}
                          for r in rows]}


def section_cache_teacher(run) -> None:
    from dho_pipeline.stages import cache_teacher

    cfg, fig = run.cfg, run.fig
    paths = ensure_inputs(run)
    data = run.shared["data"]
    batch = run.shared.get("best_batch") or cfg["batches"][-1]
    workers = min(cfg["workers"], len(paths))
    fig["data"] = {"shards": len(paths), "per_shard": cfg["per_shard"], "image": list(cfg["image"]),
                   "bytes": data["bytes"], "generate_seconds": data["seconds"], "manifest_seconds": run.shared["manifest_seconds"]}
    fig["config"] = {"teacher": cfg["teacher"], "views": 1, "topk": 100, "batch_size": batch, "workers": cfg["workers"]}
    cache = run.work / "cache.zarr"
    config = cache_teacher.Config(
        manifest=run.shared["manifest"], out=cache, teacher=cfg["teacher"], pretrained="none",
        classnames=run.shared["classes"], templates=run.shared["templates"], views=1, topk=100, batch_size=batch,
        workers=cfg["workers"], device=None if cfg["device"] == "cuda" else cfg["device"],
        precision=cfg["stage_precision"], compile=cfg["stage_compile"])
    run.say(f"section 2: cache-teacher {cfg['teacher']} batch {batch}, {cfg['workers']} workers, {len(paths)} shards")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with CallClock() as clock:
        try:
            fig["summary"] = cache_teacher.run(config)
            run.shared["cache"] = cache
        finally:  # also when the stage fails or the cap stops it: what was measured so far
            ended = time.perf_counter()
            loop = clock.calls[-1][0] - clock.calls[0][0] if len(clock.calls) > 1 else None
            fig["figures"] = {**steady_figures(clock, started, ended), **shard_timings(cache, workers, loop)}
            compare_to_model_only(run, fig["figures"])


def compare_to_model_only(run, figures: dict) -> None:
    model_only = (run.shared.get("model_only") or {}).get("images_per_second")
    steady = figures.get("steady_images_per_second") or figures.get("images_per_second_after_setup")
    figures.update(model_only_images_per_second=model_only, model_only_variant=run.shared.get("model_only"),
                   stage_path_images_per_second=run.shared.get("stage_path_ips"),
                   ratio_steady_to_model_only=steady / model_only if steady and model_only else None)
    if torch.cuda.is_available():
        run.fig["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    run.headline["cache_teacher"] = {k: figures.get(k) for k in (
        "steady_images_per_second", "images_per_second_after_setup", "model_only_images_per_second",
        "ratio_steady_to_model_only", "input_bound")}
    run.say(f"cache-teacher: steady {steady or 0:.1f} img/s, model only {model_only or 0:.1f}, "
            f"ratio {figures['ratio_steady_to_model_only'] or 0:.3f}; read/worker {figures['read_seconds_per_worker']:.1f}s "
            f"vs compute {figures['compute_seconds_total']:.1f}s")


# ---- section 3: stage two, cached vs online teacher ----------------------------------------------------


def train_rates(run_dir: Path, warmup_steps: int, log_every: int, steps_per_epoch: int | None = None) -> dict:
    """samples/s over the metrics windows after warm-up, leaving out a window that holds an epoch-end
    checkpoint (written after its step's log line, so it lands in the next window)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "samples_per_second" in r]

    def holds_checkpoint(step: int) -> bool:
        return bool(steps_per_epoch) and any(e % steps_per_epoch == 0 for e in range(max(1, step - log_every), step))

    used = [r for r in rows if r["step"] - log_every >= warmup_steps and not holds_checkpoint(r["step"])]
    result = {"windows": [{k: r.get(k) for k in ("step", "samples_per_second", "data_wait_fraction")} for r in rows],
              "steps_measured": [r["step"] for r in used], "steps_per_epoch": steps_per_epoch}
    if used:
        result["samples_per_second"] = len(used) / sum(1 / r["samples_per_second"] for r in used)  # equal samples
        result["data_wait_fraction"] = sum(r.get("data_wait_fraction") or 0 for r in used) / len(used)
    return result


def train_config(run, mode: str, batch: int, out: Path):
    from dho_pipeline.stages import train

    cfg = run.cfg
    common = dict(manifest=run.shared["manifest"], split=run.work / "split.json", out=out, student=cfg["student"],
                  pretrained="none", batch_size=batch, workers=cfg["workers"], log_every=cfg["log_every"],
                  max_steps=cfg["cached_steps"] if mode == "cached" else cfg["online_steps"],
                  device=None if cfg["device"] == "cuda" else cfg["device"], precision=cfg["stage_precision"],
                  compile=cfg["stage_compile"])
    if mode == "cached":
        if "cache" not in run.shared:
            raise RuntimeError("no complete cache from section 2")
        return train.Config(cache=run.shared["cache"], **common)
    return train.Config(cache=None, teacher_online=True, teacher=cfg["teacher"], teacher_pretrained="none",
                        classnames=run.shared["classes"], templates=run.shared["templates"], **common)


def train_once(run, mode: str, batch: int) -> dict:
    """One `train` run; its samples/s (or its error) in run.fig["runs"]["<mode>-b<batch>"]."""
    from dho_pipeline.stages import train

    out = run.work / f"run-{mode}-b{batch}"
    shutil.rmtree(out, ignore_errors=True)
    entry = {"batch": batch}
    run.say(f"section 3: train {mode} {run.cfg['student']} batch {batch}+{batch}")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        config = train_config(run, mode, batch, out)
        entry["steps"] = config.max_steps
        entry["summary"] = train.run(config)
        per_epoch = entry["summary"]["total_steps"] // config.epochs
        entry.update(train_rates(out, run.cfg["warmup_steps"], run.cfg["log_every"], per_epoch))
        run.say(f"  {mode}: {entry.get('samples_per_second') or 0:.1f} samples/s (data wait {entry.get('data_wait_fraction') or 0:.0%})")
    except Exception as error:  # noqa: BLE001 - an OOM at 256 falls back to 128
        entry["oom"] = "out of memory" in str(error).lower() or type(error).__name__ == "OutOfMemoryError"
        entry["error"] = error_text(error)
        run.say(f"  {mode}: FAILED {str(error)[:200]}")
    except CapExceeded as error:  # keep the windows logged so far, then stop the section
        entry["error"] = f"stopped: {error}"
        if (out / "metrics.jsonl").exists():
            entry.update(train_rates(out, run.cfg["warmup_steps"], run.cfg["log_every"]))
        raise
    finally:
        entry["seconds"] = time.perf_counter() - started
        entry["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        run.fig["runs"][f"{mode}-b{batch}"] = entry
        free_memory()
        run.save("train", run.fig)
    return entry


def compare(run, batch: int) -> bool:
    cached, online = (run.fig["runs"].get(f"{mode}-b{batch}", {}).get("samples_per_second") for mode in ("cached", "online"))
    if not (cached and online):
        return False
    run.fig["comparison"] = run.headline["train"] = {
        "batch": batch, "cached_samples_per_second": cached, "online_samples_per_second": online,
        "speedup_cached_over_online": cached / online, "target": 8.0, "meets": cached / online >= 8.0,
        "note": "same samples per epoch both ways, so the ratio is the per-epoch speedup"}
    run.say(f"train: cached {cached:.1f} vs online {online:.1f} samples/s at {batch}+{batch}: {cached / online:.2f}x")
    return True


def section_train(run) -> None:
    from dho_pipeline.stages import split

    ensure_inputs(run)
    drawn = split.run(split.Config(manifest=run.shared["manifest"], out=run.work / "split.json", percent=10))
    run.fig["split"] = {"percent": 10, "labeled": getattr(drawn, "num_labeled", None),
                        "unlabeled": getattr(drawn, "num_unlabeled", None)}
    run.fig["runs"] = {}
    first, second = run.cfg["train_batches"]
    batch = first
    try:
        if train_once(run, "cached", first).get("oom"):
            batch = second
            train_once(run, "cached", batch)
        if train_once(run, "online", batch).get("oom") and batch != second:
            batch = second
            train_once(run, "online", batch)
            train_once(run, "cached", batch)
    finally:  # also when the section cap stops a run: partial windows may still compare
        compared = compare(run, batch)
    if not compared:
        raise RuntimeError("no cached-vs-online comparison (see each run's error)")
