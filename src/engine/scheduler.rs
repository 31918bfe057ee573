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

/// What happened to a sequence when a micro-batch came back.
#[derive(Clone, Debug, PartialEq)]
pub struct SeqUpdate {
    /// Sequence id.
    pub seq_id: u64,
    /// The sampled token, if the chunk sampled one.
    pub token: Option<u32>,
    /// Set when the sequence ended (its blocks are already freed).
    pub finish: Option<FinishReason>,
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
    /// Counters.
    pub counters: SchedulerCounters,
    /// Prefix-cache statistics of KV managers replaced by [`Self::reset_kv`].
    stats_offset: (u64, u64),
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
            counters: SchedulerCounters::default(),
            stats_offset: (0, 0),
        })
    }

    /// Most tokens one sequence can ever hold (all blocks).
    pub fn capacity_tokens(&self) -> usize {
        self.cfg.num_blocks * self.cfg.block_size
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

    /// Number of running / waiting sequences.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }
    /// Waiting sequences.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }
    /// Sequences in flight.
    pub fn num_in_flight(&self) -> usize {
        self.running.iter().filter(|id| self.seqs.get(id).is_some_and(|s| s.in_flight)).count()
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
        let ids: Vec<u64> = self.seqs.values().filter(|s| s.request_id == request_id).map(|s| s.id).collect();
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

    /// A micro-batch came back failed (a stage panicked): its sequences are
    /// no longer in flight and nothing they computed is kept. Returns the
    /// requests they belong to (the caller fails them as a whole).
    pub fn fail_batch(&mut self, batch: &SchedulerOutput) -> Vec<u64> {
        let mut requests = Vec::new();
        for c in &batch.chunks {
            if let Some(s) = self.seqs.get_mut(&c.seq_id) {
                s.in_flight = false;
                if !requests.contains(&s.request_id) {
                    requests.push(s.request_id);
                }
            }
        }
        requests
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
        self.kv = KvCacheManager::new(self.cfg.num_blocks, self.cfg.block_size, self.cfg.prefix_caching)?;
        Ok(true)
    }

    /// Prompt tokens looked up in / found in the prefix cache since start.
    pub fn prefix_stats(&self) -> (u64, u64) {
        let st = self.kv.stats();
        (st.prefix_query_tokens + self.stats_offset.0, st.prefix_hit_tokens + self.stats_offset.1)
    }

    /// Removes a sequence that is not in flight, freeing its blocks.
    pub fn remove(&mut self, id: u64) -> Option<Sequence> {
        if self.seqs.get(&id)?.in_flight {
            return None;
        }
        let seq = self.seqs.remove(&id)?;
        match seq.status {
            Status::Running => {
                self.kv.free(id);
                self.running.retain(|&r| r != id);
            }
            Status::Waiting => self.waiting.retain(|&w| w != id),
        }
        Some(seq)
    }

    /// Preempts running sequence `id` (not in flight): frees its blocks and
    /// puts it at the front of the waiting queue for recompute.
    fn preempt(&mut self, id: u64) {
        self.kv.free(id);
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
        let mut n = remaining.min(budget);
        if self.cfg.prefill_chunk > 0 {
            n = n.min(self.cfg.prefill_chunk.max(1));
        }
        n
    }

    /// Forms the next micro-batch, or `None` when nothing can run now.
    pub fn schedule(&mut self) -> Option<SchedulerOutput> {
        let mut budget = self.cfg.max_batched_tokens;
        let mut chunks = Vec::new();

        // 1. Running sequences, oldest first.
        let mut copies = Vec::new();
        let mut order: Vec<u64> = self.running.clone();
        order.sort_by_key(|id| self.seqs.get(id).map(|s| s.arrival).unwrap_or(u64::MAX));
        let mut i = 0;
        while i < order.len() {
            let id = order[i];
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
                for child in self.fork_children(id) {
                    order.push(child);
                }
            }
            let Some(s) = self.seqs.get(&id) else { continue };
            let remaining = s.target_len() - s.num_computed;
            if remaining == 0 {
                continue;
            }
            let n = self.chunk_len(remaining, budget);
            let need = s.num_computed + n;
            // Make room (private copies of shared blocks, then new blocks),
            // preempting the latest arrivals if blocks ran out.
            let mut ok = self.make_room(id, need, &mut copies);
            while !ok {
                let victim = self
                    .running
                    .iter()
                    .filter_map(|r| self.seqs.get(r))
                    .filter(|v| !v.in_flight)
                    .max_by_key(|v| v.arrival)
                    .map(|v| v.id);
                match victim {
                    Some(v) => {
                        self.preempt(v);
                        if v == id {
                            break;
                        }
                        ok = self.make_room(id, need, &mut copies);
                    }
                    None => break,
                }
            }
            if !ok {
                continue;
            }
            chunks.push(self.make_chunk(id, n));
            budget -= n;
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
            if !self.kv.allocate(id, num_cached + n, computed).unwrap_or(false) {
                break;
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
            if n == 0 {
                continue;
            }
            chunks.push(self.make_chunk(id, n));
            budget -= n;
        }

        if chunks.is_empty() {
            return None;
        }
        for c in &chunks {
            if let Some(s) = self.seqs.get_mut(&c.seq_id) {
                s.in_flight = true;
                if c.pos + c.tokens.len() <= s.num_prompt {
                    self.counters.prefill_tokens += c.tokens.len() as u64;
                } else {
                    self.counters.decode_tokens += c.tokens.len() as u64;
                }
            }
        }
        let step_id = self.next_step;
        self.next_step += 1;
        self.counters.steps += 1;
        Some(SchedulerOutput { step_id, chunks, copies, reset_kv: false })
    }

    /// Gives `id` private copies of shared blocks it will write and room for
    /// `need` tokens; false (nothing changed but earlier copies) if blocks ran out.
    fn make_room(&mut self, id: u64, need: usize, copies: &mut Vec<(u32, u32)>) -> bool {
        match self.kv.copy_on_write(id) {
            Ok(Some(c)) => copies.push(c),
            Ok(None) => {}
            Err(_) => return false,
        }
        self.kv.grow(id, need).unwrap_or(false)
    }

    /// Forks the pending siblings of `parent`; returns their ids.
    fn fork_children(&mut self, parent: u64) -> Vec<u64> {
        let Some(p) = self.seqs.get_mut(&parent) else { return Vec::new() };
        let children = std::mem::take(&mut p.pending_forks);
        let computed = p.num_computed;
        let cached = p.num_cached;
        let mut ids = Vec::new();
        for mut c in children {
            if self.kv.fork(parent, c.id).is_err() {
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

    fn make_chunk(&self, id: u64, n: usize) -> ScheduledChunk {
        let s = &self.seqs[&id];
        let pos = s.num_computed;
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
        ScheduledChunk {
            seq_id: id,
            pos,
            tokens: s.tokens[pos..pos + n].to_vec(),
            block_table: self.kv.block_table(id).map(<[u32]>::to_vec).unwrap_or_default(),
            sample,
            all_logits,
            ctx,
        }
    }

    /// Applies a returned micro-batch: advances computed counts, appends
    /// sampled tokens (`sampled[i]` for chunk `i`), detects finished
    /// sequences and frees their blocks. Cancelled sequences finish with `Abort`.
    pub fn update_from_output(&mut self, batch: &SchedulerOutput, sampled: &[Option<u32>]) -> Vec<SeqUpdate> {
        let mut updates = Vec::with_capacity(batch.chunks.len());
        for (c, tok) in batch.chunks.iter().zip(sampled) {
            let Some(s) = self.seqs.get_mut(&c.seq_id) else { continue };
            s.in_flight = false;
            s.num_computed = c.pos + c.tokens.len();
            let computed = s.num_computed;
            let mut finish = None;
            let mut token = None;
            if s.is_cancelled() {
                finish = Some(FinishReason::Abort);
            } else if let (true, Some(t)) = (c.sample, *tok) {
                s.tokens.push(t);
                token = Some(t);
                let generated = s.num_generated();
                let p = &s.params;
                let is_stop = (!p.ignore_eos && s.eog.contains(&t)) || p.stop_token_ids.contains(&t);
                if is_stop && generated > p.min_tokens.min(generated.saturating_sub(1)) {
                    finish = Some(FinishReason::Stop);
                } else if generated >= p.max_tokens || s.tokens.len() >= s.max_len {
                    finish = Some(FinishReason::Length);
                }
            }
            if finish.is_none() && s.params.max_tokens == 0 && computed == s.tokens.len() {
                finish = Some(FinishReason::Length);
            }
            {
                let s = &self.seqs[&c.seq_id];
                // Only computed tokens (the sampled one has no K/V yet).
                let _ = self.kv.commit_full_blocks(c.seq_id, &s.tokens[..computed]);
            }
            if finish.is_some() {
                if let Some(mut removed) = self.remove(c.seq_id) {
                    for child in removed.pending_forks.drain(..) {
                        updates.push(SeqUpdate { seq_id: child.id, token: None, finish: Some(FinishReason::Abort) });
                    }
                }
            }
            updates.push(SeqUpdate { seq_id: c.seq_id, token, finish });
        }
        updates
    }
}
