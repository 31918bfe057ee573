//! One completion's constraint state, owned by the sampler: the llguidance
//! matcher (or, with a trigger, the text watched for it), the mask for the
//! next token (computed right after the previous token was chosen, while the
//! workers run the next forward pass), and every output token seen, so the
//! state can be rebuilt by replaying them.
//!
//! Trigger semantics ([`super::Constraint::trigger`]): tokens pass
//! unconstrained until the output's text contains the trigger; the matcher
//! then consumes the output from that occurrence on (the tokens from there,
//! the first one re-tokenized from the trigger's first byte when the trigger
//! starts inside it; llguidance works on bytes, so any tokenization of the
//! same text is accepted), and constrains every later token.

use std::time::Instant;

use llguidance::{Matcher, TokenParser};
use toktrie::SimpleVob;

use super::compile::{Guidance, GuidanceError};

enum Phase {
    /// Free text until `trigger` appears in `text`.
    Waiting {
        trigger: Vec<u8>,
        text: Vec<u8>,
        starts: Vec<usize>,
        parser: Box<TokenParser>,
    },
    /// Constrained.
    Active(Box<Matcher>),
    /// The output can no longer match (the text after a trigger broke the
    /// grammar): only end-of-generation is allowed.
    Broken(String),
}

/// What constrains the next token of one completion.
pub struct SeqGuide {
    phase: Phase,
    /// Output tokens seen, in order.
    tokens: Vec<u32>,
    /// The mask for the token after `tokens` (when computed ahead).
    next: Option<SimpleVob>,
    /// The constraint this state was built from (to rebuild it).
    rebuild: Option<Box<TokenParser>>,
    rebuild_trigger: Option<Vec<u8>>,
}

impl std::fmt::Debug for SeqGuide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let phase = match &self.phase {
            Phase::Waiting { .. } => "waiting",
            Phase::Active(_) => "active",
            Phase::Broken(_) => "broken",
        };
        f.debug_struct("SeqGuide")
            .field("phase", &phase)
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

/// The allowed set for one step.
#[derive(Debug)]
pub enum Allowed<'a> {
    /// No constraint on this token (a trigger not seen yet).
    Any,
    /// Bits of the allowed token ids (bit `i % 32` of word `i / 32`).
    Mask(&'a mut SimpleVob),
    /// Only end-of-generation.
    EndOnly,
}

impl SeqGuide {
    pub(crate) fn active(parser: TokenParser) -> Self {
        let rebuild = Some(Box::new(parser.deep_clone()));
        Self {
            phase: Phase::Active(Box::new(Matcher::new(Ok(parser)))),
            tokens: Vec::new(),
            next: None,
            rebuild,
            rebuild_trigger: None,
        }
    }

    pub(crate) fn waiting(trigger: Vec<u8>, parser: TokenParser) -> Self {
        let rebuild = Some(Box::new(parser.deep_clone()));
        Self {
            phase: Phase::Waiting {
                trigger: trigger.clone(),
                text: Vec::new(),
                starts: Vec::new(),
                parser: Box::new(parser),
            },
            tokens: Vec::new(),
            next: None,
            rebuild,
            rebuild_trigger: Some(trigger),
        }
    }

    /// Output tokens seen so far.
    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the output is constrained now (not waiting for a trigger).
    pub fn is_active(&self) -> bool {
        !matches!(self.phase, Phase::Waiting { .. })
    }

    /// Computes the first mask (validation: an error here is a bad constraint).
    pub(crate) fn first_mask_check(&mut self, g: &Guidance) -> Result<(), GuidanceError> {
        match &mut self.phase {
            Phase::Active(m) => {
                let t0 = Instant::now();
                let r = m
                    .compute_mask()
                    .map(|_| ())
                    .map_err(|e| GuidanceError(e.to_string()));
                g.times.observe(t0.elapsed());
                r
            }
            _ => Ok(()),
        }
    }

    /// Computes the mask for the next token now (if it is constrained and not
    /// computed yet), timing it.
    pub fn prepare(&mut self, g: &Guidance) {
        if self.next.is_some() {
            return;
        }
        if let Phase::Active(m) = &mut self.phase {
            if m.is_stopped() {
                return; // end only: no mask needed
            }
            let t0 = Instant::now();
            let r = m.compute_mask();
            g.times.observe(t0.elapsed());
            match r {
                Ok(v) => self.next = Some(v),
                Err(e) => self.phase = Phase::Broken(e.to_string()),
            }
        }
    }

    /// The allowed set for the next token (computing its mask now if it was not computed ahead).
    pub fn allowed(&mut self, g: &Guidance) -> Allowed<'_> {
        self.prepare(g);
        match &self.phase {
            Phase::Waiting { .. } => Allowed::Any,
            Phase::Broken(_) => Allowed::EndOnly,
            Phase::Active(m) if m.is_stopped() => Allowed::EndOnly,
            Phase::Active(_) => match self.next.as_mut() {
                Some(v) => Allowed::Mask(v),
                None => Allowed::EndOnly,
            },
        }
    }

    /// Why the constraint broke, if it did.
    pub fn broken(&self) -> Option<&str> {
        match &self.phase {
            Phase::Broken(e) => Some(e),
            _ => None,
        }
    }

    /// Takes the chosen token: advances the matcher, or watches for the trigger.
    pub fn advance(&mut self, g: &Guidance, token: u32) {
        self.next = None;
        self.tokens.push(token);
        let phase = std::mem::replace(&mut self.phase, Phase::Broken(String::new()));
        self.phase = match phase {
            Phase::Active(mut m) => {
                if g.eog.contains(&token) || m.is_stopped() {
                    Phase::Active(m) // the completion ends here
                } else {
                    match m.consume_token(token) {
                        Ok(()) => Phase::Active(m),
                        Err(e) => Phase::Broken(e.to_string()),
                    }
                }
            }
            Phase::Waiting {
                trigger,
                mut text,
                mut starts,
                parser,
            } => {
                let before = text.len();
                starts.push(before);
                text.extend_from_slice(g.token_text(token));
                // A new occurrence ends at or after `before`.
                let from = before.saturating_sub(trigger.len().saturating_sub(1));
                match find(&text[from..], &trigger).map(|p| p + from) {
                    None => Phase::Waiting {
                        trigger,
                        text,
                        starts,
                        parser,
                    },
                    Some(at) => {
                        let feed = self.feed_from(g, &text, &starts, at);
                        let mut m = Matcher::new(Ok(*parser));
                        match m.consume_tokens(&feed) {
                            Ok(()) => Phase::Active(Box::new(m)),
                            Err(e) => {
                                tracing::warn!(error = %e, "the output after the trigger does not match the grammar: ending the completion");
                                Phase::Broken(format!(
                                    "the output after the trigger does not match the grammar: {e}"
                                ))
                            }
                        }
                    }
                }
            }
            broken @ Phase::Broken(_) => broken,
        };
    }

    /// Tokens for the output text from byte `at` on: the output's own tokens
    /// from the one containing `at`, that one re-tokenized from `at` when the
    /// trigger starts inside it.
    fn feed_from(&self, g: &Guidance, text: &[u8], starts: &[usize], at: usize) -> Vec<u32> {
        let k = starts.partition_point(|&s| s <= at).saturating_sub(1);
        let mut feed = Vec::new();
        if starts.get(k) == Some(&at) {
            feed.extend_from_slice(&self.tokens[k..]);
        } else {
            let end = starts.get(k + 1).copied().unwrap_or(text.len());
            feed.extend(g.greedy_tokenize(&text[at..end]));
            feed.extend_from_slice(self.tokens.get(k + 1..).unwrap_or(&[]));
        }
        feed
    }

    /// The same state rebuilt from scratch by replaying the first `n` output tokens seen.
    pub fn replayed(&self, g: &Guidance, n: usize) -> Option<SeqGuide> {
        let parser = self.rebuild.as_ref()?.deep_clone();
        let mut s = match &self.rebuild_trigger {
            None => SeqGuide::active(parser),
            Some(t) => SeqGuide::waiting(t.clone(), parser),
        };
        for &t in self.tokens.get(..n)? {
            s.advance(g, t);
        }
        Some(s)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}
