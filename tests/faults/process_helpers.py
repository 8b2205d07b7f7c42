"""Helpers of the fault tests that park, signal and watch whole process trees (a command and its
DataLoader workers): the run-directory lock, pre-emption (SIGTERM/SIGINT) and orphan tests."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
from fault_helpers import finish, fired_lines, popen


def start_held(fired: Path, gate: Path, target: str, *args, nth: int = 1):
    """Start `dho-pipeline ARGS` parked (fault_runner "hold") as the nth call of `target` begins, and
    wait until it is parked there; it goes on once `gate` exists. Returns the process."""
    before = len(fired_lines(fired))
    process = popen({"fired": str(fired), "faults": [
        {"kind": "call", "target": target, "nth": nth, "action": "hold", "until": str(gate)}]}, *args)
    deadline = time.time() + 180
    while len(fired_lines(fired)) == before:
        assert process.poll() is None, f"ended before call {nth} of {target}:\n{finish(process)[1][-3000:]}"
        assert time.time() < deadline, f"never reached call {nth} of {target}"
        time.sleep(0.02)
    return process


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (its DataLoader workers, their helpers)."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(pids: list[int]) -> list[int]:
    """Those of `pids` still running (zombies, dead but not yet reaped, do not count)."""
    running = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                running.append(pid)
        except psutil.NoSuchProcess:
            pass
    return running


def wait_gone(pids: list[int], seconds: float) -> list[int]:
    """Wait up to `seconds` for `pids` to end; returns those still running then."""
    deadline = time.time() + seconds
    while alive(pids) and time.time() < deadline:
        time.sleep(0.02)
    return alive(pids)


def signal_tree(pid: int, number: int = signal.SIGTERM) -> list[int]:
    """Send `number` to a process and to each of its descendants, as a batch system (Slurm) or a
    terminal's Ctrl-C reaches the whole job; returns the descendants signalled."""
    children = descendants(pid)
    for target in [pid, *children]:
        try:
            os.kill(target, number)
        except ProcessLookupError:
            pass
    return children
