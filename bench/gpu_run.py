"""What gpu_check's sections share: the run (settings, log, time budget and caps, JSON output), its
section runner and the summary. A separate module from bench/gpu_check.py so that the sections, which
import it, and the script see the same classes (a script runs as __main__)."""

from __future__ import annotations

import math
import signal
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import common


class CapExceeded(BaseException):
    """Raised by SIGALRM when a section or a compile runs past its cap (a BaseException, so that nothing
    in the library or in torch._dynamo catches it as an ordinary error)."""


class Run:
    """What the sections share: settings, scratch folder, output, the time budget, the log and the
    headline figures. A section reads and writes `run.fig` and saves it with `run.save`."""

    def __init__(self, args, cfg: dict, work: Path):
        self.args, self.cfg, self.work, self.out = args, cfg, work, Path(args.out)
        self.started = time.perf_counter()
        self.deadline = self.started + (args.budget or cfg["budget"])
        self.log: list[str] = []
        self.status: dict = {}  # section -> {"status", "seconds", "error"}
        self.headline: dict = {}  # figures for summary.json
        self.shared: dict = {}  # objects handed from one section to the next (data, cache, best batch, ...)
        self.fig: dict = {}

    def say(self, message: str) -> None:
        line = f"[gpu_check {time.perf_counter() - self.started:6.1f}s] {message}"
        self.log.append(line)
        print(line, flush=True)

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def save(self, name: str, figures: dict) -> None:
        common.save(name, clean(figures), out=self.out, quiet=True)

    @contextmanager
    def cap(self, seconds: float, what: str):
        """Stop the block after `seconds` (SIGALRM). Nested caps: the inner never outlives the outer,
        which is re-armed afterwards."""
        if seconds <= 0:
            raise CapExceeded(f"{what}: no time left")

        def fire(signum, frame):
            raise CapExceeded(f"{what} ran past its cap of {seconds:.1f}s")

        outer = signal.getitimer(signal.ITIMER_REAL)[0]
        started = time.perf_counter()
        previous = signal.signal(signal.SIGALRM, fire)
        signal.setitimer(signal.ITIMER_REAL, min(seconds, outer) if outer > 0 else seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            if outer > 0:
                signal.setitimer(signal.ITIMER_REAL, max(0.001, outer - (time.perf_counter() - started)))


def clean(value):
    """JSON-safe figures: floats rounded to 6 digits, NaN/inf as null, tensors and paths as plain values."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else round(value, 6)
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        try:
            return clean(value.item())
        except (TypeError, ValueError, RuntimeError):
            return str(value)
    return value


def error_text(error: BaseException) -> str:
    return "".join(traceback.format_exception(type(error), error, error.__traceback__))[-3000:]


def free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- running the sections ----------------------------------------------------------------------


def run_section(run: Run, name: str, function) -> None:
    cap = min(run.cfg["caps"].get(name, 120), run.remaining())
    run.fig = {}
    started = time.perf_counter()
    run.say(f"=== section {name} (cap {cap:.0f}s, {run.remaining():.0f}s left in the budget)")
    status = run.status[name] = {"status": "running"}
    try:
        if run.args.inject_error == name:
            raise RuntimeError(f"injected failure in section {name} (--inject-error)")
        with run.cap(cap, f"section {name}"):
            function(run)
        status["status"] = "ok"
    except CapExceeded as error:
        status.update(status="timeout", error=str(error))
        run.say(f"section {name}: TIMEOUT ({error})")
    except Exception as error:
        status.update(status="error", error=error_text(error))
        run.say(f"section {name}: ERROR {type(error).__name__}: {str(error)[:300]}")
    finally:
        status["seconds"] = time.perf_counter() - started
        run.fig["section_status"] = dict(status)
        run.save(name, run.fig)
        free_memory()
        write_summary(run)
        run.say(f"section {name}: {status['status']} in {status['seconds']:.1f}s")


def write_summary(run: Run) -> None:
    """summary.json: the headline figures against the targets (never allowed to stop the run)."""
    try:
        run.save("summary", {"mode": "toy" if run.args.toy else "real", "targets": targets(run),
                             "compile": run.headline.get("teacher_compile"), "sections": run.status,
                             "log": run.log[-300:]})
    except Exception as error:  # noqa: BLE001
        run.say(f"summary not written: {error}")


def targets(run: Run) -> dict:
    peak, flops, measured = (run.shared.get(k) for k in ("peak", "flops_per_image", "measured_peak"))
    best, compiled = run.headline.get("teacher_model"), run.headline.get("teacher_compile")
    if compiled and compiled.get("images_per_second") and (not best or compiled["images_per_second"] > best["images_per_second"]):
        best = {"variant": f"compiled {compiled['variant']}", **{k: compiled[k] for k in ("batch", "images_per_second", "mfu")}}
    teacher = {"target": 0.60, "best": best, "meets": best["mfu"] >= 0.60 if best and best.get("mfu") else None,
               "target_images_per_second": 0.60 * peak / flops if peak and flops else None}
    if measured and best and flops:
        teacher["mfu_vs_measured_matmul"] = best["images_per_second"] * flops / measured
    cache = dict(run.headline.get("cache_teacher") or {})
    ratio = cache.get("ratio_steady_to_model_only")
    return {"teacher_mfu": teacher, "cache_teacher_ratio": {"target": 0.95, **cache, "meets": ratio >= 0.95 if ratio else None},
            "train_speedup": {"target": 8.0, **(run.headline.get("train") or {})}}
