//! The actor runtime end to end: batch invariance (bit for bit), no leaks,
//! prefix caching, preemption, cancellation, reproducible seeded sampling.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use brigade::config::{Config, Count};
use brigade::engine::{
    Engine, EngineHandle, Event, FinishReason, GenerateRequest, ResponseStream, SamplingParams,
};
use brigade::model::Model;
use brigade::tokenizer::Tokenizer;

/// Tokens, their logprobs and the finish reason of one completion.
#[derive(Clone, Debug, PartialEq)]
struct Out {
    tokens: Vec<u32>,
    logprobs: Vec<u32>, // f32 bits: compared exactly
    finish: Option<FinishReason>,
    text: String,
}

fn collect(mut s: ResponseStream) -> Vec<Out> {
    let mut outs: Vec<Out> = Vec::new();
    while let Some(ev) = s.blocking_next() {
        match ev {
            Event::Token { index, token, text } => {
                while outs.len() <= index {
                    outs.push(Out {
                        tokens: vec![],
                        logprobs: vec![],
                        finish: None,
                        text: String::new(),
                    });
                }
                outs[index].tokens.push(token.token);
                outs[index].logprobs.push(token.logprob.to_bits());
                outs[index].text.push_str(&text);
            }
            Event::Finished {
                index,
                reason,
                text,
                ..
            } => {
                while outs.len() <= index {
                    outs.push(Out {
                        tokens: vec![],
                        logprobs: vec![],
                        finish: None,
                        text: String::new(),
                    });
                }
                outs[index].finish = Some(reason);
                outs[index].text.push_str(&text);
            }
            Event::Error(e) => panic!("request failed: {e}"),
            _ => {}
        }
    }
    outs
}

fn config(workers: usize, prefill_chunk: usize, kv_tokens: usize, prefix: bool) -> Config {
    let mut c = Config::default();
    c.runtime.workers = Count::N(workers);
    c.runtime.threads_per_worker = Count::N(1);
    c.runtime.prefill_chunk = prefill_chunk;
    c.runtime.max_batched_tokens = 256;
    c.kv_cache.capacity_tokens = kv_tokens;
    c.kv_cache.prefix_caching = prefix;
    // Small pools here exist to force preemption: admit on the prompt alone.
    c.runtime.admission_reserve_tokens = 0;
    c.validate().unwrap();
    c
}

/// Waits until the engine is idle and checks that every block is free
/// (cached blocks with no reference count as free).
fn assert_pool_whole(h: &EngineHandle) {
    let t0 = Instant::now();
    loop {
        let s = h.stats();
        if s.running == 0 && s.waiting == 0 && s.kv_blocks_free == s.kv_blocks_total {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "pool not whole: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn prompts_32() -> Vec<String> {
    let subjects = [
        "The history of Rome",
        "A recipe for bread",
        "How rockets work",
        "The best way to learn Rust",
        "Why the sky is blue",
        "A poem about autumn",
        "The rules of chess",
        "Photosynthesis in plants",
    ];
    let forms = [
        "Tell me about",
        "Write one sentence on",
        "Explain briefly:",
        "Summarize:",
    ];
    let mut v = Vec::new();
    for f in forms {
        for s in subjects {
            v.push(format!("{f} {s}."));
        }
    }
    v
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        logprobs: Some(0),
        ..SamplingParams::greedy(max_tokens)
    }
}

fn run_alone(h: &EngineHandle, prompts: &[String], p: &SamplingParams) -> Vec<Vec<Out>> {
    prompts
        .iter()
        .map(|t| {
            collect(
                h.submit(GenerateRequest::text(t.clone(), p.clone()))
                    .unwrap(),
            )
        })
        .collect()
}

/// Submits every prompt with staggered arrivals, then collects all.
fn run_concurrent(h: &EngineHandle, prompts: &[String], p: &SamplingParams) -> Vec<Vec<Out>> {
    let mut streams = Vec::new();
    for (i, t) in prompts.iter().enumerate() {
        streams.push(
            h.submit(GenerateRequest::text(t.clone(), p.clone()))
                .unwrap(),
        );
        if i % 8 == 7 {
            std::thread::sleep(Duration::from_millis(15));
        }
    }
    streams.into_iter().map(collect).collect()
}

fn real() -> Option<(Arc<Model>, Arc<Tokenizer>)> {
    common::real_model()
}

#[test]
fn batch_invariance_bit_for_bit_across_workers_chunking_and_preemption() {
    let Some((model, tok)) = real() else { return };
    let prompts = prompts_32();
    let p = greedy(12);
    // Reference: each request alone, 1 worker, no chunking, roomy pool, no prefix cache.
    let h = Engine::start(model.clone(), tok.clone(), config(1, 0, 8192, false)).unwrap();
    let alone = run_alone(&h, &prompts, &p);
    drop(h);
    // 64 concurrent requests: each prompt twice.
    let mut many = prompts.clone();
    many.extend(prompts.iter().cloned());
    // Every request of a concurrent run equals running it alone.
    let same_as_alone = |name: &str, got: &[Vec<Out>]| {
        for (i, g) in got.iter().enumerate() {
            assert_eq!(
                g,
                &alone[i % prompts.len()],
                "{name}: request {i} ({:?}) differs from running alone",
                many[i]
            );
        }
    };
    // (workers, threads per worker, prefill chunk, KV tokens, prefix cache, name).
    let cases = [
        (1, 1, 0, 8192, true, "1 worker"),
        (2, 1, 0, 8192, true, "2 workers"),
        (3, 1, 0, 8192, false, "3 workers"),
        // Its pool threads poll for work while a micro-batch runs (when the cores allow).
        (1, 2, 0, 8192, true, "1 worker x 2 threads"),
        (
            2,
            1,
            5,
            8192,
            true,
            "2 workers, chunked prefill (5-token chunks)",
        ),
        (
            2,
            1,
            0,
            320,
            true,
            "2 workers, KV pool of 320 tokens (forces preemption)",
        ),
    ];
    for (workers, threads, chunk, kv, prefix, name) in cases {
        let mut c = config(workers, chunk, kv, prefix);
        c.runtime.threads_per_worker = Count::N(threads);
        let h = Engine::start(model.clone(), tok.clone(), c).unwrap();
        same_as_alone(name, &run_concurrent(&h, &many, &p));
        let s = h.stats();
        if kv < 1000 {
            assert!(
                s.preemptions > 0,
                "{name}: expected preemptions, stats {s:?}"
            );
        }
        assert_pool_whole(&h);
    }
    // The same tight pool with the admission reserve (the default policy): requests
    // wait instead of being admitted and preempted later; outputs unchanged.
    let mut c = config(2, 0, 320, true);
    c.runtime.admission_reserve_tokens = 256;
    let h = Engine::start(model.clone(), tok.clone(), c).unwrap();
    same_as_alone("admission reserve", &run_concurrent(&h, &many, &p));
    let s = h.stats();
    assert_eq!(
        s.preemptions, 0,
        "admission reserve: no preemption expected, stats {s:?}"
    );
    assert_pool_whole(&h);
}

#[test]
fn prefix_cache_hits_and_outputs_unchanged() {
    let Some((model, tok)) = real() else { return };
    let system =
        "You are a meticulous assistant. Answer in one short sentence, cite no sources, and never \
                  use lists. Keep a neutral tone and avoid speculation about the future. "
            .repeat(2);
    let prompts: Vec<String> = [
        "What is rain?",
        "What is snow?",
        "What is fog?",
        "What is hail?",
    ]
    .iter()
    .map(|q| format!("{system}{q}"))
    .collect();
    let p = greedy(8);
    let off = Engine::start(model.clone(), tok.clone(), config(1, 0, 8192, false)).unwrap();
    let want = run_alone(&off, &prompts, &p);
    assert_eq!(off.stats().prefix_hits, 0);
    let on = Engine::start(model.clone(), tok.clone(), config(2, 0, 8192, true)).unwrap();
    let got = run_alone(&on, &prompts, &p);
    assert_eq!(got, want, "prefix caching changed outputs");
    let s = on.stats();
    assert!(
        s.prefix_hits >= 3 * 32,
        "expected hits on the shared system prompt, stats {s:?}"
    );
    assert_pool_whole(&on);
}

#[test]
fn stress_500_requests_random_aborts_tiny_channels_leaves_pool_whole() {
    let (model, tok) = common::tiny_model(&brigade::testing::TinyLlamaSpec::default());
    let mut c = config(2, 3, 2048, true);
    c.runtime.channel_capacity = 1;
    c.runtime.pipeline_depth = Count::N(1);
    c.runtime.request_queue = 600;
    c.runtime.max_seqs = 16;
    c.validate().unwrap();
    let h = Engine::start(model, tok, c).unwrap();
    let mut rng = brigade::sampling::SplitMix64::new(12345);
    let mut next = || rng.next_u64();
    let mut streams = Vec::new();
    let mut dropped = 0;
    for i in 0..500 {
        let len = 1 + (next() % 40) as usize;
        let prompt: Vec<u32> = (0..len).map(|_| (next() % 300) as u32).collect();
        let params = SamplingParams {
            max_tokens: 1 + (next() % 24) as usize,
            temperature: 0.8,
            seed: Some(i),
            ..Default::default()
        };
        let s = h.submit(GenerateRequest::tokens(prompt, params)).unwrap();
        match next() % 4 {
            0 => {
                drop(s); // dropping the stream aborts
                dropped += 1;
            }
            1 => {
                h.abort(s.id);
                streams.push((s, true));
            }
            _ => streams.push((s, false)),
        }
    }
    let mut aborted = 0;
    for (s, explicit) in streams {
        let outs = collect(s);
        for o in &outs {
            if o.finish == Some(FinishReason::Abort) {
                aborted += 1;
            } else {
                assert!(!explicit || o.finish.is_some());
            }
        }
    }
    assert!(
        dropped > 50 && aborted > 0,
        "dropped {dropped}, aborted {aborted}"
    );
    assert_pool_whole(&h);
}

#[test]
fn abort_stops_a_long_request_within_a_step() {
    let (model, tok) = common::tiny_model(&brigade::testing::TinyLlamaSpec::default());
    let h = Engine::start(model, tok, config(1, 0, 4096, true)).unwrap();
    let mut s = h
        .submit(GenerateRequest::tokens(
            vec![5, 6, 7],
            SamplingParams {
                max_tokens: 200,
                ignore_eos: true,
                ..SamplingParams::greedy(200)
            },
        ))
        .unwrap();
    let mut n = 0;
    let mut reason = None;
    while let Some(ev) = s.blocking_next() {
        match ev {
            Event::Token { .. } => {
                n += 1;
                if n == 3 {
                    h.abort(s.id);
                }
            }
            Event::Finished { reason: r, .. } => reason = Some(r),
            _ => {}
        }
    }
    assert_eq!(reason, Some(FinishReason::Abort));
    assert!(n < 200, "abort ignored: {n} tokens");
    assert_pool_whole(&h);
}

#[test]
fn finish_reasons_length_and_stop() {
    let Some((model, tok)) = real() else { return };
    let h = Engine::start(model, tok, config(1, 0, 4096, true)).unwrap();
    let out = collect(
        h.submit(GenerateRequest::text("Once upon a time", greedy(5)))
            .unwrap(),
    );
    assert_eq!(out[0].finish, Some(FinishReason::Length));
    assert_eq!(out[0].tokens.len(), 5);
    let chat = brigade::engine::Prompt::Chat(vec![brigade::tokenizer::ChatMessage::new(
        "user", "Say hi.",
    )]);
    let out = collect(
        h.submit(GenerateRequest {
            prompt: chat,
            params: greedy(64),
            priority: 0,
        })
        .unwrap(),
    );
    assert_eq!(out[0].finish, Some(FinishReason::Stop), "{:?}", out[0].text);
    assert!(!out[0].text.contains("<|im_end|>"));
}

#[test]
fn invalid_requests_are_rejected_with_the_field_named() {
    let (model, tok) = common::tiny_model(&brigade::testing::TinyLlamaSpec::default());
    let h = Engine::start(model, tok, config(1, 0, 1024, true)).unwrap();
    let cases: Vec<(GenerateRequest, &str)> = vec![
        (
            GenerateRequest::tokens(
                vec![1, 2],
                SamplingParams {
                    temperature: -1.0,
                    ..Default::default()
                },
            ),
            "temperature",
        ),
        (
            GenerateRequest::tokens(
                vec![1, 2],
                SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
            ),
            "top_p",
        ),
        (
            GenerateRequest::tokens(
                vec![1, 2],
                SamplingParams {
                    top_k: -2,
                    ..Default::default()
                },
            ),
            "top_k",
        ),
        (
            GenerateRequest::tokens(
                vec![1, 2],
                SamplingParams {
                    min_p: 1.5,
                    ..Default::default()
                },
            ),
            "min_p",
        ),
        (
            GenerateRequest::tokens(
                vec![1, 2],
                SamplingParams {
                    logprobs: Some(21),
                    ..Default::default()
                },
            ),
            "top_logprobs",
        ),
        (
            GenerateRequest::tokens(
                vec![1, 2],
                SamplingParams {
                    n: 1000,
                    ..Default::default()
                },
            ),
            "n",
        ),
        (
            GenerateRequest::tokens(
                vec![1, 2],
                SamplingParams {
                    stop_token_ids: vec![99999],
                    ..Default::default()
                },
            ),
            "stop_token_ids",
        ),
        (
            GenerateRequest::tokens(
                vec![1, 2],
                SamplingParams {
                    logit_bias: [(99999u32, 1.0f32)].into_iter().collect(),
                    ..Default::default()
                },
            ),
            "logit_bias",
        ),
        (
            GenerateRequest::tokens(vec![], SamplingParams::default()),
            "prompt",
        ),
        (
            GenerateRequest::tokens(vec![100000], SamplingParams::default()),
            "prompt",
        ),
        (
            GenerateRequest::tokens(
                vec![1; 200],
                SamplingParams {
                    max_tokens: 100,
                    ..Default::default()
                },
            ),
            "max_tokens",
        ),
        (
            GenerateRequest::tokens(
                vec![1, 2],
                SamplingParams {
                    presence_penalty: 3.0,
                    ..Default::default()
                },
            ),
            "presence_penalty",
        ),
    ];
    for (req, field) in cases {
        let mut s = h.submit(req).unwrap();
        match s.blocking_next() {
            Some(Event::Error(brigade::engine::EngineError::Invalid { param, message })) => {
                assert_eq!(param.as_deref(), Some(field), "{message}");
            }
            other => panic!("{field}: expected a validation error, got {other:?}"),
        }
    }
}

#[test]
fn kv_cache_dtypes_f16_bf16_f32_all_work() {
    let Some((model, tok)) = real() else { return };
    let prompts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Water boils at",
    ];
    let mut results = Vec::new();
    for dtype in [
        brigade::model::kv::KvDType::F16,
        brigade::model::kv::KvDType::Bf16,
        brigade::model::kv::KvDType::F32,
    ] {
        let mut c = config(2, 0, 2048, true);
        c.kv_cache.dtype = dtype;
        let h = Engine::start(model.clone(), tok.clone(), c).unwrap();
        let alone = run_alone(&h, &prompts.map(String::from), &greedy(6));
        // Batched and chunked runs agree bit for bit within a dtype too.
        let batched = run_concurrent(&h, &prompts.map(String::from), &greedy(6));
        assert_eq!(alone, batched, "{dtype:?}: batch invariance");
        assert!(
            alone[0][0].text.contains("Paris"),
            "{dtype:?}: {:?}",
            alone[0][0].text
        );
        assert_pool_whole(&h);
        results.push(alone);
    }
    // f32 storage is the most precise: its first tokens agree with f16's.
    for (a, b) in results[0].iter().zip(&results[2]) {
        assert_eq!(a[0].tokens[0], b[0].tokens[0]);
    }
}
