//! The tokenizer actor: validates (encodes) raw submissions with the engine's
//! one [`Validator`], passes already validated ones through, sends each
//! caller its `Started` event and hands the request to the scheduler.
//!
//! Upstream of the step cycle: it blocks on the scheduler's inbox and receives
//! nothing from the cycle, so it cannot take part in a wait-for cycle.

use crossbeam_channel::{Receiver, Sender};

use super::guarded;
use crate::engine::error::EngineError;
use crate::engine::fault::{FaultActor, FaultKind, FaultPlan};
use crate::engine::msg::{Admit, Submission, SubmissionBody};
use crate::engine::request::Event;
use crate::engine::validation::Validator;

pub(crate) struct TokenizerActor {
    pub(crate) inbox: Receiver<Submission>,
    pub(crate) scheduler: Sender<Admit>,
    pub(crate) validator: Validator,
    pub(crate) faults: FaultPlan,
}

impl TokenizerActor {
    pub(crate) fn run(self) {
        let mut handled: u64 = 0;
        while let Ok(sub) = self.inbox.recv() {
            handled += 1;
            self.faults
                .trigger(FaultActor::Tokenizer, 0, handled, FaultKind::Die);
            let span = sub.span.clone();
            let _g = span.enter();
            let Submission {
                id,
                body,
                tx,
                cancel,
                arrival,
                span,
            } = sub;
            let checked = guarded(|| {
                self.faults
                    .trigger(FaultActor::Tokenizer, 0, handled, FaultKind::Panic);
                match body {
                    SubmissionBody::Raw(req) => self.validator.validate(req),
                    SubmissionBody::Valid(v) => Ok(v),
                }
            });
            let valid = match checked {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    let _ = tx.try_send(Event::Error(e)); // caller may have gone
                    continue;
                }
                Err(panic) => {
                    tracing::error!(request_id = id, %panic, "tokenizer failed on a request");
                    let _ = tx.try_send(Event::Error(EngineError::Internal(format!(
                        "tokenizing the request failed: {panic}"
                    ))));
                    continue;
                }
            };
            let started = Event::Started {
                prompt_tokens: valid.prompt.to_vec(),
                seed: valid.seed,
            };
            let _ = tx.try_send(started); // caller may have gone
            if self
                .scheduler
                .send(Admit {
                    id,
                    valid,
                    tx,
                    cancel,
                    arrival,
                    span,
                })
                .is_err()
            {
                return; // scheduler gone: the engine is stopping (streams report it)
            }
        }
    }
}
