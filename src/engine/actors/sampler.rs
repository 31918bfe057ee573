//! The sampler actor: one logits row per sampling sequence → a token (with
//! its log-probabilities), through the pure [`crate::sampling`] functions;
//! the result goes back to the scheduler. Prompt log-probabilities arrive
//! already reduced from the last worker and pass through.
//!
//! A panic while sampling one micro-batch fails that micro-batch only.

use crossbeam_channel::{Receiver, Sender};

use super::guarded;
use crate::engine::fault::{FaultActor, FaultKind, FaultPlan};
use crate::engine::msg::{LogitsMsg, StepResult};
use crate::sampling::{self, Sampled};

pub(crate) struct SamplerActor {
    pub(crate) rx: Receiver<LogitsMsg>,
    pub(crate) tx: Sender<StepResult>,
    /// Logits buffers back to the last worker.
    pub(crate) recycle: Sender<Vec<f32>>,
    pub(crate) vocab: usize,
    pub(crate) faults: FaultPlan,
}

impl SamplerActor {
    pub(crate) fn run(self) {
        let mut work = vec![0.0f32; self.vocab];
        while let Ok(m) = self.rx.recv() {
            let step = m.batch.step_id;
            self.faults.trigger(FaultActor::Sampler, 0, step, FaultKind::Die);
            let span = m.span.clone();
            let _g = span.enter();
            let LogitsMsg { batch, rows, logits, prompt_lp, mut failed, .. } = m;
            let mut sampled: Vec<Option<Sampled>> = vec![None; batch.chunks.len()];
            if failed.is_none() {
                let r = guarded(|| {
                    self.faults.trigger(FaultActor::Sampler, 0, step, FaultKind::Panic);
                    for (i, &ci) in rows.iter().enumerate() {
                        let (Some(c), Some(raw)) = (batch.chunks.get(ci), logits.get(i * self.vocab..(i + 1) * self.vocab)) else { continue };
                        let Some(ctx) = &c.ctx else { continue };
                        let mut masked: Vec<u32> = Vec::new();
                        if ctx.mask_stop {
                            masked.extend_from_slice(&ctx.eog);
                            masked.extend_from_slice(&ctx.params.stop_token_ids);
                        }
                        let rp = sampling::RowParams {
                            params: &ctx.params,
                            seed: ctx.seed,
                            index: ctx.index,
                            position: c.pos + c.tokens.len(),
                            prompt: &ctx.prompt,
                            output: &ctx.output,
                            masked: &masked,
                        };
                        sampled[ci] = Some(sampling::sample(raw, &mut work, &rp));
                    }
                });
                if let Err(panic) = r {
                    tracing::error!(step, %panic, "sampling failed");
                    failed = Some(format!("the sampler failed on step {step}: {panic}"));
                    sampled.iter_mut().for_each(|s| *s = None);
                }
            }
            let _ = self.recycle.try_send(logits); // full: let the buffer go
            if self.tx.send(StepResult { batch, sampled, prompt_lp, failed }).is_err() {
                return;
            }
        }
    }
}
