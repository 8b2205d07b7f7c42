"""cache-teacher under SIGKILL and under a second writer: a rerun always finishes the same cache.

Kills are real: the process is sent SIGKILL, from the test (random delays, polling the timings file)
or by itself from inside zarr's writes (fault_runner.py), so that a kill lands deterministically
during a Zarr chunk write, during a shard's completion marker, and during the run's metadata
finalisation (the root `status` attribute).
"""

from __future__ import annotations

import json
import random
import re

import pytest
from fault_helpers import (  # noqa: F401  (one_torch_thread is an autouse fixture)
    cache_args, dump_records, invoke, kill_when, line_count, manifest_keys, one_thread, one_torch_thread, popen,
    rows_lost, run_faulted, labeled_dataset, verify_ok,
)

from dho_pipeline.cache_store import TeacherCache
from dho_pipeline.stages import cache_tools

EXTRA = ("--views", "2", "--batch-size", "2")  # one image per teacher batch: many moments to be killed at
KILLS = 10


@pytest.fixture(scope="module")
def ten_shards(tmp_path_factory):
    """Ten small shards and the cache an uninterrupted run builds from them."""
    root = tmp_path_factory.mktemp("kill-cache")
    data = labeled_dataset(root, num_shards=10, per_shard=6)
    with one_thread():
        result = invoke(*cache_args(data, root / "clean.zarr", *EXTRA))
    assert result.exit_code == 0, result.output
    return {**data, "clean": root / "clean.zarr", "reference": dump_records(root / "clean.zarr")}


def _complete_shards_are_whole(cache, manifest) -> list[str]:
    """After a kill: every shard the cache calls complete verifies; the others are only 'not complete'."""
    if not (cache / "zarr.json").exists():
        return []  # killed before the cache was created
    problems = cache_tools.verify(cache, manifest)
    return [p for p in problems if "not complete" not in p]


# Kill moments, in order. "needs": shards that must still be to do for the moment to come in that run.
# "start": SIGKILL a random time after the start (imports, lock, teacher load, first shards); "timings":
# after a random number of further shards are written (polling the timings file), plus a random delay;
# "fault": the process kills itself from inside zarr's writes (fault_runner.py).
_PLAN = [
    {"name": "random delay after start", "start": (0.2, 2.0)},
    {"name": "inside a Zarr chunk write (topk_logit, half written)", "needs": 1,
     "fault": {"kind": "zarr_put", "match": r"/shards/\d+/topk_logit/c/", "when": "partial"}},
    {"name": "after a random number of shards", "needs": 2, "timings": True},
    {"name": "inside a shard's completion marker write", "needs": 1,
     "fault": {"kind": "zarr_put", "match": r"/shards/\d+/zarr\.json$", "contains": '"complete": true',
               "when": "partial"}},
    {"name": "random delay after start", "start": (0.2, 2.0)},
    {"name": "before the second shard's key array write", "needs": 2,
     "fault": {"kind": "zarr_put", "match": r"/shards/\d+/key/c/", "when": "before", "nth": 2}},
    {"name": "after a random number of shards", "needs": 2, "timings": True},
    {"name": "random delay after start", "start": (1.5, 3.5)},
    {"name": "inside metadata finalisation (root status, half written)",
     "fault": {"kind": "zarr_put", "match": r"k\.zarr/zarr\.json$", "contains": '"status"', "when": "partial"}},
    {"name": "right after metadata finalisation",
     "fault": {"kind": "zarr_put", "match": r"k\.zarr/zarr\.json$", "contains": '"status"', "when": "after"}},
]
_FALLBACK = _PLAN[8]  # when a planned moment needs shards that are already done


@pytest.mark.slow
def test_ten_kills_then_the_same_cache(ten_shards, tmp_path):
    rng = random.Random(6)
    out = tmp_path / "k.zarr"
    args = cache_args(ten_shards, out, *EXTRA)
    timings = tmp_path / "k.zarr.timings.jsonl"
    fired = tmp_path / "fired.jsonl"
    survived, moments, attempts, shrink = 0, [], 0, 1.0

    def to_do() -> int:
        if not (out / "zarr.json").exists():
            return 10
        return len(TeacherCache.open(out).incomplete_shards())

    while survived < KILLS:
        attempts += 1
        assert attempts <= KILLS + 6, f"only {survived} kills landed in {attempts - 1} runs: {moments}"
        moment, left = _PLAN[survived], to_do()
        if left < moment.get("needs", 0):
            moment = _FALLBACK
        if "fault" in moment:
            code, output = run_faulted({"fired": str(fired), "faults": [moment["fault"]]}, *args)
            killed = code == -9
            assert killed or code == 0, output
            detail = ""
        elif "timings" in moment:
            shards = rng.randint(1, max(1, min(2, left - 1)))
            delay = rng.uniform(0.0, 0.05)
            lines = line_count(timings)
            process = popen(None, *args)
            killed = kill_when(process, lambda: line_count(timings) >= lines + shards, delay=delay)
            detail = f", {shards} shard(s) + {delay:.3f}s"
        else:
            delay = rng.uniform(*moment["start"]) * shrink
            killed = kill_when(popen(None, *args), lambda: True, delay=delay)
            detail = f", {delay:.2f}s"
        if not killed:
            shrink /= 2  # it finished before the moment came: try again, sooner
            continue
        survived += 1
        moments.append(f"{moment['name']}{detail} ({left} -> {to_do()} shards to do)")
        assert _complete_shards_are_whole(out, ten_shards["manifest"]) == [], moments[-1]

    result = invoke(*args)  # the rerun after the last kill, in-process
    assert result.exit_code == 0, result.output
    verify_ok(out, ten_shards["manifest"])
    final = dump_records(out)
    lost = rows_lost(ten_shards["reference"], final)
    status = TeacherCache.open(out).attrs["status"]
    for line in timings.read_text().splitlines():  # appended by runs that were then killed: never torn
        assert json.loads(line)["shard"].startswith("shard-"), line
    fired_kinds = fired.read_text() if fired.exists() else ""
    print(f"\nFAULTS cache-teacher: kills survived {survived} (in {attempts} runs), rows {len(final)}, "
          f"rows lost {len(lost)}")
    for line in moments:
        print(f"  killed {line}")
    assert survived == KILLS and lost == [] and len(final) == len(manifest_keys(ten_shards["manifest"])) == 60
    assert status["complete"] is True and status["incomplete_shards"] == []
    # The deterministic moments did land where they were aimed.
    assert re.search(r"partial .*/topk_logit/c/", fired_kinds) and re.search(r"partial .*k\.zarr/zarr\.json", fired_kinds)


def test_kill_while_the_cache_is_created_then_rerun(ten_shards, tmp_path):
    out = tmp_path / "k.zarr"
    args = cache_args(ten_shards, out, *EXTRA)
    code, output = run_faulted(
        {"faults": [{"kind": "zarr_put", "match": r"k\.zarr/zarr\.json$", "when": "partial"}]}, *args)
    assert code == -9, output
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    verify_ok(out, ten_shards["manifest"])
    assert rows_lost(ten_shards["reference"], dump_records(out)) == []


@pytest.mark.slow
def test_two_writers_at_once(ten_shards, tmp_path):
    out = tmp_path / "k.zarr"
    args = cache_args(ten_shards, out, *EXTRA)
    first, second = popen(None, *args), popen(None, *args)
    outputs = [p.communicate(timeout=120)[0] for p in (first, second)]
    codes = [first.returncode, second.returncode]
    if codes == [0, 0]:
        outcome = "both finished"
    else:
        assert sorted(codes) == [0, 1], (codes, outputs)
        refusal = outputs[codes.index(1)].rstrip().splitlines()[-1]
        assert refusal.startswith("Error: ") and "is being written by pid" in refusal, refusal
        outcome = "second refused: " + refusal
    verify_ok(out, ten_shards["manifest"])
    lost = rows_lost(ten_shards["reference"], dump_records(out))
    assert lost == []
    third = invoke(*args)  # and a third run afterwards: nothing to do, still whole
    assert third.exit_code == 0 and "complete; 60 samples" in third.output, third.output
    verify_ok(out, ten_shards["manifest"])
    print(f"\nFAULTS two writers: {outcome}; rows lost {len(lost)}")
