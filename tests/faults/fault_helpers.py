"""Helpers shared by the fault-injection suite (tests/faults/test_fault_*.py).

Imported by the test modules as `fault_helpers` (pytest puts tests/faults on sys.path); the generic
helpers (generated shards, class lists, the in-process CLI) come from tests/helpers.py.

Faults that need a real process death run `dho-pipeline` in a subprocess under `fault_runner.py`,
which arms one fault (a SIGKILL of its own process at a chosen point, inside zarr's or torch's
writes or at the nth call of a function) and then runs the ordinary command line. The fault writes a
marker line at its injection point; `run_to_fault` checks that line and the exit code, so a planned
fault that did not fire, or fired elsewhere, fails the test.
"""

from __future__ import annotations

from contextlib import contextmanager

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import (
    CLASSNAMES, TINY_TEACHER, cache_args, cached_dataset, cli, image_bytes, labeled_dataset, random_image, write_lists,
    write_shards,
)

from dho_pipeline.stages.cli import main as cli_main

RUNNER = Path(__file__).with_name("fault_runner.py")
REPO = Path(__file__).resolve().parents[2]
# Re-exported for the test modules: the generic helpers of tests/helpers.py.
__all__ = ["CLASSNAMES", "TINY_TEACHER", "cache_args", "cli", "labeled_dataset", "write_lists", "write_shards"]


# ---- running commands ------------------------------------------------------------------------------


def invoke(*args):
    """Run the CLI in-process, catching everything, so a test can tell a clean error from a crash."""
    return CliRunner().invoke(cli_main, [str(a) for a in args], catch_exceptions=True)


def assert_clean_error(result, *needles: str) -> str:
    """A user-fault outcome: non-zero exit through click's error path, one `Error: ...` line, no traceback.

    Returns the error line.
    """
    assert result.exit_code != 0, f"expected a refusal, got exit 0:\n{result.output}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        trace = "".join(traceback.format_exception(result.exception))
        raise AssertionError(f"uncaught {type(result.exception).__name__} (a traceback for the user):\n{trace[-3000:]}")
    lines = result.output.rstrip("\n").splitlines()
    assert lines and lines[-1].startswith("Error: "), f"the error is not one 'Error: ...' line:\n{result.output}"
    assert "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[-1], f"{needle!r} not in the error line {lines[-1]!r}"
    return lines[-1]


def fault_command(spec: dict | None, *args) -> list[str]:
    """argv that runs `dho-pipeline ARGS` with one fault armed (see fault_runner.py)."""
    return [sys.executable, str(RUNNER), json.dumps(spec or {}), *[str(a) for a in args]]


def popen(spec: dict | None, *args, cwd=None) -> subprocess.Popen:
    """Start `dho-pipeline ARGS` (faults armed by `spec`) on one torch thread; its output goes to a
    temporary file (a pipe nobody reads while the test polls could fill up and stall the process)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    output = tempfile.TemporaryFile("w+", encoding="utf-8")
    process = subprocess.Popen(fault_command(spec, *args), stdout=output, stderr=subprocess.STDOUT, text=True,
                               env=env, cwd=cwd)
    process.output_file = output
    return process


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    """Wait for the process (killing it after `timeout` s, which fails the test); (returncode, output)."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"command did not finish in {timeout}s:\n{_output(process)[-3000:]}") from None
    return process.returncode, _output(process)


def _output(process: subprocess.Popen) -> str:
    process.output_file.seek(0)
    return process.output_file.read()


def run_faulted(spec: dict | None, *args, timeout: float = 120, cwd=None) -> tuple[int, str]:
    """Run to the end (or to the armed kill); returns (returncode, output)."""
    return finish(popen(spec, *args, cwd=cwd), timeout)


def fired_lines(log: Path) -> list[dict]:
    """The marker lines fault_runner.py wrote at each injection point, in order."""
    try:
        return [json.loads(line) for line in Path(log).read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        return []


def run_to_fault(fired: Path, fault: dict, *args, expect: str, timeout: float = 120) -> str:
    """Run with one fault armed and prove it landed: the process died of SIGKILL, and the fault left
    exactly one marker line whose detail (the write's path, the call's number) matches `expect`.
    A planned fault that did not fire fails here; nothing stands in for it. Returns the detail."""
    before = len(fired_lines(fired))
    code, output = run_faulted({"fired": str(fired), "faults": [fault]}, *args, timeout=timeout)
    new = fired_lines(fired)[before:]
    assert len(new) == 1, f"planned fault {fault} fired {len(new)} time(s), exit {code}:\n{output[-2000:]}"
    assert re.search(expect, new[0]["detail"]), f"fault fired at {new[0]['detail']!r}, not at {expect!r}"
    assert code == -signal.SIGKILL, f"fired at {new[0]['detail']!r} but the process exited {code}:\n{output[-2000:]}"
    return new[0]["detail"]


def kill_when(process: subprocess.Popen, condition, *, delay: float = 0.0, timeout: float = 120) -> tuple[int, str]:
    """SIGKILL `process` `delay` seconds after `condition()` holds; returns (returncode, output).

    A process that ended before the kill returns its own exit code (the caller's check for -9 fails);
    a condition that never holds within `timeout` fails here."""
    deadline = time.time() + timeout
    while process.poll() is None and not condition():
        if time.time() > deadline:
            process.kill()
            raise AssertionError(f"kill condition never held in {timeout}s:\n{_output(process)[-2000:]}")
        time.sleep(0.01)
    end = time.time() + delay
    while process.poll() is None and time.time() < end:
        time.sleep(0.005)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    return finish(process)


def line_count(path: Path) -> int:
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:
        return 0


# ---- datasets --------------------------------------------------------------------------------------


def trainable_dataset(root: Path, **options) -> dict:
    """helpers.cached_dataset (shards, manifest, cache, split), built on one torch thread."""
    with one_thread():
        return cached_dataset(root, **options)


def write_tar(path: Path, members: list[tuple[str, bytes]], fmt=tarfile.PAX_FORMAT, encoding="utf-8") -> Path:
    """A tar with exactly these (name, data) members, in this order (names are not sanitised)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=fmt, encoding=encoding) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            archive.addfile(info, BytesIO(data))
    return path


def jpeg(seed: int = 0, size=(40, 32)) -> bytes:
    return image_bytes(random_image(np.random.default_rng(seed), *size), "JPEG")


def label(value: int) -> bytes:
    return str(value).encode()


# ---- comparing caches --------------------------------------------------------------------------------


def dump_records(cache: Path) -> list[dict]:
    result = invoke("cache", "dump", cache)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def manifest_keys(manifest: Path) -> list[tuple[str, str]]:
    from dho_pipeline.manifest import load_manifest

    return [(s.name, k) for s in load_manifest(manifest).shards for k in s.keys]


def rows_lost(reference: list[dict], candidate: list[dict], atol: float = 0.02) -> list[str]:
    """Rows of `reference` that `candidate` lacks or holds differently (keys, boxes, flips, logits).

    Logits may differ by float16 rounding; the top-k indices only where two logits (nearly) tie.
    """
    have = {(r["shard"], r["key"]): r for r in candidate}
    lost = []
    for row in reference:
        other = have.get((row["shard"], row["key"]))
        if other is None or set(other) != set(row) or ("views" in row and len(other["views"]) != len(row["views"])):
            lost.append(f"{row['shard']}/{row['key']}: absent or different shape")
            continue
        for a, b in zip(row.get("views", []), other.get("views", [])):
            problem = None
            if a["box"] != b["box"] or a["flip"] != b["flip"]:
                problem = "box/flip differ"
            elif not np.allclose(a["topk_logit"], b["topk_logit"], atol=atol):
                problem = "logits differ"
            elif a["topk_index"] != b["topk_index"]:
                logits = np.asarray(a["topk_logit"])
                differ = [i for i, (x, y) in enumerate(zip(a["topk_index"], b["topk_index"])) if x != y]
                near_tie = all(
                    min(abs(logits[i] - logits[j]) for j in (i - 1, i + 1) if 0 <= j < len(logits)) <= atol
                    for i in differ
                )
                problem = None if near_tie else "top-k indices differ"
            elif any(abs(a["log_partition"][t] - b["log_partition"][t]) > 1e-3 for t in a["log_partition"]):
                problem = "log-partitions differ"
            if problem:
                lost.append(f"{row['shard']}/{row['key']}: {problem}")
                break
    extra = {(r["shard"], r["key"]) for r in candidate} - {(r["shard"], r["key"]) for r in reference}
    lost += [f"{s}/{k}: not in the reference" for s, k in sorted(extra)]
    return lost


def verify_ok(cache: Path, manifest: Path) -> None:
    result = invoke("cache", "verify", cache, "--manifest", manifest)
    assert result.exit_code == 0 and "OK" in result.output, result.output


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@contextmanager
def one_thread():
    """Torch on one intra-op thread: on 2 shared cores, two OpenMP threads that spin against another
    busy process make tiny models 10-50x slower. Subprocesses get OMP_NUM_THREADS=1."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every in-process run of a test on one thread (see one_thread)."""
    with one_thread():
        yield
