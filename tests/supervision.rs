//! Supervision: fault injection into the actors (`[testing] fault`,
//! `BRIGADE_FAULT`). A panic inside one micro-batch fails only that
//! micro-batch's requests; an actor that dies for good fails every open
//! request, marks the engine dead, turns `/health` to 503 and makes
//! `brigade serve` exit non-zero. Nothing may hang: every wait is bounded.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use brigade::config::{Config, Count};
use brigade::engine::{
    Engine, EngineError, EngineHandle, Event, FinishReason, GenerateRequest, SamplingParams,
};
use brigade::model::Model;
use brigade::testing::TinyLlamaSpec;
use brigade::tokenizer::Tokenizer;
use serde_json::json;

fn tiny() -> (Arc<Model>, Arc<Tokenizer>) {
    common::tiny_model(&TinyLlamaSpec::default())
}

fn config(workers: usize, fault: &str) -> Config {
    let mut c = Config::default();
    c.runtime.workers = Count::N(workers);
    c.runtime.threads_per_worker = Count::N(1);
    c.runtime.max_batched_tokens = 128;
    // At most 16 of the 32 requests per micro-batch, so a faulty step never
    // holds all of them (whatever the timing of arrivals and returns).
    c.runtime.max_seqs = 16;
    c.runtime.prefill_chunk = 16;
    c.kv_cache.capacity_tokens = 8192;
    c.testing.fault = fault.to_string();
    c.validate().unwrap();
    c
}

/// Tokens and logprob bits of every completion, or the error that ended the request.
type Outcome = Result<Vec<(Vec<u32>, Vec<u32>, Option<FinishReason>)>, EngineError>;

/// Drains a stream (bounded: a stream that never ends fails the test via the watchdog).
fn collect(mut s: brigade::engine::ResponseStream) -> Outcome {
    let mut outs: Vec<(Vec<u32>, Vec<u32>, Option<FinishReason>)> = Vec::new();
    while let Some(ev) = s.blocking_next() {
        match ev {
            Event::Token { index, token, .. } => {
                while outs.len() <= index {
                    outs.push(Default::default());
                }
                outs[index].0.push(token.token);
                outs[index].1.push(token.logprob.to_bits());
            }
            Event::Finished { index, reason, .. } => {
                while outs.len() <= index {
                    outs.push(Default::default());
                }
                outs[index].2 = Some(reason);
            }
            Event::Error(e) => return Err(e),
            _ => {}
        }
    }
    Ok(outs)
}

fn requests() -> Vec<GenerateRequest> {
    (0..32u64)
        .map(|i| {
            let prompt: Vec<u32> = (0..(3 + i % 20))
                .map(|j| ((i * 31 + j * 7) % 250 + 3) as u32)
                .collect();
            let params = SamplingParams {
                max_tokens: 12 + (i % 9) as usize,
                temperature: 0.7,
                seed: Some(i),
                ..Default::default()
            };
            GenerateRequest::tokens(prompt, params)
        })
        .collect()
}

/// Runs all 32 requests concurrently; returns each one's outcome (in order).
fn run_all(h: &EngineHandle) -> Vec<Outcome> {
    let streams: Vec<_> = requests()
        .into_iter()
        .map(|r| h.submit(r).unwrap())
        .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    let handles: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let _ = tx.send((i, collect(s)));
            })
        })
        .collect();
    drop(tx);
    let mut out: HashMap<usize, Outcome> = HashMap::new();
    let t0 = Instant::now();
    while out.len() < handles.len() {
        let left = Duration::from_secs(120).saturating_sub(t0.elapsed());
        let (i, o) = rx
            .recv_timeout(left)
            .expect("a request hung (no end within 120 s)");
        out.insert(i, o);
    }
    (0..handles.len())
        .map(|i| out.remove(&i).unwrap())
        .collect()
}

fn assert_pool_whole(h: &EngineHandle) {
    let t0 = Instant::now();
    loop {
        let s = h.stats();
        if s.running == 0
            && s.waiting == 0
            && s.in_flight == 0
            && s.kv_blocks_free == s.kv_blocks_total
        {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "pool not whole: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn baseline() -> &'static Vec<Outcome> {
    static B: std::sync::OnceLock<Vec<Outcome>> = std::sync::OnceLock::new();
    B.get_or_init(|| {
        let (m, t) = tiny();
        let h = Engine::start(m, t, config(2, "")).unwrap();
        let out = run_all(&h);
        assert!(out.iter().all(Result::is_ok), "baseline must not fail");
        out
    })
}

/// Checks a faulty run against the baseline: failed requests end with an
/// internal error, every other one is exactly as without the fault.
fn check_against_baseline(got: &[Outcome]) -> usize {
    let mut failed = 0;
    for (i, (g, b)) in got.iter().zip(baseline()).enumerate() {
        match g {
            Ok(outs) => assert_eq!(
                Some(outs),
                b.as_ref().ok(),
                "request {i} changed by a fault elsewhere"
            ),
            Err(EngineError::Internal(m)) => {
                assert!(m.contains("injected fault"), "request {i}: {m}");
                failed += 1;
            }
            Err(e) => panic!("request {i}: unexpected error {e:?}"),
        }
    }
    failed
}

#[test]
fn a_worker_panic_fails_only_its_micro_batch() {
    let (m, t) = tiny();
    let h = Engine::start(m, t, config(2, "worker:1:panic@step=20")).unwrap();
    let got = run_all(&h);
    let failed = check_against_baseline(&got);
    // Step 20 holds at least one sequence and at most max_seqs (16) of them.
    assert!((1..=16).contains(&failed), "{failed} requests failed");
    assert_eq!(h.stats().failed_steps, 1);
    assert_pool_whole(&h);
    assert_eq!(h.health(), Ok(()));
    // And it goes on serving.
    let again = collect(h.submit(requests().remove(0)).unwrap());
    assert_eq!(again.as_ref().ok(), baseline()[0].as_ref().ok());
}

#[test]
fn a_sampler_panic_and_a_first_worker_panic_fail_only_their_micro_batch() {
    for fault in ["sampler:panic@step=7", "worker:0:panic@step=9"] {
        let (m, t) = tiny();
        let h = Engine::start(m, t, config(2, fault)).unwrap();
        // (Early steps may hold all 32 sequences; the others must be exact either way.)
        let failed = check_against_baseline(&run_all(&h));
        assert!(failed >= 1, "{fault}: no request failed");
        assert_pool_whole(&h);
        assert_eq!(h.health(), Ok(()), "{fault}");
    }
}

#[test]
fn a_panic_in_the_output_or_tokenizer_fails_one_request() {
    for fault in ["output:panic@step=60", "tokenizer:panic@step=5"] {
        let (m, t) = tiny();
        let h = Engine::start(m, t, config(1, fault)).unwrap();
        let got = run_all(&h);
        let failed = check_against_baseline(&got);
        assert_eq!(failed, 1, "{fault}");
        assert_pool_whole(&h);
        assert_eq!(h.health(), Ok(()), "{fault}");
    }
}

#[test]
fn an_actor_that_dies_fails_every_open_request_and_the_engine() {
    for fault in [
        "worker:1:die@step=12",
        "sampler:die@step=12",
        "scheduler:die@step=12",
        "output:die@step=40",
    ] {
        let (m, t) = tiny();
        let h = Engine::start(m, t, config(2, fault)).unwrap();
        let got = run_all(&h);
        let dead = got
            .iter()
            .filter(|o| matches!(o, Err(EngineError::Dead(_))))
            .count();
        assert!(dead >= 1, "{fault}: no request saw the death");
        for (i, o) in got.iter().enumerate() {
            match o {
                // Finished before the death: exactly as without the fault.
                Ok(outs) => assert_eq!(
                    Some(outs),
                    baseline()[i].as_ref().ok(),
                    "{fault}: request {i}"
                ),
                Err(EngineError::Dead(why)) => assert!(
                    why.contains("died") || why.contains("stopped"),
                    "{fault}: {why}"
                ),
                Err(e) => panic!("{fault}: request {i}: {e:?}"),
            }
        }
        let t0 = Instant::now();
        let why = loop {
            if let Err(why) = h.health() {
                break why;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "{fault}: the engine never reported its death"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(
            why.contains("injected fault") || why.contains("stopped"),
            "{fault}: {why}"
        );
        assert!(
            matches!(h.submit(requests().remove(0)), Err(EngineError::Dead(_))),
            "{fault}"
        );
    }
}

#[test]
fn a_dead_engine_makes_health_503_and_serve_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    brigade::testing::write_tiny_llama(
        &TinyLlamaSpec {
            context_length: 4096,
            ..TinyLlamaSpec::default()
        },
        &model,
    )
    .unwrap();
    let cfg = dir.path().join("cfg.toml");
    std::fs::write(&cfg, "[runtime]\nworkers = 2\nthreads_per_worker = 1\n[server]\nport = 0\nshutdown_timeout_s = 3\n").unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_brigade"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .arg("--model")
        .arg(&model)
        .env("BRIGADE_FAULT", "worker:1:die@step=5")
        .env("RUST_LOG", "error")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let base = common::wait_listening(&mut child);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = reqwest::Client::new();
        assert_eq!(
            client
                .get(format!("{base}/health"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        // The request runs into the dying worker: an OpenAI-style error, not a hang.
        let body = json!({"prompt": "the cat", "max_tokens": 200, "ignore_eos": true});
        let r = tokio::time::timeout(
            Duration::from_secs(60),
            client
                .post(format!("{base}/v1/completions"))
                .json(&body)
                .send(),
        )
        .await
        .expect("the request hung")
        .unwrap();
        assert!(r.status() == 503 || r.status() == 500, "{}", r.status());
        let v: serde_json::Value = r.json().await.unwrap();
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("engine"),
            "{v}"
        );
        // 503 at once; the reason becomes the actor's own panic as soon as its
        // supervisor reports it (the pipeline closing may be seen a moment first).
        let t0 = Instant::now();
        loop {
            let h = client.get(format!("{base}/health")).send().await.unwrap();
            assert_eq!(h.status(), 503);
            let v: serde_json::Value = h.json().await.unwrap();
            if v["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("died")
            {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "{v}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            client
                .get(format!("{base}/ready"))
                .send()
                .await
                .unwrap()
                .status(),
            503
        );
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "server did not exit after the engine died"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "exit status {status:?}");
}

/// 32 concurrent HTTP completions on a server; returns (status, text or error message) per request.
async fn http_run(fault: &str) -> (Vec<(u16, String)>, u16) {
    let (m, t) = tiny();
    let engine = Engine::start(m, t, config(2, fault)).unwrap();
    let cfg = brigade::server::ServerConfig::from_toml_str("").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(brigade::server::serve_with(
        engine.clone(),
        cfg,
        listener,
        async move {
            let _ = stop_rx.await;
        },
    ));
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let (client, base) = (client.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            let prompt: Vec<u32> = (0..(3 + i % 20))
                .map(|j| ((i * 31 + j * 7) % 250 + 3) as u32)
                .collect();
            let body =
                json!({"prompt": prompt, "max_tokens": 12 + i % 9, "temperature": 0.7, "seed": i});
            let r = client
                .post(format!("{base}/v1/completions"))
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let v: serde_json::Value = r.json().await.unwrap();
            let text = if status == 200 {
                v["choices"][0]["text"].as_str().unwrap().to_string()
            } else {
                v["error"]["message"].as_str().unwrap().to_string()
            };
            (status, text)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(
            tokio::time::timeout(Duration::from_secs(120), t)
                .await
                .expect("a request hung")
                .unwrap(),
        );
    }
    let health = client
        .get(format!("{base}/health"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("shutdown hung")
        .unwrap()
        .unwrap();
    (out, health)
}

#[test]
fn over_http_a_worker_panic_fails_its_requests_with_500_and_the_server_stays_healthy() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (clean, _) = http_run("").await;
        assert!(clean.iter().all(|(s, _)| *s == 200));
        let (got, health) = http_run("worker:1:panic@step=20").await;
        let mut failed = 0;
        for (i, ((s, text), (_, want))) in got.iter().zip(&clean).enumerate() {
            if *s == 200 {
                assert_eq!(text, want, "request {i} changed by a fault elsewhere");
            } else {
                assert_eq!(*s, 500, "request {i}: {text}");
                assert!(text.contains("injected fault"), "{text}");
                failed += 1;
            }
        }
        assert!(failed >= 1, "no request failed");
        assert_eq!(
            health, 200,
            "the server must stay healthy after a micro-batch failure"
        );
    });
}
