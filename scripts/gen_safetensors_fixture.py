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


if __name__ == "__main__":
    main()
