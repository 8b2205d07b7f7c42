"""`dho-pipeline split`: class-balanced draws, hold-out sets, lists, refusals."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from helpers import cli, labels_of, manifest_of_classes, write_shards

from dho_pipeline.errors import UserError
from dho_pipeline.manifest import load_manifest
from dho_pipeline.split import load_split


@pytest.fixture
def manifest(tmp_path):
    return manifest_of_classes(tmp_path, per_shard=50)


def test_class_balanced_draw_with_holdout(manifest, tmp_path):
    out = tmp_path / "s.json"
    result = cli("split", "--manifest", manifest, "--percent", "10", "--holdout", "3", "--out", out)
    assert "20 labeled, 15 held out, 165 unlabeled" in result.output
    split = load_split(out)
    assert Counter(labels_of(manifest, split.labeled)) == {c: 4 for c in range(5)}  # 10% of 200 / 5 classes
    assert Counter(labels_of(manifest, split.holdout)) == {c: 3 for c in range(5)}
    m = load_manifest(manifest)
    labeled, holdout, unlabeled = split.labeled_mask(m), split.holdout_mask(m), split.unlabeled_mask(m)
    for a, b, c in zip(labeled, holdout, unlabeled):
        assert not (a & b).any() and ((a | b | c).all()) and not (c & (a | b)).any()
    # Same seed, same split; another seed, another one.
    cli("split", "--manifest", manifest, "--percent", "10", "--holdout", "3", "--out", tmp_path / "again.json")
    assert load_split(tmp_path / "again.json").fingerprint == split.fingerprint
    cli("split", "--manifest", manifest, "--percent", "10", "--seed", "14", "--out", tmp_path / "other.json")
    assert load_split(tmp_path / "other.json").labeled != split.labeled


def test_balanced_counts_on_an_imagenet_sized_class_layout():
    """--rule balanced: round(p * N / C) per class, 13 at 1% and 128 at 10% for ImageNet's 1,281,167 images in
    1000 classes (the reference's rule gives 128,286 at 10%: tests/test_reference_split.py)."""
    from dho_pipeline.split import draw_split
    from dho_pipeline.manifest import ShardEntry, build_manifest

    rng = np.random.default_rng(0)
    sizes = np.full(1000, 1300)
    sizes[:300] = rng.integers(732, 1300, 300)
    sizes[0] += 1281167 - sizes.sum()
    labels = np.repeat(np.arange(1000), sizes).tolist()
    n = len(labels)
    entry = ShardEntry(name="all.tar", path="all.tar", num_samples=n, size=0, fingerprint="x", keys=[str(i) for i in range(n)],
                       labels=labels, image_ext="jpeg", image_offsets=[0] * n, image_sizes=[0] * n)
    manifest = build_manifest([entry])
    one = draw_split(manifest, percent=1, seed=13)
    ten = draw_split(manifest, percent=10, seed=13)
    assert one.num_labeled == 13000 and set(Counter(np.array(labels)[one.labeled["all.tar"]]).values()) == {13}
    assert ten.num_labeled == 128000 and set(Counter(np.array(labels)[ten.labeled["all.tar"]]).values()) == {128}
    assert one.method["rule"] == "balanced"


def test_split_from_a_list_of_image_names(manifest, tmp_path):
    m = load_manifest(manifest)
    names = [f"train/{m.shards[1].keys[3]}.JPEG", m.shards[2].keys[0]]
    (tmp_path / "list.txt").write_text("\n".join(names) + "\n")
    cli("split", "--manifest", manifest, "--from-list", tmp_path / "list.txt", "--out", tmp_path / "s.json")
    split = load_split(tmp_path / "s.json")
    assert split.labeled == {m.shards[1].name: [3], m.shards[2].name: [0]}
    (tmp_path / "bad.txt").write_text("no_such_image.JPEG\n")
    result = cli("split", "--manifest", manifest, "--from-list", tmp_path / "bad.txt", "--out", tmp_path / "x.json", expect_exit=1)
    assert "1 of 1 listed images are not in the manifest" in result.output


def test_split_refusals(manifest, tmp_path):
    result = cli("split", "--manifest", manifest, "--percent", "0", "--out", tmp_path / "s.json", expect_exit=1)
    assert "--percent must lie in (0, 100]" in result.output
    write_shards(tmp_path / "nolabels", num_shards=1, per_shard=3, label_member="none")
    cli("manifest", tmp_path / "nolabels" / "shard-000000.tar", "--out", tmp_path / "n.json")
    result = cli("split", "--manifest", tmp_path / "n.json", "--out", tmp_path / "s.json", expect_exit=1)
    assert "has no label" in result.output
    cli("split", "--manifest", manifest, "--percent", "10", "--out", tmp_path / "s.json")
    document = json.loads((tmp_path / "s.json").read_text())
    document["holdout"] = {"x": [1]}
    (tmp_path / "s.json").write_text(json.dumps(document))
    with pytest.raises(UserError, match="edited after it was drawn"):
        load_split(tmp_path / "s.json")
