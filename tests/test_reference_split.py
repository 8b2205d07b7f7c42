"""The reference's labeled subset, image for image, and image lists: original file names kept from `shard`
through the manifest, `split --rule reference`, `--write-list` / `--from-list`."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import cli, image_bytes, random_image, write_shards

from dho_pipeline.manifest import load_manifest
from dho_pipeline.split import load_split, reference_class_counts

IMAGENET_TRAIN_IMAGES = 1_281_167  # ILSVRC-2012 train (arXiv 1409.0575, Table 2); 732 to 1300 per class


def make_tree(root: Path) -> dict[str, list[str]]:
    """A small ImageNet-like folder tree whose file names sort differently as strings and as numbers,
    with one class holding sub-folders ('a', 'a b', 'a/x': os.walk order is not depth-first by name)."""
    rng = np.random.default_rng(1)
    image = image_bytes(random_image(rng, 8, 8), "JPEG")
    layout = {
        "n01440764": [f"n01440764_{n}.JPEG" for n in rng.choice(20000, 14, replace=False)],
        "n01443537": [f"n01443537_{n}.JPEG" for n in (2, 10, 100, 11, 1, 9, 20, 3, 30)],
        "n01484850": [f"n01484850_{n}.JPEG" for n in rng.choice(20000, 7, replace=False)]
                     + ["a/n01484850_5.JPEG", "a b/n01484850_6.JPEG", "a/x/n01484850_7.JPEG", "a/x/n01484850_8.JPEG"],
    }
    for folder, names in layout.items():
        for name in names:
            path = root / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(image)
    return layout


@pytest.fixture
def tree(tmp_path):
    make_tree(tmp_path / "train")
    cli("shard", tmp_path / "train", "--out", tmp_path / "shards" / "train-%03d.tar", "--maxcount", "10")
    cli("manifest", str(tmp_path / "shards" / "*.tar"), "--out", tmp_path / "m.json")
    return tmp_path


def labeled_sources(manifest_path, split_path) -> list[str]:
    manifest, split = load_manifest(manifest_path), load_split(split_path)
    return [s.sources[p] for s in manifest.shards for p in split.labeled.get(s.name, [])]


def test_shard_keeps_each_images_file_name_into_the_manifest(tree):
    manifest = load_manifest(tree / "m.json")
    sources = [source for shard in manifest.shards for source in shard.sources]
    on_disk = sorted(p.relative_to(tree / "train").as_posix() for p in (tree / "train").rglob("*.JPEG"))
    assert sorted(sources) == on_disk
    for shard in manifest.shards:  # each name belongs to its own sample: key = folder + file name made safe
        for key, source in zip(shard.keys, shard.sources):
            folder, rest = source.split("/", 1)
            assert key.startswith(folder) and key.endswith(Path(rest).stem.replace(".", "_").split("/")[-1])
    # Shards made by other tools have no file names: no `sources` field at all.
    write_shards(tree / "other", num_shards=1, per_shard=3)
    cli("manifest", tree / "other" / "shard-000000.tar", "--out", tree / "other.json")
    assert "sources" not in json.loads((tree / "other.json").read_text())["shards"][0]
    assert load_manifest(tree / "other.json").shards[0].sources is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_counts_for_imagenet_1k(seed):
    """13,000 at 1% (13 per class) and 128,286 at 10% (128 for classes 0-713, 129 for 714-999).

    The real per-class train sizes are not used (no public list was found); the counts depend only on
    N = 1,281,167 and C = 1000 as long as every class holds at least 129 images, so these class sizes are
    made up: random in ImageNet's range 732..1300, summing to N."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(732, 1301, 1000)
    while sizes.sum() != IMAGENET_TRAIN_IMAGES:
        step = np.sign(IMAGENET_TRAIN_IMAGES - sizes.sum())
        movable = np.flatnonzero((sizes + step >= 732) & (sizes + step <= 1300))
        sizes[rng.choice(movable, min(len(movable), abs(IMAGENET_TRAIN_IMAGES - sizes.sum())), replace=False)] += step
    assert sizes.sum() == IMAGENET_TRAIN_IMAGES and sizes.min() >= 732 and sizes.max() <= 1300
    one, ten = reference_class_counts(sizes, 1.0), reference_class_counts(sizes, 10.0)
    assert one.sum() == 13_000 and set(one.tolist()) == {13}
    assert ten.sum() == 128_286 and Counter(ten.tolist()) == {128: 714, 129: 286}
    assert set(ten[:714].tolist()) == {128} and set(ten[714:].tolist()) == {129}


def test_reference_rule_draws_numpys_legacy_choice_in_imagefolder_order(tree):
    """The labeled images equal `np.random.seed(13)` then, per class in label order,
    `np.random.choice(indices of the class, count, replace=False)` over torchvision ImageFolder's samples."""
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(tree / "train"))
    files = [Path(path).relative_to(tree / "train").as_posix() for path, _ in folder.samples]
    targets = np.asarray(folder.targets)
    for percent in (30.0, 55.0):
        counts = reference_class_counts(np.bincount(targets), percent)
        np.random.seed(13)
        expected = [files[i] for label in range(len(folder.classes))
                    for i in np.random.choice(np.flatnonzero(targets == label), int(counts[label]), replace=False)]
        out = tree / f"ref-{percent}.json"
        cli("split", "--manifest", tree / "m.json", "--percent", percent, "--rule", "reference", "--out", out,
            "--write-list", tree / "ref.txt")
        assert sorted(labeled_sources(tree / "m.json", out)) == sorted(expected)
        assert load_split(out).method["rule"] == "reference"
        # The list is in ImageFolder order.
        listed = (tree / "ref.txt").read_text().splitlines()
        assert listed == [f for f in files if f in set(expected)]


def test_write_list_and_from_list_round_trip(tree):
    cli("split", "--manifest", tree / "m.json", "--percent", "40", "--rule", "reference", "--out", tree / "s.json",
        "--write-list", tree / "labeled.txt")
    wanted = load_split(tree / "s.json").labeled
    listed = (tree / "labeled.txt").read_text().splitlines()
    assert listed and all("/" in name for name in listed)  # class/file names
    manifest = load_manifest(tree / "m.json")
    key_of = {source: key for s in manifest.shards for source, key in zip(s.sources, s.keys)}
    forms = {
        "as written": listed,
        "file names only (SimCLR lists)": [name.rsplit("/", 1)[-1] for name in listed],
        "without extension": [name.rsplit(".", 1)[0] for name in listed],
        "under train/": [f"train/{name}" for name in listed],
        "keys": [key_of[name] for name in listed],
    }
    for form, names in forms.items():
        (tree / "list.txt").write_text("\n".join(names) + "\n")
        cli("split", "--manifest", tree / "m.json", "--from-list", tree / "list.txt", "--out", tree / "back.json",
            "--write-list", tree / "back.txt")
        back = load_split(tree / "back.json")
        assert back.labeled == wanted, form
        assert back.method["rule"] == "list"
        assert (tree / "back.txt").read_text().splitlines() == listed, form
    # A name in another class folder, or absent, is not taken for another image.
    (tree / "list.txt").write_text(f"n01443537/{listed[0].rsplit('/', 1)[-1]}\n")
    result = cli("split", "--manifest", tree / "m.json", "--from-list", tree / "list.txt", "--out", tree / "x.json",
                 expect_exit=1)
    assert "1 of 1 listed images are not in the manifest" in result.output


def test_from_list_reads_imagenet_names_on_shards_written_without_file_names(tmp_path):
    """Shards `shard` wrote before it recorded file names have keys `<class folder>_<stem>` only."""
    from dho_pipeline.shard_writer import folder_samples, write_shards as write_sample_shards

    make_tree(tmp_path / "train")
    samples, _, _ = folder_samples(tmp_path / "train")
    write_sample_shards([dataclasses.replace(s, source=None) for s in samples], str(tmp_path / "s" / "x-%03d.tar"),
                        maxcount=100, maxsize=1e9)
    cli("manifest", tmp_path / "s" / "x-000.tar", "--out", tmp_path / "m.json")
    names = ["n01440764/" + Path(samples[0].path).name, Path(samples[20].path).name, Path(samples[30].path).stem]
    (tmp_path / "list.txt").write_text("\n".join(names) + "\n")
    cli("split", "--manifest", tmp_path / "m.json", "--from-list", tmp_path / "list.txt", "--out", tmp_path / "s.json")
    manifest = load_manifest(tmp_path / "m.json")
    keys = {manifest.shards[0].keys[p] for p in load_split(tmp_path / "s.json").labeled["x-000.tar"]}
    assert keys == {samples[0].key, samples[20].key, samples[30].key}
    # The reference rule refuses such a manifest, naming what to do.
    result = cli("split", "--manifest", tmp_path / "m.json", "--rule", "reference", "--out", tmp_path / "r.json",
                 expect_exit=1)
    assert "has no original file name" in result.output and "--rule balanced" in result.output
    assert "\n" not in result.output.strip()
