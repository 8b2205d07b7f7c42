"""Subset and out-of-distribution evaluation: `evaluate --class-subset` equals restricting the logits by
hand; the shipped ImageNet-A/R lists; `evaluate-ood` evaluates ImageNet and its shifts into one table."""

from __future__ import annotations

import json
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import cli, image_bytes, random_image

from dho_pipeline.backbones import build_backbone
from dho_pipeline.class_subsets import read_class_subset
from dho_pipeline.errors import UserError
from dho_pipeline.evaluation import student_logits_on
from dho_pipeline.manifest import load_manifest
from dho_pipeline.package_data import IMAGENET_WNIDS, SUBSETS
from dho_pipeline.prompts import read_lines
from dho_pipeline.student import DualHeadStudent
from dho_pipeline.student_checkpoint import load_student

WNIDS = read_lines(IMAGENET_WNIDS, "wnids")
A = read_lines(SUBSETS / "imagenet-a.txt", "a")
R = read_lines(SUBSETS / "imagenet-r.txt", "r")


def test_the_shipped_subsets_are_imagenet_a_and_r():
    a, r = read_class_subset("imagenet-a", 1000), read_class_subset("imagenet-r", 1000)
    assert len(a) == len(r) == 200 and len(set(a.indices) & set(r.indices)) == 86
    assert list(a.indices[:10]) == [6, 11, 13, 15, 17, 22, 23, 27, 30, 37]
    assert list(r.indices[:10]) == [1, 2, 4, 6, 8, 9, 11, 13, 22, 23]
    assert list(a.indices) == sorted(a.indices) and [WNIDS[i] for i in a.indices] == A


def test_subset_files_of_indices_or_wnids_and_refusals(tmp_path):
    (tmp_path / "idx.txt").write_text("# three classes\n4\n0\n2\n")
    assert read_class_subset(tmp_path / "idx.txt", 5).indices == (4, 0, 2)
    (tmp_path / "w.txt").write_text(f"{WNIDS[999]}\n{WNIDS[3]}\n")
    assert read_class_subset(tmp_path / "w.txt", 1000).indices == (999, 3)
    with pytest.raises(UserError, match="WordNet ids, which name ImageNet's 1000 classes; the student has 5"):
        read_class_subset(tmp_path / "w.txt", 5)
    with pytest.raises(UserError, match="class 4 is beyond the student's 3 classes"):
        read_class_subset(tmp_path / "idx.txt", 3)
    (tmp_path / "mixed.txt").write_text(f"{WNIDS[1]}\n7\n")
    with pytest.raises(UserError, match="mixes WordNet ids and class indices"):
        read_class_subset(tmp_path / "mixed.txt", 1000)
    (tmp_path / "names.txt").write_text("tench\n")
    with pytest.raises(UserError, match="'tench' is neither a WordNet id"):
        read_class_subset(tmp_path / "names.txt", 1000)
    with pytest.raises(UserError, match="neither a file nor one that ships with dho-pipeline .imagenet-a, imagenet-r"):
        read_class_subset("imagenet-b", 1000)


def write_folders(root, folders, per_folder=2, seed=0):
    rng = np.random.default_rng(seed)
    for folder in folders:
        (root / folder).mkdir(parents=True)
        for i in range(per_folder):
            image = random_image(rng, int(rng.integers(30, 60)), int(rng.integers(30, 60)))
            (root / folder / f"{folder}_{i}.jpg").write_bytes(image_bytes(image, "JPEG"))


def shard_set(tmp_path, name, folders, *classes, seed=0):
    """Class folders -> shards -> manifest, as the README's OOD section does it."""
    write_folders(tmp_path / "raw" / name, folders, seed=seed)
    cli("shard", tmp_path / "raw" / name, "--out", tmp_path / "shards" / f"{name}-%06d.tar", *classes)
    cli("manifest", str(tmp_path / "shards" / f"{name}-*.tar"), "--out", tmp_path / f"{name}.json")
    return tmp_path / f"{name}.json"


@pytest.fixture(scope="module")
def imagenet_student(tmp_path_factory):
    """A 1000-class student (tiny CLIP tower, random heads), saved as a released-format file (no metadata)."""
    path = tmp_path_factory.mktemp("student") / "student.pt"
    torch.manual_seed(0)
    backbone = build_backbone("dho-tiny-student", "none")
    student = DualHeadStudent(backbone.module, 48, 1000)
    with torch.no_grad():
        student.ce_head.weight.normal_(std=0.3)
        student.kd_head.weight.normal_(std=0.05)
    torch.save({"model_state_dict": student.state_dict(), "alpha": 0.3, "beta": 0.75}, path)
    return path


def test_class_subset_evaluation_equals_restricting_the_logits_by_hand(imagenet_student, tmp_path):
    folders = [A[0], A[5], A[150]]
    data = shard_set(tmp_path, "a", folders, "--classes", IMAGENET_WNIDS)
    labels = [l for s in load_manifest(data).shards for l in s.labels]
    assert sorted(set(labels)) == sorted(WNIDS.index(w) for w in folders)  # ImageNet indices
    args = ("evaluate", "--checkpoint", imagenet_student, "--student", "dho-tiny-student", "--data", data,
            "--workers", "0", "--json")
    report = json.loads(cli(*args, "--class-subset", "imagenet-a").output)
    full = json.loads(cli(*args).output)

    loaded = load_student(imagenet_student, student="dho-tiny-student")
    manifest = load_manifest(data)
    logits = student_logits_on(loaded, manifest, np.arange(manifest.num_samples), rank=0, world=1, batch_size=4,
                               workers=0, device="cpu", autocast=nullcontext)
    columns = [WNIDS.index(w) for w in A]
    ce, kd = logits["ce"][:, columns], logits["kd"][:, columns]
    target = torch.tensor([columns.index(int(label)) for label in logits["labels"]])
    mix = 0.3 * F.softmax(ce, -1) + 0.7 * F.softmax(kd / 0.75, -1)
    by_hand = {"ce": F.softmax(ce, -1), "kd": F.softmax(kd, -1), "mix": mix}
    assert report["samples"] == 6 and len(report["classnames"]) == 200 and report["class_subset"] == "imagenet-a"
    for head, p in by_hand.items():
        assert report[head]["top1"] == pytest.approx((p.argmax(-1) == target).float().mean().item())
        assert report[head]["top5"] == pytest.approx((p.topk(5).indices == target[:, None]).any(-1).float().mean().item())
        assert report[head]["nll"] == pytest.approx(-p.gather(1, target[:, None]).log().mean().item(), rel=1e-5)
        assert report[head]["nll"] != pytest.approx(full[head]["nll"], rel=1e-3)  # the restriction changes it
    assert report["classnames"][0] == loaded.classnames[WNIDS.index(A[0])]

    # Data labeled outside the subset: refused before any image is read, naming a sample.
    outside = shard_set(tmp_path, "r-only", [next(w for w in R if w not in A)], "--classes", IMAGENET_WNIDS)
    result = cli("evaluate", "--checkpoint", imagenet_student, "--student", "dho-tiny-student", "--data", outside,
                 "--class-subset", "imagenet-a", expect_exit=1)
    assert "which is not one of the 200 classes of imagenet-a" in result.output and "key '" in result.output


@pytest.mark.slow
def test_evaluate_ood_writes_one_table_of_the_five_sets(imagenet_student, tmp_path):
    wnids = "imagenet"  # the shipped ImageNet wnids, by name
    sets = {
        "imagenet": shard_set(tmp_path, "val", [WNIDS[1], WNIDS[6], WNIDS[500]], "--classes", wnids, seed=1),
        "imagenet-v2": shard_set(tmp_path, "v2", ["1", "6", "500", "999"], seed=2),  # numbered folders
        "imagenet-sketch": shard_set(tmp_path, "sketch", [WNIDS[6], WNIDS[998]], "--classes", wnids, seed=3),
        "imagenet-a": shard_set(tmp_path, "a", [A[0], A[1], A[2]], "--classes", wnids, seed=4),
        "imagenet-r": shard_set(tmp_path, "r", [R[0], R[199]], "--classes", wnids, seed=5),
    }
    assert sorted({l for s in load_manifest(sets["imagenet-v2"]).shards for l in s.labels}) == [1, 6, 500, 999]
    options = [x for name, path in sets.items() for x in (f"--{name}", path)]
    result = cli("evaluate-ood", "--checkpoint", imagenet_student, "--student", "dho-tiny-student", *options,
                 "--out", tmp_path / "ood", "--workers", "0")
    table = (tmp_path / "ood" / "ood.txt").read_text()
    summary = json.loads((tmp_path / "ood" / "ood.json").read_text())
    assert table.strip() in result.output
    titles = ["ImageNet", "ImageNet-V2", "ImageNet-Sketch", "ImageNet-A (200)", "ImageNet-R (200)", "mean of 4 shifted"]
    assert [line.split("  ")[0].strip() for line in table.splitlines()[4:]] == titles
    assert [s["samples"] for s in summary["sets"].values()] == [6, 8, 4, 6, 4]
    assert [s["classes"] for s in summary["sets"].values()] == [1000, 1000, 1000, 200, 200]
    # Each row is what `evaluate` gives for that set (with the subset for A and R).
    for key, name, subset in (("imagenet_v2", "imagenet-v2", None), ("imagenet_a", "imagenet-a", "imagenet-a")):
        alone = json.loads(cli("evaluate", "--checkpoint", imagenet_student, "--student", "dho-tiny-student",
                               "--data", sets[name], "--workers", "0", "--json",
                               *(["--class-subset", subset] if subset else [])).output)
        assert all(summary["sets"][key][h] == alone[h] for h in ("ce", "kd", "mix"))
    shifted = [summary["sets"][k]["mix"]["top1"] for k in ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")]
    assert summary["ood_mean"]["mix"] == pytest.approx(sum(shifted) / 4)
    # The reference's evaluation view reaches every row as it reaches `evaluate`'s (a paper reproduction).
    cli("evaluate-ood", "--checkpoint", imagenet_student, "--student", "dho-tiny-student", "--imagenet-v2",
        sets["imagenet-v2"], "--out", tmp_path / "ood-ref", "--workers", "0", "--eval-view", "reference")
    reference = json.loads((tmp_path / "ood-ref" / "ood.json").read_text())["sets"]["imagenet_v2"]
    alone = json.loads(cli("evaluate", "--checkpoint", imagenet_student, "--student", "dho-tiny-student", "--data",
                           sets["imagenet-v2"], "--workers", "0", "--json", "--eval-view", "reference").output)
    assert all(reference[h] == alone[h] for h in ("ce", "kd", "mix"))
    assert reference["mix"]["nll"] != summary["sets"]["imagenet_v2"]["mix"]["nll"]  # the view did change
