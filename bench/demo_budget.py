"""The demo's time budget: one fresh `dho-pipeline demo` (default settings), its wall and CPU seconds.

    .venv/bin/python bench/demo_budget.py --out bench-out/budget --results bench/results/cpu-<date>

The budget is 3 minutes of wall time on the project's 2 cores. The cores are shared, so wall time
depends on what else runs: the script waits (up to --wait seconds) for the 1-minute load average to drop
below --max-load before it starts, and records the load at start and end; the CPU seconds (user + system,
the demo and every process it started) do not depend on the load. Writes demo_budget.json (bench/common.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from common import run_demo, save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/budget"), help="the demo's folder (emptied first)")
    parser.add_argument("--results", type=Path, help="folder for demo_budget.json (default: --out)")
    parser.add_argument("--max-load", type=float, default=2.0)
    parser.add_argument("--wait", type=float, default=1800, help="seconds to wait for the load to drop")
    args = parser.parse_args()
    waited = time.perf_counter()
    while os.getloadavg()[0] >= args.max_load and time.perf_counter() - waited < args.wait:
        time.sleep(10)
    shutil.rmtree(args.out, ignore_errors=True)
    started = time.perf_counter()
    demo = run_demo(args.out)
    measured = demo["measured"]
    figures = {
        **{k: measured[k] for k in ("wall_seconds", "cpu_seconds", "user_seconds", "system_seconds")},
        "load_before": measured["load_average_at_start"],
        "load_after": measured["load_average_at_end"],
        "waited_for_load_seconds": round(started - waited, 1),
        "budget_seconds": 180,
        "demo": {"config": demo["config"], "accuracy": demo["accuracy"], "seconds": demo["seconds"],
                 "commands": demo["commands"]},
    }
    print(f"demo: {figures['wall_seconds']:.0f} s wall, {figures['cpu_seconds']:.0f} s CPU, load {figures['load_before'][0]:.2f} before and "
          f"{figures['load_after'][0]:.2f} after")
    save("demo_budget", figures, out=args.results or args.out)


if __name__ == "__main__":
    main()
