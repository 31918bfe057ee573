//! The actor pipeline runtime.
//!
//! ```text
//!  submit ──► [tokenizer] ──► [scheduler] ──► [worker 0] ──► … ──► [worker W-1] ──► [sampler]
//!  (try_send,   encode +        │  ▲            layers a..b          final norm +       │
//!   429 when    validate        │  └────────────── StepResult ───────── head ───────────┘
//!   full)                       ▼
//!                            [output] ── detokenize ──► each request's stream
//! ```
//!
//! Every arrow is a bounded `crossbeam-channel` (capacities from the config);
//! each actor is a named OS thread owning its state. The scheduler, KV-block
//! manager and sampler logic are plain structs ([`scheduler::Scheduler`],
//! [`crate::kv::KvCacheManager`], [`crate::sampling`]) wrapped by thin loops.
//!
//! **Deadlock freedom of the one cycle** (scheduler → workers → sampler →
//! scheduler). The scheduler never blocks on a send into the cycle: it keeps
//! at most `pipeline_depth` micro-batches in flight and every channel of the
//! cycle has capacity `>= pipeline_depth` (validated in the config), so its
//! `try_send` to worker 0 always finds room. Workers and the sampler block on
//! `send` downstream, but at most `pipeline_depth` items exist in the whole
//! cycle, and the feedback channel into the scheduler can hold all of them,
//! so the sampler's send always completes, and by induction every upstream
//! send does too. Channels leaving the cycle (to the output actor) are
//! drained by an actor that never blocks (it `try_send`s into per-request
//! streams sized for the whole completion), and the tokenizer actor, which
//! blocks on the scheduler's inbox, is upstream of the cycle and receives
//! nothing from it. Hence no wait-for cycle can form.

pub mod request;
pub mod scheduler;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, select, Receiver, Sender, TrySendError};

pub use request::{
    Event, FinishReason, GenerateRequest, Prompt, SamplingParams, Timings, TokenLogprob, Usage,
};
use scheduler::{SchedulerOutput, Scheduler, SchedulerConfig, Sequence, Status};

use crate::config::Config;
use crate::model::kv::KvStore;
use crate::model::llama::{Scratch, SeqChunk};
use crate::model::Model;
use crate::sampling;
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

/// Errors reported to a request's caller.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// The request is invalid; `param` names the offending field.
    #[error("{message}")]
    Invalid {
        /// Field name (OpenAI `param`).
        param: Option<String>,
        /// Human-readable message.
        message: String,
    },
    /// The engine's queue is full; retry later.
    #[error("the engine is overloaded: request queue full")]
    Overloaded,
    /// The engine is shutting down or stopped.
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// Internal failure.
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    fn invalid(param: &str, message: impl Into<String>) -> Self {
        EngineError::Invalid { param: Some(param.to_string()), message: message.into() }
    }
}

/// Errors starting the engine.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Thread or pool creation failed.
    #[error("starting engine: {0}")]
    Spawn(String),
}

/// A request as accepted by the tokenizer actor.
struct Submission {
    id: u64,
    req: GenerateRequest,
    tx: tokio::sync::mpsc::Sender<Event>,
    cancel: Arc<AtomicBool>,
    arrival: Instant,
}

/// A validated, tokenized request.
struct ValidRequest {
    id: u64,
    prompt: Arc<Vec<u32>>,
    params: Arc<SamplingParams>,
    seed: u64,
    priority: i32,
    max_len: usize,
    tx: tokio::sync::mpsc::Sender<Event>,
    cancel: Arc<AtomicBool>,
    arrival: Instant,
}

enum SchedMsg {
    New(ValidRequest),
    Abort(u64),
    Drain,
}

struct WorkItem {
    batch: Arc<SchedulerOutput>,
    x: Vec<f32>,
}

struct LogitsMsg {
    batch: Arc<SchedulerOutput>,
    /// `(chunk index, row within chunk)` of each logits row.
    rows: Vec<(usize, usize)>,
    logits: Vec<f32>,
}

struct StepResult {
    batch: Arc<SchedulerOutput>,
    sampled: Vec<Option<sampling::Sampled>>,
    /// Per chunk: `(position of predicted token, logprob entry)`.
    prompt_lp: Vec<Vec<(usize, TokenLogprob)>>,
}

enum OutMsg {
    Register { seq_id: u64, index: usize, prompt_len: usize, params: Arc<SamplingParams>, tx: tokio::sync::mpsc::Sender<Event>, arrival: Instant, stopped: Arc<AtomicBool> },
    Scheduled { seq_id: u64, at: Instant },
    PromptLogprobs { seq_id: u64, entries: Vec<(usize, TokenLogprob)> },
    Token { seq_id: u64, token: TokenLogprob, finish: Option<FinishReason>, cached: usize },
    Finish { seq_id: u64, reason: FinishReason, cached: usize },
}

/// A snapshot of the engine's state.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EngineStats {
    /// Sequences holding KV blocks.
    pub running: usize,
    /// Sequences waiting for admission.
    pub waiting: usize,
    /// KV blocks in total.
    pub kv_blocks_total: usize,
    /// KV blocks free (including cached, evictable ones).
    pub kv_blocks_free: usize,
    /// Fraction of blocks in use.
    pub kv_usage: f64,
    /// Highest `kv_usage` seen.
    pub kv_usage_peak: f64,
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_queries: u64,
    /// Prompt tokens found in the prefix cache.
    pub prefix_hits: u64,
    /// Preemptions.
    pub preemptions: u64,
    /// Micro-batches run.
    pub steps: u64,
    /// Prompt tokens computed.
    pub prefill_tokens: u64,
    /// Decode tokens computed.
    pub decode_tokens: u64,
    /// Busy seconds of each worker.
    pub worker_busy_s: Vec<f64>,
    /// Occupancy of each bounded channel: `(name, queued, capacity)`.
    pub channels: Vec<(String, usize, usize)>,
    /// Micro-batches in flight now.
    pub in_flight: usize,
    /// Seconds since start.
    pub uptime_s: f64,
}

/// The running engine; clone freely. Dropping every handle stops the engine
/// once in-flight requests end.
#[derive(Clone)]
pub struct EngineHandle {
    inner: Arc<HandleInner>,
}

struct HandleInner {
    submit_tx: Sender<Submission>,
    sched_tx: Sender<SchedMsg>,
    next_id: AtomicU64,
    stats: Arc<Mutex<EngineStats>>,
    cancels: Mutex<HashMap<u64, std::sync::Weak<AtomicBool>>>,
    tokenizer: Arc<Tokenizer>,
    model: Arc<Model>,
    config: Config,
    _threads: Mutex<Vec<JoinHandle<()>>>,
    draining: AtomicBool,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle").finish_non_exhaustive()
    }
}

/// The events of one request. Dropping it cancels the request.
#[derive(Debug)]
pub struct ResponseStream {
    /// Request id (for [`EngineHandle::abort`]).
    pub id: u64,
    rx: tokio::sync::mpsc::Receiver<Event>,
    cancel: Arc<AtomicBool>,
}

impl ResponseStream {
    /// Next event, blocking the thread (not for use inside an async runtime).
    pub fn blocking_next(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }
    /// Next event.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
    /// Cancels the request (same as dropping the stream, but keeps receiving).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl Drop for ResponseStream {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// Starting point of the runtime.
#[derive(Debug)]
pub struct Engine;

impl Engine {
    /// Starts all actors for `model` with `config`.
    pub fn start(model: Arc<Model>, tokenizer: Arc<Tokenizer>, config: Config) -> Result<EngineHandle, StartError> {
        let c = model.config.clone();
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let workers = config.workers(cores, c.n_layers);
        let threads = config.threads_per_worker(cores, workers);
        let depth = config.pipeline_depth(workers);
        let cap = config.runtime.channel_capacity.max(depth);
        let num_blocks = config.kv_blocks(c.n_layers, c.kv_dim);
        let block_size = config.kv_cache.block_size;

        let (submit_tx, submit_rx) = bounded::<Submission>(config.runtime.request_queue);
        let (sched_tx, sched_rx) = bounded::<SchedMsg>(cap.max(64));
        let (out_tx, out_rx) = bounded::<OutMsg>(cap.max(64) * 4);
        let (feedback_tx, feedback_rx) = bounded::<StepResult>(cap);
        let (logits_tx, logits_rx) = bounded::<LogitsMsg>(cap);
        // Logits buffers go back from the sampler to the last worker for reuse
        // (a 64-row batch has 12 MB of logits: no fresh pages every step).
        let (recycle_tx, recycle_rx) = bounded::<Vec<f32>>(cap + 1);
        let stats = Arc::new(Mutex::new(EngineStats::default()));
        let busy: Arc<Vec<AtomicU64>> = Arc::new((0..workers).map(|_| AtomicU64::new(0)).collect());
        let mut handles = Vec::new();
        let mut probes: Vec<(String, ChannelProbe)> = vec![
            ("requests".into(), probe(&submit_rx)),
            ("scheduler_inbox".into(), probe(&sched_rx)),
            ("output".into(), probe(&out_rx)),
            ("feedback".into(), probe(&feedback_rx)),
            ("logits".into(), probe(&logits_rx)),
        ];
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new().name(name).spawn(f).map_err(|e| StartError::Spawn(e.to_string()))
        };

        // Workers, last first so each knows its successor.
        let mut next_tx: Option<Sender<WorkItem>> = None;
        // Cost per token: one layer's projection MACs, and the output head's
        // MACs weighted by 0.4 — measured on SmolLM2 (64-sequence decode, packed
        // VNNI kernels): the head takes ~3.2 layers' time, not the 8 its MACs
        // suggest (attention/norms add to layers; the one big matmul runs at
        // higher efficiency). With 2 workers this gives 17 + 13 layers.
        let layer_cost = (c.dim * (2 * c.dim + 2 * c.kv_dim + 3 * c.ffn_dim)) as f64;
        let head_cost = 0.4 * (c.vocab_size * c.dim) as f64;
        let ranges = split_layers(c.n_layers, workers, layer_cost, head_cost);
        for k in (0..workers).rev() {
            let (tx, rx) = bounded::<WorkItem>(cap);
            probes.push((format!("worker_{k}"), probe(&rx)));
            let range = ranges[k].clone();
            let kv = KvStore::with_dtype(range.start, range.len(), num_blocks, block_size, c.kv_dim, c.head_dim, config.kv_cache.dtype);
            let pool = if threads > 1 {
                Some(
                    rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .thread_name(move |i| format!("worker-{k}-{i}"))
                        .build()
                        .map_err(|e| StartError::Spawn(e.to_string()))?,
                )
            } else {
                None
            };
            let next = match next_tx.take() {
                Some(n) => Next::Worker(n),
                None => Next::Sampler(logits_tx.clone(), recycle_rx.clone()),
            };
            let w = Worker { k, model: model.clone(), range, kv, pool, rx, next, busy: busy.clone(), scratch: Scratch::default() };
            handles.push(spawn(format!("worker-{k}"), Box::new(move || w.run()))?);
            next_tx = Some(tx);
        }
        drop(logits_tx);
        let worker0 = next_tx.ok_or_else(|| StartError::Spawn("no workers".into()))?;

        // Sampler.
        {
            let vocab = c.vocab_size;
            handles.push(spawn("sampler".into(), Box::new(move || sampler_loop(logits_rx, feedback_tx, recycle_tx, vocab)))?);
        }
        // Output.
        {
            let tok = tokenizer.clone();
            handles.push(spawn("output".into(), Box::new(move || output_loop(out_rx, tok)))?);
        }
        // Scheduler.
        {
            let sched = Scheduler::new(SchedulerConfig {
                max_batched_tokens: config.runtime.max_batched_tokens,
                max_seqs: config.runtime.max_seqs,
                prefill_chunk: config.runtime.prefill_chunk,
                block_size,
                num_blocks,
                prefix_caching: config.kv_cache.prefix_caching,
            })
            .map_err(|e| StartError::Spawn(format!("kv cache: {e}")))?;
            let eog = Arc::new(tokenizer.eog_ids().to_vec());
            let actor = SchedulerActor {
                sched,
                inbox: sched_rx,
                feedback: feedback_rx,
                worker0,
                out: out_tx,
                depth,
                in_flight: 0,
                stats: stats.clone(),
                busy: busy.clone(),
                eog,
                next_seq: 0,
                seq_index: HashMap::new(),
                started: Instant::now(),
                scheduled_once: std::collections::HashSet::new(),
                kv_peak: 0.0,
                draining: false,
                inbox_closed: false,
                probes,
            };
            handles.push(spawn("scheduler".into(), Box::new(move || actor.run()))?);
        }
        // Tokenizer.
        {
            let tok = tokenizer.clone();
            let tx = sched_tx.clone();
            let max_len = c.context_length.min(num_blocks * block_size);
            let vocab = c.vocab_size;
            let max_n = config.runtime.max_n;
            handles.push(spawn(
                "tokenizer".into(),
                Box::new(move || tokenizer_loop(submit_rx, tx, tok, max_len, vocab, max_n)),
            )?);
        }
        Ok(EngineHandle {
            inner: Arc::new(HandleInner {
                submit_tx,
                sched_tx,
                next_id: AtomicU64::new(1),
                stats,
                cancels: Mutex::new(HashMap::new()),
                tokenizer,
                model,
                config,
                _threads: Mutex::new(handles),
                draining: AtomicBool::new(false),
            }),
        })
    }
}

/// Splits `n` layers into `w` contiguous groups of nearly equal cost, where a
/// layer costs `layer_cost` and the last group also pays `head_cost` (final
/// norm + output head): the last worker gets fewer layers. Every group has at
/// least one layer.
pub fn split_layers(n: usize, w: usize, layer_cost: f64, head_cost: f64) -> Vec<Range<usize>> {
    let w = w.clamp(1, n.max(1));
    let total = n as f64 * layer_cost + head_cost;
    let mut out = Vec::with_capacity(w);
    let mut start = 0;
    for k in 0..w {
        let end = if k + 1 == w {
            n
        } else {
            // Smallest end reaching this group's share, leaving a layer for each later group.
            let target = total * (k + 1) as f64 / w as f64;
            let mut e = start + 1;
            while e < n - (w - k - 1) && (e as f64 * layer_cost) < target - layer_cost / 2.0 {
                e += 1;
            }
            e
        };
        out.push(start..end);
        start = end;
    }
    out
}

impl EngineHandle {
    /// Submits a request; events arrive on the returned stream.
    /// Fails at once with [`EngineError::Overloaded`] when the queue is full.
    pub fn submit(&self, req: GenerateRequest) -> Result<ResponseStream, EngineError> {
        if self.inner.draining.load(Ordering::Relaxed) {
            return Err(EngineError::ShuttingDown);
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let n = req.params.n.max(1);
        // Room for every event of every completion: the sender never blocks.
        let cap = n.saturating_mul(req.params.max_tokens.saturating_add(4)).saturating_add(8).min(1 << 22);
        let (tx, rx) = tokio::sync::mpsc::channel(cap);
        let cancel = Arc::new(AtomicBool::new(false));
        let sub = Submission { id, req, tx, cancel: cancel.clone(), arrival: Instant::now() };
        match self.inner.submit_tx.try_send(sub) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(EngineError::Overloaded),
            Err(TrySendError::Disconnected(_)) => return Err(EngineError::ShuttingDown),
        }
        if let Ok(mut m) = self.inner.cancels.lock() {
            m.retain(|_, w| w.strong_count() > 0);
            m.insert(id, Arc::downgrade(&cancel));
        }
        Ok(ResponseStream { id, rx, cancel })
    }

    /// Aborts request `id` (finishes with `abort` within one step).
    pub fn abort(&self, id: u64) {
        if let Ok(m) = self.inner.cancels.lock() {
            if let Some(c) = m.get(&id).and_then(|w| w.upgrade()) {
                c.store(true, Ordering::Relaxed);
            }
        }
        // Also wake the scheduler; if its inbox is full it will see the flag anyway.
        let _ = self.inner.sched_tx.try_send(SchedMsg::Abort(id));
    }

    /// A snapshot of running/waiting counts, KV usage, prefix-cache hits, worker busy time.
    pub fn stats(&self) -> EngineStats {
        self.inner.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.inner.tokenizer
    }

    /// The model.
    pub fn model(&self) -> &Arc<Model> {
        &self.inner.model
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Stops accepting requests; running ones continue. Idempotent.
    pub fn drain(&self) {
        self.inner.draining.store(true, Ordering::Relaxed);
        let _ = self.inner.sched_tx.try_send(SchedMsg::Drain);
    }

    /// Cancels every request that is still running or queued.
    pub fn abort_all(&self) {
        if let Ok(m) = self.inner.cancels.lock() {
            for c in m.values().filter_map(|w| w.upgrade()) {
                c.store(true, Ordering::Relaxed);
            }
        }
    }
}

// ---------------------------------------------------------------- tokenizer

fn tokenizer_loop(
    rx: Receiver<Submission>,
    tx: Sender<SchedMsg>,
    tok: Arc<Tokenizer>,
    max_len: usize,
    vocab: usize,
    max_n: usize,
) {
    while let Ok(sub) = rx.recv() {
        let _span = tracing::debug_span!("tokenize", request_id = sub.id).entered();
        match validate(&sub, &tok, max_len, vocab, max_n) {
            Ok((prompt, seed)) => {
                let started = Event::Started { prompt_tokens: prompt.clone(), seed };
                let _ = sub.tx.try_send(started); // caller may have gone
                let v = ValidRequest {
                    id: sub.id,
                    prompt: Arc::new(prompt),
                    params: Arc::new(sub.req.params),
                    seed,
                    priority: sub.req.priority,
                    max_len,
                    tx: sub.tx,
                    cancel: sub.cancel,
                    arrival: sub.arrival,
                };
                if tx.send(SchedMsg::New(v)).is_err() {
                    return; // scheduler gone: shutting down
                }
            }
            Err(e) => {
                let _ = sub.tx.try_send(Event::Error(e)); // caller may have gone
            }
        }
    }
}

/// Encodes the prompt and checks every parameter; returns the prompt ids and seed.
fn validate(
    sub: &Submission,
    tok: &Tokenizer,
    max_len: usize,
    vocab: usize,
    max_n: usize,
) -> Result<(Vec<u32>, u64), EngineError> {
    let p = &sub.req.params;
    validate_params(p, vocab, max_n)?;
    let prompt = encode_prompt(tok, &sub.req.prompt)?;
    if prompt.is_empty() {
        return Err(EngineError::invalid("prompt", "the prompt must contain at least one token"));
    }
    if let Some(&t) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(EngineError::invalid("prompt", format!("token id {t} is out of range (vocabulary size {vocab})")));
    }
    if prompt.len() + p.max_tokens > max_len {
        return Err(EngineError::invalid(
            "max_tokens",
            format!(
                "this model's maximum context length is {max_len} tokens; the request asks for {} tokens ({} in the prompt, {} to generate)",
                prompt.len() + p.max_tokens,
                prompt.len(),
                p.max_tokens
            ),
        ));
    }
    let seed = p.seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        sampling::mix64(t ^ sampling::mix64(sub.id))
    });
    Ok((prompt, seed))
}

/// The token ids the engine runs for `prompt`: text with special tokens
/// parsed (and BOS if the model adds one), chat messages through the model's
/// template with the generation prompt, token ids as they are.
pub fn encode_prompt(tok: &Tokenizer, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
    Ok(match prompt {
        Prompt::Text(t) => tok.encode_with_bos(t, true).map_err(|e| EngineError::invalid("prompt", e.to_string()))?,
        Prompt::Tokens(ids) => ids.clone(),
        Prompt::Chat(messages) => {
            let tmpl = tok.chat_template().ok_or_else(|| EngineError::invalid("messages", "the model has no chat template"))?;
            let text = tmpl.render(messages, true).map_err(|e| EngineError::invalid("messages", e.to_string()))?;
            tok.encode_with_bos(&text, true).map_err(|e| EngineError::invalid("messages", e.to_string()))?
        }
    })
}

/// Range checks on sampling parameters, naming the field.
pub fn validate_params(p: &SamplingParams, vocab: usize, max_n: usize) -> Result<(), EngineError> {
    let fin = |v: f32| v.is_finite();
    if !(fin(p.temperature) && p.temperature >= 0.0) {
        return Err(EngineError::invalid("temperature", format!("temperature must be >= 0, got {}", p.temperature)));
    }
    if p.temperature > 100.0 {
        return Err(EngineError::invalid("temperature", format!("temperature must be <= 100, got {}", p.temperature)));
    }
    if !(fin(p.top_p) && p.top_p > 0.0 && p.top_p <= 1.0) {
        return Err(EngineError::invalid("top_p", format!("top_p must be in (0, 1], got {}", p.top_p)));
    }
    if p.top_k < -1 {
        return Err(EngineError::invalid("top_k", format!("top_k must be -1 (off), 0 (off) or positive, got {}", p.top_k)));
    }
    if !(fin(p.min_p) && (0.0..=1.0).contains(&p.min_p)) {
        return Err(EngineError::invalid("min_p", format!("min_p must be in [0, 1], got {}", p.min_p)));
    }
    if !(fin(p.repetition_penalty) && p.repetition_penalty > 0.0 && p.repetition_penalty <= 10.0) {
        return Err(EngineError::invalid(
            "repetition_penalty",
            format!("repetition_penalty must be in (0, 10], got {}", p.repetition_penalty),
        ));
    }
    if !(fin(p.presence_penalty) && (-2.0..=2.0).contains(&p.presence_penalty)) {
        return Err(EngineError::invalid("presence_penalty", format!("presence_penalty must be in [-2, 2], got {}", p.presence_penalty)));
    }
    if !(fin(p.frequency_penalty) && (-2.0..=2.0).contains(&p.frequency_penalty)) {
        return Err(EngineError::invalid(
            "frequency_penalty",
            format!("frequency_penalty must be in [-2, 2], got {}", p.frequency_penalty),
        ));
    }
    for (&t, &b) in &p.logit_bias {
        if t as usize >= vocab {
            return Err(EngineError::invalid("logit_bias", format!("token id {t} in logit_bias is out of range (vocabulary size {vocab})")));
        }
        if !(fin(b) && (-100.0..=100.0).contains(&b)) {
            return Err(EngineError::invalid("logit_bias", format!("bias for token {t} must be in [-100, 100], got {b}")));
        }
    }
    if let Some(&t) = p.stop_token_ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(EngineError::invalid("stop_token_ids", format!("token id {t} is out of range (vocabulary size {vocab})")));
    }
    if p.stop.iter().any(|s| s.is_empty()) {
        return Err(EngineError::invalid("stop", "stop strings must not be empty"));
    }
    if p.stop.len() > 16 {
        return Err(EngineError::invalid("stop", format!("at most 16 stop strings, got {}", p.stop.len())));
    }
    if let Some(n) = p.logprobs {
        if n > 20 {
            return Err(EngineError::invalid("top_logprobs", format!("top_logprobs must be in [0, 20], got {n}")));
        }
    }
    if let Some(n) = p.prompt_logprobs {
        if n > 20 {
            return Err(EngineError::invalid("prompt_logprobs", format!("prompt_logprobs must be in [0, 20], got {n}")));
        }
    }
    if p.n == 0 || p.n > max_n {
        return Err(EngineError::invalid("n", format!("n must be in [1, {max_n}], got {}", p.n)));
    }
    if p.max_tokens == 0 && p.prompt_logprobs.is_none() {
        return Err(EngineError::invalid("max_tokens", "max_tokens must be at least 1 (0 only with prompt log-probabilities)"));
    }
    if p.min_tokens > p.max_tokens {
        return Err(EngineError::invalid("min_tokens", format!("min_tokens ({}) must be <= max_tokens ({})", p.min_tokens, p.max_tokens)));
    }
    Ok(())
}

// ---------------------------------------------------------------- scheduler

struct SchedulerActor {
    sched: Scheduler,
    inbox: Receiver<SchedMsg>,
    feedback: Receiver<StepResult>,
    worker0: Sender<WorkItem>,
    out: Sender<OutMsg>,
    depth: usize,
    in_flight: usize,
    stats: Arc<Mutex<EngineStats>>,
    busy: Arc<Vec<AtomicU64>>,
    eog: Arc<Vec<u32>>,
    next_seq: u64,
    /// seq id → (request id, completion index).
    seq_index: HashMap<u64, (u64, usize)>,
    started: Instant,
    scheduled_once: std::collections::HashSet<u64>,
    kv_peak: f64,
    draining: bool,
    inbox_closed: bool,
    /// Probes of channel occupancy: name, current length, capacity.
    probes: Vec<(String, ChannelProbe)>,
}

/// Reads a channel's length without touching its messages.
type ChannelProbe = Box<dyn Fn() -> (usize, usize) + Send>;

fn probe<T: Send + 'static>(r: &Receiver<T>) -> ChannelProbe {
    let r = r.clone();
    Box::new(move || (r.len(), r.capacity().unwrap_or(0)))
}

impl SchedulerActor {
    fn run(mut self) {
        loop {
            // Feedback first: it frees sequences for the next batch.
            while let Ok(r) = self.feedback.try_recv() {
                self.on_result(r);
            }
            while let Ok(m) = self.inbox.try_recv() {
                self.on_msg(m);
            }
            for s in self.sched.reap_cancelled() {
                self.finish(s.id, FinishReason::Abort, s.num_cached);
            }
            while self.in_flight < self.depth {
                let Some(batch) = self.sched.schedule() else { break };
                let _span = tracing::debug_span!("step", step = batch.step_id, tokens = batch.num_tokens()).entered();
                let now = Instant::now();
                for c in &batch.chunks {
                    if self.scheduled_once.insert(c.seq_id) {
                        let _ = self.out.send(OutMsg::Scheduled { seq_id: c.seq_id, at: now });
                    }
                }
                let item = WorkItem { batch: Arc::new(batch), x: Vec::new() };
                match self.worker0.try_send(item) {
                    Ok(()) => self.in_flight += 1,
                    Err(_) => {
                        // Cannot happen (capacity >= depth); workers gone means shutdown.
                        tracing::error!("worker 0 refused a micro-batch; stopping the scheduler");
                        return;
                    }
                }
            }
            self.publish_stats();
            if self.inbox_closed && self.sched.is_empty() && self.in_flight == 0 {
                return; // every handle dropped and all work done
            }
            // Sleep until something happens; wake periodically to see cancel flags.
            select! {
                recv(self.feedback) -> r => if let Ok(r) = r { self.on_result(r) },
                recv(self.inbox) -> m => match m {
                    Ok(m) => self.on_msg(m),
                    Err(_) => {
                        self.inbox_closed = true;
                        if self.sched.is_empty() && self.in_flight == 0 {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                },
                default(Duration::from_millis(5)) => {}
            }
        }
    }

    fn on_msg(&mut self, m: SchedMsg) {
        match m {
            SchedMsg::New(v) => {
                if self.draining {
                    let _ = v.tx.try_send(Event::Error(EngineError::ShuttingDown));
                    return;
                }
                let n = v.params.n.max(1);
                let mut seqs = Vec::with_capacity(n);
                for index in 0..n {
                    let seq_id = self.next_seq;
                    self.next_seq += 1;
                    self.seq_index.insert(seq_id, (v.id, index));
                    let stopped = Arc::new(AtomicBool::new(false));
                    let _ = self.out.send(OutMsg::Register {
                        stopped: stopped.clone(),
                        seq_id,
                        index,
                        prompt_len: v.prompt.len(),
                        params: v.params.clone(),
                        tx: v.tx.clone(),
                        arrival: v.arrival,
                    });
                    seqs.push(Sequence {
                        id: seq_id,
                        request_id: v.id,
                        index,
                        tokens: v.prompt.as_ref().clone(),
                        num_prompt: v.prompt.len(),
                        num_computed: 0,
                        num_cached: 0,
                        in_flight: false,
                        status: Status::Waiting,
                        arrival: seq_id,
                        priority: v.priority,
                        params: v.params.clone(),
                        seed: v.seed,
                        max_len: v.max_len,
                        cancelled: v.cancel.clone(),
                        stopped,
                        preemptions: 0,
                        eog: self.eog.clone(),
                        prompt: v.prompt.clone(),
                        pending_forks: Vec::new(),
                    });
                }
                // Siblings ride on the first completion until it forks them.
                let mut parent = seqs.remove(0);
                parent.pending_forks = seqs;
                self.sched.add(parent);
            }
            SchedMsg::Abort(id) => tracing::debug!(request_id = id, "abort requested"), // flag already set; reaped next loop
            SchedMsg::Drain => self.draining = true,
        }
    }

    fn on_result(&mut self, r: StepResult) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let tokens: Vec<Option<u32>> = r.sampled.iter().map(|s| s.as_ref().map(|s| s.token)).collect();
        for (c, lp) in r.batch.chunks.iter().zip(r.prompt_lp) {
            if !lp.is_empty() {
                let _ = self.out.send(OutMsg::PromptLogprobs { seq_id: c.seq_id, entries: lp });
            }
        }
        let mut sampled: HashMap<u64, sampling::Sampled> = HashMap::new();
        let mut cached: HashMap<u64, usize> = HashMap::new();
        for (c, smp) in r.batch.chunks.iter().zip(r.sampled) {
            cached.insert(c.seq_id, self.sched.get(c.seq_id).map(|s| s.num_cached).unwrap_or(0));
            if let Some(smp) = smp {
                sampled.insert(c.seq_id, smp);
            }
        }
        let updates = self.sched.update_from_output(&r.batch, &tokens);
        for u in updates {
            let cached = cached.get(&u.seq_id).copied().unwrap_or(0);
            match (u.token, sampled.remove(&u.seq_id)) {
                (Some(_), Some(s)) => {
                    let token = TokenLogprob { token: s.token, logprob: s.logprob, top: s.top };
                    let _ = self.out.send(OutMsg::Token { seq_id: u.seq_id, token, finish: u.finish, cached });
                }
                _ => {
                    if let Some(reason) = u.finish {
                        let _ = self.out.send(OutMsg::Finish { seq_id: u.seq_id, reason, cached });
                    }
                }
            }
            if u.finish.is_some() {
                self.seq_index.remove(&u.seq_id);
                self.scheduled_once.remove(&u.seq_id);
            }
        }
    }

    fn finish(&mut self, seq_id: u64, reason: FinishReason, cached: usize) {
        let _ = self.out.send(OutMsg::Finish { seq_id, reason, cached });
        self.seq_index.remove(&seq_id);
        self.scheduled_once.remove(&seq_id);
    }

    fn publish_stats(&mut self) {
        let kv = self.sched.kv.stats();
        let usage = if kv.num_blocks > 0 { kv.num_used_blocks as f64 / kv.num_blocks as f64 } else { 0.0 };
        self.kv_peak = self.kv_peak.max(usage);
        if let Ok(mut s) = self.stats.lock() {
            s.running = self.sched.num_running();
            s.waiting = self.sched.num_waiting();
            s.kv_blocks_total = kv.num_blocks;
            s.kv_blocks_free = kv.num_free_blocks;
            s.kv_usage = usage;
            s.kv_usage_peak = self.kv_peak;
            s.prefix_queries = kv.prefix_query_tokens;
            s.prefix_hits = kv.prefix_hit_tokens;
            s.preemptions = self.sched.counters.preemptions;
            s.steps = self.sched.counters.steps;
            s.prefill_tokens = self.sched.counters.prefill_tokens;
            s.decode_tokens = self.sched.counters.decode_tokens;
            s.worker_busy_s = self.busy.iter().map(|b| b.load(Ordering::Relaxed) as f64 * 1e-9).collect();
            s.channels = self.probes.iter().map(|(n, p)| {
                let (len, cap) = p();
                (n.clone(), len, cap)
            }).collect();
            s.in_flight = self.in_flight;
            s.uptime_s = self.started.elapsed().as_secs_f64();
        }
    }
}

// ---------------------------------------------------------------- workers

enum Next {
    Worker(Sender<WorkItem>),
    Sampler(Sender<LogitsMsg>, Receiver<Vec<f32>>),
}

struct Worker {
    k: usize,
    model: Arc<Model>,
    range: Range<usize>,
    kv: KvStore,
    pool: Option<rayon::ThreadPool>,
    rx: Receiver<WorkItem>,
    next: Next,
    busy: Arc<Vec<AtomicU64>>,
    scratch: Scratch,
}

impl Worker {
    fn run(mut self) {
        let dim = self.model.config.dim;
        while let Ok(mut item) = self.rx.recv() {
            let t0 = Instant::now();
            let batch = item.batch.clone();
            let n = batch.num_tokens();
            for &(src, dst) in &batch.copies {
                self.kv.copy_block(src as usize, dst as usize);
            }
            if self.k == 0 {
                item.x.resize(n * dim, 0.0);
                let mut row = 0;
                for c in &batch.chunks {
                    self.model.embed(&c.tokens, &mut item.x[row * dim..(row + c.tokens.len()) * dim]);
                    row += c.tokens.len();
                }
            }
            let chunks: Vec<SeqChunk<'_>> =
                batch.chunks.iter().map(|c| SeqChunk { pos: c.pos, len: c.tokens.len(), block_table: &c.block_table }).collect();
            // Run on the worker's own pool: the nested parallel loops of every
            // matmul are then cheap work-stealing forks, not cross-thread wakeups.
            let (model, range, kv, scratch) = (&self.model, self.range.clone(), &mut self.kv, &mut self.scratch);
            match &self.pool {
                Some(p) => p.install(|| model.forward_layers(range, &mut item.x, &chunks, kv, scratch, Some(p))),
                None => model.forward_layers(range, &mut item.x, &chunks, kv, scratch, None),
            }
            drop(chunks);
            let sent = match &self.next {
                Next::Worker(tx) => {
                    self.add_busy(t0);
                    tx.send(item).is_ok()
                }
                Next::Sampler(tx, recycled) => {
                    // Gather the rows that need logits: the last row of sampling
                    // chunks, every row of chunks that want prompt log-probabilities.
                    let mut rows = Vec::new();
                    let mut start = 0;
                    for (ci, c) in batch.chunks.iter().enumerate() {
                        let len = c.tokens.len();
                        if c.all_logits {
                            rows.extend((0..len).map(|r| (ci, r)));
                        } else if c.sample {
                            rows.push((ci, len - 1));
                        }
                        start += len;
                    }
                    debug_assert_eq!(start, n);
                    let offsets: Vec<usize> = batch
                        .chunks
                        .iter()
                        .scan(0, |acc, c| {
                            let o = *acc;
                            *acc += c.tokens.len();
                            Some(o)
                        })
                        .collect();
                    let mut xs = Vec::with_capacity(rows.len() * dim);
                    for &(ci, r) in &rows {
                        let row = offsets[ci] + r;
                        xs.extend_from_slice(&item.x[row * dim..(row + 1) * dim]);
                    }
                    let vocab = self.model.config.vocab_size;
                    let mut logits = recycled.try_recv().unwrap_or_default();
                    logits.clear();
                    logits.resize(rows.len() * vocab, 0.0);
                    if !rows.is_empty() {
                        let (model, scratch) = (&self.model, &mut self.scratch);
                        match &self.pool {
                            Some(p) => p.install(|| model.logits(&xs, &mut logits, scratch, Some(p))),
                            None => model.logits(&xs, &mut logits, scratch, None),
                        }
                    }
                    self.add_busy(t0);
                    tx.send(LogitsMsg { batch, rows, logits }).is_ok()
                }
            };
            if !sent {
                return; // downstream gone: shutting down
            }
        }
    }

    fn add_busy(&self, t0: Instant) {
        if let Some(b) = self.busy.get(self.k) {
            b.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
    }
}

// ---------------------------------------------------------------- sampler

fn sampler_loop(rx: Receiver<LogitsMsg>, tx: Sender<StepResult>, recycle: Sender<Vec<f32>>, vocab: usize) {
    let mut work = vec![0.0f32; vocab];
    while let Ok(m) = rx.recv() {
        let nchunks = m.batch.chunks.len();
        let mut sampled: Vec<Option<sampling::Sampled>> = vec![None; nchunks];
        let mut prompt_lp: Vec<Vec<(usize, TokenLogprob)>> = vec![Vec::new(); nchunks];
        for (i, &(ci, r)) in m.rows.iter().enumerate() {
            let c = &m.batch.chunks[ci];
            let Some(ctx) = &c.ctx else { continue };
            let raw = &m.logits[i * vocab..(i + 1) * vocab];
            let pos = c.pos + r; // row's own position; it predicts pos + 1
            let last = r + 1 == c.tokens.len();
            if c.all_logits && pos + 1 < ctx.prompt.len() {
                let next = ctx.prompt[pos + 1];
                let lse = sampling::logsumexp(raw);
                let n = ctx.params.prompt_logprobs.unwrap_or(0);
                let top = if n > 0 {
                    sampling::top_k_entries(raw, n).into_iter().map(|(t, v)| (t, v - lse)).collect()
                } else {
                    Vec::new()
                };
                prompt_lp[ci].push((pos + 1, TokenLogprob { token: next, logprob: raw[next as usize] - lse, top }));
            }
            if c.sample && last {
                work.copy_from_slice(raw);
                let masked: &[u32] = if ctx.mask_stop { &ctx.eog } else { &[] };
                let mut masked_all: Vec<u32> = Vec::new();
                let masked = if ctx.mask_stop && !ctx.params.stop_token_ids.is_empty() {
                    masked_all.extend_from_slice(masked);
                    masked_all.extend_from_slice(&ctx.params.stop_token_ids);
                    &masked_all[..]
                } else {
                    masked
                };
                let rp = sampling::RowParams {
                    params: &ctx.params,
                    seed: ctx.seed,
                    index: ctx.index,
                    position: c.pos + c.tokens.len(),
                    prompt: &ctx.prompt,
                    output: &ctx.output,
                    masked,
                };
                sampled[ci] = Some(sampling::sample(raw, &mut work, &rp));
            }
        }
        let _ = recycle.try_send(m.logits); // full: let the buffer go
        if tx.send(StepResult { batch: m.batch, sampled, prompt_lp }).is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------- output

struct OutSeq {
    index: usize,
    prompt_len: usize,
    params: Arc<SamplingParams>,
    tx: tokio::sync::mpsc::Sender<Event>,
    dec: IncrementalDecoder,
    /// Decoded text not yet sent (may still become a stop string).
    pending: String,
    completion_tokens: usize,
    arrival: Instant,
    scheduled: Option<Instant>,
    first_token: Option<Instant>,
    prompt_lp: Vec<(usize, TokenLogprob)>,
    done: bool,
    stopped: Arc<AtomicBool>,
}

impl OutSeq {
    fn send(&mut self, e: Event) {
        if self.tx.try_send(e).is_err() {
            // Stream closed (caller gone) or, impossibly, full: stop sending.
            self.done = true;
        }
    }

    fn finish(&mut self, reason: FinishReason, cached: usize) {
        if self.done {
            return;
        }
        let mut text = std::mem::take(&mut self.pending);
        if reason != FinishReason::Stop || self.params.stop.is_empty() {
            text.push_str(&self.dec.finish());
        }
        let now = Instant::now();
        let timings = Timings {
            queue: self.scheduled.unwrap_or(now).saturating_duration_since(self.arrival),
            ttft: self.first_token.unwrap_or(now).saturating_duration_since(self.arrival),
            e2e: now.saturating_duration_since(self.arrival),
        };
        let usage = Usage { prompt_tokens: self.prompt_len, completion_tokens: self.completion_tokens, cached_tokens: cached };
        self.send(Event::Finished { index: self.index, reason, text, usage, timings });
        self.done = true;
    }
}

/// Finds the earliest stop string in `text`; returns the byte offset where it starts.
fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// Bytes at the end of `text` that could be the beginning of a stop string.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut keep = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if text.ends_with(&s[..i]) {
                keep = keep.max(i);
            }
        }
    }
    keep
}

fn output_loop(rx: Receiver<OutMsg>, tok: Arc<Tokenizer>) {
    let mut seqs: HashMap<u64, OutSeq> = HashMap::new();
    while let Ok(m) = rx.recv() {
        match m {
            OutMsg::Register { seq_id, index, prompt_len, params, tx, arrival, stopped } => {
                let dec = IncrementalDecoder::new(&tok, params.skip_special_tokens);
                seqs.insert(
                    seq_id,
                    OutSeq {
                        index,
                        prompt_len,
                        params,
                        tx,
                        dec,
                        pending: String::new(),
                        completion_tokens: 0,
                        arrival,
                        scheduled: None,
                        first_token: None,
                        prompt_lp: Vec::new(),
                        done: false,
                        stopped,
                    },
                );
            }
            OutMsg::Scheduled { seq_id, at } => {
                if let Some(s) = seqs.get_mut(&seq_id) {
                    s.scheduled.get_or_insert(at);
                }
            }
            OutMsg::PromptLogprobs { seq_id, entries } => {
                if let Some(s) = seqs.get_mut(&seq_id) {
                    s.prompt_lp.extend(entries);
                }
            }
            OutMsg::Token { seq_id, token, finish, cached } => {
                let Some(s) = seqs.get_mut(&seq_id) else { continue };
                flush_prompt_logprobs(s);
                if s.done {
                    if finish.is_some() {
                        seqs.remove(&seq_id);
                    }
                    continue;
                }
                s.first_token.get_or_insert_with(Instant::now);
                s.completion_tokens += 1;
                let is_stop_token = finish == Some(FinishReason::Stop);
                // A stop/EOS token ends the text without contributing to it.
                let piece = if is_stop_token { String::new() } else { s.dec.push(token.token).unwrap_or_default() };
                let mut reason = finish;
                let text = if s.params.stop.is_empty() {
                    piece
                } else {
                    s.pending.push_str(&piece);
                    if let Some(at) = find_stop(&s.pending, &s.params.stop) {
                        s.pending.truncate(at);
                        reason = Some(FinishReason::Stop);
                        std::mem::take(&mut s.pending)
                    } else if reason.is_some() {
                        std::mem::take(&mut s.pending)
                    } else {
                        let keep = held_back(&s.pending, &s.params.stop);
                        let cut = s.pending.len() - keep;
                        let out = s.pending[..cut].to_string();
                        s.pending.drain(..cut);
                        out
                    }
                };
                let index = s.index;
                s.send(Event::Token { index, token, text });
                if let Some(r) = reason {
                    s.finish(r, cached);
                    if finish.is_none() {
                        // Stopped by a stop string: the scheduler still runs this
                        // completion; the flag makes it free the blocks next step.
                        s.stopped.store(true, Ordering::Relaxed);
                    }
                }
                if finish.is_some() {
                    seqs.remove(&seq_id);
                }
            }
            OutMsg::Finish { seq_id, reason, cached } => {
                if let Some(mut s) = seqs.remove(&seq_id) {
                    flush_prompt_logprobs(&mut s);
                    s.finish(reason, cached);
                }
            }
        }
    }
}

fn flush_prompt_logprobs(s: &mut OutSeq) {
    if s.prompt_lp.is_empty() || s.index != 0 || s.done {
        s.prompt_lp.clear();
        return;
    }
    let mut v: Vec<Option<TokenLogprob>> = vec![None; s.prompt_len];
    for (pos, lp) in s.prompt_lp.drain(..) {
        if let Some(slot) = v.get_mut(pos) {
            *slot = Some(lp);
        }
    }
    s.send(Event::PromptLogprobs(v));
}

#[cfg(test)]
mod split_tests {
    use super::split_layers;

    #[test]
    fn layer_split_balances_cost_including_the_head() {
        // SmolLM2-135M: 30 layers of 3.54M MACs, head 28.3M MACs.
        let r = split_layers(30, 2, 3.54e6, 28.3e6);
        assert_eq!(r, vec![0..19, 19..30]);
        // No head: even split.
        assert_eq!(split_layers(30, 3, 1.0, 0.0), vec![0..10, 10..20, 20..30]);
        // Every group gets at least one layer, groups are contiguous and cover all.
        for n in 1..12 {
            for w in 1..6 {
                let r = split_layers(n, w, 1.0, 50.0);
                assert_eq!(r.len(), w.min(n));
                assert_eq!(r[0].start, 0);
                assert_eq!(r.last().unwrap().end, n);
                for pair in r.windows(2) {
                    assert_eq!(pair[0].end, pair[1].start);
                }
                assert!(r.iter().all(|g| !g.is_empty()), "{n} {w} {r:?}");
            }
        }
    }
}
