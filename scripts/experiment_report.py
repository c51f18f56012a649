#!/usr/bin/env python3
"""The experiment's report, generated from the files of `gradlora compare`.

Reads <out>/results.csv, frontier.csv, pretrain.csv and the tables compare
wrote (results.md, sweep.md, frontier.md), answers the experiment's two
questions with the numbers in them, and writes <out>/report.md:

    scripts/experiment_report.py out/experiment

With --images DIR, copies the run's compare.svg, frontier.svg and
pretrain.svg there (as experiment_<name>.svg). With --write FILE (repeatable), also replaces every block of FILE between
`<!-- experiment:NAME:begin -->` and `<!-- experiment:NAME:end -->` by the
part NAME of the report (pretrain, results, sweep, frontier, answers), so
that the text and the numbers of README.md and docs/experiment.md cannot
drift apart; --prefix P reads `<!-- P-experiment:NAME:... -->` instead (the
larger setting: --prefix large).

A difference is called resolved when it exceeds twice its standard error
(sqrt(sd1^2/n1 + sd2^2/n2) over the seeds); otherwise the report says the
evidence is too weak to decide.
"""
import argparse
import csv
import math
import os
import re
import shutil
import sys


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def num(s):
    return float(s) if s not in ("", None) else math.nan


def pm(mean, sd, digits=3):
    if math.isnan(mean):
        return "—"
    if math.isnan(sd):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def compare(a, b):
    """(difference a - b, its standard error, resolved?) of two (mean, sd, n)."""
    (ma, sa, na), (mb, sb, nb) = a, b
    d = ma - mb
    if na < 2 or nb < 2 or math.isnan(sa) or math.isnan(sb):
        return d, math.nan, False
    se = math.sqrt(sa * sa / na + sb * sb / nb)
    return d, se, abs(d) > 2 * se


class Run:
    def __init__(self, out):
        self.out = out
        self.results = {r["method"]: r for r in read_csv(os.path.join(out, "results.csv"))}
        fpath = os.path.join(out, "frontier.csv")
        self.frontier = read_csv(fpath) if os.path.exists(fpath) else []
        ppath = os.path.join(out, "pretrain.csv")
        self.pretrain = read_csv(ppath) if os.path.exists(ppath) else []

    def text(self, name):
        path = os.path.join(self.out, name)
        return open(path).read().strip() if os.path.exists(path) else ""

    def levels(self):
        seen = []
        for r in self.frontier:
            if float(r["level"]) not in seen:
                seen.append(float(r["level"]))
        return seen

    def at(self, method, level, kind="chosen"):
        for r in self.frontier:
            if r["method"] == method and r["kind"] == kind and float(r["level"]) == level:
                return num(r["mean"]), num(r["sd"]), int(r["n"]), r["lr"]
        return math.nan, math.nan, 0, ""

    def final(self, method):
        r = self.results[method]
        return num(r["eval_after_mean"]), num(r["eval_after_sd"]), int(r["seeds"]) - int(r["diverged"])

    def seeds(self):
        return next(iter(self.results.values()))["seeds"]


def pretrain_text(run):
    if not run.pretrain:
        return ""
    rows = run.pretrain
    top = max(num(r["lr"]) for r in rows)
    last = rows[-1]
    phases = [r.get("phase") or "" for r in rows]  # absent from the curves of older caches
    if "schedule" in phases or (not any(phases) and sum(1 for r in rows if num(r["lr"]) == top) < 2):
        # No constant phase: the plateau rule was off (warm-up, then the cosine decay).
        return (
            f"Pre-training: {last['step']} steps (warm-up and cosine decay, no plateau rule); validation loss on A "
            f"{num(last['val_loss']):.3f} and held-out (test) loss on A {num(last['test_loss']):.3f} at the end "
            f"(nats per byte; the curve: `pretrain.csv`, `pretrain.svg`)."
        )
    if "budget" in phases:
        at_plateau = rows[phases.index("budget")]
        until, where = "until the budget ran out, without a plateau", "at the end of the budget"
    else:
        stable = max(int(r["step"]) for r in rows if num(r["lr"]) == top)
        at_plateau = next(r for r in rows if int(r["step"]) == stable)
        until, where = "until the plateau", "at the plateau"
    stable = int(at_plateau["step"])
    cooled = int(last["step"]) > stable
    return (
        f"Pre-training: {last['step']} steps"
        + (f" ({stable} at constant lr {until}, then {int(last['step']) - stable} of cool-down)" if cooled else "")
        + f"; validation loss on A {num(at_plateau['val_loss']):.3f} {where}, {num(last['val_loss']):.3f} at the end; "
        f"held-out (test) loss on A {num(at_plateau['test_loss']):.3f} {where}, {num(last['test_loss']):.3f} at "
        f"the end (nats per byte; the curve: `pretrain.csv`, `pretrain.svg`)."
    )


def matched_clause(run, a, b):
    """Per level: 'L: a ± s vs b ± t' and the verdict of each level."""
    parts, verdicts, unreached = [], [], []
    for level in run.levels():
        ma, sa, na, _ = run.at(a, level)
        mb, sb, nb, _ = run.at(b, level)
        if na == 0 or nb == 0:
            unreached.append((level, a if na == 0 else b))
            continue
        d, se, ok = compare((ma, sa, na), (mb, sb, nb))
        verdict = ("less" if d < 0 else "more") if ok else "unresolved"
        tag = f"{verdict}, resolved" if ok else "not resolved"
        parts.append(f"{pm(ma, sa)} vs {pm(mb, sb)} at B = {level:g} ({tag})")
        verdicts.append(verdict)
    return parts, verdicts, unreached


def envelope_clause(run, a, b):
    parts = []
    for level in run.levels():
        ma, _, na, la = run.at(a, level, "envelope")
        mb, _, nb, lb = run.at(b, level, "envelope")
        if na and nb:
            parts.append(f"{ma:.3f} (lr {la}) vs {mb:.3f} (lr {lb}) at {level:g}")
    return parts


def answer_forgetting(run, a="random", b="lora"):
    if a not in run.results or b not in run.results or not run.frontier:
        return ""
    parts, verdicts, unreached = matched_clause(run, a, b)
    resolved = [v for v in verdicts if v != "unresolved"]
    # Levels run from little learning to much: "less" first and "more" after is an early advantage that goes.
    first_more = next((i for i, v in enumerate(verdicts) if v == "more"), len(verdicts))
    early_only = (resolved and "less" in verdicts[:first_more] and "more" in verdicts
                  and "less" not in verdicts[first_more:])
    if early_only:
        head = "Only early in fine-tuning: it forgets less at the first level, more at the later ones"
    elif resolved and all(v == "less" for v in resolved):
        head = "Yes" if len(resolved) == len(verdicts) else "Partly"
    elif resolved and all(v == "more" for v in resolved):
        head = "No: it forgets more" if len(resolved) == len(verdicts) else "No, where the difference is resolved: it forgets more"
    elif resolved:
        head = "It depends on how much is learned"
    else:
        head = "Not decided by this evidence"
    weak = [f"{lv:g}" for lv, v in zip([l for l in run.levels() if all(run.at(m, l)[2] for m in (a, b))], verdicts)
            if v == "unresolved"]
    s = (f"**Does `{a}` forget less than `{b}` at the same learning?** {head} — at matched held-out loss on B its "
         f"forgetting is {'; '.join(parts) if parts else 'not comparable (no common level)'} "
         f"(mean ± sd over {run.seeds()} seeds, each method at its chosen learning rate")
    if unreached:
        s += "; " + ", ".join(f"`{m}` never reaches B = {lv:g}" for lv, m in unreached)
    env = envelope_clause(run, a, b)
    if env:
        s += "; the least forgetting over the swept rates, one seed: " + "; ".join(env)
    s += ")"
    s += (f", and the evidence is too weak to decide at B = {', '.join(weak)} (difference within twice its standard error)."
          if weak else ".")
    return s


def answer_additive(run, a="additive", b="lora"):
    if a not in run.results or b not in run.results:
        return ""
    fa, fb = run.final(a), run.final(b)
    d, se, ok = compare(fa, fb)
    if ok:
        head = "No, it learns less" if d > 0 else "Yes, and it learns more"
    else:
        head = "As good, within the seed spread"
    how = "validation-chosen learning rate" if run.results[a]["lr_chosen"] == "1" else "learning rate"
    s = (f"**Is `{a}` as good as `{b}`?** {head} — at its {how} ({run.results[a]['lr']}; "
         f"`{b}`: {run.results[b]['lr']}) it ends at a held-out loss on B of {pm(fa[0], fa[1], 4)} against "
         f"{pm(fb[0], fb[1], 4)} ({d:+.4f}, {'more than' if ok else 'within'} twice its standard error, "
         f"{run.seeds()} seeds)")
    parts, verdicts, unreached = matched_clause(run, a, b)
    if parts:
        s += f", and at matched learning it forgets {'; '.join(parts)}"

    if unreached:
        s += "; " + ", ".join(f"`{m}` never reaches B = {lv:g}" for lv, m in unreached)
    return s + "."


def report(run, q1=("random", "lora"), q2=("additive", "lora")):
    parts = {
        "pretrain": pretrain_text(run),
        "results": run.text("results.md"),
        "sweep": run.text("sweep.md"),
        "frontier": run.text("frontier.md"),
        "answers": "\n\n".join(x for x in (answer_forgetting(run, *q1), answer_additive(run, *q2)) if x),
    }
    return parts


def splice(path, parts, prefix):
    text = open(path).read()
    tag = f"{prefix}-experiment" if prefix else "experiment"
    found = 0
    for name, body in parts.items():
        pat = re.compile(rf"(<!-- {tag}:{name}:begin -->\n).*?(<!-- {tag}:{name}:end -->)", re.S)
        text, n = pat.subn(lambda m: m.group(1) + body + "\n" + m.group(2), text)
        found += n
    if found == 0:
        sys.exit(f"experiment_report.py: {path} has no <!-- {tag}:NAME:begin --> block")
    with open(path, "w") as f:
        f.write(text)
    print(f"updated {found} block(s) of {path}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="the --out folder of gradlora compare")
    ap.add_argument("--write", action="append", default=[], help="file whose experiment blocks to replace")
    ap.add_argument("--prefix", default="", help="block tag prefix (large: the larger setting)")
    ap.add_argument("--images", default="", help="copy compare.svg, frontier.svg, pretrain.svg here as "
                    "<prefix>experiment_<name>.svg")
    ap.add_argument("--forgetting", default="random,lora", help="question 1: does A forget less than B (A,B)")
    ap.add_argument("--additive", default="additive,lora", help="question 2: is A as good as B (A,B)")
    args = ap.parse_args()
    if not os.path.exists(os.path.join(args.out, "results.csv")):
        sys.exit(f"experiment_report.py: no {args.out}/results.csv: run gradlora compare first")
    q1, q2 = tuple(args.forgetting.split(",")), tuple(args.additive.split(","))
    if len(q1) != 2 or len(q2) != 2:
        sys.exit("experiment_report.py: --forgetting and --additive take two method names, A,B")
    run = Run(args.out)
    for opt, pair in (("--forgetting", q1), ("--additive", q2)):
        for name in pair:
            if name not in run.results:
                sys.exit(f"experiment_report.py: {opt} {','.join(pair)}: no method '{name}' in "
                         f"{args.out}/results.csv (it has {', '.join(run.results)})")
    parts = report(run, q1, q2)
    text = "\n\n".join(f"## {k}\n\n{v}" for k, v in parts.items() if v) + "\n"
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(text)
    print(parts["pretrain"])
    print()
    print(parts["answers"])
    for path in args.write:
        splice(path, parts, args.prefix)
    if args.images:
        for name in ("compare", "frontier", "pretrain"):
            src = os.path.join(args.out, name + ".svg")
            if os.path.exists(src):
                dst = os.path.join(args.images, f"{args.prefix + '_' if args.prefix else ''}experiment_{name}.svg")
                shutil.copyfile(src, dst)
                print(f"copied {src} to {dst}", file=sys.stderr)


if __name__ == "__main__":
    main()
