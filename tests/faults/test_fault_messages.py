"""Messages a new user meets with tiny data: each is one `Error: ...` line that names the file, shard or key
and says what is wrong (never a traceback, never a misleading cause), or the right result."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from fault_helpers import (  # noqa: F401  (one_torch_thread is an autouse fixture)
    CLASSNAMES, assert_clean_error, cache_args, invoke, jpeg, label, one_torch_thread, trainable_dataset, write_lists,
    write_tar,
)

from dho_pipeline.errors import UserError
from dho_pipeline.manifest import load_manifest

GOOD = [("a.jpg", jpeg(1)), ("a.cls", label(1)), ("b.jpg", jpeg(2)), ("b.cls", label(2))]


def _outcome(case: str, line: str) -> None:
    print(f"\nFAULTS message {case}: {line[:200]}")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return trainable_dataset(tmp_path_factory.mktemp("messages"), num_shards=3, per_shard=8,
                             cache_options=("--views", "1", "--topk", "3"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny dual-head student in the released format (no metadata: --student and --classnames given)."""
    from dho_pipeline.backbones import build_backbone
    from dho_pipeline.student import build_student
    from dho_pipeline.student_checkpoint import StudentCheckpoint

    path = tmp_path_factory.mktemp("student") / "student.pt"
    student = build_student(build_backbone("dho-tiny-student", "none"), CLASSNAMES, ["a photo of a {}."],
                            device=torch.device("cpu"))
    StudentCheckpoint(state_dict=student.state_dict(), epoch=0, acc=None, alpha=0.5, beta=0.5, metadata=None).save(path)
    return path


def _train(data, out, *extra, **paths):
    data = {**data, **paths}
    return invoke("train", "--cache", data["cache"], "--manifest", data["manifest"], "--split", data["split"],
                  "--out", out, "--student", "dho-tiny-student", "--pretrained", "none", "--batch-size", "4",
                  "--workers", "0", "--epochs", "1", *extra)


# ---- images that fail inside DataLoader workers --------------------------------------------------------


def test_an_image_error_in_a_worker_is_the_line_it_is_without_workers(checkpoint, tmp_path):
    shard = write_tar(tmp_path / "bad-000000.tar", GOOD + [("c.jpg", b"\xff\xd8\xff\xe0 not a jpeg"), ("c.cls", label(0))])
    classes, _ = write_lists(tmp_path)
    lines = {}
    for workers in ("0", "2"):
        result = invoke("evaluate", "--checkpoint", checkpoint, "--student", "dho-tiny-student", "--classnames", classes,
                        "--data", shard, "--batch-size", "1", "--workers", workers)
        lines[workers] = assert_clean_error(result, "shard bad-000000.tar, key 'c'", "cannot decode")
    assert lines["2"] == lines["0"], lines
    _outcome("image error in a DataLoader worker (evaluate --workers 2)", lines["2"])


# ---- options and files -----------------------------------------------------------------------------------


def test_predict_with_a_negative_topk(checkpoint, tmp_path):
    image = tmp_path / "x.jpg"
    image.write_bytes(jpeg(3))
    classes, _ = write_lists(tmp_path)
    result = invoke("predict", "--checkpoint", checkpoint, "--student", "dho-tiny-student", "--classnames", classes,
                    "--topk", "-3", image)
    _outcome("predict --topk -3", assert_clean_error(result, "--topk", "-3"))


def test_a_checkpoint_that_is_text_or_random_bytes(tmp_path):
    image = tmp_path / "x.jpg"
    image.write_bytes(jpeg(3))
    text, noise = tmp_path / "notes.txt", tmp_path / "noise.pt"
    text.write_text("epoch 3: loss 0.41\nthese are my notes, not weights\n")
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    for case, path in (("text file as --checkpoint", text), ("random bytes as --checkpoint", noise)):
        line = assert_clean_error(invoke("predict", "--checkpoint", path, image), str(path),
                                  "is not a student file this tool reads", "a student checkpoint (.pt")
        assert "run code" not in line, line
        _outcome(case, line)


@pytest.mark.parametrize("pattern", ["out/100%/s-%03d.tar", "s-%d-%d.tar"])
def test_shard_validates_its_output_pattern(tmp_path, pattern):
    (tmp_path / "tree" / "cat").mkdir(parents=True)
    (tmp_path / "tree" / "cat" / "x.jpg").write_bytes(jpeg(1))
    result = invoke("shard", tmp_path / "tree", "--out", str(tmp_path / pattern))
    line = assert_clean_error(result, "--out", "one shard-number placeholder", "%%")
    _outcome(f"shard --out {pattern!r}", line)


def test_shard_refuses_a_folder_holding_older_shards_unless_overwrite(tmp_path):
    tree = tmp_path / "tree"
    for number in range(12):
        (tree / ("cat" if number % 2 else "dog")).mkdir(parents=True, exist_ok=True)
        (tree / ("cat" if number % 2 else "dog") / f"{number}.jpg").write_bytes(jpeg(number))
    pattern = str(tmp_path / "out" / "s-%03d.tar")
    assert invoke("shard", tree, "--out", pattern, "--maxcount", "2").exit_code == 0  # 6 shards
    line = assert_clean_error(invoke("shard", tree, "--out", pattern, "--maxcount", "5"), "6 shard(s)", "--overwrite")
    _outcome("re-sharding into a folder holding older shards", line)
    result = invoke("shard", tree, "--out", pattern, "--maxcount", "5", "--overwrite")  # 3 shards, 3 stale removed
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["classes.txt", "s-000.tar", "s-001.tar", "s-002.tar"]
    assert invoke("manifest", str(tmp_path / "out" / "*.tar"), "--out", tmp_path / "m.json").exit_code == 0
    assert load_manifest(tmp_path / "m.json").num_samples == 12


# ---- labels and member names -------------------------------------------------------------------------------


def test_a_json_caption_mentioning_label_is_not_a_label(tmp_path):
    shard = write_tar(tmp_path / "cap-000000.tar", GOOD + [
        ("c.jpg", jpeg(3)), ("c.cls", label(3)), ("c.json", b'{"caption": "label"}'),
        ("d.jpg", jpeg(4)), ("d.json", b'{"caption": "a jar", "meta": {"label": "jam"}}'),
        ("e.jpg", jpeg(5)), ("e.json", b'{"label": 4, "caption": "a frog"}'),
    ])
    result = invoke("manifest", shard, "--out", tmp_path / "m.json")
    assert result.exit_code == 0, result.output
    assert load_manifest(tmp_path / "m.json").shards[0].labels == [1, 2, 3, None, 4]
    line = assert_clean_error(invoke("manifest", write_tar(tmp_path / "str-000000.tar", GOOD + [
        ("f.jpg", jpeg(6)), ("f.json", b'{"label": "frog"}')]), "--out", tmp_path / "m2.json"),
        "key 'f'", 'top-level "label"', "integer")
    _outcome("a .json whose top-level label is not an integer", line)


def test_cls_and_json_labels_that_disagree(tmp_path):
    shard = write_tar(tmp_path / "two-000000.tar", GOOD + [
        ("c.jpg", jpeg(3)), ("c.cls", label(3)), ("c.json", b'{"label": 1}')])
    line = assert_clean_error(invoke("manifest", shard, "--out", tmp_path / "m.json"), "two-000000.tar", "key 'c'",
                              "disagree", "3", "1")
    _outcome(".cls and .json labels that disagree", line)


def test_macos_appledouble_members_are_skipped_with_a_warning(tmp_path, caplog):
    shard = write_tar(tmp_path / "mac-000000.tar", [
        ("dir/a.jpg", jpeg(1)), ("dir/a.cls", label(1)), ("dir/._a.jpg", b"\x00\x05\x16\x07 AppleDouble"),
        ("dir/b.jpg", jpeg(2)), ("dir/b.cls", label(2)), ("dir/.DS_Store", b"Bud1"),
    ])
    with caplog.at_level(logging.WARNING, logger="dho_pipeline"):
        result = invoke("manifest", shard, "--out", tmp_path / "m.json")
    assert result.exit_code == 0, result.output
    assert load_manifest(tmp_path / "m.json").shards[0].keys == ["dir/a", "dir/b"]
    warning = next(r.getMessage() for r in caplog.records if "macOS" in r.getMessage())
    assert "mac-000000.tar" in warning and "2 macOS metadata member(s)" in warning, warning
    classes, templates = write_lists(tmp_path)
    data = {"manifest": tmp_path / "m.json", "classes": classes, "templates": templates}
    result = invoke(*cache_args(data, tmp_path / "c.zarr", "--views", "1", "--topk", "3"))  # stage one skips them too
    assert result.exit_code == 0 and "complete; 2 samples" in result.output, result.output
    _outcome("macOS ._a.jpg and .DS_Store members", warning)


# ---- splits and batch sizes that cannot train --------------------------------------------------------------


def test_a_split_without_unlabeled_samples(base, tmp_path):
    every = tmp_path / "all.txt"
    every.write_text("\n".join(k for s in load_manifest(base["manifest"]).shards for k in s.keys) + "\n")
    split = tmp_path / "all.json"
    assert invoke("split", "--manifest", base["manifest"], "--from-list", every, "--out", split).exit_code == 0
    line = assert_clean_error(_train(base, tmp_path / "run", split=split), f"split {split} has no unlabeled samples",
                              "--objective ce")
    assert "fewer processes" not in line
    assert not (tmp_path / "run").exists()
    _outcome("a split with 0 unlabeled images", line)


def test_a_batch_larger_than_the_data(base, tmp_path, caplog):
    line = assert_clean_error(_train(base, tmp_path / "run", "--batch-size", "1000"),
                              "--batch-size 1000 is larger than the 19 unlabeled samples", "19 or less")
    _outcome("--batch-size 1000 on 5 labeled and 19 unlabeled images", line)
    with caplog.at_level(logging.WARNING, logger="dho_pipeline"):
        result = _train(base, tmp_path / "run", "--batch-size", "8", "--max-steps", "1")
    assert result.exit_code == 0, result.output
    warning = next(r.getMessage() for r in caplog.records if "labeled samples" in r.getMessage())
    assert "--batch-size 8 is larger than the 5 labeled samples" in warning and "1.6 times per step" in warning
    _outcome("--batch-size 8 on 5 labeled images (a warning)", warning)


def test_too_few_shards_or_labeled_samples_for_the_processes(base):
    """What a torchrun launch of 4 processes on this data is told (each process takes whole unlabeled
    shards, and at least one labeled sample)."""
    from dho_pipeline.split import load_split
    from dho_pipeline.student_data import SampleTable, check_stream_sizes, training_samples

    manifest, split = load_manifest(base["manifest"]), load_split(base["split"])
    with pytest.raises(UserError, match=r"the 19 unlabeled samples of split S lie in 3 shard\(s\), fewer than the 4 "
                                        r"processes .*use at most 3 processes"):
        training_samples(manifest, split, None, batch_size=4, world=4, needs_unlabeled=True, where="split S")
    with pytest.raises(UserError, match=r"split S has 5 labeled samples, fewer than the 8 process\(es\)"):
        training_samples(manifest, split, None, batch_size=8, world=8, needs_unlabeled=False, where="split S")
    table = SampleTable.from_manifest(manifest)
    labeled, unlabeled = (table.ids_of(mask(manifest)) for mask in (split.labeled_mask, split.unlabeled_mask))
    warnings = check_stream_sizes(table, labeled, unlabeled, batch_size=18, world=3, where="split S")
    assert any("a process may get only 5 unlabeled samples in an epoch" in w for w in warnings), warnings
