"""The whole pipeline on real images, on a CPU, offline, in minutes: scikit-learn's handwritten digits.

    dho-pipeline demo --out demo-out

ImageNet and DFN5B cannot be had offline, so the demo uses the 1,797 digits that ship with
scikit-learn and two tiny CLIPs shipped with the package (pretrained contrastively on the digits'
*pretrain* part: `dho-pipeline pretrain-demo-clips` reproduces them). Every stage runs through the
command line exactly as the ImageNet recipe does; `report.md` lists each command.

1. digits -> WebDataset shards: pretrain / train / test (fixed split; test is touched only at the end),
   with classes.txt beside them (as `shard` writes it; the manifests record the names);
2. manifests; zero-shot accuracy of teacher and student on test (a 1-view, all-logit cache each);
3. cache-teacher on train: several views, and 1 view;
4. split: `percent`% labeled (class-balanced) + `holdout` per class for calibration;
5. train: CE-only, single-head CE+KD, DHO (several cached views), DHO (1 cached view), DHO (teacher
   online, the reference code's way), `jobs` at a time, each in its own process on one thread;
6. calibrate each DHO run on the held-out images; evaluate everything on test;
7. report: results.json, report.md (table and commands with their times), plots.

The settings (views, epochs, batch, learning rate, held-out images) were chosen on the train part
only: trained on part of it and measured on a fixed held-out slice of it, never on the test part
(README, "The demo"). A rerun resumes: the report shows each reused step's original time.

The teacher (about 95% zero-shot) is far stronger than the student's starting point (about 15%), as
DFN5B ViT-H/14 (84%) is stronger than a CLIP ViT-B/16 (68%): distillation needs that gap.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import click

from dho_pipeline.errors import UserError

from .options import setting

METHODS = {  # report row -> (run name, head read from the evaluation)
    "CE-only": ("ce-only", "ce"),
    "single-head CE+KD": ("single-head", "ce"),
    "DHO, CE head": ("dho", "ce"),
    "DHO, KD head": ("dho", "kd"),
    "DHO, combined (calibrated)": ("dho", "mix"),
    "DHO combined, 1 cached view": ("dho-1view", "mix"),
    "DHO combined, teacher online": ("dho-online", "mix"),
}


@dataclass(frozen=True, kw_only=True)
class Config:
    out: Path = setting(Path("demo-out"), help="Folder for the demo's data, caches, runs and report.")
    seed: int = setting(0, help="Seed of the label split, data order and views (the three-way data split is fixed).")
    percent: float = setting(1.0, help="Labeled share of the train part (1%: one image per class).")
    holdout: int = setting(10, help="Held-out labeled images per class, for calibration.")
    views: int = setting(8, help="Cached teacher views per training image.")
    epochs: int = setting(30, help="Epochs per training run (passes over the unlabeled images).")
    batch_size: int = setting(16, help="Labeled (and as many unlabeled) images per step.")
    lr: float = setting(2e-3, help="Peak learning rate of the training runs.")
    workers: int = setting(0, help="Data-loading processes (0: in the training process; best on 2 cores).")
    jobs: int = setting(2, help="Training runs at a time, each its own process on one CPU thread.")

    def __post_init__(self):
        if self.jobs < 1 or self.epochs < 1 or self.views < 1 or self.batch_size < 1 or self.holdout < 1:
            raise UserError("--jobs, --epochs, --views, --batch-size and --holdout must be at least 1")


class _Runner:
    """Runs dho-pipeline commands, logging each one with its time (the report lists them).

    `invoke(args)` runs one command line in this process; the command line hands it in (this module
    does not import the CLI, which imports this module). `start` runs one in its own process on one
    torch thread, `jobs` at a time, while this process goes on; `wait` waits for all started ones.

    A step whose work an earlier run already did (a complete cache, a finished training run) is skipped
    by the command itself in a moment; the report then shows the time it took when it did the work
    (kept in `timings`, a JSON file in the demo folder), marked as reused, never the skip's time.
    """

    def __init__(self, invoke: Callable[[list[str]], None], timings: Path, jobs: int = 1):
        from concurrent.futures import ThreadPoolExecutor

        self.invoke, self.timings_path, self.jobs = invoke, timings, jobs
        self.commands: list[dict] = []
        self.timings: dict[str, float] = json.loads(timings.read_text()) if timings.exists() else {}
        self.began = time.perf_counter()
        self._pool = ThreadPoolExecutor(max_workers=max(1, jobs))
        self._started: list[tuple] = []
        self._processes: list = []

    def _announce(self, step: str, words: list[str], done: Callable[[], bool] | None) -> bool:
        reused = bool(done and done())
        click.echo(f"[demo] {step}: dho-pipeline {shlex.join(words)}{' (done before: reused)' if reused else ''}", err=True)
        return reused

    def __call__(self, step: str, *args, capture: bool = False, done: Callable[[], bool] | None = None) -> str:
        """Run one command in this process; `done()` says (before it runs) whether its work is already done."""
        words = [str(a) for a in args]
        reused = self._announce(step, words, done)
        started = time.perf_counter()
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):  # the demo's own stdout carries only its result
            try:
                self.invoke(words)
            except click.ClickException as error:
                raise UserError(f"demo step '{step}' failed: {error.format_message()}") from None
        if not capture:
            click.echo(stdout.getvalue().rstrip(), err=True)
        self._record(step, words, started, time.perf_counter() - started, reused)
        return stdout.getvalue()

    def start(self, step: str, *args, done: Callable[[], bool] | None = None) -> None:
        """Start one command in its own process (queued while `jobs` run), on one torch thread: tiny models
        gain less from a second thread than its synchronisation costs, and the other core runs another job."""
        import os
        import subprocess
        import sys

        words = [str(a) for a in args]
        reused = self._announce(step, words, done)
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DHO_DEMO_PARENT": str(os.getpid())}

        def run_one():
            started = time.perf_counter()
            process = subprocess.Popen([sys.executable, "-c", _CHILD, *words], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True, env=environment)
            self._processes.append(process)
            stdout, stderr = process.communicate()
            return started, time.perf_counter() - started, process.returncode, stdout, stderr

        self._started.append((step, words, reused, self._pool.submit(run_one)))

    def wait(self) -> None:
        """Wait for every started command; the first failure stops the others and is reported."""
        try:
            for step, words, reused, future in self._started:
                started, seconds, code, stdout, stderr = future.result()
                if code != 0:
                    lines = [line for line in stderr.strip().splitlines() if line.strip()]
                    raise UserError(f"demo step '{step}' failed: {lines[-1] if lines else f'exit status {code}'}")
                click.echo(f"[demo] {step}: done in {seconds:.0f} s. {stdout.strip()}", err=True)
                self._record(step, words, started, seconds, reused)
        finally:
            for *_, future in self._started:  # on a failure: those not started yet never start ...
                future.cancel()
            for process in self._processes:  # ... and those running stop (a rerun resumes them)
                if process.poll() is None:
                    process.terminate()
            self._started.clear()

    def _record(self, step: str, words: list[str], started: float, seconds: float, reused: bool) -> None:
        command = "dho-pipeline " + shlex.join(words)
        entry = {"step": step, "command": command, "seconds": round(seconds, 1), "reused": reused,
                 "started_at": round(started - self.began, 1)}
        if reused:  # the time it took when it did the work, if an earlier run recorded it
            entry["seconds"] = self.timings.get(command)
            entry["seconds_this_run"] = round(seconds, 1)
        else:
            self.timings[command] = round(seconds, 1)
            self.timings_path.write_text(json.dumps(self.timings, indent=1) + "\n")
        self.commands.append(entry)
        self.commands.sort(key=lambda c: c["started_at"])


# A started command's process: `dho-pipeline ARGS...`, which stops (SIGTERM) when the demo's process dies.
_CHILD = ("import os, signal, sys; from dho_pipeline.processes import die_with_parent; "
          "die_with_parent(int(os.environ['DHO_DEMO_PARENT']), signal.SIGTERM); "
          "from dho_pipeline.stages.cli import main; main(args=sys.argv[1:], prog_name='dho-pipeline')")


def write_digit_shards(out: Path) -> dict[str, list[Path]]:
    """The three parts as shards, out/data/<part>-NNNNNN.tar (byte-identical on every run)."""
    from dho_pipeline.demo.digits import CLASSNAMES, load_digit_images, three_way_split
    from dho_pipeline.shard_writer import SampleSource, write_shards

    images, labels = load_digit_images(32)
    written = {}
    for part, indices in three_way_split(len(images)).items():
        samples = []
        for index in indices:
            buffer = io.BytesIO()
            images[index].save(buffer, format="PNG")
            samples.append(SampleSource(key=f"digit{index:04d}", ext="png", label=int(labels[index]), data=buffer.getvalue()))
        written[part] = write_shards(samples, str(out / "data" / f"{part}-%06d.tar"), maxcount=200, maxsize=1e9)
    # Beside the shards, as `dho-pipeline shard` writes it: the manifests record these names.
    (out / "data" / "classes.txt").write_text("\n".join(CLASSNAMES) + "\n")
    return written


def cache_accuracy(cache_path: Path, manifest_path: Path) -> float:
    """Top-1 of a cache's view 0 against the manifest labels: a teacher's zero-shot accuracy."""
    from dho_pipeline.cache_store import TeacherCache
    from dho_pipeline.manifest import load_manifest

    cache, manifest = TeacherCache.open(cache_path), load_manifest(manifest_path)
    correct = total = 0
    for index, shard in enumerate(manifest.shards):
        predicted = cache.read_shard(index, ("topk_index",))["topk_index"][:, 0, 0]
        correct += int((predicted == shard.labels).sum())
        total += shard.num_samples
    return correct / total


def _cache_complete(path: Path) -> Callable[[], bool]:
    def done() -> bool:
        from dho_pipeline.cache_store import TeacherCache

        try:
            return not TeacherCache.open(path).incomplete_shards()
        except Exception:  # absent or unreadable: the step will make it (or say what is wrong)
            return False

    return done


def _run_finished(run_dir: Path) -> Callable[[], bool]:
    def done() -> bool:
        try:
            return bool(json.loads((run_dir / "summary.json").read_text())["finished"])
        except (OSError, ValueError, KeyError):
            return False

    return done


def run(config: Config, invoke: Callable[[list[str]], None]) -> dict:
    """The demo; `invoke(args)` runs one dho-pipeline command line in this process."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this process's own steps run beside a training process: a core each
    try:
        return _run(config, invoke)
    finally:
        torch.set_num_threads(threads)


def _run(config: Config, invoke: Callable[[list[str]], None]) -> dict:
    from dho_pipeline.demo.digits import CROP_SCALE, TEMPLATES
    from dho_pipeline.demo.tiny_clip import expand_compact

    from .pretrain_demo import SHIPPED

    started = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    run_cli = _Runner(invoke, out / "timings.json", jobs=config.jobs)
    templates = out / "templates.txt"
    templates.write_text("\n".join(TEMPLATES) + "\n")
    crop_scale = ",".join(f"{v:g}" for v in CROP_SCALE)

    # ---- data and models --------------------------------------------------------------------------
    click.echo("[demo] writing digit shards (pretrain / train / test) with classes.txt, and the tiny CLIPs' weights", err=True)
    parts = write_digit_shards(out)
    # Ordinary open_clip weights files, expanded from the shipped compact ones (--pretrained takes either).
    weights = {stem: out / "weights" / f"{stem}.safetensors" for stem in ("tiny-teacher", "tiny-student")}
    for stem, path in weights.items():
        if not path.exists():  # written whole or not at all (temporary name, then rename)
            expand_compact(SHIPPED / f"{stem}.safetensors", path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)
    teacher = ["--teacher", "dho-tiny-teacher", "--pretrained", weights["tiny-teacher"]]
    for part in ("train", "test"):
        run_cli(f"manifest ({part})", "manifest", *parts[part], "--out", out / f"{part}.json")

    split = out / f"split-{config.percent:g}pct-seed{config.seed}.json"
    run_cli("split", "split", "--manifest", out / "train.json", "--percent", config.percent, "--seed", config.seed,
            "--holdout", config.holdout, "--out", split)

    # ---- students: five training runs, `jobs` at a time, each in its own process ----------------------
    common = ["--manifest", out / "train.json", "--split", split, "--student", "dho-tiny-student",
              "--pretrained", weights["tiny-student"], "--epochs", config.epochs, "--batch-size", config.batch_size,
              "--lr", config.lr, "--seed", config.seed, "--workers", config.workers, "--log-every", 5, "--resume"]
    tag = f"{config.percent:g}pct-seed{config.seed}"
    runs = ("ce-only", "single-head", "dho", "dho-1view", "dho-online")
    run_dirs = {name: out / "runs" / f"{name}-{tag}" for name in runs}

    def train(name: str, *extra) -> None:
        run_cli.start(f"train {name}", "train", *common, *extra, "--out", run_dirs[name], done=_run_finished(run_dirs[name]))

    # The online teacher's run needs no cache and is the longest: it starts first, beside the caching.
    train("dho-online", "--teacher-online", "--teacher", "dho-tiny-teacher", "--teacher-pretrained",
          weights["tiny-teacher"], "--templates", templates, "--crop-scale", crop_scale)

    # ---- zero-shot, and the teacher caches (in this process, beside the online run) -------------------
    zero_shot = {}
    for who, model_args in (("teacher", teacher),
                            ("student", ["--teacher", "dho-tiny-student", "--pretrained", weights["tiny-student"]])):
        cache = out / f"zero-shot-{who}.zarr"
        run_cli(f"{who} zero-shot on test", "cache-teacher", "--manifest", out / "test.json", "--out", cache,
                *model_args, "--templates", templates, "--views", "1", "--topk", "all", "--workers", "0",
                done=_cache_complete(cache))
        zero_shot[who] = cache_accuracy(cache, out / "test.json")
    for name, views in (("teacher.zarr", config.views), ("teacher-1view.zarr", 1)):
        run_cli(f"cache-teacher ({views} view{'s' if views > 1 else ''})", "cache-teacher", "--manifest",
                out / "train.json", "--out", out / name, *teacher, "--templates", templates, "--views", views,
                "--topk", "all", "--seed", config.seed, "--crop-scale", crop_scale, "--workers", "0",
                done=_cache_complete(out / name))

    # ---- the runs on the caches, longest first --------------------------------------------------------
    train("dho", "--cache", out / "teacher.zarr")
    train("single-head", "--cache", out / "teacher.zarr", "--objective", "single-head")
    train("dho-1view", "--cache", out / "teacher-1view.zarr")
    train("ce-only", "--cache", out / "teacher.zarr", "--objective", "ce")
    run_cli.wait()

    reports = {}
    for name in ("ce-only", "single-head", "dho", "dho-1view", "dho-online"):
        checkpoint = run_dirs[name] / "student.pt"
        if name.startswith("dho"):
            checkpoint = run_dirs[name] / "student-calibrated.pt"
            run_cli(f"calibrate {name}", "calibrate", "--checkpoint", run_dirs[name] / "student.pt", "--data",
                    out / "train.json", "--split", split, "--out", checkpoint, "--workers", "0")
        reports[name] = json.loads(run_cli(f"evaluate {name} on test", "evaluate", "--checkpoint", checkpoint,
                                           "--data", out / "test.json", "--json", "--workers", "0", capture=True))

    # ---- the report ---------------------------------------------------------------------------------
    accuracy = {"teacher zero-shot": zero_shot["teacher"], "student zero-shot (before training)": zero_shot["student"]}
    accuracy.update({row: reports[run][head]["top1"] for row, (run, head) in METHODS.items()})
    calibration = json.loads((run_dirs["dho"] / "student-calibrated.pt.calibration.json").read_text())
    recorded = [c["seconds"] for c in run_cli.commands]
    results = {
        "config": {k: str(v) for k, v in asdict(config).items()},
        "test_images": reports["dho"]["samples"],
        "accuracy": accuracy,
        "dho_alpha_beta": {"alpha": calibration["alpha"], "beta": calibration["beta"],
                           "held_out_images": calibration["samples"],
                           "tied_at_best_accuracy": calibration["fine_grid"]["tied_at_best_accuracy"],
                           "chosen_by": calibration.get("chosen_by", "fine_grid")},
        "commands": run_cli.commands,
        "seconds": round(time.perf_counter() - started, 1),  # this run's wall time
        "reused_steps": sum(c["reused"] for c in run_cli.commands),
        # every step's time when it did its work (earlier runs' for reused steps); None if unrecorded
        "seconds_of_steps": round(sum(recorded), 1) if None not in recorded else None,
    }
    results["report"] = str(out / f"report-{tag}" / "report.md")
    _write_report(out / f"report-{tag}", results, run_dirs["dho"])
    return results


def _write_report(folder: Path, results: dict, dho_run: Path) -> None:
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _plot_losses(dho_run / "metrics.jsonl", folder / "dho-training-loss.png")
    shutil.copyfile(dho_run / "student-calibrated.pt.calibration.png", folder / "dho-calibration.png")
    _plot_accuracy(results["accuracy"], folder / "accuracy.png")
    config, mix = results["config"], results["dho_alpha_beta"]
    reused_note = ""
    if results["reused_steps"]:
        reused_note = (f"; {results['reused_steps']} step(s) reused the work of an earlier run, shown with the time "
                       "they took then")
    lines = [
        "# dho-pipeline demo: scikit-learn digits, tiny CLIPs",
        "",
        f"{config['percent']}% of the 800 train images labeled (class-balanced), {config['holdout']} per class held out "
        f"for calibration, {config['views']} cached views, {config['epochs']} epochs of {config['batch_size']} labeled + "
        f"{config['batch_size']} unlabeled images per step at learning rate {config['lr']}, seed {config['seed']}. "
        f"Top-1 on the {results['test_images']} test images, which nothing saw before this evaluation.",
        "",
        "| method | test top-1 |",
        "|---|---|",
        *[f"| {method} | {100 * value:.1f}% |" for method, value in results["accuracy"].items()],
        "",
        f"DHO's calibrated mix: alpha = {mix['alpha']:g}, beta = {mix['beta']:.3g}, chosen on the "
        f"{mix['held_out_images']} held-out train images by the fine grid around the coarse grid's best point "
        f"({mix['tied_at_best_accuracy']} fine-grid point(s) tied at the best top-1; ties go to the lowest held-out "
        "NLL). One seed on 397 test images: one image is 0.25 points, and seed-to-seed noise is one to a few "
        "points; compare methods over seeds (`bench/demo_comparison.py`, figures in the README).",
        "",
        "![accuracy](accuracy.png) ![training loss](dho-training-loss.png) ![calibration](dho-calibration.png)",
        "",
        f"## Commands ({results['seconds']:.0f} s this run{reused_note})",
        "",
        f"Training runs ran {config['jobs']} at a time, each in its own process on one CPU thread.",
        "",
        "| step | seconds | command |",
        "|---|---|---|",
        *[f"| {c['step']} | {_seconds(c)} | `{c['command']}` |" for c in results["commands"]],
        "",
    ]
    (folder / "report.md").write_text("\n".join(lines))


def _seconds(command: dict) -> str:
    if not command["reused"]:
        return f"{command['seconds']}"
    if command["seconds"] is None:
        return "reused (time not recorded)"
    return f"{command['seconds']} (reused)"


def _plot_losses(metrics_path: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    figure, axes = plt.subplots(figsize=(6, 4))
    for part in ("ce_labeled", "kd_labeled", "kd_unlabeled"):
        axes.plot([r["step"] for r in rows], [r[part] for r in rows], label=part.replace("_", " "))
    axes.set_xlabel("optimiser step")
    axes.set_ylabel("loss (mean over 5 steps)")
    axes.set_yscale("log")
    axes.set_title("DHO training loss parts")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _plot_accuracy(accuracy: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    names = list(accuracy)
    values = [100 * accuracy[n] for n in names]
    bars = axes.barh(names[::-1], values[::-1], color="tab:blue")
    axes.bar_label(bars, fmt="%.1f")
    axes.set_xlabel("test top-1 (%)")
    axes.set_xlim(0, 105)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
