"""Evaluate a student checkpoint: top-1/top-5, NLL and calibration error of each head and of the mix.

    dho-pipeline evaluate --checkpoint runs/b16/student.pt --data data/imagenet-val.json [--json]
    dho-pipeline evaluate --checkpoint runs/b16/student.pt --data data/imagenet-a.json --class-subset imagenet-a
    torchrun --nproc_per_node 8 --no-python dho-pipeline evaluate ...   # each sample counted once

`--class-subset` restricts both heads' logits to some of the classes before the mix
(dho_pipeline.class_subsets); `evaluate-ood` runs ImageNet and its shifted sets into one table.

Released checkpoints (vit_b_1.pt, ...) work too; `--student` names their architecture if needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dho_pipeline.errors import UserError

from .options import setting
from .shared_settings import (
    alpha_setting, beta_setting, device_setting, eval_view_setting, precision_setting, student_setting,
    verify_shards_setting,
)


@dataclass(frozen=True, kw_only=True)
class Config:
    checkpoint: Path = setting(help="Student: a checkpoint (ours or a released one), an open_clip export folder, "
                                    "or a .safetensors export with its .json.")
    data: tuple[str, ...] = setting(help="A manifest (.json) or shards; repeatable.")
    student: str | None = student_setting()
    classnames: Path | None = setting(None, default_text="the checkpoint's, or ImageNet's for 1000 classes",
                                      help="Class names, one per line.")
    alpha: float | None = alpha_setting()
    beta: float | None = beta_setting()
    batch_size: int = setting(256, help="Images per batch and process.")
    workers: int = setting(4, help="Data-loading processes.")
    device: str | None = device_setting()
    precision: str | None = precision_setting()
    class_subset: str | None = setting(None, help="Only these classes: imagenet-a, imagenet-r, or a file of WordNet "
                                       "ids or class indices (both heads' logits restricted before the mix).")
    eval_view: str = eval_view_setting()
    verify_shards: str = verify_shards_setting()


def load_inputs(config):
    """The student, its evaluation data, and this process's device and precision."""
    from dho_pipeline.manifest import manifest_for_data
    from dho_pipeline.prompts import read_classnames
    from dho_pipeline.student_checkpoint import load_student

    from .common import device_and_precision

    manifest = manifest_for_data(list(config.data), config.workers)
    manifest.check_files(config.verify_shards)
    classnames = read_classnames(config.classnames) if config.classnames else None
    loaded = load_student(config.checkpoint, student=config.student, classnames=classnames)
    manifest.check_labels(len(loaded.classnames), required=True)
    return loaded, manifest, *device_and_precision(config.device, config.precision)


def run(config: Config) -> dict:
    loaded, manifest, state, device, precision = load_inputs(config)
    report = evaluate_loaded(loaded, manifest, state=state, device=device, precision=precision, alpha=config.alpha,
                             beta=config.beta, class_subset=config.class_subset, batch_size=config.batch_size,
                             workers=config.workers, eval_view=config.eval_view)
    return {**report, "checkpoint": str(config.checkpoint), "data": list(config.data)}


def evaluate_loaded(loaded, manifest, *, state, device, precision, alpha, beta, class_subset, batch_size,
                    workers, eval_view: str = "center-square") -> dict:
    """The report of a loaded student on a manifest (alpha/beta None: the checkpoint's), on `class_subset`'s
    classes only if given; under torchrun each process evaluates its share and the sums are reduced."""
    import numpy as np

    from dho_pipeline.class_subsets import read_class_subset
    from dho_pipeline.evaluation import finish_statistics, student_logits_on, sufficient_statistics

    from .common import autocast, reduce_sum

    alpha = loaded.alpha if alpha is None else alpha
    beta = loaded.beta if beta is None else beta
    if not 0 <= alpha <= 1 or beta <= 0:
        raise UserError("--alpha must lie in [0, 1] and --beta be positive")
    classnames = loaded.classnames
    subset = read_class_subset(class_subset, len(classnames)) if class_subset else None
    if subset is not None:  # refused before any image is read: data labeled outside the subset
        keys = [(shard.name, key) for shard in manifest.shards for key in shard.keys]
        labels = np.array([label for shard in manifest.shards for label in shard.labels], np.int64)
        subset.positions(labels, where=lambda i: f"shard {keys[i][0]}, key {keys[i][1]!r}")
        classnames = [classnames[i] for i in subset.indices]
    logits = student_logits_on(
        loaded, manifest, np.arange(manifest.num_samples), rank=state.process_index, world=state.num_processes,
        batch_size=batch_size, workers=workers, device=device, autocast=lambda: autocast(device, precision),
        eval_view=eval_view, progress="evaluate",
    )
    if subset is not None:
        logits = subset.restrict(logits)
    num_classes = len(classnames)
    stats = reduce_sum(state, sufficient_statistics(logits, alpha, beta, num_classes))
    report = finish_statistics(stats, num_classes)
    report.update({"architecture": loaded.architecture, "alpha": alpha, "beta": beta, "classnames": classnames,
                   "class_subset": subset.name if subset else None, "data_fingerprint": manifest.fingerprint})
    return report


def format_report(report: dict) -> str:
    lines = [
        f"checkpoint  {report['checkpoint']} ({report['architecture']}; alpha {report['alpha']:g}, beta {report['beta']:g})",
        f"samples     {report['samples']}" + (f" (on the {len(report['classnames'])} classes of "
                                              f"{report['class_subset']})" if report.get("class_subset") else ""),
        "",
        f"{'head':<6}{'top-1':>8}{'top-5':>8}{'NLL':>8}{'ECE':>8}",
    ]
    for head, label in (("ce", "CE"), ("kd", "KD"), ("mix", "mix")):
        r = report[head]
        lines.append(f"{label:<6}{100 * r['top1']:>7.2f}%{100 * r['top5']:>7.2f}%{r['nll']:>8.3f}{r['ece']:>8.3f}")
    totals = report["per_class_total"]
    per_class = [
        (c / t, name, c, t) for name, c, t in zip(report["classnames"], report["mix"]["per_class_correct"], totals) if t
    ]
    lines += ["", "per class (mix), lowest first:"]
    for accuracy, name, correct, total in sorted(per_class)[:10]:
        lines.append(f"  {name:<28}{correct:>6} / {total:<6}{100 * accuracy:6.1f}%")
    return "\n".join(lines)
