"""A newcomer's first hour: own images from a folder tree, class names that follow the data, warnings
with the numbers, the shipped demo weights as --pretrained, progress bars, no lock left by a failed start,
and a calibration that is not decided by a tie."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import BIN, TEMPLATES, TINY_TEACHER, cli, random_image, write_lists, write_shards

from dho_pipeline.manifest import load_manifest

FOLDERS = ["golden_retriever", "red fox", "tabby__cat"]  # label order: sorted folder names


@pytest.fixture
def own_images(tmp_path):
    """A class-folder tree of JPEGs, as a user has it: FOLDER/<class>/<image>.jpg, 4 images per class."""
    rng = np.random.default_rng(0)
    for folder in FOLDERS:
        (tmp_path / "photos" / folder).mkdir(parents=True)
        for i in range(4):
            random_image(rng, 40, 30).save(tmp_path / "photos" / folder / f"img_{i}.jpg")
    (tmp_path / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return tmp_path


def test_shard_names_the_classes_and_every_stage_uses_them(own_images):
    root = own_images
    result = cli("shard", root / "photos", "--out", root / "shards" / "train-%06d.tar", "--maxcount", "5")
    assert "12 images of 3 classes" in result.output
    assert f"wrote {root / 'shards' / 'classes.txt'}: the 3 class names" in result.output
    # index -> name, from the folder names, underscores as spaces (runs of them as one)
    assert (root / "shards" / "classes.txt").read_text() == "golden retriever\nred fox\ntabby cat\n"

    result = cli("manifest", str(root / "shards" / "*.tar"), "--out", root / "m.json")
    assert "3 class names (from classes.txt beside the shards)" in result.output
    manifest = load_manifest(root / "m.json")
    assert manifest.classnames == ["golden retriever", "red fox", "tabby cat"]
    # the names are part of what the fingerprint protects: an edit makes the manifest refuse to load
    document = json.loads((root / "m.json").read_text())
    document["classnames"][0] = "dog"
    (root / "edited.json").write_text(json.dumps(document))
    with pytest.raises(Exception, match="edited after it was built"):
        load_manifest(root / "edited.json")

    # cache-teacher with no --classnames: the manifest's names, not ImageNet's 1000
    cli("cache-teacher", "--manifest", root / "m.json", "--out", root / "c.zarr", *TINY_TEACHER,
        "--templates", root / "templates.txt", "--workers", "0", "--views", "2")
    info = json.loads(cli("cache", "info", root / "c.zarr", "--json").stdout)
    assert info["num_classes"] == 3, info
    cli("split", "--manifest", root / "m.json", "--percent", "25", "--out", root / "s.json")
    train = ["train", "--cache", root / "c.zarr", "--manifest", root / "m.json", "--split", root / "s.json",
             "--student", "dho-tiny-student", "--pretrained", "none", "--epochs", "1", "--batch-size", "3",
             "--workers", "0"]
    cli(*train, "--out", root / "run")
    assert torch.load(root / "run" / "student.pt", weights_only=True)["dho_pipeline"]["classnames"] == \
        ["golden retriever", "red fox", "tabby cat"]
    # train checks the cache against the names it is given (default: the manifest's)
    (root / "other.txt").write_text("dog\nfox\ncat\n")
    result = cli(*train, "--out", root / "run2", "--classnames", root / "other.txt", expect_exit=1)
    assert "was built for another class list than" in result.output and "other.txt" in result.output


def test_a_class_list_longer_than_the_labels_is_refused_unless_allowed(tmp_path, caplog):
    write_shards(tmp_path / "d", num_shards=2, per_shard=8, num_classes=3)  # labels 0..2, no classes.txt
    cli("manifest", str(tmp_path / "d" / "*.tar"), "--out", tmp_path / "m.json")
    assert load_manifest(tmp_path / "m.json").label_range() == 3
    _, templates = write_lists(tmp_path)
    base = ["cache-teacher", *TINY_TEACHER, "--templates", templates, "--workers", "0"]
    # the old trap: no --classnames silently meant ImageNet's 1000 classes for 3-class labels
    result = cli(*base, "--manifest", tmp_path / "m.json", "--out", tmp_path / "a.zarr", expect_exit=1)
    assert "the class list (ImageNet's 1000 class names, the default) has 1000 names but the labels run 0..2 " \
           "(3 classes)" in result.output and "--allow-unused-classes" in result.output
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "a.zarr.lock").exists()
    # a file the user names is refused the same way (ImageNet's names for a re-indexed subset are the same
    # trap), unless told: then built
    five, _ = write_lists(tmp_path / "five")  # 5 names for 3 classes
    result = cli(*base, "--manifest", tmp_path / "m.json", "--out", tmp_path / "b.zarr", "--classnames", five,
                 expect_exit=1)
    assert f"the class list ({five}) has 5 names but the labels run 0..2 (3 classes): classes 3..4 have no " \
           "labeled sample" in result.output and "--allow-unused-classes" in result.output
    cli(*base, "--manifest", tmp_path / "m.json", "--out", tmp_path / "b.zarr", "--classnames", five,
        "--allow-unused-classes")
    # train on that cache: its list was checked when it was built, so only a warning with the numbers
    cli("split", "--manifest", tmp_path / "m.json", "--percent", "25", "--out", tmp_path / "s.json")
    with caplog.at_level("WARNING", logger="dho_pipeline"):
        cli("train", "--cache", tmp_path / "b.zarr", "--manifest", tmp_path / "m.json", "--split", tmp_path / "s.json",
            "--out", tmp_path / "run", "--student", "dho-test-vit", "--pretrained", "none", "--batch-size", "4",
            "--max-steps", "1", "--workers", "0")
    assert f"the class list (the class names of cache {tmp_path / 'b.zarr'}) has 5 names but the labels run 0..2" \
        in caplog.text
    # the same 5 names beside the shards: the manifest's list is a default again, refused unless allowed
    (tmp_path / "d" / "classes.txt").write_text(five.read_text())
    cli("manifest", str(tmp_path / "d" / "*.tar"), "--out", tmp_path / "m5.json")
    assert len(load_manifest(tmp_path / "m5.json").classnames) == 5
    result = cli(*base, "--manifest", tmp_path / "m5.json", "--out", tmp_path / "c.zarr", expect_exit=1)
    assert "the class list (the manifest's class names) has 5 names but the labels run 0..2" in result.output
    cli(*base, "--manifest", tmp_path / "m5.json", "--out", tmp_path / "c.zarr", "--allow-unused-classes")
    assert json.loads(cli("cache", "info", tmp_path / "c.zarr", "--json").stdout)["num_classes"] == 5


def test_split_warns_and_refuses_with_the_numbers(tmp_path, caplog):
    import webdataset as wds
    from helpers import image_bytes

    rng = np.random.default_rng(0)
    (tmp_path / "d").mkdir()
    with wds.TarWriter(str(tmp_path / "d" / "a.tar")) as writer:  # 30 images, 10 per class
        for i in range(30):
            writer.write({"__key__": f"k{i:03d}", "jpg": image_bytes(random_image(rng, 32, 32), "JPEG"), "cls": i % 3})
    cli("manifest", str(tmp_path / "d" / "a.tar"), "--out", tmp_path / "m.json")
    # --holdout larger than what a class has left: everything not labeled is held out, nothing unlabeled
    with caplog.at_level("WARNING", logger="dho_pipeline"):
        result = cli("split", "--manifest", tmp_path / "m.json", "--percent", "10", "--holdout", "30",
                     "--out", tmp_path / "s.json")
    assert "3 labeled, 27 held out, 0 unlabeled" in result.output
    text = caplog.text
    assert "--holdout 30: 3 of 3 classes had fewer than 30 images left after the labeled draw, so 27 images are " \
           "held out instead of 90 (class 0: 9 of 10 images held out)" in text
    assert "the split leaves no unlabeled images (3 labeled + 27 held out = all 30)" in text
    # --percent 100 labels everything: the held-out images asked for cannot exist
    result = cli("split", "--manifest", tmp_path / "m.json", "--percent", "100", "--holdout", "3",
                 "--out", tmp_path / "t.json", expect_exit=1)
    assert "--holdout 3 asked, but the labeled draw took all 30 of the 30 images, leaving none to hold out" in result.output
    assert not (tmp_path / "t.json").exists()
    caplog.clear()
    with caplog.at_level("WARNING", logger="dho_pipeline"):
        cli("split", "--manifest", tmp_path / "m.json", "--percent", "10", "--holdout", "2", "--out", tmp_path / "u.json")
    assert "warning" not in caplog.text  # a split that is fine says nothing


def test_pretrained_takes_the_shipped_compact_weights(tmp_path):
    from dho_pipeline.clip_models import load_clip
    from dho_pipeline.demo.tiny_clip import expand_compact
    from dho_pipeline.errors import UserError
    from dho_pipeline.stages.pretrain_demo import SHIPPED

    compact = SHIPPED / "tiny-teacher.safetensors"
    expand_compact(compact, tmp_path / "full.safetensors")
    direct, expanded = load_clip("dho-tiny-teacher", str(compact)), load_clip("dho-tiny-teacher", str(tmp_path / "full.safetensors"))
    a, b = direct.model.state_dict(), expanded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh = load_clip("dho-tiny-teacher", "none")  # what the weights changed: the loaded model is not a random one
    assert not torch.equal(a["visual.conv1.weight"], fresh.model.state_dict()["visual.conv1.weight"])
    with pytest.raises(UserError, match="holds compact weights of dho-tiny-teacher, not dho-tiny-student"):
        load_clip("dho-tiny-student", str(compact))


def test_a_failed_start_leaves_no_lock_file_but_a_live_writer_keeps_its_lock(dataset, tmp_path):
    from dho_pipeline.cache_store import exclusive_writer

    out = tmp_path / "c.zarr"
    lock = tmp_path / "c.zarr.lock"
    args = ["cache-teacher", "--manifest", dataset["manifest"], "--out", out, "--teacher", "dho-test-vit",
            "--classnames", dataset["classes"], "--templates", dataset["templates"], "--workers", "0"]
    result = cli(*args, "--pretrained", tmp_path / "absent.bin", expect_exit=1)  # fails after taking the lock
    assert "neither a file nor a tag" in result.output
    assert not out.exists() and not lock.exists()
    with exclusive_writer(out):  # a live writer: a second start is refused and the lock stays
        result = cli(*args, "--pretrained", "none", expect_exit=1)
        assert "is being written by pid" in result.output and lock.exists()
    cli(*args, "--pretrained", "none")  # and a start that works, works
    assert json.loads(cli("cache", "info", out, "--json").stdout)["incomplete_shards"] == []


def _run_in_terminal(args: list[str], cwd) -> str:
    """Run a dho-pipeline command with its stderr on a pseudo-terminal; what the terminal showed."""
    import fcntl
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a terminal 120 columns wide
    environment = {k: v for k, v in os.environ.items() if k != "DHO_PIPELINE_QUIET"}
    process = subprocess.Popen([str(BIN / "dho-pipeline"), *args], stdout=subprocess.PIPE, stderr=follower, cwd=cwd,
                               env=environment)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the other side closed
            break
        if not chunk:
            break
        shown += chunk
    process.wait(timeout=120)
    os.close(leader)
    assert process.returncode == 0, shown
    return shown.decode(errors="replace")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pseudo-terminal")
def test_progress_bars_on_a_terminal_only_and_not_when_quiet(tmp_path):
    write_shards(tmp_path / "d", num_shards=2, per_shard=3)
    pattern = str(tmp_path / "d" / "*.tar")
    assert "manifest: 100%" in _run_in_terminal(["manifest", pattern, "--out", "a.json"], tmp_path)
    assert "manifest:" not in _run_in_terminal(["--quiet", "manifest", pattern, "--out", "b.json"], tmp_path)
    piped = subprocess.run([str(BIN / "dho-pipeline"), "manifest", pattern, "--out", "c.json"], capture_output=True,
                           text=True, cwd=tmp_path)
    assert piped.returncode == 0 and "manifest:" not in piped.stderr and "%|" not in piped.stderr


def test_calibration_ties_go_to_the_lowest_held_out_nll():
    from dho_pipeline.evaluation import best_point, grid_scores, tied_at_best

    # 4 images, 3 classes: the CE head is right on all, the KD head on none. Every alpha above ~0.5
    # is right on all 4 (a tie of accuracy); the NLL prefers more weight on the confident, right head.
    labels = torch.tensor([0, 1, 2, 0])
    ce = 3.0 * torch.nn.functional.one_hot(labels, 3).float()
    kd = 3.0 * torch.nn.functional.one_hot((labels + 1) % 3, 3).float()
    alphas, betas = [0.0, 0.25, 0.5, 0.75, 1.0], [0.5, 1.0, 2.0]
    correct, nll = grid_scores({"ce": ce, "kd": kd, "labels": labels}, alphas, betas)
    assert tied_at_best(correct) > 1
    assert best_point(correct, alphas, betas)[:2] == (0.75, 0.5)  # accuracy alone: nearest (0.5, 0.5) among the tied
    # with the NLL: alpha 1 (each beta gives the same mix there; the tie among them goes to beta 0.5)
    assert best_point(correct, alphas, betas, nll)[:2] == (1.0, 0.5)
    # the NLL sums are what the mix gives, written out
    p = 0.75 * torch.softmax(ce, -1) + 0.25 * torch.softmax(kd / 2.0, -1)
    assert nll[3, 2].item() == pytest.approx(-torch.log(p[torch.arange(4), labels]).sum().item(), rel=1e-6)
