#!/usr/bin/env python3
"""Learning-rate sweep of the default experiment (docs/experiment.md).

Writes <out>/lr_sweep.yaml: configs/experiment.yaml with its compare.methods
replaced by one entry per (method, learning rate), seed 0 only, the same
targets as the experiment; runs `gradlora compare` on it (finished runs are
reused) and prints two tables, method x effective learning rate: the held-out
loss on B after fine-tuning and the forgetting on A.

    scripts/lr_sweep.py [--out out/lr-sweep] [--bin build/app/gradlora] [--methods lora,apollo,...]

For `galore` the effective learning rate is lr x scale (scale 0.25); for
`lora_plus` it is the learning rate of B (A steps 16 times faster). The
pre-trained model is shared with the experiment (out/experiment/cache).
"""
import argparse
import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# method -> (target spec, effective learning rates)
GRID = {
    "full": (None, [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]),
    "lora": ("method: lora, rank: 8, alpha: 16", [1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2]),
    "random": ("method: random, rank: 8, alpha: 16, on_resample: reset", [1e-3, 2e-3, 5e-3, 1e-2]),
    "additive": ("method: additive, rank: 8, alpha: 16", [1e-3, 2e-3, 5e-3, 1e-2]),
    "galore": ("method: galore, rank: 8, update_proj_gap: 50, scale: 0.25", [1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2]),
    "hadamard": ("method: hadamard, rank: 4, alpha: 8", [1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1]),
    "lora_ga": ("method: lora, rank: 8, alpha: 16, init: gradient", [5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2]),
    "lora_plus": ("method: lora, rank: 8, alpha: 16, lr_ratio: 16", [2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2]),
    "apollo": ("method: apollo, rank: 8, update_proj_gap: 50", [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]),
}
GALORE_SCALE = 0.25


def sweep_config(base_text, grid):
    head = base_text[: base_text.index("\ncompare:") + 1]
    out = [head, "compare:\n  seeds: [0]\n  methods:\n"]
    for method, (spec, rates) in grid.items():
        for eff in rates:
            lr = eff / GALORE_SCALE if method == "galore" else eff
            out.append(f"    - name: {method}_{eff:g}\n      optimizer: {{lr: {lr:g}}}\n")
            if spec is None:
                out.append("      default: full\n")
            else:
                out.append("      targets:\n")
                for match in ("blocks.*.attn.*.weight", "blocks.*.mlp.*.weight"):
                    out.append(f'        - {{match: "{match}", {spec}}}\n')
    return "".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "lr-sweep"))
    ap.add_argument("--bin", default=os.path.join(ROOT, "build", "app", "gradlora"))
    ap.add_argument("--cache", default=os.path.join(ROOT, "out", "experiment", "cache"))
    ap.add_argument("--methods", default="", help="comma-separated subset of the grid (default: all)")
    args = ap.parse_args()
    grid = GRID
    if args.methods:
        unknown = [m for m in args.methods.split(",") if m not in GRID]
        if unknown:
            sys.exit(f"lr_sweep.py: unknown method(s) {', '.join(unknown)} (known: {', '.join(GRID)})")
        grid = {m: GRID[m] for m in args.methods.split(",")}
    with open(os.path.join(ROOT, "configs", "experiment.yaml")) as f:
        text = sweep_config(f.read(), grid)
    os.makedirs(args.out, exist_ok=True)
    cfg = os.path.join(args.out, "lr_sweep.yaml")
    with open(cfg, "w") as f:
        f.write(text)
    runs = sum(len(r) for _, r in grid.values())
    print(f"{runs} runs of 200 steps (finished ones are reused); config {cfg}", file=sys.stderr)
    subprocess.run([args.bin, "compare", "--config", cfg, "--out", args.out,
                    "--set", f"training.cache_dir={args.cache}"], check=True, stdout=subprocess.DEVNULL)
    results = {}
    with open(os.path.join(args.out, "results.csv")) as f:
        for row in csv.DictReader(f):
            results[row["method"]] = row
    rates = sorted({r for _, rs in grid.values() for r in rs})
    for title, key in (("held-out loss B after fine-tuning", "eval_after_mean"),
                       ("forgetting: increase of held-out loss A", "forgetting_mean")):
        print(f"\n{title} (seed 0; columns: effective learning rate, lr x scale for galore)\n")
        print("| method | " + " | ".join(f"{r:g}" for r in rates) + " |")
        print("|---|" + "---:|" * len(rates))
        for method, (_, rs) in grid.items():
            best = min(rs, key=lambda r: float(results[f"{method}_{r:g}"]["eval_after_mean"]))
            cells = []
            for r in rates:
                if r not in rs:
                    cells.append("")
                    continue
                v = f"{float(results[f'{method}_{r:g}'][key]):.4f}"
                cells.append(f"**{v}**" if r == best else v)
            print(f"| {method} | " + " | ".join(cells) + " |")
    print("\nbold: the learning rate with the lowest held-out loss on B")


if __name__ == "__main__":
    main()
