#!/usr/bin/env python3
"""Reference outputs of Brigade's tiny family models (src/testing/family.rs) from
Hugging Face transformers, float32, eager attention, on the same weights.

For every family (llama, llama3, mistral, qwen2, qwen3, gemma2, gemma3, phi3) this
reads the GGUF the Rust generator wrote, dequantizes every tensor with gguf-py
(`gguf.quants.dequantize`, which Brigade's dequantizers equal bit for bit), undoes
llama.cpp's GGUF conventions, builds the transformers model of that family from
the GGUF metadata, and records teacher-forced logits and greedy continuations.

Nothing here runs in CI. Run by hand when the generator or the fixtures change
(a few seconds per family on 2 cores):

    BRIGADE_FAMILY_DIR=/tmp/families cargo test --lib \
        testing::family::tests::write_family_models -- --ignored
    HF_HUB_OFFLINE=1 /tmp/refenv/bin/python tests/reference/make_family_fixtures.py \
        --dir /tmp/families            # optional: --only gemma3,phi3

Output: tests/fixtures/families/<family>.json, read by
`brigade::testing::fixture::load_family_fixture`:

    {
      "family": "gemma3",                 # TinyFamily::name
      "hf_class": "Gemma3ForCausalLM",
      "gguf_sha256": "...",               # sha256 of the GGUF bytes read here
      "hf_config": {...},                 # the kwargs given to the config class
      "tensor_types": {"token_embd.weight": "Q8_0", ...},
      "top_k": 5,
      "cases": [
        {"name": "random_20",
         "prompt_ids": [...],             # T ids, no BOS, positions 0..T
         "positions": [                   # T entries; entry i predicts prompt_ids[i+1]
            {"top_ids": [5 ids], "top_logprobs": [5, descending], "logsumexp": x}],
         "greedy_ids": [16 ids],          # argmax continuation, no stop at EOS
         "greedy_margins": [16 floats]}   # logit(top1) - logit(top2) at each step
      ]
    }

Conventions (the Rust side must follow these exactly):

* Weights: every tensor dequantized to float32 by gguf-py; HF Linear weight =
  the GGUF tensor as a [ne1, ne0] matrix (rows = outputs).
* llama / llama3 / mistral: attn_q / attn_k rows are un-permuted back from
  llama.cpp's interleaved-pair RoPE order (inverse of convert_hf_to_gguf's
  `permute`, with n_head for q and n_head_kv for k); HF then applies rotate_half.
* gemma2 / gemma3: every `*norm.weight` is stored as (1 + w); HF gets stored - 1
  (exact in float32) and computes x * (1 + w).
* phi3: attn_qkv -> qkv_proj (q | k | v rows); ffn_up (2 ffn rows) -> gate_up_proj
  (gate rows first). HF selects long-rope factors when the forward's sequence
  length exceeds original_max_position_embeddings (16 here); every case here is
  longer than 16 tokens, so all positions use rope_factors_long (as llama.cpp
  does for a context larger than the original one), and cos/sin are multiplied
  by the attn_factor stored in the GGUF (checked equal to HF's).
* llama3: HF computes its inverse frequencies from the rope_scaling parameters
  below; the script checks they equal base^(-2i/d) / rope_freqs.weight.
* Sliding windows: a token at position p attends to positions p-W+1..p (W =
  attention.sliding_window, 8 here): mistral every layer, gemma2 even layers,
  gemma3 layers with il % 6 < 5. The script checks the window changes the logits.
* Attention scale 1/sqrt(head_dim) (gemma query_pre_attn_scalar = head_dim);
  gemma2 soft-caps attention scores (attn_logit_softcapping) and final logits.
* Logits: float32; logprobs = log_softmax(logits); logsumexp of the final
  (soft-capped) logits. Greedy: each step is a full forward over prompt +
  continuation so far (no KV cache), argmax with lowest id on ties.
* Floats rounded to 5 decimals.
"""

import argparse
import hashlib
import json
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from gguf import GGUFReader  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

FAMILIES = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]
OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "families")
TOP_K = 5
N_GREEDY = 16
PROMPT_LENGTHS = [20, 29, 41]
PROMPT_SEED = 20261202
# TinyFamilySpec::standard(Llama3).llama3_rope (src/testing/family.rs).
LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def r5(x):
    return round(float(x), 5)


class Gguf:
    """Metadata and float32 tensors of one GGUF file."""

    def __init__(self, path):
        with open(path, "rb") as f:
            self.sha256 = hashlib.sha256(f.read()).hexdigest()
        self.reader = GGUFReader(path)
        self.arch = self.field("general.architecture")
        self.types = {t.name: t.tensor_type.name for t in self.reader.tensors}
        self.tensors = {}
        for t in self.reader.tensors:
            values = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            shape = tuple(int(d) for d in reversed(list(t.shape)))
            self.tensors[t.name] = values.reshape(shape)

    def field(self, key, default=KeyError):
        f = self.reader.fields.get(key)
        if f is None:
            if default is KeyError:
                raise KeyError(key)
            return default
        return f.contents()

    def hp(self, key, default=KeyError):
        return self.field(f"{self.arch}.{key}", default)

    def t(self, name):
        return torch.from_numpy(self.tensors[name].copy())


def unpermute(w, n_head):
    """Inverse of convert_hf_to_gguf's LlamaModel.permute (rows only)."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def build(family, g):
    """(model, config kwargs) of the transformers model for GGUF `g`."""
    n_vocab = len(g.field("tokenizer.ggml.tokens"))
    dim = g.hp("embedding_length")
    n_head = g.hp("attention.head_count")
    n_kv = g.hp("attention.head_count_kv")
    head_dim = g.hp("attention.key_length", dim // n_head)
    n_layer = g.hp("block_count")
    tied = "output.weight" not in g.tensors
    cfg = dict(
        vocab_size=n_vocab, hidden_size=dim, intermediate_size=g.hp("feed_forward_length"),
        num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_kv,
        head_dim=head_dim, max_position_embeddings=g.hp("context_length"),
        rms_norm_eps=float(g.hp("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings=tied, bos_token_id=g.field("tokenizer.ggml.bos_token_id"),
        eos_token_id=g.field("tokenizer.ggml.eos_token_id"),
        pad_token_id=g.field("tokenizer.ggml.padding_token_id"),
        attention_dropout=0.0,
    )
    theta = float(g.hp("rope.freq_base", 10000.0))
    gemma = family in ("gemma2", "gemma3")
    if family in ("llama", "llama3"):
        cls = transformers.LlamaForCausalLM
        rope = {"rope_type": "default", "rope_theta": theta}
        if family == "llama3":
            rope = {"rope_type": "llama3", "rope_theta": theta, **LLAMA3_ROPE}
        cfg.update(rope_parameters=rope, attention_bias=False, mlp_bias=False, hidden_act="silu")
        config = transformers.LlamaConfig(**cfg)
    elif family == "mistral":
        cls = transformers.MistralForCausalLM
        cfg.update(rope_parameters={"rope_type": "default", "rope_theta": theta},
                   sliding_window=g.hp("attention.sliding_window"), hidden_act="silu")
        config = transformers.MistralConfig(**cfg)
    elif family == "qwen2":
        cls = transformers.Qwen2ForCausalLM
        cfg.update(rope_parameters={"rope_type": "default", "rope_theta": theta},
                   use_sliding_window=False, hidden_act="silu")
        config = transformers.Qwen2Config(**cfg)
    elif family == "qwen3":
        cls = transformers.Qwen3ForCausalLM
        cfg.update(rope_parameters={"rope_type": "default", "rope_theta": theta},
                   use_sliding_window=False, attention_bias=False, hidden_act="silu")
        config = transformers.Qwen3Config(**cfg)
    elif family == "gemma2":
        cls = transformers.Gemma2ForCausalLM
        cfg.update(rope_parameters={"rope_type": "default", "rope_theta": theta},
                   query_pre_attn_scalar=head_dim, sliding_window=g.hp("attention.sliding_window"),
                   attn_logit_softcapping=float(g.hp("attn_logit_softcapping")),
                   final_logit_softcapping=float(g.hp("final_logit_softcapping")),
                   hidden_activation="gelu_pytorch_tanh")
        config = transformers.Gemma2Config(**cfg)
    elif family == "gemma3":
        cls = transformers.Gemma3ForCausalLM
        cfg.update(rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": theta},
            "sliding_attention": {"rope_type": "default",
                                  "rope_theta": float(g.hp("rope.freq_base_swa", 10000.0))}},
            query_pre_attn_scalar=head_dim, sliding_window=g.hp("attention.sliding_window"),
            sliding_window_pattern=6, final_logit_softcapping=None,
            attn_logit_softcapping=None, hidden_activation="gelu_pytorch_tanh")
        config = transformers.Gemma3TextConfig(**cfg)
    elif family == "phi3":
        cls = transformers.Phi3ForCausalLM
        orig = g.hp("rope.scaling.original_context_length")
        cfg.update(rope_parameters={
            "rope_type": "longrope", "rope_theta": theta,
            "long_factor": [float(x) for x in g.tensors["rope_factors_long.weight"]],
            "short_factor": [float(x) for x in g.tensors["rope_factors_short.weight"]],
            "original_max_position_embeddings": orig},
            original_max_position_embeddings=orig, sliding_window=None, hidden_act="silu",
            resid_pdrop=0.0, embd_pdrop=0.0)
        cfg.pop("head_dim")
        config = transformers.Phi3Config(**cfg)
    else:
        raise ValueError(family)
    config._attn_implementation = "eager"
    model = cls(config).to(torch.float32).eval()

    def norm(name):
        w = g.t(name)
        return w - torch.tensor(1.0, dtype=torch.float32) if gemma else w

    sd = {"model.embed_tokens.weight": g.t("token_embd.weight"),
          "model.norm.weight": norm("output_norm.weight"),
          "lm_head.weight": g.t("token_embd.weight") if tied else g.t("output.weight")}
    for i in range(n_layer):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        sd[p + "input_layernorm.weight"] = norm(b + "attn_norm.weight")
        sd[p + "self_attn.o_proj.weight"] = g.t(b + "attn_output.weight")
        sd[p + "mlp.down_proj.weight"] = g.t(b + "ffn_down.weight")
        if family == "phi3":
            sd[p + "self_attn.qkv_proj.weight"] = g.t(b + "attn_qkv.weight")
            sd[p + "mlp.gate_up_proj.weight"] = g.t(b + "ffn_up.weight")
        else:
            q, k = g.tensors[b + "attn_q.weight"], g.tensors[b + "attn_k.weight"]
            if g.arch == "llama":
                q, k = unpermute(q, n_head), unpermute(k, n_kv)
            sd[p + "self_attn.q_proj.weight"] = torch.from_numpy(q.copy())
            sd[p + "self_attn.k_proj.weight"] = torch.from_numpy(k.copy())
            sd[p + "self_attn.v_proj.weight"] = g.t(b + "attn_v.weight")
            sd[p + "mlp.gate_proj.weight"] = g.t(b + "ffn_gate.weight")
            sd[p + "mlp.up_proj.weight"] = g.t(b + "ffn_up.weight")
        if family == "qwen2":
            for x in "qkv":
                sd[p + f"self_attn.{x}_proj.bias"] = g.t(b + f"attn_{x}.bias")
        if family in ("qwen3", "gemma3"):
            sd[p + "self_attn.q_norm.weight"] = norm(b + "attn_q_norm.weight")
            sd[p + "self_attn.k_norm.weight"] = norm(b + "attn_k_norm.weight")
        if gemma:
            sd[p + "post_attention_layernorm.weight"] = norm(b + "post_attention_norm.weight")
            sd[p + "pre_feedforward_layernorm.weight"] = norm(b + "ffn_norm.weight")
            sd[p + "post_feedforward_layernorm.weight"] = norm(b + "post_ffw_norm.weight")
        else:
            sd[p + "post_attention_layernorm.weight"] = norm(b + "ffn_norm.weight")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # Buffers (rotary inv_freq) are not in sd; every parameter must be.
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise RuntimeError(f"{family}: missing {missing}, unexpected {unexpected}")
    if tied and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError(f"{family}: lm_head is not tied")
    return model, cfg


def check_rope(family, g, model):
    """The rotary frequencies HF uses equal what the GGUF says."""
    rot = model.model.rotary_emb
    d = g.hp("attention.key_length", g.hp("embedding_length") // g.hp("attention.head_count"))
    theta = float(g.hp("rope.freq_base", 10000.0))
    base = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if family == "llama3":
        want = base / g.t("rope_freqs.weight")
        got = rot.inv_freq
        err = float(((got - want).abs() / want).max())
        assert err < 1e-5, f"llama3 inv_freq differs from rope_freqs: rel {err}"
        print(f"  llama3: HF inv_freq == base^(-2i/d) / rope_freqs (max rel {err:.1e})")
    if family == "phi3":
        want_af = float(g.hp("rope.scaling.attn_factor"))
        assert abs(rot.attention_scaling - want_af) < 1e-6, (rot.attention_scaling, want_af)
        long_want = base / g.t("rope_factors_long.weight")
        orig = g.hp("rope.scaling.original_context_length")
        init = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["longrope"]
        long_got, _ = init(model.config, None, seq_len=orig + 1)
        err = float(((long_got - long_want).abs() / long_want).max())
        assert err < 1e-5, f"phi3 long inv_freq: rel {err}"
        print(f"  phi3: attn_factor {want_af:.6f} == HF attention_scaling; long factors ok")


@torch.no_grad()
def logits_of(model, ids):
    out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    return out.logits[0].to(torch.float32)


def prompts(n_normal):
    rng = np.random.default_rng(PROMPT_SEED)
    return [(f"random_{n}", [int(x) for x in rng.integers(0, n_normal, size=n)])
            for n in PROMPT_LENGTHS]


def case(model, name, ids):
    logits = logits_of(model, ids)
    lp = torch.log_softmax(logits, dim=-1)
    lse = torch.logsumexp(logits, dim=-1)
    positions = []
    for i in range(len(ids)):
        v, ix = torch.topk(lp[i], TOP_K)
        positions.append({"top_ids": [int(x) for x in ix],
                          "top_logprobs": [r5(x) for x in v], "logsumexp": r5(lse[i])})
    seq, greedy, margins = list(ids), [], []
    for _ in range(N_GREEDY):
        last = logits_of(model, seq)[-1]
        top2 = torch.topk(last, 2)
        nxt = int(torch.argmax(last))  # first index of the maximum
        greedy.append(nxt)
        margins.append(r5(top2.values[0] - top2.values[1]))
        seq.append(nxt)
    return {"name": name, "prompt_ids": ids, "positions": positions,
            "greedy_ids": greedy, "greedy_margins": margins}


def window_effect(family, cfg, model, g, ids):
    """Max |Δ logit| between the model and the same model with no sliding window."""
    kw = dict(cfg)
    if family == "gemma3":
        kw["layer_types"] = ["full_attention"] * kw["num_hidden_layers"]
    elif family == "gemma2":
        kw["layer_types"] = ["full_attention"] * kw["num_hidden_layers"]
    else:
        kw["sliding_window"] = None
    config = type(model.config)(**kw)
    config._attn_implementation = "eager"
    other = type(model)(config).to(torch.float32).eval()
    other.load_state_dict(model.state_dict())
    return float((logits_of(model, ids) - logits_of(other, ids)).abs().max())


# Config keys transformers' GGUF loader does not read from these files (it uses
# its defaults: query_pre_attn_scalar 256, softcaps 50/30, local RoPE base 10000,
# head_dim = dim / heads, no rope scaling); passed to it as overrides.
LOADER_OVERRIDES = {
    "llama3": ["rope_parameters"],
    "qwen3": ["head_dim"],
    "gemma2": ["query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"],
    "gemma3": ["query_pre_attn_scalar", "rope_parameters"],
    "phi3": ["rope_parameters", "original_max_position_embeddings"],
}


def gguf_loader_check(family, cfg, path, model, ids):
    """Cross-check against transformers' own GGUF loader, where it takes the file."""
    if family == "mistral":
        return ("transformers gguf_file loader: not comparable (arch llama -> "
                "LlamaForCausalLM without a sliding window)")
    overrides = {k: cfg[k] for k in LOADER_OVERRIDES.get(family, [])}
    try:
        ref = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32,
            **overrides)
        ref.config._attn_implementation = "eager"
        ref.eval()
        d = float((logits_of(ref, ids) - logits_of(model, ids)).abs().max())
        return (f"transformers gguf_file loader (overrides {sorted(overrides)}): "
                f"max |dlogit| {d:.2e} on the last case")
    except Exception as e:  # noqa: BLE001 -- recorded, not fatal
        return f"transformers gguf_file loader: not usable ({type(e).__name__}: {str(e)[:120]})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="target/tiny-families", help="GGUFs written by the Rust test")
    ap.add_argument("--only", default="", help="comma-separated families")
    ap.add_argument("--out", default=OUT_DIR)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    os.makedirs(args.out, exist_ok=True)
    fams = [f for f in args.only.split(",") if f] or FAMILIES
    for family in fams:
        path = os.path.join(args.dir, f"{family}.gguf")
        g = Gguf(path)
        model, cfg = build(family, g)
        print(f"{family}: {type(model).__name__}, {len(g.tensors)} tensors, "
              f"types {sorted(set(g.types.values()))}")
        check_rope(family, g, model)
        token_types = g.field("tokenizer.ggml.token_type")
        n_normal = sum(1 for t in token_types if t == 1)
        cases = [case(model, name, ids) for name, ids in prompts(n_normal)]
        if family in ("mistral", "gemma2", "gemma3"):
            eff = window_effect(family, cfg, model, g, cases[-1]["prompt_ids"])
            assert eff > 1e-3, f"{family}: the sliding window changes nothing ({eff})"
            print(f"  sliding window: max |dlogit| vs no window {eff:.3f}")
        check = gguf_loader_check(family, cfg, path, model, cases[-1]["prompt_ids"])
        print("  " + check)
        margins = [p["top_logprobs"][0] - p["top_logprobs"][1] for c in cases for p in c["positions"]]
        print(f"  top-1 margins: min {min(margins):.3f}, "
              f"{sum(m < 0.1 for m in margins)}/{len(margins)} below 0.1")
        fixture = {
            "family": family, "hf_class": type(model).__name__, "gguf_sha256": g.sha256,
            "hf_config": {k: v for k, v in cfg.items()}, "tensor_types": g.types,
            "gguf_loader_check": check, "top_k": TOP_K, "cases": cases,
            "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        }
        out = os.path.join(args.out, f"{family}.json")
        with open(out, "w") as f:
            json.dump(fixture, f, separators=(",", ":"))
            f.write("\n")
        print(f"  wrote {out} ({os.path.getsize(out)} bytes)")


if __name__ == "__main__":
    sys.exit(main())
