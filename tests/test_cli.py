"""The command line: instant help, defaults that match the stage configs, the shard command."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
import webdataset as wds
from click.testing import CliRunner
from helpers import cli, image_bytes, random_image

from dho_pipeline.stages import (
    cache_teacher, calibrate, demo, evaluate, export, manifest, ood, predict, pretrain_demo, report, shard, split,
    train,
)
from dho_pipeline.stages.cli import main


def test_help_does_not_import_torch():
    code = (
        "import sys; from dho_pipeline.stages.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "from dho_pipeline.stages import cache_teacher, manifest, shard, cache_tools\n"
        "assert 'torch' not in sys.modules, 'importing a stage imported torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


STAGE_OF_COMMAND = {
    "manifest": manifest, "shard": shard, "cache-teacher": cache_teacher, "split": split, "train": train,
    "evaluate": evaluate, "predict": predict, "calibrate": calibrate, "export": export,
    "pretrain-demo-clips": pretrain_demo, "demo": demo, "evaluate-ood": ood, "report": report,
}


def _quoted_default(help_text: str, flag: str) -> str | None:
    """The "[default: X]" that `--help` prints for a flag (its help may wrap over several lines)."""
    flat = " ".join(help_text.split())
    match = re.search(re.escape(flag) + r"[ /].*?(\[default: ([^\]]+)\]|\[required\]|(?= --\w)|$)", flat)
    return match.group(2) if match and match.group(2) else None


@pytest.mark.parametrize("command", sorted(STAGE_OF_COMMAND))
def test_every_option_shows_its_config_default(command):
    """Each command is its stage's Config: every field is an option, and `--help` quotes the Config's own
    default (a computed default, None in the Config, says in words what happens)."""
    stage = STAGE_OF_COMMAND[command]
    result = CliRunner().invoke(main, [command, "--help"], terminal_width=400)
    assert result.exit_code == 0, result.output
    params = {p.name: p for p in main.commands[command].params}
    for field in dataclasses.fields(stage.Config):
        if not field.metadata.get("cli", True):
            continue
        assert field.name in params, f"{command}: Config field {field.name} has no option"
        if isinstance(params[field.name], click.Argument):
            continue
        flag = "--" + field.name.replace("_", "-")
        assert flag in result.output, f"{command} --help does not list {flag}"
        quoted = _quoted_default(result.output, flag)
        default = field.default
        if default is dataclasses.MISSING or isinstance(default, bool):
            assert quoted is None, f"{command} {flag}: quotes a default {quoted!r} the Config does not have"
        elif default is None:
            # None means "decided at run time": the help must say how, in words.
            assert quoted is None or not quoted[0].isdigit(), (command, flag, quoted)
        elif isinstance(default, tuple):
            assert tuple(float(v) for v in quoted.split(",")) == default, (command, flag, quoted)
        elif isinstance(default, (int, float)):
            assert float(quoted) == default, (command, flag, quoted)
        elif isinstance(default, Path):
            assert quoted == default.name or field.metadata.get("default_text") == quoted, (command, flag, quoted)
        else:
            assert quoted == default, (command, flag, quoted)


@pytest.mark.parametrize("field, value", [("objective", "dh0"), ("lr_schedule", "cosine"), ("head", "mlp"),
                                          ("precision", "fp8"), ("split_rule", "random")])
def test_a_recipe_value_outside_a_fields_choices_is_refused_by_name(tmp_path, field, value):
    """Recipes (and Python callers) reach the Config without click's Choice check: the Config checks."""
    from dho_pipeline.errors import UserError
    from dho_pipeline.stages.options import make_config

    settings = {"cache": tmp_path / "c.zarr", "manifest": tmp_path / "m.json", "split": tmp_path / "s.json",
                "out": tmp_path / "run", field: value}
    with pytest.raises(UserError, match=f"--{field.replace('_', '-')} must be one of .*, not '{value}'"):
        make_config(train.Config, settings)
    del settings[field]
    make_config(train.Config, settings)  # the same settings without it are accepted


def test_shard_command_turns_class_folders_into_shards(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    root = tmp_path / "train"
    for cls in ["n002", "n001"]:
        (root / cls).mkdir(parents=True)
        for i in range(5):
            (root / cls / f"img.{i}.JPEG").write_bytes(image_bytes(random_image(rng, 20, 20), "JPEG"))
    (root / "n001" / "notes.txt").write_text("not an image")
    (root / "n001" / "a b..png").write_bytes(image_bytes(random_image(rng, 20, 20), "PNG"))
    result = cli("shard", root, "--out", tmp_path / "s" / "train-%03d.tar", "--maxcount", "4")
    assert "wrote 3 shards: 11 images of 2 classes; 1 non-image file(s) skipped" in result.output

    samples = [s for p in sorted((tmp_path / "s").glob("*.tar")) for s in wds.WebDataset(str(p), shardshuffle=False)]
    assert len(samples) == 11 and not list((tmp_path / "s").glob("*.partial"))
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == 11 and all(re.fullmatch(r"[A-Za-z0-9_-]+", k) for k in keys)
    labels = {k: int(s["cls"]) for k, s in zip(keys, samples)}
    assert all(labels[k] == (0 if k.startswith("n001") else 1) for k in keys)  # sorted folder names
    assert keys != sorted(keys)  # shuffled, so a streaming reader sees classes mixed
    # Deterministic: the same command writes the same shards (over its earlier ones: --overwrite).
    first = (tmp_path / "s" / "train-000.tar").read_bytes()
    cli("shard", root, "--out", tmp_path / "s" / "train-%03d.tar", "--maxcount", "4", "--overwrite")
    assert (tmp_path / "s" / "train-000.tar").read_bytes() == first

    # A class list sets the label order; a folder missing from it is an error.
    (tmp_path / "classes.txt").write_text("n002\nn001\n")
    cli("shard", root, "--out", tmp_path / "t" / "x-%03d.tar", "--classes", tmp_path / "classes.txt")
    sample = next(iter(wds.WebDataset(str(tmp_path / "t" / "x-000.tar"), shardshuffle=False)))
    assert int(sample["cls"]) == (1 if sample["__key__"].startswith("n001") else 0)
    (tmp_path / "one.txt").write_text("n002\n")
    result = cli("shard", root, "--out", tmp_path / "u" / "x-%03d.tar", "--classes", tmp_path / "one.txt", expect_exit=1)
    assert "n001 is not in the class list" in result.output
    result = cli("shard", root, "--out", tmp_path / "v.tar", expect_exit=1)
    assert "placeholder" in result.output
