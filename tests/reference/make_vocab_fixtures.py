#!/usr/bin/env python3
"""Records Hugging Face ids for tricky strings, per vocabulary, into tests/fixtures/vocab/.

For each vocab-only GGUF of llama.cpp's test data (scripts/fetch-test-data.sh) that
transformers can turn into a tokenizer (AutoTokenizer.from_pretrained(dir, gguf_file=...)),
and for the Gemma 3 270M model GGUF, writes tests/fixtures/vocab/<name>.json:
    {"vocab": name, "source": gguf file name, "hf_class": ..., "transformers": version,
     "cases": [{"text": ..., "ids": [...]}, ...]}
with ids = tokenizer.encode(text, add_special_tokens=False). tests/tokenizer_vocab.rs
compares Brigade's `encode(text, false)` with them.

Where HF's GGUF conversion and llama.cpp disagree, llama.cpp is the reference (its own
.inp/.out cases are checked first); the Rust test lists the known differences:
- llama-spm (Llama 2): llama.cpp always puts "▁" in front of the text, the conversion
  does not when the text already starts with a space (2 strings).
- falcon: the conversion drops Falcon's punctuation and 3-digit splits (2 strings).

Run by hand (CI does not run it):
    HF_HUB_OFFLINE=1 /tmp/refenv/bin/python tests/reference/make_vocab_fixtures.py
Environment: BRIGADE_LLAMACPP_DATA (default ~/.cache/brigade/llamacpp-0.3.36),
BRIGADE_HOME (default ~/.cache/brigade/models, for the Gemma 3 GGUF).
"""
import json
import os
import pathlib
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "vocab"
DATA = pathlib.Path(os.environ.get("BRIGADE_LLAMACPP_DATA",
                                   pathlib.Path.home() / ".cache/brigade/llamacpp-0.3.36")) / "models"
MODELS = pathlib.Path(os.environ.get("BRIGADE_HOME", pathlib.Path.home() / ".cache/brigade/models"))

# Our own tricky strings: unicode, whitespace runs, digits, code, emoji, CJK.
TEXTS = [
    "Hello, world!",
    " leading space and trailing space ",
    "tabs\tand\t\ttabs",
    "two  spaces,   three,    four",
    "line one\nline two\n\n\nafter three newlines\r\nCRLF",
    "   \n   ",
    "1234567890 3.14159 -42 1,000,000 0x1F 12e-3",
    "Ünïcödé façade naïve coöperate Ærøskøbing",
    "Привет, мир! Γειά σου Κόσμε",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷",
    "def f(x):\n    return x ** 2  # square\n",
    "fn main() { let v: Vec<u32> = (0..10).collect(); println!(\"{v:?}\"); }",
    "<html><body class=\"x\">&amp; &lt;tag&gt;</body></html>",
    "It's can't won't they're we've I'd you'll SHE'S",
    "snake_case camelCase PascalCase kebab-case SCREAMING_CASE",
    "math: ∑_{i=1}^{n} i² = n(n+1)/2 ≤ ∞ → ∀x∃y",
    "mixed العربية עברית हिन्दी ไทย",
    "\u00a0non-breaking\u00a0space and\u2003em space",
    "a" * 40 + " " + "ab" * 20,
]

# (fixture name, GGUF path). Vocabularies transformers cannot convert (mpt, command-r,
# refact: "architecture not supported", gemma-4) are left out.
VOCABS = [
    ("llama-bpe", DATA / "ggml-vocab-llama-bpe.gguf"),
    ("qwen2", DATA / "ggml-vocab-qwen2.gguf"),
    ("llama-spm", DATA / "ggml-vocab-llama-spm.gguf"),
    ("phi-3", DATA / "ggml-vocab-phi-3.gguf"),
    ("gpt-2", DATA / "ggml-vocab-gpt-2.gguf"),
    ("falcon", DATA / "ggml-vocab-falcon.gguf"),
    ("starcoder", DATA / "ggml-vocab-starcoder.gguf"),
    ("gemma-3-270m", MODELS / "gemma-3-270m-q4_k_m.gguf"),
]


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    only = set(sys.argv[1:])
    for name, path in VOCABS:
        if only and name not in only:
            continue
        if not path.is_file():
            print(f"skip {name}: {path} not found", file=sys.stderr)
            continue
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        cases = [{"text": t, "ids": tok.encode(t, add_special_tokens=False)} for t in TEXTS]
        doc = {
            "vocab": name,
            "source": path.name,
            "hf_class": type(tok).__name__,
            "transformers": transformers.__version__,
            "cases": cases,
        }
        (OUT / f"{name}.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
        print(f"wrote {name}: {len(cases)} cases", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
