//! Every message that crosses between the engine's actors, in one place.
//!
//! ```text
//!  handle ──Submission──► tokenizer ──Admit──► scheduler ──WorkItem──► worker 0 … W-1
//!                                                ▲   ▲                       │ LogitsMsg
//!  handle, streams, output, supervisors ─Control─┘   └──StepResult── sampler ◄┘
//!  scheduler ──OutMsg──► output ──Event──► each request's stream
//! ```
//!
//! `Control` is the one channel for cancels, aborts, stop-string stops, drain
//! and actor deaths: the scheduler sleeps until a message arrives and polls no
//! flag. Its senders never block (they may run on a tokio thread or inside a
//! `Drop`): a full channel parks the message in a side list and sends a wake-up,
//! and the scheduler drains that list after every control message it takes, so
//! nothing is lost (see [`ControlSender::send`]).

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use super::error::EngineError;
use super::request::{FinishReason, GenerateRequest, TokenLogprob};
use super::scheduler::SchedulerOutput;
use super::stop::StopMatcher;
use super::validation::ValidRequest;
use super::Event;
use crate::sampling::{Sampled, SamplingParams};

/// Sender half of a request's event stream.
pub(crate) type EventTx = tokio::sync::mpsc::Sender<Event>;

/// A request entering the engine (handle → tokenizer actor).
pub(crate) struct Submission {
    pub(crate) id: u64,
    pub(crate) body: SubmissionBody,
    pub(crate) tx: EventTx,
    /// Set when the caller cancels; read once at admission (messages do the rest).
    pub(crate) cancel: Arc<AtomicBool>,
    pub(crate) arrival: Instant,
    /// The caller's span (the HTTP `request` span when there is one).
    pub(crate) span: tracing::Span,
}

/// Unchecked or already checked.
pub(crate) enum SubmissionBody {
    /// Validated by the tokenizer actor.
    Raw(GenerateRequest),
    /// Validated by the caller with the engine's [`super::Validator`].
    Valid(ValidRequest),
}

/// A validated request (tokenizer → scheduler).
pub(crate) struct Admit {
    pub(crate) id: u64,
    pub(crate) valid: ValidRequest,
    pub(crate) tx: EventTx,
    pub(crate) cancel: Arc<AtomicBool>,
    pub(crate) arrival: Instant,
    pub(crate) span: tracing::Span,
}

/// Control messages into the scheduler.
#[derive(Debug, Clone)]
pub(crate) enum Control {
    /// Cancel request `id` (caller aborted or dropped its stream).
    Cancel(u64),
    /// Cancel every request (shutdown timeout).
    CancelAll,
    /// End completion `seq_id` only (a stop string matched).
    Stop(u64),
    /// Refuse new requests; running ones continue.
    Drain,
    /// An actor died for good.
    ActorDied {
        /// Thread name.
        actor: String,
        /// Panic message.
        reason: String,
    },
    /// Look at the side list (sent when the channel was full).
    Wake,
}

/// The non-blocking sending side of the control channel.
#[derive(Clone)]
pub(crate) struct ControlSender {
    tx: Sender<Control>,
    overflow: Arc<Mutex<Vec<Control>>>,
}

/// The scheduler's side of the control channel.
pub(crate) struct ControlReceiver {
    pub(crate) rx: Receiver<Control>,
    overflow: Arc<Mutex<Vec<Control>>>,
}

/// A bounded control channel of `cap` messages.
pub(crate) fn control_channel(cap: usize) -> (ControlSender, ControlReceiver) {
    let (tx, rx) = crossbeam_channel::bounded(cap.max(1));
    let overflow = Arc::new(Mutex::new(Vec::new()));
    (
        ControlSender {
            tx,
            overflow: overflow.clone(),
        },
        ControlReceiver { rx, overflow },
    )
}

impl ControlSender {
    /// Sends without blocking. When the channel is full the message goes to
    /// the side list first and a wake-up is attempted second: a full channel
    /// holds messages the scheduler has not taken yet, and it drains the side
    /// list after each one it takes, so the parked message is seen.
    pub(crate) fn send(&self, m: Control) {
        match self.tx.try_send(m) {
            Ok(()) => {}
            Err(TrySendError::Full(m)) => {
                match self.overflow.lock() {
                    Ok(mut v) => v.push(m),
                    Err(poisoned) => poisoned.into_inner().push(m),
                }
                let _ = self.tx.try_send(Control::Wake); // full: a message is pending anyway
            }
            Err(TrySendError::Disconnected(_)) => {} // the scheduler is gone: nothing to control
        }
    }
}

impl ControlReceiver {
    /// Messages parked while the channel was full.
    pub(crate) fn take_overflow(&self) -> Vec<Control> {
        match self.overflow.lock() {
            Ok(mut v) => std::mem::take(&mut *v),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        }
    }
}

/// A micro-batch on its way through the workers.
pub(crate) struct WorkItem {
    pub(crate) batch: Arc<SchedulerOutput>,
    /// Hidden states, `num_tokens × dim`.
    pub(crate) x: Vec<f32>,
    /// Set when a stage failed: later stages pass the item on without computing.
    pub(crate) failed: Option<String>,
    /// The step span (follows from its requests' spans).
    pub(crate) span: tracing::Span,
    /// Compute time of the stages so far (queueing excluded).
    pub(crate) service: Duration,
}

/// Per chunk: `(position of the predicted prompt token, its log-probability entry)`.
pub(crate) type PromptLogprobs = Vec<Vec<(usize, TokenLogprob)>>;

/// Last worker → sampler.
pub(crate) struct LogitsMsg {
    pub(crate) batch: Arc<SchedulerOutput>,
    /// Chunk index of each logits row (the chunk's last row: it samples; a
    /// speculative chunk's last `1 + draft` rows, consecutive, in order).
    pub(crate) rows: Vec<usize>,
    /// `rows.len() × vocab` logits.
    pub(crate) logits: Vec<f32>,
    /// Prompt log-probabilities, already reduced to what was asked.
    pub(crate) prompt_lp: PromptLogprobs,
    pub(crate) failed: Option<String>,
    pub(crate) span: tracing::Span,
    /// Compute time of every stage (queueing excluded).
    pub(crate) service: Duration,
}

/// Sampler → scheduler.
pub(crate) struct StepResult {
    pub(crate) batch: Arc<SchedulerOutput>,
    /// Per chunk, the tokens it produced: none (no sampling), one, or for a
    /// speculative chunk the accepted drafts plus one.
    pub(crate) sampled: Vec<Vec<Sampled>>,
    pub(crate) prompt_lp: PromptLogprobs,
    /// The micro-batch failed (a stage panicked): its requests end with an error.
    pub(crate) failed: Option<String>,
    /// Compute time of every stage and the sampler (queueing excluded): the
    /// step's cost, which prices speculative verify rows ([`super::spec::StepCost`]).
    pub(crate) service: Duration,
}

/// Scheduler → output actor.
pub(crate) enum OutMsg {
    /// A completion starts.
    Register {
        seq_id: u64,
        request_id: u64,
        index: usize,
        prompt_len: usize,
        params: Arc<SamplingParams>,
        stop: Option<Arc<StopMatcher>>,
        tx: EventTx,
        arrival: Instant,
        span: tracing::Span,
    },
    /// First scheduled at `at`.
    Scheduled { seq_id: u64, at: Instant },
    /// Prompt log-probabilities computed so far.
    PromptLogprobs {
        seq_id: u64,
        entries: Vec<(usize, TokenLogprob)>,
    },
    /// A sampled token (and, with `finish`, the end).
    Token {
        seq_id: u64,
        token: TokenLogprob,
        finish: Option<FinishReason>,
        cached: usize,
    },
    /// The completion ended without a token.
    Finish {
        seq_id: u64,
        reason: FinishReason,
        cached: usize,
    },
    /// Request `request_id` failed: one error event, then nothing.
    Fail { request_id: u64, error: EngineError },
}
