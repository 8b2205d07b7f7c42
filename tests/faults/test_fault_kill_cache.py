"""cache-teacher under SIGKILL and under a second writer: a rerun always finishes the same cache.

Kills are real SIGKILLs, and each one proves that it interrupted work: the process died of SIGKILL
(exit -9) with shards still to do before it and still to do after it (or, for the kill inside the run's
final status write, with that status not written). Most kills come from inside the process
(fault_runner.py): inside a Zarr chunk write, a shard's completion marker, the teacher's forward of
batch n, the decoding of image n; each leaves a marker line naming the write or the call, which the test
checks. The others are sent by the test once it has seen more shards completed (the timings file), never
after a bare wall-clock delay, which could land before any shard work began or after all of it was done.
"""

from __future__ import annotations

import json
import random
import re
import signal
import time

import pytest
from fault_helpers import (  # noqa: F401  (one_torch_thread is an autouse fixture)
    cache_args, dump_records, finish, fired_lines, invoke, kill_when, labeled_dataset, line_count, manifest_keys,
    one_thread, one_torch_thread, popen, rows_lost, run_faulted, run_to_fault, verify_ok,
)

from dho_pipeline.cache_store import TeacherCache
from dho_pipeline.stages import cache_tools

EXTRA = ("--views", "2", "--batch-size", "2")  # one image per teacher batch: many moments to be killed at
SHARDS, PER_SHARD = 12, 5
TEACHER_CALL = "dho_pipeline.teacher:TeacherRunner.__call__"  # one call per image here
DECODE = "dho_pipeline.teacher_data:decode_rgb"  # one call per image (--workers 0: in the main process)
SHARD_PATH = re.compile(r"/shards/(\d{6})/")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Twelve small shards and the cache an uninterrupted run builds from them."""
    root = tmp_path_factory.mktemp("kill-cache")
    data = labeled_dataset(root, num_shards=SHARDS, per_shard=PER_SHARD)
    with one_thread():
        result = invoke(*cache_args(data, root / "clean.zarr", *EXTRA))
    assert result.exit_code == 0, result.output
    return {**data, "clean": root / "clean.zarr", "reference": dump_records(root / "clean.zarr")}


def _shards_to_do(cache) -> list[int]:
    if not (cache / "zarr.json").exists():
        return list(range(SHARDS))  # killed before the cache was created
    return TeacherCache.open(cache).incomplete_shards()


def _complete_shards_are_whole(cache, manifest) -> list[str]:
    """After a kill: every shard the cache calls complete verifies; the others are only 'not complete'."""
    if not (cache / "zarr.json").exists():
        return []
    return [p for p in cache_tools.verify(cache, manifest) if "not complete" not in p]


def _call(target: str, low: int, high: int):
    """A kill as the nth call of `target` begins, n drawn from [low, high]: a random moment mid-work."""
    return lambda rng: ({"kind": "call", "target": target, "nth": rng.randint(low, high)},
                        rf"^call \d+ of {re.escape(target)}$")


def _put(match: str, when: str, contains: str = "", nth: int = 1, expect: str = ""):
    return lambda rng: ({"kind": "zarr_put", "match": match, "when": when, "contains": contains, "nth": nth},
                        expect or rf"^{when} .*{match}")


# Kill moments, in this order. "where" groups them for the printed figures. "fault": fired from inside the
# process (its marker detail must match); "shards": SIGKILL sent by the test once that many more shards are
# complete (lines in the timings file), plus 0-10 ms. Runs 1-9 complete at most 10 of the 12 shards (a
# `call` kill lands in the run's second shard at the latest, a progress kill seldom sees more than 2
# shards finish, a Zarr kill lands in the run's first or second shard), so the status kill still finds
# shard work to do.
_PLAN = [
    {"name": "before teacher batch n", "where": "in the teacher loop", "fault": _call(TEACHER_CALL, 2, 9)},
    {"name": "inside a Zarr chunk write (topk_logit, half written)", "where": "inside a Zarr write",
     "fault": _put(r"/shards/\d{6}/topk_logit/c/", "partial")},
    {"name": "after 1 more complete shard + 0-10 ms", "where": "sent by the test after observed progress",
     "shards": 1},
    {"name": "inside a shard's completion marker write (half written)", "where": "inside a Zarr write",
     "fault": _put(r"/shards/\d{6}/zarr\.json$", "partial", contains='"complete": true')},
    {"name": "while decoding image n", "where": "in the teacher loop", "fault": _call(DECODE, 2, 9)},
    {"name": "before the second shard's key array write", "where": "inside a Zarr write",
     "fault": _put(r"/shards/\d{6}/key/c/", "before", nth=2)},
    {"name": "after 1 more complete shard + 0-10 ms", "where": "sent by the test after observed progress",
     "shards": 1},
    {"name": "with a shard's arrays written, before its completion marker", "where": "inside a Zarr write",
     "fault": _put(r"/shards/\d{6}/zarr\.json$", "before", contains='"complete": true')},
    {"name": "before teacher batch n", "where": "in the teacher loop", "fault": _call(TEACHER_CALL, 2, 9)},
    {"name": "inside the run's final status write (root zarr.json, half written)",
     "where": "inside the final status write",
     "fault": _put(r"k\.zarr/zarr\.json$", "partial", contains='"status"')},
]


@pytest.mark.slow
def test_ten_kills_each_interrupting_work_then_the_same_cache(shards, tmp_path):
    rng = random.Random(6)
    out = tmp_path / "k.zarr"
    args = cache_args(shards, out, *EXTRA)
    timings = tmp_path / "k.zarr.timings.jsonl"
    fired = tmp_path / "fired.jsonl"
    proven = []

    for number, moment in enumerate(_PLAN, start=1):
        before = _shards_to_do(out)
        assert before, f"kill {number} ({moment['name']}): no shard work left to interrupt"
        if "fault" in moment:
            fault, expect = moment["fault"](rng)
            detail = run_to_fault(fired, fault, *args, expect=expect)  # died of SIGKILL exactly there
        else:
            lines, delay = line_count(timings), rng.uniform(0.0, 0.01)
            code, output = kill_when(popen(None, *args), lambda: line_count(timings) >= lines + moment["shards"],
                                     delay=delay)
            assert code == -signal.SIGKILL, \
                f"kill {number} ({moment['name']}) did not land: exit {code}\n{output[-2000:]}"
            detail = f"{line_count(timings) - lines} shard(s) written, then {delay * 1000:.0f} ms"
        after = _shards_to_do(out)
        status = TeacherCache.open(out).attrs.get("status") if (out / "zarr.json").exists() else None
        # The proof that the kill interrupted work: work was left, not all of it done.
        if moment["where"] == "inside the final status write":
            assert after == [] and status is None, (moment["name"], after, status)
        else:
            assert after, f"kill {number} ({moment['name']}) left no work undone: {detail}"
        named = SHARD_PATH.search(detail)
        if named:  # the shard whose write was interrupted is not complete
            assert int(named.group(1)) in after, (moment["name"], detail, after)
        assert _complete_shards_are_whole(out, shards["manifest"]) == [], moment["name"]
        detail = detail.replace(f"{tmp_path}/", "")
        proven.append({"where": moment["where"],
                       "line": f"{moment['name']} [{detail}] ({len(before)} -> {len(after)} shards to do)"})

    result = invoke(*args)  # the rerun after the last kill, in-process
    assert result.exit_code == 0, result.output
    verify_ok(out, shards["manifest"])
    final = dump_records(out)
    lost = rows_lost(shards["reference"], final)
    status = TeacherCache.open(out).attrs["status"]
    for line in timings.read_text().splitlines():  # appended by runs that were then killed: never torn
        assert json.loads(line)["shard"].startswith("shard-"), line
    kinds = {}
    for kill in proven:
        kinds[kill["where"]] = kinds.get(kill["where"], 0) + 1
    print(f"\nFAULTS cache-teacher: {len(proven)} kills, each proven to interrupt work: "
          + ", ".join(f"{n} {where}" for where, n in kinds.items()) + f"; rows {len(final)}, rows lost {len(lost)}")
    for kill in proven:
        print(f"  killed {kill['line']}")
    assert len(proven) == len(_PLAN) == 10
    assert lost == [] and len(final) == len(manifest_keys(shards["manifest"])) == SHARDS * PER_SHARD
    assert status["complete"] is True and status["incomplete_shards"] == []


@pytest.mark.slow
def test_kill_while_the_cache_is_created_then_rerun(shards, tmp_path):
    out = tmp_path / "k.zarr"
    args = cache_args(shards, out, *EXTRA)
    creation = {"kind": "zarr_put", "match": r"k\.zarr/zarr\.json$", "when": "partial"}
    detail = run_to_fault(tmp_path / "fired.jsonl", creation, *args, expect=r"^partial .*/k\.zarr/zarr\.json$")
    assert not (out / "zarr.json").exists(), detail  # the cache was never created: all the work is left
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    verify_ok(out, shards["manifest"])
    assert rows_lost(shards["reference"], dump_records(out)) == []


@pytest.mark.slow
def test_a_second_writer_is_refused_while_the_first_holds_the_lock(shards, tmp_path):
    """The first writer is parked (fault_runner "hold") at its first shard write, the lock held; a second
    writer on the same cache must be refused, naming the holder's pid; the first then finishes a cache
    equal to a one-writer run. Without the lock the second writer exits 0 and this test fails."""
    out = tmp_path / "k.zarr"
    args = cache_args(shards, out, *EXTRA)
    fired, gate = tmp_path / "fired.jsonl", tmp_path / "go"
    first = popen({"fired": str(fired), "faults": [
        {"kind": "zarr_put", "match": r"/shards/\d{6}/", "action": "hold", "until": str(gate)}]}, *args)
    deadline = time.time() + 120
    while not fired_lines(fired):
        assert first.poll() is None, f"the first writer ended before its first shard write:\n{finish(first)[1][-2000:]}"
        assert time.time() < deadline, "the first writer never reached its first shard write"
        time.sleep(0.02)
    code, output = run_faulted(None, *args)  # the second writer, while the first holds the lock
    gate.touch()
    first_code, first_output = finish(first)
    assert code == 1, f"the second writer was not refused (exit {code}):\n{output[-2000:]}"
    assert first_code == 0, first_output[-2000:]
    refusal = output.rstrip().splitlines()[-1]
    assert refusal.startswith("Error: ") and f"is being written by pid {first.pid} " in refusal, refusal
    verify_ok(out, shards["manifest"])
    lost = rows_lost(shards["reference"], dump_records(out))
    assert lost == [] and TeacherCache.open(out).attrs["status"]["complete"] is True
    third = invoke(*args)  # a third run afterwards: the lock went with its holder; nothing to do, still whole
    assert third.exit_code == 0 and f"complete; {SHARDS * PER_SHARD} samples" in third.output, third.output
    verify_ok(out, shards["manifest"])
    print(f"\nFAULTS two writers: second refused while the first held the lock: "
          f"{refusal.replace(f'{tmp_path}/', '')}; rows lost {len(lost)}")
