//! Sampling through the runtime: seeded reproducibility under any load, `n`
//! completions sharing KV blocks, stop strings across token boundaries,
//! reported seeds, `min_tokens`.

mod common;

use std::time::Duration;

use brigade::config::{Config, Count};
use brigade::engine::{
    Engine, EngineHandle, Event, FinishReason, GenerateRequest, ResponseStream, SamplingParams,
};

#[derive(Clone, Debug, PartialEq)]
struct Completion {
    tokens: Vec<u32>,
    logprobs: Vec<u32>,
    text: String,
    finish: Option<FinishReason>,
}

fn collect(mut s: ResponseStream) -> (u64, Vec<Completion>) {
    let mut seed = 0;
    let mut outs: Vec<Completion> = Vec::new();
    let get = |outs: &mut Vec<Completion>, i: usize| {
        while outs.len() <= i {
            outs.push(Completion {
                tokens: vec![],
                logprobs: vec![],
                text: String::new(),
                finish: None,
            });
        }
    };
    while let Some(ev) = s.blocking_next() {
        match ev {
            Event::Started { seed: s, .. } => seed = s,
            Event::Token { index, token, text } => {
                get(&mut outs, index);
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
                get(&mut outs, index);
                outs[index].finish = Some(reason);
                outs[index].text.push_str(&text);
            }
            Event::Error(e) => panic!("{e}"),
            Event::PromptLogprobs(_) => {}
        }
    }
    (seed, outs)
}

fn cfg(workers: usize, kv_tokens: usize) -> Config {
    let mut c = Config::default();
    c.runtime.workers = Count::N(workers);
    c.runtime.threads_per_worker = Count::N(1);
    c.kv_cache.capacity_tokens = kv_tokens;
    // Small pools here exist to force preemption: admit on the prompt alone.
    c.runtime.admission_reserve_tokens = 0;
    c.validate().unwrap();
    c
}

fn mixed_params(i: usize) -> SamplingParams {
    let base = SamplingParams {
        max_tokens: 10,
        logprobs: Some(1),
        seed: Some(1000 + i as u64),
        ..Default::default()
    };
    match i % 4 {
        0 => SamplingParams {
            temperature: 0.9,
            ..base
        },
        1 => SamplingParams {
            temperature: 0.7,
            top_k: 20,
            top_p: 0.9,
            ..base
        },
        2 => SamplingParams {
            temperature: 1.2,
            min_p: 0.05,
            repetition_penalty: 1.2,
            presence_penalty: 0.3,
            ..base
        },
        _ => SamplingParams {
            temperature: 0.0,
            ..base
        },
    }
}

fn prompt(i: usize) -> String {
    let topics = [
        "the ocean",
        "a city at night",
        "old books",
        "mountain trains",
        "coffee",
        "winter birds",
        "robots",
        "gardens",
    ];
    format!(
        "Write about {} (story {}):",
        topics[i % topics.len()],
        i / topics.len()
    )
}

fn submit_all(h: &EngineHandle, n: usize) -> Vec<Vec<Completion>> {
    let mut streams = Vec::new();
    for i in 0..n {
        streams.push(
            h.submit(GenerateRequest::text(prompt(i), mixed_params(i)))
                .unwrap(),
        );
        if i % 10 == 9 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    streams.into_iter().map(|s| collect(s).1).collect()
}

#[test]
fn seeded_outputs_identical_alone_and_among_64_mixed_requests() {
    let Some((model, tok)) = common::real_model() else {
        return;
    };
    let h = Engine::start(model.clone(), tok.clone(), cfg(1, 8192)).unwrap();
    let alone: Vec<Vec<Completion>> = (0..64)
        .map(|i| {
            collect(
                h.submit(GenerateRequest::text(prompt(i), mixed_params(i)))
                    .unwrap(),
            )
            .1
        })
        .collect();
    drop(h);
    // Random sampling really happened: not every seeded output equals greedy.
    for (workers, kv, name) in [
        (1, 8192, "1 worker"),
        (2, 8192, "2 workers"),
        (2, 256, "2 workers, preemption"),
    ] {
        let h = Engine::start(model.clone(), tok.clone(), cfg(workers, kv)).unwrap();
        let got = submit_all(&h, 64);
        for i in 0..64 {
            assert_eq!(got[i], alone[i], "{name}: request {i} differs");
        }
        if kv < 1000 {
            assert!(h.stats().preemptions > 0, "{name}: no preemption happened");
        }
    }
}

#[test]
fn n_completions_share_prompt_blocks() {
    let Some((model, tok)) = common::real_model() else {
        return;
    };
    let long_prompt = "In the beginning of the long winter, the people of the valley gathered wood, salted fish, \
                       and told each other stories about the spring that would come. "
        .repeat(3);
    let params = |seed| SamplingParams {
        n: 4,
        max_tokens: 8,
        temperature: 1.0,
        seed: Some(seed),
        ..Default::default()
    };
    let mut c = cfg(1, 8192);
    c.kv_cache.prefix_caching = false;
    // n = 4 in one request
    let h = Engine::start(model.clone(), tok.clone(), c.clone()).unwrap();
    let (_, outs) = collect(
        h.submit(GenerateRequest::text(long_prompt.clone(), params(7)))
            .unwrap(),
    );
    assert_eq!(outs.len(), 4);
    assert!(outs
        .iter()
        .all(|o| o.tokens.len() == 8 && o.finish == Some(FinishReason::Length)));
    let distinct: std::collections::HashSet<_> = outs.iter().map(|o| o.tokens.clone()).collect();
    assert!(
        distinct.len() > 1,
        "4 seeded random completions were all identical"
    );
    let shared_peak = h.stats().kv_usage_peak * h.stats().kv_blocks_total as f64;
    // Reproducible: same seed → same 4 completions, also in a 2-worker engine.
    let h2 = Engine::start(model.clone(), tok.clone(), cfg(2, 8192)).unwrap();
    let (_, again) = collect(
        h2.submit(GenerateRequest::text(long_prompt.clone(), params(7)))
            .unwrap(),
    );
    assert_eq!(again, outs);
    // Four separate requests submitted together (no prefix caching).
    let h3 = Engine::start(model.clone(), tok.clone(), c).unwrap();
    let one = |s| SamplingParams { n: 1, ..params(s) };
    let streams: Vec<_> = (0..4)
        .map(|i| {
            h3.submit(GenerateRequest::text(long_prompt.clone(), one(100 + i)))
                .unwrap()
        })
        .collect();
    for s in streams {
        collect(s);
    }
    let separate_peak = h3.stats().kv_usage_peak * h3.stats().kv_blocks_total as f64;
    eprintln!("peak blocks: n=4 request {shared_peak}, four requests {separate_peak}");
    assert!(
        shared_peak < separate_peak,
        "n=4 used {shared_peak} blocks, 4 requests {separate_peak}"
    );
}

#[test]
fn stop_strings_split_across_tokens_are_caught() {
    let Some((model, tok)) = common::real_model() else {
        return;
    };
    let h = Engine::start(model, tok.clone(), cfg(1, 4096)).unwrap();
    let p = "The capital of France is";
    let (_, base) = collect(
        h.submit(GenerateRequest::text(p, SamplingParams::greedy(24)))
            .unwrap(),
    );
    let base = &base[0];
    // Find a stop string spanning the boundary of two tokens.
    let pieces: Vec<String> = base
        .tokens
        .iter()
        .map(|&t| tok.decode(&[t], false).unwrap())
        .collect();
    let k = (1..pieces.len())
        .find(|&k| pieces[k - 1].trim().len() >= 2 && pieces[k].trim().len() >= 2)
        .expect("two word tokens");
    let a = &pieces[k - 1];
    let b = &pieces[k];
    let stop = format!("{}{}", &a[a.len() - 2..], &b[..2]);
    assert!(base.text.contains(&stop));
    let params = SamplingParams {
        stop: vec![stop.clone()],
        ..SamplingParams::greedy(24)
    };
    // Streaming never shows the stop string, even partially at the end.
    let (_, got) = collect(h.submit(GenerateRequest::text(p, params)).unwrap());
    assert_eq!(got[0].finish, Some(FinishReason::Stop));
    assert_eq!(
        got[0].text,
        base.text[..base.text.find(&stop).unwrap()].to_string()
    );
    assert!(!got[0].text.contains(&stop));
}

#[test]
fn unseeded_requests_report_a_seed_that_reproduces_them() {
    let Some((model, tok)) = common::real_model() else {
        return;
    };
    let h = Engine::start(model, tok, cfg(1, 4096)).unwrap();
    let params = SamplingParams {
        temperature: 1.0,
        max_tokens: 12,
        ..Default::default()
    };
    let (seed, first) = collect(
        h.submit(GenerateRequest::text("Tell me a story.", params.clone()))
            .unwrap(),
    );
    let (seed2, _) = collect(
        h.submit(GenerateRequest::text("Tell me a story.", params.clone()))
            .unwrap(),
    );
    assert_ne!(seed, seed2, "fresh seeds should differ");
    let (_, again) = collect(
        h.submit(GenerateRequest::text(
            "Tell me a story.",
            SamplingParams {
                seed: Some(seed),
                ..params
            },
        ))
        .unwrap(),
    );
    assert_eq!(again, first);
}

#[test]
fn min_tokens_masks_end_of_generation() {
    let Some((model, tok)) = common::real_model() else {
        return;
    };
    let h = Engine::start(model, tok, cfg(1, 4096)).unwrap();
    let chat = |p: SamplingParams| GenerateRequest {
        prompt: brigade::engine::Prompt::Chat(vec![brigade::tokenizer::ChatMessage::new(
            "user", "Say OK.",
        )]),
        params: p,
        priority: 0,
    };
    let (_, short) = collect(h.submit(chat(SamplingParams::greedy(64))).unwrap());
    let n = short[0].tokens.len();
    assert_eq!(short[0].finish, Some(FinishReason::Stop));
    let (_, long) = collect(
        h.submit(chat(SamplingParams {
            min_tokens: n + 5,
            ..SamplingParams::greedy(64)
        }))
        .unwrap(),
    );
    assert!(
        long[0].tokens.len() >= n + 5,
        "min_tokens ignored: {} tokens",
        long[0].tokens.len()
    );
}
