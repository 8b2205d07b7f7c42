"""The command line: instant help, defaults that match the stage configs, the shard command."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
import webdataset as wds
from helpers import cli, image_bytes, random_image

from dho_pipeline.stages import cache_teacher, shard
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


@pytest.mark.parametrize("command, stage", [("cache-teacher", cache_teacher), ("shard", shard)])
def test_help_defaults_match_the_stage_config(command, stage):
    """Help texts quote defaults ("[default: X]"); they must be the Config's real defaults."""
    params = {p.name: p for p in main.commands[command].params}
    defaults = {f.name: f.default for f in dataclasses.fields(stage.Config) if f.default is not dataclasses.MISSING}
    checked = 0
    for name, default in defaults.items():
        option = params.get(name)
        match = re.search(r"\[default: ([^\]]+)\]", option.help or "") if option else None
        if not match or default is None:
            continue
        quoted = match.group(1)
        if isinstance(default, tuple):
            assert tuple(float(v) for v in quoted.split(",")) == default, name
        elif isinstance(default, (int, float)):
            assert float(quoted) == default, name
        elif isinstance(default, str):
            assert quoted == default, name
        else:  # a Path: the help quotes it relative to the repository
            assert quoted.split("/")[-1] == default.name, name
        checked += 1
    assert checked >= 3


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
    # Deterministic: the same command writes the same shards.
    first = (tmp_path / "s" / "train-000.tar").read_bytes()
    cli("shard", root, "--out", tmp_path / "s" / "train-%03d.tar", "--maxcount", "4")
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
