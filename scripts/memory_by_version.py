#!/usr/bin/python3
"""Compares the training step's peak memory between two LibTorch releases.

    scripts/memory_by_version.py docs/runs/torch-memory [--update-docs]

Reads the run files of gradlora_bench_train (--json) in the folder, named
<release>-batch<B>.json (for example torch113-batch128.json and torch26-batch128.json, the
same command run against each release), and prints a markdown table: per batch size and
configuration, the peak resident memory on each release and what the step holds above its
set-up (peak - the resident memory once the weights and data exist: the libraries' own size,
which differs between releases, drops out), with the medians over the rounds. With
--update-docs the table replaces the part of docs/performance.md between the markers
<!-- torch-memory:begin --> and <!-- torch-memory:end -->.

Standard library only.
"""

import argparse
import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import TRAIN_LABELS, train_modes, update_docs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20


def load(folder):
    """{(release, batch): [records]} from the folder's <release>-batch<B>.json files."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(folder, "*-batch*.json"))):
        m = re.fullmatch(r"(.+)-batch(\d+)\.json", os.path.basename(path))
        if not m:
            continue
        try:
            with open(path) as f:
                records = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"{path}: not a run file of gradlora_bench_train --json ({e})")
        if not isinstance(records, list) or not records:
            raise SystemExit(f"{path}: no records")
        missing = [k for k in ("mode", "peak_rss_bytes", "setup_rss_bytes", "torch_version") if k not in records[0]]
        if missing:
            raise SystemExit(f"{path}: records lack {', '.join(missing)}")
        runs[(m.group(1), int(m.group(2)))] = records
    if not runs:
        raise SystemExit(f"{folder}: no <release>-batch<B>.json files")
    return runs


def medians(records):
    """{mode: (peak MiB, peak - setup MiB)}: bench.py's medians over the rounds."""
    return {mode: (t["peak"] / MIB, t["above_setup"] / MIB) for mode, t in train_modes(records).items()}


def table(runs):
    releases = list(dict.fromkeys(rel for rel, _ in runs))
    if len(releases) != 2:
        raise SystemExit(f"expected run files of two releases, found {releases}")
    a, b = releases
    version = {rel: next(iter(recs))["torch_version"] for (rel, _), recs in runs.items()}
    head = (f"| batch | configuration | peak {version[a]} [MiB] | peak {version[b]} [MiB] | "
            f"above set-up {version[a]} [MiB] | above set-up {version[b]} [MiB] | {version[b]} - {version[a]} [MiB] |")
    rows = [head, "|---:|---|---:|---:|---:|---:|---:|"]
    for batch in sorted({bt for _, bt in runs}):
        if (a, batch) not in runs or (b, batch) not in runs:
            raise SystemExit(f"batch {batch}: run files of both releases are needed")
        ma, mb = medians(runs[(a, batch)]), medians(runs[(b, batch)])
        for mode in ma:
            if mode not in mb:
                raise SystemExit(f"batch {batch}: mode {mode} is missing from {b}'s run file")
            (pa, da), (pb, db) = ma[mode], mb[mode]
            rows.append(f"| {batch} | {TRAIN_LABELS.get(mode, mode)} | {pa:.1f} | {pb:.1f} | {da:.1f} | {db:.1f} | "
                        f"{db - da:+.1f} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="folder of <release>-batch<B>.json run files")
    ap.add_argument("--update-docs", action="store_true", help="write the table into docs/performance.md")
    args = ap.parse_args()
    md = table(load(args.folder))
    print(md)
    if args.update_docs:
        rel = os.path.relpath(os.path.abspath(args.folder), ROOT)
        update_docs(os.path.join(ROOT, "docs", "performance.md"), md,
                    f"scripts/memory_by_version.py {rel} --update-docs", section="torch-memory")


if __name__ == "__main__":
    main()
