"""Hostile sample keys and member names (`../`, absolute paths, control characters) are data, never
file paths: nothing is created outside the output folders, and the keys come back exactly as stored."""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import torch
import zarr
from fault_helpers import (  # noqa: F401  (one_torch_thread is an autouse fixture)
    REPO, cache_args, dump_records, invoke, jpeg, label, one_torch_thread, verify_ok, write_lists, write_tar,
)

TOKEN = "evil" + uuid.uuid4().hex[:10]
HOSTILE = [
    f"../{TOKEN}-up", f"../../../../../../tmp/{TOKEN}-deep", f"/tmp/{TOKEN}-abs", f"sub/../../{TOKEN}-mid",
    f"./{TOKEN}-dot", f"~/{TOKEN}-home", f"ctl\x07{TOKEN}-bell", f"nl\n{TOKEN}-newline", f"esc\x1b[2J{TOKEN}-ansi",
    f"{TOKEN}-back\\slash\\x", f"$HOME/{TOKEN}-var", f"{TOKEN}-sp ace ",
]


def _stray_files() -> list[str]:
    """Files named with TOKEN anywhere a path-joining bug could have put them."""
    places = {Path("/tmp"), Path.home(), Path.cwd(), REPO, REPO / "tests", Path("/")}
    found = [str(p) for place in places if place.is_dir() for p in place.iterdir() if TOKEN in p.name]
    return found


def test_hostile_keys_are_stored_as_data(tmp_path):
    work = tmp_path / "work"
    members = []
    for i, name in enumerate(HOSTILE):
        members += [(f"{name}.jpg", jpeg(i) if "bell" not in name else b"not an image"), (f"{name}.cls", label(i % 5))]
    shard = write_tar(work / "shards" / "h-000000.tar", members)
    classes, templates = write_lists(work)
    data = {"manifest": work / "m.json", "classes": classes, "templates": templates}
    outside_before = sorted(os.listdir(tmp_path))
    cwd = os.getcwd()
    os.chdir(work / "shards")  # a relative "../" would land in `work`, where we look for it
    try:
        steps = [
            ("manifest", invoke("manifest", shard, "--out", data["manifest"])),
            ("cache-teacher", invoke(*cache_args(data, work / "c.zarr", "--views", "2", "--on-error", "skip"))),
            ("cache info", invoke("cache", "info", work / "c.zarr", "--json")),
            ("split", invoke("split", "--manifest", data["manifest"], "--percent", "50", "--out", work / "s.json")),
            ("train", invoke("train", "--cache", work / "c.zarr", "--manifest", data["manifest"], "--split",
                             work / "s.json", "--out", work / "run", "--student", "dho-tiny-student", "--pretrained",
                             "none", "--batch-size", "2", "--workers", "0", "--max-steps", "1")),
        ]
    finally:
        os.chdir(cwd)
    for name, result in steps:
        assert result.exit_code == 0, (name, result.output)

    keys = [r["key"] for r in dump_records(work / "c.zarr")]
    assert keys == HOSTILE  # exactly as stored in the tar, in tar order
    assert json.loads(data["manifest"].read_text())["shards"][0]["keys"] == HOSTILE
    stored = zarr.open_group(str(work / "c.zarr"), mode="r")["shards/000000/key"][:]
    assert list(stored) == HOSTILE
    missing = json.loads(steps[2][1].stdout)["missing"]
    assert [m["key"] for m in missing] == [HOSTILE[6]]  # the undecodable one, recorded by its key
    labeled = torch.load(work / "run" / "student.pt", weights_only=True)["dho_pipeline"]["labeled_keys"]
    assert set(labeled) <= set(HOSTILE)
    verify_ok(work / "c.zarr", data["manifest"])

    created = sorted(p.relative_to(work).as_posix() for p in work.rglob("*") if TOKEN in p.name)
    assert created == [], created
    assert sorted(os.listdir(tmp_path)) == outside_before
    assert _stray_files() == []
    # Every path written lies in the output folders the commands were given.
    top = {p.relative_to(work).parts[0] for p in work.rglob("*")}
    assert top <= {"shards", "classes.txt", "templates.txt", "m.json", "c.zarr", "c.zarr.lock",
                   "c.zarr.timings.jsonl", "s.json", "run"}, top
    print(f"\nFAULTS hostile keys: {len(HOSTILE)} keys with ../, absolute paths or control characters stored as data; "
          f"0 files outside the output folders")


def test_cache_info_does_not_print_control_characters(tmp_path):
    members = [("a.jpg", jpeg(1)), ("a.cls", label(1)), ("x\x1b[2J\x07.jpg", b"junk"), ("x\x1b[2J\x07.cls", label(0))]
    shard = write_tar(tmp_path / "h-000000.tar", members)
    classes, templates = write_lists(tmp_path)
    data = {"manifest": tmp_path / "m.json", "classes": classes, "templates": templates}
    assert invoke("manifest", shard, "--out", data["manifest"]).exit_code == 0
    assert invoke(*cache_args(data, tmp_path / "c.zarr", "--on-error", "skip")).exit_code == 0
    text = invoke("cache", "info", tmp_path / "c.zarr").output
    assert "missing" in text
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", text), repr(text)


def test_shard_command_sanitises_file_names(tmp_path):
    """`shard` builds keys from file names: they come out as plain [A-Za-z0-9_-] keys."""
    folder = tmp_path / "classes"
    names = ["nl\nname.jpg", "ctl\x07x.png", "..dots...jpg", " space d.jpg", "ünï.jpeg"]
    for index, name in enumerate(names):
        (folder / "c\x1b0").mkdir(parents=True, exist_ok=True)
        (folder / "c\x1b0" / name).write_bytes(jpeg(index))
    result = invoke("shard", folder, "--out", str(tmp_path / "out" / "s-%06d.tar"))
    assert result.exit_code == 0, result.output
    result = invoke("manifest", str(tmp_path / "out" / "*.tar"), "--out", tmp_path / "m.json")
    assert result.exit_code == 0, result.output
    keys = json.loads((tmp_path / "m.json").read_text())["shards"][0]["keys"]
    assert len(keys) == len(names) and all(re.fullmatch(r"[A-Za-z0-9_-]+", k) for k in keys), keys
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes", "m.json", "out"]
