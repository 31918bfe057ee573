//! N-gram speculative decoding through the runtime on the real SmolLM2
//! Instruct model: greedy output identical, token for token (and log-probability
//! bits), with and without speculation on an input-grounded prompt ("copy this
//! text": drafts accepted) and on free prose; seeded sampling gives the same tokens with and
//! without it, alone and in a batch; limits, stop tokens and stop strings end
//! a completion at the same token.

mod common;

use std::time::Duration;

use brigade::config::{Config, Count, SpecMethod, SpeculativeConfig};
use brigade::engine::{
    Engine, EngineHandle, EngineStats, Event, FinishReason, GenerateRequest, Prompt,
    ResponseStream, SamplingParams,
};
use brigade::tokenizer::ChatMessage;

#[derive(Clone, Debug, PartialEq)]
struct Completion {
    tokens: Vec<u32>,
    /// Log-probability bits of each token.
    logprobs: Vec<u32>,
    text: String,
    finish: Option<FinishReason>,
}

fn collect(mut s: ResponseStream) -> Completion {
    let mut c = Completion {
        tokens: vec![],
        logprobs: vec![],
        text: String::new(),
        finish: None,
    };
    while let Some(ev) = s.blocking_next() {
        match ev {
            Event::Token { token, text, .. } => {
                c.tokens.push(token.token);
                c.logprobs.push(token.logprob.to_bits());
                c.text.push_str(&text);
            }
            Event::Finished { reason, text, .. } => {
                c.finish = Some(reason);
                c.text.push_str(&text);
            }
            Event::Error(e) => panic!("{e}"),
            Event::Started { .. } | Event::PromptLogprobs(_) => {}
        }
    }
    c
}

fn cfg(spec: bool) -> Config {
    let mut c = Config::default();
    c.runtime.workers = Count::N(2);
    c.runtime.threads_per_worker = Count::N(1);
    c.kv_cache.capacity_tokens = 8192;
    c.speculative = if spec {
        SpeculativeConfig {
            method: SpecMethod::Ngram,
            ..SpeculativeConfig::default()
        }
    } else {
        SpeculativeConfig::off()
    };
    c.validate().unwrap();
    c
}

/// SmolLM2-135M copies a passage faithfully (code it rewrites).
const PASSAGE: &str = "The harbour town woke slowly. Fishermen carried their nets down to the water, gulls circled above the boats, and the baker on the corner opened his shutters to let the smell of fresh bread into the street. Children ran past the fountain on their way to school, and an old man sat on a bench reading yesterday's newspaper while his dog slept at his feet. By noon the market was full of voices, colours and the sound of carts rolling over the stones.";

fn chat(text: &str, params: SamplingParams) -> GenerateRequest {
    GenerateRequest {
        prompt: Prompt::Chat(vec![ChatMessage::new("user", text)]),
        params,
        priority: 0,
    }
}

fn grounded(params: SamplingParams) -> GenerateRequest {
    chat(&format!("Copy this text exactly:\n\n{PASSAGE}"), params)
}

fn prose(params: SamplingParams) -> GenerateRequest {
    chat(
        "Write a short story about a lighthouse keeper who finds a message in a bottle.",
        params,
    )
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        logprobs: Some(2),
        ..SamplingParams::greedy(max_tokens)
    }
}

fn run(h: &EngineHandle, r: GenerateRequest) -> Completion {
    collect(h.submit(r).expect("submitted"))
}

/// The stats once the scheduler has published the last step (it publishes after
/// applying a result, which can trail the stream's end).
fn settled_stats(h: &EngineHandle, want_steps: u64) -> EngineStats {
    for _ in 0..500 {
        let st = h.stats();
        if st.running == 0 && st.in_flight == 0 && st.steps >= want_steps {
            return st;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    h.stats()
}

#[test]
fn greedy_output_is_identical_with_and_without_speculation() {
    let Some((model, tok)) = common::real_model() else {
        return;
    };
    let off = Engine::start(model.clone(), tok.clone(), cfg(false)).unwrap();
    let on = Engine::start(model, tok, cfg(true)).unwrap();
    for (name, req) in [
        ("grounded", grounded(greedy(160))),
        ("prose", prose(greedy(120))),
    ] {
        let base = run(&off, req.clone());
        let before = settled_stats(&on, 0);
        let spec = run(&on, req);
        let after = settled_stats(&on, before.steps + 1);
        assert!(
            base.tokens.len() > 40,
            "{name}: only {} tokens: {:?}",
            base.tokens.len(),
            base.text
        );
        assert_eq!(
            spec.tokens, base.tokens,
            "{name}: tokens differ\nwith: {:?}\nwithout: {:?}",
            spec.text, base.text
        );
        assert_eq!(
            spec, base,
            "{name}: log-probabilities, text or finish differ"
        );
        let (steps, drafted, accepted) = (
            after.spec_steps - before.spec_steps,
            after.spec_draft_tokens - before.spec_draft_tokens,
            after.spec_accepted_tokens - before.spec_accepted_tokens,
        );
        eprintln!(
            "{name}: {} tokens in {} steps; {steps} verify steps, {accepted}/{drafted} drafts accepted",
            spec.tokens.len(),
            after.steps - before.steps
        );
        if name == "grounded" {
            // The copy is drafted from the prompt: most drafts hold, and the run
            // took fewer steps than tokens.
            assert!(
                accepted * 2 > drafted && accepted > 40,
                "{name}: {accepted}/{drafted} accepted"
            );
            assert!(
                after.steps - before.steps < spec.tokens.len() as u64,
                "{name}: no step saved"
            );
        }
        assert!(accepted <= drafted);
    }
    // Nothing leaked: every block back in the pool.
    let st = settled_stats(&on, 0);
    assert_eq!((st.running, st.kv_blocks_free), (0, st.kv_blocks_total));
}

#[test]
fn seeded_sampling_is_the_same_with_and_without_speculation_alone_and_batched() {
    let Some((model, tok)) = common::real_model() else {
        return;
    };
    let params = |i: u64| SamplingParams {
        max_tokens: 80,
        temperature: 0.8,
        top_p: 0.95,
        seed: Some(41 + i),
        logprobs: Some(1),
        ..SamplingParams::default()
    };
    let off = Engine::start(model.clone(), tok.clone(), cfg(false)).unwrap();
    let base: Vec<Completion> = (0..3).map(|i| run(&off, grounded(params(i)))).collect();
    // Sampling happened: the three seeds do not all give the same output.
    assert!(
        base.windows(2).any(|w| w[0].tokens != w[1].tokens),
        "three seeds, one output"
    );
    drop(off);
    let on = Engine::start(model, tok, cfg(true)).unwrap();
    // Alone (speculating), twice: reproducible, and equal to plain decoding.
    for _ in 0..2 {
        for i in 0..3u64 {
            assert_eq!(
                run(&on, grounded(params(i))),
                base[i as usize],
                "seed {} alone",
                41 + i
            );
        }
    }
    // Batched: 3 together (still speculating), then among 6 more (above max_running, not speculating).
    for extra in [0usize, 6] {
        let streams: Vec<ResponseStream> = (0..3u64)
            .map(|i| on.submit(grounded(params(i))).unwrap())
            .chain((0..extra).map(|j| {
                on.submit(prose(SamplingParams {
                    seed: Some(j as u64),
                    ..params(9)
                }))
                .unwrap()
            }))
            .collect();
        let got: Vec<Completion> = streams.into_iter().map(collect).collect();
        for i in 0..3 {
            assert_eq!(got[i], base[i], "seed {} with {} others", 41 + i, 2 + extra);
        }
    }
    let st = settled_stats(&on, 0);
    assert!(
        st.spec_accepted_tokens > 0,
        "no draft was ever accepted: {st:?}"
    );
}

#[test]
fn limits_stop_tokens_and_stop_strings_end_at_the_same_token() {
    let Some((model, tok)) = common::real_model() else {
        return;
    };
    let off = Engine::start(model.clone(), tok.clone(), cfg(false)).unwrap();
    let on = Engine::start(model, tok.clone(), cfg(true)).unwrap();
    let reference = run(&off, grounded(greedy(160)));
    // A stop token in the middle of the copy (the 30th token), a stop string, a
    // short max_tokens and min_tokens: each ends (or runs) where plain decoding does.
    let stop_token = reference.tokens[30];
    let cases = [
        (
            "max_tokens 37",
            SamplingParams {
                max_tokens: 37,
                ..greedy(37)
            },
        ),
        (
            "stop token",
            SamplingParams {
                stop_token_ids: vec![stop_token],
                ..greedy(160)
            },
        ),
        (
            "stop string",
            SamplingParams {
                stop: vec!["bread".into()],
                ..greedy(160)
            },
        ),
        (
            "min_tokens",
            SamplingParams {
                min_tokens: 130,
                ..greedy(160)
            },
        ),
    ];
    for (name, p) in cases {
        let want = run(&off, grounded(p.clone()));
        let got = run(&on, grounded(p));
        assert_eq!(got, want, "{name}");
        if name == "stop token" {
            assert_eq!(got.finish, Some(FinishReason::Stop));
            assert!(
                got.tokens.len() <= 31,
                "{name}: {} tokens",
                got.tokens.len()
            );
        }
    }
    let st = settled_stats(&on, 0);
    assert_eq!((st.running, st.kv_blocks_free), (0, st.kv_blocks_total));
    assert!(st.spec_accepted_tokens > 0);
}

/// Gemma 3 (sliding-window layers, a 262k vocabulary): the verify rows give the
/// same greedy tokens as plain decoding there too.
#[test]
fn gemma_greedy_output_is_identical_with_and_without_speculation() {
    let Some((model, tok)) = common::real_gemma_model() else {
        return;
    };
    let off = Engine::start(model.clone(), tok.clone(), cfg(false)).unwrap();
    let on = Engine::start(model, tok, cfg(true)).unwrap();
    // A raw text prompt (the GGUF has no chat template): the passage twice invites a third copy.
    let req = GenerateRequest::text(format!("{PASSAGE}\n\n{PASSAGE}\n\n"), greedy(90));
    let base = run(&off, req.clone());
    let spec = run(&on, req);
    assert!(
        base.tokens.len() > 20,
        "only {} tokens: {:?}",
        base.tokens.len(),
        base.text
    );
    assert_eq!(
        spec, base,
        "with: {:?}\nwithout: {:?}",
        spec.text, base.text
    );
    let st = settled_stats(&on, 0);
    eprintln!(
        "gemma: {} tokens; {} verify steps, {}/{} drafts accepted",
        spec.tokens.len(),
        st.spec_steps,
        st.spec_accepted_tokens,
        st.spec_draft_tokens
    );
    assert!(st.spec_accepted_tokens > 0, "{st:?}");
}

/// `brigade bench --spec-compare --rounds N` alternates off / on N times and
/// reports every round's speed-up and their median; the output token counts
/// match (greedy, same text either way). `--rounds 0` and `--rounds` without
/// `--spec-compare` are refused, naming the flag.
#[test]
fn bench_spec_compare_rounds_report_every_round_and_the_median() {
    let Some(path) = common::model_path() else {
        return;
    };
    let bin = env!("CARGO_BIN_EXE_brigade");
    let base = [
        "bench",
        "--model",
        path.to_str().expect("utf-8 path"),
        "--workload",
        "grounded",
        "--concurrency",
        "1",
        "--num-requests",
        "1",
        "--output-len",
        "24",
        "--json",
        "--no-progress",
        "--spec-compare",
    ];
    let out = std::process::Command::new(bin)
        .args(base)
        .args(["--rounds", "3"])
        .output()
        .expect("run brigade bench");
    let v = common::bench_json(&out);
    let rounds = common::floats(&v["speedups"]);
    assert_eq!(rounds.len(), 3, "{v}");
    assert!(rounds.iter().all(|&x| x > 0.0), "{rounds:?}");
    let mut sorted = rounds.clone();
    sorted.sort_by(f64::total_cmp);
    assert_eq!(
        v["speedup"].as_f64(),
        Some(sorted[1]),
        "median of {rounds:?}"
    );
    // Each round's speed-up is its own pair of runs' output tok/s.
    let (off, on) = (
        common::floats(&v["off_output_tokens_per_s"]),
        common::floats(&v["ngram_output_tokens_per_s"]),
    );
    assert_eq!((off.len(), on.len()), (3, 3), "{v}");
    for ((r, a), b) in rounds.iter().zip(&off).zip(&on) {
        assert!(
            (r - b / a).abs() < 1e-9 * r.abs().max(1.0),
            "{rounds:?} {off:?} {on:?}"
        );
    }
    assert_eq!(
        v["ngram"]["output_tokens_per_s"].as_f64(),
        on.last().copied()
    );
    assert_eq!(
        v["off"]["total_output_tokens"], v["ngram"]["total_output_tokens"],
        "{v}"
    );
    for bad in [&["--rounds", "0"][..], &["--rounds", "101"][..]] {
        let out = std::process::Command::new(bin)
            .args(base)
            .args(bad)
            .output()
            .expect("run brigade bench");
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("--rounds"));
    }
    let out = std::process::Command::new(bin)
        .args(&base[..base.len() - 1])
        .args(["--rounds", "2"])
        .output()
        .expect("run brigade bench");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--spec-compare"));
}
