#!/usr/bin/env python3
"""Generate the dequantization fixtures of tests/quant.rs from gguf-py, an
independent implementation of ggml's formats (`gguf.quants.dequantize`).

For every tensor type Brigade parses, a few blocks of seeded random bytes are
dequantized by gguf-py; Brigade's scalar reference dequantizers
(`brigade::quant::dequantize_row`) must reproduce the outputs bit for bit.
The random bytes cover every bit pattern of the quants and packed scales; only
the f16 scale fields (and the F16/BF16/F32 values) are fixed up to be finite
(an all-ones exponent gets its top exponent bit cleared), so subnormal and
large scales stay in.

Nothing here runs in CI. Run it by hand when a type is added; it overwrites
its outputs (the same seed gives the same files).

Setup (outside the repo):

    python3 -m venv /tmp/quantenv
    /tmp/quantenv/bin/pip install gguf==0.19.0 numpy

Run (from the repo root, a second):

    /tmp/quantenv/bin/python tests/reference/make_quant_fixtures.py

With `--gguf PATH` it also dequantizes every tensor of a real GGUF file
(except `token_embd.weight`, the largest) and writes the sha256 of each
tensor's f32 outputs (little-endian bytes) to
tests/fixtures/quant/real/<file stem>.json (used by the ignored test
`real_model_tensors_dequantize_like_gguf_py`; Gemma 3 270M Q4_K_M:
`--gguf ~/.cache/brigade/models/gemma-3-270m-q4_k_m.gguf`).

It also quantizes seeded values with gguf-py (`gguf.quants.quantize`, which
matches ggml's `quantize_row_*_ref`) for every type Brigade has a reference
quantizer for, into tests/fixtures/quant/quantize.json:
{"<TYPE>": {"input_f32_bits": "<hex, 8 digits per value>", "bytes": "<hex>"}}.

Output: tests/fixtures/quant/<TYPE>.json, one per type:

    {"type": "Q4_K", "ggml_type": 12, "block_size": 256, "type_size": 144,
     "gguf_py": "0.19.0", "n_elements": 1024,
     "bytes": "<hex of the tensor bytes>",
     "f32_bits": "<hex of the outputs, 8 digits (u32 bit pattern, big-endian
                   digits) per element, in order>"}
"""

import argparse
import hashlib
import json
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "quant"
SEED = 0x5EED_0011

# type -> (blocks, byte offsets of the f16 fields inside one block)
TYPES = {
    "Q4_0": (8, [0]),
    "Q4_1": (8, [0, 2]),
    "Q5_0": (8, [0]),
    "Q5_1": (8, [0, 2]),
    "Q8_0": (8, [0]),
    "Q2_K": (4, [80, 82]),
    "Q3_K": (4, [108]),
    "Q4_K": (4, [0, 2]),
    "Q5_K": (4, [0, 2]),
    "Q6_K": (4, [208]),
    "IQ4_NL": (8, [0]),
    "IQ4_XS": (4, [0]),
}
# float types: element count, bytes per element
FLOATS = {"F32": (64, 4), "F16": (64, 2), "BF16": (64, 2)}


def finite_f16(bits: np.ndarray) -> np.ndarray:
    """Clears the top exponent bit where the exponent is all ones (inf/NaN)."""
    bad = (bits & 0x7C00) == 0x7C00
    return np.where(bad, bits & ~np.uint16(0x4000), bits).astype(np.uint16)


def finite_bf16(bits: np.ndarray) -> np.ndarray:
    bad = (bits & 0x7F80) == 0x7F80
    return np.where(bad, bits & ~np.uint16(0x4000), bits).astype(np.uint16)


def finite_f32(bits: np.ndarray) -> np.ndarray:
    bad = (bits & 0x7F800000) == 0x7F800000
    return np.where(bad, bits & ~np.uint32(0x40000000), bits).astype(np.uint32)


def make(name: str, rng: np.random.Generator) -> dict:
    qtype = GGMLQuantizationType[name]
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if name in FLOATS:
        n, width = FLOATS[name]
        raw = rng.integers(0, 256, size=n * width, dtype=np.uint8)
        if name == "F32":
            raw = finite_f32(raw.view("<u4")).view(np.uint8)
        elif name == "F16":
            raw = finite_f16(raw.view("<u2")).view(np.uint8)
        else:
            raw = finite_bf16(raw.view("<u2")).view(np.uint8)
        data = raw.copy()
    else:
        n_blocks, f16_offsets = TYPES[name]
        data = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
        for off in f16_offsets:
            field = np.ascontiguousarray(data[:, off : off + 2]).view("<u2")
            data[:, off : off + 2] = finite_f16(field).view(np.uint8).reshape(n_blocks, 2)
        n = n_blocks * block_size
        data = data.reshape(-1)
    out = np.asarray(dequantize(data, qtype), dtype=np.float32).reshape(-1)
    assert out.size == n, (name, out.size, n)
    assert np.all(np.isfinite(out)), name
    return {
        "type": name,
        "ggml_type": int(qtype),
        "block_size": block_size,
        "type_size": type_size,
        "gguf_py": version("gguf"),
        "n_elements": n,
        "bytes": data.tobytes().hex(),
        "f32_bits": "".join(f"{b:08x}" for b in out.view(np.uint32).tolist()),
    }


QUANTIZE_TYPES = ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]


def quantize_inputs() -> np.ndarray:
    """8 blocks of 32: normal values at several magnitudes (one giving f16
    subnormal scales), an all-zero block, and a block of halves (ties)."""
    rng = np.random.default_rng(SEED + 1)
    scales = [1e-3, 0.1, 1.0, 10.0, 100.0, 1e-6, 0.0]
    blocks = [rng.standard_normal(32).astype(np.float32) * np.float32(sc) for sc in scales]
    blocks.append((rng.integers(-16, 17, size=32) / 2).astype(np.float32))
    return np.concatenate(blocks).astype(np.float32)


def quantize_fixture() -> dict:
    x = quantize_inputs()
    out = {}
    for name in QUANTIZE_TYPES:
        q = np.asarray(quantize(x, GGMLQuantizationType[name]))
        out[name] = {
            "input_f32_bits": "".join(f"{b:08x}" for b in x.view(np.uint32).tolist()),
            "bytes": q.tobytes().hex(),
        }
    return out


def real_file(path: Path) -> None:
    reader = GGUFReader(path)
    tensors = {}
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            continue
        out = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype="<f4").reshape(-1)
        tensors[t.name] = {
            "type": t.tensor_type.name,
            "n_elements": int(out.size),
            "sha256": hashlib.sha256(out.tobytes()).hexdigest(),
        }
    fixture = {"file": path.name, "file_bytes": path.stat().st_size, "gguf_py": version("gguf"), "tensors": tensors}
    dest = OUT / "real" / f"{path.stem}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(fixture, indent=1, sort_keys=True) + "\n")
    print(f"{dest}: {len(tensors)} tensors")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", type=Path, help="also hash the dequantized tensors of this GGUF file")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    total = 0
    for name in [*FLOATS, *TYPES]:
        fixture = make(name, rng)
        path = OUT / f"{name}.json"
        text = json.dumps(fixture, indent=1) + "\n"
        path.write_text(text)
        total += len(text)
        print(f"{path.relative_to(OUT.parent.parent.parent)}: {fixture['n_elements']} elements, {len(text)} bytes")
    text = json.dumps(quantize_fixture(), indent=1) + "\n"
    (OUT / "quantize.json").write_text(text)
    total += len(text)
    print(f"tests/fixtures/quant/quantize.json: {len(text)} bytes")
    print(f"total {total} bytes")
    if args.gguf:
        real_file(args.gguf.expanduser())
    return 0


if __name__ == "__main__":
    sys.exit(main())
