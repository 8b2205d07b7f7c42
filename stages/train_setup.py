"""What `train` does around its loop: the inputs checked (everything refusable, before the student is
built), the batch split over processes, the online teacher, and the released checkpoint at the end."""

from __future__ import annotations

import json
from pathlib import Path

from dho_pipeline.errors import UserError

from .common import log


def micro_batch(config, world: int) -> int:
    """Samples per stream, micro-step and process: the global batch split over processes and accumulation."""
    if config.batch_size % (world * config.grad_accum):
        raise UserError(
            f"--batch-size {config.batch_size} must be divisible by processes x --grad-accum ({world} x {config.grad_accum})"
        )
    return config.batch_size // (world * config.grad_accum)


def check_inputs(config):
    """Everything that can be refused is refused here, before the student is built.

    Returns the manifest, the cache reader (None with an online teacher), the split, class names, templates.
    """
    from dho_pipeline.cache_reader import CacheReader
    from dho_pipeline.manifest import load_manifest
    from dho_pipeline.package_data import IMAGENET_TEMPLATES
    from dho_pipeline.prompts import read_classnames, read_templates
    from dho_pipeline.split import load_split

    from .common import class_list

    manifest = load_manifest(config.manifest)
    split = load_split(config.split)
    rule = split.method.get("rule", "list" if split.method.get("from_list") else "balanced")  # older splits: no rule
    if config.split_rule is not None and rule != config.split_rule:
        raise UserError(f"split {config.split} was drawn by rule {rule!r}, not {config.split_rule!r}; draw it with "
                        f"`dho-pipeline split --rule {config.split_rule}` (or drop --split-rule)")
    split.check_manifest(manifest, where=f"split {config.split}")
    if config.teacher_online:
        classnames, source = class_list(config.classnames, manifest)
        templates = read_templates(config.templates or IMAGENET_TEMPLATES)
        reader = None
    else:
        # The CE-only baseline reads no teacher targets (it shows the same cached views), so any T will do.
        temperature = config.temperature if config.objective_spec().needs_teacher else None
        # The cache must hold the class names given, else those the manifest records (if any).
        wanted, wanted_source = (read_classnames(config.classnames), str(config.classnames)) \
            if config.classnames is not None else (manifest.classnames, "the manifest's class names (classes.txt beside its shards)")
        reader = CacheReader.open(config.cache, manifest, temperature, classnames=wanted, classnames_source=wanted_source)
        check_cache_settings(config, reader.spec)
        classnames, templates = reader.spec.classnames, reader.spec.templates
        source = f"the class names of cache {config.cache}"
    manifest.check_files(config.verify_shards)
    # A cache's list was checked when it was built (cache-teacher): here only a warning.
    warning = manifest.check_class_count(len(classnames), source, allow_unused=config.allow_unused_classes,
                                         checked_before=reader is not None)
    if warning:
        log.warning("warning: %s", warning)
    return manifest, reader, split, classnames, templates


def check_cache_settings(config, spec) -> None:
    """The cache serves the class embeddings and the views this run asks for."""
    wanted = config.teacher_class_embeddings
    if wanted is not None and spec.class_embeddings != wanted:
        raise UserError(f"cache {config.cache} was built with {spec.class_embeddings!r} class embeddings, not {wanted!r}; "
                        f"build one with `cache-teacher --class-embeddings {wanted}`")
    if config.train_views == "crops" and spec.num_views < 2:
        raise UserError(f"--train-views crops needs a cache with random crops (views 1..V-1); cache {config.cache} "
                        "holds only view 0: build it with --views 2 or more")


def earlier_seconds(config) -> float:
    """Wall time a resumed run already spent (its last summary's)."""
    summary = Path(config.out) / "summary.json"
    if not (config.resume and summary.is_file()):
        return 0.0
    try:
        return float(json.loads(summary.read_text()).get("wall_seconds", 0.0))
    except (ValueError, TypeError, AttributeError):
        return 0.0


def new_student(config, classnames, templates, device):
    """The dual-head student on `device`, its spec and its preprocessing (with --eval-crop applied)."""
    import dataclasses

    from dho_pipeline.backbones import build_backbone
    from dho_pipeline.student import build_student

    backbone = build_backbone(config.student, config.pretrained)
    student = build_student(backbone, classnames, templates, head=config.head, device=device)
    preprocess = backbone.preprocess
    if config.eval_crop is not None:
        preprocess = dataclasses.replace(preprocess, crop_fraction=config.eval_crop)
    return student, backbone.spec, preprocess


def restore(checkpoint: Path, student, optimizer) -> tuple[int, dict]:
    """Load a complete training state into the (unprepared) student and optimiser: its step and data positions."""
    from dho_pipeline.checkpoints import load_checkpoint_file

    resumed = load_checkpoint_file(checkpoint / "state.pt")
    student.load_state_dict(resumed["model"])
    optimizer.load_state_dict(resumed["optimizer"])
    return resumed["step"], resumed["positions"]


def save_training_state(accelerator, out, config, student, optimizer, step, positions, epoch) -> None:
    """A resumable checkpoint of this step (model, optimiser, data positions), written by the main process
    while the others wait."""
    from dho_pipeline.checkpoints import save_training_state as write_whole

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        payload = {"model": accelerator.unwrap_model(student).state_dict(), "optimizer": optimizer.state_dict(),
                   "step": step, "positions": dict(positions), "epoch": epoch}
        write_whole(out, step, payload, keep=config.keep_checkpoints)
    accelerator.wait_for_everyone()


def student_checkpoint(config, student, spec, preprocess, classnames, templates, inputs, manifest, split, table,
                       labeled_ids, step, finished, epoch, last_eval):
    """student.pt: the released format, with what this run was (architecture, data, fingerprints)."""
    from dho_pipeline.student import PAPER_ALPHA_BETA
    from dho_pipeline.student_checkpoint import StudentCheckpoint, StudentMetadata

    metadata = StudentMetadata(
        model=spec.name, family=spec.family, head=config.head, pretrained=config.pretrained, preprocess=preprocess,
        classnames=list(classnames), templates=list(templates), config=config.to_json(), cache_fingerprint=inputs["cache"],
        manifest_fingerprint=manifest.fingerprint, split_fingerprint=split.fingerprint, steps=step, finished=finished,
        labeled_keys=sorted(table.key(int(i)) for i in labeled_ids),
    )
    alpha, beta = PAPER_ALPHA_BETA
    return StudentCheckpoint(state_dict=student.state_dict(), epoch=epoch, acc=last_eval["mix"] if last_eval else None,
                             alpha=alpha, beta=beta, metadata=metadata)


def teacher_size(reader, teacher) -> tuple[int, int]:
    """The teacher's input size: the reference renders each view there first (378 for DFN5B)."""
    return tuple(reader.spec.preprocess["image_size"]) if reader else teacher.image_size


def online_teacher(config, classnames, templates, device, precision, compiled, batch_size):
    """--teacher-online: the zero-shot teacher, built and run exactly as cache-teacher runs it."""
    from dho_pipeline.teacher import OnlineTeacher, load_zero_shot_teacher

    from .common import precision_dtype

    loaded = load_zero_shot_teacher(config.teacher, config.teacher_pretrained, classnames, templates, device=device,
                                    dtype=precision_dtype(precision), compile=compiled, batch_size=batch_size,
                                    class_embeddings=config.teacher_class_embeddings or "unit")
    return OnlineTeacher(loaded, seed=config.seed, crop_scale=config.crop_scale, device=device)
