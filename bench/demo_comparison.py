"""The paper's comparison in miniature: the demo's table over several seeds and label budgets.

    .venv/bin/python bench/demo_comparison.py --seeds 0 1 2 --percents 1 10 --out bench-out/demo \
        --results bench/results/cpu-<date>

Runs `dho-pipeline demo` once per (seed, percent) (each seed in its own folder, so its teacher caches
are shared by the two label budgets), then prints mean and standard deviation over seeds per method,
checks the expectations the paper implies (and the demo's own bar: DHO combined >= 88% and >= CE-only
+ 15 points, the cached run within noise of the online one), and writes everything to
demo_comparison-<epochs>epochs.json in --results (default --out), with the command, commit, machine,
load and date (bench/common.py), each run's wall and CPU seconds, and the table under path-friendly
keys (`table.p10.dho_combined.mean`) for the README's annotations. The demo runs themselves stay in --out.
Prints measured figures; asserts nothing. About 2 minutes per run on 2 idle CPU cores.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from common import run_demo, save

SLUGS = {  # report row -> JSON key
    "teacher zero-shot": "teacher_zero_shot",
    "student zero-shot (before training)": "student_zero_shot",
    "CE-only": "ce_only",
    "single-head CE+KD": "single_head",
    "DHO, CE head": "dho_ce_head",
    "DHO, KD head": "dho_kd_head",
    "DHO, combined (calibrated)": "dho_combined",
    "DHO combined, 1 cached view": "dho_1view",
    "DHO combined, teacher online": "dho_online",
}
COMBINED = "DHO, combined (calibrated)"
EXPECTATIONS = [
    # (description, percent or None for both, check(mean accuracies) -> bool)
    ("DHO combined >= DHO CE head", None, lambda m: m[COMBINED] >= m["DHO, CE head"]),
    ("DHO combined >= DHO KD head", None, lambda m: m[COMBINED] >= m["DHO, KD head"]),
    ("DHO combined >= single-head CE+KD", None, lambda m: m[COMBINED] >= m["single-head CE+KD"]),
    ("DHO combined >= 88% (the demo's bar)", None, lambda m: m[COMBINED] >= 0.88),
    ("DHO combined >= CE-only + 15 points (the demo's bar)", None, lambda m: m[COMBINED] >= m["CE-only"] + 0.15),
]


def percent_key(percent: float) -> str:
    return "p" + f"{percent:g}".replace(".", "_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--percents", type=float, nargs="+", default=[1.0, 10.0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/demo"), help="folder for the demo runs")
    parser.add_argument("--results", type=Path, help="folder for the JSON (default: --out)")
    parser.add_argument("--epochs", type=int, help="epochs per training run (default: the demo's)")
    args = parser.parse_args()
    extra = ["--epochs", str(args.epochs)] if args.epochs else []
    runs = {}
    for seed in args.seeds:
        for percent in args.percents:
            runs[(seed, percent)] = run_demo(args.out / f"seed{seed}", "--seed", str(seed), "--percent", str(percent), *extra)
            measured = runs[(seed, percent)]["measured"]
            print(f"seed {seed}, {percent:g}% labels: {measured['wall_seconds']:.0f} s wall, {measured['cpu_seconds']:.0f} s "
                  f"CPU (load {measured['load_average_at_start'][0]:.1f})", file=sys.stderr)

    summary, table = {}, {}
    methods = list(next(iter(runs.values()))["accuracy"])
    for percent in args.percents:
        summary[f"{percent:g}%"], table[percent_key(percent)] = {}, {}
        for method in methods:
            values = [runs[(seed, percent)]["accuracy"][method] for seed in args.seeds]
            cell = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "values": values}
            summary[f"{percent:g}%"][method] = table[percent_key(percent)][SLUGS.get(method, method)] = cell

    config = next(iter(runs.values()))["config"]
    print(f"\ntest top-1 (%), mean +- std over seeds {args.seeds}; 397 test digits, tiny CLIPs, {config['views']} views, "
          f"{config['epochs']} epochs, batch {config['batch_size']}, lr {config['lr']}")
    print("| method | " + " | ".join(f"{p:g}% labels" for p in args.percents) + " |")
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
        cells = summary[f"{percent:g}%"]
        cached, online = cells[COMBINED], cells["DHO combined, teacher online"]
        gap = cached["mean"] - online["mean"]
        noise = max(cached["std"], online["std"], 0.005)
        held = abs(gap) <= 2 * noise
        checks.append({"expectation": "cached several-view within noise of online", "percent": percent, "holds": held,
                       "gap": gap, "noise": noise})
        print(f"  {'holds' if held else 'FAILS'}: cached several-view within noise of online at {percent:g}% "
              f"(gap {100 * gap:+.1f} points, 2 x std {200 * noise:.1f})")

    times = [r["measured"] for r in runs.values()]
    save(f"demo_comparison-{config['epochs']}epochs", {
        "seeds": args.seeds, "percents": args.percents, "demo_config": config,
        "table": table, "summary": summary, "checks": checks,
        "run_seconds": {"wall": [t["wall_seconds"] for t in times], "cpu": [t["cpu_seconds"] for t in times],
                        "note": "runs in order seed x percent; a seed's second run reuses its teacher caches"},
        "runs": {f"seed{s}-{p:g}pct": r for (s, p), r in runs.items()},
    }, out=args.results or args.out)


if __name__ == "__main__":
    main()
