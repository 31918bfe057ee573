//! The admission actor: a tokio task that owns the [`FairQueue`] and the
//! tenants' token buckets, and moves requests into the engine (`submit`) when
//! fewer than `max_running` sequences are in flight, tenant by tenant in
//! Virtual Token Counter order.
//!
//! One HTTP request (several prompts × `n`) is ONE queue entry of
//! prompts × `n` slots, admitted whole: every prompt is submitted to the engine
//! at the same moment, under one [`Ticket`]. A request that could never fit
//! (more slots than `max_running` or than its tenant's `max_concurrent`, or a
//! token reservation larger than its `tokens_per_minute`) is refused with 400
//! at once, so no request ever holds slots while it waits for more.
//!
//! Token-rate limits reserve, at enqueue, the most a request can use (its
//! prompt tokens + `n` × `max_tokens` per prompt) and refund what it did not use
//! when its ticket drops (or all of it when it leaves the queue unadmitted):
//! the bucket never goes negative, so a budget cannot be overshot.
//!
//! ```text
//!  handler ──try_send(Enqueue)──► [admission] ──submit──► engine
//!     ▲       (Full → 429)          │  ▲  ▲
//!     └──── AdmissionReply ─────────┘  │  └── Ticket release/drop: done slots, refunds (atomics + Notify)
//!           (drop: Notify)             └───── Ticket::add_output: generated tokens (atomics)
//! ```
//!
//! Handlers report progress through per-tenant atomics and a `Notify`, never by
//! blocking sends, so a finishing or disconnecting request can always report.
//! The actor sleeps until a message or a notification: no timer. A client
//! that goes away while queued drops its [`AdmissionReply`], which notifies,
//! and the actor then drops the entry (refunding its reservation).
//! Requests enqueued inside [`with_class`]`(Class::Background, …)` (the Batch
//! API's runner wraps each in-process request in it) queue in the fair
//! queue's background class: admitted after every interactive request that
//! can be (see [`super::fair`]), with their tenant's bounds and counter.
//! Owns: queues, counters, buckets. Does not own: HTTP, the engine's own queue.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, Notify};

use super::config::TenantConfig;
use super::error::ApiError;
pub use super::fair::Class;
use super::fair::{FairQueue, PushError, ReserveError, TenantShare, TokenBucket};
use crate::engine::{EngineHandle, ResponseStream, ValidRequest};
use crate::metrics::Metrics;

/// A request admitted into the engine.
#[derive(Debug)]
pub struct Admitted {
    /// The engine's event streams, one per prompt in order (dropping one cancels it).
    pub streams: Vec<ResponseStream>,
    /// Holds the request's engine slots (and token reservation) until dropped.
    pub ticket: Ticket,
    /// When it left the fair queue.
    pub admitted_at: Instant,
}

/// What a handler waits on after [`AdmissionHandle::enqueue`]: resolves to the
/// admission (or its refusal); `Err` when the actor is gone. Dropping it
/// unadmitted (the client went away) wakes the actor to drop the queued entry.
pub struct AdmissionReply {
    rx: oneshot::Receiver<Result<Admitted, ApiError>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AdmissionReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdmissionReply").finish_non_exhaustive()
    }
}

impl std::future::Future for AdmissionReply {
    type Output = Result<Result<Admitted, ApiError>, oneshot::error::RecvError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.rx).poll(cx)
    }
}

impl Drop for AdmissionReply {
    fn drop(&mut self) {
        // Closed before the wake-up, so the actor sees `is_closed` when it looks.
        self.rx.close();
        self.shared.notify.notify_one();
    }
}

struct TenantShared {
    name: String,
    pending_output: AtomicU64,
    done_slots: AtomicUsize,
    /// Reserved tokens not used by finished requests, to return to the bucket.
    refund_tokens: AtomicU64,
}

struct Shared {
    tenants: Vec<TenantShared>,
    notify: Notify,
    queued: AtomicUsize,
    in_flight: AtomicUsize,
    draining: AtomicBool,
    /// Interactive requests queued (published by the actor).
    interactive_queued: AtomicUsize,
    /// Interactive requests admitted whose ticket is not dropped yet.
    interactive_running: AtomicUsize,
    /// Milliseconds since `started` of the last interactive enqueue or finish.
    interactive_last_ms: AtomicU64,
    started: Instant,
}

impl Shared {
    fn touch_interactive(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.interactive_last_ms.fetch_max(ms, Ordering::Relaxed);
    }
}

/// A request's claim on engine sequences and on its tenant's token budget;
/// dropping it returns the slots still held and the unused reservation.
pub struct Ticket {
    tenant: usize,
    slots: usize,
    /// Tokens reserved in the tenant's bucket (0 without a token-rate limit).
    reserved_tokens: u64,
    /// Tokens used so far: the prompts, then each generated token.
    used_tokens: u64,
    class: Class,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("tenant", &self.tenant)
            .field("slots", &self.slots)
            .finish()
    }
}

impl Ticket {
    /// Charges `n` generated tokens to the tenant's virtual counter.
    pub fn add_output(&mut self, n: u64) {
        self.used_tokens = self.used_tokens.saturating_add(n);
        if let Some(t) = self.shared.tenants.get(self.tenant) {
            t.pending_output.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Returns `slots` of the held slots now (some completions finished early).
    pub fn release(&mut self, slots: usize) {
        let slots = slots.min(self.slots);
        self.slots -= slots;
        if let Some(t) = self.shared.tenants.get(self.tenant) {
            t.done_slots.fetch_add(slots, Ordering::Relaxed);
        }
        self.shared.notify.notify_one();
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.class == Class::Interactive {
            self.shared
                .interactive_running
                .fetch_sub(1, Ordering::Relaxed);
            self.shared.touch_interactive();
        }
        if let Some(t) = self.shared.tenants.get(self.tenant) {
            t.done_slots.fetch_add(self.slots, Ordering::Relaxed);
            let unused = self.reserved_tokens.saturating_sub(self.used_tokens);
            if unused > 0 {
                t.refund_tokens.fetch_add(unused, Ordering::Relaxed);
            }
        }
        self.shared.notify.notify_one();
    }
}

tokio::task_local! {
    /// The class of the requests the current task enqueues (unset = interactive).
    static CLASS: Class;
}

/// Runs `fut` with every request it enqueues (on this task) in `class`: the
/// batch runner's way to queue its requests, made through the same router as
/// clients', as background work.
pub async fn with_class<F: std::future::Future>(class: Class, fut: F) -> F::Output {
    CLASS.scope(class, fut).await
}

struct Pending {
    reqs: Vec<ValidRequest>,
    class: Class,
    reply: oneshot::Sender<Result<Admitted, ApiError>>,
    span: tracing::Span,
    /// Prompt tokens over all prompts.
    input_tokens: u64,
    /// Tokens reserved in the tenant's bucket at enqueue.
    reserved_tokens: u64,
}

enum AdmissionMsg {
    Enqueue {
        tenant: usize,
        class: Class,
        priority: i32,
        pending: Box<Pending>,
    },
    FailQueued,
}

/// Engine sequences of a request (`n` per prompt), its prompt tokens, and the
/// most tokens it can use (prompts + `n` × `max_tokens` each), all saturating.
fn request_size(reqs: &[ValidRequest]) -> (usize, u64, u64) {
    let (mut slots, mut input, mut most) = (0usize, 0u64, 0u64);
    for r in reqs {
        let n = r.params().n.max(1);
        let prompt = r.prompt_ids().len() as u64;
        slots = slots.saturating_add(n);
        input = input.saturating_add(prompt);
        most = most
            .saturating_add(prompt)
            .saturating_add((n as u64).saturating_mul(r.params().max_tokens as u64));
    }
    (slots, input, most)
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
    /// Interactive admissions that may pass a waiting background request before one goes.
    pub background_every: usize,
}

impl AdmissionHandle {
    /// Spawns the actor on the current tokio runtime.
    pub fn spawn(cfg: AdmissionConfig, engine: EngineHandle, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::channel(cfg.inbox.max(1));
        let shared = Arc::new(Shared {
            tenants: cfg
                .tenants
                .iter()
                .map(|t| TenantShared {
                    name: t.name.clone(),
                    pending_output: AtomicU64::new(0),
                    done_slots: AtomicUsize::new(0),
                    refund_tokens: AtomicU64::new(0),
                })
                .collect(),
            notify: Notify::new(),
            queued: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            interactive_queued: AtomicUsize::new(0),
            interactive_running: AtomicUsize::new(0),
            interactive_last_ms: AtomicU64::new(0),
            started: Instant::now(),
        });
        let started = shared.started;
        let shares = cfg
            .tenants
            .iter()
            .map(|t| TenantShare {
                weight: t.weight,
                max_concurrent: t.max_concurrent,
                max_queued: t.max_queued,
            })
            .collect();
        let buckets = cfg
            .tenants
            .iter()
            .map(|t| (t.tokens_per_minute > 0).then(|| TokenBucket::new(t.tokens_per_minute, 0.0)))
            .collect();
        let mut fq = FairQueue::new(
            shares,
            cfg.max_running.max(1),
            cfg.input_weight,
            cfg.output_weight,
        );
        fq.set_background_every(cfg.background_every);
        let actor = AdmissionActor {
            fq,
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

    /// Queues one HTTP request of `tenant` (one engine request per prompt, all
    /// with token-id prompts) as a single entry; the reply resolves when all of
    /// it is admitted, or it is refused (400 at once when it could never fit).
    /// Its class is the one [`with_class`] set for this task (else interactive).
    pub fn enqueue(
        &self,
        tenant: usize,
        priority: i32,
        reqs: Vec<ValidRequest>,
    ) -> Result<AdmissionReply, ApiError> {
        if self.shared.draining.load(Ordering::Relaxed) {
            return Err(ApiError::Unavailable("the server is shutting down".into()));
        }
        if reqs.is_empty() {
            return Err(ApiError::invalid("prompt", "the request has no prompt"));
        }
        let (reply, rx) = oneshot::channel();
        let class = CLASS.try_with(|c| *c).unwrap_or_default();
        if class == Class::Interactive {
            self.shared.touch_interactive();
        }
        let pending = Box::new(Pending {
            reqs,
            class,
            reply,
            span: tracing::Span::current(),
            input_tokens: 0,
            reserved_tokens: 0,
        });
        match self.tx.try_send(AdmissionMsg::Enqueue {
            tenant,
            class,
            priority,
            pending,
        }) {
            Ok(()) => Ok(AdmissionReply {
                rx,
                shared: self.shared.clone(),
            }),
            Err(mpsc::error::TrySendError::Full(_)) => Err(ApiError::RateLimited {
                message: "the server is overloaded: admission queue full".into(),
                retry_after_s: 1,
            }),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(ApiError::Unavailable("the server is shutting down".into()))
            }
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
        let done: usize = self
            .shared
            .tenants
            .iter()
            .map(|t| t.done_slots.load(Ordering::Relaxed))
            .sum();
        self.shared
            .in_flight
            .load(Ordering::Relaxed)
            .saturating_sub(done)
    }

    /// Whether interactive requests are queued or running, or one was within
    /// the last `window` (the Batch API's runner then keeps fewer requests in flight).
    pub fn interactive_busy(&self, window: std::time::Duration) -> bool {
        let s = &self.shared;
        if s.interactive_running.load(Ordering::Relaxed) > 0
            || s.interactive_queued.load(Ordering::Relaxed) > 0
        {
            return true;
        }
        let last = s.interactive_last_ms.load(Ordering::Relaxed);
        let now = u64::try_from(s.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        last > 0 && now.saturating_sub(last) < u64::try_from(window.as_millis()).unwrap_or(u64::MAX)
    }

    /// Tenant names, by index.
    pub fn tenant_name(&self, k: usize) -> &str {
        self.shared
            .tenants
            .get(k)
            .map_or("unknown", |t| t.name.as_str())
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
                        self.fail_all_queued();
                        return;
                    }
                },
                _ = self.shared.notify.notified() => {}
            }
            // Take everything already waiting before deciding.
            while let Ok(m) = self.rx.try_recv() {
                self.on_msg(m);
            }
            self.absorb();
            // Clients that went away while queued.
            self.purge_gone();
            self.dispatch();
            self.publish();
        }
    }

    fn now_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn on_msg(&mut self, m: AdmissionMsg) {
        match m {
            AdmissionMsg::Enqueue {
                tenant,
                class,
                priority,
                mut pending,
            } => {
                if self.shared.draining.load(Ordering::Relaxed) {
                    let _ = pending.reply.send(Err(ApiError::Unavailable(
                        "the server is shutting down".into(),
                    )));
                    return;
                }
                self.absorb();
                let (slots, input_tokens, most_tokens) = request_size(&pending.reqs);
                // Could it ever fit? If not, refuse now instead of holding anything.
                if let Err(e) = self.fq.check_fits(tenant, slots) {
                    let _ =
                        pending
                            .reply
                            .send(Err(self.push_error(e, tenant, slots, &pending.reqs)));
                    return;
                }
                pending.input_tokens = input_tokens;
                let now = self.now_s();
                if let Some(Some(b)) = self.buckets.get_mut(tenant) {
                    match b.reserve(most_tokens, now) {
                        Ok(()) => pending.reserved_tokens = most_tokens,
                        Err(e) => {
                            let _ =
                                pending
                                    .reply
                                    .send(Err(self.reserve_error(e, tenant, most_tokens)));
                            return;
                        }
                    }
                }
                let pending = *pending;
                let input = usize::try_from(input_tokens).unwrap_or(usize::MAX);
                if let Err((_, p)) = self
                    .fq
                    .push_class(tenant, class, priority, input, slots, pending)
                {
                    // Purge clients that left, then retry once before refusing.
                    self.purge_gone();
                    if let Err((e, p)) =
                        self.fq.push_class(tenant, class, priority, input, slots, p)
                    {
                        self.refund(tenant, p.reserved_tokens);
                        let _ = p
                            .reply
                            .send(Err(self.push_error(e, tenant, slots, &p.reqs)));
                    }
                }
            }
            AdmissionMsg::FailQueued => self.fail_all_queued(),
        }
    }

    /// The client-facing error of a refused push.
    fn push_error(
        &self,
        e: PushError,
        tenant: usize,
        slots: usize,
        reqs: &[ValidRequest],
    ) -> ApiError {
        let n = reqs.first().map_or(1, |r| r.params.n.max(1));
        let shape = format!("{} prompt(s) × n={n}", reqs.len());
        match e {
            PushError::TenantQueueFull => ApiError::RateLimited {
                message: format!("tenant queue full ({} requests waiting); retry later", self.fq.queued(tenant)),
                retry_after_s: self.retry_after_s,
            },
            PushError::ExceedsMaxSlots { limit } => ApiError::invalid(
                "n",
                format!("this request needs {slots} sequences ({shape}), more than the server runs at once (max_running = {limit}); lower `n` or send fewer prompts per request"),
            ),
            PushError::ExceedsTenantCap { limit } => ApiError::invalid(
                "n",
                format!(
                    "this request needs {slots} sequences ({shape}), more than tenant `{}` may run at once (max_concurrent = {limit}); lower `n` or send fewer prompts per request",
                    self.shared.tenants.get(tenant).map_or("unknown", |t| t.name.as_str())
                ),
            ),
        }
    }

    /// The client-facing error of a refused token reservation.
    fn reserve_error(&self, e: ReserveError, tenant: usize, tokens: u64) -> ApiError {
        let name = self
            .shared
            .tenants
            .get(tenant)
            .map_or("unknown", |t| t.name.as_str());
        match e {
            ReserveError::Wait { wait_s, available } => ApiError::RateLimited {
                message: format!(
                    "tenant `{name}` token-rate limit (tokens_per_minute) reached: this request may use {tokens} tokens (prompt + n × max_tokens), {available} are available now; retry later"
                ),
                retry_after_s: wait_s.ceil().max(1.0) as u64,
            },
            ReserveError::TooLarge { capacity } => ApiError::invalid(
                "max_tokens",
                format!(
                    "this request may use {tokens} tokens (prompt + n × max_tokens), more than tenant `{name}`'s whole budget (tokens_per_minute = {capacity}); lower `max_tokens` or `n`"
                ),
            ),
        }
    }

    /// Returns `tokens` to tenant `k`'s bucket.
    fn refund(&mut self, k: usize, tokens: u64) {
        if tokens == 0 {
            return;
        }
        let now = self.now_s();
        if let Some(Some(b)) = self.buckets.get_mut(k) {
            b.refund(tokens, now);
        }
    }

    /// Drops queued requests whose client went away, refunding their reservations.
    fn purge_gone(&mut self) {
        for (k, p) in self.fq.remove_where(|p| p.reply.is_closed()) {
            self.refund(k, p.reserved_tokens);
        }
    }

    /// Answers every queued request with 503.
    fn fail_all_queued(&mut self) {
        for (k, p) in self.fq.drain_all() {
            self.refund(k, p.reserved_tokens);
            let _ = p.reply.send(Err(ApiError::Unavailable(
                "the server is shutting down".into(),
            )));
        }
    }

    /// Folds in tokens generated and slots returned since the last look.
    fn absorb(&mut self) {
        let now = self.now_s();
        for (k, t) in self.shared.tenants.iter().enumerate() {
            let out = t.pending_output.swap(0, Ordering::Relaxed);
            if out > 0 {
                self.fq.on_output(k, out);
            }
            let refund = t.refund_tokens.swap(0, Ordering::Relaxed);
            if refund > 0 {
                if let Some(Some(b)) = self.buckets.get_mut(k) {
                    b.refund(refund, now);
                }
            }
            let done = t.done_slots.swap(0, Ordering::Relaxed);
            if done > 0 {
                self.fq.on_done(k, done);
            }
        }
        self.shared
            .in_flight
            .store(self.fq.total_in_flight(), Ordering::Relaxed);
    }

    fn dispatch(&mut self) {
        loop {
            let free = self.max_running.saturating_sub(self.fq.total_in_flight());
            if free == 0 {
                break;
            }
            let Some(p) = self.fq.pop(free) else { break };
            let (tenant, slots, pending) = (p.tenant, p.slots, p.item);
            let Pending {
                reqs,
                class,
                reply,
                span,
                input_tokens,
                reserved_tokens,
            } = pending;
            if reply.is_closed() {
                self.fq.on_done(tenant, slots);
                self.refund(tenant, reserved_tokens);
                continue;
            }
            let _g = span.enter();
            // Every prompt at once; on a refusal the streams already made drop (cancel).
            let background = class == Class::Background;
            let streams: Result<Vec<ResponseStream>, _> = reqs
                .into_iter()
                .map(|mut r| {
                    r.background = background;
                    self.engine.submit_valid(r)
                })
                .collect();
            match streams {
                Ok(streams) => {
                    tracing::debug!(engine_ids = ?streams.iter().map(|s| s.id).collect::<Vec<_>>(), "admitted");
                    if class == Class::Interactive {
                        self.shared
                            .interactive_running
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    let ticket = Ticket {
                        tenant,
                        slots,
                        reserved_tokens,
                        used_tokens: input_tokens,
                        class,
                        shared: self.shared.clone(),
                    };
                    // Bookkeeping counts the slots as in flight until the ticket drops.
                    self.shared
                        .in_flight
                        .store(self.fq.total_in_flight(), Ordering::Relaxed);
                    // Client gone → the Admitted drops here: cancel + ticket release.
                    let _ = reply.send(Ok(Admitted {
                        streams,
                        ticket,
                        admitted_at: Instant::now(),
                    }));
                }
                Err(e) => {
                    self.fq.on_done(tenant, slots);
                    self.refund(tenant, reserved_tokens);
                    let _ = reply.send(Err(e.into()));
                }
            }
        }
        self.shared
            .in_flight
            .store(self.fq.total_in_flight(), Ordering::Relaxed);
    }

    fn publish(&self) {
        self.shared
            .queued
            .store(self.fq.total_queued(), Ordering::Relaxed);
        self.shared
            .interactive_queued
            .store(self.fq.queued_class(Class::Interactive), Ordering::Relaxed);
        let counters = self.fq.counters();
        for (k, t) in self.shared.tenants.iter().enumerate() {
            let c = counters.get(k).copied().unwrap_or(0.0);
            self.metrics
                .set_tenant(&t.name, c, self.fq.queued(k), self.fq.in_flight(k));
        }
        let occupancy = self
            .tx_probe
            .upgrade()
            .map_or(0, |tx| self.inbox_cap.saturating_sub(tx.capacity()));
        self.metrics.set_channel_occupancy("admission", occupancy);
    }
}
