"""Training guard: a step whose loss or gradient is not finite stops `train` with one line naming the step
and the samples of its batch; the newest checkpoint (the last good state) stays, nothing after it is saved
and no non-finite student.pt is ever written.

The fault is a real divergence: a learning rate of 1e30 blows the weights up after the first update, so
step 2's forward pass is no longer finite. (Non-finite teacher values in the cache are refused earlier,
when the cache is read.)"""

from __future__ import annotations

import json

import pytest
import torch
from fault_helpers import (  # noqa: F401  (one_torch_thread is an autouse fixture)
    assert_clean_error, invoke, one_torch_thread, trainable_dataset,
)

from dho_pipeline.manifest import load_manifest
from dho_pipeline.split import load_split


@pytest.fixture(scope="module")
def trainable(tmp_path_factory):
    return trainable_dataset(tmp_path_factory.mktemp("nonfinite"), num_shards=3, per_shard=8,
                             cache_options=("--views", "2", "--topk", "3"))


def _keys(data, which: str) -> set[str]:
    manifest = load_manifest(data["manifest"])
    masks = getattr(load_split(data["split"]), f"{which}_mask")(manifest)
    return {key for shard, mask in zip(manifest.shards, masks) for key, chosen in zip(shard.keys, mask) if chosen}


def test_a_diverging_run_stops_at_its_first_non_finite_step(trainable, tmp_path):
    run = tmp_path / "run"
    result = invoke("train", "--cache", trainable["cache"], "--manifest", trainable["manifest"], "--split",
                    trainable["split"], "--out", run, "--student", "dho-tiny-student", "--pretrained", "none",
                    "--batch-size", "4", "--lr", "1e30", "--warmup-steps", "0", "--workers", "0",
                    "--log-every", "5", "--checkpoint-every", "1", "--epochs", "2")
    line = assert_clean_error(result, "step 2: the loss is not finite", "the newest checkpoint, step 1, stays",
                              "The step's 8 samples", f"{run}/nonfinite.json", "Lower --lr")
    print(f"\nFAULTS non-finite loss: {line.replace(f'{tmp_path}/', '')}")
    assert not (run / "student.pt").exists() and not (run / "summary.json").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001"]
    state = torch.load(run / "checkpoints" / "step-00000001" / "state.pt", weights_only=True)
    assert state["step"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    report = json.loads((run / "nonfinite.json").read_text())
    assert report["step"] == 2 and report["non_finite"] == "the loss"
    labeled, unlabeled = report["keys"]["labeled"], report["keys"]["unlabeled"]
    assert len(labeled) == len(unlabeled) == 4  # the step's batch: 4 labeled + 4 unlabeled samples
    assert set(labeled) <= _keys(trainable, "labeled") and set(unlabeled) <= _keys(trainable, "unlabeled")
    for key in (labeled + unlabeled)[:6]:
        assert repr(key) in line
    assert not (run / "metrics.jsonl").exists()  # stopped before the first metrics line (step 5)


@pytest.mark.parametrize("scaled", [False, True])
def test_an_infinite_gradient_stops_training_unless_a_loss_scaler_owns_it(tmp_path, scaled):
    """Under fp16 loss scaling an infinite gradient is the scaler's overflow signal (it skips the step and
    lowers its scale): the guard then checks the loss only. Without a scaler it stops training."""
    from dho_pipeline.errors import UserError
    from dho_pipeline.finite_guard import FiniteGuard

    weight = torch.nn.Parameter(torch.ones(3))
    guard = FiniteGuard([weight], gradients=not scaled)
    weight.grad = torch.tensor([1.0, float("inf"), 0.0])
    guard.add({"unlabeled": {"keys": ["a", "b"]}}, torch.tensor(2.0))
    guard.end_step(1)
    if scaled:
        guard.check(0, report=tmp_path / "nonfinite.json")  # no error
        guard.add({"unlabeled": {"keys": ["c"]}}, torch.tensor(float("nan")))  # a loss that is not finite
        guard.end_step(2)
    with pytest.raises(UserError, match=f"step {2 if scaled else 1}: the (loss|gradient norm) .*is not finite"):
        guard.check(0, report=tmp_path / "nonfinite.json")
