//! The sampler actor: one logits row per sampling sequence → a token (with
//! its log-probabilities), through the pure [`crate::sampling`] functions;
//! the result goes back to the scheduler. The rows of a micro-batch are
//! sampled in parallel on the sampler's pool (the worker's cores are idle
//! while the step waits for its tokens). Prompt log-probabilities arrive
//! already reduced from the last worker and pass through.
//!
//! A panic while sampling one micro-batch fails that micro-batch only.

use crossbeam_channel::{Receiver, Sender};
use rayon::prelude::*;

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
    /// Rows are sampled in parallel on this pool when given (each row is a
    /// pure function of its logits: the tokens do not depend on the split).
    pub(crate) pool: Option<rayon::ThreadPool>,
    pub(crate) faults: FaultPlan,
}

/// Rows per parallel sampling task (a 262k-vocabulary row is ~1 MB of logits).
const MIN_ROWS_PER_TASK: usize = 2;

impl SamplerActor {
    pub(crate) fn run(self) {
        // Scratch of the serial path, kept across steps (sized on first use:
        // a plain greedy row never touches it).
        let mut serial_work: Vec<f32> = Vec::new();
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
                    let vocab = self.vocab;
                    // (chunk, logits row) -> its token; `work`: a scratch row
                    // per task (untouched, so never paged in, by greedy rows).
                    let one = |work: &mut Vec<f32>, (i, &ci): (usize, &usize)| -> Option<(usize, Sampled)> {
                        let (c, raw) = (batch.chunks.get(ci)?, logits.get(i * vocab..(i + 1) * vocab)?);
                        let ctx = c.ctx.as_ref()?;
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
                        if work.len() != vocab {
                            *work = vec![0.0; vocab];
                        }
                        Some((ci, sampling::sample(raw, work, &rp)))
                    };
                    let out: Vec<Option<(usize, Sampled)>> = match &self.pool {
                        Some(p) if rows.len() > 1 => p.install(|| {
                            rows.par_iter().enumerate().with_min_len(MIN_ROWS_PER_TASK).map_init(Vec::new, one).collect()
                        }),
                        _ => rows.iter().enumerate().map(|r| one(&mut serial_work, r)).collect(),
                    };
                    for (ci, smp) in out.into_iter().flatten() {
                        if let Some(slot) = sampled.get_mut(ci) {
                            *slot = Some(smp);
                        }
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
