"""Gemma 3 270M (Q4_K_M GGUF) reference for tests/families.rs
(`gemma3_270m_matches_transformers`): Hugging Face transformers, float32, on
the GGUF's dequantized weights (transformers' own GGUF loader) and its
tokenizer.

Per prompt: the prompt ids (with BOS), a 12-token greedy continuation, the
teacher-forced top-1 at every position of prompt + continuation, and the
log-probability of each next token.

Run by hand (CI does not run it):
    HF_HUB_OFFLINE=1 /tmp/refenv/bin/python tests/reference/make_gemma3_smoke.py \
        [~/.cache/brigade/models/gemma-3-270m-q4_k_m.gguf]
Writes tests/fixtures/families/gemma3-270m-smoke.json.
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,"]


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/brigade/models/gemma-3-270m-q4_k_m.gguf")
    d, f = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    cases = []
    for text in PROMPTS:
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            g = model.generate(ids, max_new_tokens=12, do_sample=False)
            logits = model(g).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        cases.append({
            "prompt": text,
            "ids": ids[0].tolist(),
            "greedy": g[0, ids.shape[1]:].tolist(),
            "top1": logits.argmax(-1).tolist(),
            "lp_of_next": [lp[i, g[0, i + 1]].item() for i in range(g.shape[1] - 1)],
            "text": tok.decode(g[0]),
        })
    out = os.path.join(os.path.dirname(__file__), "..", "fixtures", "families", "gemma3-270m-smoke.json")
    with open(out, "w") as fh:
        json.dump({"model": f, "transformers": __import__("transformers").__version__, "cases": cases}, fh, indent=1)


if __name__ == "__main__":
    main()
