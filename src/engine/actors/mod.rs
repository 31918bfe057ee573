//! The engine's actors, one file each, and their supervision.
//!
//! Every actor runs on a named OS thread started by [`spawn`], which catches a
//! panic that escapes the actor: the engine is then marked dead and the
//! scheduler told (`Control::ActorDied`), so every open request ends with an
//! error at once and `/health` answers 503. Inside, each actor guards the
//! handling of one micro-batch or message with `catch_unwind`, so a panic
//! there fails only that micro-batch's (or message's) requests and the actor
//! goes on: micro-batches hold disjoint sequences, so others' state is intact.

pub(crate) mod output;
pub(crate) mod sampler;
pub(crate) mod scheduler;
pub(crate) mod tokenizer;
pub(crate) mod worker;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::error::StartError;
use super::fault::panic_message;
use super::handle::Health;
use super::msg::{Control, ControlSender};

/// What a supervised thread reports to when it dies.
#[derive(Clone)]
pub(crate) struct Supervisor {
    pub(crate) health: Arc<Health>,
    pub(crate) control: ControlSender,
}

/// Starts actor `name` on its own thread under `sup`.
pub(crate) fn spawn(
    name: String,
    sup: &Supervisor,
    f: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>, StartError> {
    let sup = sup.clone();
    let thread_name = name.clone();
    std::thread::Builder::new()
        .name(thread_name)
        .spawn(move || {
            if let Err(payload) = catch_unwind(AssertUnwindSafe(f)) {
                let reason = format!("actor `{name}` died: {}", panic_message(&*payload));
                sup.health.mark_died(reason.clone());
                sup.control.send(Control::ActorDied {
                    actor: name,
                    reason,
                });
            }
        })
        .map_err(|e| StartError::Spawn(e.to_string()))
}

/// Runs `f`, turning a panic into `Err(message)` (the per-step guard).
pub(crate) fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| panic_message(&*p))
}
