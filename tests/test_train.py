"""`dho-pipeline train` on generated shards against a tiny-teacher cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    BIN, CLASSNAMES, TEMPLATES, TINY_TEACHER, cache_args, cli, openai_normalized, random_image, run_command,
    training_data, write_lists, write_shards,
)
from PIL import Image
from torch import nn

import dho_pipeline
from dho_pipeline.clip_models import load_clip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return training_data(tmp_path_factory.mktemp("train"), num_shards=4, per_shard=16, eval_per_shard=10)


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


def open_clip_tiny_student():
    """`--student dho-tiny-student --pretrained none`, built with open_clip directly: load_clip seeds random
    init with torch.manual_seed(0) (its default seed) right before open_clip.create_model."""
    import open_clip

    open_clip.add_model_config(Path(dho_pipeline.__file__).parent / "model_configs" / "dho-tiny-student.json")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model("dho-tiny-student")
    return model.eval(), open_clip.get_tokenizer("dho-tiny-student")


def head_init_from_open_clip(classnames=CLASSNAMES, templates=TEMPLATES, *, normalise=False) -> torch.Tensor:
    """DHO's head initialisation from open_clip alone: per class, the plain mean over the templates of
    encode_text's raw (un-normalised) embeddings. `normalise` (the teacher's classifier) shows the
    difference matters."""
    model, tokenizer = open_clip_tiny_student()
    with torch.no_grad():
        texts = model.encode_text(tokenizer([t.replace("{}", c) for c in classnames for t in templates]))
    texts = texts.view(len(classnames), len(templates), -1)
    if normalise:
        return F.normalize(F.normalize(texts, dim=-1).mean(dim=1), dim=-1)
    return texts.mean(dim=1)


def test_heads_start_from_the_students_text_tower(prepared, tmp_path):
    out = tmp_path / "run"
    cli(*train_args(prepared, out, "--max-steps", "1", "--lr", "1e-12"))  # one step that moves nothing
    weights = torch.load(out / "student.pt", weights_only=True)["model_state_dict"]
    expected = head_init_from_open_clip()
    for head in ("ce_head", "kd_head"):
        assert torch.allclose(weights[f"{head}.weight"], expected, atol=1e-5)
        assert weights[f"{head}.bias"].abs().max() < 1e-9
    # The teacher's normalised classifier, or the mean over another template set, would not pass.
    assert (head_init_from_open_clip(normalise=True) - expected).abs().max() > 100 * 1e-5
    assert (head_init_from_open_clip(templates=TEMPLATES[:1]) - expected).abs().max() > 100 * 1e-5


# Which losses each objective logs, and which heads it trains (the other one keeps its initial weights).
OBJECTIVE_PARTS = {
    "dho": ({"ce_labeled", "kd_labeled", "kd_unlabeled"}, {"ce_head", "kd_head"}),
    "single-head": ({"ce_labeled", "kd_labeled", "kd_unlabeled"}, {"ce_head"}),
    "ce": ({"ce_labeled"}, {"ce_head"}),
    "kd": ({"kd_labeled", "kd_unlabeled"}, {"kd_head"}),
}


@pytest.mark.parametrize("objective", sorted(OBJECTIVE_PARTS))
def test_each_objective_trains_its_heads_with_its_losses(prepared, tmp_path, objective):
    out = tmp_path / objective
    cli(*train_args(prepared, out, "--objective", objective, "--epochs", "1"))
    parts = {k for m in metrics(out) for k in m if k.startswith(("ce_", "kd_"))}
    logged, trained = OBJECTIVE_PARTS[objective]
    assert parts == logged
    weights = torch.load(out / "student.pt", weights_only=True)["model_state_dict"]
    initial = head_init_from_open_clip()
    moved = {head for head in ("ce_head", "kd_head") if (weights[f"{head}.weight"] - initial).abs().max() > 1e-4}
    assert moved == trained


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
    model.load_state_dict(state_dict)  # strict
    model.eval()
    # The card's inference on 32 x 32 images (their own centre view) gives what `predict` reports.
    rng = np.random.default_rng(3)
    paths = [tmp_path / f"image{i}.png" for i in range(3)]
    for path in paths:
        random_image(rng, 32, 32).save(path)
    predictions = json.loads(cli("predict", "--checkpoint", out / "student.pt", *paths, "--json", "--topk", "5").stdout)
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        ce, kd = model(openai_normalized(pixels))
    alpha, beta = checkpoint["alpha"], checkpoint["beta"]
    card = alpha * F.softmax(ce, 1) + (1 - alpha) * F.softmax(kd / beta, 1)
    for row, expected in zip(predictions, card, strict=True):
        top = expected.topk(5)
        assert [p["class"] for p in row["predictions"]] == top.indices.tolist()
        assert [p["probability"] for p in row["predictions"]] == pytest.approx(top.values.tolist(), abs=1e-5)


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


def weights_gap(a: dict, b: dict) -> float:
    """Largest difference between two state dicts, leaving out the attention *key* biases.

    Softmax attention is invariant to the key bias (it adds the same q.b_k to every key's score), so its
    true gradient is zero and what autograd returns is rounding noise; Adam divides that noise by its
    own RMS and moves those weights by about lr per step in a random direction. Any change of summation
    order (accumulated micro-batches, another batch split) moves them by ~lr * steps while every other
    weight agrees to float rounding. (torch packs q, k, v biases into in_proj_bias, k in the middle third.)
    """
    gap = 0.0
    for name in a:
        difference = (a[name] - b[name]).abs()
        if name.endswith("attn.in_proj_bias"):
            query, _key, value = difference.chunk(3)
            difference = torch.cat([query, value])
        gap = max(gap, difference.max().item())
    return gap


def test_gradient_accumulation_matches_one_big_step(prepared, tmp_path):
    cli(*train_args(prepared, tmp_path / "one", "--epochs", "1"))
    cli(*train_args(prepared, tmp_path / "two", "--epochs", "1", "--grad-accum", "2"))
    cli(*train_args(prepared, tmp_path / "seed", "--epochs", "1", "--seed", "1"))
    # Same samples, same views, same mean loss: equal up to float rounding.
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["loss"] for m in one] == pytest.approx([m["loss"] for m in two], rel=1e-5)
    state = {run: torch.load(tmp_path / run / "student.pt", weights_only=True)["model_state_dict"]
             for run in ("one", "two", "seed")}
    assert weights_gap(state["one"], state["two"]) < 1e-5  # measured: 6e-8
    assert weights_gap(state["one"], state["seed"]) > 1e-3  # another data order fails the same comparison
    result = cli(*train_args(prepared, tmp_path / "three", "--grad-accum", "3"), expect_exit=1)
    assert "divisible" in result.output


def test_full_logit_cache_serves_any_temperature_and_missing_samples_are_skipped(tmp_path):
    from test_cache_teacher import _corrupt_sample  # the same corruption helper

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
    assert json.loads((tmp_path / "run" / "config.json").read_text())["temperature"] == 3.0
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
    from torch._dynamo.utils import counters

    losses, graphs = {}, {}
    for mode in ("--no-compile", "--compile"):
        out = tmp_path / mode.strip("-")
        args = train_args(prepared, out, "--max-steps", "3", mode, *extra)
        if online:
            args[args.index("--cache"):args.index("--cache") + 2] = []
        torch._dynamo.reset()  # forget graphs compiled by earlier tests, which dynamo would reuse
        before = counters["stats"]["unique_graphs"]
        cli(*args)
        graphs[mode] = counters["stats"]["unique_graphs"] - before
        losses[mode] = [m["loss"] for m in metrics(out) if "loss" in m]
    assert graphs["--no-compile"] == 0 and graphs["--compile"] >= (2 if online else 1)  # student (and teacher)
    assert len(losses["--compile"]) == 3
    np.testing.assert_allclose(losses["--compile"], losses["--no-compile"], rtol=1e-3)
