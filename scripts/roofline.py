#!/usr/bin/python3
"""Runs gradlora_bench_roofline at each thread count and renders its tables.

    cmake --build build --target gradlora_bench_roofline
    scripts/roofline.py --build build --threads 1,2 --update-docs

Writes out/roofline/t<N>.json (the benchmark's run file, plus the load average before and
after the run) and, with --update-docs, replaces the part of docs/performance.md between
<!-- roofline:begin --> and <!-- roofline:end --> with tables rendered from those files.
--render-only renders from the files already written. Standard library only.
"""

import argparse
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["lora", "random", "galore", "additive"]


def cpu_model():
    """The model name and, as "AMD EPYC" names several generations, the family and model."""
    fields = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name", "unknown")
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def parse_env(item):
    """KEY=VALUE of --env, as (KEY, VALUE)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise SystemExit(f"--env: expected KEY=VALUE, got {item!r}")
    return key, value


def run(args, threads, path):
    exe = os.path.join(args.build, "bench", "gradlora_bench_roofline")
    cmd = [exe, f"--threads={threads}", f"--repeats={args.repeats}", f"--json={path}.tmp"]
    if args.shapes:
        cmd.append(f"--shapes={args.shapes}")
    if not args.refresh:
        cmd.append("--refresh=0")
    if args.isa:
        cmd.append(f"--isa={args.isa}")
    extra = args.env_vars
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads), **extra)
    before = os.getloadavg()
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, env=env, check=True)
    after = os.getloadavg()
    data = json.load(open(path + ".tmp"))
    os.remove(path + ".tmp")
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    data.update(load_before=before, load_after=after, cpu=cpu_model(), commit=commit,
                openblas_coretype=os.environ.get("OPENBLAS_CORETYPE", ""), env=extra,
                command=" ".join(os.path.relpath(c, ROOT) if c == exe else c for c in cmd[:3]))
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def fmt_load(v):
    return ", ".join(f"{x:.2f}" for x in v)


def render(files):
    md = []
    for path in files:
        d = json.load(open(path))
        rows = [r for r in d["rows"] if "step_ms" in r]
        md.append(f"#### {d['threads']} thread{'s' if d['threads'] > 1 else ''}")
        md.append("")
        blas = f", OPENBLAS_CORETYPE={d['openblas_coretype']}" if d.get("openblas_coretype") else ""
        blas += "".join(f", {k}={v}" for k, v in d.get("env", {}).items())
        kernels = "unavailable"
        if d["kernels"]:
            kt = d.get("kernel_threads")
            isa = f", {d['isa']}" if d.get("isa") else ""
            kernels = "on" + isa + (f" (their loops on {kt} thread{'s' if kt > 1 else ''})" if kt else "")
        md.append(f"{d['cpu']}, LibTorch {d['torch_version']}{blas}, CPU kernels {kernels}, "
                  f"median of {d['repeats']} interleaved repeats, commit {d['commit']}. Load average (1, 5, 15 min) "
                  f"before {fmt_load(d['load_before'])}, after {fmt_load(d['load_after'])}.")
        md.append("")
        sweeps = all("read_ms" in r for r in rows)
        md.append("Each cell: step time in ms, and in brackets its ratio to the roofline max(T_mem, T_flop); "
                  "`library` is the same step with the CPU kernels off."
                  + (" Two sweeps: a read-only sweep of G and a read-modify-write sweep of W, timed in the same "
                     "run (the memory floor of a step that reads G in one sweep and writes back in another)."
                     if sweeps else ""))
        md.append("")
        head = ["shape", "r", "T_mem (pass)"] + (["two sweeps"] if sweeps else []) + ["sgemm", "T_flop lora"]
        for m in METHODS:
            head += [m, f"{m} library"]
        head.append("AdamW")
        md.append("| " + " | ".join(head) + " |")
        md.append("|" + "---|" * len(head))
        keys = sorted({(r["n"], r["m"], r["r"]) for r in rows}, key=lambda k: (k[0] * k[1], k[2]))
        for n, m, rank in keys:
            cell = {r["column"]: r for r in rows if (r["n"], r["m"], r["r"]) == (n, m, rank)}
            any_row = next(iter(cell.values()))
            lora = cell.get("lora")
            line = ([f"{n}×{m}", str(rank), f"{any_row['pass_ms']:.2f} ms"]
                    + ([f"{any_row['read_ms'] + any_row['rmw_ms']:.2f} ms"] if sweeps else [])
                    + [f"{any_row['sgemm_gflops']:.0f} GFLOPS", f"{lora['t_flop_ms']:.2f} ms" if lora else "–"])
            for meth in METHODS:
                for col in (meth, meth + "/library"):
                    r = cell.get(col)
                    line.append(f"{r['step_ms']:.1f} ({r['step_ms'] / r['roofline_ms']:.2f}×)" if r else "–")
            a = cell.get("adamw")
            line.append(f"{a['step_ms']:.1f}" if a else "–")
            md.append("| " + " | ".join(line) + " |")
        refresh = [r for r in d["rows"] if r["column"].startswith("galore/refresh")]
        if refresh:
            md.append("")
            md.append("galore's refresh (steps with `update_proj_gap: 1` minus steps between refreshes):")
            md.append("")
            md.append("| shape | r | projector | per refresh | per step over gap 200 | top-r energy vs the SVD's |")
            md.append("|---|---|---|---|---|---|")
            for r in refresh:
                md.append(f"| {r['n']}×{r['m']} | {r['r']} | {r['column'].split('/')[-1]} | {r['refresh_ms']:.0f} ms "
                          f"| {r['amortised_ms']:.2f} ms | {r['energy_vs_svd']:.4f} |")
        md.append("")
    md += goals(files)
    return "\n".join(md)


# The step's limit as a multiple of its roofline (for additive the roofline is the pass).
GOALS = {"lora": 1.3, "random": 1.3, "galore": 1.3, "additive": 1.2}


def goals(files):
    """The worst and best ratio to the roofline of each method's kernel step, per thread count."""
    sweeps = all("read_ms" in r for path in files for r in json.load(open(path))["rows"] if "step_ms" in r)
    md = ["#### Against the goals", "",
          "The largest and smallest ratio step / roofline over the shapes and ranks above, for the step with the "
          "CPU kernels (galore between refreshes)"
          + ("; and the largest ratio of the step to max(two sweeps, T_flop), the floor of a step that must read G "
             "in one sweep and write back in another." if sweeps else "."), "",
          "| threads | method | worst (shape, r) | best (shape, r) | limit | met everywhere |"
          + (" worst against two sweeps (shape, r) |" if sweeps else ""),
          "|---|---|---|---|---|---|" + ("---|" if sweeps else "")]
    for path in files:
        d = json.load(open(path))
        for meth in METHODS:
            rows = [r for r in d["rows"] if r.get("column") == meth and "step_ms" in r]
            if not rows:
                continue
            ratio = {(r["n"], r["m"], r["r"]): r["step_ms"] / r["roofline_ms"] for r in rows}
            worst, best = max(ratio, key=ratio.get), min(ratio, key=ratio.get)
            where = lambda q, k: f"{q[k]:.2f}× ({k[0]}×{k[1]}, {k[2]})"
            met = "yes" if ratio[worst] <= GOALS[meth] else "no"
            line = f"| {d['threads']} | {meth} | {where(ratio, worst)} | {where(ratio, best)} | {GOALS[meth]}× | {met} |"
            if sweeps:
                two = {(r["n"], r["m"], r["r"]): r["step_ms"] / max(r["read_ms"] + r["rmw_ms"], r["t_flop_ms"])
                       for r in rows}
                line += f" {where(two, max(two, key=two.get))} |"
            md.append(line)
    md.append("")
    return md


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--shapes", default="", help="e.g. 4096x4096,4096x11008 (default: the benchmark's)")
    ap.add_argument("--refresh", type=int, default=1, help="0: skip galore's refresh timing")
    ap.add_argument("--isa", default="", help="the kernels' instruction set: avx512f, avx2 (default: the CPU's best)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="set in the benchmark's environment (repeatable), recorded in the run file")
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "roofline"))
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--update-docs", action="store_true")
    ap.add_argument("--section", default="roofline", help="marker name in docs/performance.md (roofline:begin)")
    args = ap.parse_args()
    args.env_vars = dict(parse_env(item) for item in args.env)
    os.makedirs(args.out, exist_ok=True)
    files = [os.path.join(args.out, f"t{t}.json") for t in args.threads.split(",")]
    if not args.render_only:
        for t, path in zip(args.threads.split(","), files):
            run(args, int(t), path)
    md = render(files)
    print(md)
    if args.update_docs:
        doc = os.path.join(ROOT, "docs", "performance.md")
        text = open(doc).read()
        begin, end = f"<!-- {args.section}:begin -->", f"<!-- {args.section}:end -->"
        if begin not in text or end not in text:
            raise SystemExit(f"{doc}: markers {begin} / {end} not found")
        cmd = "scripts/roofline.py " + " ".join(a for a in sys.argv[1:] if a not in ("--update-docs", "--render-only"))
        block = f"{begin}\n<!-- written by: {cmd.strip()} -->\n\n{md}\n{end}"
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
        open(doc, "w").write(text)
        print(f"updated {doc}", file=sys.stderr)


if __name__ == "__main__":
    main()
