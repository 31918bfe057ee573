//! Speculative decoding without a draft model: prompt lookup (n-gram) drafts,
//! as llama.cpp's `--spec-type ngram` and vLLM's `ngram` method.
//!
//! For a decoding sequence the scheduler looks up its last `n` tokens
//! (`n = ngram_max` down to `ngram_min`) earlier in its own prompt + output
//! and proposes the (up to `k`) tokens that followed the most recent earlier
//! occurrence ([`propose`]). The chunk then carries `1 + k` rows — the last
//! sampled token and the drafts, like a small prefill chunk — and the last
//! worker computes logits for all of them. Row `j` predicts the token after
//! draft `j`; the sampler samples every row exactly as plain decoding would at
//! that position (same processors, same counter-based draw keyed on the
//! position) and accepts drafts while the sampled token equals the draft
//! ([`accepted_prefix`]). The first mismatch, or the row after the last draft
//! (the bonus token), gives the one extra token. So:
//!
//! - **greedy**: the tokens are those of plain decoding, bit for bit (the
//!   verify rows go through the same row-wise kernels as decode rows);
//! - **seeded sampling**: with a deterministic draft `t` (probability 1),
//!   standard speculative rejection sampling accepts `t` with probability
//!   `p(t)` and otherwise samples the residual `p` without `t`, renormalised.
//!   Sampling `x ~ p` with the position's draw and accepting iff `x == t` is
//!   exactly that (`P(x = t) = p(t)`; given `x != t`, `x` follows the residual),
//!   and it needs no extra draw: a seeded request gives the same tokens with or
//!   without speculation, whatever the batch.
//!
//! K/V written for rejected drafts stay in the table's slots until the next
//! step overwrites them; the scheduler rolls the block table back to the
//! accepted length ([`crate::kv::KvCacheManager::truncate`]), and only
//! accepted tokens are ever committed to the prefix cache.
//!
//! **When a sequence speculates**: `speculative.method = "ngram"`, at most
//! `max_running` sequences running, the sequence decoding (prompt done, no
//! siblings pending), no constraint (structured output, tools: the matcher
//! would have to advance through drafts) and no repetition / presence /
//! frequency penalty (they depend on the tokens before each row). Each
//! sequence keeps an EWMA of its acceptance rate ([`SpecState`]): below
//! `min_acceptance` it stops drafting for `cooldown_steps` decode steps, then
//! tries again.

use crate::config::{SpecMethod, SpeculativeConfig};
use crate::sampling::SamplingParams;

/// Weight of the newest verify step in the acceptance EWMA.
const EWMA_WEIGHT: f64 = 0.5;
/// Verify steps before a low EWMA may switch drafting off.
const MIN_TRIALS: u32 = 2;
/// Consecutive cooldowns double the pause, up to `2^MAX_BACKOFF` times `cooldown_steps`.
const MAX_BACKOFF: u32 = 3;

/// One sequence's speculation bookkeeping: an EWMA of its acceptance rate
/// (starting at 0.5) sets the draft length (`ceil(k × ewma)`, at least 1), so a
/// sequence whose drafts fail pays for short verify steps only; below
/// `min_acceptance` (after 2 verify steps) it stops drafting for
/// `cooldown_steps` decode steps, doubled for each consecutive pause (up to
/// 8×), and retries with the EWMA at the threshold: one more failure pauses it
/// again, one success resumes.
#[derive(Clone, Debug, PartialEq)]
pub struct SpecState {
    /// EWMA of `accepted / drafted` over verify steps.
    pub ewma: f64,
    /// Verify steps since the start.
    pub trials: u32,
    /// Decode steps left without drafting.
    pub cooldown: usize,
    /// Consecutive pauses (the next one lasts `cooldown_steps << backoff`).
    pub backoff: u32,
}

impl Default for SpecState {
    fn default() -> Self {
        Self {
            ewma: 0.5,
            trials: 0,
            cooldown: 0,
            backoff: 0,
        }
    }
}

impl SpecState {
    /// Whether to look for a draft this step; counts a pause down.
    pub fn try_draft(&mut self, cfg: &SpeculativeConfig) -> bool {
        if self.cooldown > 0 {
            self.cooldown -= 1;
            if self.cooldown == 0 {
                // Retry on probation.
                self.ewma = cfg.min_acceptance;
                self.trials = self.trials.max(MIN_TRIALS);
            }
            return false;
        }
        true
    }

    /// Draft tokens to propose this step, out of at most `k`.
    pub fn draft_len(&self, k: usize) -> usize {
        if k == 0 {
            return 0;
        }
        ((k as f64 * self.ewma).ceil() as usize).clamp(1, k)
    }

    /// Records a verify step of `drafted` tokens of which `accepted` were
    /// accepted; may start a pause.
    pub fn record(&mut self, drafted: usize, accepted: usize, cfg: &SpeculativeConfig) {
        if drafted == 0 {
            return;
        }
        let rate = accepted as f64 / drafted as f64;
        self.ewma = (1.0 - EWMA_WEIGHT) * self.ewma + EWMA_WEIGHT * rate;
        self.trials = self.trials.saturating_add(1);
        if self.trials >= MIN_TRIALS && self.ewma < cfg.min_acceptance && cfg.cooldown_steps > 0 {
            self.cooldown = cfg.cooldown_steps << self.backoff.min(MAX_BACKOFF);
            self.backoff = self.backoff.saturating_add(1);
        } else if rate >= cfg.min_acceptance {
            self.backoff = 0;
        }
    }
}

/// Whether a sequence with these parameters may speculate at all (see the
/// module header for why the others do not).
pub fn params_allow(p: &SamplingParams) -> bool {
    p.constraint.is_none()
        && p.repetition_penalty == 1.0
        && p.presence_penalty == 0.0
        && p.frequency_penalty == 0.0
}

/// Whether speculation is on in `cfg` for a batch of `running` sequences.
pub fn batch_allows(cfg: &SpeculativeConfig, running: usize) -> bool {
    cfg.method == SpecMethod::Ngram && running <= cfg.max_running
}

/// Prompt lookup: for `n` from `ngram_max` down to `ngram_min`, the most recent
/// earlier occurrence of the last `n` tokens of `tokens` that is followed by at
/// least one token; returns up to `k` of the tokens that follow it (empty when
/// no suffix n-gram recurs). O(len × n) per call, no allocation but the result.
pub fn propose(tokens: &[u32], ngram_min: usize, ngram_max: usize, k: usize) -> Vec<u32> {
    let len = tokens.len();
    if k == 0 || ngram_min == 0 {
        return Vec::new();
    }
    for n in (ngram_min..=ngram_max.min(len.saturating_sub(1))).rev() {
        let suffix = &tokens[len - n..];
        // Candidate starts `s < len - n` (an earlier occurrence, followed by tokens[s + n]).
        for s in (0..len - n).rev() {
            if &tokens[s..s + n] == suffix {
                let from = s + n;
                let to = (from + k).min(len);
                return tokens[from..to].to_vec();
            }
        }
    }
    Vec::new()
}

/// The number of leading drafts confirmed by the tokens sampled at the verify
/// rows: `sampled[j]` is the token chosen after the sequence's last token and
/// drafts `0..j`; draft `j` is accepted while `sampled[j] == draft[j]` for all
/// earlier rows too. The emitted tokens are `sampled[..=accepted]`.
pub fn accepted_prefix(draft: &[u32], sampled: &[u32]) -> usize {
    draft
        .iter()
        .zip(sampled)
        .take_while(|(d, s)| d == s)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn propose_finds_the_most_recent_longest_ngram() {
        // ... 1 2 3 [7 8] ... 1 2 3 [9 4] ... 1 2 3: the 3-gram's latest occurrence wins.
        let t = [1, 2, 3, 7, 8, 5, 1, 2, 3, 9, 4, 6, 1, 2, 3];
        assert_eq!(propose(&t, 1, 3, 2), vec![9, 4]);
        assert_eq!(propose(&t, 1, 3, 10), vec![9, 4, 6, 1, 2, 3]);
        // Only a 1-gram recurs: `5` was followed by `1`.
        let t = [5, 1, 9, 9, 2, 5];
        assert_eq!(propose(&t, 1, 3, 3), vec![1, 9, 9]);
        assert_eq!(propose(&t, 2, 3, 3), Vec::<u32>::new());
        // The longest match is preferred over a more recent shorter one:
        // suffix [4 5]: 2-gram at 0 (followed by 6); 1-gram `5` most recently at 4 (followed by 7).
        let t = [4, 5, 6, 0, 5, 7, 4, 5];
        assert_eq!(propose(&t, 1, 2, 1), vec![6]);
        assert_eq!(propose(&t, 1, 1, 1), vec![7]);
        // Draft truncated at the end of the context; overlapping runs work.
        let t = [3, 3, 3, 3];
        assert_eq!(propose(&t, 1, 2, 4), vec![3]);
        // Too short, k = 0: nothing.
        assert_eq!(propose(&[1], 1, 3, 4), Vec::<u32>::new());
        assert_eq!(propose(&[1, 1], 1, 3, 0), Vec::<u32>::new());
        assert_eq!(propose(&[], 1, 3, 4), Vec::<u32>::new());
    }

    #[test]
    fn accepted_prefix_stops_at_the_first_mismatch() {
        assert_eq!(accepted_prefix(&[1, 2, 3], &[1, 2, 3, 4]), 3);
        assert_eq!(accepted_prefix(&[1, 2, 3], &[1, 5, 3, 4]), 1);
        assert_eq!(accepted_prefix(&[1, 2, 3], &[0, 2, 3, 4]), 0);
        assert_eq!(accepted_prefix(&[], &[7]), 0);
    }

    #[test]
    fn low_acceptance_pauses_drafting_then_retries() {
        let cfg = SpeculativeConfig {
            num_tokens: 4,
            min_acceptance: 0.25,
            cooldown_steps: 3,
            ..SpeculativeConfig::default()
        };
        let mut s = SpecState::default();
        // ewma 0.5 → 2 of 4 drafts; failures: 0.25 (not below), 0.125 → pause of 3 steps.
        assert_eq!((s.try_draft(&cfg), s.draft_len(4)), (true, 2));
        s.record(2, 0, &cfg);
        assert_eq!((s.cooldown, s.draft_len(4)), (0, 1));
        s.record(1, 0, &cfg);
        assert_eq!((s.cooldown, s.backoff), (3, 1));
        assert_eq!(
            [s.try_draft(&cfg), s.try_draft(&cfg), s.try_draft(&cfg)],
            [false; 3]
        );
        // Probation at the threshold: one draft token; a failure pauses twice as long.
        assert_eq!((s.ewma, s.draft_len(4)), (0.25, 1));
        assert!(s.try_draft(&cfg));
        s.record(1, 0, &cfg);
        assert_eq!((s.cooldown, s.backoff), (6, 2));
        (0..6).for_each(|_| assert!(!s.try_draft(&cfg)));
        // A success resumes and resets the backoff; full acceptance grows the drafts to k.
        assert!(s.try_draft(&cfg));
        s.record(1, 1, &cfg);
        assert_eq!((s.cooldown, s.backoff, s.draft_len(4)), (0, 0, 3));
        for _ in 0..4 {
            s.record(4, 4, &cfg);
        }
        assert_eq!((s.cooldown, s.draft_len(4)), (0, 4));
        // The pause is capped at 8 x cooldown_steps.
        let mut s = SpecState {
            backoff: 7,
            trials: 5,
            ewma: 0.1,
            ..SpecState::default()
        };
        s.record(4, 0, &cfg);
        assert_eq!(s.cooldown, 24);
        // The policy helpers.
        assert!(batch_allows(&SpeculativeConfig::default(), 4));
        assert!(!batch_allows(&SpeculativeConfig::default(), 5));
        assert!(!batch_allows(&SpeculativeConfig::off(), 1));
        assert!(params_allow(&SamplingParams::default()));
        assert!(!params_allow(&SamplingParams {
            frequency_penalty: 0.5,
            ..SamplingParams::default()
        }));
    }

    use crate::sampling::{sample, RowParams};

    fn softmax(v: &[f32]) -> Vec<f64> {
        let m = v.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let e: Vec<f64> = v.iter().map(|&x| ((x - m) as f64).exp()).collect();
        let z: f64 = e.iter().sum();
        e.into_iter().map(|x| x / z).collect()
    }

    /// Chi-square statistic of `counts` against `probs` (a zero-probability cell must be empty).
    fn chi2(counts: &[u64], probs: &[f64]) -> f64 {
        let n: u64 = counts.iter().sum();
        counts
            .iter()
            .zip(probs)
            .map(|(&c, &p)| {
                if p == 0.0 {
                    assert_eq!(c, 0, "a zero-probability token was emitted");
                    0.0
                } else {
                    (c as f64 - p * n as f64).powi(2) / (p * n as f64)
                }
            })
            .sum()
    }

    /// The verify step as the sampler runs it (row-wise [`sample`] at each row's position,
    /// then [`accepted_prefix`]) over a 6-token vocabulary, 60,000 seeded positions, a
    /// deterministic two-token draft `[2, 4]`: acceptance of the first draft is `p1(2)`;
    /// a rejected first row emits the residual `p1` without 2, renormalised; given the
    /// first accepted, the second row accepts 4 with `p2(4)` and otherwise emits `p2`
    /// without 4; so the first emitted token follows `p1` exactly. Chi-square against
    /// each with the 0.1% critical value (5 d.o.f. 20.5, 4 d.o.f. 18.5): deterministic
    /// (fixed seed), and it fails if acceptance or the residual is wrong.
    #[test]
    fn rejection_step_keeps_the_target_distribution() {
        let row1 = [1.0f32, 0.2, 1.4, -0.5, 0.7, 0.0];
        let row2 = [0.3f32, -1.0, 0.9, 0.1, 1.2, 0.5];
        let draft = [2u32, 4];
        for temperature in [1.0f32, 0.7] {
            let p = SamplingParams {
                temperature,
                seed: Some(7),
                ..SamplingParams::default()
            };
            let scale = |r: &[f32]| r.iter().map(|v| v / temperature).collect::<Vec<f32>>();
            let (p1, p2) = (softmax(&scale(&row1)), softmax(&scale(&row2)));
            let n = 60_000usize;
            let (mut first, mut residual1, mut residual2) = ([0u64; 6], [0u64; 6], [0u64; 6]);
            let (mut acc1, mut acc2) = (0u64, 0u64);
            let mut work = vec![0.0f32; 6];
            for k in 0..n {
                // Row j of a chunk whose last token sits at 10 k: it chooses position 10 k + 1 + j.
                let rp = |j: usize| RowParams {
                    params: &p,
                    seed: 7,
                    index: 0,
                    position: 10 * k + 1 + j,
                    prompt: &[],
                    output: &[],
                    masked: &[],
                };
                let sampled = [
                    sample(&row1, &mut work, &rp(0)).token,
                    sample(&row2, &mut work, &rp(1)).token,
                ];
                // The first emitted token is row 1's, accepted or not; row 2's counts once row 1 held.
                first[sampled[0] as usize] += 1;
                match accepted_prefix(&draft, &sampled) {
                    0 => residual1[sampled[0] as usize] += 1,
                    1 => {
                        acc1 += 1;
                        residual2[sampled[1] as usize] += 1;
                    }
                    _ => {
                        acc1 += 1;
                        acc2 += 1;
                    }
                }
            }
            // Acceptance rates within 4 standard deviations of p(t).
            let within = |hits: u64, trials: u64, q: f64| {
                let sd = (q * (1.0 - q) / trials as f64).sqrt();
                ((hits as f64 / trials as f64) - q).abs() < 4.0 * sd
            };
            assert!(
                within(acc1, n as u64, p1[2]),
                "T={temperature}: first accepted {acc1}/{n}, p = {}",
                p1[2]
            );
            assert!(
                within(acc2, acc1, p2[4]),
                "T={temperature}: second accepted {acc2}/{acc1}, p = {}",
                p2[4]
            );
            let without = |p: &[f64], t: usize| {
                let z = 1.0 - p[t];
                p.iter()
                    .enumerate()
                    .map(|(i, &q)| if i == t { 0.0 } else { q / z })
                    .collect::<Vec<f64>>()
            };
            let c = chi2(&first, &p1);
            assert!(
                c < 20.5,
                "T={temperature}: first token chi-square {c}: {first:?}"
            );
            let c = chi2(&residual1, &without(&p1, 2));
            assert!(
                c < 18.5,
                "T={temperature}: residual of row 1 chi-square {c}: {residual1:?}"
            );
            // Row 2's rejected tokens: the residual of p2 without 4 (draft 4 never emitted there).
            let r2 = residual2;
            let c = chi2(&r2, &without(&p2, 4));
            assert!(
                c < 18.5,
                "T={temperature}: residual of row 2 chi-square {c}: {r2:?}"
            );
        }
    }
}
