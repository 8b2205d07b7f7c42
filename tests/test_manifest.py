"""`dho-pipeline manifest`: what it records, and how it refuses bad shards."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from helpers import cli, image_bytes, random_image, write_shards

from dho_pipeline.errors import UserError
from dho_pipeline.manifest import load_manifest


def test_manifest_records_keys_labels_locations_and_fingerprints(tmp_path):
    paths = write_shards(tmp_path / "d", num_shards=2, per_shard=4, ext="JPEG", label_member="json")
    out = tmp_path / "m.json"
    result = cli("manifest", str(tmp_path / "d" / "shard-{000000..000001}.tar"), "--out", out)
    assert "2 shards, 8 samples" in result.output

    manifest = load_manifest(out)
    assert [s.name for s in manifest.shards] == [p.name for p in paths]
    for shard, path in zip(manifest.shards, paths):
        samples = list(wds.WebDataset(str(path), shardshuffle=False))
        assert shard.keys == [s["__key__"] for s in samples]  # WebDataset's own keys, in order
        assert shard.labels == [json.loads(s["json"])["label"] for s in samples]
        assert shard.image_ext == "jpeg"  # upper-case .JPEG is lower-cased, as WebDataset does
        assert shard.size == path.stat().st_size
        assert shard.fingerprint == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        raw = path.read_bytes()
        for sample, offset, size in zip(samples, shard.image_offsets, shard.image_sizes):
            assert raw[offset : offset + size] == sample["jpeg"]


@pytest.mark.parametrize("ext", ["png", "webp", "jpeg"])
def test_manifest_accepts_image_formats_and_cls_labels(tmp_path, ext):
    [path] = write_shards(tmp_path / "d", num_shards=1, per_shard=3, ext=ext)
    cli("manifest", str(tmp_path / "d" / "*.tar"), "--out", tmp_path / "m.json")
    shard = load_manifest(tmp_path / "m.json").shards[0]
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    assert shard.image_ext == ext and shard.labels == [int(s["cls"]) for s in samples]


def test_manifest_without_labels(tmp_path):
    write_shards(tmp_path / "d", num_shards=1, per_shard=3, label_member="none")
    cli("manifest", str(tmp_path / "d" / "shard-000000.tar"), "--out", tmp_path / "m.json")
    assert load_manifest(tmp_path / "m.json").shards[0].labels is None


def test_manifest_paths_relative_to_manifest_and_relocatable(tmp_path):
    write_shards(tmp_path / "data", num_shards=1, per_shard=2)
    cli("manifest", str(tmp_path / "data" / "shard-000000.tar"), "--out", tmp_path / "m.json")
    document = json.loads((tmp_path / "m.json").read_text())
    assert document["shards"][0]["path"] == "data/shard-000000.tar"
    # Moving shards and editing only their paths keeps the manifest (and its fingerprint) valid.
    (tmp_path / "data").rename(tmp_path / "moved")
    document["shards"][0]["path"] = "moved/shard-000000.tar"
    (tmp_path / "m.json").write_text(json.dumps(document))
    manifest = load_manifest(tmp_path / "m.json")
    manifest.check_files()
    assert manifest.fingerprint == document["fingerprint"]


def test_manifest_edited_by_hand_is_refused(tmp_path):
    write_shards(tmp_path / "d", num_shards=1, per_shard=2)
    cli("manifest", str(tmp_path / "d" / "shard-000000.tar"), "--out", tmp_path / "m.json")
    document = json.loads((tmp_path / "m.json").read_text())
    document["shards"][0]["labels"][0] = (document["shards"][0]["labels"][0] + 1) % 5
    (tmp_path / "m.json").write_text(json.dumps(document))
    with pytest.raises(UserError, match="edited after it was built"):
        load_manifest(tmp_path / "m.json")


def _tar(path, members):
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def _jpeg():
    return image_bytes(random_image(np.random.default_rng(0), 16, 16), "JPEG")


@pytest.mark.parametrize(
    "members, message",
    [
        ([("a.jpg", b"x"), ("a.cls", b"1"), ("b.jpg", b"x"), ("a.txt", b"t")], "occurs twice"),
        ([("a.txt", b"hello"), ("a.cls", b"1")], "no image member"),
        ([("a.jpg", b"x"), ("a.cls", b"one")], "cannot read a label"),
        ([("a.jpg", b"x"), ("a.json", b'{"label": "3"}')], "cannot read a label"),
        ([], "holds no samples"),
    ],
)
def test_manifest_refuses_malformed_shards(tmp_path, members, message):
    _tar(tmp_path / "bad.tar", members)
    result = cli("manifest", tmp_path / "bad.tar", "--out", tmp_path / "m.json", expect_exit=1)
    # One error line (after tqdm's progress bar), naming the shard and saying what is wrong.
    errors = [line for line in result.output.splitlines() if "Error" in line]
    assert len(errors) == 1 and errors[0] == result.output.splitlines()[-1], result.output
    assert errors[0].startswith("Error: shard ") and message in errors[0] and "bad.tar" in errors[0]
    assert not (tmp_path / "m.json").exists()


def test_manifest_refuses_truncated_and_missing_shards(tmp_path):
    _tar(tmp_path / "t.tar", [("a.jpg", _jpeg()), ("a.cls", b"1"), ("b.jpg", _jpeg()), ("b.cls", b"2")])
    data = (tmp_path / "t.tar").read_bytes()
    (tmp_path / "t.tar").write_bytes(data[:1000])
    result = cli("manifest", tmp_path / "t.tar", "--out", tmp_path / "m.json", expect_exit=1)
    assert "truncated" in result.output and "t.tar" in result.output

    result = cli("manifest", tmp_path / "nope-{0..1}.tar", "--out", tmp_path / "m.json", expect_exit=1)
    assert "nope-0.tar does not exist" in result.output

    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file at all" * 50)
    result = cli("manifest", tmp_path / "junk.tar", "--out", tmp_path / "m.json", expect_exit=1)
    assert "junk.tar" in result.output


def test_manifest_refuses_duplicate_shard_names(tmp_path):
    write_shards(tmp_path / "a", num_shards=1, per_shard=2)
    write_shards(tmp_path / "b", num_shards=1, per_shard=2)
    result = cli(
        "manifest", tmp_path / "a" / "shard-000000.tar", tmp_path / "b" / "shard-000000.tar",
        "--out", tmp_path / "m.json", expect_exit=1,
    )
    assert "share the file name" in result.output


@pytest.mark.parametrize("content", ["", "{not json", '{"format": "other"}', "\xff\xfe"])
def test_loading_a_broken_manifest_is_a_clear_error(tmp_path, content):
    path = tmp_path / "m.json"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(UserError, match="m.json"):
        load_manifest(path)
