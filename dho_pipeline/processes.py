"""Processes on a shared cluster: exclusive locks, data workers that die with their parent, and stop
requests (SIGTERM, SIGINT) turned into a clean stop at a step boundary.

- `exclusive_lock`: a kernel lock (flock) on a file, released by the kernel when its holder dies, so
  never stale; a second taker is refused at once, told the holder's pid and host. A flock belongs to
  the open file, which forked children (DataLoader workers) inherit: an orphaned worker would keep the
  lock held after its parent died. So every child forked while a lock is held points its copy of the
  descriptor at /dev/null first thing (os.register_at_fork, as soon as the child runs): only the
  process that took a lock holds it. (POSIX record locks, fcntl.lockf, are not inherited, but any close of any descriptor of
  the file by the holder drops them, and two takers in one process never conflict.)
- `worker_init`: the DataLoader `worker_init_fn` of every loader here. The kernel kills the worker
  when its parent dies (PR_SET_PDEATHSIG; torch's own check notices only after 5-10 s), and the
  worker ignores SIGINT and SIGTERM: Ctrl-C and a batch system's SIGTERM reach the whole process
  group, and the parent, which decides how to stop, shuts its workers down itself.
- `StopSignals`: while entered, SIGTERM and SIGINT only record a stop request, which the caller
  honours at its next step boundary; a second signal stops at once (the default action).
- `StopVote`: all processes of a group agree to stop after the same step.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h

# ---- exclusive locks -------------------------------------------------------------------------------

_held_locks: set[int] = set()  # descriptors of the locks this process took


def _forget_locks_in_child() -> None:
    """In a freshly forked child: drop its references to the parent's locks (see the module doc).
    dup2 replaces the descriptor in place, so the inherited file objects stay valid (on /dev/null)."""
    if not _held_locks:
        return
    null = os.open(os.devnull, os.O_RDWR)
    for fd in _held_locks:
        os.dup2(null, fd)
    os.close(null)
    _held_locks.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


def _holder(handle) -> str:
    """Who holds the lock, as its holder wrote it; it writes just after locking, so allow it a moment."""
    for _ in range(20):
        handle.seek(0)
        holder = handle.read().strip()
        if holder:
            return holder
        time.sleep(0.05)
    return "another process"


@contextmanager
def exclusive_lock(path: str | Path, refusal: Callable[[str], str],
                   remove_after: Callable[[], bool] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` for the duration (the file is created if needed; its
    content, "pid N on HOST since ...", only names the last holder).

    A second taker gets UserError(refusal(holder)) at once, `holder` naming pid and host. The file is
    left behind, unless `remove_after()` is true at the end (a start that failed before writing
    anything): it is then removed while still held, and a taker that opened it just before notices,
    once it holds the lock, that the file is no longer the one at the path and starts over, so the
    removal never lets two holders in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(handle)
            handle.close()
            raise UserError(refusal(holder)) from None
        if _same_file(handle, path):
            break
        handle.close()  # removed by its last holder after we opened it: take the new one
    try:
        _held_locks.add(handle.fileno())
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        yield
    finally:
        if remove_after is not None and remove_after():
            path.unlink(missing_ok=True)
        _held_locks.discard(handle.fileno())
        handle.close()


def _same_file(handle, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


# ---- data workers ----------------------------------------------------------------------------------


def die_with_parent(parent: int, signal_number: int = signal.SIGKILL) -> None:
    """Have the kernel send `signal_number` to this process when its parent (pid `parent`) dies (Linux);
    exit at once if it has died already, before the request took effect."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal_number, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def worker_init(_worker_id: int, *, parent: int) -> None:
    """`worker_init_fn` (bind `parent=os.getpid()` with functools.partial): see the module doc."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    die_with_parent(parent)


def worker_init_fn():
    """A DataLoader worker_init_fn bound to this process as the parent."""
    from functools import partial

    return partial(worker_init, parent=os.getpid())


# ---- stop requests ---------------------------------------------------------------------------------


class StopSignals:
    """While entered: the first SIGTERM or SIGINT sets `received` (its name) and nothing else; the
    caller stops at its next step boundary. A second one restores the default action and is re-sent:
    the process stops at once (a user's second Ctrl-C, a batch system's final SIGTERM)."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self._previous = {number: signal.signal(number, self._handle) for number in STOP_SIGNALS}
        return self

    def _handle(self, number, _frame) -> None:
        if self.received is None:
            self.received = signal.Signals(number).name
            return
        self._restore()
        os.kill(os.getpid(), number)

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def __exit__(self, *_exc) -> None:
        self._restore()


class StopVote:
    """Every process of a torch.distributed group stops after the same step: each step, the processes
    OR their local stop requests in an all-reduce on a CPU (gloo) group of their own. The vote is posted
    when a step starts and read when it ends, so it never waits on the device nor adds latency to a
    step; a signal that arrives during step s stops every process after step s + 1 at the latest.
    Alone, the vote is this process's own request, read at the end of each step."""

    def __init__(self, signals: StopSignals, world: int):
        self.signals = signals
        self._group = None
        self._pending = None
        if world > 1:
            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo")  # collective: every process constructs its vote

    def post(self) -> None:
        """At the start of a step: send this process's current request."""
        if self._group is None:
            return
        import torch
        import torch.distributed as dist

        flag = torch.tensor([int(self.signals.received is not None)], dtype=torch.int32)
        self._pending = (flag, dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True))

    def stop(self) -> bool:
        """At the end of a step: whether every process stops now."""
        if self._group is None:
            return self.signals.received is not None
        flag, work = self._pending
        work.wait()
        return bool(flag.item())
