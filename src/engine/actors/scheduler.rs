//! The scheduler actor: the thin shell around the pure [`Scheduler`]. It
//! sleeps until a message arrives (a step result, a control message, a new
//! request), applies it, forms micro-batches while fewer than
//! `pipeline_depth` are in flight, and reports tokens to the output actor.
//! It polls nothing: with no work and no messages it blocks, so an idle
//! engine uses no CPU (one timer is armed only while an idle KV release is due).
//!
//! It never blocks on a send into the step cycle (`try_send` to worker 0 with
//! room guaranteed by the depth bound); sends to the output actor block only
//! on an actor that never blocks.
//!
//! Failures: a micro-batch that comes back failed ends its requests with an
//! error (blocks freed, nothing cached); an actor that died for good
//! (`Control::ActorDied`, or the step cycle closing under it) ends every open
//! request with an error and stops the engine.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{never, select, Receiver, Sender};

use crate::engine::error::EngineError;
use crate::engine::fault::{FaultActor, FaultKind, FaultPlan};
use crate::engine::handle::{EngineStats, Health};
use crate::engine::msg::{Admit, Control, ControlReceiver, OutMsg, StepResult, WorkItem};
use crate::engine::request::{Event, FinishReason, TokenLogprob};
use crate::engine::scheduler::{Scheduler, SchedulerOutput, SeqUpdate, Sequence, Status};
use crate::sampling::Sampled;

/// Reads a channel's length without touching its messages.
pub(crate) type ChannelProbe = Box<dyn Fn() -> (usize, usize) + Send>;

/// A probe of `r`'s occupancy.
pub(crate) fn probe<T: Send + 'static>(r: &Receiver<T>) -> ChannelProbe {
    let r = r.clone();
    Box::new(move || (r.len(), r.capacity().unwrap_or(0)))
}

pub(crate) struct SchedulerActor {
    pub(crate) sched: Scheduler,
    pub(crate) inbox: Receiver<Admit>,
    pub(crate) control: ControlReceiver,
    pub(crate) feedback: Receiver<StepResult>,
    pub(crate) worker0: Sender<WorkItem>,
    pub(crate) out: Sender<OutMsg>,
    pub(crate) depth: usize,
    pub(crate) stats: Arc<Mutex<EngineStats>>,
    pub(crate) busy: Arc<Vec<AtomicU64>>,
    pub(crate) eog: Arc<Vec<u32>>,
    pub(crate) probes: Vec<(String, ChannelProbe)>,
    pub(crate) faults: FaultPlan,
    pub(crate) health: Arc<Health>,
    /// Idle time after which the KV pages are given back (None = never).
    pub(crate) release_idle: Option<Duration>,
    /// Longest sequence (prompt + completion) in tokens.
    pub(crate) max_len: usize,
    pub(crate) state: ActorState,
}

/// The shell's own bookkeeping.
#[derive(Default)]
pub(crate) struct ActorState {
    in_flight: usize,
    next_seq: u64,
    /// Request id → its span (the trace of a request crosses every actor)
    /// and the number of its completions still held.
    spans: HashMap<u64, (tracing::Span, usize)>,
    /// Sequence id → request id, for every sequence held.
    seq_request: HashMap<u64, u64>,
    scheduled_once: HashSet<u64>,
    kv_peak: f64,
    draining: bool,
    inbox_closed: bool,
    control_closed: bool,
    failed_steps: u64,
    /// The KV pool was written since the last release.
    kv_dirty: bool,
    /// When the engine last became idle.
    idle_since: Option<Instant>,
    started: Option<Instant>,
}

/// What woke the loop.
enum Wake {
    Result(StepResult),
    Control(Control),
    Admit(Admit),
    FeedbackClosed,
    ControlClosed,
    InboxClosed,
    Timer,
}

impl SchedulerActor {
    pub(crate) fn run(mut self) {
        self.state.started = Some(Instant::now());
        loop {
            // Everything already waiting, feedback first: it frees sequences.
            while let Ok(r) = self.feedback.try_recv() {
                self.on_result(r);
            }
            while let Ok(c) = self.control.rx.try_recv() {
                self.on_control(c);
            }
            while let Ok(a) = self.inbox.try_recv() {
                self.on_admit(a);
            }
            if let Some(why) = self.health.dead_reason() {
                return self.die(why);
            }
            if let Err(why) = self.schedule() {
                return self.die(why);
            }
            self.publish_stats();
            if self.state.inbox_closed && self.sched.is_empty() && self.state.in_flight == 0 {
                return; // every handle dropped and all work done
            }
            let wake = self.wait();
            match wake {
                Wake::Result(r) => self.on_result(r),
                Wake::Control(c) => self.on_control(c),
                Wake::Admit(a) => self.on_admit(a),
                Wake::FeedbackClosed => {
                    return self
                        .die("the step pipeline stopped (a worker or the sampler exited)".into())
                }
                Wake::ControlClosed => self.state.control_closed = true,
                Wake::InboxClosed => self.state.inbox_closed = true,
                Wake::Timer => self.release_kv_if_idle(),
            }
        }
    }

    /// Blocks until something happens.
    fn wait(&self) -> Wake {
        let inbox = if self.state.inbox_closed {
            never()
        } else {
            self.inbox.clone()
        };
        let control = if self.state.control_closed {
            never()
        } else {
            self.control.rx.clone()
        };
        let timer = match (
            self.release_idle,
            self.state.idle_since,
            self.state.kv_dirty,
        ) {
            (Some(after), Some(since), true) => crossbeam_channel::at(since + after),
            _ => never(),
        };
        select! {
            recv(self.feedback) -> r => r.map_or(Wake::FeedbackClosed, Wake::Result),
            recv(control) -> m => m.map_or(Wake::ControlClosed, Wake::Control),
            recv(inbox) -> m => m.map_or(Wake::InboxClosed, Wake::Admit),
            recv(timer) -> _ => Wake::Timer,
        }
    }

    /// Forms micro-batches while the pipeline has room.
    fn schedule(&mut self) -> Result<(), String> {
        while self.state.in_flight < self.depth {
            let formed = self.sched.schedule();
            // Sequences the scheduler had to fail (a KV bookkeeping bug): loud, never a silent wait.
            let failed = self.sched.take_failed();
            self.fail_updates(failed);
            let Some(batch) = formed else { break };
            self.faults
                .trigger(FaultActor::Scheduler, 0, batch.step_id, FaultKind::Die);
            self.faults
                .trigger(FaultActor::Scheduler, 0, batch.step_id, FaultKind::Panic);
            let span = tracing::debug_span!(parent: None, "step", step = batch.step_id, tokens = batch.num_tokens(), seqs = batch.chunks.len());
            let now = Instant::now();
            for c in &batch.chunks {
                if self.state.scheduled_once.insert(c.seq_id) {
                    let _ = self.out.send(OutMsg::Scheduled {
                        seq_id: c.seq_id,
                        at: now,
                    });
                }
                if !span.is_disabled() {
                    if let Some((rs, _)) = self
                        .sched
                        .get(c.seq_id)
                        .and_then(|s| self.state.spans.get(&s.request_id))
                    {
                        span.follows_from(rs);
                    }
                }
            }
            self.state.kv_dirty = true;
            self.state.idle_since = None;
            self.send_item(batch, span)?;
        }
        Ok(())
    }

    fn send_item(&mut self, batch: SchedulerOutput, span: tracing::Span) -> Result<(), String> {
        let item = WorkItem {
            batch: Arc::new(batch),
            x: Vec::new(),
            failed: None,
            span,
            service: Duration::ZERO,
        };
        match self.worker0.try_send(item) {
            Ok(()) => {
                self.state.in_flight += 1;
                Ok(())
            }
            // Cannot be full (capacity >= depth): worker 0 is gone.
            Err(_) => Err("worker 0 stopped accepting micro-batches".into()),
        }
    }

    /// When idle long enough, forget cached blocks and let every worker drop its K/V pages.
    fn release_kv_if_idle(&mut self) {
        let due = match (self.release_idle, self.state.idle_since) {
            (Some(after), Some(since)) => since.elapsed() >= after,
            _ => false,
        };
        if !due || !self.state.kv_dirty || !self.sched.is_empty() || self.state.in_flight > 0 {
            return;
        }
        match self.sched.reset_kv() {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::error!(error = %e, "idle KV release failed");
                return;
            }
        }
        tracing::debug!("idle: releasing KV memory");
        self.state.kv_dirty = false;
        let step_id = self.sched.next_step_id();
        let batch = SchedulerOutput {
            step_id,
            reset_kv: true,
            ..SchedulerOutput::default()
        };
        if let Err(why) = self.send_item(batch, tracing::Span::none()) {
            self.health.mark_dead(why);
        }
    }

    fn on_admit(&mut self, a: Admit) {
        let Admit {
            id,
            valid,
            tx,
            cancel,
            arrival,
            span,
        } = a;
        if self.state.draining {
            let _ = tx.try_send(Event::Error(EngineError::ShuttingDown)); // caller may have gone
            return;
        }
        let n = valid.params.n.max(1);
        let mut seqs = Vec::with_capacity(n);
        for index in 0..n {
            let seq_id = self.state.next_seq;
            self.state.next_seq += 1;
            self.state.seq_request.insert(seq_id, id);
            let _ = self.out.send(OutMsg::Register {
                seq_id,
                request_id: id,
                index,
                prompt_len: valid.prompt.len(),
                params: valid.params.clone(),
                stop: valid.stop.clone(),
                tx: tx.clone(),
                arrival,
                span: span.clone(),
            });
            seqs.push(Sequence {
                id: seq_id,
                request_id: id,
                index,
                tokens: valid.prompt.as_ref().clone(),
                num_prompt: valid.prompt.len(),
                num_computed: 0,
                num_cached: 0,
                in_flight: false,
                status: Status::Waiting,
                arrival: seq_id,
                priority: valid.priority,
                background: valid.background,
                params: valid.params.clone(),
                seed: valid.seed,
                max_len: self.max_len,
                cancelled: false,
                preemptions: 0,
                eog: self.eog.clone(),
                prompt: valid.prompt.clone(),
                pending_forks: Vec::new(),
                spec: Default::default(),
            });
        }
        span.in_scope(|| {
            tracing::debug!(
                request_id = id,
                completions = n,
                prompt_tokens = valid.prompt.len(),
                "admitted to the scheduler"
            )
        });
        self.state.spans.insert(id, (span, n));
        // Siblings ride on the first completion until it forks them.
        let mut parent = seqs.remove(0);
        parent.pending_forks = seqs;
        self.sched.add(parent);
        // Cancelled before it got here (the cancel message found no request).
        if cancel.load(Ordering::Relaxed) {
            self.cancel_request(id);
        }
    }

    fn on_control(&mut self, c: Control) {
        self.apply_control(c);
        // Messages parked while the channel was full.
        for c in self.control.take_overflow() {
            self.apply_control(c);
        }
    }

    fn apply_control(&mut self, c: Control) {
        match c {
            Control::Cancel(id) => self.cancel_request(id),
            Control::CancelAll => {
                for s in self.sched.cancel_all() {
                    self.finish(s.id, FinishReason::Abort, s.num_cached);
                }
            }
            Control::Stop(seq_id) => {
                for s in self.sched.cancel_seq(seq_id) {
                    // The output actor already sent this completion's end to the
                    // caller; this Finish only lets it drop the completion (and
                    // with the last one, the request's stream).
                    self.finish(s.id, FinishReason::Abort, s.num_cached);
                }
            }
            Control::Drain => self.state.draining = true,
            Control::ActorDied { actor, reason } => {
                tracing::error!(%actor, %reason, "actor died");
                self.health.mark_dead(reason);
            }
            Control::Wake => {}
        }
    }

    fn cancel_request(&mut self, id: u64) {
        for s in self.sched.cancel_request(id) {
            self.finish(s.id, FinishReason::Abort, s.num_cached);
        }
    }

    fn on_result(&mut self, r: StepResult) {
        self.state.in_flight = self.state.in_flight.saturating_sub(1);
        if r.batch.reset_kv {
            // The workers dropped their pages: hand freed heap back to the OS too.
            crate::kernels::release_free_heap();
        }
        if let Some(why) = r.failed {
            self.state.failed_steps += 1;
            let updates = self.sched.fail_batch(&r.batch, &why);
            self.fail_updates(updates);
            self.note_idle();
            return;
        }
        self.sched.observe_step_cost(&r.batch, r.service);
        let tokens: Vec<Vec<u32>> = r
            .sampled
            .iter()
            .map(|s| s.iter().map(|s| s.token).collect())
            .collect();
        for (c, lp) in r.batch.chunks.iter().zip(r.prompt_lp) {
            if !lp.is_empty() {
                let _ = self.out.send(OutMsg::PromptLogprobs {
                    seq_id: c.seq_id,
                    entries: lp,
                });
            }
        }
        // Each sequence's tokens in order (several for a speculative chunk).
        let mut sampled: HashMap<u64, std::collections::VecDeque<Sampled>> = HashMap::new();
        for (c, smp) in r.batch.chunks.iter().zip(r.sampled) {
            if !smp.is_empty() {
                sampled.insert(c.seq_id, smp.into());
            }
        }
        let mut failed = Vec::new();
        for u in self.sched.update_from_tokens(&r.batch, &tokens) {
            if u.error.is_some() {
                failed.push(u);
                continue;
            }
            let next = if u.token.is_some() {
                sampled.get_mut(&u.seq_id).and_then(|q| q.pop_front())
            } else {
                None
            };
            match (u.token, next) {
                (Some(_), Some(s)) => {
                    let token = TokenLogprob {
                        token: s.token,
                        logprob: s.logprob,
                        top: s.top,
                    };
                    let _ = self.out.send(OutMsg::Token {
                        seq_id: u.seq_id,
                        token,
                        finish: u.finish,
                        cached: u.num_cached,
                    });
                }
                _ => {
                    if let Some(reason) = u.finish {
                        let _ = self.out.send(OutMsg::Finish {
                            seq_id: u.seq_id,
                            reason,
                            cached: u.num_cached,
                        });
                    }
                }
            }
            if u.finish.is_some() {
                self.forget_seq(u.seq_id);
            }
        }
        self.fail_updates(failed);
        self.note_idle();
    }

    /// Failed sequences (already removed by the scheduler): their requests end
    /// with one error event, and their other completions are cancelled.
    fn fail_updates(&mut self, updates: Vec<SeqUpdate>) {
        let mut requests: Vec<(u64, String)> = Vec::new();
        for u in updates {
            let why = u
                .error
                .as_ref()
                .map_or_else(|| "the sequence failed".to_string(), ToString::to_string);
            if let Some(&r) = self.state.seq_request.get(&u.seq_id) {
                if !requests.iter().any(|(q, _)| *q == r) {
                    requests.push((r, why));
                }
            }
            self.forget_seq(u.seq_id);
        }
        for (request, why) in requests {
            let _ = self.out.send(OutMsg::Fail {
                request_id: request,
                error: EngineError::Internal(why),
            });
            for s in self.sched.cancel_request(request) {
                self.forget_seq(s.id);
            }
        }
    }

    fn finish(&mut self, seq_id: u64, reason: FinishReason, cached: usize) {
        let _ = self.out.send(OutMsg::Finish {
            seq_id,
            reason,
            cached,
        });
        self.forget_seq(seq_id);
    }

    fn forget_seq(&mut self, seq_id: u64) {
        self.state.scheduled_once.remove(&seq_id);
        let Some(request_id) = self.state.seq_request.remove(&seq_id) else {
            return;
        };
        if let Some((_, open)) = self.state.spans.get_mut(&request_id) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                self.state.spans.remove(&request_id);
            }
        }
        self.note_idle();
    }

    fn note_idle(&mut self) {
        if self.sched.is_empty() && self.state.in_flight == 0 && self.state.idle_since.is_none() {
            self.state.idle_since = Some(Instant::now());
        }
    }

    /// An actor died: every open request ends with an error, the engine stops.
    fn die(mut self, why: String) {
        self.health.mark_dead(why.clone());
        let error = EngineError::Dead(why);
        for request in self.sched.request_ids() {
            let _ = self.out.try_send(OutMsg::Fail {
                request_id: request,
                error: error.clone(),
            });
        }
        // Requests not yet admitted.
        while let Ok(a) = self.inbox.try_recv() {
            let _ = a.tx.try_send(Event::Error(error.clone()));
        }
        self.publish_stats();
        // Dropping self closes worker 0's inbox and the output channel: the
        // rest of the pipeline winds down, and the output actor errors anything left.
    }

    fn publish_stats(&mut self) {
        let kv = self.sched.kv.stats();
        let usage = if kv.num_blocks > 0 {
            kv.num_used_blocks as f64 / kv.num_blocks as f64
        } else {
            0.0
        };
        self.state.kv_peak = self.state.kv_peak.max(usage);
        let (queries, hits) = self.sched.prefix_stats();
        if let Ok(mut s) = self.stats.lock() {
            s.running = self.sched.num_running();
            s.waiting = self.sched.num_waiting();
            s.kv_blocks_total = kv.num_blocks;
            s.kv_blocks_free = kv.num_free_blocks;
            s.kv_usage = usage;
            s.kv_usage_peak = self.state.kv_peak;
            s.prefix_queries = queries;
            s.prefix_hits = hits;
            s.preemptions = self.sched.counters.preemptions;
            s.steps = self.sched.counters.steps;
            s.failed_steps = self.state.failed_steps;
            s.prefill_tokens = self.sched.counters.prefill_tokens;
            s.decode_tokens = self.sched.counters.decode_tokens;
            s.iteration_tokens = self.sched.counters.iteration_tokens;
            s.spec_steps = self.sched.counters.spec_steps;
            s.spec_draft_tokens = self.sched.counters.spec_draft_tokens;
            s.spec_accepted_tokens = self.sched.counters.spec_accepted_tokens;
            s.spec_row_cost_ratio = self.sched.verify_row_ratio();
            s.worker_busy_s = self
                .busy
                .iter()
                .map(|b| b.load(Ordering::Relaxed) as f64 * 1e-9)
                .collect();
            s.channels = self
                .probes
                .iter()
                .map(|(n, p)| {
                    let (len, cap) = p();
                    (n.clone(), len, cap)
                })
                .collect();
            s.in_flight = self.state.in_flight;
            s.uptime_s = self
                .state
                .started
                .map_or(0.0, |t| t.elapsed().as_secs_f64());
        }
    }
}
