"""The `dho-pipeline` command line: each command is its stage's Config, turned into options.

Every option, its default, choices and help come from the stage's Config fields (stages/options.py);
an option left out keeps the Config's default (or a recipe's value, for `train --config`). Stage
modules are imported when this module is, but they import nothing heavy at the top: torch loads only
when a command starts its work, so `dho-pipeline --help` is instant.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from dho_pipeline.errors import Stopped, UserError
from dho_pipeline.hashing import FILE_CHECKS

from . import cache_teacher as cache_teacher_stage
from . import calibrate as calibrate_stage
from . import demo as demo_stage
from . import evaluate as evaluate_stage
from . import export as export_stage
from . import manifest as manifest_stage
from . import ood as ood_stage
from . import predict as predict_stage
from . import pretrain_demo as pretrain_demo_stage
from . import report as report_stage
from . import shard as shard_stage
from . import split as split_stage
from . import train as train_stage
from .options import config_options, given, make_config

PATH = click.Path(path_type=Path)


class _Group(click.Group):
    """Turns a UserError into a one-line message and a non-zero exit, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as error:
            raise click.ClickException(str(error)) from None
        except Stopped as stop:  # a clean stop on SIGTERM/SIGINT, state saved: say how to continue
            if _is_main_rank():
                click.echo(str(stop), err=True)
            sys.exit(Stopped.EXIT_CODE)
        except KeyboardInterrupt:
            click.echo("interrupted; rerun the same command to resume", err=True)
            sys.exit(130)


def _count(number: int, word: str) -> str:
    """`1 shard`, `2 shards`."""
    return f"{number} {word}" + ("" if number == 1 else "s")


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-v", "--verbose", is_flag=True, help="Log more detail.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars (they are shown only on a terminal anyway).")
def main(verbose: bool, quiet: bool) -> None:
    """dho-pipeline: distil a zero-shot CLIP teacher into small dual-head CLIP students (DHO).

    Stage one (cache-teacher) runs the teacher once and caches its logits per view; stage two
    (train) trains any number of students against that cache.
    """
    from dho_pipeline.progress import set_quiet

    if quiet:
        set_quiet(True)
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("dho_pipeline").setLevel(logging.DEBUG if verbose else logging.INFO)


@main.result_callback()
def _after_command(*_results, **_options) -> None:
    from .common import leave_process_group

    leave_process_group()


@main.command()
@config_options(manifest_stage.Config)
def manifest(**options):
    """Scan WebDataset SHARDS (paths, brace patterns, globs) into a manifest. No image decoding."""
    result = manifest_stage.run(make_config(manifest_stage.Config, given(options)))
    labeled = sum(1 for s in result.shards if s.labels is not None)
    names = f"; {len(result.classnames)} class names (from classes.txt beside the shards)" if result.classnames else ""
    click.echo(f"wrote {options['out']}: {_count(len(result.shards), 'shard')}, {result.num_samples} samples, "
               f"{labeled} shard(s) with labels{names}")


@main.command()
@config_options(shard_stage.Config)
def shard(**options):
    """Turn a class-folder tree (FOLDER/<class>/<image>), or a CoOp split, into WebDataset shards with .cls labels."""
    result = shard_stage.run(make_config(shard_stage.Config, given(options)))
    skipped = f"; {result['skipped']} non-image file(s) skipped" if result["skipped"] else ""
    parts = " (" + ", ".join(f"{n} {part}" for part, n in result["parts"].items()) + ")" if "parts" in result else ""
    click.echo(f"wrote {_count(len(result['shards']), 'shard')}: {result['samples']} images{parts} of {result['classes']} "
               f"classes{skipped}")
    if result["classnames"]:
        click.echo(f"wrote {result['classnames']}: the {result['classes']} class names (line i = class i; edit them "
                   "before `manifest` if a folder name is not what the class should be called)")
    else:
        click.echo(f"no classes.txt written: {result['classnames_problem']}; pass --classnames to cache-teacher and "
                   "train, or write the names yourself, one per line in label order, as classes.txt beside the shards",
                   err=True)


@main.command("cache-teacher")
@config_options(cache_teacher_stage.Config)
def cache_teacher(**options):
    """Run the teacher once over the manifest's shards and cache its top-k logits per view.

    Rerun the same command to resume an interrupted run; run it under torchrun or accelerate launch
    to split the shards across processes.
    """
    settings = given(options)
    if settings.get("topk") == "all":
        settings["topk"] = None
    summary = cache_teacher_stage.run(make_config(cache_teacher_stage.Config, settings))
    if _is_main_rank():
        state = "complete" if summary["complete"] else f"incomplete ({len(summary['incomplete_shards'])} shards left)"
        click.echo(
            f"cache {options['out']}: {state}; {summary['num_samples']} samples in {_count(summary['num_shards'], 'shard')}, "
            f"{summary['num_missing']} recorded as missing"
        )


@main.command()
@config_options(split_stage.Config)
def split(**options):
    """Draw the labeled / held-out / unlabeled split of a manifest."""
    result = split_stage.run(make_config(split_stage.Config, given(options)))
    click.echo(f"wrote {options['out']}: {result.num_labeled} labeled, {result.num_holdout} held out, "
               f"{result.num_unlabeled} unlabeled")


@main.command()
@click.option("--config", "recipe", type=PATH,
              help="Recipe: a TOML file of the settings below, or the name of one that ships (vit-b16-1pct, ...); "
                   "flags override it.")
@config_options(train_stage.Config)
def train(recipe, **options):
    """Train a dual-head student against a teacher cache (the teacher is never loaded)."""
    settings = train_stage.load_recipe(recipe) if recipe else {}
    settings.update(given(options))
    summary = train_stage.run(make_config(train_stage.Config, settings, "as options or in the --config recipe"))
    if _is_main_rank():
        state = "finished" if summary["finished"] else f"stopped at step {summary['steps']} of {summary['total_steps']}"
        click.echo(f"run {settings['out']}: {state}; checkpoint {Path(settings['out']) / 'student.pt'}")


@main.command()
@config_options(evaluate_stage.Config)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def evaluate(as_json, **options):
    """Top-1/top-5, NLL and ECE of each head and of the mix; per-class counts."""
    report = evaluate_stage.run(make_config(evaluate_stage.Config, given(options)))
    if _is_main_rank():
        click.echo(json.dumps(report, indent=2) if as_json else evaluate_stage.format_report(report))


@main.command("evaluate-ood")
@config_options(ood_stage.Config)
def evaluate_ood(**options):
    """ImageNet and its shifted sets (V2, Sketch, A, R) in one table: OUT/ood.txt and OUT/ood.json."""
    summary = ood_stage.run(make_config(ood_stage.Config, given(options)))
    if _is_main_rank():
        click.echo(ood_stage.format_table(summary))
        click.echo(f"wrote {Path(options['out']) / 'ood.txt'} and {Path(options['out']) / 'ood.json'}")


@main.command()
@config_options(predict_stage.Config)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def predict(as_json, **options):
    """Classify IMAGES (files, folders, glob patterns) with the student's alpha and beta."""
    results = predict_stage.run(make_config(predict_stage.Config, given(options)))
    if as_json:
        click.echo(json.dumps(results, indent=2))
    elif options.get("output"):
        errors = sum("error" in r for r in results)
        click.echo(f"wrote {options['output']}: {len(results)} images" + (f", {errors} could not be read" if errors else ""))
    else:
        click.echo(predict_stage.format_results(results))


@main.command()
@config_options(calibrate_stage.Config)
def calibrate(**options):
    """Choose alpha and beta on held-out labeled data; write a calibrated checkpoint."""
    report = calibrate_stage.run(make_config(calibrate_stage.Config, given(options)))
    if _is_main_rank():
        acc, out = report["accuracy"], options["out"]
        click.echo(
            f"alpha {report['alpha']:g}, beta {report['beta']:g} on {report['samples']} held-out images: top-1 "
            f"CE {100 * acc['ce']:.2f}%, KD {100 * acc['kd']:.2f}%, mix {100 * acc['mix']:.2f}% "
            f"(alpha = beta = 0.5: {100 * report['paper_setting']['accuracy']:.2f}%)\n"
            f"chosen on the fine grid, where {report['fine_grid']['tied_at_best_accuracy']} point(s) tied at the best "
            f"top-1 (ties go to the lowest held-out NLL)\n"
            f"wrote {out}, {out}.calibration.json and {out}.calibration.png"
        )


@main.command()
@config_options(export_stage.Config)
def export(**options):
    """Write a student as an open_clip folder (with a model card), ONNX, or safetensors plus JSON."""
    result = export_stage.run(make_config(export_stage.Config, given(options)))
    if "folder" in result:
        click.echo(f"wrote {result['folder']}/ (open_clip: local-dir:{result['folder']}; text tower "
                   f"{result['text_tower']['model']} / {result['text_tower']['weights']}); upload with "
                   f"`hf upload REPO {result['folder']}`")
    elif "onnx" in result:
        click.echo(f"wrote {result['onnx']} (opset {result['opset']}; input image [batch, 3, H, W]; outputs probs, "
                   "ce_logits, kd_logits)")
    else:
        click.echo(f"wrote {result['weights']} and {result['description']}")


@main.command()
@config_options(report_stage.Config)
def report(**options):
    """One table of many training runs on one cache: the settings that differ, metrics per head and mix."""
    result = report_stage.run(make_config(report_stage.Config, given(options)))
    click.echo(result["table"].rstrip("\n"))
    click.echo(f"\nwrote {', '.join(result['files'].values())}")


@main.group()
def cache():
    """Inspect a teacher cache: info, verify, dump."""


@cache.command("info")
@click.argument("path", type=PATH)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def cache_info(path, as_json):
    """What a cache holds, how complete it is, and which samples are missing."""
    from . import cache_tools

    report = cache_tools.info(path)
    click.echo(json.dumps(report, indent=2) if as_json else cache_tools.format_info(report))


@cache.command("verify")
@click.argument("path", type=PATH)
@click.option("--manifest", "manifest_path", required=True, type=PATH, help="The manifest the cache was built from.")
@click.option("--verify-shards", "shards", type=click.Choice([*FILE_CHECKS, "skip"]), default="quick",
              show_default=True, help="Also check each shard file against the manifest: quick (size, 16 sampled "
              "blocks), full (sha256 of every byte), or skip.")
def cache_verify(path, manifest_path, shards):
    """Check every shard: complete, every chunk against its checksum, keys in manifest order, finite values,
    indices in range, top-k consistent with the log-partitions; and the shard files themselves."""
    from . import cache_tools

    problems = cache_tools.verify(path, manifest_path, shards)
    for problem in problems:
        click.echo(problem, err=True)
    if problems:
        raise click.ClickException(f"cache {path} failed verification ({len(problems)} problem(s))")
    click.echo(f"cache {path}: OK{cache_tools.unchecked_note(path)}")


@cache.command("dump")
@click.argument("path", type=PATH)
@click.option("--shard", help="Only this shard (its file name).")
@click.option("--limit", type=int, help="At most this many samples.")
def cache_dump(path, shard, limit):
    """Print one JSON object per sample: views with box, flip, top-k and log-partitions."""
    from . import cache_tools

    for record in cache_tools.dump(path, shard=shard, limit=limit):
        click.echo(json.dumps(record))


@main.command("pretrain-demo-clips")
@config_options(pretrain_demo_stage.Config)
def pretrain_demo_clips(**options):
    """Pretrain the demo's tiny teacher and student CLIPs (reproduces the shipped weights bit for bit)."""
    results = pretrain_demo_stage.run(make_config(pretrain_demo_stage.Config, given(options)))
    for stem, result in results.items():
        match = {True: "  matches the shipped file", False: "  DIFFERS from the shipped file"}.get(result.get("matches_shipped"), "")
        click.echo(f"{stem}: zero-shot on the train part {100 * result['zero_shot_on_train_part']:.1f}%, "
                   f"content {result['fingerprint'][:23]}{match}")
    if any(r.get("matches_shipped") is False for r in results.values()):
        raise click.ClickException("retrained weights differ from the shipped ones")


@main.command()
@config_options(demo_stage.Config)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def demo(as_json, **options):
    """Run the pipeline end to end on scikit-learn's digits with tiny CLIPs (CPU, offline, minutes)."""
    results = demo_stage.run(make_config(demo_stage.Config, given(options)),
                             invoke=lambda args: main.main(args=args, standalone_mode=False))
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    click.echo(f"\ntest top-1 on {results['test_images']} digits ({results['config']['percent']}% labels, seed "
               f"{results['config']['seed']}):")
    for method, value in results["accuracy"].items():
        click.echo(f"  {method:<38} {100 * value:5.1f}%")
    click.echo(f"report: {results['report']} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
