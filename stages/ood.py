"""Evaluate one ImageNet student on ImageNet and its distribution shifts, and write one table.

    dho-pipeline evaluate-ood --checkpoint runs/b16/student-calibrated.pt --out runs/b16/ood \\
        --imagenet data/imagenet-val.json --imagenet-v2 data/imagenet-v2.json \\
        --imagenet-sketch data/imagenet-sketch.json --imagenet-a data/imagenet-a.json --imagenet-r data/imagenet-r.json

Each set is evaluated as `evaluate` evaluates it (the checkpoint's alpha and beta unless given), the
student loaded once; ImageNet-A and ImageNet-R on the logits of their 200 classes (`--class-subset
imagenet-a|imagenet-r`), the others on all 1000. Any subset of the five sets may be given. Writes
`OUT/ood.txt` (the table: top-1 of the CE head, the KD head and the mix per set, and their mean over the
shifted sets) and `OUT/ood.json` (every set's full report). Under torchrun each process evaluates its
share of each set.

The data: manifests of shards made with `dho-pipeline shard` (README, "Out-of-distribution evaluation"),
labeled with ImageNet's class indices: V2's folders are the indices; Sketch, A and R are sharded with
`--classes imagenet_wnids.txt`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dho_pipeline.errors import UserError

from .options import setting
from .shared_settings import (
    alpha_setting, beta_setting, device_setting, eval_view_setting, precision_setting, student_setting,
    verify_shards_setting,
)

# (Config field, title, class subset): the paper's robustness table's sets, in its order.
SETS = (
    ("imagenet", "ImageNet", None),
    ("imagenet_v2", "ImageNet-V2", None),
    ("imagenet_sketch", "ImageNet-Sketch", None),
    ("imagenet_a", "ImageNet-A", "imagenet-a"),
    ("imagenet_r", "ImageNet-R", "imagenet-r"),
)


@dataclass(frozen=True, kw_only=True)
class Config:
    checkpoint: Path = setting(help="Student checkpoint with ImageNet's 1000 classes.")
    out: Path = setting(help="Folder for ood.txt and ood.json.")
    imagenet: str | None = setting(None, help="ImageNet val: a manifest (.json) or shards.")
    imagenet_v2: str | None = setting(None, help="ImageNet-V2 (folders 0..999 sharded by number).")
    imagenet_sketch: str | None = setting(None, help="ImageNet-Sketch (1000 WordNet-id folders).")
    imagenet_a: str | None = setting(None, help="ImageNet-A (200 classes; labels are ImageNet indices).")
    imagenet_r: str | None = setting(None, help="ImageNet-R (200 classes; labels are ImageNet indices).")
    student: str | None = student_setting()
    alpha: float | None = alpha_setting()
    beta: float | None = beta_setting()
    batch_size: int = setting(256, help="Images per batch and process.")
    workers: int = setting(4, help="Data-loading processes.")
    device: str | None = device_setting()
    precision: str | None = precision_setting()
    eval_view: str = eval_view_setting()
    verify_shards: str = verify_shards_setting()


def run(config: Config) -> dict:
    from dho_pipeline.jsonfiles import write_text_atomically
    from dho_pipeline.manifest import manifest_for_data
    from dho_pipeline.student_checkpoint import load_student

    from .common import device_and_precision
    from .evaluate import evaluate_loaded

    given = [(field, title, subset, getattr(config, field)) for field, title, subset in SETS if getattr(config, field)]
    if not given:
        raise UserError("evaluate-ood needs at least one of " + ", ".join("--" + f.replace("_", "-") for f, *_ in SETS))
    # Every manifest is read and checked before the first image is: a wrong path fails at once.
    manifests = {}
    for field, _, _, data in given:
        manifest = manifest_for_data([data], config.workers)
        manifest.check_files(config.verify_shards)
        manifests[field] = manifest
    loaded = load_student(config.checkpoint, student=config.student)
    if len(loaded.classnames) != 1000:
        raise UserError(f"checkpoint {config.checkpoint} has {len(loaded.classnames)} classes; evaluate-ood takes an "
                        "ImageNet (1000-class) student")
    for field, *_ in given:
        manifests[field].check_labels(1000, required=True)
    state, device, precision = device_and_precision(config.device, config.precision)
    sets = {}
    for field, title, subset, data in given:
        report = evaluate_loaded(loaded, manifests[field], state=state, device=device, precision=precision,
                                 alpha=config.alpha, beta=config.beta, class_subset=subset,
                                 batch_size=config.batch_size, workers=config.workers, eval_view=config.eval_view)
        sets[field] = {"title": title, "data": data, "class_subset": subset, "classes": len(report["classnames"]),
                       **{k: v for k, v in report.items() if k not in ("classnames", "architecture", "class_subset")}}
    shifted = [sets[f] for f, *_ in given if f != "imagenet"]
    summary = {
        "checkpoint": str(config.checkpoint), "architecture": loaded.architecture,
        "alpha": next(iter(sets.values()))["alpha"], "beta": next(iter(sets.values()))["beta"], "sets": sets,
        "ood_mean": {head: sum(s[head]["top1"] for s in shifted) / len(shifted) for head in ("ce", "kd", "mix")}
        if shifted else None,
    }
    if state.is_main_process:
        out = Path(config.out)
        write_text_atomically(out / "ood.json", json.dumps(summary, indent=2) + "\n")
        write_text_atomically(out / "ood.txt", format_table(summary) + "\n")
    return summary


def format_table(summary: dict) -> str:
    lines = [
        f"checkpoint  {summary['checkpoint']} ({summary['architecture']}; alpha {summary['alpha']:g}, "
        f"beta {summary['beta']:g})",
        "top-1 (%); ImageNet-A and -R over their 200 classes",
        "",
        f"{'set':<22}{'samples':>9}{'CE':>8}{'KD':>8}{'mix':>8}",
    ]
    for row in summary["sets"].values():
        title = row["title"] + (f" ({row['classes']})" if row["class_subset"] else "")
        lines.append(f"{title:<22}{row['samples']:>9}" + "".join(f"{100 * row[h]['top1']:>8.2f}" for h in ("ce", "kd", "mix")))
    if summary["ood_mean"]:
        count = sum(1 for key in summary["sets"] if key != "imagenet")
        lines.append(f"{f'mean of {count} shifted':<22}{'':>9}"
                     + "".join(f"{100 * summary['ood_mean'][h]:>8.2f}" for h in ("ce", "kd", "mix")))
    return "\n".join(lines)
