//! [`EngineHandle`]: the engine's API (submit, abort, stats, limits, health),
//! and [`ResponseStream`], one request's events. Tokio-side code may call
//! every method: none blocks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Sender, TrySendError};

use super::error::EngineError;
use super::msg::{Control, ControlSender, Submission, SubmissionBody};
use super::request::{Event, GenerateRequest};
use super::validation::{EngineInfo, ValidRequest, Validator};
use crate::config::Config;
use crate::model::Model;
use crate::tokenizer::Tokenizer;

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
    /// Micro-batches that failed (a stage panicked); their requests ended with errors.
    pub failed_steps: u64,
    /// Prompt tokens computed.
    pub prefill_tokens: u64,
    /// Decode tokens computed (rows: speculative drafts included).
    pub decode_tokens: u64,
    /// Tokens per micro-batch, bucketed.
    pub iteration_tokens: crate::engine::scheduler::IterationTokens,
    /// Busy seconds of each worker.
    pub worker_busy_s: Vec<f64>,
    /// Occupancy of each bounded channel: `(name, queued, capacity)`.
    pub channels: Vec<(String, usize, usize)>,
    /// Micro-batches in flight now.
    pub in_flight: usize,
    /// Completions the output actor still holds (0 when idle: nothing leaked).
    pub open_completions: usize,
    /// Seconds since start.
    pub uptime_s: f64,
    /// Speculative decoding: verify chunks run (decode steps that carried drafts).
    pub spec_steps: u64,
    /// Draft tokens proposed.
    pub spec_draft_tokens: u64,
    /// Draft tokens accepted (each verify chunk also yields one more token).
    pub spec_accepted_tokens: u64,
    /// The measured price of one more row of a decode step, relative to the
    /// step's fixed cost (`t1 / t0`; it sets the draft length).
    pub spec_row_cost_ratio: f64,
}

/// Whether the engine is alive; set once, when an actor dies for good.
#[derive(Debug)]
pub(crate) struct Health {
    /// Why the engine died: `(reason, from the actor's own panic)`.
    dead: Mutex<Option<(String, bool)>>,
    watch: tokio::sync::watch::Sender<bool>,
}

impl Health {
    pub(crate) fn new() -> Self {
        Self {
            dead: Mutex::new(None),
            watch: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Marks the engine dead because of what was seen (e.g. the step pipeline
    /// closed); a later [`Self::mark_died`] with the panic itself replaces the reason.
    pub(crate) fn mark_dead(&self, reason: String) {
        self.set(reason, false);
    }

    /// Marks the engine dead: an actor's own panic (the reason that stays).
    pub(crate) fn mark_died(&self, reason: String) {
        self.set(reason, true);
    }

    fn set(&self, reason: String, cause: bool) {
        let mut d = match self.dead.lock() {
            Ok(d) => d,
            Err(p) => p.into_inner(),
        };
        let replace = match &*d {
            None => true,
            Some((_, had_cause)) => cause && !had_cause,
        };
        if replace {
            tracing::error!(%reason, "engine dead");
            *d = Some((reason, cause));
        }
        drop(d);
        self.watch.send_replace(true);
    }

    pub(crate) fn dead_reason(&self) -> Option<String> {
        let d = match self.dead.lock() {
            Ok(d) => d,
            Err(p) => p.into_inner(),
        };
        d.as_ref().map(|(r, _)| r.clone())
    }
}

/// The running engine; clone freely. Dropping every handle stops the engine
/// once in-flight requests end.
#[derive(Clone)]
pub struct EngineHandle {
    inner: Arc<HandleInner>,
}

pub(crate) struct HandleInner {
    pub(crate) submit_tx: Sender<Submission>,
    pub(crate) control: ControlSender,
    pub(crate) next_id: AtomicU64,
    pub(crate) stats: Arc<Mutex<EngineStats>>,
    /// Cancel flags by request id, for [`EngineHandle::abort`] (read once at admission).
    pub(crate) cancels: Mutex<HashMap<u64, std::sync::Weak<AtomicBool>>>,
    pub(crate) validator: Validator,
    pub(crate) model: Arc<Model>,
    pub(crate) config: Config,
    pub(crate) health: Arc<Health>,
    /// Completions open in the output actor (read live by [`EngineHandle::stats`]).
    pub(crate) open_completions: Arc<std::sync::atomic::AtomicUsize>,
    pub(crate) threads: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) draining: AtomicBool,
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
    control: ControlSender,
    /// Completions not finished yet (0 after an error).
    remaining: usize,
    health: Arc<Health>,
}

impl std::fmt::Debug for ControlSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlSender")
    }
}

impl ResponseStream {
    fn on_event(&mut self, e: Option<Event>) -> Option<Event> {
        match e {
            Some(e) => {
                match &e {
                    Event::Finished { .. } => self.remaining = self.remaining.saturating_sub(1),
                    Event::Error(_) => self.remaining = 0,
                    _ => {}
                }
                Some(e)
            }
            // The engine dropped the request without ending it (an actor died):
            // say so once instead of ending silently.
            None if self.remaining > 0 => {
                self.remaining = 0;
                let why = self.health.dead_reason().unwrap_or_else(|| {
                    "the engine stopped before finishing the request".to_string()
                });
                Some(Event::Error(EngineError::Dead(why)))
            }
            None => None,
        }
    }

    /// Next event, blocking the thread (not for use inside an async runtime).
    pub fn blocking_next(&mut self) -> Option<Event> {
        // Every completion ended (or an error came): the request is over.
        if self.remaining == 0 {
            return None;
        }
        let e = self.rx.blocking_recv();
        self.on_event(e)
    }
    /// Next event.
    pub async fn next(&mut self) -> Option<Event> {
        if self.remaining == 0 {
            return None;
        }
        let e = self.rx.recv().await;
        self.on_event(e)
    }
    /// Cancels the request (same as dropping the stream, but keeps receiving).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
        self.control.send(Control::Cancel(self.id));
    }
}

impl Drop for ResponseStream {
    fn drop(&mut self) {
        if self.remaining > 0 {
            self.cancel();
        }
    }
}

impl EngineHandle {
    pub(crate) fn from_inner(inner: HandleInner) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Submits a request; it is validated by the engine's tokenizer actor and
    /// events arrive on the returned stream. Fails at once with
    /// [`EngineError::Overloaded`] when the queue is full.
    pub fn submit(&self, req: GenerateRequest) -> Result<ResponseStream, EngineError> {
        let n = req.params.n.max(1);
        let max_tokens = req.params.max_tokens;
        self.enqueue(SubmissionBody::Raw(req), n, max_tokens)
    }

    /// Submits a request already checked by [`EngineHandle::validator`] (the
    /// HTTP server validates on its blocking pool, then submits).
    pub fn submit_valid(&self, req: ValidRequest) -> Result<ResponseStream, EngineError> {
        let n = req.params.n.max(1);
        let max_tokens = req.params.max_tokens;
        self.enqueue(SubmissionBody::Valid(req), n, max_tokens)
    }

    fn enqueue(
        &self,
        body: SubmissionBody,
        n: usize,
        max_tokens: usize,
    ) -> Result<ResponseStream, EngineError> {
        if let Some(why) = self.inner.health.dead_reason() {
            return Err(EngineError::Dead(why));
        }
        if self.inner.draining.load(Ordering::Relaxed) {
            return Err(EngineError::ShuttingDown);
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        // Room for every event of every completion, so the output actor never
        // blocks; the channel allocates as events arrive, not up front.
        let max_tokens = max_tokens.min(self.inner.validator.info().max_len);
        let cap = n
            .saturating_mul(max_tokens.saturating_add(4))
            .saturating_add(8)
            .min(1 << 22);
        let (tx, rx) = tokio::sync::mpsc::channel(cap);
        let cancel = Arc::new(AtomicBool::new(false));
        let sub = Submission {
            id,
            body,
            tx,
            cancel: cancel.clone(),
            arrival: Instant::now(),
            span: tracing::Span::current(),
        };
        match self.inner.submit_tx.try_send(sub) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(EngineError::Overloaded),
            Err(TrySendError::Disconnected(_)) => {
                return Err(match self.inner.health.dead_reason() {
                    Some(why) => EngineError::Dead(why),
                    None => EngineError::ShuttingDown,
                })
            }
        }
        if let Ok(mut m) = self.inner.cancels.lock() {
            m.retain(|_, w| w.strong_count() > 0);
            m.insert(id, Arc::downgrade(&cancel));
        }
        Ok(ResponseStream {
            id,
            rx,
            cancel,
            control: self.inner.control.clone(),
            remaining: n,
            health: self.inner.health.clone(),
        })
    }

    /// Aborts request `id` (finishes with `abort` within one step).
    pub fn abort(&self, id: u64) {
        if let Ok(m) = self.inner.cancels.lock() {
            if let Some(c) = m.get(&id).and_then(|w| w.upgrade()) {
                c.store(true, Ordering::Relaxed);
            }
        }
        self.inner.control.send(Control::Cancel(id));
    }

    /// A snapshot of running/waiting counts, KV usage, prefix-cache hits, worker busy time.
    pub fn stats(&self) -> EngineStats {
        let mut s = self
            .inner
            .stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        s.open_completions = self.inner.open_completions.load(Ordering::Relaxed);
        s
    }

    /// The request limits (context length, vocabulary, `n`, stop-string bytes).
    pub fn info(&self) -> &EngineInfo {
        self.inner.validator.info()
    }

    /// The one request validator (shared with the tokenizer actor).
    pub fn validator(&self) -> &Validator {
        &self.inner.validator
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        self.inner.validator.tokenizer()
    }

    /// The model.
    pub fn model(&self) -> &Arc<Model> {
        &self.inner.model
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// `Ok` while every actor is alive; the reason once one died for good.
    pub fn health(&self) -> Result<(), String> {
        match self.inner.health.dead_reason() {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    /// Resolves when the engine is dead (never, while it is alive).
    pub async fn dead(&self) {
        let mut rx = self.inner.health.watch.subscribe();
        let _ = rx.wait_for(|d| *d).await; // Err = sender gone: the handle holds it, cannot happen
    }

    /// Stops accepting requests; running ones continue. Idempotent.
    pub fn drain(&self) {
        self.inner.draining.store(true, Ordering::Relaxed);
        self.inner.control.send(Control::Drain);
    }

    /// Cancels every request that is still running or queued.
    pub fn abort_all(&self) {
        if let Ok(m) = self.inner.cancels.lock() {
            for c in m.values().filter_map(|w| w.upgrade()) {
                c.store(true, Ordering::Relaxed);
            }
        }
        self.inner.control.send(Control::CancelAll);
    }

    /// Number of actor threads still running (for tests of supervision and shutdown).
    pub fn live_threads(&self) -> usize {
        self.inner
            .threads
            .lock()
            .map(|t| t.iter().filter(|h| !h.is_finished()).count())
            .unwrap_or(0)
    }
}
