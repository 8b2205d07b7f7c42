"""The `dho-pipeline` command line: a thin layer that turns flags into a stage's Config and runs it.

Stage modules are imported inside their commands, so `dho-pipeline --help` is instant and torch loads
only when work starts. Defaults live in each stage's Config; an option left out keeps that default
(the help texts quote them, and a test checks that they agree).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from dho_pipeline.errors import UserError

PATH = click.Path(path_type=Path)
EXISTING_FILE = click.Path(path_type=Path, exists=True, dir_okay=False)


class _Group(click.Group):
    """Turns a UserError into a one-line message and a non-zero exit, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as error:
            raise click.ClickException(str(error)) from None
        except KeyboardInterrupt:
            click.echo("interrupted; rerun the same command to resume", err=True)
            sys.exit(130)


class _TopK(click.ParamType):
    name = "K|all"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int) or value == "all":
            return value
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number nor 'all'", param, ctx)


class _FloatList(click.ParamType):
    name = "T1,T2,..."

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return tuple(float(part) for part in value.split(",") if part.strip())
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers", param, ctx)


def _given(**options) -> dict:
    """The options the user actually gave; the rest keep the stage Config's defaults."""
    return {name: value for name, value in options.items() if value is not None}


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Log more detail.")
def main(verbose: bool) -> None:
    """dho-pipeline: distil a zero-shot CLIP teacher into small dual-head CLIP students (DHO).

    Stage one (cache-teacher) runs the teacher once and caches its logits per view; stage two
    (train) trains any number of students against that cache.
    """
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("dho_pipeline").setLevel(logging.DEBUG if verbose else logging.INFO)


@main.result_callback()
def _after_command(*_results, **_options) -> None:
    from dho_pipeline.stages.common import leave_process_group

    leave_process_group()


@main.command()
@click.argument("shards", nargs=-1, required=True)
@click.option("--out", required=True, type=PATH, help="Manifest file to write (JSON).")
@click.option("--workers", type=int, help="Shards scanned at once. [default: 4]")
def manifest(shards, out, workers):
    """Scan WebDataset SHARDS (paths, brace patterns, globs) into a manifest. No image decoding."""
    from dho_pipeline.stages import manifest as stage

    result = stage.run(stage.Config(shards=tuple(shards), out=out, **_given(workers=workers)))
    labeled = sum(1 for s in result.shards if s.labels is not None)
    click.echo(
        f"wrote {out}: {len(result.shards)} shards, {result.num_samples} samples, "
        f"{labeled} shard(s) with labels"
    )


@main.command()
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--out", required=True, help="Shard path pattern with a %d placeholder, e.g. shards/train-%06d.tar.")
@click.option("--classes", type=PATH, help="Class folder names in label order, one per line. [default: sorted folder names]")
@click.option("--maxcount", type=int, help="Samples per shard at most. [default: 1000]")
@click.option("--maxsize", type=float, help="Bytes per shard at most. [default: 1e9]")
@click.option("--seed", type=int, help="Seed of the sample order (a shuffle of the sorted file list). [default: 0]")
def shard(folder, out, **options):
    """Turn a class-folder tree (FOLDER/<class>/<image>) into WebDataset shards with .cls labels."""
    from dho_pipeline.stages import shard as stage

    result = stage.run(stage.Config(folder=folder, out=out, **_given(**options)))
    skipped = f"; {result['skipped']} non-image file(s) skipped" if result["skipped"] else ""
    click.echo(f"wrote {len(result['shards'])} shards: {result['samples']} images of {result['classes']} classes{skipped}")


@main.command("cache-teacher")
@click.option("--manifest", "manifest_path", required=True, type=PATH, help="Manifest of the shards.")
@click.option("--out", required=True, type=PATH, help="Teacher cache to write (a .zarr directory).")
@click.option("--teacher", help="open_clip model name or model-config JSON. [default: ViT-H-14-378-quickgelu]")
@click.option("--pretrained", help="open_clip tag, local weights file, or 'none'. [default: dfn5b]")
@click.option("--classnames", type=PATH, help="Class names, one per line. [default: manifests/imagenet_classnames.txt]")
@click.option("--templates", type=PATH, help="Prompt templates with {}, one per line. [default: manifests/imagenet_templates.txt]")
@click.option("--views", type=int, help="Views per image (view 0 = the teacher's own view). [default: 1]")
@click.option("--topk", type=_TopK(), help="Logits kept per view, or 'all'. [default: 100]")
@click.option("--temperatures", type=_FloatList(), help="Temperatures for exact log-partitions. [default: 1,2]")
@click.option("--seed", type=int, help="Seed of the views. [default: 0]")
@click.option("--batch-size", type=int, help="Views per teacher forward pass. [default: 256]")
@click.option("--workers", type=int, help="Image-decoding processes per rank. [default: 4]")
@click.option("--device", help="Device, e.g. cuda, cuda:1, cpu. [default: this rank's GPU, else cpu]")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), help="[default: bf16 on GPU, fp32 on CPU]")
@click.option("--compile/--no-compile", default=None, help="torch.compile the teacher (~25 s once; 1.11x on an H100). [default: on GPUs]")
@click.option("--resize", type=click.Choice(["squash", "shortest"]), help="Override the teacher's resize mode.")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), help="Undecodable image: stop, or record as missing. [default: fail]")
@click.option("--crop-scale", type=_FloatList(), help="RandomResizedCrop area range of views 1..V-1. [default: 0.5,1]")
@click.option("--compression", type=click.Choice(["none", "zstd", "blosc-zstd", "blosc-lz4"]), help="[default: blosc-zstd]")
def cache_teacher(manifest_path, out, topk, **options):
    """Run the teacher once over the manifest's shards and cache its top-k logits per view.

    Rerun the same command to resume an interrupted run; run it under torchrun or accelerate launch
    to split the shards across processes.
    """
    from dho_pipeline.stages import cache_teacher as stage

    given = _given(**options, topk=topk)
    if topk == "all":
        given["topk"] = None
    config = stage.Config(manifest=manifest_path, out=out, **given)
    summary = stage.run(config)
    if _is_main_rank():
        state = "complete" if summary["complete"] else f"incomplete ({len(summary['incomplete_shards'])} shards left)"
        click.echo(
            f"cache {out}: {state}; {summary['num_samples']} samples in {summary['num_shards']} shards, "
            f"{summary['num_missing']} recorded as missing"
        )


@main.command()
@click.option("--manifest", "manifest_path", required=True, type=PATH, help="Manifest of the training shards.")
@click.option("--out", required=True, type=PATH, help="Split file to write (JSON).")
@click.option("--percent", type=float, help="Labeled share, class-balanced. [default: 1.0]")
@click.option("--seed", type=int, help="Seed of the draw (the reference uses 13). [default: 13]")
@click.option("--holdout", type=int, help="Labeled images per class held out for calibration. [default: 0]")
@click.option("--from-list", type=EXISTING_FILE, help="Use the images this file names (one per line) as the labeled set.")
def split(manifest_path, out, **options):
    """Draw the labeled / held-out / unlabeled split of a manifest."""
    from dho_pipeline.stages import split as stage

    result = stage.run(stage.Config(manifest=manifest_path, out=out, **_given(**options)))
    click.echo(
        f"wrote {out}: {result.num_labeled} labeled, {result.num_holdout} held out, {result.num_unlabeled} unlabeled"
    )


@main.command()
@click.option("--config", "recipe", type=EXISTING_FILE, help="Recipe (TOML) with any of the settings below; flags override it.")
@click.option("--cache", type=PATH, help="Teacher cache (from cache-teacher).")
@click.option("--manifest", "manifest_path", type=PATH, help="Manifest the cache was built from.")
@click.option("--split", "split_path", type=PATH, help="Label split (from split).")
@click.option("--out", type=PATH, help="Run directory.")
@click.option("--student", help="open_clip model name or model-config JSON. [default: ViT-B-16-quickgelu]")
@click.option("--pretrained", help="open_clip tag, local weights file, or 'none'. [default: openai]")
@click.option("--objective", type=click.Choice(["dho", "single-head", "ce", "kd"]), help="[default: dho]")
@click.option("--tail", type=click.Choice(["bucket", "uniform"]), help="Teacher mass outside the top-k. [default: bucket]")
@click.option("--temperature", type=float, help="KD temperature. [default: 2.0]")
@click.option("--epochs", type=int, help="Passes over the unlabeled set. [default: 32]")
@click.option("--batch-size", type=int, help="Labeled (and unlabeled) samples per step, global. [default: 256]")
@click.option("--lr", type=float, help="Peak learning rate (AdamW). [default: 5e-05]")
@click.option("--warmup-steps", type=int, help="Linear warm-up, capped at a tenth of the run. [default: 5000]")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), help="[default: bf16 on GPU, fp32 on CPU]")
@click.option("--compile/--no-compile", default=None, help="torch.compile the training step and an online teacher. [default: on GPUs]")
@click.option("--grad-accum", type=int, help="Micro-steps per optimiser step. [default: 1]")
@click.option("--workers", type=int, help="Data-loading processes per stream and rank. [default: 4]")
@click.option("--seed", type=int, help="Seed of the data order. [default: 0]")
@click.option("--resume", is_flag=True, default=None, help="Continue the run in --out from its newest complete checkpoint.")
@click.option("--eval-data", type=PATH, help="Manifest to evaluate on after each epoch (logged only).")
@click.option("--max-steps", type=int, help="Stop after this many steps (the schedule still spans all epochs).")
@click.option("--log-every", type=int, help="Steps between metrics lines. [default: 10]")
@click.option("--checkpoint-every", type=int, help="Steps between checkpoints; 0: each epoch end. [default: 0]")
@click.option("--device", help="Device, e.g. cuda, cpu. [default: this rank's GPU, else cpu]")
@click.option("--classnames", type=PATH, help="With a cache: refuse unless it was built for these class names. Online: the classes.")
@click.option("--templates", type=PATH, help="Online teacher: prompt templates. [default: manifests/imagenet_templates.txt]")
@click.option("--teacher-online", is_flag=True, default=None, help="Run the teacher in the loop on each view instead of reading a cache.")
@click.option("--teacher", help="Online teacher: open_clip model name or config JSON.")
@click.option("--teacher-pretrained", help="Online teacher: open_clip tag, weights file or 'none'.")
@click.option("--crop-scale", type=_FloatList(), help="Online teacher: RandomResizedCrop area range of the views. [default: 0.5,1]")
def train(recipe, manifest_path, split_path, **options):
    """Train a dual-head student against a teacher cache (the teacher is never loaded)."""
    from dho_pipeline.stages import train as stage

    settings = stage.load_recipe(recipe) if recipe else {}
    settings.update(_given(manifest=manifest_path, split=split_path, **options))
    needed = ("manifest", "split", "out") if settings.get("teacher_online") else ("cache", "manifest", "split", "out")
    absent = [name for name in needed if name not in settings]
    if absent:
        raise UserError(f"train needs {', '.join('--' + a for a in absent)} (as flags or in the --config recipe)")
    summary = stage.run(stage.Config(**{"cache": None, **settings}))
    if _is_main_rank():
        state = "finished" if summary["finished"] else f"stopped at step {summary['steps']} of {summary['total_steps']}"
        click.echo(f"run {settings['out']}: {state}; checkpoint {Path(settings['out']) / 'student.pt'}")


def _student_options(command):
    """Options every checkpoint-reading command shares."""
    command = click.option("--classnames", type=PATH, help="Class names [default: the checkpoint's, or ImageNet's for 1000 classes]")(command)
    command = click.option("--student", help="Architecture when the checkpoint does not record it: ViT-B-16, ViT-L-14, ViT-L-14-336px, RN50, or an open_clip name.")(command)
    return command


@main.command()
@click.option("--checkpoint", required=True, type=PATH, help="Student checkpoint (ours or a released one).")
@click.option("--data", required=True, multiple=True, help="A manifest (.json) or shards; repeatable.")
@_student_options
@click.option("--alpha", type=float, help="Override the checkpoint's alpha.")
@click.option("--beta", type=float, help="Override the checkpoint's beta.")
@click.option("--batch-size", type=int, help="Images per batch and process. [default: 256]")
@click.option("--workers", type=int, help="Data-loading processes. [default: 4]")
@click.option("--device", help="Device. [default: this rank's GPU, else cpu]")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def evaluate(checkpoint, data, classnames, as_json, **options):
    """Top-1/top-5, NLL and ECE of each head and of the mix; per-class counts."""
    from dho_pipeline.stages import evaluate as stage

    report = stage.run(stage.Config(checkpoint=checkpoint, data=tuple(data), classnames=classnames, **_given(**options)))
    if _is_main_rank():
        click.echo(json.dumps(report, indent=2) if as_json else stage.format_report(report))


@main.command()
@click.option("--checkpoint", required=True, type=PATH, help="Student checkpoint (ours or a released one).")
@click.argument("images", nargs=-1, required=True, type=PATH)
@_student_options
@click.option("--topk", type=int, help="Classes shown per image. [default: 5]")
@click.option("--device", help="Device. [default: cuda if available, else cpu]")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def predict(checkpoint, images, classnames, as_json, **options):
    """Classify IMAGES with the checkpoint's alpha and beta (the model card's inference path)."""
    from dho_pipeline.stages import predict as stage

    results = stage.run(stage.Config(checkpoint=checkpoint, images=tuple(images), classnames=classnames, **_given(**options)))
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for result in results:
        click.echo(result["image"])
        for p in result["predictions"]:
            click.echo(f"  {p['class']:>5}  {p['probability']:7.4f}  {p['name']}")


@main.command()
@click.option("--checkpoint", required=True, type=PATH, help="Student checkpoint.")
@click.option("--data", required=True, multiple=True, help="Held-out data: a manifest (.json) or shards; repeatable.")
@click.option("--split", "split_path", type=PATH, help="Calibrate on this split's held-out images of --data.")
@click.option("--out", required=True, type=PATH, help="Calibrated checkpoint to write.")
@click.option("--allow-overlap", is_flag=True, default=None, help="Accept images the student was trained on as labeled.")
@_student_options
@click.option("--batch-size", type=int, help="Images per batch and process. [default: 256]")
@click.option("--workers", type=int, help="Data-loading processes. [default: 4]")
@click.option("--device", help="Device. [default: this rank's GPU, else cpu]")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]))
def calibrate(checkpoint, data, split_path, out, classnames, **options):
    """Choose alpha and beta on held-out labeled data; write a calibrated checkpoint."""
    from dho_pipeline.stages import calibrate as stage

    report = stage.run(stage.Config(checkpoint=checkpoint, data=tuple(data), split=split_path, out=out,
                                    classnames=classnames, **_given(**options)))
    if _is_main_rank():
        acc = report["accuracy"]
        click.echo(
            f"alpha {report['alpha']:g}, beta {report['beta']:g} on {report['samples']} held-out images: top-1 "
            f"CE {100 * acc['ce']:.2f}%, KD {100 * acc['kd']:.2f}%, mix {100 * acc['mix']:.2f}% "
            f"(alpha = beta = 0.5: {100 * report['paper_setting']['accuracy']:.2f}%)\n"
            f"wrote {out}, {out}.calibration.json and {out}.calibration.png"
        )


@main.command()
@click.argument("checkpoint", type=PATH)
@click.option("--format", "format_", type=click.Choice(["safetensors"]), default="safetensors", show_default=True)
@click.option("--out", type=PATH, help="Weights file to write. [default: CHECKPOINT with .safetensors]")
@_student_options
def export(checkpoint, format_, out, classnames, student):
    """Write a checkpoint's weights as safetensors plus a JSON of alpha, beta, classes and architecture."""
    from dho_pipeline.stages import export as stage

    result = stage.run(stage.Config(checkpoint=checkpoint, format=format_, **_given(out=out, classnames=classnames, student=student)))
    click.echo(f"wrote {result['weights']} and {result['description']}")


@main.group()
def cache():
    """Inspect a teacher cache: info, verify, dump."""


@cache.command("info")
@click.argument("path", type=PATH)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def cache_info(path, as_json):
    """What a cache holds, how complete it is, and which samples are missing."""
    from dho_pipeline.stages import cache_tools

    report = cache_tools.info(path)
    click.echo(json.dumps(report, indent=2) if as_json else cache_tools.format_info(report))


@cache.command("verify")
@click.argument("path", type=PATH)
@click.option("--manifest", "manifest_path", required=True, type=PATH, help="The manifest the cache was built from.")
def cache_verify(path, manifest_path):
    """Check every shard: complete, keys in manifest order, finite values, indices in range."""
    from dho_pipeline.stages import cache_tools

    problems = cache_tools.verify(path, manifest_path)
    for problem in problems:
        click.echo(problem, err=True)
    if problems:
        raise click.ClickException(f"cache {path} failed verification ({len(problems)} problem(s))")
    click.echo(f"cache {path}: OK")


@cache.command("dump")
@click.argument("path", type=PATH)
@click.option("--shard", help="Only this shard (its file name).")
@click.option("--limit", type=int, help="At most this many samples.")
def cache_dump(path, shard, limit):
    """Print one JSON object per sample: views with box, flip, top-k and log-partitions."""
    from dho_pipeline.stages import cache_tools

    for record in cache_tools.dump(path, shard=shard, limit=limit):
        click.echo(json.dumps(record))


@main.command("pretrain-demo-clips")
@click.option("--check", is_flag=True, default=None, help="Retrain in a scratch folder and compare with the shipped files.")
def pretrain_demo_clips(check):
    """Pretrain the demo's tiny teacher and student CLIPs (reproduces the shipped weights bit for bit)."""
    from dho_pipeline.stages import pretrain_demo as stage

    results = stage.run(stage.Config(**_given(check=check)))
    for stem, result in results.items():
        match = {True: "  matches the shipped file", False: "  DIFFERS from the shipped file"}.get(result.get("matches_shipped"), "")
        click.echo(f"{stem}: zero-shot on the train part {100 * result['zero_shot_on_train_part']:.1f}%, "
                   f"content {result['fingerprint'][:23]}{match}")
    if any(r.get("matches_shipped") is False for r in results.values()):
        raise click.ClickException("retrained weights differ from the shipped ones")


@main.command()
@click.option("--out", type=PATH, help="Folder for the demo's data, caches, runs and report. [default: demo-out]")
@click.option("--seed", type=int, help="Seed of the label split, data order and views. [default: 0]")
@click.option("--percent", type=float, help="Labeled share of the train part. [default: 10.0]")
@click.option("--epochs", type=int, help="Epochs per training run. [default: 20]")
@click.option("--views", type=int, help="Cached teacher views per image. [default: 8]")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def demo(as_json, **options):
    """Run the pipeline end to end on scikit-learn's digits with tiny CLIPs (CPU, offline, minutes)."""
    from dho_pipeline.stages import demo as stage

    results = stage.run(stage.Config(**_given(**options)), invoke=lambda args: main.main(args=args, standalone_mode=False))
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
