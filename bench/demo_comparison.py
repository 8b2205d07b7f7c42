"""The paper's comparison in miniature: the demo's table over several seeds and label budgets.

    .venv/bin/python bench/demo_comparison.py --seeds 0 1 2 --percents 1 10 --out bench-out/demo

Runs `dho-pipeline demo` once per (seed, percent) (each seed in its own folder, so its teacher caches
are shared by the two label budgets), then prints mean and standard deviation over seeds per method,
checks the expectations the paper implies, and writes everything to demo_comparison-<epochs>epochs.json in
--results (default --out), with the command, commit, machine and date (bench/common.py). Published figures:
--results bench/results/<machine>-<date> (the demo runs themselves stay in --out).
Prints measured figures; asserts nothing. About 2 minutes per run on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import save

EXPECTATIONS = [
    # (description, percent or None for both, check(mean accuracies) -> bool)
    ("DHO combined >= DHO CE head", None, lambda m: m["DHO, combined (calibrated)"] >= m["DHO, CE head"]),
    ("DHO combined >= DHO KD head", None, lambda m: m["DHO, combined (calibrated)"] >= m["DHO, KD head"]),
    ("DHO combined >= single-head CE+KD", None, lambda m: m["DHO, combined (calibrated)"] >= m["single-head CE+KD"]),
    ("DHO combined >= CE-only + 5 points", 10.0, lambda m: m["DHO, combined (calibrated)"] >= m["CE-only"] + 0.05),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--percents", type=float, nargs="+", default=[1.0, 10.0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/demo"))
    parser.add_argument("--epochs", type=int, help="epochs per training run (default: the demo's)")
    parser.add_argument("--results", type=Path, help="folder for the JSON (default: --out)")
    args = parser.parse_args()
    cli = Path(sys.executable).parent / "dho-pipeline"
    runs = {}
    for seed in args.seeds:
        for percent in args.percents:
            started = time.perf_counter()
            result = subprocess.run(
                [str(cli), "demo", "--out", str(args.out / f"seed{seed}"), "--seed", str(seed), "--percent", str(percent),
                 "--json", *(["--epochs", str(args.epochs)] if args.epochs else [])],
                capture_output=True, text=True,
            )
            if result.returncode != 0:
                sys.exit(f"demo seed {seed}, {percent}% failed:\n{result.stderr[-2000:]}")
            runs[(seed, percent)] = json.loads(result.stdout)
            print(f"seed {seed}, {percent:g}% labels: {time.perf_counter() - started:.0f} s", file=sys.stderr)

    summary = {}
    methods = list(next(iter(runs.values()))["accuracy"])
    for percent in args.percents:
        table = {}
        for method in methods:
            values = [runs[(seed, percent)]["accuracy"][method] for seed in args.seeds]
            table[method] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                             "values": values}
        summary[f"{percent:g}%"] = table

    epochs = next(iter(runs.values()))["config"]["epochs"]
    print(f"\ntest top-1 (%), mean +- std over seeds {args.seeds}; 397 test digits, tiny CLIPs, {epochs} epochs")
    header = "| method | " + " | ".join(f"{p:g}% labels" for p in args.percents) + " |"
    print(header)
    print("|---|" + "---|" * len(args.percents))
    for method in methods:
        cells = [f"{100 * summary[f'{p:g}%'][method]['mean']:.1f} +- {100 * summary[f'{p:g}%'][method]['std']:.1f}"
                 for p in args.percents]
        print(f"| {method} | " + " | ".join(cells) + " |")

    print("\nexpectations (on the means):")
    checks = []
    for description, only, check in EXPECTATIONS:
        for percent in args.percents:
            if only is not None and percent != only:
                continue
            means = {m: v["mean"] for m, v in summary[f"{percent:g}%"].items()}
            held = bool(check(means))
            checks.append({"expectation": description, "percent": percent, "holds": held})
            print(f"  {'holds' if held else 'FAILS'}: {description} at {percent:g}%")
    for percent in args.percents:
        table = summary[f"{percent:g}%"]
        cached, online = table["DHO, combined (calibrated)"], table["DHO combined, teacher online"]
        gap = cached["mean"] - online["mean"]
        noise = max(cached["std"], online["std"], 0.005)
        held = abs(gap) <= 2 * noise
        checks.append({"expectation": "cached several-view within noise of online", "percent": percent, "holds": held,
                       "gap": gap, "noise": noise})
        print(f"  {'holds' if held else 'FAILS'}: cached several-view within noise of online at {percent:g}% "
              f"(gap {100 * gap:+.1f} points, 2 x std {200 * noise:.1f})")

    save(f"demo_comparison-{epochs}epochs", {
        "seeds": args.seeds, "percents": args.percents, "epochs": epochs, "summary": summary, "checks": checks,
        "runs": {f"seed{s}-{p:g}pct": r for (s, p), r in runs.items()},
    }, out=args.results or args.out)


if __name__ == "__main__":
    main()
