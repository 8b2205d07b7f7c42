"""Choose the head mix (alpha, beta) on held-out labeled data, and write a calibrated checkpoint.

    dho-pipeline calibrate --checkpoint runs/b16/student.pt --data data/train.json --split data/1pct.json \
        --out runs/b16/student-calibrated.pt

p = alpha * softmax(ce) + (1 - alpha) * softmax(kd / beta). The search covers the reference grid
(alpha 0, 0.05, ..., 1 x beta in {0.5, 0.75, 1, 1.25, 1.5, 2, 4}), then a finer grid around the best
point. On a few dozen held-out images many points tie on accuracy: ties go to the lowest held-out NLL,
and what still ties to the point nearest the paper's alpha = beta = 0.5. Only held-out data is used: the
split's `--holdout` images, or shards the user names. Data that overlaps the checkpoint's training
labeled set is refused unless --allow-overlap (the reference tuned alpha/beta on the very set it
reported as test; this tool does not).

Beside the output checkpoint: `<out>.calibration.json` (both grids' accuracy and NLL, how many points
tied) and `<out>.calibration.png` (both grids as heatmaps: the coarse one with the fine grid's extent
outlined, the fine one, which chose the point, with the point marked).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dho_pipeline.errors import UserError

from .common import log
from .options import setting
from .shared_settings import (
    device_setting, eval_view_setting, precision_setting, student_setting, verify_shards_setting,
)


@dataclass(frozen=True, kw_only=True)
class Config:
    checkpoint: Path = setting(help="Student: a checkpoint (ours or a released one), an open_clip export folder, "
                                    "or a .safetensors export with its .json.")
    data: tuple[str, ...] = setting(help="Held-out data: a manifest (.json) or shards; repeatable.")
    out: Path = setting(help="Calibrated checkpoint to write.")
    split: Path | None = setting(None, help="Calibrate on this split's held-out images of --data.")
    allow_overlap: bool = setting(False, help="Accept images the student was trained on as labeled.")
    student: str | None = student_setting()
    classnames: Path | None = setting(None, default_text="the checkpoint's, or ImageNet's for 1000 classes",
                                      help="Class names, one per line.")
    batch_size: int = setting(256, help="Images per batch and process.")
    workers: int = setting(4, help="Data-loading processes.")
    device: str | None = device_setting()
    precision: str | None = precision_setting()
    eval_view: str = eval_view_setting()
    verify_shards: str = verify_shards_setting()


def _calibration_ids(config: Config, manifest):
    """Sample ids (manifest order) to calibrate on, and a description of where they come from."""
    import numpy as np

    if config.split is None:
        return np.arange(manifest.num_samples), {"data": [str(d) for d in config.data]}
    from dho_pipeline.split import load_split
    from dho_pipeline.student_data import SampleTable

    split = load_split(config.split)
    split.check_manifest(manifest, where=f"split {config.split}")
    ids = SampleTable.from_manifest(manifest).ids_of(split.holdout_mask(manifest))
    if len(ids) == 0:
        raise UserError(f"split {config.split} holds no held-out images; draw it with --holdout N")
    return ids, {"data": [str(d) for d in config.data], "split": str(config.split), "split_fingerprint": split.fingerprint}


def _check_overlap(config: Config, loaded, manifest, ids) -> int:
    """How many calibration images were training labeled images; refuse any unless allowed."""
    labeled = loaded.checkpoint.labeled_keys
    keys = [key for shard in manifest.shards for key in shard.keys]
    overlap = [keys[i] for i in ids if keys[i] in labeled]
    if overlap and not config.allow_overlap:
        raise UserError(
            f"{len(overlap)} of the {len(ids)} calibration images were in the checkpoint's training labeled set "
            f"(e.g. {overlap[0]!r}); calibrate on held-out data (split --holdout), or pass --allow-overlap"
        )
    return len(overlap)


def _few_images_warning(images: int, classes: int) -> str | None:
    """Fewer held-out images than classes: the grid's accuracies move in steps of 1/images, and most
    classes are not seen at all, so the chosen alpha and beta are mostly noise."""
    if images >= classes:
        return None
    return (f"calibrating on {images} held-out image{'s' if images != 1 else ''}, fewer than the {classes} classes: "
            "alpha and beta chosen on so few are mostly noise; hold out more "
            "(split --holdout N per class) or keep the paper's setting")


def run(config: Config) -> dict:
    from dho_pipeline.evaluation import (
        ALPHA_GRID, BETA_GRID, best_point, finish_statistics, grid_scores, refinement_grid, student_logits_on,
        sufficient_statistics,
    )
    from dho_pipeline.hashing import fingerprint_json
    from dho_pipeline.jsonfiles import write_text_atomically

    from .common import autocast, reduce_sum
    from .evaluate import load_inputs

    loaded, manifest, state, device, precision = load_inputs(config)
    ids, source = _calibration_ids(config, manifest)
    overlap = _check_overlap(config, loaded, manifest, ids)
    warning = _few_images_warning(len(ids), len(loaded.classnames))
    if warning and state.is_main_process:
        log.warning("warning: %s", warning)
    logits = student_logits_on(
        loaded, manifest, ids, rank=state.process_index, world=state.num_processes, batch_size=config.batch_size,
        workers=config.workers, device=device, autocast=lambda: autocast(device, precision),
        eval_view=config.eval_view, progress="calibrate",
    )
    total = len(ids)  # each process evaluated its share; together, every id once

    coarse, coarse_nll = (reduce_sum(state, t) for t in grid_scores(logits, ALPHA_GRID, BETA_GRID))
    coarse_alpha, coarse_beta, _ = best_point(coarse, ALPHA_GRID, BETA_GRID, coarse_nll)
    fine_alphas, fine_betas = refinement_grid(coarse_alpha, coarse_beta)
    fine, fine_nll = (reduce_sum(state, t) for t in grid_scores(logits, fine_alphas, fine_betas))
    alpha, beta, correct = best_point(fine, fine_alphas, fine_betas, fine_nll)

    num_classes = len(loaded.classnames)
    chosen = finish_statistics(reduce_sum(state, sufficient_statistics(logits, alpha, beta, num_classes)), num_classes)
    paper = finish_statistics(reduce_sum(state, sufficient_statistics(logits, 0.5, 0.5, num_classes)), num_classes)
    keys = [key for shard in manifest.shards for key in shard.keys]
    calibrated_on = {**source, "samples": total, "overlap_with_training_labels": overlap,
                     "fingerprint": fingerprint_json(sorted(keys[i] for i in ids))}
    report = {
        "alpha": alpha, "beta": beta, "samples": total, "calibrated_on": calibrated_on, "warning": warning,
        "accuracy": {head: chosen[head]["top1"] for head in ("ce", "kd", "mix")},
        "nll": {head: chosen[head]["nll"] for head in ("ce", "kd", "mix")},
        "ece": {head: chosen[head]["ece"] for head in ("ce", "kd", "mix")},
        "paper_setting": {"alpha": 0.5, "beta": 0.5, "accuracy": paper["mix"]["top1"]},
        "chosen_by": "fine_grid",  # the fine grid, around the coarse grid's best point, chose (alpha, beta)
        "tie_break": "held-out NLL, then nearest alpha = beta = 0.5",
        "coarse_grid": _grid_report(ALPHA_GRID, BETA_GRID, coarse, coarse_nll, total, (coarse_alpha, coarse_beta)),
        "fine_grid": _grid_report(fine_alphas, fine_betas, fine, fine_nll, total, (alpha, beta)),
    }
    if state.is_main_process:
        loaded.checkpoint.calibrated(alpha=alpha, beta=beta, acc=correct / max(1, total),
                                     calibrated_on=calibrated_on).save(config.out)
        out = Path(config.out)
        write_text_atomically(out.with_name(out.name + ".calibration.json"), json.dumps(report, indent=2) + "\n")
        save_heatmap(report, out.with_name(out.name + ".calibration.png"))
    return report


def _grid_report(alphas, betas, correct, nll, total: int, best: tuple[float, float]) -> dict:
    from dho_pipeline.evaluation import tied_at_best

    return {"alphas": alphas, "betas": betas, "accuracy": (correct / max(1, total)).tolist(),
            "nll": (nll / max(1, total)).tolist(), "best": {"alpha": best[0], "beta": best[1]},
            "tied_at_best_accuracy": tied_at_best(correct)}


def save_heatmap(report: dict, path: Path) -> None:
    """Both grids' top-1 as heatmaps: the coarse grid (its best point, and the fine grid's extent
    outlined) and the fine grid, which chose the point (marked). Same colour scale for both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    coarse, fine = report["coarse_grid"], report["fine_grid"]
    values = [100 * np.array(g["accuracy"]) for g in (coarse, fine)]
    low, high = min(v.min() for v in values), max(v.max() for v in values)
    if high - low < 1e-9:  # a flat grid: one colour, centred on the scale
        low, high = low - 1, high + 1
    figure, panels = plt.subplots(1, 2, figsize=(11, 6.5), gridspec_kw={"width_ratios": [7, 10]}, layout="constrained")
    for axes, grid, accuracy, name in zip(panels, (coarse, fine), values, ("coarse grid", "fine grid")):
        image = axes.imshow(accuracy, aspect="auto", cmap="viridis", origin="lower", vmin=low, vmax=high)
        axes.set_xticks(range(len(grid["betas"])), [f"{b:.3g}" for b in grid["betas"]], rotation=45)
        step = 2 if len(grid["alphas"]) > 12 else 1
        axes.set_yticks(range(0, len(grid["alphas"]), step), [f"{a:g}" for a in grid["alphas"][::step]])
        axes.set_xlabel("beta (KD-head temperature)")
        axes.set_ylabel("alpha (weight of the CE head)")
        if "nll" in grid and min(accuracy.shape) > 1:  # where accuracy ties, the held-out NLL decides: its contours
            contours = axes.contour(np.array(grid["nll"]), levels=6, colors="white", linewidths=0.7, alpha=0.8)
            axes.clabel(contours, fontsize=7, fmt="%.3g")
        row, col = grid["alphas"].index(grid["best"]["alpha"]), grid["betas"].index(grid["best"]["beta"])
        axes.plot(col, row, marker="*", color="white", markeredgecolor="black", markersize=15)
        axes.set_title(f"{name}: best alpha={grid['best']['alpha']:g}, beta={grid['best']['beta']:.3g}\n"
                       f"({grid['tied_at_best_accuracy']} point(s) at its best top-1; ties by held-out NLL, "
                       "white contours)", fontsize=9)
    # where the fine grid lies on the coarse one
    rows = [i for i, a in enumerate(coarse["alphas"]) if min(fine["alphas"]) <= a <= max(fine["alphas"])]
    cols = [j for j, b in enumerate(coarse["betas"]) if min(fine["betas"]) <= b <= max(fine["betas"])]
    if rows and cols:
        panels[0].add_patch(Rectangle((cols[0] - 0.5, rows[0] - 0.5), len(cols), len(rows), fill=False,
                                      edgecolor="white", linestyle="--", linewidth=1.5))
    figure.colorbar(image, ax=panels, label="top-1 (%)")
    figure.suptitle(f"alpha/beta chosen on {report['samples']} held-out images: alpha={report['alpha']:g}, "
                    f"beta={report['beta']:.3g} (fine grid), top-1 {100 * report['accuracy']['mix']:.1f}%")
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    temporary.replace(path)
