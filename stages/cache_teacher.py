"""Stage one: run the zero-shot teacher once over the data set, per view, and cache its logits in Zarr.

    dho-pipeline cache-teacher --manifest M.json --out CACHE.zarr [--views 8] [--topk 100]
    torchrun --nproc_per_node 8 --no-python dho-pipeline cache-teacher ...   # same cache, 8 GPUs

The shard is the unit of work. Shard i goes to rank i mod world size; within a rank, DataLoader
workers take whole shards, decode each image once and render all of its views. The main process runs
the teacher and hands each finished shard to a writer thread, which writes the shard's Zarr group and
then, last, its completion marker. Rerunning the same command skips complete shards and redoes the
rest, so a killed run resumes where it stopped. Per-shard read, compute and write times go to
`CACHE.zarr.timings.jsonl`; `CACHE.zarr.lock` keeps a second, independent run off the same cache.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from dho_pipeline.errors import Stopped, UserError

from dho_pipeline.cache_store import CLASS_EMBEDDINGS, COMPRESSIONS, DEFAULT_COMPRESSION
from dho_pipeline.package_data import IMAGENET_TEMPLATES
from dho_pipeline.views import RESIZE_MODES

from .common import append_jsonl, log, on_main_then_share
from .shared_settings import device_setting, precision_setting, verify_shards_setting
from .options import IntOrAll, check_choices, setting

DEFAULT_TEACHER = "ViT-H-14-378-quickgelu"
DEFAULT_PRETRAINED = "dfn5b"


@dataclass(frozen=True, kw_only=True)
class Config:
    manifest: Path = setting(help="Manifest of the shards (from `dho-pipeline manifest`).")
    out: Path = setting(help="Teacher cache to write (a .zarr directory).")
    teacher: str = setting(DEFAULT_TEACHER, help="open_clip model name, or an open_clip model-config JSON file.")
    pretrained: str = setting(DEFAULT_PRETRAINED, help="open_clip tag, local weights file, or 'none' (random, for tests).")
    classnames: Path | None = setting(None, default_text="the manifest's (classes.txt beside its shards), else ImageNet's 1000",
                                      help="Class names, one per line, in label order.")
    allow_unused_classes: bool = setting(False, help="Accept a class list longer than the labels imply (the last "
                                         "classes have no labeled image, e.g. an ImageNet subset keeping its indices).")
    templates: Path = setting(IMAGENET_TEMPLATES, default_text="the paper's 7 ImageNet templates",
                              help="Prompt templates, one per line, with {} where the class name goes; or a "
                              "set that ships (imagenet, oxford_pets, eurosat, ...).")
    views: int = setting(1, help="Views per image; view 0 is the teacher's own evaluation view.")
    topk: int | None = setting(100, type=IntOrAll(),
                               help="Logits kept per view, or 'all' (k = 100: BENCHMARKS.md, KD fidelity).")
    temperatures: tuple[float, ...] = setting((1.0, 2.0), help="Temperatures whose log-partitions are stored exactly.")
    seed: int = setting(0, help="Seed of the views.")
    batch_size: int = setting(256, help="Views per teacher forward pass.")
    workers: int = setting(4, help="Image-decoding processes per rank.")
    device: str | None = device_setting("this rank's GPU, else cpu")
    precision: str | None = precision_setting("Precision of the teacher's tower (its classifier stays fp32).")
    compile: bool | None = setting(None, default_text="on GPUs",
                                   help="torch.compile the teacher (~25 s once; 1.11x on an H100).")
    resize: str | None = setting(None, choices=RESIZE_MODES, help="Override the teacher's resize mode.")
    on_error: str = setting("fail", choices=("fail", "skip"),
                            help="An undecodable image: stop naming it, or record it as missing.")
    crop_scale: tuple[float, float] = setting((0.5, 1.0), help="RandomResizedCrop area range of views 1..V-1.")
    compression: str = setting(DEFAULT_COMPRESSION, choices=COMPRESSIONS, help="Codec of the cache's arrays.")
    class_embeddings: str = setting(
        "unit", choices=CLASS_EMBEDDINGS,
        help="Class embeddings: the template mean of unit text embeddings renormalised ('unit'), or not ('reference', "
             "the reference's DFN5B teacher: logits scaled by that mean's norm). Recorded in the cache.")
    verify_shards: str = verify_shards_setting()

    def __post_init__(self):
        if self.views < 1:
            raise UserError("--views must be at least 1")
        if self.topk is not None and self.topk < 1:
            raise UserError("--topk must be a positive number or 'all'")
        if not self.temperatures or any(t <= 0 for t in self.temperatures):
            raise UserError("--temperatures must be positive numbers, e.g. 1,2")
        if self.batch_size < 1 or self.workers < 0:
            raise UserError("--batch-size must be positive and --workers non-negative")
        check_choices(self)  # recipes and the Python API bypass click's own check
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise UserError("--crop-scale takes two numbers LOW,HIGH with 0 < LOW <= HIGH <= 1")


@dataclass
class _ShardProgress:
    """A shard being assembled in the main process from batches that arrive in any order."""

    data: object  # ShardData
    received: int = 0
    read_seconds: float = 0.0
    compute_seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)


def run(config: Config) -> dict:
    from dho_pipeline.cache_store import CacheSpec, TeacherCache, exclusive_writer
    from dho_pipeline.manifest import load_manifest
    from dho_pipeline.teacher import LOGIT_SCALE, load_zero_shot_teacher
    from dho_pipeline.prompts import read_templates
    from dho_pipeline.views import RESIZE_TO_VIEW0, ViewPolicy

    from .common import class_list, precision_dtype, process_state, resolve_compile, resolve_device, resolve_precision

    # ---- inputs, all checked before the teacher is loaded ----------------------------------------
    manifest = load_manifest(config.manifest)
    manifest.check_files(config.verify_shards)
    classnames, source = class_list(config.classnames, manifest)
    templates = read_templates(config.templates)
    manifest.check_class_count(len(classnames), source, allow_unused=config.allow_unused_classes)
    # k >= the number of classes simply keeps every logit.
    k = len(classnames) if config.topk is None else min(config.topk, len(classnames))

    state = process_state(config.device)
    device = resolve_device(config.device, state.device)
    precision = resolve_precision(config.precision, device)

    with ExitStack() as held:
        if state.is_main_process:
            on_main_then_share(state, lambda: held.enter_context(exclusive_writer(config.out)))
        else:
            on_main_then_share(state, lambda: None)

        # ---- teacher ----------------------------------------------------------------------------
        started = time.perf_counter()
        compiled = resolve_compile(config.compile, device)
        loaded = load_zero_shot_teacher(
            config.teacher, config.pretrained, classnames, templates, device=device, dtype=precision_dtype(precision),
            compile=compiled, batch_size=_views_per_batch(config), resize=config.resize,
            class_embeddings=config.class_embeddings,
        )
        teacher, preprocess = loaded.runner, loaded.preprocess
        if state.is_main_process:
            log.info("teacher %s ready on %s (%s%s) in %.1fs", config.teacher, device, precision,
                     ", compiled on its first batch" if compiled else "", time.perf_counter() - started)

        policy = ViewPolicy(
            num_views=config.views,
            seed=config.seed,
            view0=RESIZE_TO_VIEW0[preprocess.resize_mode],
            crop_scale=tuple(config.crop_scale),
        )
        spec = CacheSpec(
            teacher=loaded.description,
            classnames=classnames,
            templates=templates,
            preprocess=preprocess.to_json(),
            views=policy.to_json(),
            topk=k,
            temperatures=[float(t) for t in config.temperatures],
            logit_scale=LOGIT_SCALE,
            manifest_fingerprint=manifest.fingerprint,
            shards=[{"name": s.name, "num_samples": s.num_samples} for s in manifest.shards],
            class_embeddings=config.class_embeddings,
        )

        # ---- cache: rank 0 creates it (or checks that a resumed one matches), others follow ------
        def create_or_resume() -> None:
            with _disk_errors(config.out, "creating"):
                TeacherCache.create_or_resume(config.out, spec)

        on_main_then_share(state, create_or_resume)
        cache = TeacherCache.open(config.out)
        cache.compression = config.compression
        mine = [i for i in range(len(manifest.shards)) if i % state.num_processes == state.process_index]
        damaged = _damaged_shards(cache, manifest, [i for i in mine if cache.is_complete(i)])
        todo = [i for i in mine if not cache.is_complete(i) or i in damaged]
        if state.is_main_process:
            left = len(cache.incomplete_shards())
            # Each process checks (and names) only its own complete shards: the damaged count is exact
            # with one process, and this process's share with several.
            whose = "" if state.num_processes == 1 else " in this process's share"
            log.info("%d of %d shards already complete%s; %d to do across %d process(es)%s",
                     len(manifest.shards) - left, len(manifest.shards),
                     f" ({len(damaged)} of them damaged{whose}, computed again)" if damaged else "",
                     left + len(damaged), state.num_processes, " plus any damaged in the others' shares"
                     if state.num_processes > 1 else "")

        _cache_shards(config, state, device, teacher, cache, manifest, todo, policy, preprocess)

        # ---- summary, by rank 0 once every rank is done ------------------------------------------
        state.wait_for_everyone()
        summary = on_main_then_share(state, lambda: _summarize(cache))
    return summary


@contextmanager
def _disk_errors(out, doing: str):
    """An OSError while writing the cache (a full disk, a read-only folder) as one line that says what to do."""
    try:
        yield
    except OSError as error:
        raise UserError(
            f"{doing} {out} failed ({error.strerror or error}); fix that (e.g. free disk space) and rerun to resume"
        ) from None


def _summarize(cache) -> dict:
    incomplete = cache.incomplete_shards()
    missing = sum((cache.shard_attrs(i) or {}).get("num_missing", 0) for i in range(len(cache.spec.shards)))
    summary = {
        "complete": not incomplete,
        "num_shards": len(cache.spec.shards),
        "incomplete_shards": [cache.spec.shards[i]["name"] for i in incomplete],
        "num_samples": sum(s["num_samples"] for s in cache.spec.shards),
        "num_missing": missing,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    with _disk_errors(cache.path, "writing the run summary of"):
        cache.write_summary(summary)
    return summary


def _damaged_shards(cache, manifest, complete: list[int]) -> set[int]:
    """Complete shards whose rows were lost or damaged since they were written (every chunk against its
    checksum, every value checked: about 40 ms of CPU per shard of 1250 images with 8 views, under a
    minute for ImageNet): these are computed again."""
    damaged = set()
    for index in complete:
        shard = manifest.shards[index]
        problem = cache.shard_problem(index, shard.keys, shard.fingerprint)
        if problem:
            log.warning("%s; computing this shard again", problem)
            damaged.add(index)
    note = cache.unchecked_note(complete) if complete else None
    if note:
        log.warning("warning: %s", note)
    return damaged


def _check_source(manifest, index: int, sha256: str) -> None:
    """The shard file stage one read, hashed whole as it was read, is the one the manifest describes."""
    shard = manifest.shards[index]
    if sha256 != shard.fingerprint:
        raise UserError(manifest.changed_message(
            shard, "its sha256, hashed while the teacher read it, differs from the manifest's"))


def _views_per_batch(config: Config) -> int:
    """Views per teacher call: whole images only, so a batch never splits an image's views."""
    return max(1, config.batch_size // config.views) * config.views


def _cache_shards(config, state, device, teacher, cache, manifest, todo, policy, preprocess):
    """The loop: batches of views in, teacher logits out, whole shards handed to the writer."""
    import torch
    from dho_pipeline.cache_store import ShardData, index_dtype
    from dho_pipeline.pixels import Normalizer
    from dho_pipeline.processes import StopSignals, worker_init_fn
    from dho_pipeline.progress import progress as progress_bar
    from dho_pipeline.teacher import summarize_logits
    from dho_pipeline.teacher_data import ShardTask, ViewBatches

    if not todo:
        return
    tasks = [ShardTask(i, manifest.shards[i].name, str(manifest.shards[i].path), manifest.shards[i].keys) for i in todo]
    images_per_batch = _views_per_batch(config) // config.views
    dataset = ViewBatches(tasks, policy, preprocess.image_size, images_per_batch, config.on_error == "skip")
    workers = min(config.workers, len(tasks))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        worker_init_fn=worker_init_fn() if workers else None,  # workers die with this process
    )
    normalize = Normalizer(preprocess.mean, preprocess.std, device)
    spec = cache.spec
    k, temperatures = spec.topk, spec.temperatures

    def new_shard(index: int) -> ShardData:
        return ShardData.empty(manifest.shards[index].keys, spec.num_views, k, len(temperatures), index_dtype(spec.num_classes))

    timings_path = Path(str(config.out).rstrip("/") + ".timings.jsonl")

    in_progress: dict[int, _ShardProgress] = {}
    pending: list[Future] = []
    total_images = sum(len(t.keys) for t in tasks)
    bar = progress_bar(
        total=total_images, unit="img", desc=f"teacher (rank {state.process_index})" if state.num_processes > 1 else "teacher",
        show=state.is_main_process,
    )

    def write(index: int, progress: _ShardProgress) -> None:
        started = time.perf_counter()
        entry = manifest.shards[index]
        with _disk_errors(config.out, f"writing shard {entry.name} to"):
            cache.write_shard(index, progress.data)
        append_jsonl(timings_path, {
            "rank": state.process_index, "shard": entry.name, "images": entry.num_samples,
            "views": entry.num_samples * config.views, "missing": int(progress.data.missing.sum()),
            "read_seconds": round(progress.read_seconds, 4), "compute_seconds": round(progress.compute_seconds, 4),
            "write_seconds": round(time.perf_counter() - started, 4),
            "wall_seconds": round(time.perf_counter() - progress.started, 4),
        })

    written = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="zarr-writer") as writer, StopSignals() as signals:
        try:
            for batch in loader:
                if batch["error"]:
                    raise UserError(batch["error"])
                index = batch["shard"]
                progress = in_progress.setdefault(index, _ShardProgress(new_shard(index)))
                if batch["sha256"] is not None:
                    _check_source(manifest, index, batch["sha256"])
                    progress.data.source_fingerprint = batch["sha256"]
                progress.read_seconds += batch["read_seconds"]
                positions = batch["positions"].numpy()
                missing = batch["missing"].numpy()
                data = progress.data
                data.boxes[positions] = batch["boxes"].numpy()
                data.flips[positions] = batch["flips"].numpy()
                data.missing[positions] = missing
                for position, is_missing, reason in zip(positions, missing, batch["reasons"]):
                    if is_missing:
                        data.missing_reasons[data.keys[position]] = reason

                valid = positions[~missing]
                if len(valid):
                    started = time.perf_counter()
                    logits = teacher(normalize(batch["pixels"]))
                    indices, values, log_partition = summarize_logits(logits, k, temperatures)
                    shape = (len(valid), config.views, -1)
                    data.topk_index[valid] = indices.view(shape).cpu().numpy()
                    data.topk_logit[valid] = values.view(shape).cpu().numpy()
                    data.log_partition[valid] = log_partition.view(shape).cpu().numpy()
                    progress.compute_seconds += time.perf_counter() - started

                progress.received += len(positions)
                bar.update(len(positions))
                if progress.received == len(data.keys) and data.source_fingerprint is not None:
                    pending.append(writer.submit(write, index, in_progress.pop(index)))
                    written += 1
                for future in [f for f in pending if f.done()]:
                    future.result()  # surface a write error (e.g. disk full) now, not at the end
                    pending.remove(future)
                if signals.received:  # shards in progress stay unwritten: incomplete, redone by a rerun
                    break
        finally:
            bar.close()
            for future in pending:
                future.result()
    if signals.received and written < len(tasks):
        raise Stopped(f"cache-teacher stopped by {signals.received}: {written} shard(s) written whole in this run, "
                      f"{len(tasks) - written} left to do; rerun the same command to resume")
