"""`dho-pipeline train` on generated shards against a tiny-teacher cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import BIN, TINY_TEACHER, cache_args, cached_dataset, cli, run_command, write_lists, write_shards
from torch import nn

from dho_pipeline.clip_models import load_clip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = cached_dataset(root, num_shards=4, per_shard=16, cache_options=("--views", "2", "--topk", "3"),
                          split_options=("--percent", "25", "--holdout", "1"))
    write_shards(root / "eval", num_shards=1, per_shard=10, seed=5, prefix="eval")
    cli("manifest", str(root / "eval" / "*.tar"), "--out", root / "eval.json")
    return {**data, "eval": root / "eval.json"}


def train_args(data, out, *extra):
    return [
        "train", "--cache", data["cache"], "--manifest", data["manifest"], "--split", data["split"], "--out", out,
        "--student", "dho-tiny-student", "--pretrained", "none", "--batch-size", "8", "--lr", "1e-3",
        "--workers", "0", "--log-every", "1", *extra,
    ]


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_writes_a_run(prepared, tmp_path):
    out = tmp_path / "run"
    result = cli(*train_args(prepared, out, "--epochs", "6", "--eval-data", prepared["eval"]))
    assert "finished" in result.output
    lines = [m for m in metrics(out) if "loss" in m]
    assert len(lines) == 6 * 5  # 45 unlabeled // 8 = 5 steps per epoch
    first, last = np.mean([m["loss"] for m in lines[:3]]), np.mean([m["loss"] for m in lines[-3:]])
    assert last < 0.5 * first, (first, last)
    assert {"ce_labeled", "kd_labeled", "kd_unlabeled", "lr", "samples_per_second"} <= set(lines[0])
    evals = [m["eval"] for m in metrics(out) if "eval" in m]
    assert len(evals) == 6 and all(e["samples"] == 10 and 0 <= e["mix"] <= 1 for e in evals)
    config = json.loads((out / "config.json").read_text())
    assert config["objective"] == "dho" and config["temperature"] == 2.0
    assert list((out / "tensorboard").rglob("events.out.tfevents*"))
    checkpoint = torch.load(out / "student.pt", weights_only=True)
    assert set(checkpoint) >= {"model_state_dict", "epoch", "acc", "alpha", "beta"}
    assert checkpoint["alpha"] == 0.5 and checkpoint["beta"] == 0.5 and checkpoint["epoch"] == 5
    keys = set(checkpoint["model_state_dict"])
    assert {"ce_head.weight", "ce_head.bias", "kd_head.weight", "kd_head.bias"} <= keys
    assert all(k.startswith(("backbone.", "ce_head.", "kd_head.")) for k in keys)
    meta = checkpoint["dho_pipeline"]
    assert meta["split_fingerprint"].startswith("sha256:") and meta["cache_fingerprint"].startswith("sha256:")
    assert meta["classnames"] == ["cat", "dog", "bird", "fish", "frog"]


def test_heads_start_from_the_students_text_tower(prepared, tmp_path):
    out = tmp_path / "run"
    cli(*train_args(prepared, out, "--max-steps", "1", "--lr", "1e-12"))
    weights = torch.load(out / "student.pt", weights_only=True)["model_state_dict"]
    from dho_pipeline.clip_models import class_text_embeddings

    loaded = load_clip("dho-tiny-student", "none")
    expected = class_text_embeddings(loaded, ["cat", "dog", "bird", "fish", "frog"], ["a photo of a {}.", "art of the {}."],
                                     normalize=False)
    assert torch.allclose(weights["ce_head.weight"], expected, atol=1e-5)
    assert torch.allclose(weights["kd_head.weight"], expected, atol=1e-5)


@pytest.mark.parametrize("objective", ["single-head", "ce", "kd"])
def test_baseline_objectives_run(prepared, tmp_path, objective):
    out = tmp_path / objective
    cli(*train_args(prepared, out, "--objective", objective, "--epochs", "1"))
    parts = {k for m in metrics(out) for k in m if k.startswith(("ce_", "kd_"))}
    assert parts == {"ce": {"ce_labeled"}, "kd": {"kd_labeled", "kd_unlabeled"},
                     "single-head": {"ce_labeled", "kd_labeled", "kd_unlabeled"}}[objective]


def test_checkpoint_loads_with_the_model_card_code(prepared, tmp_path):
    """The model card's StudentModel (backbone, ce_head, kd_head), weights_only, strict."""
    out = tmp_path / "run"
    cli(*train_args(prepared, out, "--max-steps", "2"))

    class StudentModel(nn.Module):  # the model card's class, with our tiny backbone for its CLIP one
        def __init__(self, num_classes=5):
            super().__init__()
            self.backbone = load_clip("dho-tiny-student", "none").model.float().visual
            in_features = 48
            self.ce_head = nn.Linear(in_features, num_classes)
            self.kd_head = nn.Linear(in_features, num_classes)

        def forward(self, x):
            features = self.backbone(x)
            return self.ce_head(features), self.kd_head(F.normalize(features, dim=1)) * 100

    checkpoint = torch.load(out / "student.pt", map_location="cpu", weights_only=True)
    model = StudentModel()
    state_dict = {k.replace("module.", ""): v for k, v in checkpoint["model_state_dict"].items()}
    model.load_state_dict(state_dict)
    model.eval()
    with torch.no_grad():
        ce, kd = model(torch.randn(2, 3, 32, 32))
    probs = checkpoint["alpha"] * F.softmax(ce, 1) + (1 - checkpoint["alpha"]) * F.softmax(kd / checkpoint["beta"], 1)
    assert torch.allclose(probs.sum(1), torch.ones(2))


def test_resumed_run_matches_an_uninterrupted_one(prepared, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    cli(*train_args(prepared, whole, "--epochs", "2"))
    cli(*train_args(prepared, parts, "--epochs", "2", "--max-steps", "3", "--checkpoint-every", "3"))
    result = cli(*train_args(prepared, parts, "--epochs", "2"), expect_exit=1)
    assert "pass --resume" in result.output
    cli(*train_args(prepared, parts, "--epochs", "2", "--resume"))
    a = torch.load(whole / "student.pt", weights_only=True)["model_state_dict"]
    b = torch.load(parts / "student.pt", weights_only=True)["model_state_dict"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert [m["loss"] for m in metrics(whole) if "loss" in m][3:] == pytest.approx(
        [m["loss"] for m in metrics(parts) if "loss" in m][3:], rel=1e-5)
    result = cli(*train_args(prepared, parts, "--epochs", "3", "--resume"), expect_exit=1)
    assert "different epochs" in result.output


def test_refuses_mismatched_inputs_before_training(prepared, tmp_path):
    # A cache from another manifest.
    write_shards(tmp_path / "other", num_shards=1, per_shard=8, seed=9)
    cli("manifest", tmp_path / "other" / "shard-000000.tar", "--out", tmp_path / "other.json")
    result = cli(*train_args({**prepared, "manifest": tmp_path / "other.json"}, tmp_path / "r1"), expect_exit=1)
    assert "built from another manifest" in result.output
    # A split from another manifest.
    cli("split", "--manifest", tmp_path / "other.json", "--percent", "50", "--out", tmp_path / "other-split.json")
    result = cli(*train_args({**prepared, "split": tmp_path / "other-split.json"}, tmp_path / "r2"), expect_exit=1)
    assert "drawn from a different manifest" in result.output
    # A temperature the cache cannot serve (top-3 with log-partitions at T = 1, 2 only).
    result = cli(*train_args(prepared, tmp_path / "r3", "--temperature", "4"), expect_exit=1)
    assert "T = 1, 2 only" in result.output
    # Another class list.
    classes, _ = write_lists(tmp_path / "cls", classnames=["a", "b", "c", "d", "e"])
    result = cli(*train_args(prepared, tmp_path / "r4", "--classnames", classes), expect_exit=1)
    assert "another class list" in result.output
    # An incomplete cache.
    import shutil

    partial = tmp_path / "partial.zarr"
    shutil.copytree(prepared["cache"], partial)
    meta = json.loads((partial / "shards" / "000002" / "zarr.json").read_text())
    meta["attributes"]["complete"] = False
    (partial / "shards" / "000002" / "zarr.json").write_text(json.dumps(meta))
    result = cli(*train_args({**prepared, "cache": partial}, tmp_path / "r5"), expect_exit=1)
    assert "missing 1 shard(s) (shard-000002.tar)" in result.output
    assert not any((tmp_path / f"r{i}").exists() for i in range(1, 6))


def test_recipe_file_and_flags(prepared, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'about = "test recipe"\ncache = "{prepared["cache"]}"\nmanifest = "{prepared["manifest"]}"\n'
        f'split = "{prepared["split"]}"\nstudent = "dho-tiny-student"\npretrained = "none"\nepochs = 7\n'
        f'batch_size = 8\nworkers = 0\nloss_weights = [1.0, 0.5, 0.5]\n'
    )
    cli("train", "--config", recipe, "--out", tmp_path / "run", "--epochs", "1")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["epochs"] == 1 and config["loss_weights"] == [1.0, 0.5, 0.5]
    recipe.write_text("epochz = 3\n")
    result = cli("train", "--config", recipe, "--out", tmp_path / "x", expect_exit=1)
    assert "unknown setting(s) epochz" in result.output


@pytest.mark.slow
@pytest.mark.parametrize("compile_flag", ["--no-compile", "--compile"])
def test_two_processes_run_the_same_number_of_steps(prepared, tmp_path, compile_flag):
    """Also with the compiled training step (the GPU default): compiled DDP, eval on the eager model."""
    out = tmp_path / "run"
    run_command(BIN / "torchrun", "--nproc_per_node", "2", "--no-python", BIN / "dho-pipeline",
                *train_args(prepared, out, "--epochs", "2", "--eval-data", prepared["eval"], compile_flag),
                env={"OMP_NUM_THREADS": "1"})
    ranks = [json.loads(line) for line in (out / "ranks.jsonl").read_text().splitlines()]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 10
    assert ranks[0]["positions"] == ranks[1]["positions"]
    evals = [m["eval"] for m in metrics(out) if "eval" in m]
    assert evals and all(e["samples"] == 10 for e in evals)  # every eval sample counted once


@pytest.mark.slow
def test_killed_run_resumes_from_its_newest_complete_checkpoint(prepared, tmp_path):
    out = tmp_path / "run"
    args = [BIN / "dho-pipeline", *train_args(prepared, out, "--epochs", "8", "--checkpoint-every", "2")]
    process = subprocess.Popen([str(a) for a in args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if (out / "checkpoints").is_dir() and len(list((out / "checkpoints").glob("step-*"))) >= 2:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "student.pt").exists() or process.returncode == 0
    cli(*train_args(prepared, out, "--epochs", "8", "--checkpoint-every", "2", "--resume"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == summary["total_steps"] == 40 and summary["finished"]
    losses = [m["loss"] for m in metrics(out) if "loss" in m]
    assert all(np.isfinite(losses))
    for state in (out / "checkpoints").glob("step-*"):
        torch.load(state / "state.pt", weights_only=True)  # every checkpoint on disk is whole


def test_gradient_accumulation_matches_one_big_step(prepared, tmp_path):
    cli(*train_args(prepared, tmp_path / "one", "--epochs", "1"))
    cli(*train_args(prepared, tmp_path / "two", "--epochs", "1", "--grad-accum", "2"))
    # Same samples, same views, same mean loss: equal up to float rounding (which Adam's 1/sqrt(v)
    # amplifies a little in the weights).
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["loss"] for m in one] == pytest.approx([m["loss"] for m in two], rel=1e-5)
    a = torch.load(tmp_path / "one" / "student.pt", weights_only=True)["model_state_dict"]
    b = torch.load(tmp_path / "two" / "student.pt", weights_only=True)["model_state_dict"]
    assert all(torch.allclose(a[k], b[k], atol=1e-2) for k in a)
    result = cli(*train_args(prepared, tmp_path / "three", "--grad-accum", "3"), expect_exit=1)
    assert "divisible" in result.output


def test_full_logit_cache_serves_any_temperature_and_missing_samples_are_skipped(tmp_path):
    from test_cache_teacher import _corrupt_sample  # noqa: the same corruption helper

    shards = write_shards(tmp_path / "d", num_shards=2, per_shard=12)
    _corrupt_sample(shards[1], "s1_img0005")
    classes, templates = write_lists(tmp_path)
    cli("manifest", str(tmp_path / "d" / "*.tar"), "--out", tmp_path / "m.json")
    data = {"manifest": tmp_path / "m.json", "classes": classes, "templates": templates}
    cli(*cache_args(data, tmp_path / "c.zarr", "--topk", "all", "--temperatures", "1", "--on-error", "skip"))
    cli("split", "--manifest", tmp_path / "m.json", "--percent", "30", "--out", tmp_path / "s.json")
    data.update(cache=tmp_path / "c.zarr", split=tmp_path / "s.json")
    cli(*train_args(data, tmp_path / "run", "--temperature", "3", "--epochs", "1"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_missing"] == 1 and summary["labeled"] + summary["unlabeled"] == 23
    assert all(np.isfinite(m["kd_unlabeled"]) for m in metrics(tmp_path / "run") if "loss" in m)


def test_shipped_recipes_are_complete_configs():
    from pathlib import Path

    from dho_pipeline.stages.train import Config, load_recipe

    recipes = sorted(Path(__file__).parent.parent.glob("manifests/recipes/*.toml"))
    recipes = [r for r in recipes if not r.name.startswith("fewshot-")]  # test_fewshot_recipes.py checks those
    assert len(recipes) >= 4
    for recipe in recipes:
        config = Config(**load_recipe(recipe))
        assert config.objective == "dho" and config.temperature == 2.0 and config.batch_size == 256


@pytest.mark.parametrize("online", [False, True], ids=["cached", "online-teacher"])
def test_compiled_training_matches_eager(prepared, tmp_path, online):
    """--compile (the GPU default) compiles the training step and an online teacher: same losses as eager."""
    extra = ["--teacher-online", "--teacher", TINY_TEACHER[1], "--teacher-pretrained", "none",
             "--classnames", prepared["classes"], "--templates", prepared["templates"]] if online else []
    losses = {}
    for mode in ("--no-compile", "--compile"):
        out = tmp_path / mode.strip("-")
        args = train_args(prepared, out, "--max-steps", "3", mode, *extra)
        if online:
            args[args.index("--cache"):args.index("--cache") + 2] = []
        cli(*args)
        losses[mode] = [m["loss"] for m in metrics(out) if "loss" in m]
    assert len(losses["--compile"]) == 3
    np.testing.assert_allclose(losses["--compile"], losses["--no-compile"], rtol=1e-3)
