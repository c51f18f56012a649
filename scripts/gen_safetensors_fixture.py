#!/usr/bin/env python3
"""Writes the safetensors fixtures of tests/checkpoint with Python's standard
library only (struct + json), independently of the C++ writer under test.

  tests/data/safetensors/fixture.safetensors
      one tensor per supported dtype; header order differs from data order and
      the header is not padded (the C++ reader must not rely on either)
  tests/data/adapter_fixture/{adapter_model.safetensors, adapter_config.json}
      a PEFT LoRA adapter with rank_pattern / alpha_pattern
  tests/data/safetensors/adapter_fixture_expected.safetensors
      the weight changes scale * lora_B @ lora_A, computed here in Python floats
  tests/data/adapter_fixture_gpt2/{adapter_model.safetensors, adapter_config.json}
      what PEFT writes for a GPT-2-like model: an nn.Embedding `wte` (square
      table, 5 x 5) as lora_embedding_A (r, num_embeddings) and lora_embedding_B
      (embedding_dim, r), and a Conv1D `attn.c_proj` (weight stored (in, out),
      square 4 x 4) as lora_A (r, in), lora_B (out, r) with fan_in_fan_out: true
  tests/data/safetensors/adapter_fixture_gpt2_expected.safetensors
      their weight changes by PEFT's formulas, in the stored layout:
      Embedding (lora_embedding_B @ lora_embedding_A)^T * scale,
      Conv1D (lora_B @ lora_A)^T * scale

Usage: python3 scripts/gen_safetensors_fixture.py   (from the repository root)
"""
import json
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def bf16_bytes(values):
    # Values are exactly representable in bfloat16: the top half of the float32 bits.
    return b"".join(struct.pack("<I", struct.unpack("<I", struct.pack("<f", v))[0])[2:] for v in values)


def pack(dtype, values):
    fmt = {"F64": "d", "F32": "f", "F16": "e", "I64": "q", "U8": "B", "BOOL": "?"}
    if dtype == "BF16":
        return bf16_bytes(values)
    return struct.pack("<%d%s" % (len(values), fmt[dtype]), *values)


def write(path, tensors, metadata=None, data_order=None):
    """tensors: list of (name, dtype, shape, flat values)."""
    order = data_order or [t[0] for t in tensors]
    by_name = {t[0]: t for t in tensors}
    data = b""
    offsets = {}
    for name in order:
        _, dtype, shape, values = by_name[name]
        blob = pack(dtype, values)
        offsets[name] = [len(data), len(data) + len(blob)]
        data += blob
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, _ in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": offsets[name]}
    text = json.dumps(header).encode("utf-8")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        f.write(data)


def matmul(b, a, rows, inner, cols):
    return [sum(b[i * inner + k] * a[k * cols + j] for k in range(inner)) for i in range(rows) for j in range(cols)]


def transpose(x, rows, cols):
    return [x[i * cols + j] for j in range(cols) for i in range(rows)]


def write_gpt2_fixture():
    # Square weights: a transposed change has the same shape, only its values tell.
    r = 2
    num, dim = 5, 5                                                  # wte: nn.Embedding(5, 5)
    emb_a = [(k - 4) / 8.0 for k in range(r * num)]                  # lora_embedding_A (r, num)
    emb_b = [(k + 1) / 16.0 * (-1) ** k for k in range(dim * r)]     # lora_embedding_B (dim, r)
    fin, fout = 4, 4                                                 # attn.c_proj: Conv1D(nf=4, nx=4), weight (in, out)
    conv_a = [(3 - k) / 4.0 for k in range(r * fin)]                 # lora_A (r, in)
    conv_b = [((k * 5) % 7 - 3) / 8.0 for k in range(fout * r)]      # lora_B (out, r)
    p = "base_model.model."
    write(os.path.join(ROOT, "tests/data/adapter_fixture_gpt2/adapter_model.safetensors"), [
        (p + "wte.lora_embedding_A", "F32", [r, num], emb_a),
        (p + "wte.lora_embedding_B", "F32", [dim, r], emb_b),
        (p + "attn.c_proj.lora_A.weight", "F32", [r, fin], conv_a),
        (p + "attn.c_proj.lora_B.weight", "F32", [fout, r], conv_b),
    ], {"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": 4,
        "rank_pattern": {},
        "alpha_pattern": {"attn.c_proj": 3},
        "target_modules": ["wte", "attn.c_proj"],
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": True,   # PEFT sets it for Conv1D; its Embedding layer ignores it
        "use_rslora": False,
        "inference_mode": True,
    }
    with open(os.path.join(ROOT, "tests/data/adapter_fixture_gpt2/adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    # Embedding: delta = (lora_embedding_B @ lora_embedding_A)^T * scale, (num, dim).
    d_emb = [4 / r * x for x in transpose(matmul(emb_b, emb_a, dim, r, num), dim, num)]
    # Conv1D, fan_in_fan_out: delta of the stored (in, out) weight = (lora_B @ lora_A)^T * scale.
    d_conv = [3 / r * x for x in transpose(matmul(conv_b, conv_a, fout, r, fin), fout, fin)]
    write(os.path.join(ROOT, "tests/data/safetensors/adapter_fixture_gpt2_expected.safetensors"), [
        ("wte.weight", "F64", [num, dim], d_emb),
        ("attn.c_proj.weight", "F64", [fin, fout], d_conv),
    ])


def main():
    tensors = [
        ("a.f32", "F32", [2, 3], [i * 0.25 - 1.0 for i in range(6)]),
        ("b.f64", "F64", [4], [1.0 / 3.0, -2.5, 1e-300, 6.02214076e23]),
        ("c.bf16", "BF16", [3, 2], [1.5, -2.0, 0.15625, 3.0, -0.0078125, 256.0]),
        ("d.f16", "F16", [2, 2], [0.5, -1.25, 65504.0, 1023 * 2.0 ** -24]),
        ("e.i64", "I64", [3], [-1, 2 ** 40, 7]),
        ("f.u8", "U8", [5], [0, 1, 127, 128, 255]),
        ("g.bool", "BOOL", [2], [True, False]),
        ("h.empty", "F32", [0, 3], []),
    ]
    write(os.path.join(ROOT, "tests/data/safetensors/fixture.safetensors"), tensors,
          {"writer": "gen_safetensors_fixture.py"}, data_order=[t[0] for t in reversed(tensors)])

    # PEFT adapter: layers.0.proj (3x4, r 2, alpha 4) and layers.1.proj (2x3, r 1, alpha 3).
    a0 = [(i - 3) / 8.0 for i in range(8)]                      # lora_A 2x4
    b0 = [(j + 1) / 4.0 * (-1) ** j for j in range(6)]          # lora_B 3x2
    a1 = [0.5, -1.0, 2.0]                                       # lora_A 1x3
    b1 = [1.5, -0.25]                                           # lora_B 2x1
    p = "base_model.model."
    write(os.path.join(ROOT, "tests/data/adapter_fixture/adapter_model.safetensors"), [
        (p + "layers.0.proj.lora_A.weight", "F32", [2, 4], a0),
        (p + "layers.0.proj.lora_B.weight", "F32", [3, 2], b0),
        (p + "layers.1.proj.lora_A.weight", "BF16", [1, 3], a1),
        (p + "layers.1.proj.lora_B.weight", "BF16", [2, 1], b1),
    ], {"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": 2,
        "lora_alpha": 4,
        "rank_pattern": {"1.proj": 1},
        "alpha_pattern": {"1.proj": 3},
        "target_modules": ["proj"],
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    with open(os.path.join(ROOT, "tests/data/adapter_fixture/adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    d0 = [4 / 2 * x for x in matmul(b0, a0, 3, 2, 4)]
    d1 = [3 / 1 * x for x in matmul(b1, a1, 2, 1, 3)]
    write(os.path.join(ROOT, "tests/data/safetensors/adapter_fixture_expected.safetensors"), [
        ("layers.0.proj.weight", "F64", [3, 4], d0),
        ("layers.1.proj.weight", "F64", [2, 3], d1),
    ])
    write_gpt2_fixture()


if __name__ == "__main__":
    main()
