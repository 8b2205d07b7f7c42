"""`dho-pipeline split --shots N`: exactly N labeled images per class, deterministic, recorded, refusals."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from helpers import cli, labels_of, manifest_of_classes

from dho_pipeline.manifest import load_manifest
from dho_pipeline.split import load_split


@pytest.fixture
def manifest(tmp_path):
    return manifest_of_classes(tmp_path, per_shard=40)


def test_shots_per_class_with_holdout_and_the_rest_unlabeled(manifest, tmp_path):
    out = tmp_path / "s.json"
    result = cli("split", "--manifest", manifest, "--shots", "4", "--seed", "1", "--holdout", "2", "--out", out)
    assert "20 labeled, 10 held out, 130 unlabeled" in result.output
    split = load_split(out)
    assert Counter(labels_of(manifest, split.labeled)) == {c: 4 for c in range(5)}
    assert Counter(labels_of(manifest, split.holdout)) == {c: 2 for c in range(5)}
    m = load_manifest(manifest)
    for a, b, c in zip(split.labeled_mask(m), split.holdout_mask(m), split.unlabeled_mask(m)):
        assert not (a & b).any() and (a | b | c).all() and not (c & (a | b)).any()
    document = json.loads(out.read_text())
    assert document["method"] == {"rule": "shots", "shots": 4, "seed": 1, "holdout_per_class": 2, "percent": None,
                                  "from_list": None}


def test_the_draw_is_deterministic_and_depends_on_the_seed(manifest, tmp_path):
    paths = {}
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        paths[name] = tmp_path / f"{name}.json"
        cli("split", "--manifest", manifest, "--shots", "2", "--seed", seed, "--out", paths[name])
    assert paths["a"].read_bytes() == paths["b"].read_bytes()
    assert load_split(paths["a"]).labeled != load_split(paths["c"]).labeled
    # Another shots count is another draw, again exactly N per class.
    cli("split", "--manifest", manifest, "--shots", "1", "--seed", "1", "--out", tmp_path / "one.json")
    assert Counter(labels_of(manifest, load_split(tmp_path / "one.json").labeled)) == {c: 1 for c in range(5)}


def test_a_class_with_too_few_images_is_refused_by_name(manifest, tmp_path):
    counts = Counter(labels_of(manifest, {s.name: list(range(s.num_samples)) for s in load_manifest(manifest).shards}))
    smallest = min(counts, key=lambda c: (counts[c], c))
    result = cli("split", "--manifest", manifest, "--shots", counts[smallest] + 1, "--out", tmp_path / "x.json",
                 expect_exit=1)
    assert f"class {smallest} has {counts[smallest]} images in the manifest, fewer than --shots" in result.output
    assert not (tmp_path / "x.json").exists()
    result = cli("split", "--manifest", manifest, "--shots", "0", "--out", tmp_path / "x.json", expect_exit=1)
    assert "--shots must be at least 1" in result.output
    (tmp_path / "list.txt").write_text("x\n")
    result = cli("split", "--manifest", manifest, "--shots", "2", "--from-list", tmp_path / "list.txt",
                 "--out", tmp_path / "x.json", expect_exit=1)
    assert "give one of them" in result.output
