#!/usr/bin/env python3
"""Generate reference ("golden") fixtures for Gemma 3 270M (base) Q4_K_M from an
independent implementation: Hugging Face `transformers` + `tokenizers` (PyTorch,
float32, CPU, eager attention), as tests/reference/make_fixtures.py does for
SmolLM2 (same file formats, same helpers; the differences are listed below).

Nothing here runs in CI. Run it by hand when the fixtures need regenerating; it
simply overwrites its outputs.

Setup: as for make_fixtures.py, plus the model in the cache:

    scripts/fetch-model.sh gemma3-270m   # ~/.cache/brigade/models/gemma-3-270m-q4_k_m.gguf

Run (from the repo root; about 5 minutes on 2 cores, ~3 GB of memory):

    HF_HUB_OFFLINE=1 /tmp/refenv/bin/python tests/reference/make_gemma3_fixtures.py
    # optional: --model PATH/TO/gemma-3-270m-q4_k_m.gguf

Outputs (tests/fixtures/golden/gemma3/), formats as in make_fixtures.py:
    tokenization.json   tricky strings -> ids (BOS included) -> decoded text
    logits.json         teacher-forced top-20 logits / log-probs + logsumexp per position
    greedy.json         32-token greedy continuations (no early stop at EOS)
    perplexity.json     windowed perplexity of tests/fixtures/texts/declaration.txt
(no chat_template.json: the base model's GGUF has no tokenizer.chat_template.)

Conventions (the Rust side must follow these exactly):

* Model: transformers' GGUF loader (Gemma3ForCausalLM, text-only) dequantizes
  every tensor to float32 with gguf-py and subtracts 1 from every `*norm.weight`
  (GGUF stores Gemma's RMSNorm weight as 1 + w; HF computes x * (1 + w)). The
  config it derives is checked here: head_dim 256 = query_pre_attn_scalar
  (attention scale 1/16), 1 KV head, sliding window 512 on layers with
  il % 6 < 5 (layers 5, 11, 17 are global), RoPE base 1e6 on global layers and
  10000 on local ones (the GGUF has no rope.freq_base_swa: llama.cpp's default),
  no soft-capping, embeddings scaled by sqrt(640), output tied to token_embd
  (Q8_0). The same mapping, done by hand, equals this loader exactly on the tiny
  gemma3 model (make_family_fixtures.py). All arithmetic float32.
* Tokenizer: built by transformers from the GGUF's SentencePiece vocab
  (tokenizer.ggml.model = "llama", add_space_prefix = false, byte fallback).
  Encoded with add_special_tokens=True: a BOS (<bos>, id 2) is prepended, as the
  GGUF's tokenizer.ggml.add_bos_token = true says; no EOS. Control tokens written
  in the text (<start_of_turn>, <end_of_turn>, <bos>, ...) are matched whole, as
  single ids (llama.cpp with parse_special=true).
* Decoding: tokenizer.decode(ids, skip_special_tokens=False,
  clean_up_tokenization_spaces=False) of the whole id list (so "decoded" starts
  with "<bos>"); "decoded_text" is the decoding of the ids after the BOS.
* Logits: prompt ids start with BOS at position 0; positions[i] predicts
  ids[i+1]. One prompt (`long`, the first 600 tokens of declaration.txt, top-2
  only) is longer than the 512-token window.
* Greedy: model.generate(do_sample=False, 32 new tokens, EOS disabled), checked
  against a no-cache teacher-forced argmax; top-1/top-2 margins recorded.
* Perplexity: tokenize the whole file without BOS. Results for (ctx 128, bos
  false), (1024, false), (1024, true); the two schemes:
  - "bos": false (SmolLM2's convention): consecutive windows of ctx tokens, each
    alone (positions from 0); every token after the first of a window is scored.
  - "bos": true: consecutive windows of ctx - 1 text tokens, each evaluated as
    [BOS] + window (positions from 0 at the BOS); every text token is scored
    (the first one given only the BOS).
  NLL = -log_softmax(logits)[tok] in float32, summed in float64;
  perplexity = exp(total_nll / scored_tokens). ctx 1024 exceeds the window.
* Floats are rounded to 5 decimals.
"""

import argparse
import datetime
import hashlib
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig  # noqa: E402

import make_fixtures as smol  # noqa: E402  (shared helpers and the tricky strings)
from make_fixtures import r, sha256_file  # noqa: E402

REPO = smol.REPO
OUT_DIR = os.path.join(REPO, "tests", "fixtures", "golden", "gemma3")
TEXT_PATH = smol.TEXT_PATH
MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
DEFAULT_MODEL = os.path.join(
    os.environ.get("BRIGADE_HOME", os.path.expanduser("~/.cache/brigade/models")), MODEL_FILE
)
EXPECTED_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def write_json(name, meta, key, items, extra=None):
    smol.OUT_DIR = OUT_DIR  # make_fixtures.write_json writes into its module's OUT_DIR
    smol.write_json(name, meta, key, items, extra)


def encode(tok, text):
    return tok.encode(text, add_special_tokens=True)


decode = smol.decode

# Gemma-specific tricky strings, added to make_fixtures.TOKENIZATION_STRINGS.
GEMMA_STRINGS = [
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<bos>already a bos",
    "text<eos>more",
    "<pad><unk><mask>",
    "<start_of_tur",
    "<start_of_image> image <end_of_image>",
    "\u2581meta\u2581symbol\u2581 in text",
    "ctrl \x01\x02\x7f bytes",
    "rare \U0001d518\U0001d52b\U0001d526\U0001d520 \u0378 \U000e0041 chars",
    "spaces" + " " * 31 + "end",
    "\n" * 31,
    "\t" * 9 + "x",
    "  \n \t  \n\n  mixed whitespace",
    "<h1>Title</h1>\n<p>para</p>",
]


def make_tokenization(tok, meta):
    strings = smol.TOKENIZATION_STRINGS + GEMMA_STRINGS
    assert len(set(strings)) == len(strings)
    items = []
    for text in strings:
        ids = encode(tok, text)
        assert ids[0] == tok.bos_token_id, text
        items.append({"text": text, "ids": ids, "decoded": decode(tok, ids),
                      "decoded_text": decode(tok, ids[1:])})
    n_rt = sum(it["decoded_text"] == it["text"] for it in items)
    print(f"tokenization: {len(items)} strings, {n_rt} round-trip exactly")
    special = {
        str(i): {"content": t.content, "special": t.special}
        for i, t in sorted(tok.added_tokens_decoder.items())
        if i < 256  # the control/markup block; the rest is 262k normal pieces
    }
    extra = {
        "conventions": {
            "encode": "add_special_tokens=True: BOS (id 2) prepended as tokenizer.ggml.add_bos_token=true; "
            "no EOS; control tokens in text are matched whole",
            "tokenizer": "transformers' GGUF SentencePiece conversion: normalizer replaces ' ' with U+2581, "
            "no space prefix (add_space_prefix=false), BPE by merge scores over the whole text, byte fallback",
            "decode": "skip_special_tokens=False, clean_up_tokenization_spaces=False; decoded = all ids, "
            "decoded_text = ids after the BOS",
        },
        "special_tokens": {
            "bos": [tok.bos_token, tok.bos_token_id],
            "eos": [tok.eos_token, tok.eos_token_id],
            "unk": [tok.unk_token, tok.unk_token_id],
            "pad": [tok.pad_token, tok.pad_token_id],
            "added_tokens_below_256": special,
        },
    }
    write_json("tokenization.json", meta, "cases", items, extra)


def turn(user):
    return f"<start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n"


def logit_prompts(long_text):
    return [
        ("plain", "The quick brown fox jumps over the lazy dog. It was a bright cold day in April, and the clocks were striking thirteen."),
        ("turns", turn("What is the capital of France?")),
        ("code", "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"),
        ("french", "La tour Eiffel est située à Paris. Elle a été construite en 1889 pour l'Exposition universelle."),
        ("chinese", "北京是中华人民共和国的首都，也是全国的政治和文化中心。"),
        ("numbers", "1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233,"),
        ("specials_mid", "Question: what is 7 times 6?<end_of_turn>\n<start_of_turn>model\nThe answer is"),
        ("long", long_text),
    ]


def make_logits(tok, model, meta, long_text, topk=20, long_topk=2):
    items = []
    for name, text in logit_prompts(long_text):
        ids = encode(tok, text)
        k = long_topk if name == "long" else topk
        if name == "long":
            assert len(ids) > 560, len(ids)
        else:
            assert 10 <= len(ids) <= 60, (name, len(ids))
        logits = smol.forward_logits(model, ids)
        lse = torch.logsumexp(logits, dim=-1)
        top_v, top_i = torch.topk(logits, k, dim=-1, sorted=True)
        positions = [
            {"pos": p, "logsumexp": r(lse[p]), "top_ids": [int(i) for i in top_i[p]],
             "top_logits": [r(v) for v in top_v[p]],
             "top_logprobs": [r(v - lse[p]) for v in top_v[p]]}
            for p in range(len(ids))
        ]
        lp = torch.log_softmax(logits, dim=-1)
        next_lp = [r(lp[p, ids[p + 1]]) for p in range(len(ids) - 1)]
        agree = sum(int(top_i[p][0]) == ids[p + 1] for p in range(len(ids) - 1))
        items.append({"name": name, "text": text, "ids": ids, "top_k": k,
                      "next_token_logprobs": next_lp, "positions": positions})
        print(f"logits: {name}: {len(ids)} tokens, argmax==next on {agree}/{len(ids) - 1}")
    extra = {
        "conventions": f"positions[i] = logits after consuming ids[0..=i] (predicts ids[i+1]); ids[0] is BOS; "
        f"top_k={topk} ({long_topk} for the 'long' prompt, which is longer than the 512-token sliding window) "
        "sorted by logit descending; top_logprobs = logit - logsumexp over the full vocab (262144); "
        "next_token_logprobs[i] = log_softmax(logits[i])[ids[i+1]]. float32, rounded to 5 decimals."
    }
    write_json("logits.json", meta, "prompts", items, extra)


def greedy_prompts():
    return [
        ("capital", "The capital of France is"),
        ("story", "Once upon a time, there was a little"),
        ("code", "def is_prime(n):\n"),
        ("count", "1, 2, 3, 4, 5,"),
        ("list", "Here are three tips for staying healthy:\n1."),
        ("turn_capital", turn("What is the capital of France?")),
        ("turn_haiku", turn("Write a haiku about the ocean.")),
    ]


@torch.no_grad()
def make_greedy(tok, model, meta, n_new=32):
    items = []
    model.generation_config.eos_token_id = None
    gcfg = GenerationConfig(do_sample=False, max_new_tokens=n_new, eos_token_id=None,
                            pad_token_id=tok.pad_token_id)
    for name, text in greedy_prompts():
        ids = encode(tok, text)
        x = torch.tensor([ids], dtype=torch.long)
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gcfg)
        gen = [int(t) for t in out[0, len(ids):]]
        assert len(gen) == n_new, (name, len(gen))
        logits = smol.forward_logits(model, ids + gen)[len(ids) - 1: -1]
        v, i = torch.topk(logits, 2, dim=-1)
        margins = [r(a - b) for a, b in zip(v[:, 0], v[:, 1])]
        nocache_ok = [int(t) for t in i[:, 0]] == gen
        if not nocache_ok:
            print(f"WARNING: greedy {name}: generate() differs from no-cache teacher-forced argmax")
        stops = [t for t in (tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")) if t is not None]
        first_stop = min((gen.index(t) for t in stops if t in gen), default=None)
        items.append({"name": name, "prompt": text, "prompt_ids": ids, "generated_ids": gen,
                      "generated_text": decode(tok, gen), "first_eos_index": first_stop,
                      "top1_top2_margins": margins, "nocache_argmax_matches": nocache_ok})
        print(f"greedy: {name}: {decode(tok, gen)!r}  (min margin {min(margins)})")
    extra = {
        "conventions": f"model.generate(do_sample=False, max_new_tokens={n_new}) with EOS disabled: no early "
        "stop; first_eos_index marks the first <eos> (1) or <end_of_turn> (106), where a stopping runtime "
        "would end. top1_top2_margins[k] = logit gap between best and second-best token at step k. Prompt "
        "ids start with BOS (2)."
    }
    write_json("greedy.json", meta, "prompts", items, extra)


@torch.no_grad()
def perplexity_bos(model, ids, ctx, bos):
    """[BOS] + windows of ctx - 1 text tokens; every text token scored."""
    total_nll, n_scored, windows = 0.0, 0, []
    step = ctx - 1
    for start in range(0, len(ids), step):
        w = ids[start: start + step]
        lp = torch.log_softmax(smol.forward_logits(model, [bos] + w), dim=-1)
        tgt = torch.tensor(w, dtype=torch.long)
        nll = -lp[:-1].gather(1, tgt[:, None])[:, 0]
        s = float(nll.double().sum())
        total_nll += s
        n_scored += len(w)
        windows.append({"start": start, "len": len(w) + 1, "nll": round(s, 4)})
    return {"ctx": ctx, "bos": True, "perplexity": round(math.exp(total_nll / n_scored), 5),
            "scored_tokens": n_scored, "total_nll": round(total_nll, 4),
            "mean_nll": round(total_nll / n_scored, 6), "windows": windows}


def make_perplexity(tok, model, meta, ids):
    with open(TEXT_PATH, "rb") as f:
        raw = f.read()
    items = []
    for ctx, bos in ((128, False), (1024, False), (1024, True)):
        if bos:
            res = perplexity_bos(model, ids, ctx, tok.bos_token_id)
        else:
            res = smol.perplexity(model, ids, ctx)
            res = {"ctx": ctx, "bos": False, **{k: v for k, v in res.items() if k != "ctx"}}
        print(f"perplexity ctx={ctx} bos={bos}: {res['perplexity']} over {res['scored_tokens']} tokens")
        items.append(res)
    extra = {
        "text_file": os.path.relpath(TEXT_PATH, REPO),
        "text_sha256": hashlib.sha256(raw).hexdigest(),
        "text_bytes": len(raw),
        "n_tokens": len(ids),
        "first_ids": ids[:16],
        "last_ids": ids[-16:],
        "conventions": "Tokenize the whole file without BOS (add_special_tokens=False). bos=false: "
        "consecutive non-overlapping windows of ctx tokens (last partial window kept if >= 2 tokens), each "
        "alone (positions from 0, fresh cache), every token after the first of a window scored. bos=true: "
        "windows of ctx-1 text tokens, each evaluated as [BOS(2)] + window, every text token scored. "
        "nll = -log_softmax(logits[i])[w[i+1]] (float32), summed in float64; perplexity = "
        "exp(total_nll / scored_tokens). ctx 1024 is longer than the 512-token sliding window.",
    }
    write_json("perplexity.json", meta, "results", items, extra)


def check_config(model):
    c = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM", type(model).__name__
    assert c.head_dim == 256 and c.query_pre_attn_scalar == 256, (c.head_dim, c.query_pre_attn_scalar)
    assert c.num_key_value_heads == 1 and c.num_attention_heads == 4
    assert c.sliding_window == 512, c.sliding_window
    want_types = ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(c.num_hidden_layers)]
    assert list(c.layer_types) == want_types, c.layer_types
    assert c.rope_parameters["full_attention"]["rope_theta"] == 1e6, c.rope_parameters
    assert c.rope_parameters["sliding_attention"]["rope_theta"] == 1e4, c.rope_parameters
    assert c.final_logit_softcapping is None and c.attn_logit_softcapping is None
    assert c.tie_word_embeddings
    return {"layer_types": "global at il % 6 == 5", "rope_parameters": c.rope_parameters,
            "sliding_window": c.sliding_window, "query_pre_attn_scalar": c.query_pre_attn_scalar}


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

    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=model_file)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, gguf_file=model_file, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    cfg = check_config(model)

    with open(TEXT_PATH, encoding="utf-8") as f:
        text = f.read()
    text_ids = tok.encode(text, add_special_tokens=False)
    long_text = decode(tok, text_ids[:600])

    meta = {
        "generator": "tests/reference/make_gemma3_fixtures.py",
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
        "config_checked": cfg,
        "date": datetime.date.today().isoformat(),
    }

    make_tokenization(tok, meta)
    make_logits(tok, model, meta, long_text)
    make_greedy(tok, model, meta)
    make_perplexity(tok, model, meta, text_ids)


if __name__ == "__main__":
    main()
