#!/usr/bin/env python3
"""Ids that transformers' tokenizer for the Gemma 3 GGUF gives to whitespace-heavy texts,
for `gemma3_whitespace_runs_match_transformers` in tests/gemma3.rs (which lists them).

transformers builds that tokenizer from the GGUF's metadata
(`transformers.integrations.gguf.gguf_tokenizer_mapping.gemma_tokenizer`, then
`add_gguf_special_tokens`); this script calls the same two functions on metadata read with
the `gguf` package, so it needs no PyTorch (AutoTokenizer's GGUF path imports it).

Run (a venv with transformers >= 5 and gguf; about a minute):

    python tests/reference/gemma3_vocab_whitespace.py [~/.cache/brigade/models/gemma-3-270m-q4_k_m.gguf]

Prints one JSON line per text: [text, ids] (no BOS, as `encode(text, parse_special = true)`).
"""

import json
import os
import sys

import gguf
from transformers.integrations.gguf.gguf_tokenizer_mapping import add_gguf_special_tokens, gemma_tokenizer

TEXTS = [
    "a" + " " * 33 + "b",
    " " * 63,
    "x" + " " * 70 + "in",
    "\n" + " " * 40 + "return x",
    " " * 32 + "\u2581x",
    " " * 40 + "x",
    "a \u2581b",
    "\u2581\u2581 \u2581x",
    "x     \n\n   y",
    " \u2581 \u2581  ",
    "\t  \t",
]


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/brigade/models/gemma-3-270m-q4_k_m.gguf")
    fields = gguf.GGUFReader(path).fields

    def array(key, convert):
        field = fields[key]
        return [convert(field.parts[i]) for i in field.data]

    meta = {
        "tokenizer_type": "llama",
        "tokens": array("tokenizer.ggml.tokens", lambda p: bytes(p).decode()),
        "scores": array("tokenizer.ggml.scores", lambda p: float(p[0])),
        "token_type": array("tokenizer.ggml.token_type", lambda p: int(p[0])),
    }
    backend = add_gguf_special_tokens(gemma_tokenizer(meta), meta).backend_tokenizer
    for text in TEXTS:
        print(json.dumps([text, backend.encode(text, add_special_tokens=False).ids], ensure_ascii=False))


if __name__ == "__main__":
    main()
