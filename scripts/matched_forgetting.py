#!/usr/bin/env python3
"""Forgetting at matched learning, from the metrics.csv files of `gradlora compare`.

For each method and seed, follows the held-out loss on B (eval_loss) step by
step, finds where it first reaches each target value (linear interpolation
between evaluations) and reports the increase of the held-out loss on A
(base_eval_loss) there: mean ± sample std over seeds, "-" when not every seed
got there (a single seed prints its value alone).

    scripts/matched_forgetting.py out/experiment 3.2 2.9 2.8
"""
import csv
import pathlib
import statistics
import sys


def runs(root):
    for method in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "cache"):
        seeds = sorted(method.glob("seed*/metrics.csv"))
        if seeds:
            yield method.name, [list(csv.DictReader(open(s))) for s in seeds]


def at_level(rows, target):
    b = [float(r["eval_loss"]) for r in rows]
    a = [float(r["base_eval_loss"]) for r in rows]
    for i in range(1, len(rows)):
        if b[i - 1] >= target >= b[i]:
            t = (b[i - 1] - target) / (b[i - 1] - b[i]) if b[i - 1] != b[i] else 0.0
            return a[i - 1] + t * (a[i] - a[i - 1]) - a[0]
    return None


def main():
    root = pathlib.Path(sys.argv[1])
    targets = [float(x) for x in sys.argv[2:]] or [3.2, 2.9, 2.8]
    order = {"full": 0, "lora": 1, "random": 2, "random_keep": 3, "additive": 4, "galore": 5, "hadamard": 6, "head": 7}
    methods = sorted(runs(root), key=lambda m: (order.get(m[0], 99), m[0]))
    print("| held-out B reached | " + " | ".join(m for m, _ in methods) + " |")
    print("|---|" + "---:|" * len(methods))
    for t in targets:
        cells = []
        for _, seeds in methods:
            v = [at_level(rows, t) for rows in seeds]
            ok = [x for x in v if x is not None]
            if len(ok) < len(v) or not ok:
                cells.append("—")
            elif len(ok) == 1:
                cells.append(f"{ok[0]:.3f}")  # one seed: no spread
            else:
                cells.append(f"{statistics.mean(ok):.3f} ± {statistics.stdev(ok):.3f}")
        print(f"| {t} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
