//! The continuous-batching scheduler: a plain synchronous struct (no threads,
//! channels or clocks), wrapped by the scheduler actor. It owns the sequences, the
//! waiting/running queues and the KV block metadata ([`KvCacheManager`]); not the
//! K/V data (workers), sampling (the sampler) or detokenization (the output actor).
//!
//! Every call to [`Scheduler::schedule`] forms one micro-batch:
//!
//! 1. running sequences that are not in flight, oldest first: one decode
//!    token each, or the next prefill chunk (at most `prefill_chunk` tokens)
//!    of a sequence whose prompt is not fully computed;
//! 2. then waiting sequences, in queue order (priority, then arrival; preempted
//!    ones first), admitted while blocks and the token budget last, reusing cached
//!    prefix blocks. A head that does not fit blocks everyone behind it (FCFS).
//!    With `admission_reserve` > 0 a head also waits while the free blocks
//!    would not cover the next `admission_reserve` tokens (up to `max_tokens`)
//!    of every running sequence and its own: admitted work is then not
//!    preempted for newcomers.
//!
//! Limits: `max_batched_tokens` tokens and `max_seqs` sequences per batch.
//! A sequence is in at most one in-flight batch (it is marked in flight as soon
//! as its chunk is formed), so concurrent micro-batches have disjoint sequence
//! sets. When a running sequence needs a block and none is free, the most
//! recently arrived running sequence that is not in flight (nor already in this
//! batch) is preempted: its blocks are freed (full blocks stay in the prefix
//! cache) and it is recomputed later from its prompt and the tokens it had made.
//!
//! `n > 1`: the siblings ride on the first completion as `pending_forks` until
//! all prompt tokens but the last are computed, then fork its blocks (reference
//! counts) and each computes the last prompt token itself, after a copy-on-write
//! of the shared partial block (the `copies` of [`SchedulerOutput`]).
//!
//! "No room" and "bug" are different results. No free blocks makes a sequence
//! wait or preempts another; a KV manager error (a bookkeeping bug) fails that
//! one sequence loudly: an error log, a [`SeqUpdate`] with
//! [`FinishReason::Error`] and a [`SchedulerError`] (from
//! [`Scheduler::update_from_output`], or [`Scheduler::take_failed`] for those
//! failed while scheduling), its blocks freed. It never turns into a silent wait.
//!
//! Feedback: [`Scheduler::update_from_output`] applies a returned micro-batch
//! (micro-batches may return in any order); [`Scheduler::fail_batch`] fails the
//! sequences of one that cannot return (e.g. its worker panicked).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::request::{FinishReason, SamplingParams};
use super::spec::{self, SpecState, StepCost};
use crate::config::SpeculativeConfig;
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
    /// Most background sequences per micro-batch while an interactive one is
    /// running or waiting (0 = no limit).
    pub background_rows: usize,
    /// Admission headroom in tokens: a waiting sequence is admitted only if the
    /// free blocks also cover, for it and for every running sequence, the rest
    /// of its prompt and its next `admission_reserve` tokens (never past its
    /// `max_tokens` or the context length), so admitting it does not preempt
    /// the sequences already running. Up to that horizon nothing is preempted;
    /// a lone sequence is always admitted. 0 = admit on the prompt alone
    /// (preempt when the cache runs out, vLLM's policy).
    pub admission_reserve: usize,
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
    /// Background work: after every interactive sequence in the queues, and at
    /// most `background_rows` per micro-batch while one is in the engine.
    pub background: bool,
    /// Sampling parameters (shared by the request's completions).
    pub params: Arc<SamplingParams>,
    /// Seed of the random stream.
    pub seed: u64,
    /// Hard cap on `tokens.len()` (context length).
    pub max_len: usize,
    /// Cancelled (by the caller, a dropped stream, a stop string or a failure):
    /// removed when not in flight, finished as `Abort` when its batch returns.
    pub cancelled: bool,
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
    /// Speculative decoding: acceptance EWMA and cooldown ([`super::spec`]).
    pub spec: SpecState,
}

impl Sequence {
    /// Generated tokens so far.
    pub fn num_generated(&self) -> usize {
        self.tokens.len() - self.num_prompt
    }
    /// Cancelled by the caller, stopped by a stop string, or failed.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled
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
    /// Tokens to compute (`tokens[pos..pos + len]`), then the `draft` proposed tokens.
    pub tokens: Vec<u32>,
    /// Speculative decoding: the last `draft` entries of `tokens` are proposals
    /// (not yet in the sequence); every row from the sequence's last token on
    /// gets logits and samples, and the sampler returns the accepted drafts plus
    /// one token ([`super::spec`]). 0 for every other chunk.
    pub draft: usize,
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
    /// Every worker drops its physical K/V first (idle release: no sequence
    /// holds a block; set only on an output without chunks).
    pub reset_kv: bool,
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
        Self {
            seq_id,
            token: None,
            finish: Some(FinishReason::Error),
            num_cached,
            error: Some(error),
        }
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
    /// Decode tokens computed (rows: speculative drafts included).
    pub decode_tokens: u64,
    /// Tokens per micro-batch, bucketed (the `iteration_tokens_total` histogram).
    pub iteration_tokens: IterationTokens,
    /// Speculative decoding: verify chunks (a decode step carrying drafts).
    pub spec_steps: u64,
    /// Draft tokens proposed in those chunks.
    pub spec_draft_tokens: u64,
    /// Draft tokens accepted.
    pub spec_accepted_tokens: u64,
}

/// Upper bounds of the [`IterationTokens`] buckets (vLLM's `iteration_tokens_total`);
/// steps above the last fall in the overflow bucket (`+Inf`).
pub const ITERATION_TOKEN_BUCKETS: [usize; 13] = [
    1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
];

/// A histogram of tokens per micro-batch: per-bucket (not cumulative) counts,
/// the number of steps and the token sum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct IterationTokens {
    /// Steps whose token count is <= `ITERATION_TOKEN_BUCKETS[i]` and above the previous bound.
    pub counts: [u64; ITERATION_TOKEN_BUCKETS.len()],
    /// Steps in all (including those above the last bound).
    pub count: u64,
    /// Tokens over all steps.
    pub sum: u64,
}

impl IterationTokens {
    /// Counts one step of `n` tokens.
    pub fn observe(&mut self, n: usize) {
        if let Some(i) = ITERATION_TOKEN_BUCKETS.iter().position(|&ub| n <= ub) {
            self.counts[i] += 1;
        }
        self.count += 1;
        self.sum += n as u64;
    }
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
    /// Prefix-cache statistics of KV managers replaced by [`Self::reset_kv`].
    stats_offset: (u64, u64),
    /// Speculative decoding settings (off unless [`Self::set_speculation`]).
    spec: SpeculativeConfig,
    /// Measured cost of decode steps by rows: prices a verify row.
    step_cost: StepCost,
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
            stats_offset: (0, 0),
            spec: SpeculativeConfig::off(),
            step_cost: StepCost::default(),
        })
    }

    /// Turns n-gram speculative decoding on or off ([`super::spec`]).
    pub fn set_speculation(&mut self, cfg: SpeculativeConfig) {
        self.spec = cfg;
    }

    /// Records what a finished step cost (every stage's compute and the
    /// sampler's, queueing excluded): decode-only steps (every chunk one
    /// sampled row plus its drafts) price speculative verify rows.
    pub fn observe_step_cost(&mut self, batch: &SchedulerOutput, service: std::time::Duration) {
        let decode_only = !batch.chunks.is_empty()
            && batch
                .chunks
                .iter()
                .all(|c| c.sample && !c.all_logits && c.tokens.len() == 1 + c.draft);
        if decode_only {
            self.step_cost
                .observe(batch.num_tokens(), service.as_secs_f64());
        }
    }

    /// The measured cost of one more row of a decode step relative to its fixed
    /// cost ([`StepCost::row_ratio`]).
    pub fn verify_row_ratio(&self) -> f64 {
        self.step_cost.row_ratio()
    }

    /// Queues a new sequence (status Waiting). Ordered by class (interactive
    /// first), priority, then arrival.
    pub fn add(&mut self, mut seq: Sequence) {
        seq.status = Status::Waiting;
        let key = (seq.background, seq.priority);
        let pos = self
            .waiting
            .iter()
            .position(|id| {
                self.seqs
                    .get(id)
                    .is_some_and(|s| (s.background, s.priority) > key)
            })
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

    /// A step id for an output that is not a micro-batch of sequences (the idle release).
    pub fn next_step_id(&mut self) -> u64 {
        let id = self.next_step;
        self.next_step += 1;
        id
    }

    /// Cancels every sequence of request `request_id`: those not in flight are
    /// removed (blocks freed) and returned with their unforked siblings;
    /// in-flight ones end as `Abort` when their micro-batch returns.
    pub fn cancel_request(&mut self, request_id: u64) -> Vec<Sequence> {
        let ids: Vec<u64> = self
            .seqs
            .values()
            .filter(|s| s.request_id == request_id)
            .map(|s| s.id)
            .collect();
        self.cancel_ids(ids)
    }

    /// Cancels one completion (a stop string ended it), as [`Self::cancel_request`].
    pub fn cancel_seq(&mut self, seq_id: u64) -> Vec<Sequence> {
        self.cancel_ids(vec![seq_id])
    }

    /// Cancels everything (shutdown), as [`Self::cancel_request`].
    pub fn cancel_all(&mut self) -> Vec<Sequence> {
        let ids: Vec<u64> = self.seqs.keys().copied().collect();
        self.cancel_ids(ids)
    }

    fn cancel_ids(&mut self, ids: Vec<u64>) -> Vec<Sequence> {
        let mut out = Vec::new();
        for id in ids {
            if let Some(s) = self.seqs.get_mut(&id) {
                s.cancelled = true;
            }
            if let Some(mut s) = self.remove(id) {
                out.append(&mut s.pending_forks);
                out.push(s);
            }
        }
        out
    }

    /// Request ids of every sequence held (running, waiting or in flight).
    pub fn request_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.seqs.values().map(|s| s.request_id).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Forgets every cached block (the idle release). Only when no sequence is
    /// held; prefix statistics are kept. Returns whether it reset.
    pub fn reset_kv(&mut self) -> Result<bool, KvError> {
        if !self.seqs.is_empty() {
            return Ok(false);
        }
        let st = self.kv.stats();
        self.stats_offset.0 += st.prefix_query_tokens;
        self.stats_offset.1 += st.prefix_hit_tokens;
        self.kv = KvCacheManager::new(
            self.cfg.num_blocks,
            self.cfg.block_size,
            self.cfg.prefix_caching,
        )?;
        Ok(true)
    }

    /// Prompt tokens looked up in / found in the prefix cache since start.
    pub fn prefix_stats(&self) -> (u64, u64) {
        let st = self.kv.stats();
        (
            st.prefix_query_tokens + self.stats_offset.0,
            st.prefix_hit_tokens + self.stats_offset.1,
        )
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
            let error = SchedulerError::StepFailed {
                step_id: batch.step_id,
                reason: reason.to_owned(),
            };
            if self.seqs.get(&c.seq_id).is_some_and(|s| s.in_flight) {
                updates.extend(self.fail(c.seq_id, error));
            } else {
                tracing::error!(
                    step = batch.step_id,
                    seq_id = c.seq_id,
                    "failed micro-batch holds a sequence not in flight"
                );
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
        let updates = self.fail(
            id,
            SchedulerError::Kv {
                seq_id: id,
                op,
                source,
            },
        );
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
    ///
    /// A pass can admit sequences with nothing to compute yet (every token up to
    /// the fork point is cached, or the fork point is 0): the next pass forks or
    /// runs them, so passes repeat while they admit without producing a batch —
    /// `None` then really means "nothing can run until something changes", and
    /// the actor may sleep.
    pub fn schedule(&mut self) -> Option<SchedulerOutput> {
        // Bounded: each repeat admits or forks at least one sequence.
        for _ in 0..self.seqs.len() + 2 {
            let running_before = self.running.len();
            let waiting_before = self.waiting.len();
            if let Some(out) = self.schedule_pass() {
                return Some(out);
            }
            if self.running.len() == running_before && self.waiting.len() == waiting_before {
                return None;
            }
        }
        None
    }

    fn schedule_pass(&mut self) -> Option<SchedulerOutput> {
        let mut budget = self.cfg.max_batched_tokens;
        let mut chunks = Vec::new();
        let mut copies = Vec::new();

        // Background rows left in this micro-batch: capped while any
        // interactive sequence is in the engine (running or waiting).
        let mut bg_left = if self.cfg.background_rows > 0
            && self.seqs.values().any(|s| !s.background && !s.cancelled)
        {
            self.cfg.background_rows
        } else {
            usize::MAX
        };

        // 1. Running sequences: interactive first, then background; oldest first in each.
        let mut order: Vec<u64> = self.running.clone();
        order.sort_by_key(|id| {
            self.seqs
                .get(id)
                .map_or((true, u64::MAX), |s| (s.background, s.arrival))
        });
        let mut i = 0;
        while let Some(&id) = order.get(i) {
            i += 1;
            if budget == 0 || chunks.len() >= self.cfg.max_seqs {
                break;
            }
            let Some(s) = self.seqs.get(&id) else {
                continue;
            };
            if s.in_flight || s.status != Status::Running || s.is_cancelled() {
                continue;
            }
            if s.num_computed == s.target_len() && !s.pending_forks.is_empty() {
                // Fork the siblings now: they share every block computed so far.
                let children = self.fork_children(id);
                order.extend(children);
            }
            let Some(s) = self.seqs.get(&id) else {
                continue;
            };
            let remaining = s.target_len().saturating_sub(s.num_computed);
            if remaining == 0 {
                continue;
            }
            if s.background {
                if bg_left == 0 {
                    continue;
                }
                bg_left -= 1;
            }
            let n = self.chunk_len(remaining, budget);
            let need = s.num_computed + n;
            let mut draft = self.draft_for(id, n, budget);
            if !draft.is_empty() {
                // Room for the drafts only if free blocks allow it: never preempt for them.
                match self.kv.allocate_slots(id, need + draft.len(), &mut copies) {
                    Ok(true) => {}
                    Ok(false) => draft.clear(),
                    Err(e) => {
                        self.fail_in_schedule(id, "allocate_slots", e);
                        continue;
                    }
                }
            }
            if draft.is_empty() {
                match self.make_room(id, need, &mut copies) {
                    Ok(true) => {}
                    Ok(false) => continue, // preempted itself, or nothing left to preempt
                    Err(e) => {
                        self.fail_in_schedule(id, "allocate_slots", e);
                        continue;
                    }
                }
            }
            let rows = n + draft.len();
            if self.push_chunk(id, n, draft, &mut chunks) {
                budget -= rows;
            }
        }

        // 2. Waiting sequences, in queue order (background ones last).
        while budget > 0 && chunks.len() < self.cfg.max_seqs {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let Some(s) = self.seqs.get(&id) else {
                self.waiting.pop_front();
                continue;
            };
            if s.background {
                if bg_left == 0 {
                    break; // every sequence behind it is background too
                }
                bg_left -= 1;
            }
            // Headroom: the running sequences' reserves and this one's whole reserve
            // (cached prefix blocks counted too: they may be free-list blocks).
            if self.cfg.admission_reserve > 0
                && !self.running.is_empty()
                && self.reserved_blocks() + self.reserve_blocks(s, 0) > self.kv.num_free_blocks()
            {
                break;
            }
            let (computed, num_cached) = if self.cfg.prefix_caching && !s.wants_prompt_logprobs() {
                self.kv.get_computed_blocks(&s.tokens)
            } else {
                (Vec::new(), 0)
            };
            // Nothing to compute when everything up to the fork point is cached.
            let target = s.target_len();
            let n = if num_cached >= target {
                0
            } else {
                self.chunk_len(target - num_cached, budget)
            };
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
            if n > 0 && self.push_chunk(id, n, Vec::new(), &mut chunks) {
                budget -= n;
            }
        }

        if chunks.is_empty() {
            return None;
        }
        for c in &chunks {
            let n = c.tokens.len() as u64;
            if c.draft > 0 {
                self.counters.spec_steps += 1;
                self.counters.spec_draft_tokens += c.draft as u64;
            }
            match self.seqs.get(&c.seq_id) {
                Some(s) if c.pos + c.tokens.len() <= s.num_prompt => {
                    self.counters.prefill_tokens += n
                }
                _ => self.counters.decode_tokens += n,
            }
        }
        self.counters
            .iteration_tokens
            .observe(chunks.iter().map(|c| c.tokens.len()).sum());
        let step_id = self.next_step;
        self.next_step += 1;
        self.counters.steps += 1;
        Some(SchedulerOutput {
            step_id,
            chunks,
            copies,
            reset_kv: false,
        })
    }

    /// Length up to which `s`'s blocks are held in reserve at admission: its
    /// next `admission_reserve` tokens, never past its last possible token.
    fn reserve_len(&self, s: &Sequence) -> usize {
        let last = s
            .max_len
            .min(s.num_prompt.saturating_add(s.params.max_tokens));
        let len = s.tokens.len().max(s.target_len());
        last.min(len.saturating_add(self.cfg.admission_reserve))
            .max(len)
    }

    /// Blocks `s` will claim within its reserve (see [`Self::reserve_len`]),
    /// beyond the `held` blocks it has, pending forks included (each writes
    /// its own blocks from the partial last prompt block on).
    fn reserve_blocks(&self, s: &Sequence, held: usize) -> usize {
        let want = self.kv.num_blocks_for(self.reserve_len(s));
        let per_fork = want.saturating_sub(self.kv.num_blocks_for(s.num_prompt)) + 1;
        want.saturating_sub(held) + s.pending_forks.len() * per_fork
    }

    /// Blocks the running sequences will claim within their reserves.
    fn reserved_blocks(&self) -> usize {
        self.running
            .iter()
            .filter_map(|id| self.seqs.get(id))
            .map(|s| self.reserve_blocks(s, self.kv.block_table(s.id).map_or(0, |t| t.len())))
            .sum()
    }

    /// Gives `id` private copies of the shared blocks it will write and room for `need`
    /// tokens, preempting the latest arrivals (not in flight; background ones
    /// first) while blocks are short.
    /// `Ok(false)`: `id` itself was preempted or nobody is left to preempt.
    fn make_room(
        &mut self,
        id: u64,
        need: usize,
        copies: &mut Vec<(u32, u32)>,
    ) -> Result<bool, KvError> {
        loop {
            if self.kv.allocate_slots(id, need, copies)? {
                return Ok(true);
            }
            let victim = self
                .running
                .iter()
                .filter_map(|r| self.seqs.get(r))
                .filter(|v| !v.in_flight)
                .max_by_key(|v| (v.background, v.arrival))
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
        let Some(p) = self.seqs.get_mut(&parent) else {
            return Vec::new();
        };
        let children = std::mem::take(&mut p.pending_forks);
        let computed = p.num_computed;
        let cached = p.num_cached;
        let mut ids = Vec::new();
        for mut c in children {
            if let Err(e) = self.kv.fork(parent, c.id) {
                let error = SchedulerError::Kv {
                    seq_id: c.id,
                    op: "fork",
                    source: e,
                };
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

    /// The draft tokens `id` proposes this step (empty: a plain decode step): only for
    /// a decode step (`n == 1`, the prompt done, no siblings pending) of a sequence
    /// whose parameters allow it, while few enough sequences run, and within the
    /// token budget, `max_tokens` and the context length (room for the bonus token).
    fn draft_for(&mut self, id: u64, n: usize, budget: usize) -> Vec<u32> {
        if !spec::batch_allows(&self.spec, self.running.len()) {
            return Vec::new();
        }
        let cfg = &self.spec;
        let cost = spec::RowCost {
            row_ratio: self.step_cost.row_ratio(),
            batch: self.running.len(),
        };
        let Some(s) = self.seqs.get_mut(&id) else {
            return Vec::new();
        };
        let decoding = n == 1
            && s.num_computed + 1 == s.tokens.len()
            && s.num_generated() > 0
            && s.pending_forks.is_empty();
        if !decoding || !spec::params_allow(&s.params) || !s.spec.try_draft(cfg) {
            return Vec::new();
        }
        // After the drafts and the extra token: tokens.len() + k + 1 <= max_len, generated + k + 1 <= max_tokens.
        let room = cfg
            .num_tokens
            .min(budget.saturating_sub(1))
            .min(s.max_len.saturating_sub(s.tokens.len() + 1))
            .min(s.params.max_tokens.saturating_sub(s.num_generated() + 1));
        if room == 0 {
            return Vec::new();
        }
        let k = s.spec.draft_len(room, cost);
        if k == 0 {
            // No draft length pays at this acceptance and row price.
            s.spec.skip(cfg);
            return Vec::new();
        }
        spec::propose(&s.tokens, cfg.ngram_min, cfg.ngram_max, k)
    }

    /// Appends `id`'s next chunk of `n` tokens (and `draft` proposals) to `chunks` and
    /// marks it in flight (so it cannot be preempted later in this step); false if the
    /// sequence had to be failed.
    fn push_chunk(
        &mut self,
        id: u64,
        n: usize,
        draft: Vec<u32>,
        chunks: &mut Vec<ScheduledChunk>,
    ) -> bool {
        match self.make_chunk(id, n, draft) {
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

    /// The chunk `tokens[num_computed..num_computed + n]` of `id`, then `draft`; `None`
    /// if the sequence, its block table or those tokens are missing (a bookkeeping bug).
    fn make_chunk(&self, id: u64, n: usize, draft: Vec<u32>) -> Option<ScheduledChunk> {
        let s = self.seqs.get(&id)?;
        let pos = s.num_computed;
        let mut tokens = s.tokens.get(pos..pos + n)?.to_vec();
        let num_draft = draft.len();
        tokens.extend(draft);
        let block_table = self.kv.block_table(id)?.to_vec();
        let sample = pos + n == s.tokens.len() && s.params.max_tokens > 0;
        let all_logits = s.wants_prompt_logprobs() && pos < s.num_prompt;
        let ctx = (sample || all_logits).then(|| {
            let p = &s.params;
            let penalties = p.presence_penalty != 0.0
                || p.frequency_penalty != 0.0
                || p.repetition_penalty != 1.0;
            SampleCtx {
                params: p.clone(),
                seed: s.seed,
                index: s.index,
                prompt: s.prompt.clone(),
                output: if penalties {
                    s.tokens[s.num_prompt..].to_vec()
                } else {
                    Vec::new()
                },
                mask_stop: s.num_generated() < p.min_tokens,
                eog: s.eog.clone(),
            }
        });
        Some(ScheduledChunk {
            seq_id: id,
            pos,
            tokens,
            draft: num_draft,
            block_table,
            sample,
            all_logits,
            ctx,
        })
    }

    /// Applies a returned micro-batch: advances computed counts, appends
    /// sampled tokens (`sampled[i]` for chunk `i`), detects finished
    /// sequences and frees their blocks. Cancelled sequences finish with `Abort`;
    /// a chunk that cannot be applied (bookkeeping bug) fails its sequence with `Error`.
    pub fn update_from_output(
        &mut self,
        batch: &SchedulerOutput,
        sampled: &[Option<u32>],
    ) -> Vec<SeqUpdate> {
        let tokens: Vec<Vec<u32>> = sampled
            .iter()
            .map(|t| t.iter().copied().collect())
            .collect();
        self.update_from_tokens(batch, &tokens)
    }

    /// [`Self::update_from_output`] with every token a chunk produced: one for a
    /// plain sampling chunk, the accepted drafts plus one for a speculative chunk
    /// (`draft > 0`), none for a chunk that does not sample. One [`SeqUpdate`] per
    /// token appended (the last carries the finish), so a stop token or a limit
    /// reached among accepted drafts ends the sequence there.
    pub fn update_from_tokens(
        &mut self,
        batch: &SchedulerOutput,
        sampled: &[Vec<u32>],
    ) -> Vec<SeqUpdate> {
        let mut updates = Vec::with_capacity(batch.chunks.len());
        for (i, c) in batch.chunks.iter().enumerate() {
            let tokens = sampled.get(i).map_or(&[][..], Vec::as_slice);
            self.apply_chunk(batch.step_id, c, tokens, &mut updates);
        }
        updates
    }

    /// [`Self::update_from_tokens`] for one chunk.
    fn apply_chunk(
        &mut self,
        step_id: u64,
        c: &ScheduledChunk,
        sampled: &[u32],
        updates: &mut Vec<SeqUpdate>,
    ) {
        let id = c.seq_id;
        let Some(s) = self.seqs.get_mut(&id).filter(|s| s.in_flight) else {
            updates.extend(self.fail(
                id,
                SchedulerError::NotInFlight {
                    step_id,
                    seq_id: id,
                },
            ));
            return;
        };
        s.in_flight = false;
        // The chunk's own tokens (not the drafts) are computed; accepted drafts add theirs.
        let base = c.pos + c.tokens.len() - c.draft.min(c.tokens.len());
        let drafts = c.tokens.get(base - c.pos..).unwrap_or(&[]);
        let accepted = if c.draft > 0 {
            spec::accepted_prefix(drafts, sampled).min(sampled.len().saturating_sub(1))
        } else {
            0
        };
        let mut computed = base + accepted;
        let mut finish = None;
        let mut new_tokens: Vec<u32> = Vec::new();
        if s.is_cancelled() {
            finish = Some(FinishReason::Abort);
            computed = base;
        } else if c.sample {
            if sampled.is_empty() {
                updates.extend(self.fail(
                    id,
                    SchedulerError::NoSampledToken {
                        step_id,
                        seq_id: id,
                    },
                ));
                return;
            }
            if c.draft > 0 {
                s.spec.record(c.draft, accepted, &self.spec);
                self.counters.spec_accepted_tokens += accepted as u64;
            }
            for &t in sampled.iter().take(accepted + 1) {
                s.tokens.push(t);
                new_tokens.push(t);
                let p = &s.params;
                // Stop tokens are masked while `min_tokens` is not reached (`SampleCtx::mask_stop`),
                // so a sampled one always ends the completion.
                if (!p.ignore_eos && s.eog.contains(&t)) || p.stop_token_ids.contains(&t) {
                    finish = Some(FinishReason::Stop);
                } else if s.num_generated() >= p.max_tokens || s.tokens.len() >= s.max_len {
                    finish = Some(FinishReason::Length);
                }
                if finish.is_some() {
                    break;
                }
            }
            // Ended among the accepted drafts: K/V past the last token appended are moot.
            computed = computed.min(s.tokens.len());
        }
        s.num_computed = computed;
        if finish.is_none() && s.params.max_tokens == 0 && computed == s.tokens.len() {
            finish = Some(FinishReason::Length);
        }
        let num_cached = s.num_cached;
        // Rejected drafts: give back the room of their positions (their K/V is never read).
        let rolled_back = if c.draft > 0 {
            self.kv.truncate(id, computed)
        } else {
            Ok(())
        };
        // Only computed tokens (the sampled one has no K/V yet).
        let committed = rolled_back.and_then(|()| match s.tokens.get(..computed) {
            Some(tokens) => self.kv.commit_full_blocks(id, tokens),
            None => Err(KvError::ComputedBeyondAllocation {
                seq: id,
                got: computed,
                max: s.tokens.len(),
            }),
        });
        if let Err(e) = committed {
            updates.extend(self.fail(
                id,
                SchedulerError::Kv {
                    seq_id: id,
                    op: "commit_full_blocks",
                    source: e,
                },
            ));
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
        match new_tokens.split_last() {
            None => updates.push(SeqUpdate {
                seq_id: id,
                token: None,
                finish,
                num_cached,
                error: None,
            }),
            Some((&last, first)) => {
                for &t in first {
                    updates.push(SeqUpdate {
                        seq_id: id,
                        token: Some(t),
                        finish: None,
                        num_cached,
                        error: None,
                    });
                }
                updates.push(SeqUpdate {
                    seq_id: id,
                    token: Some(last),
                    finish,
                    num_cached,
                    error: None,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! vLLM-style tests of the pure scheduler (cf. vLLM's `tests/v1/core/test_scheduler.py`):
    //! exact chunk positions, block ids and finish reasons, with the arithmetic in comments,
    //! plus a seeded randomized test that checks the KV invariants after every step.

    use std::collections::HashSet;

    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// End-of-generation id of every test sequence (prompts use small ids).
    const EOS: u32 = 999;

    fn config(
        max_batched_tokens: usize,
        max_seqs: usize,
        prefill_chunk: usize,
        block_size: usize,
        num_blocks: usize,
    ) -> SchedulerConfig {
        SchedulerConfig {
            max_batched_tokens,
            max_seqs,
            prefill_chunk,
            block_size,
            num_blocks,
            prefix_caching: false,
            background_rows: 0,
            admission_reserve: 0,
        }
    }

    fn scheduler(cfg: SchedulerConfig) -> Scheduler {
        Scheduler::new(cfg).expect("valid config")
    }

    /// One completion of `prompt`, arrival = id, as the scheduler actor builds it.
    fn seq(id: u64, prompt: &[u32], params: SamplingParams) -> Sequence {
        Sequence {
            id,
            request_id: id,
            index: 0,
            tokens: prompt.to_vec(),
            num_prompt: prompt.len(),
            num_computed: 0,
            num_cached: 0,
            in_flight: false,
            status: Status::Waiting,
            arrival: id,
            priority: 0,
            background: false,
            params: Arc::new(params),
            seed: id,
            max_len: 1 << 20,
            cancelled: false,
            preemptions: 0,
            eog: Arc::new(vec![EOS]),
            prompt: Arc::new(prompt.to_vec()),
            pending_forks: Vec::new(),
            spec: Default::default(),
        }
    }

    /// `n` completions of `prompt`: seq `id` carries siblings `id + 1 .. id + n` (same
    /// request, params and cancel flag) as pending forks.
    fn request(id: u64, prompt: &[u32], params: SamplingParams, n: usize) -> Sequence {
        let mut parent = seq(id, prompt, params);
        parent.pending_forks = (1..n as u64)
            .map(|i| {
                let mut c = seq(id + i, prompt, SamplingParams::default());
                c.index = i as usize;
                c.request_id = id;
                c.params = parent.params.clone();
                c.cancelled = parent.cancelled;
                c
            })
            .collect();
        parent
    }

    fn greedy(max_tokens: usize) -> SamplingParams {
        SamplingParams::greedy(max_tokens)
    }

    /// `(seq_id, pos, len)` of every chunk, in row order.
    fn rows(out: &SchedulerOutput) -> Vec<(u64, usize, usize)> {
        out.chunks
            .iter()
            .map(|c| (c.seq_id, c.pos, c.tokens.len()))
            .collect()
    }

    /// `tok` for every chunk that samples, `None` for the others.
    fn sampled(out: &SchedulerOutput, tok: u32) -> Vec<Option<u32>> {
        out.chunks.iter().map(|c| c.sample.then_some(tok)).collect()
    }

    /// Schedules a step and returns it at once with `tok` sampled everywhere.
    fn step(s: &mut Scheduler, tok: u32) -> (SchedulerOutput, Vec<SeqUpdate>) {
        let out = s.schedule().expect("a batch");
        check(s, std::slice::from_ref(&out));
        let updates = s.update_from_output(&out, &sampled(&out, tok));
        check(s, &[]);
        (out, updates)
    }

    fn finish_of(updates: &[SeqUpdate], id: u64) -> Option<FinishReason> {
        updates
            .iter()
            .find(|u| u.seq_id == id)
            .and_then(|u| u.finish)
    }

    fn check(s: &Scheduler, in_flight: &[SchedulerOutput]) {
        if let Err(e) = invariants(s, in_flight) {
            panic!("invariant broken: {e}");
        }
    }

    /// The scheduler's and the KV manager's books agree:
    /// - the KV manager's own invariants (each block's ref count = number of tables holding
    ///   it; the free list = exactly the blocks with ref count 0, so no block is both free and
    ///   referenced; prefix cache consistent);
    /// - every sequence is once in `running` (with a table) or `waiting` (without); no table
    ///   belongs to anyone else; free + used = total, used = distinct blocks of the tables;
    /// - a table covers exactly `num_computed` tokens while its sequence is not in flight, and
    ///   `pos + len` of its chunk while it is;
    /// - the in-flight batches are disjoint, hold exactly the sequences marked in flight, their
    ///   block tables are still the sequences' tables, and every block a chunk writes is
    ///   private (ref count 1).
    fn invariants(s: &Scheduler, in_flight: &[SchedulerOutput]) -> Result<(), String> {
        s.kv.check_invariants()?;
        let bs = s.cfg.block_size;
        let mut listed = HashSet::new();
        for &id in s.running.iter().chain(&s.waiting) {
            if !listed.insert(id) {
                return Err(format!("seq {id} listed twice in running/waiting"));
            }
        }
        if listed.len() != s.seqs.len() {
            return Err(format!(
                "{} seqs known, {} listed",
                s.seqs.len(),
                listed.len()
            ));
        }
        if s.kv.num_seqs() != s.running.len() {
            return Err(format!(
                "{} block tables for {} running seqs",
                s.kv.num_seqs(),
                s.running.len()
            ));
        }
        let mut used = HashSet::new();
        for &id in &s.running {
            let q = s.seqs.get(&id).ok_or(format!("running seq {id} unknown"))?;
            let table =
                s.kv.block_table(id)
                    .ok_or(format!("running seq {id} has no table"))?;
            used.extend(table.iter().copied());
            let num_tokens = s.kv.num_tokens(id).unwrap_or(usize::MAX);
            if q.status != Status::Running {
                return Err(format!("seq {id} in running with status {:?}", q.status));
            }
            if s.kv.num_computed_tokens(id) != Some(q.num_computed) {
                return Err(format!(
                    "seq {id}: kv computed {:?} != {}",
                    s.kv.num_computed_tokens(id),
                    q.num_computed
                ));
            }
            // (A speculative chunk's table also has room for its drafts: checked with the batch.)
            if num_tokens > q.tokens.len() && !q.in_flight {
                return Err(format!(
                    "seq {id}: table for {num_tokens} tokens > {} tokens",
                    q.tokens.len()
                ));
            }
            if !q.in_flight && num_tokens != q.num_computed {
                return Err(format!(
                    "seq {id}: table for {num_tokens} tokens, {} computed",
                    q.num_computed
                ));
            }
        }
        for &id in &s.waiting {
            let q = s.seqs.get(&id).ok_or(format!("waiting seq {id} unknown"))?;
            if q.status != Status::Waiting
                || q.in_flight
                || q.num_computed != 0
                || s.kv.contains(id)
            {
                return Err(format!(
                    "waiting seq {id}: {:?} in flight {} computed {}",
                    q.status, q.in_flight, q.num_computed
                ));
            }
        }
        let st = s.kv.stats();
        if used.len() != st.num_used_blocks
            || st.num_free_blocks + st.num_used_blocks != st.num_blocks
        {
            return Err(format!("{} blocks in tables, stats {st:?}", used.len()));
        }
        let mut flying = HashSet::new();
        for b in in_flight {
            for c in &b.chunks {
                let id = c.seq_id;
                if !flying.insert(id) {
                    return Err(format!("seq {id} twice in the in-flight batches"));
                }
                let q = s
                    .seqs
                    .get(&id)
                    .ok_or(format!("in-flight seq {id} unknown"))?;
                let table = s.kv.block_table(id).unwrap_or(&[]);
                let end = c.pos + c.tokens.len();
                if !q.in_flight || q.num_computed != c.pos || table != c.block_table.as_slice() {
                    return Err(format!(
                        "in-flight seq {id} changed: computed {} table {table:?}",
                        q.num_computed
                    ));
                }
                // The table has room for the drafts too; only the tokens before them are the sequence's.
                let own = end - c.draft;
                if s.kv.num_tokens(id) != Some(end)
                    || q.tokens.get(c.pos..own) != c.tokens.get(..own - c.pos)
                {
                    return Err(format!(
                        "seq {id}: chunk {}..{end} does not match its table/tokens",
                        c.pos
                    ));
                }
                for j in c.pos / bs..end.div_ceil(bs) {
                    let b = table.get(j).copied().unwrap_or(u32::MAX);
                    if s.kv.pool().ref_count(b) != Some(1) {
                        return Err(format!(
                            "seq {id} writes block {b} with ref count {:?}",
                            s.kv.pool().ref_count(b)
                        ));
                    }
                }
            }
        }
        let flagged: HashSet<u64> = s
            .seqs
            .values()
            .filter(|q| q.in_flight)
            .map(|q| q.id)
            .collect();
        if flagged != flying {
            return Err(format!(
                "marked in flight {flagged:?}, in batches {flying:?}"
            ));
        }
        Ok(())
    }

    #[test]
    fn a_request_with_nothing_to_compute_before_its_fork_is_scheduled_in_the_same_call() {
        // n = 2 over a 1-token prompt: the fork point is token 0, so admission
        // computes nothing; the same schedule() call must fork and run both.
        let mut s = scheduler(config(64, 8, 0, 4, 16));
        s.add(request(0, &[7], greedy(4), 2));
        let out = s
            .schedule()
            .expect("a batch, not None (the actor would sleep forever)");
        assert_eq!(rows(&out), vec![(0, 0, 1), (1, 0, 1)]);
    }

    #[test]
    fn chunked_prefill_positions_under_prefill_chunk() {
        // Budget 10, chunks of at most 4 tokens, blocks of 4.
        let mut s = scheduler(config(10, 4, 4, 4, 16));
        let a: Vec<u32> = (0..10).collect();
        s.add(seq(0, &a, greedy(4)));
        s.add(seq(1, &[7, 8, 9], greedy(4)));
        // Step 0: A min(10, 10, 4) = 4 tokens at 0, B min(3, 10 - 4, 4) = 3 at 0 (its whole prompt: samples).
        let out = s.schedule().expect("batch");
        assert_eq!(rows(&out), vec![(0, 0, 4), (1, 0, 3)]);
        assert_eq!((out.chunks[0].sample, out.chunks[1].sample), (false, true));
        assert!(out.chunks[0].ctx.is_none());
        // ceil(4/4) = 1 block for A: 0; ceil(3/4) = 1 for B: 1.
        assert_eq!(
            (
                out.chunks[0].block_table.clone(),
                out.chunks[1].block_table.clone()
            ),
            (vec![0], vec![1])
        );
        check(&s, std::slice::from_ref(&out));
        // Both in flight: nothing else to run.
        assert!(s.schedule().is_none());
        let up = s.update_from_output(&out, &sampled(&out, 5));
        assert_eq!(
            up.iter().map(|u| (u.seq_id, u.token)).collect::<Vec<_>>(),
            vec![(0, None), (1, Some(5))]
        );
        // Step 1: A 4 more at 4 (table 0 + new 2), B decodes its 4th token at 3 (same block).
        let (out, _) = step(&mut s, 5);
        assert_eq!(rows(&out), vec![(0, 4, 4), (1, 3, 1)]);
        assert_eq!(out.chunks[0].block_table, vec![0, 2]);
        assert_eq!(out.chunks[1].block_table, vec![1]);
        // Step 2: A's last 10 - 8 = 2 tokens at 8 (samples, new block 3), B at 4 (ceil(5/4) = 2: new block 4).
        let (out, _) = step(&mut s, 5);
        assert_eq!(rows(&out), vec![(0, 8, 2), (1, 4, 1)]);
        assert!(out.chunks[0].sample);
        assert_eq!(
            (
                out.chunks[0].block_table.clone(),
                out.chunks[1].block_table.clone()
            ),
            (vec![0, 2, 3], vec![1, 4])
        );
        assert_eq!(
            (s.counters.prefill_tokens, s.counters.decode_tokens),
            (10 + 3, 2)
        );
    }

    #[test]
    fn token_budget_limits_chunks_and_admission() {
        // Budget 5, no chunk limit.
        let mut s = scheduler(config(5, 4, 0, 4, 16));
        let a: Vec<u32> = (0..10).collect();
        s.add(seq(0, &a, greedy(2)));
        s.add(seq(1, &[7, 8, 9], greedy(2)));
        // Step 0: A takes the whole budget (5 of 10); B is not admitted (budget 0).
        let (out, _) = step(&mut s, 5);
        assert_eq!(rows(&out), vec![(0, 0, 5)]);
        assert_eq!(s.num_waiting(), 1);
        // Step 1: A's remaining 5 = the budget; B still waits.
        let (out, _) = step(&mut s, 5);
        assert_eq!(rows(&out), vec![(0, 5, 5)]);
        assert_eq!(s.num_waiting(), 1);
        // Step 2: A decodes 1 at 10, B gets min(3, 5 - 1) = 3.
        let (out, up) = step(&mut s, 5);
        assert_eq!(rows(&out), vec![(0, 10, 1), (1, 0, 3)]);
        // A's second token: max_tokens 2 → Length.
        assert_eq!(finish_of(&up, 0), Some(FinishReason::Length));
        assert_eq!(s.num_running(), 1);
    }

    #[test]
    fn max_seqs_limits_sequences_per_batch() {
        let mut s = scheduler(config(64, 2, 0, 4, 16));
        for id in 0..3 {
            s.add(seq(id, &[1, 2], greedy(2)));
        }
        // Step 0: 2 sequences; C waits. Step 1: A, B decode (running first); C still waits.
        let (out, _) = step(&mut s, 5);
        assert_eq!(rows(&out), vec![(0, 0, 2), (1, 0, 2)]);
        let (out, up) = step(&mut s, 5);
        assert_eq!(rows(&out), vec![(0, 2, 1), (1, 2, 1)]);
        assert_eq!(
            (finish_of(&up, 0), finish_of(&up, 1)),
            (Some(FinishReason::Length), Some(FinishReason::Length))
        );
        // Step 2: A, B done (2 tokens each): C runs.
        let (out, _) = step(&mut s, 5);
        assert_eq!(rows(&out), vec![(2, 0, 2)]);
    }

    #[test]
    fn waiting_order_is_priority_then_arrival() {
        let mut s = scheduler(config(64, 1, 0, 4, 16));
        for (id, priority) in [(0, 1), (1, 0), (2, 1), (3, 0)] {
            let mut q = seq(id, &[1, 2], greedy(1));
            q.priority = priority;
            s.add(q);
        }
        // Lower priority value first, then arrival: 1, 3, 0, 2 (one per batch, max_tokens 1).
        let mut order = Vec::new();
        while let Some(out) = s.schedule() {
            order.extend(out.chunks.iter().map(|c| c.seq_id));
            s.update_from_output(&out, &sampled(&out, 5));
            check(&s, &[]);
        }
        assert_eq!(order, vec![1, 3, 0, 2]);
        assert!(s.is_empty());
    }

    #[test]
    fn background_rows_are_capped_while_an_interactive_sequence_runs() {
        let mut cfg = config(256, 16, 0, 4, 64);
        cfg.background_rows = 2;
        let mut s = scheduler(cfg);
        // Six background sequences arrive first, then one interactive one.
        for id in 0..6 {
            let mut q = seq(id, &[1, 2], greedy(4));
            q.background = true;
            s.add(q);
        }
        s.add(seq(6, &[3, 4, 5], greedy(3)));
        // The interactive one leads the queue; two background ones ride along.
        let out = s.schedule().expect("a batch");
        let ids: Vec<u64> = out.chunks.iter().map(|c| c.seq_id).collect();
        assert_eq!(ids, vec![6, 0, 1]);
        s.update_from_output(&out, &sampled(&out, 7));
        check(&s, &[]);
        // While it runs: itself plus at most two background rows per batch.
        let mut steps = 0;
        while s.get(6).is_some() {
            let out = s.schedule().expect("a batch");
            let bg = out.chunks.iter().filter(|c| c.seq_id != 6).count();
            assert!(
                out.chunks.iter().any(|c| c.seq_id == 6),
                "the interactive sequence runs every step"
            );
            assert!(bg <= 2, "{bg} background rows while interactive work runs");
            s.update_from_output(&out, &sampled(&out, 7));
            check(&s, &[]);
            steps += 1;
            assert!(steps < 10, "the interactive sequence never finished");
        }
        // Alone, the background sequences take every row again.
        let out = s.schedule().expect("a batch");
        let left = (0..6u64).filter(|id| s.get(*id).is_some()).count();
        assert_eq!(out.chunks.len(), left);
        assert!(left > 2);
    }

    #[test]
    fn preemption_takes_latest_arrival_and_recomputes_prompt_plus_generated() {
        // 4 blocks of 2 tokens = 8 token slots.
        let mut s = scheduler(config(64, 8, 0, 2, 4));
        s.add(seq(0, &[1, 2, 3], greedy(3)));
        s.add(seq(1, &[4, 5, 6], greedy(8)));
        // Step 0: A and B prefill 3 tokens each: ceil(3/2) = 2 blocks each, pool full.
        let (out, _) = step(&mut s, 7);
        assert_eq!(rows(&out), vec![(0, 0, 3), (1, 0, 3)]);
        assert_eq!(s.kv.num_free_blocks(), 0);
        // Step 1: both decode at 3: 4 tokens still fit 2 blocks.
        let (out, _) = step(&mut s, 8);
        assert_eq!(rows(&out), vec![(0, 3, 1), (1, 3, 1)]);
        // Step 2: A at 4 needs ceil(5/2) = 3 blocks, none free: B (latest arrival) is
        // preempted; its blocks 3, 2 are freed (uncached → head) and A takes block 2.
        let (out, up) = step(&mut s, 9);
        assert_eq!(rows(&out), vec![(0, 4, 1)]);
        assert_eq!(out.chunks[0].block_table, vec![0, 1, 2]);
        assert_eq!(s.counters.preemptions, 1);
        let b = s.get(1).expect("known");
        assert_eq!(
            (b.status, b.num_computed, b.preemptions),
            (Status::Waiting, 0, 1)
        );
        assert_eq!(b.tokens, vec![4, 5, 6, 7, 8]);
        // A generated 7, 8, 9 = max_tokens 3: done, its 3 blocks freed.
        assert_eq!(finish_of(&up, 0), Some(FinishReason::Length));
        // C arrives after B's preemption; B was put back at the queue's front.
        s.add(seq(2, &[1, 1], greedy(1)));
        // Step 3: B recomputes prompt + generated (5 tokens, samples the 3rd), then C.
        let (out, _) = step(&mut s, 3);
        assert_eq!(rows(&out), vec![(1, 0, 5), (2, 0, 2)]);
        assert_eq!(out.chunks[0].tokens, vec![4, 5, 6, 7, 8]);
        assert!(out.chunks[0].sample);
        assert_eq!(
            s.get(1).map(|q| q.tokens.clone()),
            Some(vec![4, 5, 6, 7, 8, 3])
        );
        // A chunk counts as prefill only if it ends within the prompt: 3 + 3 + 2 (C) prefill;
        // 2 + 1 decode, plus B's recompute 0..5, which ends past its 3-token prompt: 8.
        assert_eq!(
            (s.counters.prefill_tokens, s.counters.decode_tokens),
            (8, 8)
        );
    }

    #[test]
    fn admission_reserve_admits_only_what_can_finish_without_preemption() {
        // 10 blocks of 4 tokens. Each request: 8-token prompt (2 blocks), 8 new
        // tokens (4 blocks at the end). All three at once need 12 blocks.
        let run = |reserve: usize| {
            let mut cfg = config(64, 8, 0, 4, 10);
            cfg.admission_reserve = reserve;
            let mut s = scheduler(cfg);
            for id in 0..3 {
                s.add(seq(id, &[1, 2, 3, 4, 5, 6, 7, 8], greedy(8)));
            }
            let (out, _) = step(&mut s, 9);
            let admitted: Vec<u64> = out.chunks.iter().map(|c| c.seq_id).collect();
            let mut finished = 0;
            for _ in 0..100 {
                let Some(out) = s.schedule() else { break };
                check(&s, std::slice::from_ref(&out));
                let up = s.update_from_output(&out, &sampled(&out, 9));
                check(&s, &[]);
                finished += up.iter().filter(|u| u.finish.is_some()).count();
            }
            assert!(s.is_empty(), "every request finishes");
            (admitted, s.counters.preemptions, finished)
        };
        // Reserve: A and B fit (2 + 2 held, 2 + 2 more to come, 2 free); C would need
        // 4 more: it waits for A and B to finish, and nobody is preempted.
        let (admitted, preemptions, finished) = run(256);
        assert_eq!((admitted, preemptions, finished), (vec![0, 1], 0, 3));
        // A reserve of 4 tokens (one block ahead each) admits all three.
        let (admitted, _, _) = run(4);
        assert_eq!(admitted, vec![0, 1, 2]);
        // No reserve: all three are admitted on their prompts, and growth preempts.
        let (admitted, preemptions, finished) = run(0);
        assert_eq!(admitted, vec![0, 1, 2]);
        assert!(preemptions > 0);
        assert_eq!(finished, 3);
    }

    #[test]
    fn admission_reserve_always_admits_a_lone_sequence() {
        // A request whose reserve exceeds the pool still runs when alone.
        let mut cfg = config(64, 8, 0, 4, 3);
        cfg.admission_reserve = 1000;
        let mut s = scheduler(cfg);
        s.add(seq(0, &[1, 2, 3, 4], greedy(4)));
        let (out, _) = step(&mut s, 9);
        assert_eq!(rows(&out), vec![(0, 0, 4)]);
    }

    #[test]
    fn preempted_sequences_are_readmitted_in_arrival_order() {
        // 6 blocks of 2: A, B, C with 3-token prompts take 2 blocks each.
        let mut s = scheduler(config(64, 8, 0, 2, 6));
        for id in 0..3 {
            s.add(seq(id, &[1, 2, 3], greedy(8)));
        }
        step(&mut s, 7); // prefill: 4 tokens each (2 blocks)
        step(&mut s, 7); // decode at 3: 5 tokens each, still 2 blocks... no: ceil(4/2) = 2
                         // Step 2: A at 4 needs a 3rd block: C (latest) preempted → A gets one of its blocks,
                         // B at 4 needs a 3rd block too: C gave 2, so B gets the other.
        let (out, _) = step(&mut s, 7);
        assert_eq!(rows(&out), vec![(0, 4, 1), (1, 4, 1)]);
        assert_eq!(s.waiting.iter().copied().collect::<Vec<_>>(), vec![2]);
        // Step 3: A and B at 5 fit their 3 blocks (6 tokens); C (7 tokens → 4 blocks) cannot come back.
        let (out, _) = step(&mut s, 7);
        assert_eq!(rows(&out), vec![(0, 5, 1), (1, 5, 1)]);
        // Step 4: A at 6 needs a 4th block: B (latest running) preempted; B goes in front of C.
        let (out, _) = step(&mut s, 7);
        assert_eq!(rows(&out), vec![(0, 6, 1)]);
        assert_eq!(s.waiting.iter().copied().collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(s.counters.preemptions, 2);
    }

    #[test]
    fn fork_shares_blocks_and_copies_the_partial_last_block() {
        let mut cfg = config(64, 8, 0, 4, 16);
        cfg.prefix_caching = true;
        let mut s = scheduler(cfg);
        // 6-token prompt, n = 3: seq 0 carries siblings 1 and 2.
        s.add(request(0, &[1, 2, 3, 4, 5, 6], greedy(2), 3));
        // Step 0: the parent computes all but the last prompt token: 5 tokens → blocks 0, 1.
        let out = s.schedule().expect("batch");
        assert_eq!(rows(&out), vec![(0, 0, 5)]);
        assert_eq!(out.chunks[0].block_table, vec![0, 1]);
        assert!(!out.chunks[0].sample && out.chunks[0].ctx.is_none());
        s.update_from_output(&out, &[None]);
        check(&s, &[]);
        // Step 1: siblings forked sharing blocks 0 (full) and 1 (positions 4 of 4..8 written).
        // Each writes position 5 in block 1 → copy-on-write: parent 1 → 2, sibling 1: 1 → 3;
        // sibling 2 then holds block 1 alone and writes it in place.
        let out = s.schedule().expect("batch");
        check(&s, std::slice::from_ref(&out));
        assert_eq!(rows(&out), vec![(0, 5, 1), (1, 5, 1), (2, 5, 1)]);
        assert_eq!(out.copies, vec![(1, 2), (1, 3)]);
        let tables: Vec<Vec<u32>> = out.chunks.iter().map(|c| c.block_table.clone()).collect();
        assert_eq!(tables, vec![vec![0, 2], vec![0, 3], vec![0, 1]]);
        assert_eq!(
            [0, 1, 2, 3].map(|b| s.kv.pool().ref_count(b)),
            [Some(3), Some(1), Some(1), Some(1)]
        );
        // Every completion samples its own first token, keyed by its index.
        let indexes: Vec<usize> = out
            .chunks
            .iter()
            .filter_map(|c| c.ctx.as_ref().map(|x| x.index))
            .collect();
        assert_eq!(indexes, vec![0, 1, 2]);
        assert!(out.chunks.iter().all(|c| c.sample));
        s.update_from_output(&out, &[Some(10), Some(11), Some(12)]);
        check(&s, &[]);
        assert_eq!(
            s.get(1).map(|q| q.tokens.clone()),
            Some(vec![1, 2, 3, 4, 5, 6, 11])
        );
        // Step 2: each decodes at 6 in its private block; nothing is copied.
        let (out, up) = step(&mut s, 20);
        assert_eq!(rows(&out), vec![(0, 6, 1), (1, 6, 1), (2, 6, 1)]);
        assert!(out.copies.is_empty());
        assert!(up.iter().all(|u| u.finish == Some(FinishReason::Length)));
        assert!(s.is_empty());
        assert_eq!(s.kv.num_free_blocks(), 16);
    }

    #[test]
    fn prefix_cache_hit_reuses_computed_blocks_without_recompute() {
        let mut cfg = config(64, 8, 0, 4, 16);
        cfg.prefix_caching = true;
        let mut s = scheduler(cfg);
        let a: Vec<u32> = (1..=10).collect();
        s.add(seq(0, &a, greedy(1)));
        // A: 10 tokens → blocks 0, 1, 2; 2 full blocks cached when it returns; done (max_tokens 1).
        let (out, up) = step(&mut s, 50);
        assert_eq!(rows(&out), vec![(0, 0, 10)]);
        assert_eq!(up[0].num_cached, 0);
        assert_eq!(s.kv.stats().num_cached_blocks, 2);
        // Freed last block first: uncached 2 to the head, cached 1 and 0 to the tail.
        // B shares A's first 8 tokens: hits blocks 0, 1 = 8 tokens; computes only 3 (new block 2).
        let mut b: Vec<u32> = a[..8].to_vec();
        b.extend([60, 61, 62]);
        s.add(seq(1, &b, greedy(1)));
        let (out, up) = step(&mut s, 50);
        assert_eq!(rows(&out), vec![(1, 8, 3)]);
        assert_eq!(out.chunks[0].tokens, vec![60, 61, 62]);
        assert_eq!(out.chunks[0].block_table, vec![0, 1, 2]);
        assert_eq!((up[0].num_cached, s.counters.prefill_tokens), (8, 10 + 3));
        // C = A's prompt exactly: at most (10 - 1) / 4 = 2 blocks hit, 2 tokens computed.
        s.add(seq(2, &a, greedy(1)));
        let (out, up) = step(&mut s, 50);
        assert_eq!(rows(&out), vec![(2, 8, 2)]);
        assert_eq!(up[0].num_cached, 8);
        // Prompt log-probabilities need every row: no cache lookup, all 10 computed.
        let mut d = seq(3, &a, greedy(1));
        d.params = Arc::new(SamplingParams {
            prompt_logprobs: Some(0),
            ..greedy(1)
        });
        s.add(d);
        let (out, up) = step(&mut s, 50);
        assert_eq!(rows(&out), vec![(3, 0, 10)]);
        assert!(out.chunks[0].all_logits);
        assert_eq!(up[0].num_cached, 0);
        assert_eq!(s.kv.num_free_blocks(), 16);
    }

    #[test]
    fn cancelled_sequences_are_reaped_or_aborted_when_their_batch_returns() {
        let mut s = scheduler(config(64, 2, 0, 4, 16));
        s.add(seq(0, &[1, 2], greedy(8)));
        s.add(seq(1, &[1, 2], greedy(8)));
        s.add(request(2, &[3, 4, 5], greedy(8), 2)); // waits (max_seqs 2), carries sibling 3
        let out = s.schedule().expect("batch");
        assert_eq!(rows(&out), vec![(0, 0, 2), (1, 0, 2)]);
        // In flight: cancelling does not remove it; the returned batch finishes it as Abort,
        // dropping the token it sampled.
        assert!(s.cancel_seq(0).is_empty());
        let up = s.update_from_output(&out, &sampled(&out, 5));
        check(&s, &[]);
        assert_eq!(
            up[0],
            SeqUpdate {
                seq_id: 0,
                token: None,
                finish: Some(FinishReason::Abort),
                num_cached: 0,
                error: None
            }
        );
        assert_eq!(up[1].finish, None);
        // A stop string ends one completion the same way: not in flight, removed at once.
        let stopped: Vec<u64> = s.cancel_seq(1).iter().map(|q| q.id).collect();
        assert_eq!(stopped, vec![1]);
        // A cancelled request: every completion, siblings not yet forked included.
        let mut reaped: Vec<u64> = s.cancel_request(2).iter().map(|q| q.id).collect();
        reaped.sort_unstable();
        assert_eq!(reaped, vec![2, 3]);
        assert!(s.is_empty());
        assert_eq!(s.kv.num_free_blocks(), 16);
    }

    #[test]
    fn finishes_on_max_tokens_stop_tokens_and_max_len_after_min_tokens() {
        let mut s = scheduler(config(64, 8, 0, 4, 32));
        s.add(seq(0, &[1], greedy(2)));
        s.add(seq(1, &[1], greedy(8)));
        s.add(seq(
            2,
            &[1],
            SamplingParams {
                ignore_eos: true,
                ..greedy(8)
            },
        ));
        s.add(seq(
            3,
            &[1],
            SamplingParams {
                stop_token_ids: vec![42],
                ..greedy(8)
            },
        ));
        s.add(seq(
            4,
            &[1],
            SamplingParams {
                min_tokens: 2,
                ..greedy(8)
            },
        ));
        let mut short = seq(5, &[1], greedy(8));
        short.max_len = 2; // context length: the prompt token + 1
        s.add(short);
        // First token: only seq 5 ends (tokens.len() 2 >= max_len 2). Seq 4's stop tokens are masked.
        let out = s.schedule().expect("batch");
        let masks: Vec<bool> = out
            .chunks
            .iter()
            .map(|c| c.ctx.as_ref().is_some_and(|x| x.mask_stop))
            .collect();
        assert_eq!(masks, vec![false, false, false, false, true, false]);
        let up = s.update_from_output(
            &out,
            &[Some(7), Some(7), Some(7), Some(7), Some(7), Some(7)],
        );
        assert_eq!(
            up.iter().map(|u| u.finish).collect::<Vec<_>>(),
            vec![None, None, None, None, None, Some(FinishReason::Length)]
        );
        // Second token: EOS for 1 (Stop) and 2 (ignored), 42 for 3 (Stop); 0 reaches max_tokens 2.
        let out = s.schedule().expect("batch");
        let masks: Vec<bool> = out
            .chunks
            .iter()
            .map(|c| c.ctx.as_ref().is_some_and(|x| x.mask_stop))
            .collect();
        assert_eq!(masks, vec![false, false, false, false, true]); // seq 4: 1 generated < min_tokens 2
        let up = s.update_from_output(&out, &[Some(7), Some(EOS), Some(EOS), Some(42), Some(7)]);
        assert_eq!(
            up.iter().map(|u| (u.seq_id, u.finish)).collect::<Vec<_>>(),
            vec![
                (0, Some(FinishReason::Length)),
                (1, Some(FinishReason::Stop)),
                (2, None),
                (3, Some(FinishReason::Stop)),
                (4, None)
            ]
        );
        // Third token: seq 4 has 2 = min_tokens: unmasked, and EOS stops it.
        let out = s.schedule().expect("batch");
        assert_eq!(rows(&out), vec![(2, 2, 1), (4, 2, 1)]);
        assert!(out
            .chunks
            .iter()
            .all(|c| c.ctx.as_ref().is_some_and(|x| !x.mask_stop)));
        let up = s.update_from_output(&out, &[Some(7), Some(EOS)]);
        assert_eq!(finish_of(&up, 4), Some(FinishReason::Stop));
        assert_eq!(s.get(2).map(Sequence::num_generated), Some(3));
        check(&s, &[]);
    }

    #[test]
    fn max_tokens_zero_computes_the_prompt_and_ends_without_sampling() {
        let mut s = scheduler(config(64, 8, 3, 4, 8));
        s.add(seq(
            0,
            &[1, 2, 3, 4, 5],
            SamplingParams {
                prompt_logprobs: Some(1),
                ..greedy(0)
            },
        ));
        // Chunks of 3: 0..3 then 3..5; neither samples, both want every row's logits.
        let (out, up) = step(&mut s, 9);
        assert_eq!(rows(&out), vec![(0, 0, 3)]);
        assert!(!out.chunks[0].sample && out.chunks[0].all_logits);
        assert_eq!(up[0].finish, None);
        let (out, up) = step(&mut s, 9);
        assert_eq!(rows(&out), vec![(0, 3, 2)]);
        assert!(!out.chunks[0].sample);
        assert_eq!(
            (up[0].token, up[0].finish),
            (None, Some(FinishReason::Length))
        );
        assert!(s.is_empty());
    }

    #[test]
    fn pipelined_micro_batches_hold_disjoint_sequences() {
        // 4 blocks of 2 tokens.
        let mut s = scheduler(config(64, 1, 0, 2, 4));
        s.add(seq(0, &[1, 2, 3], greedy(8)));
        s.add(seq(1, &[4, 5, 6], greedy(8)));
        // max_seqs 1: batch 0 = A's prompt; batch 1 (A in flight) = B's prompt.
        let b0 = s.schedule().expect("batch");
        let b1 = s.schedule().expect("batch");
        assert_eq!((rows(&b0), rows(&b1)), (vec![(0, 0, 3)], vec![(1, 0, 3)]));
        check(&s, &[b0.clone(), b1.clone()]);
        assert!(s.schedule().is_none());
        // Returned out of order.
        s.update_from_output(&b1, &sampled(&b1, 7));
        s.update_from_output(&b0, &sampled(&b0, 7));
        // Batch 2 = A decoding at 3; batch 3 = B at 3 (both in their 2 blocks: pool full).
        let b2 = s.schedule().expect("batch");
        let b3 = s.schedule().expect("batch");
        assert_eq!((rows(&b2), rows(&b3)), (vec![(0, 3, 1)], vec![(1, 3, 1)]));
        s.update_from_output(&b3, &sampled(&b3, 8));
        check(&s, std::slice::from_ref(&b2));
        // B at 4 needs a 3rd block while A is in flight: A cannot be preempted, so B
        // (the only candidate) preempts itself and nothing runs.
        assert!(s.schedule().is_none());
        assert_eq!(s.get(1).map(|q| q.status), Some(Status::Waiting));
        check(&s, std::slice::from_ref(&b2));
        s.update_from_output(&b2, &sampled(&b2, 8));
        check(&s, &[]);
        // A at 4 now gets block 2 (B's blocks 3, 2 were freed last first, each to the head).
        let (out, _) = step(&mut s, 9);
        assert_eq!(rows(&out), vec![(0, 4, 1)]);
        assert_eq!(out.chunks[0].block_table, vec![0, 1, 2]);
    }

    /// Regression: a sibling forked late in the running pass could preempt a sequence that
    /// already had a chunk in the same batch (only sequences of *earlier* batches counted as
    /// in flight), leaving that chunk with freed blocks that the sibling then wrote.
    #[test]
    fn a_sequence_already_in_the_batch_is_never_preempted() {
        // 5 blocks of 2 tokens.
        let mut s = scheduler(config(64, 8, 0, 2, 5));
        s.add(request(0, &[1, 2, 3, 4, 5], greedy(8), 2)); // P (sibling 1 pending)
        s.add(seq(2, &[6, 7, 8], greedy(8))); // Z, a later arrival
                                              // Step 0: P computes 4 tokens (2 blocks), Z its 3 (2 blocks): 1 block free.
        let (out, _) = step(&mut s, 9);
        assert_eq!(rows(&out), vec![(0, 0, 4), (2, 0, 3)]);
        // Step 1: P forks C (arrival 1) and takes the free block for position 4; Z decodes at 3
        // in its own 2 blocks; C needs a block for position 4 and none is free. Z has the
        // latest arrival but is already in this batch: C preempts itself instead.
        let out = s.schedule().expect("batch");
        check(&s, std::slice::from_ref(&out));
        assert_eq!(rows(&out), vec![(0, 4, 1), (2, 3, 1)]);
        assert_eq!(s.get(1).map(|q| q.status), Some(Status::Waiting));
        assert_eq!(
            s.get(2).map(|q| (q.status, q.in_flight)),
            Some((Status::Running, true))
        );
        s.update_from_output(&out, &sampled(&out, 9));
        check(&s, &[]);
    }

    #[test]
    fn a_kv_bug_at_admission_fails_the_sequence_instead_of_blocking_the_queue() {
        let mut s = scheduler(config(64, 8, 0, 4, 8));
        s.add(seq(0, &[1, 2, 3], greedy(1)));
        s.add(seq(1, &[4, 5, 6], greedy(1)));
        // Bug: a table for seq 0 exists behind the scheduler's back. `allocate` says
        // DuplicateSeq: seq 0 fails (and the stray table is freed); seq 1 behind it still runs.
        assert_eq!(s.kv.allocate(0, 4, vec![]), Ok(true));
        let out = s.schedule().expect("batch");
        assert_eq!(rows(&out), vec![(1, 0, 3)]);
        let failed = s.take_failed();
        assert_eq!(
            failed,
            vec![SeqUpdate {
                seq_id: 0,
                token: None,
                finish: Some(FinishReason::Error),
                num_cached: 0,
                error: Some(SchedulerError::Kv {
                    seq_id: 0,
                    op: "allocate",
                    source: KvError::DuplicateSeq(0)
                }),
            }]
        );
        assert!(s.get(0).is_none());
        assert!(s.take_failed().is_empty());
        s.update_from_output(&out, &sampled(&out, 7));
        check(&s, &[]);
        assert!(s.is_empty());
        assert_eq!(s.kv.num_free_blocks(), 8);
    }

    #[test]
    fn a_double_free_fails_the_sequence_loudly() {
        let mut s = scheduler(config(64, 8, 0, 4, 8));
        s.add(seq(0, &[1, 2, 3], greedy(4)));
        s.add(request(1, &[4, 5, 6], greedy(4), 2)); // sibling 2 pending
        s.add(seq(3, &[7, 8], greedy(4)));
        let (out, _) = step(&mut s, 5);
        assert_eq!(rows(&out), vec![(0, 0, 3), (1, 0, 2), (3, 0, 2)]);
        // Bug: seq 0's blocks freed behind the scheduler's back, then again by the scheduler.
        assert_eq!(s.kv.free(0), Ok(()));
        let out = s.schedule().expect("batch");
        let failed = s.take_failed();
        assert_eq!(failed.len(), 1);
        assert_eq!(
            (failed[0].seq_id, failed[0].finish),
            (0, Some(FinishReason::Error))
        );
        assert_eq!(
            failed[0].error,
            Some(SchedulerError::Kv {
                seq_id: 0,
                op: "allocate_slots",
                source: KvError::UnknownSeq(0)
            })
        );
        assert!(s.get(0).is_none());
        // Seq 1 forked sibling 2 (own table now, sharing block 0 by copy-on-write).
        assert_eq!(rows(&out), vec![(1, 2, 1), (3, 2, 1), (2, 2, 1)]);
        // Same bug while in flight: the returned batch fails seq 1; its sibling is intact.
        assert_eq!(s.kv.free(1), Ok(()));
        let up = s.update_from_output(&out, &sampled(&out, 5));
        let ended: Vec<(u64, Option<FinishReason>)> =
            up.iter().map(|u| (u.seq_id, u.finish)).collect();
        assert_eq!(
            ended,
            vec![(1, Some(FinishReason::Error)), (3, None), (2, None)]
        );
        assert!(matches!(
            up[0].error,
            Some(SchedulerError::Kv {
                op: "commit_full_blocks",
                ..
            })
        ));
        assert!(up[0]
            .error
            .as_ref()
            .is_some_and(|e| e.to_string().contains("sequence 1 has no blocks")));
        check(&s, &[]);
        while let Some(out) = s.schedule() {
            s.update_from_output(&out, &sampled(&out, 5));
        }
        assert!(s.is_empty());
        assert_eq!(s.kv.num_free_blocks(), 8);
    }

    #[test]
    fn a_batch_returned_wrongly_fails_its_sequences_instead_of_hanging() {
        let mut s = scheduler(config(64, 8, 0, 4, 8));
        s.add(seq(0, &[1, 2], greedy(4)));
        s.add(seq(1, &[3, 4], greedy(4)));
        let out = s.schedule().expect("batch");
        // Seq 0 had to sample but got no token: failed (it would otherwise never run again).
        let up = s.update_from_output(&out, &[None, Some(5)]);
        assert_eq!(
            up[0].error,
            Some(SchedulerError::NoSampledToken {
                step_id: 0,
                seq_id: 0
            })
        );
        assert_eq!(up[1].token, Some(5));
        check(&s, &[]);
        // The same batch returned twice: seq 1 is no longer in flight.
        let up = s.update_from_output(&out, &[None, Some(5)]);
        assert_eq!(up.len(), 2);
        assert!(up.iter().all(|u| u.finish == Some(FinishReason::Error)));
        assert_eq!(
            up[1].error,
            Some(SchedulerError::NotInFlight {
                step_id: 0,
                seq_id: 1
            })
        );
        assert!(s.is_empty());
        assert_eq!(s.kv.num_free_blocks(), 8);
    }

    /// A sequence whose drafts have always held: it drafts the full `num_tokens`.
    fn confident(mut q: Sequence) -> Sequence {
        q.spec.ewma = 1.0;
        q.spec.accepted = [100.0; spec::MAX_DRAFT];
        q.spec.checked = [100.0; spec::MAX_DRAFT];
        q
    }

    fn speculative(s: &mut Scheduler, num_tokens: usize) {
        s.set_speculation(SpeculativeConfig {
            num_tokens,
            ngram_min: 1,
            ngram_max: 2,
            max_running: 2,
            ..SpeculativeConfig::default()
        });
    }

    /// Decode-only steps price verify rows; prefill chunks and prompt-logprob rows do not
    /// count. Dear rows shorten a sequence's drafts; with no length paying it drafts none.
    #[test]
    fn measured_step_costs_set_the_draft_length() {
        use std::time::Duration;
        let mut s = scheduler(config(64, 8, 0, 4, 16));
        speculative(&mut s, 3);
        assert_eq!(s.verify_row_ratio(), StepCost::DEFAULT_ROW_RATIO);
        // A prefill chunk: not observed.
        s.add(seq(0, &[1, 2, 3, 1, 2], greedy(40)));
        let (out, _) = step(&mut s, 3);
        assert_eq!(rows(&out), vec![(0, 0, 5)]);
        for _ in 0..20 {
            s.observe_step_cost(&out, Duration::from_millis(100));
        }
        assert_eq!(s.verify_row_ratio(), StepCost::DEFAULT_ROW_RATIO);
        // Decode-only steps of 1 and 4 rows: 4 ms + 3 ms per row, a ratio of 0.75.
        let decode = |rows: usize| SchedulerOutput {
            chunks: vec![ScheduledChunk {
                seq_id: 0,
                pos: 5,
                tokens: vec![3; rows],
                draft: rows - 1,
                block_table: vec![0],
                sample: true,
                all_logits: false,
                ctx: None,
            }],
            ..SchedulerOutput::default()
        };
        for i in 0..40 {
            let rows = if i % 2 == 0 { 1 } else { 4 };
            s.observe_step_cost(
                &decode(rows),
                Duration::from_micros(4000 + 3000 * rows as u64),
            );
        }
        assert!(
            (s.verify_row_ratio() - 0.75).abs() < 0.01,
            "{}",
            s.verify_row_ratio()
        );
        // At that price a first draft must hold > 0.75 / (1 + 0.75) = 43% of the time;
        // drafts that held a quarter of the time do not pay: the decode step carries none.
        let q = s.seqs.get_mut(&0).expect("seq 0");
        q.spec.accepted = [1.0; spec::MAX_DRAFT];
        q.spec.checked = [4.0; spec::MAX_DRAFT];
        let out = s.schedule().expect("batch");
        assert_eq!((rows(&out), out.chunks[0].draft), (vec![(0, 5, 1)], 0));
        assert!(s.seqs[&0].spec.cooldown > 0, "no length paid: a pause");
        // Cheap rows again (0.05): the same acceptance now drafts.
        s.update_from_tokens(&out, &[vec![1]]);
        for i in 0..400 {
            let rows = if i % 2 == 0 { 1 } else { 4 };
            s.observe_step_cost(
                &decode(rows),
                Duration::from_micros(4000 + 200 * rows as u64),
            );
        }
        assert!(
            (s.verify_row_ratio() - 0.05).abs() < 0.01,
            "{}",
            s.verify_row_ratio()
        );
        let q = s.seqs.get_mut(&0).expect("seq 0");
        q.spec.cooldown = 0;
        let out = s.schedule().expect("batch");
        assert!(out.chunks[0].draft > 0, "{:?}", rows(&out));
    }

    #[test]
    fn speculative_chunks_roll_back_rejected_drafts() {
        let mut s = scheduler(SchedulerConfig {
            prefix_caching: true,
            ..config(64, 8, 0, 4, 16)
        });
        speculative(&mut s, 3);
        s.add(confident(seq(0, &[1, 2, 3, 1, 2], greedy(10))));
        // Prefill (no draft: nothing generated yet), samples 3 → [1 2 3 1 2 3].
        let (out, _) = step(&mut s, 3);
        assert_eq!((rows(&out), out.chunks[0].draft), (vec![(0, 0, 5)], 0));
        // Decode: suffix [2 3] recurs at 1..3, followed by [1 2 3]: 1 + 3 rows, room for 9 tokens.
        let out = s.schedule().expect("batch");
        check(&s, std::slice::from_ref(&out));
        assert_eq!(
            (
                rows(&out),
                out.chunks[0].draft,
                out.chunks[0].tokens.clone()
            ),
            (vec![(0, 5, 4)], 3, vec![3, 1, 2, 3])
        );
        assert_eq!(s.kv.num_tokens(0), Some(9));
        // The sampler confirmed draft 1, then chose 9 instead of draft 2.
        let up = s.update_from_tokens(&out, &[vec![1, 9]]);
        assert_eq!(
            up.iter().map(|u| (u.token, u.finish)).collect::<Vec<_>>(),
            vec![(Some(1), None), (Some(9), None)]
        );
        check(&s, &[]);
        // 6 + 1 accepted computed; the table shrank to 7 tokens = 2 blocks.
        assert_eq!(
            (
                s.get(0).map(|q| q.tokens.clone()),
                s.get(0).map(|q| q.num_computed)
            ),
            (Some(vec![1, 2, 3, 1, 2, 3, 1, 9]), Some(7))
        );
        assert_eq!((s.kv.num_tokens(0), s.kv.num_free_blocks()), (Some(7), 14));
        let c = s.counters;
        assert_eq!(
            (c.spec_steps, c.spec_draft_tokens, c.spec_accepted_tokens),
            (1, 3, 1)
        );
        // Next decode: [1 9] and [9] never occurred before: a plain step.
        let (out, _) = step(&mut s, 5);
        assert_eq!((rows(&out), out.chunks[0].draft), (vec![(0, 7, 1)], 0));
        // Block 1 is now full with the real tokens [2 3 1 9]; the rejected draft (2 at 7) was never cached.
        assert_eq!(s.kv.get_computed_blocks(&[1, 2, 3, 1, 2, 3, 1, 9, 0]).1, 8);
        assert_eq!(s.kv.get_computed_blocks(&[1, 2, 3, 1, 2, 3, 1, 2, 0]).1, 4);
        s.cancel_request(0);
        assert_eq!(s.kv.num_free_blocks(), 16);
    }

    #[test]
    fn speculative_chunks_respect_limits_and_stop_inside_the_drafts() {
        let mut s = scheduler(config(64, 8, 0, 4, 16));
        speculative(&mut s, 4);
        // max_tokens 3: after the first token, at most 3 - 1 - 1 = 1 draft.
        s.add(seq(0, &[1, 2, 1], greedy(3)));
        // An EOS among the accepted tokens ends the sequence there.
        s.add(confident(seq(1, &[4, 5, 6, 4, 5, 6], greedy(10))));
        step(&mut s, 2); // [1 2 1 2], [4 5 6 4 5 6 2]
        let out = s.schedule().expect("batch");
        // Seq 0: suffix [1 2] at 0 → [1]; seq 1: suffix [6 2] no, [2] no → no draft.
        assert_eq!(
            out.chunks.iter().map(|c| c.draft).collect::<Vec<_>>(),
            vec![1, 0]
        );
        let up = s.update_from_tokens(&out, &[vec![1, 7], vec![4]]);
        // Seq 0: 1 accepted + 7 = 3 tokens = max_tokens.
        let of0: Vec<(Option<u32>, Option<FinishReason>)> = up
            .iter()
            .filter(|u| u.seq_id == 0)
            .map(|u| (u.token, u.finish))
            .collect();
        assert_eq!(
            of0,
            vec![(Some(1), None), (Some(7), Some(FinishReason::Length))]
        );
        check(&s, &[]);
        // Seq 1: [.. 6 2 4]: suffix [2 4] no, [4] last at 3 → [5 6 2 4]; EOS at the second row.
        let out = s.schedule().expect("batch");
        assert_eq!((rows(&out), out.chunks[0].draft), (vec![(1, 7, 5)], 4));
        let up = s.update_from_tokens(&out, &[vec![5, EOS]]);
        assert_eq!(
            up.iter().map(|u| (u.token, u.finish)).collect::<Vec<_>>(),
            vec![(Some(5), None), (Some(EOS), Some(FinishReason::Stop))]
        );
        assert!(s.is_empty());
        assert_eq!(s.kv.num_free_blocks(), 16);
        // Speculation is for small batches only: 3 running > max_running 2.
        for i in 0..3 {
            s.add(seq(10 + i, &[1, 2, 1], greedy(10)));
        }
        step(&mut s, 2);
        let out = s.schedule().expect("batch");
        assert!(out.chunks.iter().all(|c| c.draft == 0));
    }

    #[test]
    fn fail_batch_fails_only_that_batch() {
        let mut s = scheduler(config(64, 1, 0, 4, 8));
        s.add(request(0, &[1, 2, 3], greedy(4), 2)); // sibling 1 pending
        s.add(seq(2, &[4, 5], greedy(4)));
        let b0 = s.schedule().expect("batch");
        let b1 = s.schedule().expect("batch");
        assert_eq!((rows(&b0), rows(&b1)), (vec![(0, 0, 2)], vec![(2, 0, 2)]));
        let up = s.fail_batch(&b0, "worker 1 panicked");
        assert_eq!(
            up.iter().map(|u| (u.seq_id, u.finish)).collect::<Vec<_>>(),
            vec![
                (1, Some(FinishReason::Error)),
                (0, Some(FinishReason::Error))
            ]
        );
        assert_eq!(
            up[1].error.as_ref().map(ToString::to_string),
            Some("micro-batch 0 failed: worker 1 panicked".to_owned())
        );
        check(&s, std::slice::from_ref(&b1));
        let up = s.update_from_output(&b1, &sampled(&b1, 6));
        assert_eq!(up[0].token, Some(6));
        assert_eq!(s.kv.num_free_blocks(), 7);
    }

    /// Tracking of one sequence in the randomized test.
    struct Track {
        cancelled: bool,
        params: Arc<SamplingParams>,
        num_prompt: usize,
        max_len: usize,
        generated: Vec<u32>,
        finish: Option<FinishReason>,
    }

    /// The randomized driver: a scheduler, up to 2 batches in flight, and a shadow of the
    /// physical K/V (`written[block]` = the token prefix whose last rows that block holds).
    struct Sim {
        s: Scheduler,
        rng: SmallRng,
        in_flight: Vec<SchedulerOutput>,
        written: Vec<Vec<u32>>,
        track: HashMap<u64, Track>,
        prefixes: Vec<Vec<u32>>,
        next_id: u64,
        num_copies: usize,
        num_two_in_flight: usize,
        num_out_of_order: usize,
        num_aborted_in_flight: usize,
    }

    impl Sim {
        fn arrive(&mut self) {
            let rng = &mut self.rng;
            let mut prompt = self.prefixes[rng.gen_range(0..self.prefixes.len())].clone();
            prompt.extend((0..rng.gen_range(1..10)).map(|_| rng.gen_range(0..3)));
            let max_tokens = if rng.gen_bool(0.05) {
                0
            } else {
                rng.gen_range(1..16)
            };
            let params = SamplingParams {
                min_tokens: rng.gen_range(0..3).min(max_tokens),
                ignore_eos: rng.gen_bool(0.1),
                stop_token_ids: if rng.gen_bool(0.2) { vec![4] } else { vec![] },
                prompt_logprobs: rng.gen_bool(0.1).then_some(0),
                ..greedy(max_tokens)
            };
            let n = rng.gen_range(1..=3);
            let id = self.next_id;
            self.next_id += n as u64;
            let mut parent = request(id, &prompt, params, n);
            parent.priority = rng.gen_range(0..2);
            let max_len = prompt.len() + rng.gen_range(1..20);
            parent.max_len = max_len;
            for q in &mut parent.pending_forks {
                q.max_len = max_len;
            }
            for q in std::iter::once(&parent).chain(parent.pending_forks.iter()) {
                self.track.insert(
                    q.id,
                    Track {
                        cancelled: false,
                        params: q.params.clone(),
                        num_prompt: prompt.len(),
                        max_len,
                        generated: Vec::new(),
                        finish: None,
                    },
                );
            }
            self.s.add(parent);
        }

        fn cancel_one(&mut self) {
            let live: Vec<u64> = self
                .track
                .iter()
                .filter(|(_, t)| t.finish.is_none())
                .map(|(&id, _)| id)
                .collect();
            if live.is_empty() {
                return;
            }
            let id = live[self.rng.gen_range(0..live.len())];
            // A stop string is only ever seen in generated text (so never while siblings are
            // pending): then only this completion ends; otherwise the whole request.
            let stop_one = self.rng.gen_bool(0.5) && !self.track[&id].generated.is_empty();
            let request = self.s.get(id).map(|q| q.request_id);
            let marked: Vec<u64> = self
                .s
                .seqs
                .values()
                .filter(|q| {
                    if stop_one {
                        q.id == id
                    } else {
                        Some(q.request_id) == request
                    }
                })
                .flat_map(|q| std::iter::once(q.id).chain(q.pending_forks.iter().map(|c| c.id)))
                .collect();
            for m in marked {
                if let Some(t) = self.track.get_mut(&m) {
                    t.cancelled = true;
                }
            }
            let removed = match (stop_one, request) {
                (true, _) => self.s.cancel_seq(id),
                (false, Some(r)) => self.s.cancel_request(r),
                (false, None) => Vec::new(),
            };
            for q in removed {
                self.record(&SeqUpdate {
                    seq_id: q.id,
                    token: None,
                    finish: Some(FinishReason::Abort),
                    num_cached: 0,
                    error: None,
                });
            }
        }

        fn record(&mut self, u: &SeqUpdate) {
            let t = self
                .track
                .get_mut(&u.seq_id)
                .expect("update for a known sequence");
            assert_eq!(t.finish, None, "update after finish: {u:?}");
            assert!(u.num_cached < t.num_prompt.max(1));
            if let Some(tok) = u.token {
                t.generated.push(tok);
            }
            let g = t.generated.len();
            let p = &t.params;
            assert!(
                g <= p.max_tokens,
                "{g} tokens > max_tokens {}",
                p.max_tokens
            );
            match u.finish {
                None => {}
                Some(FinishReason::Stop) => {
                    let last = t.generated.last().copied();
                    assert!(last.is_some_and(
                        |l| (!p.ignore_eos && l == EOS) || p.stop_token_ids.contains(&l)
                    ));
                    assert!(g > p.min_tokens);
                }
                Some(FinishReason::Length) => {
                    assert!(g == p.max_tokens || t.num_prompt + g >= t.max_len)
                }
                Some(FinishReason::Abort) => {
                    assert!(t.cancelled);
                }
                Some(FinishReason::Error) => panic!("no bug in this test, yet {u:?}"),
            }
            t.finish = u.finish;
        }

        /// Applies `out`'s copies and K/V writes to the shadow, checking first that every
        /// row before each chunk (cache hits, shared and copied blocks) holds its own prefix.
        fn write_kv(&mut self, out: &SchedulerOutput) {
            let bs = self.s.cfg.block_size;
            for &(src, dst) in &out.copies {
                self.written[dst as usize] = self.written[src as usize].clone();
                self.num_copies += 1;
            }
            for c in &out.chunks {
                // The rows written: the sequence's tokens, then any drafts.
                let tokens: Vec<u32> = self.s.seqs[&c.seq_id].tokens[..c.pos]
                    .iter()
                    .chain(&c.tokens)
                    .copied()
                    .collect();
                let end = c.pos + c.tokens.len();
                for j in 0..c.pos.div_ceil(bs) {
                    let b = c.block_table[j] as usize;
                    let upto = ((j + 1) * bs).min(c.pos);
                    // Rows past `upto` may hold a rejected draft's K/V: never read.
                    assert_eq!(
                        self.written[b].get(..upto),
                        Some(&tokens[..upto]),
                        "seq {} reads wrong K/V in block {b}",
                        c.seq_id
                    );
                }
                for j in c.pos / bs..end.div_ceil(bs) {
                    self.written[c.block_table[j] as usize] =
                        tokens[..((j + 1) * bs).min(end)].to_vec();
                }
            }
        }

        fn tick(&mut self, arrivals: bool) {
            if arrivals && self.rng.gen_bool(0.3) {
                self.arrive();
            }
            if self.rng.gen_bool(0.02) {
                self.cancel_one();
            }
            check(&self.s, &self.in_flight);
            if self.in_flight.len() < 2 {
                if let Some(out) = self.s.schedule() {
                    self.write_kv(&out);
                    self.in_flight.push(out);
                    check(&self.s, &self.in_flight);
                }
            }
            assert_eq!(self.s.take_failed(), vec![]);
            self.num_two_in_flight += usize::from(self.in_flight.len() == 2);
            if !self.in_flight.is_empty() && (self.in_flight.len() == 2 || self.rng.gen_bool(0.5)) {
                let i = self.rng.gen_range(0..self.in_flight.len());
                self.num_out_of_order += usize::from(i + 1 < self.in_flight.len());
                let out = self.in_flight.remove(i);
                let rng = &mut self.rng;
                let sampled: Vec<Vec<u32>> = out
                    .chunks
                    .iter()
                    .map(|c| {
                        let Some(ctx) = c.ctx.as_ref().filter(|_| c.sample) else {
                            return Vec::new();
                        };
                        if c.draft > 0 {
                            // A random number of drafts accepted, then a token that is not the next draft
                            // (no stop token: the rows' masks differ; drafts come from the history).
                            let drafts = &c.tokens[c.tokens.len() - c.draft..];
                            let a = rng.gen_range(0..=c.draft);
                            let mut v = drafts[..a].to_vec();
                            v.push(loop {
                                let t = rng.gen_range(0..4);
                                if drafts.get(a) != Some(&t) {
                                    break t;
                                }
                            });
                            return v;
                        }
                        // The sampler never picks masked stop tokens (EOS, 4).
                        vec![if !ctx.mask_stop && rng.gen_bool(0.1) {
                            EOS
                        } else {
                            rng.gen_range(0..if ctx.mask_stop { 4 } else { 5 })
                        }]
                    })
                    .collect();
                for c in &out.chunks {
                    self.num_aborted_in_flight += usize::from(
                        self.s
                            .seqs
                            .get(&c.seq_id)
                            .is_some_and(Sequence::is_cancelled),
                    );
                }
                for u in self.s.update_from_tokens(&out, &sampled) {
                    self.record(&u);
                }
                check(&self.s, &self.in_flight);
            }
        }
    }

    /// 3,000 steps of random arrivals (shared prefixes over a 3-token alphabet, n up to 3,
    /// random limits), random sampled tokens including EOS and stop tokens, random cancels
    /// and stop strings, up to 2 batches in flight returned in random order; every
    /// invariant of [`invariants`] and the K/V content shadow checked after every step;
    /// then a drain: every sequence finished exactly once and the pool whole.
    #[test]
    fn randomized_kv_invariants_after_every_step() {
        randomized(false);
    }

    /// The same with n-gram speculation (up to 3 drafts, a random number accepted, for
    /// batches of up to 4 running sequences): rejected drafts' K/V are never read (the
    /// shadow), tables roll back (the invariants) and the prefix cache serves only
    /// accepted tokens.
    #[test]
    fn randomized_kv_invariants_with_speculation() {
        randomized(true);
    }

    fn randomized(speculation: bool) {
        let mut rng = SmallRng::seed_from_u64(64);
        let num_blocks = 24;
        let prefixes = (0..4)
            .map(|i| (0..i * 5).map(|_| rng.gen_range(0..3)).collect())
            .collect();
        let cfg = SchedulerConfig {
            max_batched_tokens: 24,
            max_seqs: 6,
            prefill_chunk: 10,
            block_size: 4,
            num_blocks,
            prefix_caching: true,
            background_rows: 0,
            admission_reserve: 0,
        };
        let mut sim = Sim {
            s: scheduler(cfg),
            rng,
            in_flight: Vec::new(),
            written: vec![Vec::new(); num_blocks],
            track: HashMap::new(),
            prefixes,
            next_id: 0,
            num_copies: 0,
            num_two_in_flight: 0,
            num_out_of_order: 0,
            num_aborted_in_flight: 0,
        };
        if speculation {
            sim.s.set_speculation(SpeculativeConfig {
                num_tokens: 3,
                ngram_min: 1,
                ngram_max: 2,
                max_running: 4,
                min_acceptance: 0.2,
                cooldown_steps: 2,
                ..SpeculativeConfig::default()
            });
        }
        for _ in 0..3000 {
            sim.tick(true);
        }
        let mut rounds = 0;
        while !(sim.s.is_empty() && sim.in_flight.is_empty()) {
            rounds += 1;
            assert!(
                rounds < 10_000,
                "not drained: {} running, {} waiting",
                sim.s.num_running(),
                sim.s.num_waiting()
            );
            sim.tick(false);
        }
        assert!(
            sim.track.values().all(|t| t.finish.is_some()),
            "a sequence never finished"
        );
        assert_eq!(sim.s.kv.num_free_blocks(), num_blocks);
        assert_eq!(sim.s.kv.num_seqs(), 0);
        // The run exercised what it claims to.
        let finishes = |r| sim.track.values().filter(|t| t.finish == Some(r)).count();
        let (stop, length, abort) = (
            finishes(FinishReason::Stop),
            finishes(FinishReason::Length),
            finishes(FinishReason::Abort),
        );
        let c = sim.s.counters;
        let kv = sim.s.kv.stats();
        let summary = format!(
            "{} seqs: stop {stop} length {length} abort {abort}; preemptions {}; copies {}; hit tokens {}; \
             2 in flight {}; out of order {}; aborted in flight {}",
            sim.track.len(), c.preemptions, sim.num_copies, kv.prefix_hit_tokens, sim.num_two_in_flight,
            sim.num_out_of_order, sim.num_aborted_in_flight
        );
        eprintln!("{summary}");
        assert!(stop > 50 && length > 50 && abort > 10, "{summary}");
        assert!(
            c.preemptions > 100 && sim.num_copies > 200 && kv.prefix_hit_tokens > 5000,
            "{summary}"
        );
        assert!(
            sim.num_two_in_flight > 1000
                && sim.num_out_of_order > 500
                && sim.num_aborted_in_flight > 20,
            "{summary}"
        );
        let spec = format!(
            "verify steps {}, drafts {}, accepted {}",
            c.spec_steps, c.spec_draft_tokens, c.spec_accepted_tokens
        );
        eprintln!("{spec}");
        if speculation {
            assert!(
                c.spec_steps > 300
                    && c.spec_accepted_tokens > 200
                    && c.spec_accepted_tokens < c.spec_draft_tokens,
                "{spec}"
            );
        } else {
            assert_eq!(c.spec_steps, 0);
        }
    }
}
