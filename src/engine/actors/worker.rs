//! A layer-group worker: owns layers `a..b` (their weights are shared, read
//! only) and the physical K/V of those layers for every block; runs each
//! micro-batch through its layers and hands it on. The last worker also
//! applies the final norm and output head: to the sampling rows (one per
//! sequence that samples; `1 + draft` for a speculative chunk), and, in
//! chunks of [`PROMPT_LOGPROB_ROWS`] rows, to
//! prompt rows whose log-probabilities were asked for, reducing each row to
//! the token's log-probability and the top-k as soon as it is computed (a
//! full-vocabulary row per prompt token is never kept).
//!
//! A panic inside one micro-batch is caught: the item goes on marked failed,
//! so its requests end with an error and the worker serves the next one.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use rayon::prelude::*;

use super::guarded;
use crate::engine::fault::{fire, FaultActor, FaultKind, FaultPlan};
use crate::engine::msg::{LogitsMsg, PromptLogprobs, WorkItem};
use crate::engine::request::TokenLogprob;
use crate::engine::scheduler::SchedulerOutput;
use crate::model::kv::KvStore;
use crate::model::llama::{Scratch, SeqChunk};
use crate::model::Model;
use crate::sampling;

/// Prompt rows turned into logits at once when prompt log-probabilities are asked for.
pub(crate) const PROMPT_LOGPROB_ROWS: usize = 32;

/// Where a worker's output goes.
pub(crate) enum Next {
    /// The next layer group.
    Worker(Sender<WorkItem>),
    /// The sampler (this is the last worker); logits buffers come back for reuse.
    Sampler(Sender<LogitsMsg>, Receiver<Vec<f32>>),
}

pub(crate) struct WorkerActor {
    pub(crate) k: usize,
    pub(crate) model: Arc<Model>,
    pub(crate) range: Range<usize>,
    pub(crate) kv: KvStore,
    /// Makes a fresh (unallocated, zeroed) KV store: the idle release.
    pub(crate) new_kv: Box<dyn Fn() -> KvStore + Send>,
    pub(crate) pool: Option<rayon::ThreadPool>,
    pub(crate) rx: Receiver<WorkItem>,
    pub(crate) next: Next,
    pub(crate) busy: Arc<Vec<AtomicU64>>,
    pub(crate) scratch: Scratch,
    /// Activation digits of the output head (`runtime.head_activation_digits`).
    pub(crate) head_digits: crate::kernels::Digits,
    pub(crate) faults: FaultPlan,
    /// Keep the pool's other threads polling for work while a micro-batch
    /// runs ([`install_busy`]): only when every worker thread has a core.
    pub(crate) keep_busy: bool,
}

/// Runs `f` on `pool` with the pool's other threads polling for its parallel
/// work (Rayon's `yield_now`, then the OS's) until `f` returns, instead of
/// falling asleep between the many short parallel loops of a forward pass
/// and being woken (a futex call and a wake-up latency each, ~15% of the
/// cores idle at 64 streams on 2 cores). Scheduling only: the same work runs,
/// so results are the same bits.
pub(crate) fn install_busy<R: Send>(pool: &rayon::ThreadPool, f: impl FnOnce() -> R + Send) -> R {
    pool.install(|| {
        let done = Arc::new(AtomicBool::new(false));
        let me = rayon::current_thread_index();
        let flag = done.clone();
        rayon::spawn_broadcast(move |ctx| {
            // The thread running `f` must not poll: `f` is below it on its stack.
            if Some(ctx.index()) == me {
                return;
            }
            while !flag.load(Ordering::Acquire) {
                if rayon::yield_now() != Some(rayon::Yield::Executed) {
                    std::thread::yield_now();
                }
            }
        });
        // Set on return and on unwind (a panicking micro-batch is caught
        // by the worker): the pollers always stop.
        struct Done(Arc<AtomicBool>);
        impl Drop for Done {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let _done = Done(done);
        f()
    })
}

/// `pool.install(f)`, with [`install_busy`] when `poll`.
fn install_on<R: Send>(pool: &rayon::ThreadPool, poll: bool, f: impl FnOnce() -> R + Send) -> R {
    if poll {
        install_busy(pool, f)
    } else {
        pool.install(f)
    }
}

impl WorkerActor {
    pub(crate) fn run(mut self) {
        while let Ok(mut item) = self.rx.recv() {
            let t0 = Instant::now();
            let step = item.batch.step_id;
            self.faults
                .trigger(FaultActor::Worker, self.k, step, FaultKind::Die);
            let span = item.span.clone();
            let _g = span.enter();
            if item.batch.reset_kv {
                // Idle release: no sequence holds a block; give the pages back,
                // with the scratch grown for the largest batch and the recycled
                // logits buffers (a 64-row buffer is 12 MB).
                self.kv = (self.new_kv)();
                self.scratch = Scratch::default();
                if let Next::Sampler(_, recycled) = &self.next {
                    while recycled.try_recv().is_ok() {}
                }
            }
            if item.failed.is_none() && !item.batch.chunks.is_empty() {
                let k = self.k;
                let inject = self.faults.at(FaultActor::Worker, k, step) == Some(FaultKind::Panic);
                let r = guarded(|| {
                    if inject {
                        fire(FaultActor::Worker, k, step, FaultKind::Panic);
                    }
                    self.forward(&mut item)
                });
                if let Err(panic) = r {
                    tracing::error!(worker = self.k, step, %panic, "micro-batch failed");
                    item.failed = Some(format!("worker {} failed on step {step}: {panic}", self.k));
                }
            }
            let sent = if matches!(self.next, Next::Sampler(..)) {
                let mut msg = self.head(item);
                msg.service += t0.elapsed();
                self.add_busy(t0);
                match &self.next {
                    Next::Sampler(tx, _) => tx.send(msg).is_ok(),
                    Next::Worker(_) => false,
                }
            } else {
                item.service += t0.elapsed();
                self.add_busy(t0);
                match &self.next {
                    Next::Worker(tx) => tx.send(item).is_ok(),
                    Next::Sampler(..) => false,
                }
            };
            if !sent {
                return; // downstream gone: shutting down (or it died: the supervisor reports it)
            }
        }
    }

    /// Copies, embeddings (first worker) and this group's layers.
    fn forward(&mut self, item: &mut WorkItem) {
        let dim = self.model.config.dim;
        let batch = item.batch.clone();
        let n = batch.num_tokens();
        for &(src, dst) in &batch.copies {
            self.kv.copy_block(src as usize, dst as usize);
        }
        if self.k == 0 {
            item.x.resize(n * dim, 0.0);
            let mut row = 0;
            for c in &batch.chunks {
                self.model.embed(
                    &c.tokens,
                    &mut item.x[row * dim..(row + c.tokens.len()) * dim],
                );
                row += c.tokens.len();
            }
        }
        let chunks: Vec<SeqChunk<'_>> = batch
            .chunks
            .iter()
            .map(|c| SeqChunk {
                pos: c.pos,
                len: c.tokens.len(),
                block_table: &c.block_table,
            })
            .collect();
        // Run on the worker's own pool: the nested parallel loops of every
        // matmul are then cheap work-stealing forks, not cross-thread wakeups.
        let (model, range, kv, scratch) = (
            &self.model,
            self.range.clone(),
            &mut self.kv,
            &mut self.scratch,
        );
        match &self.pool {
            Some(p) => install_on(p, self.keep_busy, || {
                model.forward_layers(range, &mut item.x, &chunks, kv, scratch, Some(p))
            }),
            None => model.forward_layers(range, &mut item.x, &chunks, kv, scratch, None),
        }
    }

    /// The last worker: final norm + output head for the rows that need logits.
    fn head(&mut self, item: WorkItem) -> LogitsMsg {
        let WorkItem {
            batch,
            x,
            failed,
            span,
            service,
        } = item;
        let nchunks = batch.chunks.len();
        let mut msg = LogitsMsg {
            batch: batch.clone(),
            rows: Vec::new(),
            logits: Vec::new(),
            prompt_lp: vec![Vec::new(); nchunks],
            failed,
            span,
            service,
        };
        if msg.failed.is_some() || nchunks == 0 {
            return msg;
        }
        let step = batch.step_id;
        let r = guarded(|| self.head_rows(&batch, &x));
        match r {
            Ok((rows, logits, prompt_lp)) => {
                msg.rows = rows;
                msg.logits = logits;
                msg.prompt_lp = prompt_lp;
            }
            Err(panic) => {
                tracing::error!(worker = self.k, step, %panic, "output head failed");
                msg.failed = Some(format!("worker {} failed on step {step}: {panic}", self.k));
            }
        }
        msg
    }

    fn head_rows(
        &mut self,
        batch: &SchedulerOutput,
        x: &[f32],
    ) -> (Vec<usize>, Vec<f32>, PromptLogprobs) {
        let dim = self.model.config.dim;
        let vocab = self.model.config.vocab_size;
        let mut offsets = Vec::with_capacity(batch.chunks.len());
        let mut acc = 0;
        for c in &batch.chunks {
            offsets.push(acc);
            acc += c.tokens.len();
        }
        // Sampling rows: the last row of each chunk that samples, or its last
        // `1 + draft` rows (speculative decoding: the row of its last token and
        // one per draft), in order; `rows` names each one's chunk.
        let mut rows: Vec<usize> = Vec::with_capacity(batch.chunks.len());
        let mut xs = Vec::with_capacity(batch.chunks.len() * dim);
        for (ci, c) in batch.chunks.iter().enumerate().filter(|(_, c)| c.sample) {
            let len = c.tokens.len();
            for r in len - (c.draft + 1).min(len)..len {
                let row = offsets[ci] + r;
                rows.push(ci);
                xs.extend_from_slice(&x[row * dim..(row + 1) * dim]);
            }
        }
        let mut logits = match &self.next {
            Next::Sampler(_, recycled) => recycled.try_recv().unwrap_or_default(),
            Next::Worker(_) => Vec::new(),
        };
        // Every element is overwritten by the head: a recycled buffer of the
        // right size is not zeroed again (a 64-row pass over 67 MB).
        logits.resize(rows.len() * vocab, 0.0);
        if !rows.is_empty() {
            self.logits(&xs, &mut logits);
        }
        // Prompt log-probabilities: rows predicting a prompt token, in chunks.
        let mut prompt_lp: PromptLogprobs = vec![Vec::new(); batch.chunks.len()];
        let mut buf = Vec::new();
        for (ci, c) in batch.chunks.iter().enumerate() {
            let Some(ctx) = c.ctx.as_ref().filter(|_| c.all_logits) else {
                continue;
            };
            let top_n = ctx.params.prompt_logprobs.unwrap_or(0);
            // Row r (position c.pos + r) predicts the token at c.pos + r + 1.
            let wanted: Vec<usize> = (0..c.tokens.len())
                .filter(|r| c.pos + r + 1 < ctx.prompt.len())
                .collect();
            for group in wanted.chunks(PROMPT_LOGPROB_ROWS) {
                xs.clear();
                for &r in group {
                    let row = offsets[ci] + r;
                    xs.extend_from_slice(&x[row * dim..(row + 1) * dim]);
                }
                buf.clear();
                buf.resize(group.len() * vocab, 0.0);
                self.logits(&xs, &mut buf);
                let reduce = |(i, raw): (usize, &[f32])| {
                    let pos = c.pos + group[i] + 1;
                    let next = ctx.prompt.get(pos).copied().unwrap_or(0);
                    (pos, prompt_logprob(raw, next, top_n))
                };
                let entries: Vec<(usize, TokenLogprob)> = match &self.pool {
                    Some(p) => p.install(|| {
                        buf.par_chunks_exact(vocab)
                            .enumerate()
                            .map(reduce)
                            .collect()
                    }),
                    None => buf.chunks_exact(vocab).enumerate().map(reduce).collect(),
                };
                prompt_lp[ci].extend(entries);
            }
        }
        (rows, logits, prompt_lp)
    }

    fn logits(&mut self, xs: &[f32], out: &mut [f32]) {
        let (model, scratch, digits) = (&self.model, &mut self.scratch, self.head_digits);
        match &self.pool {
            Some(p) => install_on(p, self.keep_busy, || {
                model.logits(xs, out, scratch, Some(p), digits)
            }),
            None => model.logits(xs, out, scratch, None, digits),
        }
    }

    fn add_busy(&self, t0: Instant) {
        if let Some(b) = self.busy.get(self.k) {
            b.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
    }
}

/// One prompt position's entry: the log-probability of the actual `next` token and the top `n`.
fn prompt_logprob(raw: &[f32], next: u32, n: usize) -> TokenLogprob {
    let lse = sampling::logsumexp(raw);
    let top = if n > 0 {
        sampling::top_k_entries(raw, n)
            .into_iter()
            .map(|(t, v)| (t, v - lse))
            .collect()
    } else {
        Vec::new()
    };
    let logprob = raw
        .get(next as usize)
        .map_or(f32::NEG_INFINITY, |v| v - lse);
    TokenLogprob {
        token: next,
        logprob,
        top,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_busy_runs_nested_parallel_work_to_the_end() {
        for threads in [2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for i in 0..300u64 {
                let (a, b) = install_busy(&pool, || {
                    rayon::join(
                        || (0..20_000u64).into_par_iter().map(|x| x * i).sum::<u64>(),
                        || (0..1000u64).into_par_iter().map(|x| x + i).sum::<u64>(),
                    )
                });
                assert_eq!(
                    (a, b),
                    (i * (19_999 * 20_000 / 2), 999 * 1000 / 2 + 1000 * i)
                );
            }
            // A panic inside stops the pollers too: the pool still serves.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                install_busy(&pool, || {
                    (0..1000u64)
                        .into_par_iter()
                        .for_each(|x| assert!(x < 999, "boom"));
                })
            }));
            assert!(r.is_err());
            let n: u64 = install_busy(&pool, || (0..100u64).into_par_iter().sum());
            assert_eq!(n, 4950);
        }
    }
}
