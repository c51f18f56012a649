#!/usr/bin/env python3
"""Builds, briefly pre-trains and exports a tiny GPT-2-shaped causal language
model as a TorchScript file.

What it writes
    OUT.pt, a `torch.jit.script(model).save(OUT.pt)` archive of a
    `GPT2LMHeadModel` whose module and parameter names follow HuggingFace's
    GPT-2 (transformer.wte, transformer.h.0.attn.c_attn, ..., lm_head), with
    GPT-2's Conv1D layers (weight stored (in, out)) and an lm_head tied to the
    token embedding. Sizes: vocab 384, 64 positions, n_embd 32, 2 layers,
    2 heads. forward(input_ids: int64 (batch, T), T <= 64) returns float32
    logits (batch, T, 384).

    Before export the model is pre-trained for a few hundred steps on the
    bytes of /usr/share/common-licenses/GPL-3 (tokens = raw byte values
    0..255; ids 256..383 are valid but never seen), so that it "knows" a
    corpus before it is fine-tuned: the C++ trainer's forgetting measurement
    is taken against it. The first 90% of the bytes are trained on; the
    held-out mean cross-entropy on the last 10% is printed before and after.

    The output is committed as tests/data/gpt2_tiny/model.pt, so that no
    Python is needed at test time; this script only documents and reproduces
    how that file was made.

How to run it (from the repository root, Debian's python3-torch 1.13)
    /usr/bin/python3 scripts/export_gpt2.py tests/data/gpt2_tiny/model.pt
    /usr/bin/python3 scripts/export_gpt2.py OUT.pt --steps 300

It runs on one CPU thread in well under a minute and is deterministic: fixed
seeds, one thread, and a fixed PYTHONHASHSEED (the script re-executes itself
with PYTHONHASHSEED=0 if it is not set so), because TorchScript passes each
module's __constants__ through a Python set and writes them into the saved
code in that set's order, which otherwise changes from run to run. Two runs
write byte-identical files.
"""
import os
import sys

# Re-execute with a fixed string hash seed before anything else (see above).
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import argparse  # noqa: E402  (after the re-execution on purpose)
import math  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

CORPUS = "/usr/share/common-licenses/GPL-3"

# Model sizes.
VOCAB_SIZE = 384
N_POSITIONS = 64
N_EMBD = 32
N_LAYER = 2
N_HEAD = 2

# Pre-training settings.
LEARNING_RATE = 3e-3
BATCH_SIZE = 16
INIT_STD = 0.02


class Conv1D(nn.Module):
    """GPT-2's "Conv1D": a linear layer whose weight is stored (in, out).

    forward(x) = x @ weight + bias over the last dimension of x.
    """

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.n_out = n_out
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))
        nn.init.normal_(self.weight, std=INIT_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Flatten all leading dimensions, do one bias + x @ W, restore them.
        out_shape = list(x.shape[:-1])
        out_shape.append(self.n_out)
        flat = x.reshape(-1, x.shape[-1])
        out = torch.addmm(self.bias, flat, self.weight)
        return out.view(out_shape)


class Attention(nn.Module):
    """Causal multi-head self-attention, written out with matmul + softmax."""

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        assert n_embd % n_head == 0
        self.n_embd = n_embd
        self.n_head = n_head
        self.head_dim = n_embd // n_head
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.c_attn = Conv1D(n_embd, 3 * n_embd)  # q, k, v in one projection
        self.c_proj = Conv1D(n_embd, n_embd)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, C) -> (B, n_head, T, head_dim)
        b, t = x.shape[0], x.shape[1]
        return x.view(b, t, self.n_head, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[0], x.shape[1]
        qkv = self.c_attn(x)
        q, k, v = qkv.split(self.n_embd, dim=2)
        q = self.split_heads(q)
        k = self.split_heads(k)
        v = self.split_heads(v)

        # Scores (B, n_head, T, T); position i may attend to positions <= i.
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(causal.logical_not(), float("-inf"))
        weights = F.softmax(scores, dim=-1)

        # Weighted values, heads merged back: (B, T, C).
        y = torch.matmul(weights, v)
        y = y.transpose(1, 2).contiguous().view(b, t, self.n_embd)
        return self.c_proj(y)


class MLP(nn.Module):
    """Position-wise feed-forward: n_embd -> 4 n_embd -> GELU -> n_embd."""

    def __init__(self, n_embd: int):
        super().__init__()
        self.c_fc = Conv1D(n_embd, 4 * n_embd)
        self.c_proj = Conv1D(4 * n_embd, n_embd)
        # GPT-2 uses the tanh approximation of GELU ("gelu_new").
        self.act = nn.GELU(approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = Attention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT2Model(nn.Module):
    """Token + position embeddings, a stack of blocks, a final LayerNorm."""

    def __init__(self, vocab_size: int, n_positions: int, n_embd: int,
                 n_layer: int, n_head: int):
        super().__init__()
        self.n_positions = n_positions
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(n_positions, n_embd)
        self.h = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        nn.init.normal_(self.wte.weight, std=INIT_STD)
        nn.init.normal_(self.wpe.weight, std=INIT_STD)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        assert t <= self.n_positions, "sequence longer than n_positions"
        positions = torch.arange(t, dtype=torch.long, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(positions).unsqueeze(0)
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


class GPT2LMHeadModel(nn.Module):
    """GPT2Model plus a language-model head tied to the token embedding."""

    def __init__(self, vocab_size: int = VOCAB_SIZE,
                 n_positions: int = N_POSITIONS, n_embd: int = N_EMBD,
                 n_layer: int = N_LAYER, n_head: int = N_HEAD):
        super().__init__()
        self.transformer = GPT2Model(vocab_size, n_positions, n_embd,
                                     n_layer, n_head)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        # Weight tying as in GPT-2: one tensor, reachable under two names.
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.transformer(input_ids))


def load_corpus(path: str):
    """Returns (train, held_out) int64 token tensors: the file's raw bytes."""
    with open(path, "rb") as f:
        data = torch.tensor(list(f.read()), dtype=torch.long)
    split = int(0.9 * len(data))
    return data[:split], data[split:]


def random_batch(data: torch.Tensor, generator: torch.Generator):
    """BATCH_SIZE random windows of N_POSITIONS + 1 tokens: inputs, targets."""
    starts = torch.randint(0, len(data) - N_POSITIONS, (BATCH_SIZE,),
                           generator=generator)
    windows = torch.stack([data[s:s + N_POSITIONS + 1] for s in starts])
    return windows[:, :-1], windows[:, 1:]


def held_out_windows(data: torch.Tensor):
    """The held-out data cut into consecutive windows of N_POSITIONS + 1
    tokens that overlap by one, so each target token is predicted once."""
    starts = range(0, len(data) - N_POSITIONS, N_POSITIONS)
    windows = torch.stack([data[s:s + N_POSITIONS + 1] for s in starts])
    return windows[:, :-1], windows[:, 1:]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor):
    """Mean next-token cross-entropy in nats/token."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                           targets.reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor):
    was_training = model.training
    model.eval()
    loss = cross_entropy(model(inputs), targets).item()
    model.train(was_training)
    return loss


def main():
    parser = argparse.ArgumentParser(
        description="Pre-train and export a tiny GPT-2 as TorchScript.")
    parser.add_argument("out", help="path of the TorchScript file to write")
    parser.add_argument("--steps", type=int, default=300,
                        help="pre-training steps (default 300)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    start_time = time.time()

    train_data, held_data = load_corpus(CORPUS)
    held_inputs, held_targets = held_out_windows(held_data)
    print("corpus: %s, %d train / %d held-out tokens (%d windows)"
          % (CORPUS, len(train_data), len(held_data), len(held_inputs)))

    model = GPT2LMHeadModel()
    assert model.lm_head.weight is model.transformer.wte.weight
    n_params = sum(p.numel() for p in model.parameters())
    print("parameters: %d (tied lm_head counted once)" % n_params)

    # Pre-training.
    loss_before = evaluate(model, held_inputs, held_targets)
    print("held-out loss before pre-training: %.4f nats/token" % loss_before)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(1, args.steps + 1):
        inputs, targets = random_batch(train_data, generator)
        loss = cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == 1:
            print("step %4d  train loss %.4f" % (step, loss.item()))
    loss_after = evaluate(model, held_inputs, held_targets)
    print("held-out loss after pre-training:  %.4f nats/token" % loss_after)

    # Export.
    model.eval()
    scripted = torch.jit.script(model)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    scripted.save(args.out)

    # Reload and check it against the eager model on held-out data.
    loaded = torch.jit.load(args.out)
    loaded.eval()
    check_inputs = held_inputs[:4]
    with torch.no_grad():
        expected = model(check_inputs)
        got = loaded(check_inputs)
        # A shorter sequence must work too (T < n_positions).
        short_expected = model(check_inputs[:, :17])
        short_got = loaded(check_inputs[:, :17])
    assert got.dtype == torch.float32
    assert got.shape == (4, N_POSITIONS, VOCAB_SIZE)
    max_diff = (got - expected).abs().max().item()
    short_diff = (short_got - short_expected).abs().max().item()
    assert max_diff <= 1e-5, max_diff
    assert short_diff <= 1e-5, short_diff
    print("reloaded vs eager logits: max |diff| %.3g (T=64), %.3g (T=17)"
          % (max_diff, short_diff))

    # The tied weight must be one tensor. Python's named_parameters() drops
    # repeats of the same tensor, so it lists it once, as transformer.wte.
    names = [name for name, _ in loaded.named_parameters()]
    assert "lm_head.weight" not in names, names
    assert loaded.lm_head.weight.data_ptr() == \
        loaded.transformer.wte.weight.data_ptr()
    # The C++ torch::jit::Module::named_parameters() (what LibTorch sees)
    # walks the module slots without removing repeats: shown here through a
    # debug binding of the same C++ iterator, for information.
    cpp_params = torch._C._jit_debug_module_iterators(
        loaded._c)["named_parameters_r"]
    cpp_tied = [name for name, p in cpp_params
                if p.data_ptr() == loaded.transformer.wte.weight.data_ptr()]
    print("C++ named_parameters(): %d entries; the tied tensor under %s"
          % (len(cpp_params), " and ".join(cpp_tied)))

    print("parameters of the reloaded module:")
    for name, param in loaded.named_parameters():
        print("  %-36s %s" % (name, tuple(param.shape)))
    print("types: root %s (%s), c_attn %s (%s)"
          % (loaded.original_name, loaded._c.qualified_name,
             getattr(loaded.transformer.h, "0").attn.c_attn.original_name,
             getattr(loaded.transformer.h, "0").attn.c_attn._c.qualified_name))
    print("wrote %s (%d bytes) in %.1f s"
          % (args.out, os.path.getsize(args.out), time.time() - start_time))


if __name__ == "__main__":
    main()
