"""Compare many training runs on one teacher cache: one table, the settings that differ as columns.

    dho-pipeline report runs/b16-1pct-s0 runs/b16-1pct-s1 runs/b16-10pct-s0 --data data/imagenet-val.json

Per run: student, objective, label budget, seed, steps, wall time, and top-1 / NLL / ECE of the CE head, the
KD head and the mix (with the run's alpha and beta). The metrics come from evaluating the run's checkpoint on
`--data` (kept in RUN_DIR/evaluations/ and reused while the checkpoint is unchanged), else from an evaluation
kept there earlier, else from training's last `--eval-data` line (top-1 only, alpha = beta = 0.5). Runs that
differ only by seed are also summarised as mean ± sd. Runs trained against different caches, or evaluated on
different data, are refused unless --allow-mixed.

Writes PREFIX.md, PREFIX.csv, PREFIX.json and PREFIX.png (top-1 per group of runs, each run a dot).
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from dho_pipeline.errors import UserError

from .options import setting
from .shared_settings import device_setting, precision_setting

HEADS = ("ce", "kd", "mix")
METRICS = ("top1", "nll", "ece")
# Config entries that say where and how a run ran, not what it learned: never columns, never group keys.
BOOKKEEPING = ("out", "resume", "workers", "device", "log_every", "checkpoint_every", "keep_checkpoints",
               "eval_batch_size", "eval_data", "report_to", "compile", "precision", "max_steps")
SHOWN = ("student", "objective", "seed", "split")  # fixed columns (the split as its label budget)


@dataclass(frozen=True, kw_only=True)
class Config:
    runs: tuple[Path, ...] = setting(argument=True, help="Run directories (from train).")
    data: Path | None = setting(None, default_text="evaluations already kept in the runs",
                                help="Manifest to evaluate every run's checkpoint on.")
    out: Path = setting(Path("report"), help="Output prefix: PREFIX.md, .csv, .json and .png.")
    checkpoint: str = setting("auto", help="Checkpoint file in each run directory; auto: student-calibrated.pt "
                              "where present, else student.pt.")
    allow_mixed: bool = setting(False, help="Compare runs trained against different caches or evaluated on different data.")
    batch_size: int = setting(256, help="Evaluation images per batch.")
    workers: int = setting(4, help="Data-loading processes.")
    device: str | None = device_setting("cuda if available, else cpu")
    precision: str | None = precision_setting()


# ---- one run ----------------------------------------------------------------------------------------------


def _checkpoint_of(run: Path, name: str) -> Path:
    if name != "auto":
        path = run / name
    else:
        path = next((run / n for n in ("student-calibrated.pt", "student.pt") if (run / n).is_file()), run / "student.pt")
    if not path.is_file():
        raise UserError(f"run {run} has no {path.name}; is it a finished `dho-pipeline train` run directory?")
    return path


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _wall_seconds(run: Path, summary: dict | None) -> float | None:
    """summary.json's, else the span of metrics.jsonl's time stamps (runs from before it was recorded)."""
    if summary and isinstance(summary.get("wall_seconds"), (int, float)):
        return float(summary["wall_seconds"])
    try:
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        stamps = [time.mktime(time.strptime(line["time"], "%Y-%m-%dT%H:%M:%S")) for line in lines if "time" in line]
    except (OSError, ValueError, KeyError):
        return None
    return stamps[-1] - stamps[0] if len(stamps) > 1 else None


def _label_budget(config: dict, checkpoint) -> str:
    labeled = len(checkpoint.labeled_keys)
    try:
        from dho_pipeline.split import load_split

        method = load_split(config["split"]).method
    except Exception:  # the split file is elsewhere now
        return f"{labeled} labeled"
    if method.get("percent") is not None:
        return f"{method['percent']:g}% ({labeled} labeled)"
    if method.get("shots") is not None:
        return f"{method['shots']} shots ({labeled} labeled)"
    return f"list {method.get('from_list')} ({labeled} labeled)"


def _teacher_source(checkpoint, config: dict) -> str:
    metadata = checkpoint.metadata
    if metadata is None:
        return "unknown"
    if metadata.cache_fingerprint:
        return metadata.cache_fingerprint
    return f"online:{config.get('teacher')}/{config.get('teacher_pretrained')}"


def read_run(run: Path, checkpoint_name: str) -> dict:
    from dho_pipeline.student_checkpoint import read_student

    run = Path(run)
    if not run.is_dir():
        raise UserError(f"run {run} is not a directory")
    checkpoint_path = _checkpoint_of(run, checkpoint_name)
    checkpoint = read_student(checkpoint_path)
    config = _read_json(run / "config.json") or (checkpoint.metadata.config if checkpoint.metadata else None)
    if not isinstance(config, dict) or not config:
        raise UserError(f"run {run} has no readable config.json and its checkpoint records no training config")
    summary = _read_json(run / "summary.json")
    return {
        "run": str(run), "name": run.name, "checkpoint": checkpoint_path, "config": config,
        "student": checkpoint.metadata.model if checkpoint.metadata else config.get("student"),
        "objective": config.get("objective"), "label_budget": _label_budget(config, checkpoint),
        "seed": config.get("seed"), "steps": checkpoint.metadata.steps if checkpoint.metadata else None,
        "finished": checkpoint.metadata.finished if checkpoint.metadata else None,
        "wall_seconds": _wall_seconds(run, summary), "alpha": checkpoint.alpha, "beta": checkpoint.beta,
        "teacher": _teacher_source(checkpoint, config),
    }


# ---- evaluations ---------------------------------------------------------------------------------------------


def _stamp(path: Path) -> dict:
    stat = path.stat()
    return {"checkpoint": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _kept_evaluation(run: Path, checkpoint: Path, data_fingerprint: str | None = None) -> dict | None:
    """The newest evaluation kept in RUN/evaluations/ for this very checkpoint (on this data, if given)."""
    stamp, found = _stamp(checkpoint), []
    for path in sorted((run / "evaluations").glob("*.json")):
        record = _read_json(path)
        if isinstance(record, dict) and record.get("stamp") == stamp and (
                data_fingerprint is None or record.get("data_fingerprint") == data_fingerprint):
            found.append((path.stat().st_mtime_ns, record))
    return max(found, key=lambda f: f[0])[1] if found else None


def _evaluate(entry: dict, manifest, data: Path, config: Config) -> dict:
    """Evaluate a run's checkpoint on the manifest (as `evaluate` does, with the checkpoint's alpha and
    beta) and keep the result in RUN/evaluations/."""
    from dho_pipeline.jsonfiles import write_text_atomically
    from dho_pipeline.student_checkpoint import load_student

    from .common import device_and_precision
    from .evaluate import evaluate_loaded

    loaded = load_student(entry["checkpoint"])
    manifest.check_labels(len(loaded.classnames), required=True)
    state, device, precision = device_and_precision(config.device, config.precision)
    report = evaluate_loaded(loaded, manifest, state=state, device=device, precision=precision, alpha=None, beta=None,
                             class_subset=None, batch_size=config.batch_size, workers=config.workers)
    record = {"stamp": _stamp(entry["checkpoint"]), "data": [str(data)], "data_fingerprint": manifest.fingerprint,
              "alpha": loaded.alpha, "beta": loaded.beta, "samples": report["samples"],
              **{head: {m: report[head][m] for m in ("top1", "top5", "nll", "ece")} for head in HEADS}}
    name = f"{manifest.fingerprint.split(':')[-1][:16]}-{entry['checkpoint'].stem}.json"
    write_text_atomically(Path(entry["run"]) / "evaluations" / name, json.dumps(record, indent=2) + "\n")
    return record


def _training_evaluation(entry: dict) -> dict | None:
    """train --eval-data's last line: top-1 per head at alpha = beta = 0.5."""
    try:
        lines = (Path(entry["run"]) / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    evals = [json.loads(line)["eval"] for line in lines if '"eval"' in line]
    evals = [e for e in evals if isinstance(e, dict) and e]
    if not evals:
        return None
    data = entry["config"].get("eval_data")
    fingerprint = None
    try:
        from dho_pipeline.manifest import load_manifest

        fingerprint = load_manifest(data).fingerprint
    except Exception:
        fingerprint = f"path:{data}"
    last = evals[-1]
    return {"data": [str(data)], "data_fingerprint": fingerprint, "samples": last.get("samples"), "alpha": 0.5,
            "beta": 0.5, "source": "train --eval-data (top-1 only, alpha = beta = 0.5)",
            **{head: {"top1": last.get(head)} for head in HEADS}}


def attach_evaluations(entries: list[dict], config: Config) -> None:
    manifest = None
    if config.data is not None:
        from dho_pipeline.manifest import load_manifest

        manifest = load_manifest(config.data)
        manifest.check_files()
    for entry in entries:
        run, checkpoint = Path(entry["run"]), entry["checkpoint"]
        if manifest is not None:
            record = _kept_evaluation(run, checkpoint, manifest.fingerprint)
            entry["evaluation"] = record or _evaluate(entry, manifest, config.data, config)
            entry["evaluation"].setdefault("source", f"evaluated on {config.data}")
        else:
            record = _kept_evaluation(run, checkpoint)
            if record is not None:
                record.setdefault("source", f"kept evaluation on {', '.join(record.get('data', []))}")
            entry["evaluation"] = record or _training_evaluation(entry)


# ---- checks, columns, groups ---------------------------------------------------------------------------------


def check_comparable(entries: list[dict], allow_mixed: bool) -> list[str]:
    """Refuse runs of different caches or evaluation data (unless allowed); returns warnings when allowed."""
    problems = []
    for what, key in (("trained against different teacher caches", "teacher"),
                      ("evaluated on different data", "data_fingerprint")):
        values = {}
        for entry in entries:
            value = entry["teacher"] if key == "teacher" else (entry.get("evaluation") or {}).get(key)
            if value is not None:
                values.setdefault(value, []).append(entry["name"])
        if len(values) > 1:
            groups = "; ".join(f"{', '.join(names)}: {value[:30]}" for value, names in values.items())
            problems.append(f"runs {what} ({groups})")
    if problems and not allow_mixed:
        raise UserError(f"{problems[0]}; compare runs of one cache on one evaluation set, or pass --allow-mixed")
    return problems


def _hashable(value):
    return json.dumps(value, sort_keys=True, default=str)


def differing_settings(entries: list[dict]) -> list[str]:
    """Config keys whose values differ between runs (bookkeeping and the fixed columns left out)."""
    keys = sorted({k for e in entries for k in e["config"]} - set(BOOKKEEPING) - set(SHOWN) - {"cache"})
    return [k for k in keys if len({_hashable(e["config"].get(k)) for e in entries}) > 1]


def group_by_seed(entries: list[dict]) -> list[list[dict]]:
    """Runs whose configs are equal but for the seed (and bookkeeping), in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for entry in entries:
        key = _hashable({k: v for k, v in entry["config"].items() if k not in BOOKKEEPING and k != "seed"}
                        | {"checkpoint": entry["checkpoint"].name})
        groups.setdefault(key, []).append(entry)
    return list(groups.values())


def _metric(entry: dict, head: str, metric: str):
    return ((entry.get("evaluation") or {}).get(head) or {}).get(metric)


def _row(entry: dict, settings: list[str]) -> dict:
    row = {"run": entry["name"], "checkpoint": entry["checkpoint"].name, "student": entry["student"],
           "objective": entry["objective"], "label_budget": entry["label_budget"], "seed": entry["seed"],
           "steps": entry["steps"], "wall_seconds": entry["wall_seconds"], "alpha": entry["alpha"], "beta": entry["beta"]}
    row.update({s: entry["config"].get(s) for s in settings})
    row.update({f"{head}_{m}": _metric(entry, head, m) for head in HEADS for m in METRICS})
    evaluation = entry.get("evaluation") or {}
    row.update({"eval_samples": evaluation.get("samples"), "eval_source": evaluation.get("source")})
    return row


def _group_row(group: list[dict], settings: list[str]) -> dict:
    first = group[0]
    row = {"runs": len(group), "seeds": [e["seed"] for e in group], "student": first["student"],
           "objective": first["objective"], "label_budget": first["label_budget"]}
    row.update({s: first["config"].get(s) for s in settings if s != "seed"})
    for head in HEADS:
        for m in METRICS:
            values = [v for v in (_metric(e, head, m) for e in group) if v is not None]
            row[f"{head}_{m}"] = ({"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                                   "n": len(values)} if values else None)
    return row


# ---- writing ----------------------------------------------------------------------------------------------------


def _cell(value, metric: str | None = None) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):  # mean ± sd
        return f"{_cell(value['mean'], metric)} ± {_cell(value['sd'], metric)}"
    if metric == "top1":
        return f"{100 * value:.2f}"
    if metric in ("nll", "ece"):
        return f"{value:.3f}"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def _metric_columns() -> list[tuple[str, str, str]]:
    names = {"ce": "CE", "kd": "KD", "mix": "mix", "top1": "top-1 %", "nll": "NLL", "ece": "ECE"}
    return [(f"{h}_{m}", f"{names[h]} {names[m]}", m) for h in HEADS for m in METRICS]


def markdown(rows: list[dict], group_rows: list[dict], settings: list[str], warnings: list[str]) -> str:
    fixed = [("run", "run"), ("student", "student"), ("objective", "objective"), ("label_budget", "labels"),
             ("seed", "seed"), *[(s, s) for s in settings if s != "seed"], ("steps", "steps"),
             ("wall_seconds", "wall s"), ("alpha", "alpha"), ("beta", "beta")]
    columns = [(k, title, None) for k, title in fixed] + _metric_columns()
    lines = ["# Runs", ""]
    lines += [f"> warning: {w}" for w in warnings] + ([""] if warnings else [])
    lines += ["| " + " | ".join(t for _, t, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        wall = row["wall_seconds"]
        cells = [(_cell(round(wall)) if k == "wall_seconds" and wall is not None else _cell(row.get(k), m))
                 for k, _, m in columns]
        lines.append("| " + " | ".join(cells) + " |")
    sources = sorted({row["eval_source"] for row in rows if row.get("eval_source")})
    samples = sorted({row["eval_samples"] for row in rows if row.get("eval_samples") is not None})
    lines += ["", f"Metrics: {'; '.join(sources) or 'no evaluation found (pass --data)'}"
              + (f"; {', '.join(map(str, samples))} images" if samples else "") + "."]
    multi = [g for g in group_rows if g["runs"] > 1]
    if multi:
        gfixed = [("student", "student"), ("objective", "objective"), ("label_budget", "labels"),
                  *[(s, s) for s in settings if s != "seed"], ("runs", "runs"), ("seeds", "seeds")]
        gcolumns = [(k, t, None) for k, t in gfixed] + _metric_columns()
        lines += ["", "# Over seeds (mean ± sd)", "", "| " + " | ".join(t for _, t, _ in gcolumns) + " |",
                  "|" + "---|" * len(gcolumns)]
        for row in multi:
            lines.append("| " + " | ".join(_cell(row.get(k), m) for k, _, m in gcolumns) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else ("" if v is None else v) for k, v in row.items()})
    return out.getvalue()


def _group_label(row: dict, settings: list[str]) -> str:
    parts = [str(row["student"]), str(row["objective"]), str(row["label_budget"]).split(" (")[0]]
    parts += [f"{s}={_cell(row.get(s))}" for s in settings if s != "seed"]
    return "\n".join(parts)


def save_plot(groups: list[list[dict]], settings: list[str], path: Path) -> None:
    """Top-1 of each head per group of runs: bars at the mean, a dot per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(max(5.0, 1.6 * len(groups) + 2), 4.5))
    width = 0.26
    for h, (head, label, colour) in enumerate((("ce", "CE head", "#4c72b0"), ("kd", "KD head", "#dd8452"),
                                               ("mix", "mix", "#55a868"))):
        for g, group in enumerate(groups):
            values = [100 * v for v in (_metric(e, head, "top1") for e in group) if v is not None]
            if not values:
                continue
            x = g + (h - 1) * width
            axes.bar(x, statistics.fmean(values), width, color=colour, label=label if g == 0 else None, alpha=0.8)
            axes.scatter([x] * len(values), values, color="black", s=10, zorder=3)
    axes.set_xticks(range(len(groups)), [_group_label(_group_row(g, settings), settings) for g in groups], fontsize=7)
    axes.set_ylabel("top-1 (%)")
    axes.set_title("top-1 per group of runs (bars: mean; dots: runs)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    temporary.replace(path)


def run(config: Config) -> dict:
    from dho_pipeline.jsonfiles import write_text_atomically

    if not config.runs:
        raise UserError("name at least one run directory")
    entries = [read_run(run, config.checkpoint) for run in config.runs]
    names = [e["run"] for e in entries]
    if len(set(names)) != len(names):
        raise UserError("a run directory is named twice")
    if not config.allow_mixed:  # different caches are refused before anything is evaluated
        check_comparable(entries, allow_mixed=False)
    attach_evaluations(entries, config)
    warnings = check_comparable(entries, config.allow_mixed)
    settings = differing_settings(entries)
    groups = group_by_seed(entries)
    rows = [_row(e, settings) for e in entries]
    group_rows = [_group_row(g, settings) for g in groups]
    out = Path(config.out)
    paths = {suffix: out.with_name(out.name + suffix) for suffix in (".md", ".csv", ".json", ".png")}
    table = markdown(rows, group_rows, settings, warnings)
    write_text_atomically(paths[".md"], table)
    write_text_atomically(paths[".csv"], write_csv(rows))
    document = {"runs": rows, "over_seeds": [g for g in group_rows if g["runs"] > 1], "differing_settings": settings,
                "teacher_caches": sorted({e["teacher"] for e in entries}), "warnings": warnings,
                "data": str(config.data) if config.data else None}
    write_text_atomically(paths[".json"], json.dumps(document, indent=2, default=str) + "\n")
    save_plot(groups, settings, paths[".png"])
    return {"table": table, "files": {k: str(v) for k, v in paths.items()}, **document}
