"""Data sets as CoOp lays them out: a split file and its images sharded, trained on few shots, evaluated;
FGVC-Aircraft's text files; the shipped templates by name; ImageNet-V2's numbered class folders."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from helpers import TINY_TEACHER, cli, image_bytes, random_image

from dho_pipeline.errors import UserError
from dho_pipeline.manifest import load_manifest
from dho_pipeline.package_data import IMAGENET_TEMPLATES, TEMPLATES, shipped_names
from dho_pipeline.prompts import read_lines, read_templates

# Oxford-Pets-like: CoOp's class names keep underscores; labels in the split's order, not alphabetical.
CLASSES = ["yorkshire_terrier", "abyssinian", "great_pyrenees"]


def write_images(folder, names, seed=0):
    rng = np.random.default_rng(seed)
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(random_image(rng, int(rng.integers(30, 70)), int(rng.integers(30, 70))), "JPEG"))


@pytest.fixture(scope="module")
def coop(tmp_path_factory):
    """A CoOp split (6 train, 2 val, 2 test images per class) and its image folder, sharded."""
    root = tmp_path_factory.mktemp("coop")
    split = {"train": [], "val": [], "test": []}
    for label, name in enumerate(CLASSES):
        for part, count in (("train", 6), ("val", 2), ("test", 2)):
            split[part] += [[f"{name}_{part}_{i}.jpg", label, name] for i in range(count)]
    images = root / "oxford_pets" / "images"
    write_images(images, [entry[0] for part in split.values() for entry in part])
    (root / "oxford_pets" / "split_zhou_OxfordPets.json").write_text(json.dumps(split, indent=4))
    result = cli("shard", images, "--coop-split", root / "oxford_pets" / "split_zhou_OxfordPets.json",
                 "--out", root / "shards" / "{split}-%06d.tar", "--maxcount", "8")
    for part in ("train", "val", "test"):
        cli("manifest", str(root / "shards" / f"{part}-*.tar"), "--out", root / f"{part}.json")
    return {"root": root, "split": split, "output": result.output}


def test_a_coop_split_becomes_train_val_test_shards_in_its_label_order(coop):
    root = coop["root"]
    assert "wrote 5 shards: 30 images (18 train, 6 val, 6 test) of 3 classes" in coop["output"]
    assert read_lines(root / "shards" / "classnames.txt", "c") == ["yorkshire terrier", "abyssinian", "great pyrenees"]
    for part, entries in coop["split"].items():
        manifest = load_manifest(root / f"{part}.json")
        got = {key: label for s in manifest.shards for key, label in zip(s.keys, s.labels)}
        assert got == {path[: -len(".jpg")]: label for path, label, _ in entries}


@pytest.mark.slow
def test_few_shots_of_a_coop_data_set_trained_and_evaluated(coop, tmp_path):
    root = coop["root"]
    cli("cache-teacher", "--manifest", root / "train.json", "--out", tmp_path / "c.zarr", *TINY_TEACHER,
        "--classnames", root / "shards" / "classnames.txt", "--templates", "oxford_pets", "--workers", "0",
        "--topk", "all")
    info = json.loads(cli("cache", "info", tmp_path / "c.zarr", "--json").output)
    assert info["num_classes"] == 3 and info["num_templates"] == 1
    cli("split", "--manifest", root / "train.json", "--shots", "2", "--seed", "1", "--out", tmp_path / "s.json")
    cli("train", "--cache", tmp_path / "c.zarr", "--manifest", root / "train.json", "--split", tmp_path / "s.json",
        "--out", tmp_path / "run", "--student", "dho-tiny-student", "--pretrained", "none", "--batch-size", "4",
        "--max-steps", "2", "--workers", "0")
    cli("calibrate", "--checkpoint", tmp_path / "run" / "student.pt", "--data", root / "val.json",
        "--out", tmp_path / "calibrated.pt", "--workers", "0")
    report = json.loads(cli("evaluate", "--checkpoint", tmp_path / "calibrated.pt", "--data", root / "test.json",
                            "--workers", "0", "--json").output)
    assert report["samples"] == 6 and report["per_class_total"] == [2, 2, 2]
    assert report["classnames"] == ["yorkshire terrier", "abyssinian", "great pyrenees"]


def test_refusals_name_the_file_and_what_to_do(coop, tmp_path):
    root = coop["root"]
    split_file = root / "oxford_pets" / "split_zhou_OxfordPets.json"
    result = cli("shard", root / "elsewhere", "--coop-split", split_file, "--out", tmp_path / "{split}-%06d.tar",
                 expect_exit=1)
    assert "18 of the 18 train images of" in result.output and "give the folder the split's paths are relative to" \
        in result.output
    result = cli("shard", root / "oxford_pets" / "images", "--coop-split", split_file, "--out", tmp_path / "x-%06d.tar",
                 expect_exit=1)
    assert "needs a {split} placeholder" in result.output
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": [["a.jpg", 0, "x"], ["b.jpg", 0, "y"]]}))
    result = cli("shard", root, "--coop-split", bad, "--out", tmp_path / "{split}-%06d.tar", expect_exit=1)
    assert "train[1]: label 0 is named 'y' here but 'x' before" in result.output
    bad.write_text(json.dumps({"train": [["a.jpg", "0", "x"]]}))
    result = cli("shard", root, "--coop-split", bad, "--out", tmp_path / "{split}-%06d.tar", expect_exit=1)
    assert "train[0] is" in result.output and "not [image path, label, class name]" in result.output
    assert not list(tmp_path.glob("*.tar"))


def test_fgvc_aircraft_from_its_own_lists(tmp_path):
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    variants = ["A340-500", "F/A-18", "DC-10"]
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    rows = {"train": [("1000001", "DC-10"), ("1000002", "F/A-18"), ("1000003", "A340-500")],
            "val": [("1000004", "DC-10")], "test": [("1000005", "F/A-18")]}
    for part, entries in rows.items():
        (data / f"images_variant_{part}.txt").write_text("".join(f"{i} {name}\n" for i, name in entries))
    write_images(data / "images", [f"{i}.jpg" for entries in rows.values() for i, _ in entries])
    cli("shard", data / "images", "--coop-split", data / "variants.txt", "--out", tmp_path / "s" / "{split}-%06d.tar")
    assert read_lines(tmp_path / "s" / "classnames.txt", "c") == variants  # file order, not sorted
    cli("manifest", str(tmp_path / "s" / "train-*.tar"), "--out", tmp_path / "train.json")
    shard = load_manifest(tmp_path / "train.json").shards[0]
    assert dict(zip(shard.keys, shard.labels)) == {"1000001": 2, "1000002": 1, "1000003": 0}


def test_templates_ship_for_the_eleven_data_sets_and_are_read_by_name():
    assert shipped_names(TEMPLATES) == ["caltech101", "dtd", "eurosat", "fgvc_aircraft", "food101", "imagenet",
                                        "oxford_flowers", "oxford_pets", "stanford_cars", "sun397", "ucf101"]
    assert read_templates("oxford_pets") == ["a photo of a {}, a type of pet."]
    assert read_templates("oxford-pets") == read_templates("oxford_pets")
    assert read_templates("eurosat") == ["a centered satellite photo of {}."]
    assert read_templates("dtd") == ["{} texture."]
    assert read_templates("imagenet") == read_templates(IMAGENET_TEMPLATES)
    with pytest.raises(UserError, match="neither a file nor a set that ships with dho-pipeline .caltech101, dtd"):
        read_templates("oxford_petz")


def test_imagenet_v2_numbered_folders_are_labeled_by_their_number(tmp_path):
    """Folders 0..999 are class indices: sorted as strings, '10' would come before '2'."""
    folders = ["0", "1", "2", "10", "11", "999"]
    write_images(tmp_path / "v2", [f"{folder}/{i}.jpeg" for folder in folders for i in range(2)])
    cli("shard", tmp_path / "v2", "--out", tmp_path / "s" / "v2-%06d.tar")
    cli("manifest", str(tmp_path / "s" / "*.tar"), "--out", tmp_path / "v2.json")
    shard = load_manifest(tmp_path / "v2.json").shards[0]
    labels = {key: label for key, label in zip(shard.keys, shard.labels)}
    assert labels == {f"{folder}_{i}": int(folder) for folder in folders for i in range(2)}
    assert Counter(labels.values()) == {int(folder): 2 for folder in folders}
