//! The actor pipeline runtime.
//!
//! ```text
//!  submit ──► [tokenizer] ──► [scheduler] ──► [worker 0] ──► … ──► [worker W-1] ──► [sampler]
//!  (try_send,   validate         │  ▲  ▲         layers a..b          final norm +       │
//!   429 when    (Validator)      │  │  └─────────────── StepResult ──── head ─────────────┘
//!   full)                        │  └── Control: cancel, stop, drain, actor died (never blocks)
//!                                ▼
//!                             [output] ── detokenize, stop strings ──► each request's stream
//! ```
//!
//! Where things are: [`handle`] (the API: [`EngineHandle`], [`ResponseStream`]),
//! [`msg`] (every inter-actor message), [`validation`] (the one
//! [`Validator`]), [`request`] (requests and events), [`error`],
//! [`scheduler`] (the pure continuous-batching core), [`spec`] (n-gram
//! speculative decoding: drafts and their verification), [`stop`] (incremental
//! stop strings), [`fault`] (fault injection), and one file per actor in
//! `actors/`. This file wires them together.
//!
//! Every arrow is a bounded `crossbeam-channel` (capacities from the config);
//! each actor is a named OS thread owning its state.
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
//! drained by an actor that never blocks: it `try_send`s into per-request
//! streams sized for the whole completion, and into the control channel
//! through [`msg::ControlSender`], which parks a message in a side list
//! instead of waiting when the channel is full. Every other control sender
//! (handles, streams, supervisors) uses the same non-blocking sender. The
//! tokenizer actor, which blocks on the scheduler's inbox, is upstream of the
//! cycle and receives nothing from it. Hence no wait-for cycle can form.
//!
//! **Supervision.** Each actor guards the handling of one micro-batch or
//! message with `catch_unwind`: a panic there fails that micro-batch's
//! requests only (error event, blocks freed, nothing cached), and the actor
//! goes on. A panic that escapes an actor (or an actor exiting under the
//! scheduler) marks the engine dead: every open request ends with an error,
//! [`EngineHandle::health`] reports it, and the server answers 503.
//!
//! **No polling.** The scheduler blocks on its three channels (plus one
//! timer only while an idle KV release is due); cancels, aborts, stop-string
//! stops and deaths arrive as control messages.

pub mod actors;
pub mod error;
pub mod fault;
pub mod handle;
pub(crate) mod msg;
pub mod request;
pub mod scheduler;
pub mod spec;
pub mod stop;
pub mod validation;

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::bounded;

pub use error::{EngineError, StartError};
pub use handle::{EngineHandle, EngineStats, ResponseStream};
pub use request::{
    Event, FinishReason, GenerateRequest, Prompt, SamplingParams, Timings, TokenLogprob, Usage,
};
pub use scheduler::{IterationTokens, ITERATION_TOKEN_BUCKETS};
pub use validation::{EngineInfo, ValidRequest, Validator};

use actors::output::OutputActor;
use actors::sampler::SamplerActor;
use actors::scheduler::{probe, ActorState, ChannelProbe, SchedulerActor};
use actors::tokenizer::TokenizerActor;
use actors::worker::{Next, WorkerActor};
use actors::{spawn, Supervisor};
use fault::FaultPlan;
use handle::{HandleInner, Health};
use msg::{control_channel, Admit, LogitsMsg, OutMsg, StepResult, Submission, WorkItem};
use scheduler::{Scheduler, SchedulerConfig};

use crate::config::Config;
use crate::model::kv::KvStore;
use crate::model::llama::Scratch;
use crate::model::Model;
use crate::tokenizer::Tokenizer;

/// Starting point of the runtime.
#[derive(Debug)]
pub struct Engine;

impl Engine {
    /// Starts all actors for `model` with `config`.
    pub fn start(
        model: Arc<Model>,
        tokenizer: Arc<Tokenizer>,
        config: Config,
    ) -> Result<EngineHandle, StartError> {
        let c = model.config.clone();
        let faults = FaultPlan::from_config_or_env(&config.testing.fault)?;
        if !faults.is_empty() {
            tracing::warn!(plan = ?faults, "fault injection is ON");
        }
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let workers = config.workers(cores, c.n_layers);
        let threads = config.threads_per_worker(cores, workers);
        let depth = config.pipeline_depth(workers);
        let cap = config.runtime.channel_capacity.max(depth);
        let num_blocks = config.kv_blocks(c.n_layers, c.kv_dim);
        let block_size = config.kv_cache.block_size;
        let max_len = config.max_len(c.context_length, num_blocks * block_size);
        let validator = Validator::new(
            tokenizer.clone(),
            max_len,
            config.runtime.max_n,
            config.runtime.max_stop_bytes,
            config.tokenizer.parse_special_in_content,
        );
        crate::kernels::tune_allocator();

        let (submit_tx, submit_rx) = bounded::<Submission>(config.runtime.request_queue);
        let (sched_tx, sched_rx) = bounded::<Admit>(cap.max(64));
        let (control_tx, control_rx) =
            control_channel(config.runtime.request_queue.clamp(256, 65536));
        let (out_tx, out_rx) = bounded::<OutMsg>(cap.max(64) * 4);
        let (feedback_tx, feedback_rx) = bounded::<StepResult>(cap);
        let (logits_tx, logits_rx) = bounded::<LogitsMsg>(cap);
        // Logits buffers go back from the sampler to the last worker for reuse
        // (a 64-row batch has 12 MB of logits): one per micro-batch in flight.
        let (recycle_tx, recycle_rx) = bounded::<Vec<f32>>(depth + 1);
        let health = Arc::new(Health::new());
        let sup = Supervisor {
            health: health.clone(),
            control: control_tx.clone(),
        };
        let stats = Arc::new(Mutex::new(EngineStats::default()));
        let busy: Arc<Vec<AtomicU64>> = Arc::new((0..workers).map(|_| AtomicU64::new(0)).collect());
        let mut handles = Vec::new();
        let mut probes: Vec<(String, ChannelProbe)> = vec![
            ("requests".into(), probe(&submit_rx)),
            ("scheduler_inbox".into(), probe(&sched_rx)),
            ("control".into(), probe(&control_rx.rx)),
            ("output".into(), probe(&out_rx)),
            ("feedback".into(), probe(&feedback_rx)),
            ("logits".into(), probe(&logits_rx)),
        ];

        // Workers, last first so each knows its successor.
        let mut next_tx: Option<crossbeam_channel::Sender<WorkItem>> = None;
        let ranges = split_layers(c.n_layers, workers, layer_cost(&c), head_cost(&c));
        for k in (0..workers).rev() {
            let (tx, rx) = bounded::<WorkItem>(cap);
            probes.push((format!("worker_{k}"), probe(&rx)));
            let range = ranges[k].clone();
            let (kv_dim, head_dim, dtype) = (c.kv_dim, c.head_dim, config.kv_cache.dtype);
            let (first, len) = (range.start, range.len());
            let new_kv = move || {
                KvStore::with_dtype(first, len, num_blocks, block_size, kv_dim, head_dim, dtype)
            };
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
            let w = WorkerActor {
                k,
                model: model.clone(),
                range,
                kv: new_kv(),
                new_kv: Box::new(new_kv),
                pool,
                rx,
                next,
                busy: busy.clone(),
                scratch: Scratch::default(),
                head_digits: config.runtime.head_digits(),
                faults: faults.clone(),
                keep_busy: workers * threads <= cores,
            };
            handles.push(spawn(format!("worker-{k}"), &sup, move || w.run())?);
            next_tx = Some(tx);
        }
        drop(logits_tx);
        let worker0 = next_tx.ok_or_else(|| StartError::Spawn("no workers".into()))?;

        // As many sampling threads as a worker has: with one micro-batch in
        // flight, the step waits on the sampler while the workers idle.
        let sampler_pool = if threads > 1 {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("sampler-{i}"))
                    .build()
                    .map_err(|e| StartError::Spawn(e.to_string()))?,
            )
        } else {
            None
        };
        let sampler = SamplerActor {
            rx: logits_rx,
            tx: feedback_tx,
            recycle: recycle_tx,
            vocab: c.vocab_size,
            pool: sampler_pool,
            faults: faults.clone(),
            guidance: validator.guidance().clone(),
        };
        handles.push(spawn("sampler".into(), &sup, move || sampler.run())?);

        let open_completions = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let output = OutputActor::new(
            out_rx,
            tokenizer.clone(),
            control_tx.clone(),
            health.clone(),
            faults.clone(),
            open_completions.clone(),
        );
        handles.push(spawn("output".into(), &sup, move || output.run())?);

        let mut sched = Scheduler::new(SchedulerConfig {
            max_batched_tokens: config.runtime.max_batched_tokens,
            max_seqs: config.runtime.max_seqs,
            prefill_chunk: config.runtime.prefill_chunk,
            block_size,
            num_blocks,
            prefix_caching: config.kv_cache.prefix_caching,
            background_rows: config.runtime.background_rows,
            admission_reserve: config.runtime.admission_reserve_tokens,
        })
        .map_err(|e| StartError::Spawn(format!("kv cache: {e}")))?;
        sched.set_speculation(config.speculative.clone());
        let release = config.kv_cache.release_idle_s;
        let actor = SchedulerActor {
            sched,
            inbox: sched_rx,
            control: control_rx,
            feedback: feedback_rx,
            worker0,
            out: out_tx,
            depth,
            stats: stats.clone(),
            busy: busy.clone(),
            eog: Arc::new(tokenizer.eog_ids().to_vec()),
            probes,
            faults: faults.clone(),
            health: health.clone(),
            release_idle: (release > 0.0).then(|| Duration::from_secs_f64(release)),
            max_len,
            state: ActorState::default(),
        };
        handles.push(spawn("scheduler".into(), &sup, move || actor.run())?);

        let tok_actor = TokenizerActor {
            inbox: submit_rx,
            scheduler: sched_tx,
            validator: validator.clone(),
            faults,
        };
        handles.push(spawn("tokenizer".into(), &sup, move || tok_actor.run())?);

        Ok(EngineHandle::from_inner(HandleInner {
            submit_tx,
            control: control_tx,
            next_id: AtomicU64::new(1),
            stats,
            cancels: Mutex::new(std::collections::HashMap::new()),
            validator,
            model,
            config,
            health,
            open_completions,
            threads: Mutex::new(handles),
            draining: AtomicBool::new(false),
        }))
    }
}

/// Cost per token of one layer: its projection MACs.
fn layer_cost(c: &crate::model::ModelConfig) -> f64 {
    (c.dim * (2 * c.q_dim + 2 * c.kv_dim + 3 * c.ffn_dim)) as f64
}

/// Cost per token of the output head: its MACs weighted by 0.4 — measured on
/// SmolLM2 (64-sequence decode, packed VNNI kernels): the head takes ~3.2
/// layers' time, not the 8 its MACs suggest (attention and norms add to the
/// layers; the one big matmul runs at higher efficiency). With 2 workers this
/// gives 17 + 13 layers.
fn head_cost(c: &crate::model::ModelConfig) -> f64 {
    0.4 * (c.vocab_size * c.dim) as f64
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
