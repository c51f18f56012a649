#!/usr/bin/env python3
"""Writes tests/data/galore_adamw_hf/trajectory.txt: the trajectory of one weight
trained by GaLore with the AdamW of galore_torch (GaLoreAdamW, Zhao et al. 2024,
arXiv 2403.03507), computed here from the formulas, in float64, with PyTorch's
torch.linalg.svd.

The C++ test InnerRules.GaloreAdamwHfFollowsTheFixtureTrajectory runs gradlora's
`galore` with `optimizer.type: adamw_hf` on the same gradients and compares.

Per step t = 0, 1, ... with gradient G (n x m):
  * every `gap` steps (t % gap == 0) the projector is refreshed from the SVD of G,
    U S Vh = svd(G): n < m: Q = U[:, :r] (left, R = Q^T G); otherwise
    Q = Vh[:r, :]^T (right, R = G Q), galore_torch's side rule;
  * the moments are kept across refreshes (galore_torch's behaviour);
  * k = t + 1, M = b1 M + (1 - b1) R, V = b2 V + (1 - b2) R*R,
    step = lr sqrt(1 - b2^k) / (1 - b1^k),
    W = W - step * scale * back(M / (sqrt(V) + eps)),
    back(N) = Q N (left) or N Q^T (right);
  * then the decoupled decay of the updated weight, W = W - lr wd W.

galore_torch takes the SVD in float32 even for other dtypes; this reference stays
in float64 throughout so that the comparison sees the update formulas, not float32
rounding.

The gradients and the start weight come from splitmix64 (Steele, Lea & Flood
2014) seeded per case, as uniform values in [-1, 1) times the case's gradient
scale (the start weight: times 0.5), drawn row-major: first W0, then G_0, G_1,
... . The C++ test draws them with the same generator and checks its first
gradient against the one written here.

File format: '#' lines are comments; a line `case NAME key value ...` starts a
case; then lines `NAME t v1 v2 ...` with NAME W (the weight after t steps,
t = 0..steps), G (the gradient of step t, for t = 0 only) and Q (the projector
after the refresh at step t), values row-major as Python's repr of a float.

Usage: python3 scripts/galore_reference.py   (from the repository root; needs
Debian's python3-torch)
"""
import math
import os

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.normpath(os.path.join(ROOT, "tests", "data", "galore_adamw_hf", "trajectory.txt"))

MASK = (1 << 64) - 1

CASES = [
    # name, n, m, seed, gradient scale, weight decay
    ("left_g1", 8, 12, 1, 1.0, 0.1),
    ("right_g1e-3", 12, 8, 2, 1e-3, 0.1),
]
RANK, GAP, SCALE, LR, BETAS, EPS, STEPS = 4, 10, 0.25, 1e-2, (0.9, 0.999), 1e-6, 30


class SplitMix64:
    def __init__(self, seed):
        self.state = seed & MASK

    def next(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def uniform(self):
        """A double in [-1, 1): the top 53 bits as a fraction, times 2, minus 1."""
        return (self.next() >> 11) * (2.0 ** -53) * 2.0 - 1.0

    def matrix(self, n, m, scale):
        return torch.tensor([[self.uniform() * scale for _ in range(m)] for _ in range(n)], dtype=torch.float64)


def run(n, m, seed, gscale, wd):
    rng = SplitMix64(seed)
    W = rng.matrix(n, m, 0.5)
    grads = [rng.matrix(n, m, gscale) for _ in range(STEPS)]
    left = n < m
    b1, b2 = BETAS
    Q = M = V = None
    Ws, Qs = [W.clone()], {}
    for t in range(STEPS):
        G = grads[t]
        if t % GAP == 0:
            U, S, Vh = torch.linalg.svd(G, full_matrices=False)
            Q = U[:, :RANK] if left else Vh[:RANK, :].t()
            Qs[t] = Q.clone()
        R = Q.t() @ G if left else G @ Q
        if M is None:
            M = torch.zeros_like(R)
            V = torch.zeros_like(R)
        k = t + 1
        M = b1 * M + (1.0 - b1) * R
        V = b2 * V + (1.0 - b2) * R * R
        step = LR * math.sqrt(1.0 - b2 ** k) / (1.0 - b1 ** k)
        N = M / (V.sqrt() + EPS)
        back = (Q @ N if left else N @ Q.t()) * SCALE
        W = W - step * back
        W = W - LR * wd * W
        Ws.append(W.clone())
    return Ws, grads[0], Qs


def row(name, t, x):
    return f"{name} {t} " + " ".join(repr(v) for v in x.reshape(-1).tolist())


def main():
    lines = [
        "# GaLore with galore_torch's AdamW, from the formulas in float64: written by scripts/galore_reference.py",
        f"# torch {torch.__version__}; rank {RANK}, update_proj_gap {GAP}, scale {SCALE}, lr {LR}, "
        f"betas {BETAS[0]} {BETAS[1]}, eps {EPS}, {STEPS} steps",
    ]
    for name, n, m, seed, gscale, wd in CASES:
        Ws, G0, Qs = run(n, m, seed, gscale, wd)
        lines.append(
            f"case {name} n {n} m {m} seed {seed} grad_scale {gscale!r} weight_decay {wd!r} rank {RANK} "
            f"gap {GAP} scale {SCALE!r} lr {LR!r} beta1 {BETAS[0]!r} beta2 {BETAS[1]!r} eps {EPS!r} steps {STEPS}")
        lines.append(row("G", 0, G0))
        for t, Q in sorted(Qs.items()):
            lines.append(row("Q", t, Q))
        for t, W in enumerate(Ws):
            lines.append(row("W", t, W))
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
