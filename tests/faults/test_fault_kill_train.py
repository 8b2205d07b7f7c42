"""train under SIGKILL: mid-step, inside torch.save of a checkpoint, between a checkpoint's write and its
rename, inside an optimiser step. Each `--resume` continues from the newest complete checkpoint, no
checkpoint directory on disk is ever partial, and the final run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from fault_helpers import (  # noqa: F401  (one_torch_thread is an autouse fixture)
    invoke, kill_when, line_count, one_torch_thread, popen, run_faulted, trainable_dataset,
)

EPOCHS = 10  # 19 unlabeled // batch 4 = 4 steps per epoch: 40 steps


@pytest.fixture(scope="module")
def trainable(tmp_path_factory):
    return trainable_dataset(tmp_path_factory.mktemp("kill-train"), num_shards=3, per_shard=8,
                             cache_options=("--views", "2", "--topk", "3"))


def train_args(data, out, *extra):
    return ["train", "--cache", data["cache"], "--manifest", data["manifest"], "--split", data["split"], "--out", out,
            "--student", "dho-tiny-student", "--pretrained", "none", "--batch-size", "4", "--lr", "1e-3",
            "--workers", "0", "--log-every", "1", "--epochs", str(EPOCHS), *extra]


def checkpoints_on_disk(run) -> list[int]:
    """Steps of every checkpoints/step-* directory; each must load whole, weights only."""
    steps = []
    for directory in sorted((run / "checkpoints").glob("step-*")):
        state = torch.load(directory / "state.pt", map_location="cpu", weights_only=True)
        assert state["step"] == int(directory.name.split("-")[1]), directory
        assert {"model", "optimizer", "positions"} <= set(state), directory
        steps.append(state["step"])
    return steps


def logged_steps(run) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


KILLS = [
    ("mid-step (random moment after 5 logged steps)", None),
    ("inside torch.save of checkpoints/.../state.pt (half written)", {"kind": "torch_save", "match": r"state\.pt$"}),
    ("checkpoint written whole, before its rename", {"kind": "rename", "match": r"\.tmp-step-"}),
    ("pruning an old checkpoint (its files deleted, its directory not yet)",
     {"kind": "rmtree", "match": r"(^|/)(\.discard-)?step-\d{8}"}),
    ("inside an optimiser step", {"kind": "optimizer_step", "nth": 3}),
]


@pytest.mark.slow
def test_killed_training_resumes_from_the_newest_complete_checkpoint(trainable, tmp_path):
    whole, run = tmp_path / "whole", tmp_path / "run"
    result = invoke(*train_args(trainable, whole))  # the uninterrupted reference
    assert result.exit_code == 0, result.output
    args = train_args(trainable, run, "--checkpoint-every", "3")
    survived, newest, log = 0, None, []
    for number, (moment, fault) in enumerate(KILLS):
        resume = ("--resume",) if number else ()
        lines_before = len(logged_steps(run)) if (run / "metrics.jsonl").exists() else 0
        if fault is None:
            process = popen(None, *args, *resume)
            delay = random.Random(6).uniform(0.0, 0.05)  # a step takes some tens of ms here
            killed = kill_when(process, lambda: line_count(run / "metrics.jsonl") >= 5, delay=delay)
        else:
            code, output = run_faulted({"faults": [fault]}, *args, *resume)
            killed = code == -9
            assert killed, output[-2000:]
        assert killed, moment
        survived += 1
        steps = logged_steps(run)
        if newest is not None:  # this run started right after the newest complete checkpoint
            assert steps[lines_before] == newest + 1, (moment, newest, steps[lines_before:])
        on_disk = checkpoints_on_disk(run)  # none partial
        assert on_disk, moment
        newest = max(on_disk)
        log.append(f"{moment}: reached step {steps[-1]}, newest complete checkpoint step {newest}")

    lines_before = len(logged_steps(run))
    result = invoke(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert logged_steps(run)[lines_before] == newest + 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == summary["total_steps"] == 4 * EPOCHS and summary["finished"] is True
    checkpoints_on_disk(run)
    assert not list((run / "checkpoints").glob(".tmp-step-*"))  # leftovers of the kills were removed
    assert not list((run / "checkpoints").glob(".discard-*"))
    # Equal to the uninterrupted run: the same losses step for step after the last resume, and the same
    # weights, within 1e-3 rather than bit for bit (clean resumes are bit-exact here, but one full-suite run
    # in a dozen showed a weight gap above 1e-5 that could not be reproduced; a resume that skipped or
    # repeated data, or lost the optimiser state, moves the losses by percents).
    whole_loss = dict(zip(logged_steps(whole), _losses(whole)))
    resumed = dict(zip(logged_steps(run)[lines_before:], _losses(run)[lines_before:]))
    assert sorted(resumed) == list(range(newest + 1, 4 * EPOCHS + 1))
    differing = [m for m in resumed if abs(resumed[m] - whole_loss[m]) > 1e-3 * abs(whole_loss[m])]
    a = torch.load(whole / "student.pt", weights_only=True)["model_state_dict"]
    b = torch.load(run / "student.pt", weights_only=True)["model_state_dict"]
    gap = max((a[k] - b[k]).abs().max().item() for k in a)
    assert differing == [] and gap < 1e-3, f"the resumed run differs from the uninterrupted one: steps {differing}, " \
                                           f"largest weight gap {gap:.2e}; kills: {log}"
    print(f"\nFAULTS train: kills survived {survived}, final step {summary['steps']} of {summary['total_steps']}, "
          f"largest weight gap to the uninterrupted run {gap:.1e}")
    for line in log:
        print(f"  killed {line}")
    assert survived == len(KILLS)
