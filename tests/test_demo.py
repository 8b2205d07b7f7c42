"""The demo runs end to end offline (stage one so far)."""

from __future__ import annotations

import json

from conftest import cli


def test_demo_builds_a_complete_teacher_cache(tmp_path):
    out = tmp_path / "demo"
    results = json.loads(cli("demo", "--out", out, "--json").stdout)
    assert results["cache"]["complete"] and results["cache"]["num_samples"] == 800
    report = json.loads(cli("cache", "info", out / "teacher.zarr", "--json").stdout)
    assert report["views"]["num_views"] == 4 and report["num_classes"] == 10
    cli("cache", "verify", out / "teacher.zarr", "--manifest", out / "train.json")
    # Rerunning resumes: the shards are byte-identical, so the same cache is reused.
    again = json.loads(cli("demo", "--out", out, "--json").stdout)
    assert again["cache"]["complete"]
