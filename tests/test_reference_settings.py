"""The reference's settings behind our switches, each checked against the thing it reproduces: torch's own
schedulers and samplers, torchvision's own transforms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dho_pipeline.schedule import StepPlan, learning_rate, reference_warmup_cosine, warmup_cosine


def torch_reference_lrs(base_lr: float, warmup: int, total: int) -> list[float]:
    """The lr of every optimiser step 0..total under the reference's ChainedScheduler, stepped after each step."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=base_lr, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.ChainedScheduler([
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, end_factor=1.0, total_iters=warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total - warmup),
    ])
    lrs = []
    for _ in range(total + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("total", [12_000, 21_337])
def test_reference_schedule_equals_torchs_chained_schedulers(total):
    base, warmup = 5e-5, 5000
    expected = torch_reference_lrs(base, warmup, total)
    ours = [reference_warmup_cosine(i, base_lr=base, warmup_steps=warmup, total_steps=total) for i in range(total + 1)]
    for step in (0, 4999, 5000, total - 5000, total):
        assert ours[step] == pytest.approx(expected[step], rel=1e-9, abs=1e-18), step
    assert max(abs(a - b) for a, b in zip(ours, expected)) < 1e-13 * base  # float rounding of the recursive form
    assert ours[0] == pytest.approx(0.01 * base)
    assert ours[total - 5000] == pytest.approx(0.0, abs=1e-20)  # the cosine's zero ...
    assert ours[total] > ours[total - 1] > ours[total - 5000]  # ... then it rises again, as the reference's does
    assert learning_rate("reference", 4999, base_lr=base, warmup_steps=warmup, total_steps=total) == ours[4999]


def test_our_schedule_warms_up_from_zero_then_cosine():
    base, total = 1.0, 100_000
    lrs = [warmup_cosine(i, base_lr=base, warmup_steps=5000, total_steps=total) for i in range(total)]
    assert lrs[4999] == base and lrs[0] == base / 5000 and lrs[-1] < 1e-8
    assert all(a >= b for a, b in zip(lrs[4999:], lrs[5000:]))  # never rises after the warm-up


@pytest.mark.parametrize("num_unlabeled, steps", [(1_268_167, 4_954), (1_152_881, 4_504), (1_000, 4), (1_024, 4)])
def test_reference_epoch_steps_equal_a_distributed_loaders_length(num_unlabeled, steps):
    """The reference's steps per epoch: the length of rank 0's unlabeled DataLoader (32 per GPU, 8 GPUs) over a
    DistributedSampler, which pads every rank to ceil(N / 8) samples (ImageNet: 1% and 10% unlabeled sets)."""
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(range(num_unlabeled), num_replicas=8, rank=0)
    loader = DataLoader(range(num_unlabeled), batch_size=256 // 8, sampler=sampler)
    plan = StepPlan.of(num_unlabeled=num_unlabeled, batch_size=256, epochs=32, rounding="reference", world=8)
    assert plan.steps_per_epoch == len(loader) == steps
    assert plan.total_steps == 32 * steps
    floor = StepPlan.of(num_unlabeled=num_unlabeled, batch_size=256, epochs=32)
    assert floor.steps_per_epoch == num_unlabeled // 256


def photos():
    """Real photographs (scikit-learn ships two, 640 x 427) in landscape, portrait, small and exact-size crops."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    images = [Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")]
    china = images[0]
    return images + [
        china.transpose(Image.Transpose.ROTATE_90),  # portrait
        china.crop((100, 50, 300, 200)),  # smaller than 378: upsampled
        china.crop((0, 0, 500, 378)),  # shorter side already 378: torchvision skips that resize
        china.crop((7, 3, 390, 420)),  # odd margins: centre-crop rounding
    ]


def test_reference_eval_view_equals_torchvisions_chain():
    """Resize(378) (bilinear, the default) -> CenterCrop(378) -> Resize(224, bicubic), pixel for pixel."""
    from torchvision import transforms

    from dho_pipeline.views import render_reference_eval

    chain = transforms.Compose([
        transforms.Resize(378), transforms.CenterCrop(378),
        transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
    ])
    for image in photos():
        expected = np.asarray(chain(image))
        ours = render_reference_eval(image, (224, 224))
        assert ours.shape == (224, 224, 3) and np.array_equal(ours, expected), image.size


def test_reference_training_view_equals_torchvisions_chain():
    """RandomResizedCrop's crop at 378 (bicubic) -> flip -> Resize(224, bicubic), as the reference renders a
    student's view, for crop boxes in whole pixels (what torchvision draws), pixel for pixel."""
    from torchvision import transforms
    from torchvision.transforms import functional as F

    from dho_pipeline.views import quantize_box, render_view

    rng = np.random.default_rng(0)
    bicubic = transforms.InterpolationMode.BICUBIC
    for image in photos():
        for _ in range(3):
            flip = bool(rng.integers(2))
            crop = transforms.RandomResizedCrop(378, scale=(0.5, 1.0))
            top, left, height, width = crop.get_params(image, crop.scale, crop.ratio)
            teacher_view = F.resized_crop(image, top, left, height, width, [378, 378], bicubic)
            teacher_view = F.hflip(teacher_view) if flip else teacher_view
            expected = np.asarray(transforms.Resize(224, interpolation=bicubic)(teacher_view))
            box = quantize_box(left, top, left + width, top + height, *image.size)
            assert np.array_equal(render_view(image, box, flip, (378, 378)), np.asarray(teacher_view))
            ours = render_view(image, box, flip, (224, 224), via=(378, 378))
            assert np.array_equal(ours, expected), (image.size, top, left, height, width, flip)
            direct = render_view(image, box, flip, (224, 224))  # ours: one resize, not the same pixels
            assert not np.array_equal(direct, expected)


# ---- the switches wired into the stages ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    from helpers import cached_dataset, cli, write_shards

    root = tmp_path_factory.mktemp("reference-settings")
    data = cached_dataset(root, num_shards=3, per_shard=12, cache_options=("--views", "3", "--topk", "3"),
                          split_options=("--percent", "25"))
    write_shards(root / "eval", num_shards=1, per_shard=6, seed=5, prefix="eval")
    cli("manifest", str(root / "eval" / "*.tar"), "--out", root / "eval.json")
    return {**data, "eval": root / "eval.json"}


def test_crops_only_never_shows_the_whole_image_view(cached):
    """--train-views crops: each sample shows views 1..V-1 in turn, never view 0 (the reference trains on crops)."""
    from dho_pipeline.cache_reader import CacheReader
    from dho_pipeline.manifest import load_manifest
    from dho_pipeline.student_data import IdStream, SampleTable, ShardRows, StudentBatches, _ImageReader, labeled_order

    manifest = load_manifest(cached["manifest"])
    table = SampleTable.from_manifest(manifest)
    reader = CacheReader.open(cached["cache"], manifest, 2.0)
    ids = np.arange(len(table.label))
    views = {int(i): [tuple(box) for box in reader.read(int(table.shard[i]), [int(table.position[i])]).boxes[0]]
             for i in ids}
    for crops_only in (True, False):
        stream = IdStream(labeled_order(ids, 0, 0, 1), len(ids))
        dataset = StudentBatches(table, stream, (32, 32), rows=ShardRows(reader, table), num_views=3, crops_only=crops_only)
        shown: dict[int, set] = {}
        for epoch in range(4):
            batch = dataset._batch(_ImageReader(table), epoch)
            for sample_id, box in zip(batch["ids"].tolist(), batch["boxes"].numpy()):
                shown.setdefault(sample_id, set()).add(tuple(box))
        # (Tiny, elongated images can fall back to the same centred crop in two views: compare sets of boxes.)
        for sample_id, boxes in shown.items():
            assert boxes == set(views[sample_id][1:] if crops_only else views[sample_id])
    assert sum(views[i][0] not in views[i][1:] for i in views) > len(views) / 2  # view 0 mostly differs from crops


def test_reference_eval_view_in_the_evaluation_stream(cached):
    from dho_pipeline.manifest import load_manifest
    from dho_pipeline.student_data import FiniteIdStream, SampleTable, StudentBatches, _ImageReader
    from dho_pipeline.views import decode_rgb, render_reference_eval

    table = SampleTable.from_manifest(load_manifest(cached["eval"]))
    ids = np.arange(len(table.label))
    batch = next(iter(StudentBatches(table, FiniteIdStream(ids, 6, 0, 1), (24, 24), num_batches=1, eval_view="reference")))
    reader = _ImageReader(table)
    for sample_id, pixels in zip(batch["ids"].tolist(), batch["pixels"].numpy()):
        assert np.array_equal(pixels, render_reference_eval(decode_rgb(reader.read(sample_id)), (24, 24)))


@pytest.mark.slow
def test_train_with_every_reference_setting(cached, tmp_path):
    """A run with the reference's lr schedule, step count, crops-only views, two-step resampling and evaluation
    view: its logged lr is the reference schedule's, its epoch the padded ceil; changing a setting on resume
    is refused; a split or cache made otherwise is refused before training."""
    import json

    from helpers import cli

    reference = ["--lr-schedule", "reference", "--warmup-steps", "2", "--epoch-steps", "reference",
                 "--train-views", "crops", "--train-resize", "reference", "--eval-view", "reference",
                 "--split-rule", "balanced", "--teacher-class-embeddings", "unit"]
    base = ["train", "--cache", cached["cache"], "--manifest", cached["manifest"], "--split", cached["split"],
            "--student", "dho-tiny-student", "--pretrained", "none", "--batch-size", "8", "--lr", "1e-3",
            "--workers", "0", "--log-every", "1"]
    out = tmp_path / "run"
    cli(*base, "--out", out, "--epochs", "2", "--eval-data", cached["eval"], *reference)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m]
    summary = json.loads((out / "summary.json").read_text())
    per_epoch = math.ceil(summary["unlabeled"] / 8)  # 27 unlabeled: 4 steps, the floor would give 3
    assert summary["total_steps"] == len(steps) == 2 * per_epoch and summary["unlabeled"] % 8
    expected = [reference_warmup_cosine(i, base_lr=1e-3, warmup_steps=2, total_steps=2 * per_epoch)
                for i in range(len(steps))]
    np.testing.assert_allclose([m["lr"] for m in steps], expected, rtol=1e-12)
    assert [m["eval"]["samples"] for m in lines if "eval" in m] == [6, 6]
    result = cli(*base, "--out", out, "--epochs", "2", "--resume", *reference[2:], expect_exit=1)
    assert "different lr_schedule" in result.output

    refusals = {
        ("--split-rule", "reference"): "drawn by rule 'balanced', not 'reference'",
        ("--teacher-class-embeddings", "reference"): "built with 'unit' class embeddings, not 'reference'",
        ("--lr-schedule", "reference", "--warmup-steps", "5000"): "needs more steps",
    }
    for flags, message in refusals.items():
        result = cli(*base, "--out", tmp_path / "refused", *flags, expect_exit=1)
        assert message in result.output
        assert not (tmp_path / "refused" / "checkpoints").exists()


def test_reference_class_embeddings_are_the_template_mean_left_unnormalised(cached, tmp_path):
    """--class-embeddings reference: each class embedding is the mean of its templates' unit text embeddings,
    not renormalised, so its logits are the unit setting's times that mean's norm; the cache records it."""
    import json

    import torch.nn.functional as F
    from helpers import CLASSNAMES, TEMPLATES, cache_args, cli

    from dho_pipeline.clip_models import load_clip
    from dho_pipeline.teacher import load_zero_shot_teacher

    clip = load_clip("dho-test-vit", "none")
    with torch.no_grad():
        texts = [template.replace("{}", name) for name in CLASSNAMES for template in TEMPLATES]
        per_template = F.normalize(clip.model.encode_text(clip.tokenizer(texts)).float(), dim=-1)
        mean = per_template.view(len(CLASSNAMES), len(TEMPLATES), -1).mean(1)
    teachers = {mode: load_zero_shot_teacher("dho-test-vit", "none", CLASSNAMES, TEMPLATES, device="cpu",
                                             class_embeddings=mode) for mode in ("unit", "reference")}
    torch.testing.assert_close(teachers["reference"].runner.teacher.class_embeddings, mean, rtol=1e-5, atol=1e-6)
    images = torch.randn(4, 3, *teachers["unit"].preprocess.image_size, generator=torch.Generator().manual_seed(0))
    unit, reference = (teachers[mode].runner(images) for mode in ("unit", "reference"))
    torch.testing.assert_close(reference, unit * mean.norm(dim=-1), rtol=1e-4, atol=1e-4)
    assert (mean.norm(dim=-1) < 1).all()

    out = tmp_path / "reference.zarr"
    cli(*cache_args(cached, out, "--views", "1", "--class-embeddings", "reference"))
    attrs = json.loads((out / "zarr.json").read_text())["attributes"]
    assert attrs["class_embeddings"] == "reference" and "not renormalised" in attrs["logits"]
    result = cli(*cache_args(cached, out, "--views", "1"), expect_exit=1)  # a rerun with unit embeddings
    assert "class_embeddings" in result.output


REFERENCE_SETTINGS = {"lr_schedule": "reference", "epoch_steps": "reference", "train_views": "crops",
                      "train_resize": "reference", "eval_view": "reference", "precision": "fp32",
                      "split_rule": "reference", "teacher_class_embeddings": "reference"}


def test_the_paper_recipes_select_every_reference_setting_and_the_corrected_ones_ours():
    from pathlib import Path

    from dho_pipeline.stages.train import Config, load_recipe

    recipes = sorted(r for r in Path(__file__).parent.parent.glob("manifests/recipes/*.toml")
                     if not r.stem.startswith("fewshot-"))  # the few-shot recipes: tests/test_fewshot_recipes.py
    paper = [r for r in recipes if not r.stem.endswith("-corrected")]
    assert len(paper) == 4 and len(recipes) == 8
    for recipe in recipes:
        config = Config(**load_recipe(recipe))
        if recipe in paper:
            assert {name: getattr(config, name) for name in REFERENCE_SETTINGS} == REFERENCE_SETTINGS, recipe.name
            assert config.warmup_steps == 5000 and config.lr == 5e-5 and config.epochs == 32
            assert "--rule reference" in recipe.read_text() and "--class-embeddings reference" in recipe.read_text()
        else:
            for name, value in REFERENCE_SETTINGS.items():
                assert getattr(config, name) != value, (recipe.name, name)
            assert config.split_rule == "balanced" and config.teacher_class_embeddings == "unit"
