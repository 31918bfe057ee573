//! The sampler actor: one logits row per sampling sequence → a token (with
//! its log-probabilities), through the pure [`crate::sampling`] functions;
//! the result goes back to the scheduler. The rows of a micro-batch are
//! sampled in parallel on the sampler's pool (the worker's cores are idle
//! while the step waits for its tokens). Prompt log-probabilities arrive
//! already reduced from the last worker and pass through.
//!
//! **Speculative chunks** (`draft > 0`, see [`crate::engine::spec`]): each of
//! their `1 + draft` rows is sampled as plain decoding would sample that
//! position (same draw, same `min_tokens` mask); the chunk's result is the
//! drafts the rows confirm plus the token after them.
//!
//! A panic while sampling one micro-batch fails that micro-batch only.
//!
//! **Constrained rows** (`SamplingParams::constraint`): the sampler owns one
//! [`SeqGuide`] per constrained sequence, keyed by sequence id. A row's
//! allowed-token mask is applied before sampling (greedy or seeded: the draw
//! is the usual counter-based one, so the output does not depend on the
//! batch); the chosen token advances the matcher; and, once the step's
//! tokens are on their way back to the scheduler, the NEXT mask of every
//! sequence just sampled is computed, in parallel on the pool, while the
//! workers run the next forward pass. End-of-generation (and
//! `stop_token_ids`) are allowed only where the grammar accepts; when it is
//! complete, only end-of-generation is, so the completion stops there.
//! The state follows the sequence through preemption (it is keyed by id and
//! checked against the sequence's length each step: a state ahead of the
//! sequence is rebuilt by replaying its tokens) and is freed when the
//! sequence ends (an end token sampled, its length reached, or its request
//! gone: the state holds a weak reference to the request's parameters).

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use crossbeam_channel::{Receiver, Sender};
use rayon::prelude::*;

use super::guarded;
use crate::engine::fault::{FaultActor, FaultKind, FaultPlan};
use crate::engine::msg::{LogitsMsg, StepResult};
use crate::engine::scheduler::{SampleCtx, ScheduledChunk};
use crate::engine::spec;
use crate::guidance::{Allowed, Guidance, LazyGuidance, SeqGuide};
use crate::sampling::{self, Sampled, SamplingParams};

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
    /// Constrained decoding (shared with the validator, which builds it).
    pub(crate) guidance: Arc<LazyGuidance>,
}

/// A constrained sequence's state between steps.
struct Guided {
    guide: SeqGuide,
    /// The request's parameters: gone when the request is.
    alive: Weak<SamplingParams>,
}

/// A constrained row of this step: its state (taken out of the map for the
/// step) or why it has none.
type Slot = Option<Result<Guided, ()>>;

/// The state of a constrained row, taken from `guides` and in step with the
/// sequence (`generated` output tokens); `Err` when it cannot be made so.
fn take_guide(
    guides: &mut HashMap<u64, Guided>,
    g: &Guidance,
    c: &ScheduledChunk,
    ctx: &SampleCtx,
) -> Slot {
    let constraint = ctx.params.constraint.as_ref()?;
    let generated = (c.pos + c.tokens.len()).saturating_sub(ctx.prompt.len());
    let alive = Arc::downgrade(&ctx.params);
    let fresh = || g.start(constraint).ok();
    let guide = match guides.remove(&c.seq_id) {
        Some(e) if e.guide.num_tokens() == generated => Some(e.guide),
        Some(e) if e.guide.num_tokens() > generated => e.guide.replayed(g, generated),
        // Behind (or unknown): replay the output when the context carries it.
        _ if ctx.output.len() == generated => fresh().map(|mut s| {
            for &t in &ctx.output {
                s.advance(g, t);
            }
            s
        }),
        _ => None,
    };
    Some(guide.map(|guide| Guided { guide, alive }).ok_or(()))
}

/// Bits of `ids` over `vocab` tokens.
fn bits_of(ids: &[u32], vocab: usize) -> Vec<u32> {
    let mut b = vec![0u32; vocab.div_ceil(32)];
    for &t in ids {
        if let Some(w) = b.get_mut(t as usize / 32) {
            *w |= 1 << (t % 32);
        }
    }
    b
}

/// Rows per parallel sampling task (a 262k-vocabulary row is ~1 MB of logits).
const MIN_ROWS_PER_TASK: usize = 2;

impl SamplerActor {
    pub(crate) fn run(self) {
        // Scratch of the serial path, kept across steps (sized on first use:
        // a plain greedy row never touches it).
        let mut serial_work: Vec<f32> = Vec::new();
        let mut guides: HashMap<u64, Guided> = HashMap::new();
        while let Ok(m) = self.rx.recv() {
            let started = std::time::Instant::now();
            let step = m.batch.step_id;
            self.faults
                .trigger(FaultActor::Sampler, 0, step, FaultKind::Die);
            let span = m.span.clone();
            let _g = span.enter();
            let LogitsMsg {
                batch,
                rows,
                logits,
                prompt_lp,
                mut failed,
                service,
                ..
            } = m;
            let mut sampled: Vec<Vec<Sampled>> = vec![Vec::new(); batch.chunks.len()];
            // Index of each logits row among its chunk's sampling rows (0 but for speculative chunks).
            let mut nth: Vec<usize> = Vec::with_capacity(rows.len());
            for (i, &ci) in rows.iter().enumerate() {
                nth.push(if i > 0 && rows[i - 1] == ci {
                    nth[i - 1] + 1
                } else {
                    0
                });
            }
            // Constrained rows' states, in row order (taken out of `guides` for the step).
            let mut slots: Vec<Slot> = Vec::new();
            let guidance = self.guidance.built();
            if failed.is_none() {
                let r = guarded(|| {
                    self.faults
                        .trigger(FaultActor::Sampler, 0, step, FaultKind::Panic);
                    let vocab = self.vocab;
                    slots = rows
                        .iter()
                        .map(|&ci| {
                            let (c, ctx) = batch
                                .chunks
                                .get(ci)
                                .and_then(|c| Some((c, c.ctx.as_ref()?)))?;
                            match guidance {
                                Some(g) => take_guide(&mut guides, g, c, ctx),
                                None => ctx.params.constraint.as_ref().map(|_| Err(())),
                            }
                        })
                        .collect();
                    // (chunk, logits row, its constraint state) -> its token; `work`: a scratch row
                    // per task (untouched, so never paged in, by greedy rows).
                    let one = |work: &mut Vec<f32>,
                               ((i, &ci), slot): ((usize, &usize), &mut Slot)|
                     -> Option<(usize, Sampled)> {
                        let (c, raw) = (
                            batch.chunks.get(ci)?,
                            logits.get(i * vocab..(i + 1) * vocab)?,
                        );
                        let ctx = c.ctx.as_ref()?;
                        // A speculative chunk's row j chooses the token after draft j: its
                        // position and `min_tokens` mask are those plain decoding would have there.
                        let j = nth.get(i).copied().unwrap_or(0);
                        let position = c.pos + c.tokens.len() - c.draft.min(c.tokens.len()) + j;
                        let mask_stop = if j == 0 {
                            ctx.mask_stop
                        } else {
                            position.saturating_sub(ctx.prompt.len()) < ctx.params.min_tokens
                        };
                        let mut masked: Vec<u32> = Vec::new();
                        if mask_stop {
                            masked.extend_from_slice(&ctx.eog);
                            masked.extend_from_slice(&ctx.params.stop_token_ids);
                        }
                        let rp = sampling::RowParams {
                            params: &ctx.params,
                            seed: ctx.seed,
                            index: ctx.index,
                            position,
                            prompt: &ctx.prompt,
                            output: &ctx.output,
                            masked: &masked,
                        };
                        if work.len() != vocab {
                            *work = vec![0.0; vocab];
                        }
                        let smp = match (slot, guidance) {
                            (None, _) => sampling::sample(raw, work, &rp),
                            (Some(Ok(gd)), Some(g)) => {
                                let end_only = || bits_of(&g.eog, vocab);
                                let smp = match gd.guide.allowed(g) {
                                    Allowed::Any => sampling::sample(raw, work, &rp),
                                    Allowed::Mask(v) => {
                                        // Stop tokens end the completion: only where end-of-generation may.
                                        let accepting = g.eog.iter().any(|&e| v.is_allowed(e));
                                        for &t in &ctx.params.stop_token_ids {
                                            if (t as usize) < v.len() {
                                                v.set(t as usize, accepting);
                                            }
                                        }
                                        if v.is_zero() {
                                            sampling::sample_allowed(
                                                raw,
                                                work,
                                                &rp,
                                                Some(&end_only()),
                                            )
                                        } else {
                                            sampling::sample_allowed(
                                                raw,
                                                work,
                                                &rp,
                                                Some(v.as_slice()),
                                            )
                                        }
                                    }
                                    Allowed::EndOnly => {
                                        sampling::sample_allowed(raw, work, &rp, Some(&end_only()))
                                    }
                                };
                                gd.guide.advance(g, smp.token);
                                smp
                            }
                            // A constrained row without its state: no token (the sequence fails).
                            (Some(_), _) => return None,
                        };
                        Some((ci, smp))
                    };
                    let mut slots_iter: Vec<Slot> = std::mem::take(&mut slots);
                    let out: Vec<Option<(usize, Sampled)>> = match &self.pool {
                        Some(p) if rows.len() > 1 => p.install(|| {
                            rows.par_iter()
                                .enumerate()
                                .zip(slots_iter.par_iter_mut())
                                .with_min_len(MIN_ROWS_PER_TASK)
                                .map_init(Vec::new, one)
                                .collect()
                        }),
                        _ => rows
                            .iter()
                            .enumerate()
                            .zip(slots_iter.iter_mut())
                            .map(|r| one(&mut serial_work, r))
                            .collect(),
                    };
                    slots = slots_iter;
                    for (ci, smp) in out.into_iter().flatten() {
                        if let Some(slot) = sampled.get_mut(ci) {
                            slot.push(smp);
                        }
                    }
                    // Speculative chunks: the accepted drafts and the token after them.
                    for (c, toks) in batch
                        .chunks
                        .iter()
                        .zip(sampled.iter_mut())
                        .filter(|(c, _)| c.draft > 0)
                    {
                        let drafts = &c.tokens[c.tokens.len() - c.draft.min(c.tokens.len())..];
                        let chosen: Vec<u32> = toks.iter().map(|t| t.token).collect();
                        toks.truncate(spec::accepted_prefix(drafts, &chosen) + 1);
                    }
                });
                if let Err(panic) = r {
                    tracing::error!(step, %panic, "sampling failed");
                    failed = Some(format!("the sampler failed on step {step}: {panic}"));
                    sampled.iter_mut().for_each(Vec::clear);
                    slots.clear(); // the micro-batch's sequences fail: their states go
                }
            }
            let _ = self.recycle.try_send(logits); // full: let the buffer go
                                                   // States of sequences that go on, with the chunk they sampled for.
            let mut next: Vec<(u64, Guided)> = Vec::new();
            if failed.is_none() {
                for (slot, &ci) in slots.into_iter().zip(&rows) {
                    let (Some(Ok(gd)), Some(c), Some(smp)) = (
                        slot,
                        batch.chunks.get(ci),
                        sampled.get(ci).and_then(|v| v.last()),
                    ) else {
                        continue;
                    };
                    let Some(ctx) = c.ctx.as_ref() else { continue };
                    let p = &ctx.params;
                    let generated = (c.pos + c.tokens.len() + 1).saturating_sub(ctx.prompt.len());
                    let ends = ctx.eog.contains(&smp.token)
                        || p.stop_token_ids.contains(&smp.token)
                        || generated >= p.max_tokens;
                    if !ends {
                        next.push((c.seq_id, gd));
                    }
                }
            }
            if self
                .tx
                .send(StepResult {
                    batch,
                    sampled,
                    prompt_lp,
                    failed,
                    service: service + started.elapsed(),
                })
                .is_err()
            {
                return;
            }
            // The next masks, while the workers compute the next step.
            if let Some(g) = guidance {
                let prepare = |(_, gd): &mut (u64, Guided)| gd.guide.prepare(g);
                let r = guarded(|| match &self.pool {
                    Some(p) if next.len() > 1 => {
                        p.install(|| next.par_iter_mut().for_each(prepare))
                    }
                    _ => next.iter_mut().for_each(prepare),
                });
                if let Err(panic) = r {
                    // Their next row recomputes the mask (and fails if it panics again).
                    tracing::error!(step, %panic, "computing the next constraint masks failed");
                }
            }
            guides.extend(next);
            guides.retain(|_, gd| gd.alive.strong_count() > 0);
        }
    }
}
