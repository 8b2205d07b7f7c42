"""The demo's time budget: one fresh `dho-pipeline demo` (default settings), its wall and CPU seconds.

    .venv/bin/python bench/demo_budget.py --out bench-out/budget --results bench/results/cpu-<date>

The budget is 3 minutes of wall time on the project's 2 cores. The cores are shared, so wall time
depends on what else runs: the script waits (up to --wait seconds) for the 1-minute load average to drop
below --max-load before it starts, and records the load at start and end; the CPU seconds (user + system,
the demo and every process it started) do not depend on the load. Writes demo_budget.json (bench/common.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import save


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
    load = os.getloadavg()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run([str(Path(sys.executable).parent / "dho-pipeline"), "demo", "--out", str(args.out), "--json"],
                            capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        sys.exit(f"the demo failed:\n{result.stderr[-2000:]}")
    demo = json.loads(result.stdout)
    figures = {
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, 1),
        "user_seconds": round(after.ru_utime - before.ru_utime, 1),
        "system_seconds": round(after.ru_stime - before.ru_stime, 1),
        "load_before": [round(x, 2) for x in load],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "waited_for_load_seconds": round(started - waited, 1),
        "budget_seconds": 180,
        "demo": {"config": demo["config"], "accuracy": demo["accuracy"], "seconds": demo["seconds"],
                 "commands": demo["commands"]},
    }
    print(f"demo: {wall:.0f} s wall, {figures['cpu_seconds']:.0f} s CPU, load {load[0]:.2f} before and "
          f"{figures['load_after'][0]:.2f} after")
    save("demo_budget", figures, out=args.results or args.out)


if __name__ == "__main__":
    main()
