"""One run directory, one run: a second `train` on a live `--out` (a job submitted twice, a requeue
while the first still runs, a `--resume` meant to join it) is refused at once, naming the holder's pid
and host, and the first run finishes untouched; `--resume` refuses another split or cache (by content;
the same files moved are accepted)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from fault_helpers import (  # noqa: F401  (one_torch_thread is an autouse fixture)
    assert_clean_error, cache_args, finish, invoke, one_torch_thread, trainable_dataset,
)
from process_helpers import start_held

LOSSES = "dho_pipeline.stages.train:_losses"  # one call per micro-step, in the main process


@pytest.fixture(scope="module")
def trainable(tmp_path_factory):
    return trainable_dataset(tmp_path_factory.mktemp("run-dir"), num_shards=3, per_shard=8,
                             cache_options=("--views", "2", "--topk", "3"))


def train_args(data, out, *extra, **paths):
    data = {**data, **paths}
    return ["train", "--cache", data["cache"], "--manifest", data["manifest"], "--split", data["split"], "--out", out,
            "--student", "dho-tiny-student", "--pretrained", "none", "--batch-size", "4", "--lr", "1e-3",
            "--workers", "0", "--log-every", "1", "--epochs", "2", *extra]


def logged_steps(run) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.slow
def test_a_second_train_on_a_live_run_directory_is_refused(trainable, tmp_path):
    """The first run is parked at its third step (lock held, no checkpoint yet); a second run, a
    second run with another seed and a `--resume` are each refused naming the first's pid and host;
    the first then finishes with every step logged once and its own settings. (Before the run lock,
    the second run trained in the same directory and exited 0.)"""
    run, fired, gate = tmp_path / "run", tmp_path / "fired.jsonl", tmp_path / "go"
    first = start_held(fired, gate, LOSSES, *train_args(trainable, run), nth=3)
    try:
        host = os.uname().nodename
        for extra in [(), ("--seed", "1"), ("--resume",)]:
            line = assert_clean_error(invoke(*train_args(trainable, run, *extra)), f"run directory {run} is in use by "
                                      f"pid {first.pid} on {host}", "another --out")
            print(f"\nFAULTS second train {' '.join(extra) or '(same command)'}: {line.replace(f'{tmp_path}/', '')}")
    finally:
        gate.touch()
    code, output = finish(first)
    assert code == 0, output[-2000:]
    assert logged_steps(run) == list(range(1, 9))  # 2 epochs of 4 steps, each once
    assert json.loads((run / "config.json").read_text())["seed"] == 0
    # Once the first has ended the directory is free: a --resume of the finished run is accepted.
    result = invoke(*train_args(trainable, run, "--resume"))
    assert result.exit_code == 0, result.output


def test_resume_refuses_another_split_or_cache_and_accepts_moved_inputs(trainable, tmp_path):
    """Stopped after 2 steps, then resumed: with another split (another seed) and with another cache
    (another view seed) it is refused naming what differs; with the same split and cache copied
    elsewhere it continues. (Before the inputs record, both others were accepted: the run silently
    changed data.)"""
    root = tmp_path
    run = root / "run"
    result = invoke(*train_args(trainable, run, "--max-steps", "2", "--checkpoint-every", "2"))
    assert result.exit_code == 0, result.output

    other_split = root / "other-split.json"
    assert invoke("split", "--manifest", trainable["manifest"], "--percent", "25", "--seed", "99",
                  "--out", other_split).exit_code == 0
    assert json.loads(other_split.read_text())["labeled"] != json.loads(trainable["split"].read_text())["labeled"]
    line = assert_clean_error(invoke(*train_args(trainable, run, "--resume", split=other_split)),
                              "--resume", "another split", str(trainable["split"]), str(other_split))
    print(f"\nFAULTS resume with another split: {line.replace(f'{root}/', '')}")

    other_cache = root / "other.zarr"
    result = invoke(*cache_args(trainable, other_cache, "--views", "2", "--topk", "3", "--seed", "5"))
    assert result.exit_code == 0, result.output
    line = assert_clean_error(invoke(*train_args(trainable, run, "--resume", cache=other_cache)),
                              "--resume", "another cache", str(other_cache))
    print(f"FAULTS resume with another cache: {line.replace(f'{root}/', '')}")

    moved_split, moved_cache = root / "moved" / "s.json", root / "moved" / "c.zarr"
    moved_split.parent.mkdir()
    shutil.copy(trainable["split"], moved_split)
    shutil.copytree(trainable["cache"], moved_cache)
    result = invoke(*train_args(trainable, run, "--resume", split=moved_split, cache=moved_cache))
    assert result.exit_code == 0, result.output
    assert logged_steps(run) == list(range(1, 9))


def test_resume_with_the_teacher_online_refuses_another_manifest(trainable, tmp_path):
    """Without a cache (which names its manifest) the run's own record is what refuses another manifest."""
    online = ["--teacher-online", "--teacher", "dho-test-vit", "--teacher-pretrained", "none",
              "--classnames", trainable["classes"], "--templates", trainable["templates"]]
    run = tmp_path / "run"
    result = invoke(*train_args(trainable, run, *online, "--max-steps", "1", "--checkpoint-every", "1"))
    assert result.exit_code == 0, result.output
    fewer, fewer_split = tmp_path / "two-shards.json", tmp_path / "two-shards-split.json"
    assert invoke("manifest", *sorted(trainable["shards"])[:2], "--out", fewer).exit_code == 0
    assert invoke("split", "--manifest", fewer, "--percent", "25", "--out", fewer_split).exit_code == 0
    line = assert_clean_error(invoke(*train_args(trainable, run, *online, "--resume", manifest=fewer, split=fewer_split)),
                              "--resume", "another manifest", str(fewer))
    print(f"\nFAULTS resume with another manifest (teacher online): {line.replace(f'{tmp_path}/', '')}")
