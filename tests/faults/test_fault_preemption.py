"""Pre-emption: SIGTERM (what Slurm and Kubernetes send before killing a job) or SIGINT (Ctrl-C), sent to
a command and to its DataLoader workers alike, as a batch system or a terminal does.

- `train` finishes the step it is in, writes a checkpoint of exactly that step, prints one line and
  exits 75; `--resume` continues from that step and ends bit for bit where an uninterrupted run ends.
- `cache-teacher` stops after the batch it is in: the shards it finished are complete and whole, the
  one in progress is left incomplete (never marked complete); the rerun finishes the same cache.
- No DataLoader worker outlives its parent, even one killed by SIGKILL, and no lock is held by one.

Each command is parked (fault_runner "hold") at a known call, so the signal lands at a known step;
the test then opens the gate and times the stop.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
import time

import pytest
import torch
from fault_helpers import (  # noqa: F401  (one_torch_thread is an autouse fixture)
    REPO, RUNNER, cache_args, dump_records, finish, fired_lines, invoke, labeled_dataset, one_thread, one_torch_thread,
    rows_lost, run_faulted, trainable_dataset, verify_ok,
)
from helpers import BIN
from process_helpers import alive, descendants, signal_tree, start_held, wait_gone

from dho_pipeline.cache_store import TeacherCache, exclusive_writer
from dho_pipeline.stages import cache_tools

LOSSES = "dho_pipeline.stages.train:_losses"  # one call per step here, in the main process
TEACHER_CALL = "dho_pipeline.teacher:TeacherRunner.__call__"  # one call per image here
EPOCHS = 3  # 19 unlabeled // batch 4 = 4 steps per epoch: 12 steps; checkpoints at epoch ends (4, 8, 12)
EXIT_STOPPED = 75


@pytest.fixture(scope="module")
def trainable(tmp_path_factory):
    return trainable_dataset(tmp_path_factory.mktemp("preempt-train"), num_shards=3, per_shard=8,
                             cache_options=("--views", "2", "--topk", "3"))


def train_args(data, out, *extra):
    return ["train", "--cache", data["cache"], "--manifest", data["manifest"], "--split", data["split"], "--out", out,
            "--student", "dho-tiny-student", "--pretrained", "none", "--batch-size", "4", "--lr", "1e-3",
            "--workers", "2", "--log-every", "1", "--epochs", str(EPOCHS), *extra]


def logged_steps(run) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def checkpoint_steps(run) -> list[int]:
    return sorted(torch.load(d / "state.pt", weights_only=True)["step"] for d in (run / "checkpoints").glob("step-*"))


def weights(run) -> dict:
    return torch.load(run / "student.pt", weights_only=True)["model_state_dict"]


def _stop(process, gate, number: int) -> tuple[int, str, str, list[int]]:
    """Signal the parked process and its workers, let it go on; (exit code, output, how long from the
    gate to its stop line and to its exit, the workers it had)."""
    workers = signal_tree(process.pid, number)
    gate.touch()
    started, line_at = time.time(), None
    while process.poll() is None and time.time() < started + 120:
        process.output_file.seek(0)
        if line_at is None and " stopped by " in process.output_file.read():
            line_at = time.time() - started
        time.sleep(0.01)
    code, output = finish(process)
    line = "never" if line_at is None else f"{line_at:.2f}s"
    # A few seconds: the step, one checkpoint and the line (the exit adds the interpreter's teardown).
    assert code != EXIT_STOPPED or (line_at is not None and line_at < 10), f"stop line {line}:\n{output[-2000:]}"
    return code, output, f"stop line {line}, exit {time.time() - started:.1f}s after the step went on", workers


@pytest.mark.slow
def test_sigterm_stops_train_after_its_step_and_resume_continues_bit_for_bit(trainable, tmp_path):
    whole, run, fired, gate = tmp_path / "whole", tmp_path / "run", tmp_path / "fired.jsonl", tmp_path / "go"
    process = start_held(fired, gate, LOSSES, *train_args(trainable, run), nth=6)  # inside step 6 (no checkpoint due)
    code, output, seconds, workers = _stop(process, gate, signal.SIGTERM)
    last = output.rstrip().splitlines()[-1]
    assert code == EXIT_STOPPED, f"exit {code}, not a clean stop:\n{output[-2000:]}"
    assert re.fullmatch(rf"train stopped by SIGTERM after step 6: checkpoint {run}/checkpoints/step-00000006 written; "
                        r"continue with the same command and --resume", last), last
    assert "Traceback" not in output
    assert len(workers) >= 2 and wait_gone(workers, 1.0) == [], f"workers {alive(workers)} outlived train"
    assert checkpoint_steps(run) == [4, 6] and logged_steps(run) == [1, 2, 3, 4, 5, 6]
    assert not (run / "student.pt").exists()
    stopped = json.loads((run / "summary.json").read_text())  # the time spent before the stop is kept
    assert stopped["stopped"] and not stopped["finished"] and stopped["steps"] == 6 and stopped["wall_seconds"] > 0

    code, output = run_faulted(None, *train_args(trainable, run, "--resume"))
    assert code == 0, output[-2000:]
    assert logged_steps(run) == list(range(1, 13)), "the resumed run did not start at step 7"
    assert json.loads((run / "summary.json").read_text())["wall_seconds"] > stopped["wall_seconds"]  # added to
    code, output = run_faulted(None, *train_args(trainable, whole))
    assert code == 0, output[-2000:]
    reference, resumed = weights(whole), weights(run)
    assert all(torch.equal(reference[k], resumed[k]) for k in reference), "resumed weights differ from one run's"
    print(f"\nFAULTS SIGTERM to train --workers 2 (and its {len(workers)} workers) inside step 6: exit {EXIT_STOPPED} "
          f"({seconds}), checkpoint step 6, no worker left; --resume ran steps 7-12, "
          f"weights bit-for-bit those of an uninterrupted run")


@pytest.mark.slow
def test_sigint_stops_train_after_its_step(trainable, tmp_path):
    """Ctrl-C reaches the command and its workers: the same clean stop (the workers leave it to train)."""
    run, fired, gate = tmp_path / "run", tmp_path / "fired.jsonl", tmp_path / "go"
    process = start_held(fired, gate, LOSSES, *train_args(trainable, run), nth=3)
    code, output, seconds, workers = _stop(process, gate, signal.SIGINT)
    assert code == EXIT_STOPPED, f"exit {code}:\n{output[-2000:]}"
    assert "train stopped by SIGINT after step 3" in output.rstrip().splitlines()[-1], output[-1000:]
    assert checkpoint_steps(run) == [3] and wait_gone(workers, 1.0) == []
    code, output = run_faulted(None, *train_args(trainable, run, "--resume", "--max-steps", "5"))
    assert code == 0, output[-2000:]
    assert logged_steps(run) == [1, 2, 3, 4, 5]
    print(f"\nFAULTS SIGINT to train and its workers inside step 3: exit {EXIT_STOPPED} ({seconds}), "
          "checkpoint step 3; --resume continued at step 4")


@pytest.mark.slow
def test_sigkill_of_train_takes_its_workers_with_it(trainable, tmp_path):
    """A SIGKILL leaves no time to clean up: the workers must still die with train, at once (without
    the parent-death signal torch's own check notices only after 5-10 s)."""
    run, fired, gate = tmp_path / "run", tmp_path / "fired.jsonl", tmp_path / "go"
    process = start_held(fired, gate, LOSSES, *train_args(trainable, run), nth=3)
    workers = descendants(process.pid)
    assert len(workers) >= 2, workers
    process.kill()
    finish(process)
    from dho_pipeline.run_directory import locked

    with locked(run):  # at once, before the workers are gone: no worker holds the run directory
        pass
    left = wait_gone(workers, 1.0)
    assert left == [], f"{len(left)} DataLoader worker(s) outlived train by more than 1 s"


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_both_processes_after_the_same_step(trainable, tmp_path):
    """torchrun passes SIGTERM on to each process (and its workers); the processes vote each step (a
    gloo all-reduce posted as the step starts, read as it ends), so both stop after the same step, which
    one checkpoint holds; the relaunch continues from it on both. Both are parked inside step 3 when the
    signal comes: their votes for step 3 were already cast, so both stop after step 4."""
    run, fired, gate = tmp_path / "run", tmp_path / "fired.jsonl", tmp_path / "go"
    spec = {"fired": str(fired), "faults": [{"kind": "call", "target": LOSSES, "nth": 3, "action": "hold",
                                              "until": str(gate)}]}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    args = [str(a) for a in train_args(trainable, run, "--workers", "1")]
    with tempfile.TemporaryFile("w+") as output:
        launcher = subprocess.Popen([str(BIN / "torchrun"), "--nproc_per_node", "2", str(RUNNER), json.dumps(spec), *args],
                                    stdout=output, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 300
        while len(fired_lines(fired)) < 2 and launcher.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert len(fired_lines(fired)) == 2, "the two processes never reached step 3"
        launcher.send_signal(signal.SIGTERM)
        while output.seek(0) == 0 and output.read().count("closing signal SIGTERM") < 2 and time.time() < deadline:
            time.sleep(0.02)  # torchrun logs each process's signal just before it sends it
        output.seek(0)
        assert output.read().count("closing signal SIGTERM") == 2, "torchrun did not pass SIGTERM to both processes"
        time.sleep(1.0)  # the processes are parked: time for both signals to land costs nothing
        gate.touch()
        try:
            launcher.wait(timeout=120)
        except subprocess.TimeoutExpired:
            signal_tree(launcher.pid, signal.SIGKILL)  # the launcher and its ranks: none left running
            raise
        output.seek(0)
        text = output.read()
    assert f"train stopped by SIGTERM after step 4: checkpoint {run}/checkpoints/step-00000004 written" in text, text[-3000:]
    ranks = [json.loads(line) for line in (run / "ranks.jsonl").read_text().splitlines()]
    assert sorted(r["rank"] for r in ranks) == [0, 1] and {r["steps"] for r in ranks} == {4}, ranks
    assert ranks[0]["positions"] == ranks[1]["positions"] and all(r["stopped"] == "SIGTERM" for r in ranks), ranks
    assert checkpoint_steps(run) == [4] and logged_steps(run) == [1, 2, 3, 4]

    relaunch = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--no-python", str(BIN / "dho-pipeline"),
                               *args, "--resume", "--max-steps", "6"], capture_output=True, text=True, env=env,
                              timeout=300)
    assert relaunch.returncode == 0, relaunch.stdout[-2000:] + relaunch.stderr[-2000:]
    assert logged_steps(run) == [1, 2, 3, 4, 5, 6]
    print(f"\nFAULTS SIGTERM to torchrun (2 processes) inside step 3: both stopped after step 4 (exit "
          f"{launcher.returncode} from torchrun), checkpoint step 4; the relaunch continued at step 5 on both")


# ---- cache-teacher --------------------------------------------------------------------------------

SHARDS, PER_SHARD = 6, 5
CACHE_EXTRA = ("--views", "2", "--batch-size", "2", "--workers", "2")  # one image per teacher call


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt-cache")
    data = labeled_dataset(root, num_shards=SHARDS, per_shard=PER_SHARD)
    with one_thread():
        result = invoke(*cache_args(data, root / "clean.zarr", "--views", "2", "--batch-size", "2"))
    assert result.exit_code == 0, result.output
    return {**data, "reference": dump_records(root / "clean.zarr")}


def _args(data, out):
    return cache_args(data, out, *CACHE_EXTRA)  # --workers 2 after cache_args' --workers 0: the last one counts


@pytest.mark.slow
def test_sigterm_stops_cache_teacher_cleanly_then_the_rerun_finishes_it(shards, tmp_path):
    out, fired, gate = tmp_path / "c.zarr", tmp_path / "fired.jsonl", tmp_path / "go"
    # Two workers take shards 0, 2, 4 and 1, 3, 5 and their images alternate: call 12 lies in shards 2 and 3.
    process = start_held(fired, gate, TEACHER_CALL, *_args(shards, out), nth=12)
    code, output, seconds, workers = _stop(process, gate, signal.SIGTERM)
    last = output.rstrip().splitlines()[-1]
    assert code == EXIT_STOPPED, f"exit {code}:\n{output[-2000:]}"
    assert re.fullmatch(r"cache-teacher stopped by SIGTERM: \d shard\(s\) written whole in this run, \d left to do; "
                        r"rerun the same command to resume", last), last
    assert len(workers) >= 2 and wait_gone(workers, 1.0) == [], f"workers {alive(workers)} outlived cache-teacher"
    incomplete = TeacherCache.open(out).incomplete_shards()
    assert 0 < len(incomplete) < SHARDS, incomplete
    assert [p for p in cache_tools.verify(out, shards["manifest"]) if "not complete" not in p] == []
    result = invoke(*_args(shards, out))  # at once: no orphan holds the lock
    assert result.exit_code == 0, result.output
    verify_ok(out, shards["manifest"])
    assert rows_lost(shards["reference"], dump_records(out)) == []
    print(f"\nFAULTS SIGTERM to cache-teacher --workers 2 (and its workers) in its third and fourth shards: exit {EXIT_STOPPED} "
          f"({seconds.replace('step', 'batch')}), {SHARDS - len(incomplete)} shard(s) complete and whole, "
          f"{len(incomplete)} left incomplete; rerun at once: the same cache, rows lost 0")


@pytest.mark.slow
def test_sigkill_of_cache_teacher_leaves_no_worker_holding_its_lock(shards, tmp_path):
    """The cache's lock is a flock; a forked worker used to inherit it and, orphaned, kept the cache
    locked for 5-10 s after its parent was killed, so an immediate rerun was refused naming a dead pid."""
    out, fired, gate = tmp_path / "c.zarr", tmp_path / "fired.jsonl", tmp_path / "go"
    process = start_held(fired, gate, TEACHER_CALL, *_args(shards, out), nth=3)
    workers = descendants(process.pid)
    assert len(workers) >= 2, workers
    process.kill()
    finish(process)
    with exclusive_writer(out):  # at once
        pass
    assert wait_gone(workers, 1.0) == [], "DataLoader workers outlived cache-teacher by more than 1 s"
    result = invoke(*_args(shards, out))
    assert result.exit_code == 0, result.output
    assert rows_lost(shards["reference"], dump_records(out)) == []


def test_a_forked_child_never_holds_the_lock_of_its_parent(tmp_path):
    """The mechanism alone, without the parent-death signal: a child forked while the cache's lock is
    held (as DataLoader workers are) lets go of it, so once the holder releases it, it is free even
    though the child lives on."""
    import multiprocessing

    cache = tmp_path / "c.zarr"
    cache.mkdir()  # a cache being written: its lock file stays (one of a start that wrote nothing is removed)
    context = multiprocessing.get_context("fork")
    running = context.Event()
    with exclusive_writer(cache):
        child = context.Process(target=_run_then_sleep, args=(running,), daemon=True)
        child.start()
        assert running.wait(60)  # the child runs (a fork's copy of the descriptors exists until it does)
    try:
        with exclusive_writer(cache):  # refused ("being written by pid ...") if the child still held it
            pass
    finally:
        child.kill()
        child.join()


def _run_then_sleep(running) -> None:
    running.set()
    time.sleep(60)
