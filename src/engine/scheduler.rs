//! The continuous-batching scheduler: a plain synchronous struct (no threads,
//! channels or clocks), wrapped by the scheduler actor.
//!
//! Every call to [`Scheduler::schedule`] forms one micro-batch:
//!
//! 1. running sequences that are not in flight, oldest first: one decode
//!    token each, or the next prefill chunk (at most `prefill_chunk` tokens)
//!    of a sequence whose prompt is not fully computed;
//! 2. then waiting sequences, in queue order (preempted ones first), admitted
//!    while blocks and the token budget last, reusing cached prefix blocks.
//!
//! Limits: `max_batched_tokens` tokens and `max_seqs` sequences per batch.
//! A sequence is in at most one in-flight batch, so concurrent micro-batches
//! have disjoint sequence sets. When a running sequence needs a block and none
//! is free, the most recently arrived running sequence that is not in flight
//! is preempted: its blocks are freed (full blocks stay in the prefix cache)
//! and it is recomputed later from its prompt and the tokens it had made.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::request::{FinishReason, SamplingParams};
use crate::kv::{KvCacheManager, KvError};

/// Scheduler limits.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Token budget per micro-batch.
    pub max_batched_tokens: usize,
    /// Sequences per micro-batch.
    pub max_seqs: usize,
    /// Longest prefill chunk (0 = only the budget limits it).
    pub prefill_chunk: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks.
    pub num_blocks: usize,
    /// Reuse cached prefix blocks.
    pub prefix_caching: bool,
}

/// Whether a sequence waits for admission or holds blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// In the waiting queue, no blocks.
    Waiting,
    /// Holds blocks; scheduled every step it is not in flight.
    Running,
}

/// One completion being generated.
#[derive(Debug)]
pub struct Sequence {
    /// Unique id of this completion.
    pub id: u64,
    /// Request it belongs to.
    pub request_id: u64,
    /// Completion index within the request.
    pub index: usize,
    /// Prompt followed by generated tokens.
    pub tokens: Vec<u32>,
    /// Prompt length.
    pub num_prompt: usize,
    /// Tokens whose K/V are in the cache.
    pub num_computed: usize,
    /// Prompt tokens served by the prefix cache at the last admission.
    pub num_cached: usize,
    /// Part of an in-flight micro-batch.
    pub in_flight: bool,
    /// Waiting or running.
    pub status: Status,
    /// Admission order (smaller = earlier); preemption picks the largest.
    pub arrival: u64,
    /// Lower runs first among waiting requests.
    pub priority: i32,
    /// Sampling parameters (shared by the request's completions).
    pub params: Arc<SamplingParams>,
    /// Seed of the random stream.
    pub seed: u64,
    /// Hard cap on `tokens.len()` (context length).
    pub max_len: usize,
    /// Set by the caller (or a dropped stream) to cancel the request.
    pub cancelled: Arc<AtomicBool>,
    /// Set when this completion alone must end (a stop string was seen).
    pub stopped: Arc<AtomicBool>,
    /// Times this sequence was preempted.
    pub preemptions: u32,
    /// Token ids that end generation (EOS and friends) unless `ignore_eos`.
    pub eog: Arc<Vec<u32>>,
    /// The prompt, shared with the sampler (prompt log-probabilities, repetition penalty).
    pub prompt: Arc<Vec<u32>>,
    /// Sibling completions (`n > 1`) not yet forked: they are forked from this
    /// sequence when all prompt tokens but the last are computed, sharing its
    /// blocks by reference count; each then computes the last prompt token
    /// itself (copy-on-write of the partial last block) and samples its own
    /// first token.
    pub pending_forks: Vec<Sequence>,
}

impl Sequence {
    /// Generated tokens so far.
    pub fn num_generated(&self) -> usize {
        self.tokens.len() - self.num_prompt
    }
    /// Cancelled by the caller, or stopped by a stop string.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed) || self.stopped.load(Ordering::Relaxed)
    }
    /// Whether the caller asked for prompt log-probabilities.
    pub fn wants_prompt_logprobs(&self) -> bool {
        self.params.prompt_logprobs.is_some()
    }
    /// How far to compute before the next event: one short of the prompt
    /// while siblings wait to be forked, else the whole sequence.
    fn target_len(&self) -> usize {
        if !self.pending_forks.is_empty() {
            self.num_prompt.saturating_sub(1)
        } else {
            self.tokens.len()
        }
    }
}

/// One sequence's part of a micro-batch.
#[derive(Clone, Debug)]
pub struct ScheduledChunk {
    /// Sequence id.
    pub seq_id: u64,
    /// Position of the first token.
    pub pos: usize,
    /// Tokens to compute (`tokens[pos..pos + len]`).
    pub tokens: Vec<u32>,
    /// Block table covering `0..pos + len`.
    pub block_table: Vec<u32>,
    /// The chunk ends at the sequence's last token: sample the next one.
    pub sample: bool,
    /// Logits wanted for every row (prompt log-probabilities), not only the last.
    pub all_logits: bool,
    /// What the sampler needs (present when `sample` or `all_logits`).
    pub ctx: Option<SampleCtx>,
}

/// Everything the (stateless) sampler needs to pick a sequence's next token.
#[derive(Clone, Debug)]
pub struct SampleCtx {
    /// Sampling parameters.
    pub params: Arc<SamplingParams>,
    /// Seed of the random stream.
    pub seed: u64,
    /// Completion index (keys the random stream).
    pub index: usize,
    /// The prompt.
    pub prompt: Arc<Vec<u32>>,
    /// Generated tokens so far (filled only when a penalty needs them).
    pub output: Vec<u32>,
    /// Whether end-of-generation / stop tokens must be masked (`min_tokens` not reached).
    pub mask_stop: bool,
    /// End-of-generation ids.
    pub eog: Arc<Vec<u32>>,
}

/// One scheduling step's output: the micro-batch to run (vLLM's `SchedulerOutput`).
#[derive(Clone, Debug, Default)]
pub struct SchedulerOutput {
    /// Step number.
    pub step_id: u64,
    /// Sequence chunks, in row order.
    pub chunks: Vec<ScheduledChunk>,
    /// Block copies `(src, dst)` every worker applies before computing
    /// (copy-on-write of shared partial blocks after a fork).
    pub copies: Vec<(u32, u32)>,
}

impl SchedulerOutput {
    /// Total rows.
    pub fn num_tokens(&self) -> usize {
        self.chunks.iter().map(|c| c.tokens.len()).sum()
    }
}

/// What happened to a sequence: when a micro-batch came back
/// ([`Scheduler::update_from_output`]), or when the scheduler failed it
/// ([`Scheduler::take_failed`], [`Scheduler::fail_batch`]).
#[derive(Clone, Debug, PartialEq)]
pub struct SeqUpdate {
    /// Sequence id.
    pub seq_id: u64,
    /// The sampled token, if the chunk sampled one.
    pub token: Option<u32>,
    /// Set when the sequence ended (its blocks are already freed).
    pub finish: Option<FinishReason>,
    /// Prompt tokens served by the prefix cache (for usage).
    pub num_cached: usize,
    /// Why the sequence failed; set exactly when `finish` is [`FinishReason::Error`].
    pub error: Option<SchedulerError>,
}

impl SeqUpdate {
    fn failed(seq_id: u64, num_cached: usize, error: SchedulerError) -> Self {
        Self { seq_id, token: None, finish: Some(FinishReason::Error), num_cached, error: Some(error) }
    }
}

/// A bookkeeping bug that failed one sequence (logged at error level, reported in a
/// [`SeqUpdate`] with [`FinishReason::Error`]). "No free blocks" is never one of these:
/// that makes a sequence wait or preempts another.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    /// The KV manager rejected an operation on the sequence's blocks.
    #[error("KV cache bookkeeping failed in `{op}` for sequence {seq_id}: {source}")]
    Kv {
        /// Sequence whose blocks were operated on (the parent, for a sibling not yet forked).
        seq_id: u64,
        /// The KV manager call.
        op: &'static str,
        /// What the KV manager said.
        source: KvError,
    },
    /// A returned micro-batch holds a sequence that is not in flight.
    #[error("micro-batch {step_id} returned sequence {seq_id}, which is not in flight")]
    NotInFlight {
        /// The micro-batch.
        step_id: u64,
        /// The sequence.
        seq_id: u64,
    },
    /// A chunk that had to sample came back without a token.
    #[error("micro-batch {step_id} returned no sampled token for sequence {seq_id}")]
    NoSampledToken {
        /// The micro-batch.
        step_id: u64,
        /// The sequence.
        seq_id: u64,
    },
    /// The micro-batch holding the sequence failed (e.g. a worker panicked).
    #[error("micro-batch {step_id} failed: {reason}")]
    StepFailed {
        /// The micro-batch.
        step_id: u64,
        /// What the caller of [`Scheduler::fail_batch`] reported.
        reason: String,
    },
}

/// Counters for stats and metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct SchedulerCounters {
    /// Preemptions so far.
    pub preemptions: u64,
    /// Micro-batches formed.
    pub steps: u64,
    /// Prompt tokens computed (not served from cache).
    pub prefill_tokens: u64,
    /// Decode tokens computed.
    pub decode_tokens: u64,
}

/// The scheduler.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    /// Block metadata (tables, ref counts, prefix cache).
    pub kv: KvCacheManager,
    seqs: HashMap<u64, Sequence>,
    waiting: VecDeque<u64>,
    running: Vec<u64>,
    next_step: u64,
    /// Sequences failed by `schedule` since the last `take_failed`.
    failed: Vec<SeqUpdate>,
    /// Counters.
    pub counters: SchedulerCounters,
}

impl Scheduler {
    /// An empty scheduler over `cfg.num_blocks` blocks.
    pub fn new(cfg: SchedulerConfig) -> Result<Self, KvError> {
        let kv = KvCacheManager::new(cfg.num_blocks, cfg.block_size, cfg.prefix_caching)?;
        Ok(Self {
            cfg,
            kv,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_step: 0,
            failed: Vec::new(),
            counters: SchedulerCounters::default(),
        })
    }

    /// Queues a new sequence (status Waiting). Ordered by priority, then arrival.
    pub fn add(&mut self, mut seq: Sequence) {
        seq.status = Status::Waiting;
        let pos = self
            .waiting
            .iter()
            .position(|id| self.seqs.get(id).is_some_and(|s| s.priority > seq.priority))
            .unwrap_or(self.waiting.len());
        self.waiting.insert(pos, seq.id);
        self.seqs.insert(seq.id, seq);
    }

    /// The sequence `id`, if known.
    pub fn get(&self, id: u64) -> Option<&Sequence> {
        self.seqs.get(&id)
    }

    /// Running sequences (holding blocks).
    pub fn num_running(&self) -> usize {
        self.running.len()
    }
    /// Waiting sequences.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }
    /// Any sequence at all.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Removes and returns cancelled sequences that are not in flight
    /// (their blocks are freed). In-flight ones are collected when their batch returns.
    pub fn reap_cancelled(&mut self) -> Vec<Sequence> {
        let ids: Vec<u64> = self
            .seqs
            .values()
            .filter(|s| !s.in_flight && s.is_cancelled())
            .map(|s| s.id)
            .collect();
        let mut out = Vec::new();
        for id in ids {
            if let Some(mut s) = self.remove(id) {
                out.append(&mut s.pending_forks);
                out.push(s);
            }
        }
        out
    }

    /// Sequences that [`Self::schedule`] failed since the last call (a KV bookkeeping
    /// bug: each already logged at error level, removed, its blocks freed), each with
    /// [`FinishReason::Error`] and the error. The caller sends each an error event.
    pub fn take_failed(&mut self) -> Vec<SeqUpdate> {
        std::mem::take(&mut self.failed)
    }

    /// Fails every sequence of in-flight micro-batch `batch` (its step could not run,
    /// e.g. a worker panicked): each is removed and its blocks are freed without
    /// registering anything computed in that step. Returns one [`FinishReason::Error`]
    /// update per sequence (siblings not yet forked included). Sequences of other
    /// batches are untouched (batches hold disjoint sequences).
    pub fn fail_batch(&mut self, batch: &SchedulerOutput, reason: &str) -> Vec<SeqUpdate> {
        let mut updates = Vec::with_capacity(batch.chunks.len());
        for c in &batch.chunks {
            let error = SchedulerError::StepFailed { step_id: batch.step_id, reason: reason.to_owned() };
            if self.seqs.get(&c.seq_id).is_some_and(|s| s.in_flight) {
                updates.extend(self.fail(c.seq_id, error));
            } else {
                tracing::error!(step = batch.step_id, seq_id = c.seq_id, "failed micro-batch holds a sequence not in flight");
            }
        }
        updates
    }

    /// Removes a sequence that is not in flight, freeing its blocks.
    fn remove(&mut self, id: u64) -> Option<Sequence> {
        if self.seqs.get(&id)?.in_flight {
            return None;
        }
        let seq = self.seqs.remove(&id)?;
        match seq.status {
            Status::Running => {
                if let Err(e) = self.kv.free(id) {
                    // The sequence ends anyway; its table is gone, so nothing is left to retry.
                    tracing::error!(seq_id = id, error = %e, "KV cache bookkeeping bug while freeing a finished sequence");
                }
                self.running.retain(|&r| r != id);
            }
            Status::Waiting => self.waiting.retain(|&w| w != id),
        }
        Some(seq)
    }

    /// Fails sequence `id` loudly (error log, one [`FinishReason::Error`] update for it and
    /// one per sibling not yet forked), removing it and freeing whatever blocks it holds.
    fn fail(&mut self, id: u64, error: SchedulerError) -> Vec<SeqUpdate> {
        tracing::error!(seq_id = id, error = %error, "failing the sequence");
        let Some(mut seq) = self.seqs.remove(&id) else {
            return vec![SeqUpdate::failed(id, 0, error)];
        };
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&w| w != id);
        if self.kv.contains(id) {
            if let Err(e) = self.kv.free(id) {
                tracing::error!(seq_id = id, error = %e, "KV cache bookkeeping bug while freeing a failed sequence");
            }
        }
        let mut out: Vec<SeqUpdate> = seq
            .pending_forks
            .drain(..)
            .map(|child| SeqUpdate::failed(child.id, child.num_cached, error.clone()))
            .collect();
        out.push(SeqUpdate::failed(id, seq.num_cached, error));
        out
    }

    /// Fails `id` from inside [`Self::schedule`]: reported by [`Self::take_failed`].
    fn fail_in_schedule(&mut self, id: u64, op: &'static str, source: KvError) {
        let updates = self.fail(id, SchedulerError::Kv { seq_id: id, op, source });
        self.failed.extend(updates);
    }

    /// Preempts running sequence `id` (not in flight): frees its blocks and
    /// puts it at the front of the waiting queue for recompute.
    fn preempt(&mut self, id: u64) {
        if let Err(e) = self.kv.free(id) {
            self.fail_in_schedule(id, "free", e);
            return;
        }
        self.running.retain(|&r| r != id);
        if let Some(s) = self.seqs.get_mut(&id) {
            s.status = Status::Waiting;
            s.num_computed = 0;
            s.preemptions += 1;
        }
        self.waiting.push_front(id);
        self.counters.preemptions += 1;
    }

    fn chunk_len(&self, remaining: usize, budget: usize) -> usize {
        let n = remaining.min(budget);
        if self.cfg.prefill_chunk > 0 {
            n.min(self.cfg.prefill_chunk)
        } else {
            n
        }
    }

    /// Forms the next micro-batch, or `None` when nothing can run now. Sequences it
    /// had to fail (bookkeeping bugs) are collected by [`Self::take_failed`], also when
    /// it returns `None`.
    pub fn schedule(&mut self) -> Option<SchedulerOutput> {
        let mut budget = self.cfg.max_batched_tokens;
        let mut chunks = Vec::new();
        let mut copies = Vec::new();

        // 1. Running sequences, oldest first.
        let mut order: Vec<u64> = self.running.clone();
        order.sort_by_key(|id| self.seqs.get(id).map_or(u64::MAX, |s| s.arrival));
        let mut i = 0;
        while let Some(&id) = order.get(i) {
            i += 1;
            if budget == 0 || chunks.len() >= self.cfg.max_seqs {
                break;
            }
            let Some(s) = self.seqs.get(&id) else { continue };
            if s.in_flight || s.status != Status::Running || s.is_cancelled() {
                continue;
            }
            if s.num_computed == s.target_len() && !s.pending_forks.is_empty() {
                // Fork the siblings now: they share every block computed so far.
                let children = self.fork_children(id);
                order.extend(children);
            }
            let Some(s) = self.seqs.get(&id) else { continue };
            let remaining = s.target_len().saturating_sub(s.num_computed);
            if remaining == 0 {
                continue;
            }
            let n = self.chunk_len(remaining, budget);
            let need = s.num_computed + n;
            match self.make_room(id, need, &mut copies) {
                Ok(true) => {}
                Ok(false) => continue, // preempted itself, or nothing left to preempt
                Err(e) => {
                    self.fail_in_schedule(id, "allocate_slots", e);
                    continue;
                }
            }
            if self.push_chunk(id, n, &mut chunks) {
                budget -= n;
            }
        }

        // 2. Waiting sequences, in queue order.
        while budget > 0 && chunks.len() < self.cfg.max_seqs {
            let Some(&id) = self.waiting.front() else { break };
            let Some(s) = self.seqs.get(&id) else {
                self.waiting.pop_front();
                continue;
            };
            let (computed, num_cached) = if self.cfg.prefix_caching && !s.wants_prompt_logprobs() {
                self.kv.get_computed_blocks(&s.tokens)
            } else {
                (Vec::new(), 0)
            };
            // Nothing to compute when everything up to the fork point is cached.
            let target = s.target_len();
            let n = if num_cached >= target { 0 } else { self.chunk_len(target - num_cached, budget) };
            match self.kv.allocate(id, num_cached + n, computed) {
                Ok(true) => {}
                Ok(false) => break, // no room: the queue head waits, and so does everyone behind it
                Err(e) => {
                    self.fail_in_schedule(id, "allocate", e);
                    continue;
                }
            }
            self.waiting.pop_front();
            self.running.push(id);
            if let Some(s) = self.seqs.get_mut(&id) {
                s.status = Status::Running;
                s.num_computed = num_cached;
                // Usage reports the cache hits of the first admission.
                if s.num_generated() == 0 || s.preemptions == 0 {
                    s.num_cached = num_cached;
                }
            }
            if n > 0 && self.push_chunk(id, n, &mut chunks) {
                budget -= n;
            }
        }

        if chunks.is_empty() {
            return None;
        }
        for c in &chunks {
            let n = c.tokens.len() as u64;
            match self.seqs.get(&c.seq_id) {
                Some(s) if c.pos + c.tokens.len() <= s.num_prompt => self.counters.prefill_tokens += n,
                _ => self.counters.decode_tokens += n,
            }
        }
        let step_id = self.next_step;
        self.next_step += 1;
        self.counters.steps += 1;
        Some(SchedulerOutput { step_id, chunks, copies })
    }

    /// Gives `id` private copies of the shared blocks it will write and room for `need`
    /// tokens, preempting the latest arrivals (not in flight) while blocks are short.
    /// `Ok(false)`: `id` itself was preempted or nobody is left to preempt.
    fn make_room(&mut self, id: u64, need: usize, copies: &mut Vec<(u32, u32)>) -> Result<bool, KvError> {
        loop {
            if self.kv.allocate_slots(id, need, copies)? {
                return Ok(true);
            }
            let victim = self
                .running
                .iter()
                .filter_map(|r| self.seqs.get(r))
                .filter(|v| !v.in_flight)
                .max_by_key(|v| v.arrival)
                .map(|v| v.id);
            let Some(v) = victim else { return Ok(false) };
            self.preempt(v);
            if v == id {
                return Ok(false);
            }
        }
    }

    /// Forks the pending siblings of `parent`; returns their ids. A sibling whose fork
    /// the KV manager rejects is failed.
    fn fork_children(&mut self, parent: u64) -> Vec<u64> {
        let Some(p) = self.seqs.get_mut(&parent) else { return Vec::new() };
        let children = std::mem::take(&mut p.pending_forks);
        let computed = p.num_computed;
        let cached = p.num_cached;
        let mut ids = Vec::new();
        for mut c in children {
            if let Err(e) = self.kv.fork(parent, c.id) {
                let error = SchedulerError::Kv { seq_id: c.id, op: "fork", source: e };
                tracing::error!(seq_id = c.id, parent, error = %error, "failing the sequence");
                self.failed.push(SeqUpdate::failed(c.id, cached, error));
                continue;
            }
            c.status = Status::Running;
            c.num_computed = computed;
            c.num_cached = cached;
            ids.push(c.id);
            self.running.push(c.id);
            self.seqs.insert(c.id, c);
        }
        ids
    }

    /// Appends `id`'s next chunk of `n` tokens to `chunks` and marks it in flight (so it
    /// cannot be preempted later in this step); false if the sequence had to be failed.
    fn push_chunk(&mut self, id: u64, n: usize, chunks: &mut Vec<ScheduledChunk>) -> bool {
        match self.make_chunk(id, n) {
            Some(c) => {
                chunks.push(c);
                if let Some(s) = self.seqs.get_mut(&id) {
                    s.in_flight = true;
                }
                true
            }
            None => {
                self.fail_in_schedule(id, "block_table", KvError::UnknownSeq(id));
                false
            }
        }
    }

    /// The chunk `tokens[num_computed..num_computed + n]` of `id`; `None` if the sequence,
    /// its block table or those tokens are missing (a bookkeeping bug).
    fn make_chunk(&self, id: u64, n: usize) -> Option<ScheduledChunk> {
        let s = self.seqs.get(&id)?;
        let pos = s.num_computed;
        let tokens = s.tokens.get(pos..pos + n)?.to_vec();
        let block_table = self.kv.block_table(id)?.to_vec();
        let sample = pos + n == s.tokens.len() && s.params.max_tokens > 0;
        let all_logits = s.wants_prompt_logprobs() && pos < s.num_prompt;
        let ctx = (sample || all_logits).then(|| {
            let p = &s.params;
            let penalties = p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 || p.repetition_penalty != 1.0;
            SampleCtx {
                params: p.clone(),
                seed: s.seed,
                index: s.index,
                prompt: s.prompt.clone(),
                output: if penalties { s.tokens[s.num_prompt..].to_vec() } else { Vec::new() },
                mask_stop: s.num_generated() < p.min_tokens,
                eog: s.eog.clone(),
            }
        });
        Some(ScheduledChunk { seq_id: id, pos, tokens, block_table, sample, all_logits, ctx })
    }

    /// Applies a returned micro-batch: advances computed counts, appends
    /// sampled tokens (`sampled[i]` for chunk `i`), detects finished
    /// sequences and frees their blocks. Cancelled sequences finish with `Abort`;
    /// a chunk that cannot be applied (bookkeeping bug) fails its sequence with `Error`.
    pub fn update_from_output(&mut self, batch: &SchedulerOutput, sampled: &[Option<u32>]) -> Vec<SeqUpdate> {
        let mut updates = Vec::with_capacity(batch.chunks.len());
        for (i, c) in batch.chunks.iter().enumerate() {
            let token = sampled.get(i).copied().flatten();
            self.apply_chunk(batch.step_id, c, token, &mut updates);
        }
        updates
    }

    /// [`Self::update_from_output`] for one chunk.
    fn apply_chunk(&mut self, step_id: u64, c: &ScheduledChunk, token: Option<u32>, updates: &mut Vec<SeqUpdate>) {
        let id = c.seq_id;
        let Some(s) = self.seqs.get_mut(&id).filter(|s| s.in_flight) else {
            updates.extend(self.fail(id, SchedulerError::NotInFlight { step_id, seq_id: id }));
            return;
        };
        s.in_flight = false;
        let computed = c.pos + c.tokens.len();
        s.num_computed = computed;
        let mut finish = None;
        let mut new_token = None;
        if s.is_cancelled() {
            finish = Some(FinishReason::Abort);
        } else if c.sample {
            let Some(t) = token else {
                updates.extend(self.fail(id, SchedulerError::NoSampledToken { step_id, seq_id: id }));
                return;
            };
            s.tokens.push(t);
            new_token = Some(t);
            let p = &s.params;
            // Stop tokens are masked while `min_tokens` is not reached (`SampleCtx::mask_stop`),
            // so a sampled one always ends the completion.
            if (!p.ignore_eos && s.eog.contains(&t)) || p.stop_token_ids.contains(&t) {
                finish = Some(FinishReason::Stop);
            } else if s.num_generated() >= p.max_tokens || s.tokens.len() >= s.max_len {
                finish = Some(FinishReason::Length);
            }
        }
        if finish.is_none() && s.params.max_tokens == 0 && computed == s.tokens.len() {
            finish = Some(FinishReason::Length);
        }
        let num_cached = s.num_cached;
        // Only computed tokens (the sampled one has no K/V yet).
        let committed = match s.tokens.get(..computed) {
            Some(tokens) => self.kv.commit_full_blocks(id, tokens),
            None => Err(KvError::ComputedBeyondAllocation { seq: id, got: computed, max: s.tokens.len() }),
        };
        if let Err(e) = committed {
            updates.extend(self.fail(id, SchedulerError::Kv { seq_id: id, op: "commit_full_blocks", source: e }));
            return;
        }
        if finish.is_some() {
            if let Some(mut removed) = self.remove(id) {
                for child in removed.pending_forks.drain(..) {
                    updates.push(SeqUpdate {
                        seq_id: child.id,
                        token: None,
                        finish: Some(FinishReason::Abort),
                        num_cached: child.num_cached,
                        error: None,
                    });
                }
            }
        }
        updates.push(SeqUpdate { seq_id: id, token: new_token, finish, num_cached, error: None });
    }
}
