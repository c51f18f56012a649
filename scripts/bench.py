#!/usr/bin/python3
"""Runs the gradlora benchmarks and renders the results.

    cmake -S . -B build && cmake --build build --target gradlora_bench_step gradlora_bench_train
    scripts/bench.py --build build --threads 2 --update-docs

Writes, under --out (default out/bench):
  step.json       Google Benchmark output of gradlora_bench_step (every repetition)
  train.json      one record per process of gradlora_bench_train (each configuration --rounds times)
  results.json    machine, settings and the derived figures (ratios, targets)
  tables.md       the markdown tables
and SVG plots (step time vs rank, step time vs n) under --img (default docs/img). With
--update-docs the tables replace the part of docs/performance.md between the markers
<!-- bench:begin --> and <!-- bench:end -->.

Standard library only.
"""

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["lora", "random", "additive", "galore", "hadamard"]
COLORS = {
    "adamw": "#d62728",
    "sgd": "#7f7f7f",
    "lora": "#1f77b4",
    "random": "#2ca02c",
    "additive": "#ff7f0e",
    "galore": "#9467bd",
    "hadamard": "#8c564b",
}


# ---------------------------------------------------------------- running

def machine_info(threads):
    model = platform.processor() or "unknown"
    cpus = os.cpu_count()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "Model name":
                model = val.strip()
            elif key.strip() == "CPU(s)":
                cpus = int(val.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "cpu_model": model,
        "cpus": cpus,
        "threads": threads,
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "commit": commit,
        "kernel": platform.release(),
    }


def run(cmd, env):
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, env=env, check=True)


def run_benchmarks(args, env):
    os.makedirs(args.out, exist_ok=True)
    if not args.skip_step:
        cmd = [os.path.join(args.build, "bench", "gradlora_bench_step"), f"--threads={args.threads}",
               f"--benchmark_repetitions={args.repetitions}", "--benchmark_enable_random_interleaving=true",
               f"--benchmark_min_time={args.min_time}", "--benchmark_display_aggregates_only=true",
               f"--benchmark_out={os.path.join(args.out, 'step.json')}", "--benchmark_out_format=json"]
        if args.filter:
            cmd.append(f"--benchmark_filter={args.filter}")
        run(cmd, env)
    if not args.skip_train:
        cmd = [os.path.join(args.build, "bench", "gradlora_bench_train"), f"--threads={args.threads}",
               f"--layers={args.layers}", f"--dim={args.dim}", f"--batch={args.batch}", f"--rank={args.rank}",
               f"--steps={args.steps}", f"--rounds={args.rounds}", f"--json={os.path.join(args.out, 'train.json')}"]
        run(cmd, env)


# ---------------------------------------------------------------- analysis

def load_step(path):
    """{(method, n, m, r): {"median_ms", "min_ms", "reps", "state_bytes", ...}} from the repetitions."""
    with open(path) as f:
        data = json.load(f)
    runs = {}
    for b in data["benchmarks"]:
        if b.get("run_type") != "iteration":
            continue
        # step/<method>/<n>x<m>[/r<r>], then the time modifiers Google Benchmark appends
        parts = [p for p in b["run_name"].split("/") if p not in ("real_time", "process_time")]
        method = parts[1]
        n, m = (int(v) for v in parts[2].split("x"))
        r = int(parts[3][1:]) if len(parts) > 3 else 0
        scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[b["time_unit"]]
        e = runs.setdefault((method, n, m, r), {"times": [], "cpu": []})
        e["times"].append(b["real_time"] * scale)
        e["cpu"].append(b["cpu_time"] * scale)
        for k in ("state_bytes", "moment_bytes", "measured_bytes"):
            e[k] = int(b[k])
    out = {}
    for key, e in runs.items():
        out[key] = {
            "median_ms": statistics.median(e["times"]),
            "min_ms": min(e["times"]),
            "median_cpu_ms": statistics.median(e["cpu"]),
            "reps": len(e["times"]),
            "state_bytes": e["state_bytes"],
            "moment_bytes": e["moment_bytes"],
            "measured_bytes": e["measured_bytes"],
        }
    return out, data.get("context", {})


def shapes_of(step):
    return sorted({(n, m) for (_, n, m, _) in step}, key=lambda s: (s[0] * s[1], s[0]))


def ratio(step, method, n, m, r, base="adamw", key="median_ms"):
    a = step.get((method, n, m, r))
    b = step.get((base, n, m, 0))
    if not a or not b:
        return None
    return a[key] / b[key]


def linear_fit(xs, ys):
    """Least squares y = a + b·x; returns (a, b, R²)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return a, b, (1 - ss_res / ss_tot) if ss_tot else 1.0


def targets(step):
    """The figures the performance targets are stated in, measured in this run."""
    out = []
    n = m = 4096

    def add(name, value, limit, better="<=", fmt="{:.3f}x", cpu=None):
        if value is None:
            out.append({"target": name, "value": None, "limit": limit, "met": None, "shown": "not measured",
                        "cpu": None})
            return
        met = value <= limit if better == "<=" else value >= limit
        out.append({"target": name, "value": value, "limit": limit, "met": met, "shown": fmt.format(value),
                    "cpu": cpu})

    add("lora r=8 step / AdamW step, 4096x4096", ratio(step, "lora", n, m, 8), 0.6,
        cpu=ratio(step, "lora", n, m, 8, key="median_cpu_ms"))
    add_r = [r for (meth, a, b, r) in step if meth == "additive" and (a, b) == (n, m)]
    worst = max(add_r, key=lambda r: ratio(step, "additive", n, m, r), default=None)
    add(f"additive step / AdamW step, 4096x4096 (worst rank: r={worst})",
        ratio(step, "additive", n, m, worst) if worst else None, 0.5,
        cpu=ratio(step, "additive", n, m, worst, key="median_cpu_ms") if worst else None)
    add("random r=8 step / AdamW step, 4096x4096", ratio(step, "random", n, m, 8), 0.7,
        cpu=ratio(step, "random", n, m, 8, key="median_cpu_ms"))
    lo, ad = step.get(("lora", n, m, 8)), step.get(("adamw", n, m, 0))
    if lo:
        expect = 2 * 8 * (n + m) * 4
        out.append({"target": "lora r=8 AdamW moments == 2r(n+m) floats, 4096x4096", "value": lo["moment_bytes"],
                    "limit": expect, "met": lo["moment_bytes"] == expect,
                    "shown": f"{lo['moment_bytes']} B", "cpu": None, "op": "=="})
    if lo and ad:
        add("AdamW state / lora r=8 moments (2r(n+m) floats), 4096x4096", ad["state_bytes"] / lo["moment_bytes"],
            200, ">=", "{:.1f}x")
        add("AdamW state / lora r=8 moments + factors, 4096x4096", ad["state_bytes"] / lo["state_bytes"], 200, ">=",
            "{:.1f}x")
    return out


def linearity(step):
    """Fits of step time against n·m·r (lora, random) and n·m (additive) over all shapes and ranks."""
    res = []
    for method, work in (("lora", "nmr"), ("random", "nmr"), ("additive", "nm")):
        pts = [(n * m * (r if work == "nmr" else 1), v["median_ms"]) for (meth, n, m, r), v in step.items()
               if meth == method]
        if len(pts) < 3:
            continue
        a, b, r2 = linear_fit([p[0] for p in pts], [p[1] for p in pts])
        res.append({"method": method, "work": "n*m*r" if work == "nmr" else "n*m", "points": len(pts),
                    "intercept_ms": a, "ms_per_unit": b, "r2": r2})
    # AdamW for reference: linear in n·m.
    pts = [(n * m, v["median_ms"]) for (meth, n, m, r), v in step.items() if meth == "adamw"]
    if len(pts) >= 3:
        a, b, r2 = linear_fit([p[0] for p in pts], [p[1] for p in pts])
        res.append({"method": "adamw", "work": "n*m", "points": len(pts), "intercept_ms": a, "ms_per_unit": b,
                    "r2": r2})
    return res


# ---------------------------------------------------------------- markdown

def mib(b):
    if b >= 1 << 20:
        return f"{b / (1 << 20):.1f} MiB"
    return f"{b / 1024:.1f} KiB"


def step_table(step, n, m):
    base = step.get(("adamw", n, m, 0))
    rows = ["| method | rank | step [ms] | x AdamW | x AdamW (CPU time) | optimizer state | AdamW state / state |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    keys = [("adamw", 0), ("sgd", 0)] + [(meth, r) for meth in METHODS
                                          for r in sorted({k[3] for k in step if k[0] == meth})]
    for meth, r in keys:
        v = step.get((meth, n, m, r))
        if not v:
            continue
        rt = v["median_ms"] / base["median_ms"] if base else float("nan")
        rc = v["median_cpu_ms"] / base["median_cpu_ms"] if base else float("nan")
        sr = (f"{base['state_bytes'] / v['state_bytes']:.1f}x" if base and v["state_bytes"] else
              ("-" if meth == "adamw" else "no state"))
        rows.append(f"| {meth if meth not in ('adamw', 'sgd') else 'torch::optim::' + ('AdamW' if meth == 'adamw' else 'SGD')}"
                    f" | {r or '-'} | {v['median_ms']:.2f} | {rt:.3f} | {rc:.3f} | {mib(v['state_bytes'])} | {sr} |")
    return "\n".join(rows)


def train_modes(train):
    """{mode: {step_ms, peak, delta, fused_active, rounds}}: medians over the rounds (one child each)."""
    out = {}
    for mode in dict.fromkeys(t["mode"] for t in train):
        runs = [t for t in train if t["mode"] == mode]
        out[mode] = {
            "step_ms": statistics.median(t["step_ms_median"] for t in runs),
            # runs from before the optimizer's part was timed apart have no opt_ms_median
            "opt_ms": (statistics.median(t["opt_ms_median"] for t in runs)
                       if all("opt_ms_median" in t for t in runs) else None),
            "peak": statistics.median(t["peak_rss_bytes"] for t in runs),
            "delta": statistics.median(t["peak_rss_bytes"] - t["start_rss_bytes"] for t in runs),
            # runs from before the set-up was recorded have no setup_rss_bytes
            "above_setup": (statistics.median(t["peak_rss_bytes"] - t["setup_rss_bytes"] for t in runs)
                            if all("setup_rss_bytes" in t for t in runs) else None),
            "fused_active": all(t.get("fused_active", False) for t in runs),
            "rounds": len(runs),
        }
    return out


TRAIN_LABELS = {
    "full": "full fine-tuning, torch::optim::AdamW",
    "module_lora": "module-side LoRA (A, B by torch::optim::AdamW)",
    "lora": "optimizer-side lora (LowRankOptimizer)",
    "fused": "optimizer-side lora, fuse_into_backward",
    "backward": "forward + backward of the plain layers, no step",
}


def train_table(train):
    modes = train_modes(train)
    ref = modes.get("full") or next(iter(modes.values()))
    mod = modes.get("module_lora")
    with_opt = all(t["opt_ms"] is not None for t in modes.values())
    rows = ["| configuration | step [ms] | " + ("of it in opt.step() [ms] | " if with_opt else "")
            + "x full | x module-side | peak RSS [MiB] | x full | x module-side | peak - start [MiB] |",
            "|---|---:|" + ("---:|" if with_opt else "") + "---:|---:|---:|---:|---:|---:|"]
    for mode, t in modes.items():
        label = TRAIN_LABELS.get(mode, mode)
        if mode == "fused" and not t["fused_active"]:
            rows.append(f"| {label} | *not available: fuse_into_backward had no effect in this build "
                        f"(full gradients still reached .grad)* | | | | | | |" + (" |" if with_opt else ""))
            continue
        step = (f"{t['step_ms']:.0f} | " + (f"{t['opt_ms']:.1f} | " if with_opt else "")
                + f"{t['step_ms'] / ref['step_ms']:.3f} | "
                + (f"{t['step_ms'] / mod['step_ms']:.3f}" if mod else "-"))
        if mode == "backward":  # no optimizer, no state: its memory is not comparable
            memory = "- | - | - | -"
        else:
            memory = (f"{t['peak'] / (1 << 20):.0f} | {t['peak'] / ref['peak']:.3f} | "
                      + (f"{t['peak'] / mod['peak']:.3f}" if mod else "-") + f" | {t['delta'] / (1 << 20):.0f}")
        rows.append(f"| {label} | {step} | {memory} |")
    return "\n".join(rows)


def render_markdown(res, img_rel):
    md = []
    mach = res["machine"]
    md.append(f"Measured on {mach['cpu_model']}, {mach['cpus']} CPUs, {mach['threads']} torch threads "
              f"(at::set_num_threads; OMP_NUM_THREADS and OPENBLAS_NUM_THREADS set alike), OMP_WAIT_POLICY "
              f"{mach.get('omp_wait_policy', 'default')}"
              + "".join(f", {kv}" for kv in mach.get("env", [])) + ", LibTorch "
              f"{res['context'].get('torch_version') or next((t['torch_version'] for t in res['train'] if 'torch_version' in t), '?')} (Debian, OpenBLAS), {mach['date']}, commit {mach['commit']}; load average (1, 5, 15 min) before "
              f"{', '.join(f'{v:.2f}' for v in mach.get('load_before', res['context'].get('load_avg', [])))}"
              + (f", after {', '.join(f'{v:.2f}' for v in mach['load_after'])}" if "load_after" in mach else "")
              + ".")
    md.append("")
    step = res["step_raw"]
    if step:
        md.append(f"### Optimizer step, one parameter (median of {res['settings']['repetitions']} interleaved "
                  f"repetitions, inner rule AdamW)")
        md.append("")
        for n, m in shapes_of(step):
            md.append(f"**{n}x{m}**")
            md.append("")
            md.append(step_table(step, n, m))
            md.append("")
        md.append("Targets (4096x4096, ratios from the same run):")
        md.append("")
        md.append("| target | measured (wall clock) | limit | met | same ratio in process CPU time |")
        md.append("|---|---:|---:|---|---:|")
        for t in res["targets"]:
            op = t.get("op", ">=" if "state" in t["target"] else "<=")
            met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
            cpu = f"{t['cpu']:.3f}x" if t.get("cpu") else "-"
            md.append(f"| {t['target']} | {t['shown']} | {op} {t['limit']} | {met} | {cpu} |")
        md.append("")
        mismatch = [f"{k[0]} {k[1]}x{k[2]} r={k[3]}" for k, v in sorted(step.items())
                    if v["measured_bytes"] != v["state_bytes"]]
        md.append("State bytes reported by `LowRankOptimizer::report()` equal the bytes of the state tensors held "
                  "after the run for every row" if not mismatch else
                  "**report() and the state tensors held after the run differ for: " + ", ".join(mismatch) + "**")
        md.append("")
        if res["linearity"]:
            md.append("Cost model, least-squares fit `time = a + b·work` over every shape and rank:")
            md.append("")
            md.append("| method | work | points | a [ms] | b [ns per unit] | R² |")
            md.append("|---|---|---:|---:|---:|---:|")
            for f in res["linearity"]:
                md.append(f"| {f['method']} | {f['work']} | {f['points']} | {f['intercept_ms']:.2f} | "
                          f"{f['ms_per_unit'] * 1e6:.4f} | {f['r2']:.4f} |")
            md.append("")
        if not img_rel.startswith(".."):  # plots kept with the docs only
            md.append(f"![step time vs rank]({img_rel}/step_vs_rank.svg)")
            if len({n for (_, n, m, _) in step if n == m}) >= 2:  # plotted only from two square shapes
                md.append(f"![step time vs n]({img_rel}/step_vs_n.svg)")
            md.append("")
    if res["train"]:
        t0 = res["train"][0]
        rounds = max(t["rounds"] for t in train_modes(res["train"]).values())
        md.append(f"### Training step: {t0['layers']} x Linear({t0['dim']}, {t0['dim']}, bias=False) with GELU, "
                  f"batch {t0['batch']}, rank {t0['rank']}")
        md.append("")
        md.append(f"Each configuration ran in its own process, {rounds} times in rotation with the others; a "
                  f"cell is the median over those processes of each one's median of {t0['steps']} steps.")
        md.append("")
        md.append(train_table(res["train"]))
        md.append("")
    return "\n".join(md)


# ---------------------------------------------------------------- SVG

class Plot:
    """A log-log line plot written as SVG."""

    def __init__(self, title, xlabel, ylabel, width=640, height=420):
        self.title, self.xlabel, self.ylabel = title, xlabel, ylabel
        self.w, self.h = width, height
        self.left, self.right, self.top, self.bottom = 70, 150, 40, 55
        self.series = []  # (label, color, [(x, y)], dashed)

    def line(self, label, color, pts, dashed=False):
        pts = [(x, y) for x, y in pts if x > 0 and y > 0]
        if pts:
            self.series.append((label, color, sorted(pts), dashed))

    def _range(self, vals):
        lo, hi = math.floor(math.log10(min(vals))), math.ceil(math.log10(max(vals)))
        return lo, max(hi, lo + 1)

    def svg(self):
        xs = [p[0] for s in self.series for p in s[2]]
        ys = [p[1] for s in self.series for p in s[2]]
        x0, x1 = math.log2(min(xs)), math.log2(max(xs))
        if x1 == x0:
            x1 = x0 + 1
        y0, y1 = self._range(ys)
        pw, ph = self.w - self.left - self.right, self.h - self.top - self.bottom

        def px(x):
            return self.left + (math.log2(x) - x0) / (x1 - x0) * pw

        def py(y):
            return self.top + ph - (math.log10(y) - y0) / (y1 - y0) * ph

        o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.w}" height="{self.h}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{self.w}" height="{self.h}" fill="white"/>',
             f'<text x="{self.left + pw / 2}" y="22" text-anchor="middle" font-size="14">{self.title}</text>']
        # grid and ticks
        for e in range(y0, y1 + 1):
            for k in (1, 2, 5):
                v = k * 10 ** e
                if v < 10 ** y0 or v > 10 ** y1:
                    continue
                y = py(v)
                o.append(f'<line x1="{self.left}" y1="{y:.1f}" x2="{self.left + pw}" y2="{y:.1f}" '
                         f'stroke="{"#ccc" if k == 1 else "#eee"}"/>')
                o.append(f'<text x="{self.left - 6}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>')
        xt = sorted(set(xs))
        for v in xt:
            x = px(v)
            o.append(f'<line x1="{x:.1f}" y1="{self.top}" x2="{x:.1f}" y2="{self.top + ph}" stroke="#eee"/>')
            o.append(f'<text x="{x:.1f}" y="{self.top + ph + 16}" text-anchor="middle">{v:g}</text>')
        o.append(f'<rect x="{self.left}" y="{self.top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>')
        o.append(f'<text x="{self.left + pw / 2}" y="{self.h - 15}" text-anchor="middle">{self.xlabel}</text>')
        o.append(f'<text transform="translate(18,{self.top + ph / 2}) rotate(-90)" text-anchor="middle">'
                 f'{self.ylabel}</text>')
        for i, (label, color, pts, dashed) in enumerate(self.series):
            d = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            dash = ' stroke-dasharray="6,4"' if dashed else ""
            o.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
            for x, y in pts:
                o.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>')
            ly = self.top + 10 + 18 * i
            lx = self.left + pw + 12
            o.append(f'<line x1="{lx}" y1="{ly}" x2="{lx + 22}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/>')
            o.append(f'<text x="{lx + 28}" y="{ly + 4}">{label}</text>')
        o.append("</svg>")
        return "\n".join(o) + "\n"


def plots(step, img_dir):
    os.makedirs(img_dir, exist_ok=True)
    written = []
    big = max(((n, m) for (_, n, m, _) in step if n == m), default=None, key=lambda s: s[0])
    if big:
        n, m = big
        p = Plot(f"Optimizer step, {n}x{m} parameter", "rank r", "time per step [ms]")
        ranks = sorted({r for (_, a, b, r) in step if (a, b) == big and r > 0})
        for meth in METHODS:
            p.line(meth, COLORS[meth], [(r, step[(meth, n, m, r)]["median_ms"]) for r in ranks
                                        if (meth, n, m, r) in step])
        for base, label in (("adamw", "torch AdamW"), ("sgd", "torch SGD")):
            if (base, n, m, 0) in step:
                t = step[(base, n, m, 0)]["median_ms"]
                p.line(label, COLORS[base], [(r, t) for r in ranks], dashed=True)
        with open(os.path.join(img_dir, "step_vs_rank.svg"), "w") as f:
            f.write(p.svg())
        written.append("step_vs_rank.svg")
    squares = sorted({n for (_, n, m, _) in step if n == m})
    if len(squares) >= 2:
        r = 8
        p = Plot(f"Optimizer step vs n (n = m, rank {r})", "n", "time per step [ms]")
        for meth in METHODS:
            p.line(f"{meth} r={r}", COLORS[meth], [(n, step[(meth, n, n, r)]["median_ms"]) for n in squares
                                                  if (meth, n, n, r) in step])
        for base, label in (("adamw", "torch AdamW"), ("sgd", "torch SGD")):
            p.line(label, COLORS[base], [(n, step[(base, n, n, 0)]["median_ms"]) for n in squares
                                         if (base, n, n, 0) in step], dashed=True)
        with open(os.path.join(img_dir, "step_vs_n.svg"), "w") as f:
            f.write(p.svg())
        written.append("step_vs_n.svg")
    return written


# ---------------------------------------------------------------- main

def update_docs(path, md, command, section="bench"):
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    with open(path) as f:
        text = f.read()
    if begin not in text or end not in text:
        raise SystemExit(f"{path}: markers {begin} / {end} not found")
    block = f"{begin}\n<!-- written by: {command} -->\n\n{md}\n{end}"
    text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    with open(path, "w") as f:
        f.write(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(ROOT, "build"), help="CMake build folder")
    ap.add_argument("--threads", type=int, default=2, help="torch / OpenMP / OpenBLAS threads (default 2)")
    ap.add_argument("--repetitions", type=int, default=3, help="interleaved repetitions per step benchmark")
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds per repetition (Google Benchmark)")
    ap.add_argument("--filter", default="", help="regex passed to --benchmark_filter of the step benchmark")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per configuration")
    ap.add_argument("--rounds", type=int, default=3, help="processes per configuration, in rotation")
    ap.add_argument("--skip-step", action="store_true", help="do not run the optimizer-step benchmark")
    ap.add_argument("--skip-train", action="store_true", help="do not run the training-step benchmark")
    ap.add_argument("--render-only", action="store_true", help="re-render from the JSON already in --out")
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "bench"))
    ap.add_argument("--img", default=os.path.join(ROOT, "docs", "img"))
    ap.add_argument("--update-docs", action="store_true", help="write the tables into docs/performance.md")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="set in the benchmarks' environment (repeatable), e.g. OPENBLAS_THREAD_TIMEOUT=4")
    ap.add_argument("--omp-wait-policy", choices=["default", "active", "passive"], default="default",
                    help="OMP_WAIT_POLICY for the runs (passive: idle OpenMP threads sleep instead of spinning)")
    ap.add_argument("--docs-section", default="bench", help="marker name in docs/performance.md (bench:begin)")
    args = ap.parse_args()

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads))
    env.pop("OMP_WAIT_POLICY", None)
    if args.omp_wait_policy != "default":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    for kv in args.env:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            ap.error(f"--env expects KEY=VALUE, got '{kv}'")
        env[key] = value
    load_before = os.getloadavg()
    if not args.render_only:
        run_benchmarks(args, env)

    step_path, train_path = os.path.join(args.out, "step.json"), os.path.join(args.out, "train.json")
    old = os.path.join(args.out, "results.json")
    if args.render_only and os.path.exists(old):
        machine = json.load(open(old))["machine"]  # the machine and time of the run, not of the rendering
        machine.setdefault("omp_wait_policy", "default")
    else:
        machine = dict(machine_info(args.threads), omp_wait_policy=args.omp_wait_policy, env=args.env,
                       load_before=list(load_before), load_after=list(os.getloadavg()))
    step, context = load_step(step_path) if os.path.exists(step_path) else ({}, {})
    train = json.load(open(train_path)) if os.path.exists(train_path) else []
    res = {
        "machine": machine,
        "settings": {k: getattr(args, k) for k in ("threads", "repetitions", "min_time", "layers", "dim", "batch",
                                                   "rank", "steps")},
        "context": context,
        "step": [dict(method=k[0], n=k[1], m=k[2], r=k[3], **v,
                      ratio_to_adamw=ratio(step, k[0], k[1], k[2], k[3])) for k, v in sorted(step.items())],
        "step_raw": step,
        "targets": targets(step) if step else [],
        "linearity": linearity(step) if step else [],
        "train": train,
    }
    img_rel = os.path.relpath(args.img, os.path.join(ROOT, "docs"))
    md = render_markdown(res, img_rel)
    written = plots(step, args.img) if step else []
    del res["step_raw"]
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(args.out, "tables.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    print(f"\nwrote {args.out}/results.json, tables.md; plots: {', '.join(written) or 'none'}", file=sys.stderr)
    if args.update_docs:
        cmd = "scripts/bench.py " + " ".join(a for a in sys.argv[1:] if not a.startswith("--build") and a != "--render-only")
        update_docs(os.path.join(ROOT, "docs", "performance.md"), md, cmd.strip(), args.docs_section)


if __name__ == "__main__":
    main()
