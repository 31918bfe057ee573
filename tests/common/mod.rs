//! Shared helpers for integration tests.
#![allow(dead_code)]

pub mod batch;

use std::path::PathBuf;
use std::sync::Arc;

use brigade::gguf::GgufFile;
use brigade::model::Model;
use brigade::runner::Runner;
use brigade::tokenizer::Tokenizer;

/// Path of a real model: `$env_var` if set, else `default`, if the file exists.
/// When `BRIGADE_REQUIRE_MODEL=1` (set by `scripts/test.sh`), a missing model
/// is a test failure rather than a skip. `fetch` names the model for
/// `scripts/fetch-model.sh`.
fn find_model(env_var: &str, default: PathBuf, fetch: &str) -> Option<PathBuf> {
    let p = std::env::var_os(env_var)
        .map(PathBuf::from)
        .unwrap_or(default);
    if p.is_file() {
        return Some(p);
    }
    if std::env::var("BRIGADE_REQUIRE_MODEL").as_deref() == Ok("1") {
        panic!(
            "model not found at {} (run scripts/fetch-model.sh {fetch}, or set {env_var})",
            p.display()
        );
    }
    eprintln!("note: model not found at {}; skipping (run scripts/fetch-model.sh {fetch}, or set {env_var})", p.display());
    None
}

/// Path of the real default model (SmolLM2, `$BRIGADE_MODEL`), if present.
pub fn model_path() -> Option<PathBuf> {
    find_model(
        "BRIGADE_MODEL",
        brigade::paths::default_model_path(),
        "smollm2-135m",
    )
}

/// Path of the real Gemma 3 270M Q4_K_M (`$BRIGADE_GEMMA_MODEL`), if present.
pub fn gemma_model_path() -> Option<PathBuf> {
    find_model(
        "BRIGADE_GEMMA_MODEL",
        brigade::paths::model_cache_dir().join("gemma-3-270m-q4_k_m.gguf"),
        "gemma3-270m",
    )
}

/// A loaded model and its tokenizer.
pub type Loaded = (Arc<Model>, Arc<Tokenizer>);

fn load(p: &std::path::Path) -> Loaded {
    let file =
        Arc::new(GgufFile::open(p).unwrap_or_else(|e| panic!("opening {}: {e}", p.display())));
    let tok = Tokenizer::from_gguf(&file).expect("tokenizer");
    let model = Model::from_gguf(file).expect("model");
    (Arc::new(model), Arc::new(tok))
}

/// Loads the real default model (SmolLM2) and tokenizer once per test binary.
pub fn real_model() -> Option<Loaded> {
    use std::sync::OnceLock;
    static M: OnceLock<Option<Loaded>> = OnceLock::new();
    M.get_or_init(|| model_path().map(|p| load(&p))).clone()
}

/// Loads the real Gemma 3 270M and its tokenizer once per test binary.
pub fn real_gemma_model() -> Option<Loaded> {
    use std::sync::OnceLock;
    static M: OnceLock<Option<Loaded>> = OnceLock::new();
    M.get_or_init(|| gemma_model_path().map(|p| load(&p)))
        .clone()
}

/// A tiny random model (and its tokenizer) built in memory.
pub fn tiny_model(spec: &brigade::testing::TinyLlamaSpec) -> (Arc<Model>, Arc<Tokenizer>) {
    let bytes = brigade::testing::tiny_llama_gguf(spec);
    let file = Arc::new(GgufFile::from_bytes(bytes).expect("tiny gguf"));
    let tok = Tokenizer::from_gguf(&file).expect("tiny tokenizer");
    let model = Model::from_gguf(file).expect("tiny model");
    (Arc::new(model), Arc::new(tok))
}

/// Reads the golden fixture `name` of `model` (`tests/fixtures/golden/<model>/`:
/// `smollm2`, `gemma3`).
pub fn golden(model: &str, name: &str) -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/golden")
        .join(model)
        .join(name);
    let text =
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Token ids of a JSON array.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Numbers of a JSON array.
pub fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

/// The JSON report of a successful `brigade bench --json` run (its stdout
/// from the first `{`); panics with its stderr when it failed.
pub fn bench_json(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text[text.find('{').expect("a JSON object")..]).expect("JSON")
}

/// Teacher-forced agreement with a golden `logits.json`.
#[derive(Debug, Default)]
pub struct LogitStats {
    /// Positions where our argmax is the reference's top-1.
    pub agree: usize,
    /// Positions compared.
    pub total: usize,
    /// Mean |Δ log-prob| over the reference's top-5 (or fewer, if recorded) tokens.
    pub mean_top5: f64,
    /// Max |Δ log-prob| over the same tokens.
    pub max_top5: f32,
    /// Max |Δ log-prob| of the reference's top-1 token.
    pub max_top1: f32,
    /// Positions where our argmax differs, as (prompt name, position, reference
    /// top-1/top-2 log-prob gap).
    pub misses: Vec<(String, usize, f32)>,
}

/// Most tokens fed at once (bounds the logits buffer; feeding in pieces gives
/// the same logits as feeding whole).
const FEED: usize = 64;

/// Feeds every prompt of a golden `logits.json` (each from an empty cache) and
/// compares the logits at each recorded position with the reference.
pub fn teacher_forced(model: &Arc<Model>, fx: &serde_json::Value) -> LogitStats {
    let vocab = model.config.vocab_size;
    let prompts = fx["prompts"].as_array().expect("prompts");
    let longest = prompts
        .iter()
        .map(|p| p["ids"].as_array().map_or(0, Vec::len))
        .max()
        .unwrap_or(1);
    let mut runner = Runner::new(model.clone(), longest.max(512), 2).expect("runner");
    let mut st = LogitStats::default();
    let (mut sum, mut n) = (0.0f64, 0usize);
    for p in prompts {
        let tokens = ids(&p["ids"]);
        let name = p["name"].as_str().unwrap_or("?");
        let positions: std::collections::HashMap<usize, &serde_json::Value> = p["positions"]
            .as_array()
            .expect("positions")
            .iter()
            .map(|x| (x["pos"].as_u64().expect("pos") as usize, x))
            .collect();
        runner.reset();
        let mut seen = 0;
        for (c, piece) in tokens.chunks(FEED).enumerate() {
            let logits = runner.feed(piece, true).expect("feed");
            for (j, row) in logits.chunks_exact(vocab).enumerate() {
                let i = c * FEED + j;
                let Some(pos) = positions.get(&i) else {
                    continue;
                };
                seen += 1;
                let lse = brigade::sampling::logsumexp(row);
                let top_ids = ids(&pos["top_ids"]);
                let top_lp: Vec<f32> = pos["top_logprobs"]
                    .as_array()
                    .expect("top_logprobs")
                    .iter()
                    .map(|v| v.as_f64().expect("lp") as f32)
                    .collect();
                st.total += 1;
                if brigade::sampling::argmax(row) == top_ids[0] {
                    st.agree += 1;
                } else {
                    let gap = top_lp.get(1).map_or(f32::INFINITY, |l2| top_lp[0] - l2);
                    st.misses.push((name.to_owned(), i, gap));
                }
                for (k, (&t, &lp)) in top_ids.iter().zip(&top_lp).take(5).enumerate() {
                    let d = (row[t as usize] - lse - lp).abs();
                    sum += d as f64;
                    n += 1;
                    st.max_top5 = st.max_top5.max(d);
                    if k == 0 {
                        st.max_top1 = st.max_top1.max(d);
                    }
                }
            }
        }
        assert_eq!(
            seen,
            positions.len(),
            "{name}: a recorded position is outside the prompt"
        );
    }
    st.mean_top5 = sum / n.max(1) as f64;
    st
}

/// `n` greedy tokens after `prompt`, from an empty cache.
pub fn greedy(runner: &mut Runner, prompt: &[u32], n: usize) -> Vec<u32> {
    runner.reset();
    let mut logits = runner.feed(prompt, false).expect("feed prompt");
    let mut got = Vec::with_capacity(n);
    for _ in 0..n {
        let t = brigade::sampling::argmax(&logits);
        got.push(t);
        logits = runner.feed(&[t], false).expect("feed token");
    }
    got
}

/// Greedy tokens and logprob bits of every token event of one engine request.
pub fn engine_outputs(mut s: brigade::engine::ResponseStream) -> Vec<(u32, u32)> {
    use brigade::engine::Event;
    let mut out = Vec::new();
    while let Some(ev) = s.blocking_next() {
        match ev {
            Event::Token { token, .. } => out.push((token.token, token.logprob.to_bits())),
            Event::Error(e) => panic!("request failed: {e}"),
            _ => {}
        }
    }
    out
}

/// An engine configuration: `workers` workers of one thread, prefill chunks of
/// `prefill_chunk` tokens (0: whole), a KV pool of `kv_tokens`, prefix caching.
pub fn engine_config(
    workers: usize,
    prefill_chunk: usize,
    kv_tokens: usize,
    prefix: bool,
) -> brigade::config::Config {
    use brigade::config::{Config, Count};
    let mut c = Config::default();
    c.runtime.workers = Count::N(workers);
    c.runtime.threads_per_worker = Count::N(1);
    c.runtime.prefill_chunk = prefill_chunk;
    c.runtime.max_batched_tokens = 256;
    c.kv_cache.capacity_tokens = kv_tokens;
    c.kv_cache.prefix_caching = prefix;
    // Small pools here exist to force preemption: admit on the prompt alone.
    c.runtime.admission_reserve_tokens = 0;
    c.validate().expect("config");
    c
}

/// Waits until a spawned `brigade serve` (stderr piped) logs its address and
/// returns it (`http://host:port`); its stderr is then drained on a thread so
/// the server never blocks on a full pipe. Panics if it exits first.
pub fn wait_listening(child: &mut std::process::Child) -> String {
    use std::io::{BufRead, BufReader};
    let stderr = child
        .stderr
        .take()
        .expect("serve spawned with stderr piped");
    let mut lines = BufReader::new(stderr).lines();
    let base = loop {
        let line = lines
            .next()
            .expect("server exited before listening")
            .expect("server stderr");
        if let Some(addr) = line.strip_prefix("brigade: listening on ") {
            break addr.trim().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    base
}
