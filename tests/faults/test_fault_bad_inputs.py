"""The bad-input matrix: every fault ends in its documented outcome, a one-line `Error: ...` that names
the file, shard or key (non-zero exit), or a recorded skip; never a traceback, never a wrong cache."""

from __future__ import annotations

import json
import shutil
import tarfile

import pytest
from fault_helpers import (  # noqa: F401  (one_torch_thread is an autouse fixture)
    assert_clean_error, cache_args, dump_records, invoke, jpeg, label, one_torch_thread, labeled_dataset,
    trainable_dataset, verify_ok, write_lists, write_tar,
)

from dho_pipeline.cache_store import TeacherCache

GOOD = [("a.jpg", jpeg(1)), ("a.cls", label(1)), ("b.jpg", jpeg(2)), ("b.cls", label(2))]
TRIED: list[str] = []
BASE_CACHE = ("--views", "1", "--topk", "3")


def _outcome(case: str, line: str) -> None:
    TRIED.append(case)
    print(f"\nFAULTS bad input #{len(TRIED)} {case}: {line[:150]}")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Two labeled shards, a top-3 cache at T = 1, 2 built from them, and a split."""
    return trainable_dataset(tmp_path_factory.mktemp("bad-inputs"), num_shards=2, per_shard=8, cache_options=BASE_CACHE)


def _train(data, out, *extra, **paths):
    data = {**data, **paths}
    return invoke("train", "--cache", data["cache"], "--manifest", data["manifest"], "--split", data["split"],
                  "--out", out, "--student", "dho-tiny-student", "--pretrained", "none", "--batch-size", "4",
                  "--workers", "0", "--epochs", "1", *extra)


# ---- shards that `manifest` must refuse ------------------------------------------------------------


def _truncated_inside_a_member(path):
    data = path.read_bytes()
    path.write_bytes(data[:1500])  # inside the first image's bytes


SHARD_FAULTS = {
    "empty shard": (lambda p: write_tar(p, []), ["holds no samples"]),
    "truncated tar (inside a member)": (lambda p: (write_tar(p, GOOD), _truncated_inside_a_member(p)), ["truncated"]),
    "zero-byte tar": (lambda p: p.write_bytes(b""), ["truncated or not a valid tar"]),
    "not a tar at all": (lambda p: p.write_bytes(b"PK\x03\x04 a zip, say" * 64), ["not a valid tar"]),
    "duplicate key, adjacent members": (lambda p: write_tar(p, GOOD + [("b.jpg", jpeg(3))]), ["key 'b'", "twice"]),
    "duplicate key, far apart": (
        lambda p: write_tar(p, GOOD + [("c.jpg", jpeg(3)), ("c.cls", label(0)), ("a.jpg", jpeg(4))]),
        ["key 'a' occurs twice"]),
    "member that is not an image": (lambda p: write_tar(p, GOOD + [("t.txt", b"hi"), ("t.cls", label(0))]),
                                    ["key 't'", "no image member"]),
    "label that is not a number": (lambda p: write_tar(p, GOOD + [("n.jpg", jpeg(3)), ("n.cls", b"seven")]),
                                   ["key 'n'", "label"]),
    "label json without an integer": (
        lambda p: write_tar(p, GOOD + [("n.jpg", jpeg(3)), ("n.json", b'{"label": "cat"}')]), ["key 'n'", "label"]),
    "label json with a number in a string": (
        lambda p: write_tar(p, GOOD + [("n.jpg", jpeg(3)), ("n.json", b'{"label": "3"}')]), ["key 'n'", "label"]),
    "directory named like a shard": (lambda p: p.mkdir(), []),
}


@pytest.mark.parametrize("case", sorted(SHARD_FAULTS))
def test_manifest_refuses_a_bad_shard(tmp_path, case):
    make, needles = SHARD_FAULTS[case]
    shard = tmp_path / "bad-000000.tar"
    make(shard)
    result = invoke("manifest", shard, "--out", tmp_path / "m.json")
    line = assert_clean_error(result, "bad-000000.tar", *needles)
    assert not (tmp_path / "m.json").exists()
    _outcome(case, line)


def test_manifest_refuses_a_shard_missing_on_disk(tmp_path):
    result = invoke("manifest", tmp_path / "gone-000000.tar", "--out", tmp_path / "m.json")
    _outcome("shard missing at manifest time", assert_clean_error(result, "gone-000000.tar", "does not exist"))
    result = invoke("manifest", str(tmp_path / "gone-*.tar"), "--out", tmp_path / "m.json")
    _outcome("shard glob matching nothing", assert_clean_error(result, "gone-*.tar"))
    result = invoke("manifest", str(tmp_path / "gone-{0..1}.tar"), "--out", tmp_path / "m.json")
    _outcome("shard brace range naming a missing shard", assert_clean_error(result, "gone-0.tar does not exist"))
    assert not (tmp_path / "m.json").exists()


def test_manifest_refuses_a_tar_truncated_between_members(tmp_path):
    shard = write_tar(tmp_path / "cut-000000.tar", GOOD + [("c.jpg", jpeg(3)), ("c.cls", label(0))])
    with tarfile.open(shard) as archive:
        boundary = next(m.offset for m in archive.getmembers() if m.name == "b.jpg")  # a header, 512-aligned
    shard.write_bytes(shard.read_bytes()[:boundary])
    result = invoke("manifest", shard, "--out", tmp_path / "m.json")
    _outcome("truncated tar (between members)", assert_clean_error(result, "cut-000000.tar", "truncated"))


def test_manifest_refuses_member_names_that_are_not_utf8(tmp_path):
    shard = write_tar(tmp_path / "l1-000000.tar", [("caf\xe9.jpg", jpeg(1)), ("caf\xe9.cls", label(1))],
                      fmt=tarfile.GNU_FORMAT, encoding="latin-1")
    result = invoke("manifest", shard, "--out", tmp_path / "m.json")
    _outcome("member name not UTF-8", assert_clean_error(result, "l1-000000.tar"))


# ---- samples that `cache-teacher` must refuse or record -----------------------------------------------


def _one_shard(tmp_path, members, name="x-000000.tar"):
    shard = write_tar(tmp_path / "shards" / name, members)
    classes, templates = write_lists(tmp_path)
    result = invoke("manifest", shard, "--out", tmp_path / "m.json")
    assert result.exit_code == 0, result.output
    return {"manifest": tmp_path / "m.json", "classes": classes, "templates": templates, "shard": shard}


BOMB = bytes.fromhex("ffd8ffc0001108ffffffff03012200021101031101ffd9")  # a JPEG header claiming 65535 x 65535 px


def test_undecodable_images_fail_naming_the_key_or_are_recorded(tmp_path):
    bad = {"corrupt": b"\xff\xd8\xff\xe0 this is not the rest of a jpeg", "empty": b"",
           "text": b"hello, I am text in a .jpg", "bomb": BOMB}
    members = list(GOOD)
    for key, data in bad.items():
        members += [(f"{key}.jpg", data), (f"{key}.cls", label(0))]
    data = _one_shard(tmp_path, members)
    out = tmp_path / "c.zarr"
    result = invoke(*cache_args(data, out, "--views", "2"))
    line = assert_clean_error(result, "shard x-000000.tar, key 'corrupt'", "cannot decode", "--on-error skip")
    _outcome("corrupt JPEG (fail)", line)
    assert not TeacherCache.open(out).is_complete(0)

    result = invoke(*cache_args(data, out, "--views", "2", "--on-error", "skip"))
    assert result.exit_code == 0 and "4 recorded as missing" in result.output, result.output
    report = json.loads(invoke("cache", "info", out, "--json").stdout)
    assert report["complete_shards"] == 1 and report["num_missing"] == len(bad)
    recorded = {m["key"]: m["reason"] for m in report["missing"]}
    assert set(recorded) == set(bad) and all(recorded.values()), recorded
    info = invoke("cache", "info", out).output
    assert all(f"missing      x-000000.tar {key}" in info for key in bad), info
    assert "DecompressionBomb" in recorded["bomb"]
    rows = dump_records(out)
    assert [r["key"] for r in rows] == ["a", "b", *bad] and all(r.get("missing") for r in rows[2:])
    verify_ok(out, data["manifest"])
    for key in bad:
        _outcome(f"{key} image (--on-error skip)", f"recorded as missing: {recorded[key]}")


def test_sample_without_label(tmp_path):
    """Documented: labels are optional for the teacher; a split (which needs them) names the sample."""
    data = _one_shard(tmp_path, GOOD + [("n.jpg", jpeg(3))])
    manifest = json.loads(data["manifest"].read_text())
    assert manifest["shards"][0]["labels"] == [1, 2, None]
    result = invoke(*cache_args(data, tmp_path / "c.zarr"))
    assert result.exit_code == 0, result.output
    result = invoke("split", "--manifest", data["manifest"], "--percent", "50", "--out", tmp_path / "s.json")
    _outcome("sample without label (split)", assert_clean_error(result, "x-000000.tar", "key 'n'", "no label"))


@pytest.mark.parametrize("value", [99, 5, -1])
def test_label_out_of_range(tmp_path, value):
    data = _one_shard(tmp_path, GOOD + [("n.jpg", jpeg(3)), ("n.cls", label(value))])
    result = invoke(*cache_args(data, tmp_path / "c.zarr"))
    line = assert_clean_error(result, "x-000000.tar", "key 'n'", f"label {value} is outside the class list")
    assert not (tmp_path / "c.zarr").exists()  # refused before the teacher loads, nothing written
    _outcome(f"label {value} out of range", line)


def test_shard_missing_or_changed_after_the_manifest(base, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(base["root"] / "shards", root / "shards")
    manifest = root / "m.json"
    assert invoke("manifest", str(root / "shards" / "*.tar"), "--out", manifest).exit_code == 0
    data = {**base, "manifest": manifest}
    shard = root / "shards" / "shard-000001.tar"
    original = shard.read_bytes()

    shard.unlink()
    line = assert_clean_error(invoke(*cache_args(data, tmp_path / "c.zarr")), "shard shard-000001.tar is missing")
    _outcome("shard missing on disk", line)
    shard.write_bytes(original[: len(original) // 2])
    line = assert_clean_error(invoke(*cache_args(data, tmp_path / "c.zarr")), "shard-000001.tar", "changed since")
    _outcome("shard truncated after the manifest", line)
    line = assert_clean_error(_train(data, tmp_path / "run"), "shard-000001.tar")
    _outcome("shard truncated after the manifest (train)", line)
    assert not (tmp_path / "c.zarr").exists() and not (tmp_path / "run").exists()


# ---- a cache, a split or settings that do not belong together ---------------------------------------------


def test_manifest_edited_after_the_cache_was_built(base, tmp_path):
    document = json.loads(base["manifest"].read_text())
    edited = tmp_path / "edited.json"
    document["shards"][0]["labels"][0] = (document["shards"][0]["labels"][0] + 1) % 5
    edited.write_text(json.dumps(document))
    for what, result in [
        ("cache-teacher", invoke(*cache_args({**base, "manifest": edited}, base["cache"], *BASE_CACHE))),
        ("train", _train(base, tmp_path / "run", manifest=edited)),
        ("cache verify", invoke("cache", "verify", base["cache"], "--manifest", edited)),
    ]:
        _outcome(f"manifest hand-edited ({what})", assert_clean_error(result, "edited.json", "edited after it was built"))

    # A manifest rebuilt from changed data: another fingerprint, refused by the cache built from the old one.
    shards = tmp_path / "shards"
    shutil.copytree(base["root"] / "shards", shards)
    write_tar(shards / "shard-000002.tar", GOOD)
    rebuilt = tmp_path / "rebuilt.json"
    assert invoke("manifest", str(shards / "*.tar"), "--out", rebuilt).exit_code == 0
    line = assert_clean_error(invoke(*cache_args({**base, "manifest": rebuilt}, base["cache"], *BASE_CACHE)),
                              "different manifest_fingerprint")
    _outcome("manifest rebuilt after the cache (cache-teacher)", line)
    assert invoke("split", "--manifest", rebuilt, "--percent", "25", "--out", tmp_path / "s.json").exit_code == 0
    line = assert_clean_error(_train(base, tmp_path / "run", manifest=rebuilt, split=tmp_path / "s.json"),
                              "built from another manifest")
    _outcome("manifest rebuilt after the cache (train)", line)
    line = assert_clean_error(invoke("cache", "verify", base["cache"], "--manifest", rebuilt), "failed verification")
    _outcome("manifest rebuilt after the cache (verify)", line)

    # Documented: paths alone may be edited (shards moved); the cache still belongs to the manifest.
    moved = tmp_path / "moved"
    shutil.copytree(base["root"] / "shards", moved)
    document = json.loads(base["manifest"].read_text())
    for entry in document["shards"]:
        entry["path"] = str(moved / entry["name"])
    (tmp_path / "moved.json").write_text(json.dumps(document))
    verify_ok(base["cache"], tmp_path / "moved.json")
    assert not (tmp_path / "run").exists()


def test_class_list_or_templates_changed(base, tmp_path):
    classes, templates = write_lists(tmp_path, classnames=["cat", "dog", "bird", "fish", "toad"],
                                     templates=["a photo of a {}.", "a drawing of the {}."])
    line = assert_clean_error(invoke(*cache_args({**base, "classes": classes}, base["cache"], *BASE_CACHE)),
                              "different classnames")
    _outcome("class list changed (cache-teacher rerun)", line)
    line = assert_clean_error(invoke(*cache_args({**base, "templates": templates}, base["cache"], *BASE_CACHE)),
                              "different templates")
    _outcome("templates changed (cache-teacher rerun)", line)
    line = assert_clean_error(_train(base, tmp_path / "run", "--classnames", classes), "another class list")
    _outcome("class list changed (train)", line)
    assert TeacherCache.open(base["cache"]).spec.classnames[-1] == "frog" and not (tmp_path / "run").exists()


def test_cache_from_another_teacher(base, tmp_path):
    args = cache_args(base, base["cache"], *BASE_CACHE)
    args[args.index("--teacher") + 1] = "dho-tiny-teacher"
    line = assert_clean_error(invoke(*args), "different teacher")
    _outcome("cache from another teacher (cache-teacher rerun)", line)
    verify_ok(base["cache"], base["manifest"])  # untouched


def test_split_from_another_manifest(base, tmp_path):
    other = labeled_dataset(tmp_path / "other", num_shards=1, per_shard=8, seed=9)
    assert invoke("split", "--manifest", other["manifest"], "--percent", "50", "--out", tmp_path / "s.json").exit_code == 0
    line = assert_clean_error(_train(base, tmp_path / "run", split=tmp_path / "s.json"), "drawn from a different manifest")
    _outcome("split from another manifest (train)", line)


def test_incomplete_cache(base, tmp_path):
    partial = tmp_path / "partial.zarr"
    shutil.copytree(base["cache"], partial)
    marker = partial / "shards" / "000001" / "zarr.json"
    meta = json.loads(marker.read_text())
    meta["attributes"]["complete"] = False
    marker.write_text(json.dumps(meta))
    line = assert_clean_error(_train({**base, "cache": partial}, tmp_path / "run"), "partial.zarr",
                              "missing 1 shard(s) (shard-000001.tar)", "rerun cache-teacher")
    _outcome("incomplete cache (train)", line)
    assert not (tmp_path / "run").exists()


def test_temperature_the_cache_cannot_serve(base, tmp_path):
    line = assert_clean_error(_train(base, tmp_path / "run", "--temperature", "4"), "T = 1, 2 only")
    _outcome("temperature the cache cannot serve (train)", line)
    assert not (tmp_path / "run").exists()


def test_summary_of_inputs_tried(request):
    """Runs last in this module: how many bad inputs met their documented outcome."""
    selected = [item for item in request.session.items if item.module is request.module]
    print(f"\nFAULTS bad inputs: {len(TRIED)} tried, all met their documented outcome")
    if len(selected) >= 27:  # the whole module ran (not a -k selection)
        assert len(TRIED) >= 41
    assert len(TRIED) == len(set(TRIED))
