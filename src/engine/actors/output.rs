//! The output actor: detokenizes each completion incrementally, matches stop
//! strings incrementally ([`StopMatcher`]), and sends events into each
//! request's stream with `try_send` (the stream is sized for the whole
//! completion, so it never blocks). A stop-string match ends the completion
//! here and tells the scheduler with `Control::Stop`, which never blocks.
//!
//! When its inbox closes while completions are open (the scheduler died),
//! every one of them gets an error event.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Receiver;

use super::guarded;
use crate::engine::error::EngineError;
use crate::engine::fault::{fire, FaultActor, FaultKind, FaultPlan};
use crate::engine::handle::Health;
use crate::engine::msg::{Control, ControlSender, EventTx, OutMsg};
use crate::engine::request::{Event, FinishReason, Timings, TokenLogprob, Usage};
use crate::engine::stop::StopMatcher;
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

struct OutSeq {
    request_id: u64,
    index: usize,
    prompt_len: usize,
    tx: EventTx,
    dec: IncrementalDecoder,
    /// Stop strings and this completion's automaton state.
    stop: Option<(Arc<StopMatcher>, u32)>,
    /// Decoded text not yet sent (may still become a stop string).
    pending: String,
    completion_tokens: usize,
    arrival: Instant,
    scheduled: Option<Instant>,
    first_token: Option<Instant>,
    prompt_lp: Vec<(usize, TokenLogprob)>,
    done: bool,
    span: tracing::Span,
}

impl OutSeq {
    fn send(&mut self, e: Event) {
        if self.tx.try_send(e).is_err() {
            // Stream closed (caller gone) or, impossibly, full: stop sending.
            self.done = true;
        }
    }

    fn finish(&mut self, reason: FinishReason, cached: usize) {
        if self.done {
            return;
        }
        let mut text = std::mem::take(&mut self.pending);
        if reason != FinishReason::Stop || self.stop.is_none() {
            text.push_str(&self.dec.finish());
        }
        let now = Instant::now();
        let timings = Timings {
            queue: self
                .scheduled
                .unwrap_or(now)
                .saturating_duration_since(self.arrival),
            ttft: self
                .first_token
                .unwrap_or(now)
                .saturating_duration_since(self.arrival),
            e2e: now.saturating_duration_since(self.arrival),
        };
        let usage = Usage {
            prompt_tokens: self.prompt_len,
            completion_tokens: self.completion_tokens,
            cached_tokens: cached,
        };
        self.span.in_scope(|| {
            tracing::debug!(
                index = self.index,
                reason = reason.as_str(),
                tokens = self.completion_tokens,
                "completion finished"
            )
        });
        self.send(Event::Finished {
            index: self.index,
            reason,
            text,
            usage,
            timings,
        });
        self.done = true;
    }

    /// Appends `piece`; returns the text that may be sent now, and whether a stop string ended it.
    fn push_text(&mut self, piece: String) -> (String, bool) {
        let Some((m, state)) = self.stop.as_mut() else {
            return (piece, false);
        };
        let held_before = self.pending.len();
        let hit = m.feed(state, piece.as_bytes());
        let mut text = std::mem::take(&mut self.pending);
        text.push_str(&piece);
        match hit {
            Some(h) => {
                // The stop string starts `h.len` bytes before the match end.
                let start = (held_before + h.end).saturating_sub(h.len);
                text.truncate(floor_char_boundary(&text, start));
                (text, true)
            }
            None => {
                let keep = m.held(*state).min(text.len());
                let cut = floor_char_boundary(&text, text.len() - keep);
                self.pending = text.split_off(cut);
                (text, false)
            }
        }
    }
}

/// The largest char boundary `<= i` (the matcher's offsets are boundaries; this only guards).
fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The request a message is about.
enum Target {
    /// A registered completion.
    Seq(u64),
    /// A completion being registered (not in the map yet).
    New(u64, EventTx),
    /// Nothing to fail.
    None,
}

pub(crate) struct OutputActor {
    pub(crate) rx: Receiver<OutMsg>,
    pub(crate) tok: Arc<Tokenizer>,
    pub(crate) control: ControlSender,
    pub(crate) health: Arc<Health>,
    pub(crate) faults: FaultPlan,
    seqs: HashMap<u64, OutSeq>,
    /// Completions open here, for [`crate::engine::EngineStats::open_completions`].
    open: Arc<AtomicUsize>,
}

impl OutputActor {
    pub(crate) fn new(
        rx: Receiver<OutMsg>,
        tok: Arc<Tokenizer>,
        control: ControlSender,
        health: Arc<Health>,
        faults: FaultPlan,
        open: Arc<AtomicUsize>,
    ) -> Self {
        Self {
            rx,
            tok,
            control,
            health,
            faults,
            seqs: HashMap::new(),
            open,
        }
    }

    pub(crate) fn run(mut self) {
        let mut handled: u64 = 0;
        while let Ok(m) = self.rx.recv() {
            handled += 1;
            self.faults
                .trigger(FaultActor::Output, 0, handled, FaultKind::Die);
            // What to fail if handling this message panics.
            let target = match &m {
                OutMsg::Register { request_id, tx, .. } => Target::New(*request_id, tx.clone()),
                OutMsg::Scheduled { seq_id, .. }
                | OutMsg::PromptLogprobs { seq_id, .. }
                | OutMsg::Token { seq_id, .. }
                | OutMsg::Finish { seq_id, .. } => Target::Seq(*seq_id),
                OutMsg::Fail { .. } => Target::None,
            };
            let inject = self.faults.at(FaultActor::Output, 0, handled) == Some(FaultKind::Panic);
            if let Err(panic) = guarded(|| {
                if inject {
                    fire(FaultActor::Output, 0, handled, FaultKind::Panic);
                }
                self.handle(m)
            }) {
                // Fail the request this message was about; the rest go on.
                tracing::error!(%panic, "output actor failed on a message");
                let error = EngineError::Internal(format!("producing the output failed: {panic}"));
                let request = match target {
                    Target::Seq(s) => self.seqs.get(&s).map(|s| s.request_id),
                    Target::New(r, tx) => {
                        if self.seqs.values().any(|s| s.request_id == r) {
                            Some(r)
                        } else {
                            let _ = tx.try_send(Event::Error(error.clone())); // caller may have gone
                            self.control.send(Control::Cancel(r));
                            None
                        }
                    }
                    Target::None => None,
                };
                if let Some(r) = request {
                    self.fail_request(r, error);
                    self.control.send(Control::Cancel(r));
                }
            }
            self.open.store(self.seqs.len(), Ordering::Relaxed);
        }
        // Inbox closed. Normally nothing is open here; if the scheduler died, say so.
        let why = self
            .health
            .dead_reason()
            .unwrap_or_else(|| "the engine stopped".to_string());
        let open: Vec<u64> = self.seqs.values().map(|s| s.request_id).collect();
        for r in open {
            self.fail_request(r, EngineError::Dead(why.clone()));
        }
    }

    /// One error event for request `r`, then nothing more for any of its completions.
    fn fail_request(&mut self, r: u64, error: EngineError) {
        let ids: Vec<u64> = self
            .seqs
            .iter()
            .filter(|(_, s)| s.request_id == r)
            .map(|(&id, _)| id)
            .collect();
        let mut sent = false;
        for id in ids {
            if let Some(mut s) = self.seqs.remove(&id) {
                if !sent && !s.done {
                    s.span
                        .in_scope(|| tracing::warn!(error = %error, "request failed"));
                    s.send(Event::Error(error.clone()));
                    sent = true;
                }
            }
        }
    }

    fn handle(&mut self, m: OutMsg) {
        match m {
            OutMsg::Register {
                seq_id,
                request_id,
                index,
                prompt_len,
                params,
                stop,
                tx,
                arrival,
                span,
            } => {
                let dec = IncrementalDecoder::new(&self.tok, params.skip_special_tokens);
                let stop = stop.map(|m| {
                    let st = m.start();
                    (m, st)
                });
                self.seqs.insert(
                    seq_id,
                    OutSeq {
                        request_id,
                        index,
                        prompt_len,
                        tx,
                        dec,
                        stop,
                        pending: String::new(),
                        completion_tokens: 0,
                        arrival,
                        scheduled: None,
                        first_token: None,
                        prompt_lp: Vec::new(),
                        done: false,
                        span,
                    },
                );
            }
            OutMsg::Scheduled { seq_id, at } => {
                if let Some(s) = self.seqs.get_mut(&seq_id) {
                    s.scheduled.get_or_insert(at);
                }
            }
            OutMsg::PromptLogprobs { seq_id, entries } => {
                if let Some(s) = self.seqs.get_mut(&seq_id) {
                    s.prompt_lp.extend(entries);
                }
            }
            OutMsg::Token {
                seq_id,
                token,
                finish,
                cached,
            } => {
                let Some(s) = self.seqs.get_mut(&seq_id) else {
                    return;
                };
                flush_prompt_logprobs(s);
                if s.done {
                    if finish.is_some() {
                        self.seqs.remove(&seq_id);
                    }
                    return;
                }
                s.first_token.get_or_insert_with(Instant::now);
                s.completion_tokens += 1;
                // A stop/EOS token ends the text without contributing to it.
                let piece = if finish == Some(FinishReason::Stop) {
                    String::new()
                } else {
                    s.dec.push(token.token).unwrap_or_default()
                };
                let (text, hit) = s.push_text(piece);
                let reason = if hit {
                    Some(FinishReason::Stop)
                } else {
                    finish
                };
                if finish.is_some() && !hit {
                    // The end: release what was held back.
                    let rest = std::mem::take(&mut s.pending);
                    let index = s.index;
                    s.send(Event::Token {
                        index,
                        token,
                        text: text + &rest,
                    });
                } else {
                    let index = s.index;
                    s.send(Event::Token { index, token, text });
                }
                if let Some(r) = reason {
                    s.finish(r, cached);
                    if finish.is_none() {
                        // Stopped by a stop string: the scheduler still runs this
                        // completion until told.
                        self.control.send(Control::Stop(seq_id));
                    }
                }
                if finish.is_some() {
                    self.seqs.remove(&seq_id);
                }
            }
            OutMsg::Finish {
                seq_id,
                reason,
                cached,
            } => {
                if let Some(mut s) = self.seqs.remove(&seq_id) {
                    flush_prompt_logprobs(&mut s);
                    s.finish(reason, cached);
                }
            }
            OutMsg::Fail { request_id, error } => self.fail_request(request_id, error),
        }
    }
}

fn flush_prompt_logprobs(s: &mut OutSeq) {
    if s.prompt_lp.is_empty() || s.index != 0 || s.done {
        s.prompt_lp.clear();
        return;
    }
    let mut v: Vec<Option<TokenLogprob>> = vec![None; s.prompt_len];
    for (pos, lp) in s.prompt_lp.drain(..) {
        if let Some(slot) = v.get_mut(pos) {
            *slot = Some(lp);
        }
    }
    s.send(Event::PromptLogprobs(v));
}
