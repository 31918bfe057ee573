//! Fault injection for supervision tests: make a chosen actor panic at a chosen
//! step, on the release binary too. Off unless configured.
//!
//! A plan is a comma-separated list of `ACTOR[:INDEX]:KIND@step=N`:
//!
//! ```text
//!   worker:1:panic@step=20     worker 1 panics while computing micro-batch 20:
//!                              that micro-batch's sequences fail, the rest go on
//!   sampler:die@step=5         the sampler thread ends for good at micro-batch 5:
//!                              the engine is dead, every open request errors
//!   scheduler:die@step=3       the scheduler dies when forming its 3rd step
//!   output:panic@step=40       the output actor panics on its 40th message
//! ```
//!
//! Sources: `[testing] fault` in the config file, replaced by the environment
//! variable `BRIGADE_FAULT` when that is set (so an outside test can use the
//! shipped binary). Owns parsing and the "does this step fail" question only;
//! each actor decides where its guard is.

use std::fmt;

/// The actor a fault targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultActor {
    /// A layer-group worker (index = worker number; none = every worker).
    Worker,
    /// The sampler.
    Sampler,
    /// The scheduler.
    Scheduler,
    /// The output (detokenizer) actor.
    Output,
    /// The tokenizer actor.
    Tokenizer,
}

/// What happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// A panic inside the handling of one micro-batch or message (caught by the actor's guard).
    Panic,
    /// A panic outside the guard: the actor thread ends for good.
    Die,
}

/// One planned fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Target actor.
    pub actor: FaultActor,
    /// Which instance (workers); `None` = any.
    pub index: Option<usize>,
    /// Panic or die.
    pub kind: FaultKind,
    /// Step (micro-batch id, or message count for output/tokenizer).
    pub step: u64,
}

/// A malformed plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad fault-injection spec {spec:?} (`[testing] fault` or BRIGADE_FAULT): {reason} (expected ACTOR[:INDEX]:panic|die@step=N)")]
pub struct FaultParseError {
    spec: String,
    reason: String,
}

/// A set of planned faults (empty = none).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultPlan {
    faults: Vec<Fault>,
}

impl FaultPlan {
    /// Parses a plan; the empty string is the empty plan.
    pub fn parse(spec: &str) -> Result<Self, FaultParseError> {
        let mut faults = Vec::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let err = |reason: &str| FaultParseError {
                spec: item.to_string(),
                reason: reason.to_string(),
            };
            let (head, step) = item
                .split_once('@')
                .ok_or_else(|| err("missing `@step=N`"))?;
            let step = step
                .strip_prefix("step=")
                .ok_or_else(|| err("the trigger must be `step=N`"))?;
            let step: u64 = step
                .parse()
                .map_err(|_| err("step must be a non-negative integer"))?;
            let parts: Vec<&str> = head.split(':').collect();
            let (actor, index, kind) = match parts.as_slice() {
                [a, k] => (*a, None, *k),
                [a, i, k] => (
                    *a,
                    Some(
                        i.parse::<usize>()
                            .map_err(|_| err("index must be a non-negative integer"))?,
                    ),
                    *k,
                ),
                _ => return Err(err("expected ACTOR[:INDEX]:KIND")),
            };
            let actor = match actor {
                "worker" => FaultActor::Worker,
                "sampler" => FaultActor::Sampler,
                "scheduler" => FaultActor::Scheduler,
                "output" => FaultActor::Output,
                "tokenizer" => FaultActor::Tokenizer,
                _ => {
                    return Err(err(
                        "unknown actor (worker, sampler, scheduler, output, tokenizer)",
                    ))
                }
            };
            let kind = match kind {
                "panic" => FaultKind::Panic,
                "die" => FaultKind::Die,
                _ => return Err(err("unknown kind (panic, die)")),
            };
            faults.push(Fault {
                actor,
                index,
                kind,
                step,
            });
        }
        Ok(Self { faults })
    }

    /// The plan in force: `BRIGADE_FAULT` if set, else the configured one.
    pub fn from_config_or_env(configured: &str) -> Result<Self, FaultParseError> {
        match std::env::var("BRIGADE_FAULT") {
            Ok(v) => Self::parse(&v),
            Err(_) => Self::parse(configured),
        }
    }

    /// Whether nothing is planned.
    pub fn is_empty(&self) -> bool {
        self.faults.is_empty()
    }

    /// The fault planned for `actor` instance `index` at `step`, if any.
    pub fn at(&self, actor: FaultActor, index: usize, step: u64) -> Option<FaultKind> {
        self.faults
            .iter()
            .find(|f| f.actor == actor && f.step == step && f.index.is_none_or(|i| i == index))
            .map(|f| f.kind)
    }

    /// Panics if a fault of `kind` is planned here (called inside or outside an actor's guard).
    pub fn trigger(&self, actor: FaultActor, index: usize, step: u64, kind: FaultKind) {
        if self.at(actor, index, step) == Some(kind) {
            fire(actor, index, step, kind);
        }
    }
}

/// Raises the planned fault (the crate's one deliberate panic: the plan asks for it).
#[allow(clippy::panic)]
pub fn fire(actor: FaultActor, index: usize, step: u64, kind: FaultKind) -> ! {
    std::panic::panic_any(InjectedFault {
        actor,
        index,
        step,
        kind,
    })
}

/// The panic payload of an injected fault.
#[derive(Debug, Clone, Copy)]
pub struct InjectedFault {
    actor: FaultActor,
    index: usize,
    step: u64,
    kind: FaultKind,
}

impl fmt::Display for InjectedFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "injected fault: {:?} {} {:?} at step {}",
            self.actor, self.index, self.kind, self.step
        )
    }
}

/// A readable message from a panic payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(f) = payload.downcast_ref::<InjectedFault>() {
        f.to_string()
    } else if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plans_and_names_errors() {
        let p = FaultPlan::parse("worker:1:panic@step=20, sampler:die@step=5").unwrap();
        assert_eq!(p.at(FaultActor::Worker, 1, 20), Some(FaultKind::Panic));
        assert_eq!(p.at(FaultActor::Worker, 0, 20), None);
        assert_eq!(p.at(FaultActor::Worker, 1, 21), None);
        assert_eq!(p.at(FaultActor::Sampler, 0, 5), Some(FaultKind::Die));
        assert!(FaultPlan::parse("").unwrap().is_empty());
        for bad in [
            "worker",
            "worker:panic",
            "worker:x:panic@step=1",
            "gpu:panic@step=1",
            "worker:boom@step=1",
            "worker:panic@at=3",
        ] {
            let e = FaultPlan::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn trigger_panics_with_a_readable_payload() {
        let p = FaultPlan::parse("output:panic@step=2").unwrap();
        p.trigger(FaultActor::Output, 0, 1, FaultKind::Panic); // not this step
        p.trigger(FaultActor::Output, 0, 2, FaultKind::Die); // not this kind
        let r = std::panic::catch_unwind(|| p.trigger(FaultActor::Output, 0, 2, FaultKind::Panic));
        let msg = panic_message(&*r.unwrap_err());
        assert!(
            msg.contains("injected fault") && msg.contains("Output"),
            "{msg}"
        );
    }
}
