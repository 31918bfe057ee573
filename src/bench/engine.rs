//! `brigade bench`: offline throughput benchmark through the full actor
//! runtime, in the spirit of `vllm bench throughput` and `llama-batched-bench`.
//!
//! Requests have random token prompts (no special tokens) and generate exactly
//! their output length (`ignore_eos`). With `--structured json-schema` each
//! request instead carries its own JSON schema (distinct property names and
//! bounds per request, an array that cannot close before the output length),
//! so every stream is constrained for its whole length; the report then adds
//! the per-token mask time (p50/p99). With `--workload grounded|prose` they
//! are instead chat prompts (copy a text or extract fields / free prose), greedy and ending
//! at end-of-generation: speculative decoding's workloads (the report adds its
//! acceptance rate and tokens per verify step). They are submitted all at once or with
//! Poisson arrivals, under a concurrency cap; per-request TTFT and
//! time-per-output-token are measured on the caller's side of the stream.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{poisson_gap_s, Pct};
use crate::config::{Config, ConfigError, Count};
use crate::engine::{
    Engine, EngineError, Event, GenerateRequest, ResponseStream, SamplingParams, StartError,
};
use crate::model::Model;
use crate::sampling::SplitMix64;
use crate::tokenizer::{Tokenizer, TokenizerError};

/// A length: fixed (`128`) or uniform in a range (`64:256`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LenSpec {
    /// Smallest.
    pub min: usize,
    /// Largest (inclusive).
    pub max: usize,
}

impl std::str::FromStr for LenSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |v: &str| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| format!("`{s}` is not a length or a range like 64:256"))
        };
        match s.split_once(':') {
            Some((a, b)) => {
                let (min, max) = (parse(a)?, parse(b)?);
                if min > max {
                    return Err(format!("range `{s}` is empty"));
                }
                Ok(Self { min, max })
            }
            None => {
                let v = parse(s)?;
                Ok(Self { min: v, max: v })
            }
        }
    }
}

impl LenSpec {
    /// The length for random bits `r`: `min + r mod (max - min + 1)`.
    fn draw(&self, r: u64) -> usize {
        let span = ((self.max - self.min) as u64).checked_add(1);
        self.min + span.map_or(r, |n| r % n) as usize
    }
}

/// Constrained output for every request (`--structured`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Structured {
    /// Each request gets its own JSON schema.
    JsonSchema,
}

impl std::str::FromStr for Structured {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "json-schema" => Ok(Self::JsonSchema),
            _ => Err(format!(
                "`{s}` is not a structured-output workload (json-schema)"
            )),
        }
    }
}

/// The JSON schema of request `i` of the structured workload: its own
/// property names and bounds, and an array that cannot close before
/// `min_items` elements (so the constraint holds for the whole output).
pub fn bench_schema(i: usize, min_items: usize) -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            format!("records_{i}"): {
                "type": "array",
                "minItems": min_items,
                "items": {
                    "type": "object",
                    "properties": {
                        format!("id_{i}"): {"type": "integer", "minimum": 0, "maximum": 1000 + i},
                        format!("label_{i}"): {"type": "string", "maxLength": 4 + i % 13},
                        "kind": {"enum": ["a", "b", format!("c{i}")]},
                        "ok": {"type": "boolean"}
                    },
                    "required": [format!("id_{i}"), format!("label_{i}"), "kind", "ok"],
                    "additionalProperties": false
                }
            }
        },
        "required": [format!("records_{i}")],
        "additionalProperties": false
    })
}

/// `brigade bench` options (the command's flags, less the model and config
/// paths and the output format).
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Number of requests (ignored with a dataset).
    pub num_requests: usize,
    /// Prompt length in tokens.
    pub input_len: LenSpec,
    /// Output length in tokens.
    pub output_len: LenSpec,
    /// JSONL file of requests: `{"prompt": "...", "output_len": N}` or `{"input_len": N, "output_len": N}`.
    pub dataset: Option<PathBuf>,
    /// Most requests in flight at once (default: all).
    pub concurrency: Option<usize>,
    /// Poisson arrival rate in requests/s (default: all at once).
    pub request_rate: Option<f64>,
    /// Layer-group workers (overrides the config).
    pub workers: Option<usize>,
    /// Threads per worker (overrides the config).
    pub threads_per_worker: Option<usize>,
    /// Pipeline depth (overrides the config).
    pub pipeline_depth: Option<usize>,
    /// Token budget per micro-batch (overrides the config).
    pub max_batched_tokens: Option<usize>,
    /// Shared prefix length in tokens prepended to every prompt (prefix caching).
    pub prefix_len: usize,
    /// Seed for the synthetic prompts and arrivals.
    pub seed: u64,
    /// Draw a progress bar on stderr when it is a terminal.
    pub progress: bool,
    /// Constrain every request's output.
    pub structured: Option<Structured>,
    /// Text chat prompts instead of random tokens (speculative decoding's
    /// workloads); greedy, up to the output length, ending at end-of-generation.
    pub workload: Option<Workload>,
}

/// Text workloads for speculative decoding (`--workload`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Input-grounded: "copy this text", "extract these fields" (drafts from the prompt hit often).
    Grounded,
    /// Free prose: stories and explanations (drafts rarely hit).
    Prose,
}

impl std::str::FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "grounded" => Ok(Self::Grounded),
            "prose" => Ok(Self::Prose),
            _ => Err(format!("`{s}` is not a workload (grounded, prose)")),
        }
    }
}

/// Input-grounded requests: copy a passage, extract fields (the drafts come
/// from the prompt). SmolLM2-135M copies prose faithfully; code it rewrites.
const GROUNDED: [&str; 3] = [
    "Copy this text exactly:\n\nThe harbour town woke slowly. Fishermen carried their nets down to the water, gulls circled above the boats, and the baker on the corner opened his shutters to let the smell of fresh bread into the street. Children ran past the fountain on their way to school, and an old man sat on a bench reading yesterday's newspaper while his dog slept at his feet. By noon the market was full of voices, colours and the sound of carts rolling over the stones.",
    "Extract the name, age, city and job of each person as a list.\n\nAnna Berg is 34 years old, lives in Oslo and works as a nurse. Tom Reyes, 41, is a carpenter from Madrid. Li Wei is a 29-year-old teacher in Shanghai. Sara Okafor, 52, works as a pilot and lives in Lagos. Marco Rossi is 38, lives in Turin and works as a chef.",
    "Copy this text exactly:\n\nTo install the tool, download the archive for your system and unpack it into a folder of your choice. Open a terminal in that folder and run the setup script. The script checks that the required libraries are present, creates a configuration file in your home directory and prints the path of the installed program. To update the tool later, run the same script again: it keeps your configuration and replaces only the program files.",
];

/// Prose requests (free generation).
const PROSE: [&str; 3] = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain to a child why the sky is blue and why sunsets are red.",
    "Describe a busy market in a mountain town on a cold winter morning.",
];

impl Workload {
    /// The chat message of request `i`.
    pub fn message(self, i: usize) -> String {
        match self {
            Workload::Grounded => GROUNDED[i % GROUNDED.len()].to_string(),
            Workload::Prose => PROSE[i % PROSE.len()].to_string(),
        }
    }
}

/// Why `brigade bench` could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The dataset file could not be read.
    #[error("reading {}: {source}", path.display())]
    ReadDataset {
        /// The `--dataset` file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A dataset line is not a valid request.
    #[error("{}:{line}: {what}", path.display())]
    DatasetLine {
        /// The `--dataset` file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        what: String,
    },
    /// The dataset has no requests.
    #[error("{}: no requests", .0.display())]
    EmptyDataset(PathBuf),
    /// A dataset prompt could not be tokenized.
    #[error(transparent)]
    Tokenize(#[from] TokenizerError),
    /// The overridden configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The engine did not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The warm-up request was refused.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The client thread or its runtime could not be created.
    #[error("bench client: {0}")]
    Client(#[from] std::io::Error),
    /// An option combination `brigade bench` does not support.
    #[error("{0} is not supported")]
    Unsupported(String),
    /// Not one request succeeded: the run measured nothing.
    #[error("all {failed} requests failed; the first: {first}")]
    AllFailed {
        /// Requests that failed (all of them).
        failed: usize,
        /// The first one's error.
        first: String,
    },
    /// The `--write-batch` file could not be written.
    #[error("writing {}: {source}", path.display())]
    WriteBatch {
        /// The `--write-batch` file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// What `brigade bench` reports.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BenchReport {
    /// Requests completed.
    pub num_requests: usize,
    /// Requests that failed.
    pub failed: usize,
    /// The first failed request's error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// Wall time, seconds.
    pub duration_s: f64,
    /// Completed requests per second.
    pub requests_per_s: f64,
    /// Prompt tokens per second.
    pub input_tokens_per_s: f64,
    /// Generated tokens per second.
    pub output_tokens_per_s: f64,
    /// Prompt + generated tokens per second.
    pub total_tokens_per_s: f64,
    /// Prompt tokens in total.
    pub total_input_tokens: usize,
    /// Generated tokens in total.
    pub total_output_tokens: usize,
    /// Time to first token.
    pub ttft_ms: Pct,
    /// Time per output token after the first.
    pub tpot_ms: Pct,
    /// Generated tokens per second while every request was decoding: tokens
    /// received between the last request's first token and the first
    /// request's last token, over that window (no prefill in it; the
    /// counterpart of llama-batched-bench's S_TG). 0 when the window is
    /// empty (e.g. requests that do not all run at once).
    pub steady_decode_tokens_per_s: f64,
    /// Length of that window, seconds.
    pub steady_window_s: f64,
    /// End-to-end latency.
    pub e2e_ms: Pct,
    /// Highest fraction of KV blocks in use.
    pub peak_kv_usage: f64,
    /// Preemptions.
    pub preemptions: u64,
    /// Prompt tokens served from the prefix cache / prompt tokens looked up.
    pub prefix_cache_hit_rate: f64,
    /// Workers, threads per worker, pipeline depth.
    pub workers: usize,
    /// Threads per worker.
    pub threads_per_worker: usize,
    /// Concurrency cap.
    pub concurrency: usize,
    /// Busy fraction of each worker over the run.
    pub worker_busy_fraction: Vec<f64>,
    /// Constrained workload (`json-schema`), if any.
    pub structured: Option<String>,
    /// Allowed-token masks computed during the run.
    pub masks: u64,
    /// Median per-token mask time, microseconds (within 5%).
    pub mask_p50_us: f64,
    /// 99th-percentile per-token mask time, microseconds (within 5%).
    pub mask_p99_us: f64,
    /// Speculative decoding in force (`ngram` or `off`).
    pub speculative: String,
    /// Verify steps (decode steps that carried drafts) during the run.
    pub spec_steps: u64,
    /// Draft tokens accepted / proposed during the run (0 without drafts).
    pub spec_acceptance_rate: f64,
    /// Mean tokens a verify step yielded (accepted drafts + 1; 0 without drafts).
    pub spec_tokens_per_step: f64,
    /// Draft tokens per verify step (0 without drafts).
    pub spec_draft_per_step: f64,
    /// The measured price of a decode-step row over the step's fixed cost at the
    /// end of the run (it sets the draft length).
    pub spec_row_cost_ratio: f64,
}

struct Job {
    prompt: GenerateRequest,
    input_len: usize,
}

fn build_jobs(a: &BenchOptions, tok: &Tokenizer, vocab: usize) -> Result<Vec<Job>, BenchError> {
    let mut rng = SplitMix64::new(a.seed ^ 0x5EED);
    let mut next = move || rng.next_u64();
    // Ordinary tokens only: skip the special ids at the start of the vocabulary.
    let first = (0..vocab as u32).find(|&t| !tok.is_special(t)).unwrap_or(0);
    let span = (vocab as u32 - first).max(1) as u64;
    let prefix: Vec<u32> = (0..a.prefix_len)
        .map(|_| first + (next() % span) as u32)
        .collect();
    let mut index = 0usize;
    let mut params = |out: usize| {
        index += 1;
        match a.structured {
            None => SamplingParams {
                max_tokens: out,
                ignore_eos: true,
                ..SamplingParams::greedy(out)
            },
            // The array needs more elements than `out` tokens can hold: the output never completes early.
            Some(Structured::JsonSchema) => SamplingParams {
                constraint: Some(crate::guidance::Constraint {
                    grammar: crate::guidance::Grammar::JsonSchema(bench_schema(index, out + 1)),
                    trigger: None,
                }),
                ..SamplingParams::greedy(out)
            },
        }
    };
    if let Some(w) = a.workload {
        return Ok((0..a.num_requests)
            .map(|i| {
                let out = a.output_len.draw(next()).max(1);
                let prompt = crate::engine::Prompt::Chat(vec![crate::tokenizer::ChatMessage::new(
                    "user",
                    w.message(i),
                )]);
                // The prompt length is read from the stream (the engine renders the template).
                Job {
                    input_len: 0,
                    prompt: GenerateRequest {
                        prompt,
                        params: SamplingParams::greedy(out),
                        priority: 0,
                    },
                }
            })
            .collect());
    }
    if let Some(path) = &a.dataset {
        let text = std::fs::read_to_string(path).map_err(|source| BenchError::ReadDataset {
            path: path.clone(),
            source,
        })?;
        let bad = |line: usize, what: &str| BenchError::DatasetLine {
            path: path.clone(),
            line,
            what: what.to_string(),
        };
        let mut jobs = Vec::new();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|_| bad(i + 1, "not JSON"))?;
            let out = v["output_len"]
                .as_u64()
                .ok_or_else(|| bad(i + 1, "missing output_len"))? as usize;
            let ids = if let Some(p) = v["prompt"].as_str() {
                tok.encode(p, true)?
            } else {
                let n = v["input_len"]
                    .as_u64()
                    .ok_or_else(|| bad(i + 1, "needs prompt or input_len"))?;
                (0..n).map(|_| first + (next() % span) as u32).collect()
            };
            let mut prompt = prefix.clone();
            prompt.extend(ids);
            jobs.push(Job {
                input_len: prompt.len(),
                prompt: GenerateRequest::tokens(prompt, params(out.max(1))),
            });
        }
        if jobs.is_empty() {
            return Err(BenchError::EmptyDataset(path.clone()));
        }
        return Ok(jobs);
    }
    Ok((0..a.num_requests)
        .map(|_| {
            let n = a.input_len.draw(next()).max(1);
            let out = a.output_len.draw(next()).max(1);
            let mut prompt = prefix.clone();
            prompt.extend((0..n).map(|_| first + (next() % span) as u32));
            Job {
                input_len: prompt.len(),
                prompt: GenerateRequest::tokens(prompt, params(out)),
            }
        })
        .collect())
}

/// Writes the requests [`run_offline`] would run (same seed, same prompts and
/// lengths) as an OpenAI batch input file for `brigade run-batch`: one
/// `/v1/completions` line per request (no `model`: the served one), the prompt as token ids, `max_tokens`
/// with `ignore_eos` (exactly that many tokens), greedy. Returns the line count.
/// Structured-output jobs are refused (their schemas are not batch bodies here).
pub fn write_batch_file(
    a: &BenchOptions,
    tok: &Tokenizer,
    vocab: usize,
    path: &std::path::Path,
) -> Result<usize, BenchError> {
    if a.structured.is_some() {
        return Err(BenchError::Unsupported(
            "--write-batch with --structured".into(),
        ));
    }
    let jobs = build_jobs(a, tok, vocab)?;
    let mut text = String::new();
    for (i, j) in jobs.iter().enumerate() {
        let crate::engine::Prompt::Tokens(ids) = &j.prompt.prompt else {
            return Err(BenchError::Unsupported(
                "--write-batch with a text prompt".into(),
            ));
        };
        let line = serde_json::json!({
            "custom_id": format!("bench-{i}"),
            "method": "POST",
            "url": "/v1/completions",
            "body": {
                "prompt": ids,
                "max_tokens": j.prompt.params.max_tokens,
                "ignore_eos": true,
                "temperature": 0.0,
            },
        });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    std::fs::write(path, text).map_err(|source| BenchError::WriteBatch {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(jobs.len())
}

/// Applies the command-line overrides to a config.
fn bench_config(
    a: &BenchOptions,
    mut cfg: Config,
    concurrency: usize,
) -> Result<Config, ConfigError> {
    if let Some(w) = a.workers {
        cfg.runtime.workers = Count::N(w);
    }
    if let Some(t) = a.threads_per_worker {
        cfg.runtime.threads_per_worker = Count::N(t);
    }
    if let Some(d) = a.pipeline_depth {
        cfg.runtime.pipeline_depth = Count::N(d);
        cfg.runtime.channel_capacity = cfg.runtime.channel_capacity.max(d);
    }
    if let Some(b) = a.max_batched_tokens {
        cfg.runtime.max_batched_tokens = b;
    }
    cfg.runtime.max_seqs = cfg.runtime.max_seqs.max(concurrency.min(4096));
    cfg.runtime.request_queue = cfg.runtime.request_queue.max(a.num_requests + 1);
    cfg.validate()?;
    Ok(cfg)
}

/// Runs the offline benchmark on a loaded model.
pub fn run_offline(
    a: &BenchOptions,
    model: Arc<Model>,
    tok: Arc<Tokenizer>,
    cfg: Config,
) -> Result<BenchReport, BenchError> {
    let jobs = build_jobs(a, &tok, model.config.vocab_size)?;
    let n = jobs.len();
    let concurrency = a.concurrency.unwrap_or(n).max(1);
    let cfg = bench_config(a, cfg, concurrency)?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let workers = cfg.workers(cores, model.config.n_layers);
    let threads = cfg.threads_per_worker(cores, workers);
    let speculative = match cfg.speculative.method {
        crate::config::SpecMethod::Ngram => "ngram",
        crate::config::SpecMethod::Off => "off",
    };
    let engine = Engine::start(model, tok, cfg)?;
    // Warm-up: one short request (first-touch of weights and buffers).
    drain(engine.submit(GenerateRequest::tokens(
        vec![100, 200, 300],
        SamplingParams::greedy(2),
    ))?);
    if a.structured.is_some() {
        // The vocabulary's trie and slices are built once, before the clock starts.
        engine
            .validator()
            .guidance()
            .get()
            .map_err(|e| EngineError::Invalid {
                param: Some("constraint".into()),
                message: e.to_string(),
            })?;
    }
    let masks0 = engine
        .validator()
        .guidance()
        .built()
        .map(|g| g.mask_times().snapshot());
    let stats0 = engine.stats();
    let busy0 = stats0.worker_busy_s.clone();

    let progress = a.progress && std::io::stderr().is_terminal();
    let done = Arc::new(AtomicUsize::new(0));
    let (slot_tx, slot_rx) = crossbeam_channel::bounded::<()>(concurrency);
    let mut rng = SplitMix64::new(a.seed ^ 0xA441);
    let start = Instant::now();
    // Streams are consumed by tasks on one current-thread runtime (one OS
    // thread for all requests, not one per request: the harness should not
    // compete with the engine for cores or memory).
    let (res_tx, res_rx) = crossbeam_channel::unbounded::<Result<Measured, String>>();
    let (stream_tx, mut stream_rx) =
        tokio::sync::mpsc::channel::<(Result<ResponseStream, String>, Instant, usize)>(concurrency);
    let consumer = {
        let (done, slot_rx) = (done.clone(), slot_rx.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        std::thread::Builder::new()
            .name("bench-client".into())
            .spawn(move || {
                rt.block_on(async move {
                    let mut tasks = tokio::task::JoinSet::new();
                    while let Some((stream, t0, input_len)) = stream_rx.recv().await {
                        let (res_tx, slot_rx, done) =
                            (res_tx.clone(), slot_rx.clone(), done.clone());
                        tasks.spawn(async move {
                            let r = match stream {
                                Ok(s) => measure(s, t0, input_len).await,
                                Err(e) => Err(e),
                            };
                            let _ = res_tx.send(r);
                            let _ = slot_rx.try_recv(); // this request's slot (always present)
                            done.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                    while tasks.join_next().await.is_some() {}
                })
            })?
    };
    let mut next_arrival = 0.0f64;
    for job in jobs {
        if let Some(rate) = a.request_rate.filter(|r| *r > 0.0 && r.is_finite()) {
            next_arrival += poisson_gap_s(&mut rng, rate);
            let wait = next_arrival - start.elapsed().as_secs_f64();
            if wait > 0.0 {
                std::thread::sleep(Duration::from_secs_f64(wait));
            }
        }
        // Blocks while `concurrency` requests are in flight; cannot fail (`slot_rx` lives here).
        if slot_tx.send(()).is_err() {
            break;
        }
        let t0 = Instant::now();
        let stream = engine.submit(job.prompt).map_err(|e| e.to_string());
        if stream_tx
            .blocking_send((stream, t0, job.input_len))
            .is_err()
        {
            break; // the consumer is gone (it only ends after this loop)
        }
        if progress {
            draw_progress(done.load(Ordering::Relaxed), n);
        }
    }
    drop(stream_tx);
    while done.load(Ordering::Relaxed) < n && !consumer.is_finished() {
        if progress {
            draw_progress(done.load(Ordering::Relaxed), n);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = consumer.join();
    let duration = start.elapsed().as_secs_f64();
    if progress {
        draw_progress(n, n);
        eprintln!();
    }
    let stats = engine.stats();
    let mut r = BenchReport {
        workers,
        threads_per_worker: threads,
        concurrency,
        ..Default::default()
    };
    let (mut ttft, mut tpot, mut e2e) = (Vec::new(), Vec::new(), Vec::new());
    let mut token_times: Vec<Vec<Instant>> = Vec::new();
    for res in res_rx.iter() {
        match res {
            Ok(m) => {
                r.num_requests += 1;
                r.total_input_tokens += m.input;
                r.total_output_tokens += m.output;
                ttft.push(m.ttft_ms);
                if m.output > 1 {
                    tpot.push(m.tpot_ms);
                }
                e2e.push(m.e2e_ms);
                token_times.push(m.token_times);
            }
            Err(e) => {
                r.failed += 1;
                r.first_error.get_or_insert(e);
            }
        }
    }
    if r.num_requests == 0 && r.failed > 0 {
        return Err(BenchError::AllFailed {
            failed: r.failed,
            first: r.first_error.take().unwrap_or_default(),
        });
    }
    (r.steady_decode_tokens_per_s, r.steady_window_s) = steady_decode(&token_times);
    r.duration_s = duration;
    r.requests_per_s = r.num_requests as f64 / duration;
    r.input_tokens_per_s = r.total_input_tokens as f64 / duration;
    r.output_tokens_per_s = r.total_output_tokens as f64 / duration;
    r.total_tokens_per_s = (r.total_input_tokens + r.total_output_tokens) as f64 / duration;
    r.ttft_ms = Pct::of(&ttft);
    r.tpot_ms = Pct::of(&tpot);
    r.e2e_ms = Pct::of(&e2e);
    r.peak_kv_usage = stats.kv_usage_peak;
    r.preemptions = stats.preemptions;
    r.prefix_cache_hit_rate = if stats.prefix_queries > 0 {
        stats.prefix_hits as f64 / stats.prefix_queries as f64
    } else {
        0.0
    };
    r.worker_busy_fraction = stats
        .worker_busy_s
        .iter()
        .zip(busy0.iter().chain(std::iter::repeat(&0.0)))
        .map(|(b, b0)| (b - b0) / duration)
        .collect();
    r.structured = a.structured.map(|_| "json-schema".to_string());
    r.speculative = speculative.to_string();
    r.spec_steps = stats.spec_steps - stats0.spec_steps;
    let drafted = stats.spec_draft_tokens - stats0.spec_draft_tokens;
    let accepted = stats.spec_accepted_tokens - stats0.spec_accepted_tokens;
    if r.spec_steps > 0 {
        r.spec_acceptance_rate = accepted as f64 / drafted.max(1) as f64;
        r.spec_tokens_per_step = 1.0 + accepted as f64 / r.spec_steps as f64;
        r.spec_draft_per_step = drafted as f64 / r.spec_steps as f64;
    }
    r.spec_row_cost_ratio = stats.spec_row_cost_ratio;
    if let (Some(g), Some(m0)) = (engine.validator().guidance().built(), masks0) {
        let m = g.mask_times().snapshot().since(&m0);
        r.masks = m.count();
        r.mask_p50_us = m.quantile(0.5) * 1e6;
        r.mask_p99_us = m.quantile(0.99) * 1e6;
    }
    drop(engine);
    Ok(r)
}

fn drain(mut s: ResponseStream) {
    while s.blocking_next().is_some() {}
}

/// What one request measured.
struct Measured {
    input: usize,
    output: usize,
    ttft_ms: f64,
    tpot_ms: f64,
    e2e_ms: f64,
    /// Arrival time of every generated token.
    token_times: Vec<Instant>,
}

/// Consumes one stream.
async fn measure(mut s: ResponseStream, t0: Instant, input_len: usize) -> Result<Measured, String> {
    let mut times = Vec::new();
    let mut input_len = input_len;
    while let Some(ev) = s.next().await {
        match ev {
            Event::Started { prompt_tokens, .. } => input_len = prompt_tokens.len(),
            Event::Token { .. } => times.push(Instant::now()),
            Event::Error(e) => return Err(e.to_string()),
            Event::Finished { .. } => break,
            _ => {}
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let out = times.len();
    let (first, last) = (
        times.first().copied().unwrap_or(t0),
        times.last().copied().unwrap_or(t0),
    );
    let tpot = if out > 1 {
        ms(last - first) / (out - 1) as f64
    } else {
        0.0
    };
    Ok(Measured {
        input: input_len,
        output: out,
        ttft_ms: ms(first - t0),
        tpot_ms: tpot,
        e2e_ms: ms(last - t0),
        token_times: times,
    })
}

/// Decode rate while all requests were decoding: tokens received in the
/// window `(last first-token, first last-token]`, over its length.
/// `(tokens/s, window s)`, `(0, 0)` when the window is empty.
fn steady_decode(token_times: &[Vec<Instant>]) -> (f64, f64) {
    let firsts = token_times.iter().filter_map(|t| t.first());
    let lasts = token_times.iter().filter_map(|t| t.last());
    let (Some(start), Some(end)) = (firsts.max(), lasts.min()) else {
        return (0.0, 0.0);
    };
    if end <= start || token_times.iter().any(|t| t.is_empty()) {
        return (0.0, 0.0);
    }
    let n: usize = token_times
        .iter()
        .map(|t| t.iter().filter(|&&x| x > *start && x <= *end).count())
        .sum();
    let w = (*end - *start).as_secs_f64();
    (n as f64 / w, w)
}

fn draw_progress(done: usize, total: usize) {
    let width = 40;
    let filled = (done * width)
        .checked_div(total)
        .unwrap_or(width)
        .min(width);
    eprint!(
        "\r[{}{}] {done}/{total} requests",
        "#".repeat(filled),
        " ".repeat(width - filled)
    );
    let _ = std::io::stderr().flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_decode_counts_the_all_decoding_window() {
        let t = Instant::now();
        let at = |ms: &[u64]| {
            ms.iter()
                .map(|&m| t + Duration::from_millis(m))
                .collect::<Vec<_>>()
        };
        // Request A decodes early (prefill of B still running), B starts at 300 ms;
        // A finishes at 1000 ms. Window (300, 1000]: A has 7 tokens, B has 7.
        let a = at(&[100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]);
        let b = at(&[300, 400, 500, 600, 700, 800, 900, 1000, 1100, 1200]);
        let (rate, w) = steady_decode(&[a.clone(), b]);
        assert!((w - 0.7).abs() < 1e-9, "{w}");
        assert!((rate - 14.0 / 0.7).abs() < 1e-6, "{rate}");
        // Disjoint requests (one after the other): no common window.
        let c = at(&[1100, 1200]);
        assert_eq!(steady_decode(&[a, c]), (0.0, 0.0));
        assert_eq!(steady_decode(&[]), (0.0, 0.0));
    }
}
