//! The admission actor: a tokio task that owns the [`FairQueue`] and the
//! tenants' token buckets, and moves requests into the engine (`submit`) when
//! fewer than `max_running` sequences are in flight, tenant by tenant in
//! Virtual Token Counter order.
//!
//! ```text
//!  handler ──try_send(Enqueue)──► [admission] ──submit──► engine
//!     ▲       (Full → 429)          │  ▲  ▲
//!     └──── oneshot<Admitted> ──────┘  │  └── Ticket drop: done slots (atomics + Notify)
//!                                      └───── Ticket::add_output: generated tokens (atomics)
//! ```
//!
//! Handlers report progress through per-tenant atomics and a `Notify`, never by
//! blocking sends, so a finishing or disconnecting request can always report.
//! Owns: queues, counters, buckets. Does not own: HTTP, the engine's own queue.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Notify};

use super::config::TenantConfig;
use super::error::ApiError;
use super::fair::{FairQueue, PushError, TenantShare, TokenBucket};
use crate::engine::{EngineHandle, GenerateRequest, ResponseStream};
use crate::metrics::Metrics;

/// A request admitted into the engine.
#[derive(Debug)]
pub struct Admitted {
    /// The engine's event stream (dropping it cancels the request).
    pub stream: ResponseStream,
    /// Holds the request's engine slots until dropped.
    pub ticket: Ticket,
    /// When it left the fair queue.
    pub admitted_at: Instant,
}

/// What a handler waits on after [`AdmissionHandle::enqueue`].
pub type AdmissionReply = oneshot::Receiver<Result<Admitted, ApiError>>;

struct TenantShared {
    name: String,
    pending_output: AtomicU64,
    done_slots: AtomicUsize,
}

struct Shared {
    tenants: Vec<TenantShared>,
    notify: Notify,
    queued: AtomicUsize,
    in_flight: AtomicUsize,
    draining: AtomicBool,
}

/// A request's claim on engine sequences; dropping it returns them.
pub struct Ticket {
    tenant: usize,
    slots: usize,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket").field("tenant", &self.tenant).field("slots", &self.slots).finish()
    }
}

impl Ticket {
    /// Charges `n` generated tokens to the tenant's virtual counter and token bucket.
    pub fn add_output(&self, n: u64) {
        if let Some(t) = self.shared.tenants.get(self.tenant) {
            t.pending_output.fetch_add(n, Ordering::Relaxed);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(t) = self.shared.tenants.get(self.tenant) {
            t.done_slots.fetch_add(self.slots, Ordering::Relaxed);
        }
        self.shared.notify.notify_one();
    }
}

struct Pending {
    req: GenerateRequest,
    reply: oneshot::Sender<Result<Admitted, ApiError>>,
    span: tracing::Span,
}

enum AdmissionMsg {
    Enqueue { tenant: usize, priority: i32, input_tokens: usize, pending: Box<Pending> },
    FailQueued,
}

/// The handlers' side of the admission actor. Cheap to clone.
#[derive(Clone)]
pub struct AdmissionHandle {
    tx: mpsc::Sender<AdmissionMsg>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AdmissionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdmissionHandle").finish_non_exhaustive()
    }
}

/// Settings of the admission actor.
#[derive(Clone, Debug)]
pub struct AdmissionConfig {
    /// Tenants (index = tenant id).
    pub tenants: Vec<TenantConfig>,
    /// Most engine sequences in flight.
    pub max_running: usize,
    /// Inbox capacity.
    pub inbox: usize,
    /// VTC price of a prompt token.
    pub input_weight: f64,
    /// VTC price of a generated token.
    pub output_weight: f64,
    /// `Retry-After` for full queues.
    pub retry_after_s: u64,
}

impl AdmissionHandle {
    /// Spawns the actor on the current tokio runtime.
    pub fn spawn(cfg: AdmissionConfig, engine: EngineHandle, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::channel(cfg.inbox.max(1));
        let shared = Arc::new(Shared {
            tenants: cfg
                .tenants
                .iter()
                .map(|t| TenantShared { name: t.name.clone(), pending_output: AtomicU64::new(0), done_slots: AtomicUsize::new(0) })
                .collect(),
            notify: Notify::new(),
            queued: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
        });
        let started = Instant::now();
        let shares = cfg
            .tenants
            .iter()
            .map(|t| TenantShare { weight: t.weight, max_concurrent: t.max_concurrent, max_queued: t.max_queued })
            .collect();
        let buckets = cfg
            .tenants
            .iter()
            .map(|t| (t.tokens_per_minute > 0).then(|| TokenBucket::new(t.tokens_per_minute, 0.0)))
            .collect();
        let actor = AdmissionActor {
            fq: FairQueue::new(shares, cfg.input_weight, cfg.output_weight),
            buckets,
            rx,
            shared: shared.clone(),
            engine,
            metrics,
            max_running: cfg.max_running.max(1),
            retry_after_s: cfg.retry_after_s,
            inbox_cap: cfg.inbox.max(1),
            started,
            tx_probe: tx.downgrade(),
        };
        tokio::spawn(actor.run());
        Self { tx, shared }
    }

    /// Queues a request of `tenant`; the reply resolves when it is admitted or refused.
    pub fn enqueue(&self, tenant: usize, priority: i32, input_tokens: usize, req: GenerateRequest) -> Result<AdmissionReply, ApiError> {
        if self.shared.draining.load(Ordering::Relaxed) {
            return Err(ApiError::Unavailable("the server is shutting down".into()));
        }
        let (reply, rx) = oneshot::channel();
        let pending = Box::new(Pending { req, reply, span: tracing::Span::current() });
        match self.tx.try_send(AdmissionMsg::Enqueue { tenant, priority, input_tokens, pending }) {
            Ok(()) => Ok(rx),
            Err(mpsc::error::TrySendError::Full(_)) => {
                Err(ApiError::RateLimited { message: "the server is overloaded: admission queue full".into(), retry_after_s: 1 })
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(ApiError::Unavailable("the server is shutting down".into())),
        }
    }

    /// Refuses new requests from now on.
    pub fn start_draining(&self) {
        self.shared.draining.store(true, Ordering::Relaxed);
    }

    /// Answers every queued (not yet admitted) request with 503.
    pub async fn fail_queued(&self) {
        let _ = self.tx.send(AdmissionMsg::FailQueued).await; // actor gone: nothing queued
    }

    /// Requests waiting in the fair queue.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed)
    }

    /// Engine sequences held by admitted requests (tickets not yet dropped).
    pub fn in_flight(&self) -> usize {
        let done: usize = self.shared.tenants.iter().map(|t| t.done_slots.load(Ordering::Relaxed)).sum();
        self.shared.in_flight.load(Ordering::Relaxed).saturating_sub(done)
    }

    /// Tenant names, by index.
    pub fn tenant_name(&self, k: usize) -> &str {
        self.shared.tenants.get(k).map_or("unknown", |t| t.name.as_str())
    }
}

struct AdmissionActor {
    fq: FairQueue<Pending>,
    buckets: Vec<Option<TokenBucket>>,
    rx: mpsc::Receiver<AdmissionMsg>,
    shared: Arc<Shared>,
    engine: EngineHandle,
    metrics: Arc<Metrics>,
    max_running: usize,
    retry_after_s: u64,
    inbox_cap: usize,
    started: Instant,
    tx_probe: mpsc::WeakSender<AdmissionMsg>,
}

impl AdmissionActor {
    async fn run(mut self) {
        loop {
            tokio::select! {
                m = self.rx.recv() => match m {
                    Some(m) => self.on_msg(m),
                    None => {
                        // Every handle is gone: the server stopped.
                        for p in self.fq.drain_all() {
                            let _ = p.reply.send(Err(ApiError::Unavailable("the server is shutting down".into())));
                        }
                        return;
                    }
                },
                _ = self.shared.notify.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            // Take everything already waiting before deciding.
            while let Ok(m) = self.rx.try_recv() {
                self.on_msg(m);
            }
            self.absorb();
            // Clients that went away while queued.
            let gone = self.fq.remove_where(|p| p.reply.is_closed());
            drop(gone);
            self.dispatch();
            self.publish();
        }
    }

    fn now_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn on_msg(&mut self, m: AdmissionMsg) {
        match m {
            AdmissionMsg::Enqueue { tenant, priority, input_tokens, pending } => {
                if self.shared.draining.load(Ordering::Relaxed) {
                    let _ = pending.reply.send(Err(ApiError::Unavailable("the server is shutting down".into())));
                    return;
                }
                self.absorb();
                let now = self.now_s();
                if let Some(Some(b)) = self.buckets.get_mut(tenant) {
                    if let Some(wait) = b.check(now) {
                        let _ = pending.reply.send(Err(ApiError::RateLimited {
                            message: "tenant token-rate limit (tokens_per_minute) exceeded".into(),
                            retry_after_s: wait.ceil().max(1.0) as u64,
                        }));
                        return;
                    }
                }
                let slots = pending.req.params.n.clamp(1, self.max_running);
                let pending = *pending;
                if let Err((PushError::TenantQueueFull, p)) = self.fq.push(tenant, priority, input_tokens, slots, pending) {
                    // Purge clients that left, then retry once before refusing.
                    drop(self.fq.remove_where(|p| p.reply.is_closed()));
                    if let Err((_, p)) = self.fq.push(tenant, priority, input_tokens, slots, p) {
                        let _ = p.reply.send(Err(ApiError::RateLimited {
                            message: format!("tenant queue full ({} requests waiting); retry later", self.fq.queued(tenant)),
                            retry_after_s: self.retry_after_s,
                        }));
                    }
                }
            }
            AdmissionMsg::FailQueued => {
                for p in self.fq.drain_all() {
                    let _ = p.reply.send(Err(ApiError::Unavailable("the server is shutting down".into())));
                }
            }
        }
    }

    /// Folds in tokens generated and slots returned since the last look.
    fn absorb(&mut self) {
        let now = self.now_s();
        for (k, t) in self.shared.tenants.iter().enumerate() {
            let out = t.pending_output.swap(0, Ordering::Relaxed);
            if out > 0 {
                self.fq.on_output(k, out);
                if let Some(Some(b)) = self.buckets.get_mut(k) {
                    b.charge(out, now);
                }
            }
            let done = t.done_slots.swap(0, Ordering::Relaxed);
            if done > 0 {
                self.fq.on_done(k, done);
            }
        }
        self.shared.in_flight.store(self.fq.total_in_flight(), Ordering::Relaxed);
    }

    fn dispatch(&mut self) {
        loop {
            let free = self.max_running.saturating_sub(self.fq.total_in_flight());
            if free == 0 {
                break;
            }
            let Some(p) = self.fq.pop(free) else { break };
            let (tenant, slots, input_tokens, pending) = (p.tenant, p.slots, p.input_tokens, p.item);
            let Pending { req, reply, span } = pending;
            if reply.is_closed() {
                self.fq.on_done(tenant, slots);
                continue;
            }
            let now = self.now_s();
            if let Some(Some(b)) = self.buckets.get_mut(tenant) {
                b.charge(input_tokens as u64, now);
            }
            let _g = span.enter();
            match self.engine.submit(req) {
                Ok(stream) => {
                    tracing::debug!(engine_id = stream.id, "admitted");
                    let ticket = Ticket { tenant, slots, shared: self.shared.clone() };
                    // Bookkeeping counts the slots as in flight until the ticket drops.
                    self.shared.in_flight.store(self.fq.total_in_flight(), Ordering::Relaxed);
                    // Client gone → the Admitted drops here: cancel + ticket release.
                    let _ = reply.send(Ok(Admitted { stream, ticket, admitted_at: Instant::now() }));
                }
                Err(e) => {
                    self.fq.on_done(tenant, slots);
                    let _ = reply.send(Err(e.into()));
                }
            }
        }
        self.shared.in_flight.store(self.fq.total_in_flight(), Ordering::Relaxed);
    }

    fn publish(&self) {
        self.shared.queued.store(self.fq.total_queued(), Ordering::Relaxed);
        let counters = self.fq.counters();
        for (k, t) in self.shared.tenants.iter().enumerate() {
            let c = counters.get(k).copied().unwrap_or(0.0);
            self.metrics.set_tenant(&t.name, c, self.fq.queued(k), self.fq.in_flight(k));
        }
        let occupancy = self.tx_probe.upgrade().map_or(0, |tx| self.inbox_cap.saturating_sub(tx.capacity()));
        self.metrics.set_channel_occupancy("admission", occupancy);
    }
}
