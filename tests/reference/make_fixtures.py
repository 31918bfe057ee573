#!/usr/bin/env python3
"""Generate reference ("golden") fixtures for SmolLM2-135M-Instruct Q4_1 from an
independent implementation: Hugging Face `transformers` + `tokenizers` (PyTorch,
float32, CPU). Brigade's Rust tests compare against the JSON files this writes.

Nothing here runs in CI. Run it by hand when the fixtures need regenerating; it
simply overwrites its outputs.

Setup (outside the repo; the default torch wheel is large, CPU is enough):

    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch transformers accelerate gguf tokenizers jinja2 numpy
    scripts/fetch-model.sh            # caches the GGUF under ~/.cache/brigade/models

Run (from the repo root; takes a few minutes on 2 cores):

    HF_HUB_OFFLINE=1 /tmp/refenv/bin/python tests/reference/make_fixtures.py
    # optional: --model PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf

Outputs (tests/fixtures/golden/smollm2/):
    tokenization.json   tricky strings -> ids -> decoded text
    chat_template.json  message lists -> rendered prompt text and ids
    logits.json         teacher-forced top-20 logits / log-probs + logsumexp per position
    greedy.json         32-token greedy continuations (no early stop at EOS)
    perplexity.json     windowed perplexity of tests/fixtures/texts/declaration.txt

Conventions (the Rust side must follow these exactly):

* Model: transformers' GGUF loader dequantizes every tensor to float32 (checked
  bit-exact against `gguf.quants.dequantize`) and un-permutes attn_q/attn_k back
  to HF layout, where HF's rotate_half RoPE is used; this is mathematically the
  same network as llama.cpp's layout + interleaved-pair RoPE. The output head is
  tied to token_embd (Q8_0). All arithmetic is float32.
* Tokenizer: built by transformers from the GGUF vocab/merges, encoded with
  add_special_tokens=False (no BOS is ever added: tokenizer.ggml.add_bos_token is
  false). Special/control tokens written in the text (`<|im_start|>`,
  `<|endoftext|>`, ...) are matched whole, as single ids, like llama.cpp with
  parse_special=true.
  IMPORTANT: the GGUF says tokenizer.ggml.pre = "smollm". transformers does not
  know that pre-tokenizer and falls back to the plain GPT-2 ByteLevel regex. The
  original SmolLM2 tokenizer.json, and llama.cpp's "smollm" pre-tokenizer, first
  split every numeric char (\\p{N}) into its own piece, then apply the GPT-2 regex.
  This script installs that pre-tokenizer (Digits(individual_digits=True) then
  ByteLevel) on the loaded tokenizer, so every id list in these fixtures uses the
  correct "smollm" splitting. The vocab has no multi-char token containing a digit,
  so this matters only around whitespace before digits (e.g. "  1": GPT-2 regex
  gives [" ", " 1"] -> [216, 216, 33]; smollm gives ["  ", "1"] -> [256, 33]).
  tokenization.json records, per string, the fallback's ids as well when they
  differ ("ids_gpt2_pretokenizer").
* Decoding: tokenizer.decode(ids, skip_special_tokens=False,
  clean_up_tokenization_spaces=False), i.e. byte-level concatenation, special
  tokens rendered as their text.
* Logits: for prompt ids x[0..T), position i holds the logits predicting x[i+1]
  given x[0..=i]. Positions are absolute, starting at 0 at the first prompt token.
* Perplexity: tokenize the whole file (add_special_tokens=False, no BOS), split
  into consecutive non-overlapping windows of ctx tokens (last partial window kept
  if it has >= 2 tokens); within each window the model sees only that window
  (positions restart at 0, fresh KV cache), and every token after the first is
  scored given the preceding tokens of the window. NLL = -log_softmax(logits)[tok]
  in float32, summed in float64. perplexity = exp(total_nll / scored_tokens).
* Floats are rounded to 5 decimals.
"""

import argparse
import datetime
import hashlib
import json
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT_DIR = os.path.join(REPO, "tests", "fixtures", "golden", "smollm2")
TEXT_PATH = os.path.join(REPO, "tests", "fixtures", "texts", "declaration.txt")
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = os.path.join(
    os.environ.get("BRIGADE_HOME", os.path.expanduser("~/.cache/brigade/models")), MODEL_FILE
)
EXPECTED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

DEC = 5  # decimals kept for floats


def r(x):
    return round(float(x), DEC)


# --------------------------------------------------------------------------- io


def write_json(name, meta, key, items, extra=None):
    """One top-level object; each item on its own line (diff-friendly, compact)."""
    path = os.path.join(OUT_DIR, name)
    lines = ["{", ' "meta": ' + json.dumps(meta, ensure_ascii=False) + ","]
    if extra:
        for k, v in extra.items():
            lines.append(" " + json.dumps(k) + ": " + json.dumps(v, ensure_ascii=False) + ",")
    lines.append(" " + json.dumps(key) + ": [")
    body = [
        "  " + json.dumps(it, ensure_ascii=False, separators=(",", ":")) for it in items
    ]
    lines.append(",\n".join(body))
    lines.append(" ]")
    lines.append("}")
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines) + "\n")
    json.load(open(path, encoding="utf-8"))  # must round-trip
    print(f"wrote {os.path.relpath(path, REPO)} ({os.path.getsize(path)} bytes, {len(items)} {key})")


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------- loading


def load_tokenizer(model_dir, model_file):
    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=model_file)
    fallback = tok.backend_tokenizer.pre_tokenizer
    gpt2_tok = tokenizers.Tokenizer.from_str(tok.backend_tokenizer.to_str())  # keeps the fallback
    # llama.cpp "smollm" == original SmolLM2 tokenizer.json: Digits then ByteLevel.
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    return tok, gpt2_tok, str(fallback)


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


# ------------------------------------------------------------------ tokenization

LONG_MIX = (
    "Hello, world! I'm testing   spaces\tand\ttabs\n\nnew lines. "
    "数字 12345 и кириллица, العربية, हिन्दी, 日本語のテキスト, 한국어 문장. "
    "Emoji: 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ✨ — café naïve résumé (e\u0301). "
    "Code: fn main() { println!(\"{}\", x + 1); } // done\r\n"
    "URL https://example.com/a?b=1&c=2#frag, price $1,234.56, 3.14159 and 1e-9; "
    "\"quotes\" ‘single’ “double” … ¿Qué tal? ¡Muy bien! <|im_start|> ok <|im_end|> "
    "THE END!!!??? 🚀"
)

TOKENIZATION_STRINGS = [
    # plain English / whitespace
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " Hello",
    "Hello ",
    "  leading two spaces",
    "trailing three spaces   ",
    "multiple     spaces    between     words",
    "tab\tseparated\tvalues",
    "\t\tindented with tabs",
    "line one\nline two",
    "paragraph\n\n\nafter three newlines",
    "\n\n\n",
    "windows\r\nline\r\nendings\r\n",
    " ",
    "",
    "          ",
    "\n",
    # digits and numbers (pre-tokenizer sensitive)
    "12345678901234567890",
    "3.14159",
    "1,000,000",
    "abc123def",
    "In 2024, 42 people paid $19.99.",
    "  1",
    "x  42",
    "\n\n2024",
    "version 1.2.3-rc4",
    "½ ² ³ ٣ ४ Ⅻ",
    # contractions / apostrophes
    "I'm",
    "don't",
    "they'll",
    "WE'RE",
    "It's John's book, isn't it? We've, you'd, she's.",
    "I\u2019m fine, don\u2019t worry \u2018quoted\u2019",
    # punctuation
    "!!!???",
    "Wait... what?!... (really) [yes] {no} <maybe>",
    "--- *** ___ ### @@@ ~~~ ```",
    # scripts
    "你好，世界！今天天气很好。",
    "日本語のテキストとカタカナ、ひらがな。",
    "안녕하세요, 세계! 한국어 문장입니다.",
    "مرحبا بالعالم، كيف حالك؟",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "Привет, мир! Как дела?",
    "Γειά σου Κόσμε",
    # emoji
    "I love 🍕 and 🎉!",
    "👍🏽",
    "👨\u200d👩\u200d👧\u200d👦 family",
    "flags 🇫🇷🇯🇵🇺🇸",
    "❤️ ✨ 🚀🚀🚀",
    # combining / normalization-sensitive
    "cafe\u0301 vs caf\u00e9",
    "n\u0303 a\u0308 o\u0302\u0323",
    "Å Å",
    # code
    "def f(x):\n    return x ** 2  # square\n",
    "fn main() {\n    let v: Vec<u32> = (0..10).collect();\n    println!(\"{:?}\", v);\n}\n",
    '{"key": "value", "n": [1, 2.5, -3e10], "ok": true, "nil": null}',
    "<html><body class=\"x\">&amp; &lt;tag&gt;</body></html>",
    "SELECT * FROM users WHERE id = 7;",
    # URLs, emails
    "https://www.example.com/path/to/page?query=1&lang=en#section",
    "mail me at first.last+tag@example.co.uk",
    # special tokens in text
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "before<|endoftext|>after",
    " <|im_start|> spaced <|im_end|> ",
    "<file_sep><jupyter_code>print(1)<empty_output>",
    "<|im_sta",
    "<|im_end",
    "|im_start|>",
    "<|IM_START|>",
    # long words
    "Pneumonoultramicroscopicsilicovolcanoconiosis",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "a" * 120,
    "abc" * 60,
    "xyzzy" * 30 + "!",
    # mixed kitchen sink, exactly 300 code points
    LONG_MIX[:300],
]


def make_tokenization(tok, gpt2_tok, meta):
    assert len(LONG_MIX) >= 300, len(LONG_MIX)
    assert len(TOKENIZATION_STRINGS) >= 45
    assert len(set(TOKENIZATION_STRINGS)) == len(TOKENIZATION_STRINGS)
    items, n_diff = [], 0
    for text in TOKENIZATION_STRINGS:
        ids = encode(tok, text)
        item = {"text": text, "ids": ids, "decoded": decode(tok, ids)}
        alt = gpt2_tok.encode(text, add_special_tokens=False).ids
        if alt != ids:
            item["ids_gpt2_pretokenizer"] = alt
            n_diff += 1
        items.append(item)
    n_rt = sum(it["decoded"] == it["text"] for it in items)
    print(f"tokenization: {len(items)} strings, {n_rt} round-trip exactly, {n_diff} differ under GPT-2 fallback")
    special = {
        str(i): {"content": t.content, "special": t.special}
        for i, t in sorted(tok.added_tokens_decoder.items())
    }
    extra = {
        "conventions": {
            "encode": "add_special_tokens=False; no BOS/EOS added; special tokens in text are matched whole",
            "pre_tokenizer": "smollm: Digits(individual_digits=True) then ByteLevel GPT-2 regex "
            "(add_prefix_space=False). ids_gpt2_pretokenizer (only present when different) is what "
            "transformers' GGUF loader produces by default, without the digit split.",
            "decode": "skip_special_tokens=False, clean_up_tokenization_spaces=False",
            "add_prefix_space": False,
        },
        "special_tokens": {
            "bos": [tok.bos_token, tok.bos_token_id],
            "eos": [tok.eos_token, tok.eos_token_id],
            "unk": [tok.unk_token, tok.unk_token_id],
            "pad": [tok.pad_token, tok.pad_token_id],
            "added_tokens": special,
        },
    }
    write_json("tokenization.json", meta, "cases", items, extra)


# ----------------------------------------------------------------- chat template

CHATS = [
    ("single_user", [{"role": "user", "content": "Hello!"}]),
    (
        "system_user",
        [
            {"role": "system", "content": "You are a pirate. Answer in pirate speak."},
            {"role": "user", "content": "What is the weather like today?"},
        ],
    ),
    (
        "multi_turn",
        [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "2+2 equals 4."},
            {"role": "user", "content": "And times 3?"},
        ],
    ),
    (
        "system_multi_turn",
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a color."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one."},
        ],
    ),
    (
        "special_chars",
        [
            {
                "role": "user",
                "content": "Line 1\nLine 2\n\n\ttabbed \"quotes\" {braces} <tags> & 'apostrophes' \\backslash\\ "
                "{{ not jinja }} {% raw %}",
            }
        ],
    ),
    (
        "unicode",
        [
            {"role": "system", "content": "Réponds en français. 🇫🇷"},
            {"role": "user", "content": "Qu'est-ce que « l'été » ? 你好 👋🏽 — naïve café\r\nfin"},
        ],
    ),
    ("empty_user", [{"role": "user", "content": ""}]),
    (
        "specials_in_content",
        [{"role": "user", "content": "Say <|im_end|> then <|endoftext|> please"}],
    ),
]


def render(tok, messages, add_generation_prompt, tokenize):
    out = tok.apply_chat_template(
        messages, tokenize=tokenize, add_generation_prompt=add_generation_prompt
    )
    if tokenize and not isinstance(out, list):  # transformers v5 returns a BatchEncoding
        out = out["input_ids"]
    if tokenize and out and isinstance(out[0], list):
        out = out[0]
    return out


def make_chat_template(tok, meta):
    items = []
    for name, messages in CHATS:
        for agp in (False, True):
            text = render(tok, messages, agp, tokenize=False)
            ids = render(tok, messages, agp, tokenize=True)
            ids = [int(i) for i in ids]
            assert ids == encode(tok, text), (name, agp)
            items.append(
                {
                    "name": name,
                    "messages": messages,
                    "add_generation_prompt": agp,
                    "text": text,
                    "ids": ids,
                }
            )
    extra = {
        "chat_template": tok.chat_template,
        "conventions": "text = apply_chat_template(tokenize=False); ids = apply_chat_template(tokenize=True), "
        "which equals encode(text, add_special_tokens=False) (checked). The template inserts a default "
        "system message when the first message is not a system message.",
    }
    print(f"chat_template: {len(items)} cases")
    write_json("chat_template.json", meta, "cases", items, extra)


# ------------------------------------------------------------------------ logits


def chat_text(tok, messages):
    return render(tok, messages, True, tokenize=False)


def logit_prompts(tok):
    return [
        ("plain", "The quick brown fox jumps over the lazy dog. It was a bright cold day in April, and the clocks were striking thirteen."),
        ("chat", chat_text(tok, [{"role": "user", "content": "What is the capital of France?"}])),
        ("code", "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"),
        ("french", "La tour Eiffel est située à Paris. Elle a été construite en 1889 pour l'Exposition universelle."),
        ("chinese", "北京是中华人民共和国的首都，也是全国的政治和文化中心。"),
        ("numbers", "1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233,"),
        ("specials_mid", "Question: what is 7 times 6?<|im_end|>\n<|im_start|>assistant\nThe answer is"),
    ]


@torch.no_grad()
def forward_logits(model, ids):
    x = torch.tensor([ids], dtype=torch.long)
    return model(input_ids=x, use_cache=False).logits[0].float()  # [T, V]


def make_logits(tok, model, meta, topk=20):
    items = []
    for name, text in logit_prompts(tok):
        ids = encode(tok, text)
        assert 10 <= len(ids) <= 60, (name, len(ids))
        logits = forward_logits(model, ids)
        lse = torch.logsumexp(logits, dim=-1)
        top_v, top_i = torch.topk(logits, topk, dim=-1, sorted=True)
        positions = []
        for p in range(len(ids)):
            positions.append(
                {
                    "pos": p,
                    "logsumexp": r(lse[p]),
                    "top_ids": [int(i) for i in top_i[p]],
                    "top_logits": [r(v) for v in top_v[p]],
                    "top_logprobs": [r(v - lse[p]) for v in top_v[p]],
                }
            )
        # score of the actual next tokens (teacher forcing), handy for NLL checks
        lp = torch.log_softmax(logits, dim=-1)
        next_lp = [r(lp[p, ids[p + 1]]) for p in range(len(ids) - 1)]
        items.append(
            {
                "name": name,
                "text": text,
                "ids": ids,
                "next_token_logprobs": next_lp,
                "positions": positions,
            }
        )
        print(f"logits: {name}: {len(ids)} tokens, argmax@last={tok.convert_ids_to_tokens(int(top_i[-1][0]))!r}")
    extra = {
        "conventions": f"positions[i] = logits after consuming ids[0..=i] (predicts ids[i+1]); top_k={topk} "
        "sorted by logit descending; top_logprobs = logit - logsumexp over the full vocab (49152); "
        "next_token_logprobs[i] = log_softmax(logits[i])[ids[i+1]]. No BOS prepended. float32, rounded to 5 decimals."
    }
    write_json("logits.json", meta, "prompts", items, extra)


# ------------------------------------------------------------------------ greedy


def greedy_prompts(tok):
    return [
        ("capital", "The capital of France is"),
        ("story", "Once upon a time, there was a little"),
        ("code", "def is_prime(n):\n"),
        ("count", "1, 2, 3, 4, 5,"),
        ("list", "Here are three tips for staying healthy:\n1."),
        ("chat_capital", chat_text(tok, [{"role": "user", "content": "What is the capital of France?"}])),
        (
            "chat_haiku",
            chat_text(
                tok,
                [
                    {"role": "system", "content": "You are a concise assistant."},
                    {"role": "user", "content": "Write a haiku about the ocean."},
                ],
            ),
        ),
    ]


@torch.no_grad()
def make_greedy(tok, model, meta, n_new=32):
    items = []
    # No early stop: clear EOS on the model's own generation config too, otherwise generate()
    # merges eos_token_id=2 back in. (min_new_tokens would instead *mask* EOS: not pure greedy.)
    model.generation_config.eos_token_id = None
    gcfg = GenerationConfig(
        do_sample=False, max_new_tokens=n_new, eos_token_id=None, pad_token_id=tok.pad_token_id
    )
    for name, text in greedy_prompts(tok):
        ids = encode(tok, text)
        x = torch.tensor([ids], dtype=torch.long)
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gcfg)
        gen = [int(t) for t in out[0, len(ids):]]
        assert len(gen) == n_new, (name, len(gen))
        # Independent check without KV cache: one teacher-forced forward over prompt+generated;
        # the argmax at each step must reproduce the generated token. Also record the
        # top-1/top-2 logit margin per step so consumers can see near-ties.
        logits = forward_logits(model, ids + gen)[len(ids) - 1 : -1]
        v, i = torch.topk(logits, 2, dim=-1)
        margins = [r(a - b) for a, b in zip(v[:, 0], v[:, 1])]
        nocache_ok = [int(t) for t in i[:, 0]] == gen
        if not nocache_ok:
            print(f"WARNING: greedy {name}: generate() differs from no-cache teacher-forced argmax")
        eos = tok.eos_token_id
        items.append(
            {
                "name": name,
                "prompt": text,
                "prompt_ids": ids,
                "generated_ids": gen,
                "generated_text": decode(tok, gen),
                "first_eos_index": gen.index(eos) if eos in gen else None,
                "top1_top2_margins": margins,
                "nocache_argmax_matches": nocache_ok,
            }
        )
        print(f"greedy: {name}: {decode(tok, gen)!r}  (min margin {min(margins)})")
    extra = {
        "conventions": f"model.generate(do_sample=False, max_new_tokens={n_new}) with EOS disabled: no early "
        "stop, generation continues past <|im_end|> (id 2); first_eos_index marks where a stopping runtime "
        "would end (compare only up to and including it if your runtime stops). top1_top2_margins[k] = logit "
        "gap between best and second-best token at step k (small values = fragile ties under numeric noise). "
        "Prompt ids have no BOS."
    }
    write_json("greedy.json", meta, "prompts", items, extra)


# -------------------------------------------------------------------- perplexity


@torch.no_grad()
def perplexity(model, ids, ctx):
    total_nll, n_scored, windows = 0.0, 0, []
    for start in range(0, len(ids), ctx):
        w = ids[start : start + ctx]
        if len(w) < 2:
            continue
        lp = torch.log_softmax(forward_logits(model, w), dim=-1)
        tgt = torch.tensor(w[1:], dtype=torch.long)
        nll = -lp[:-1].gather(1, tgt[:, None])[:, 0]
        s = float(nll.double().sum())
        total_nll += s
        n_scored += len(w) - 1
        windows.append({"start": start, "len": len(w), "nll": round(s, 4)})
    return {
        "ctx": ctx,
        "perplexity": round(math.exp(total_nll / n_scored), 5),
        "scored_tokens": n_scored,
        "total_nll": round(total_nll, 4),
        "mean_nll": round(total_nll / n_scored, 6),
        "windows": windows,
    }


def make_perplexity(tok, model, meta):
    with open(TEXT_PATH, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8")
    ids = encode(tok, text)
    items = []
    for ctx in (128, 512):
        res = perplexity(model, ids, ctx)
        print(f"perplexity ctx={ctx}: {res['perplexity']} over {res['scored_tokens']} tokens")
        items.append(res)
    extra = {
        "text_file": os.path.relpath(TEXT_PATH, REPO),
        "text_sha256": hashlib.sha256(raw).hexdigest(),
        "text_bytes": len(raw),
        "n_tokens": len(ids),
        "first_ids": ids[:16],
        "last_ids": ids[-16:],
        "conventions": "Tokenize the whole file (add_special_tokens=False, no BOS). Split into consecutive "
        "non-overlapping windows of ctx tokens; keep the last partial window if it has >= 2 tokens. Each "
        "window is evaluated alone (positions from 0, fresh cache). Score every token after the first of "
        "each window: nll = -log_softmax(logits[i])[w[i+1]] (float32), summed in float64. "
        "perplexity = exp(total_nll / scored_tokens); scored_tokens = sum(len(window) - 1).",
    }
    write_json("perplexity.json", meta, "results", items, extra)


# -------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model_path = os.path.abspath(args.model)
    sha = sha256_file(model_path)
    if sha != EXPECTED_SHA256:
        sys.exit(f"model sha256 {sha} != expected {EXPECTED_SHA256}")
    model_dir, model_file = os.path.split(model_path)
    os.makedirs(OUT_DIR, exist_ok=True)

    tok, gpt2_tok, fallback_pre = load_tokenizer(model_dir, model_file)
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=model_file, dtype=torch.float32)
    model.eval()
    assert model.config.tie_word_embeddings

    meta = {
        "generator": "tests/reference/make_fixtures.py",
        "model_file": model_file,
        "model_sha256": sha,
        "dtype": "float32",
        "device": "cpu",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "pre_tokenizer": "smollm (Digits individual + ByteLevel); transformers' GGUF default was " + fallback_pre,
        "date": datetime.date.today().isoformat(),
    }

    make_tokenization(tok, gpt2_tok, meta)
    make_chat_template(tok, meta)
    make_logits(tok, model, meta)
    make_greedy(tok, model, meta)
    make_perplexity(tok, model, meta)


if __name__ == "__main__":
    main()
