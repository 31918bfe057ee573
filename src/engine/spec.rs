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
//! frequency penalty (they depend on the tokens before each row).
//!
//! **How long a draft**: cost-aware. Each sequence tracks how often the draft
//! at each position holds ([`SpecState`]); the scheduler measures what decode
//! steps cost by rows on this machine and model ([`StepCost`]: the workers'
//! and the sampler's compute time per step, fitted as `t0 + t1 × rows`). A
//! step drafts the length with the most expected tokens per unit of cost,
//! none when no length pays (then, or when the acceptance EWMA falls below
//! `min_acceptance`, it pauses for `cooldown_steps` decode steps and retries).

use crate::config::{SpecMethod, SpeculativeConfig};
use crate::sampling::SamplingParams;

/// Weight of the newest verify step in the acceptance EWMA.
const EWMA_WEIGHT: f64 = 0.5;
/// Verify steps before a low EWMA may switch drafting off.
const MIN_TRIALS: u32 = 2;
/// Consecutive cooldowns double the pause, up to `2^MAX_BACKOFF` times `cooldown_steps`.
const MAX_BACKOFF: u32 = 3;
/// Draft positions whose acceptance is tracked (the largest `num_tokens`).
pub const MAX_DRAFT: usize = 16;
/// Per verify step, earlier acceptance counts keep this weight (a window of ~10 steps).
const COUNT_DECAY: f64 = 0.9;
/// Weight, in verify steps, of each position's prior (the estimate one
/// position earlier; [`FIRST_PRIOR`] for the first): half a step, so a
/// sequence's own drafts outweigh it after one verify step.
const PRIOR_WEIGHT: f64 = 0.5;
/// Acceptance prior of the first draft position (a fresh sequence drafts 2
/// tokens at the default row price). Chosen with a replay of greedy SmolLM2
/// outputs (3 input-grounded, 3 prose prompts) under row prices 0.15-0.6:
/// it matched or beat the old `ceil(k x EWMA)` rule on both kinds but at 0.15.
const FIRST_PRIOR: f64 = 0.6;

/// One sequence's speculation bookkeeping.
///
/// **Draft length** ([`Self::draft_len`]): per draft position `j` the chance
/// `p_j` that draft `j` is accepted once the drafts before it were (decayed
/// counts over the last ~10 verify steps, each position's prior the estimate of
/// the one before, 0.6 for the first); a draft of `k` tokens then yields
/// `E(k) = 1 + p_1 + p_1 p_2 + ... + p_1...p_k` tokens, and the step costs
/// the sequence its share of the batch's fixed cost plus `k` verify rows, each
/// priced at the measured [`StepCost::row_ratio`]. The length that maximises
/// tokens per unit of cost wins; `0` (drafting does not pay) skips the step
/// and pauses like a low acceptance does.
///
/// **Pauses**: an EWMA of `accepted / drafted` (from 0.5) below `min_acceptance`
/// after 2 verify steps, or a step where no length pays, stops drafting for
/// `cooldown_steps` decode steps, doubled for each consecutive pause (up to 8×);
/// it then retries on probation (EWMA at the threshold, at least one draft
/// token): one more failure pauses it again, one success resumes.
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
    /// On probation after a pause: the next draft has at least one token.
    pub probation: bool,
    /// Per draft position: decayed count of verify steps that accepted it ...
    pub accepted: [f64; MAX_DRAFT],
    /// ... out of those that checked it (the drafts before it accepted).
    pub checked: [f64; MAX_DRAFT],
}

impl Default for SpecState {
    fn default() -> Self {
        Self {
            ewma: 0.5,
            trials: 0,
            cooldown: 0,
            backoff: 0,
            probation: false,
            accepted: [0.0; MAX_DRAFT],
            checked: [0.0; MAX_DRAFT],
        }
    }
}

/// What a verify row costs, in units of the batch's fixed step cost.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowCost {
    /// One more row of the step / the step's fixed cost (`t1 / t0`).
    pub row_ratio: f64,
    /// Sequences sharing the step (their rows and fixed cost).
    pub batch: usize,
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
                self.probation = true;
            }
            return false;
        }
        true
    }

    /// Acceptance estimate of each draft position `0..n` (see the type's doc).
    pub fn acceptance(&self, n: usize) -> Vec<f64> {
        let mut prior = FIRST_PRIOR;
        (0..n.min(MAX_DRAFT))
            .map(|j| {
                let p =
                    (self.accepted[j] + PRIOR_WEIGHT * prior) / (self.checked[j] + PRIOR_WEIGHT);
                prior = p;
                p
            })
            .collect()
    }

    /// Draft tokens to propose this step, out of at most `k`: the length with the
    /// most expected tokens per unit of cost under `cost`; 0 when no draft pays
    /// (which pauses drafting, see [`Self::skip`]) unless on probation (then 1).
    pub fn draft_len(&self, k: usize, cost: RowCost) -> usize {
        let k = k.min(MAX_DRAFT);
        if k == 0 {
            return 0;
        }
        let b = cost.batch.max(1) as f64;
        let rho = cost.row_ratio.max(0.0);
        // The sequence's share of the step: fixed cost and its own row, then its drafts.
        let share = 1.0 / b + rho;
        let (mut best, mut best_rate) = (0, 1.0 / share);
        let (mut expected, mut reach) = (1.0, 1.0);
        for (j, p) in self.acceptance(k).into_iter().enumerate() {
            reach *= p;
            expected += reach;
            let rate = expected / (share + rho * (j + 1) as f64);
            if rate > best_rate * (1.0 + 1e-9) {
                (best, best_rate) = (j + 1, rate);
            }
        }
        if best == 0 && self.probation {
            1
        } else {
            best
        }
    }

    /// No draft length paid this step: pause as a low acceptance does.
    pub fn skip(&mut self, cfg: &SpeculativeConfig) {
        self.pause(cfg);
    }

    fn pause(&mut self, cfg: &SpeculativeConfig) {
        if cfg.cooldown_steps > 0 {
            self.cooldown = cfg.cooldown_steps << self.backoff.min(MAX_BACKOFF);
            self.backoff = self.backoff.saturating_add(1);
        }
        self.probation = false;
    }

    /// Records a verify step of `drafted` tokens of which `accepted` were
    /// accepted; may start a pause.
    pub fn record(&mut self, drafted: usize, accepted: usize, cfg: &SpeculativeConfig) {
        if drafted == 0 {
            return;
        }
        let accepted = accepted.min(drafted);
        for j in 0..MAX_DRAFT {
            self.accepted[j] *= COUNT_DECAY;
            self.checked[j] *= COUNT_DECAY;
        }
        // Drafts 0..accepted held; draft `accepted` (if any) was checked and failed.
        for j in 0..(accepted + 1).min(drafted).min(MAX_DRAFT) {
            self.checked[j] += 1.0;
            if j < accepted {
                self.accepted[j] += 1.0;
            }
        }
        let rate = accepted as f64 / drafted as f64;
        self.ewma = (1.0 - EWMA_WEIGHT) * self.ewma + EWMA_WEIGHT * rate;
        self.trials = self.trials.saturating_add(1);
        if self.trials >= MIN_TRIALS && self.ewma < cfg.min_acceptance && cfg.cooldown_steps > 0 {
            self.pause(cfg);
        } else {
            self.probation = false;
            if rate >= cfg.min_acceptance {
                self.backoff = 0;
            }
        }
    }
}

/// Decayed least-squares fit of a decode step's service time (every stage's
/// compute plus the sampler) against its rows, `t = t0 + t1 × rows`, over
/// decode-only steps (plain and verify rows) of at most [`StepCost::MAX_ROWS`]
/// rows: the price of a verify row on this machine and model.
#[derive(Clone, Debug, PartialEq)]
pub struct StepCost {
    w: f64,
    r: f64,
    rr: f64,
    y: f64,
    ry: f64,
}

impl Default for StepCost {
    fn default() -> Self {
        Self {
            w: 0.0,
            r: 0.0,
            rr: 0.0,
            y: 0.0,
            ry: 0.0,
        }
    }
}

impl StepCost {
    /// Steps with more rows are not observed (a large batch, not speculation's regime).
    pub const MAX_ROWS: usize = 64;
    /// `t1 / t0` until the rows observed vary enough to fit it (measured on
    /// SmolLM2, 2 cores: one row 4.6 ms, four 7.6, eight 12.5).
    pub const DEFAULT_ROW_RATIO: f64 = 0.25;
    /// Weight each earlier observation keeps per new one (a window of ~100 steps).
    const DECAY: f64 = 0.99;
    /// The fitted ratio is kept within these bounds.
    const RATIO_RANGE: (f64, f64) = (0.01, 4.0);

    /// Adds one decode step of `rows` rows that took `secs` of service time.
    pub fn observe(&mut self, rows: usize, secs: f64) {
        if rows == 0 || rows > Self::MAX_ROWS || !(secs.is_finite() && secs > 0.0) {
            return;
        }
        // A step far slower than the fit (the thread was descheduled) says nothing about rows.
        if let Some((t0, t1)) = self.fit() {
            if secs > 3.0 * (t0 + t1 * rows as f64) {
                return;
            }
        }
        let r = rows as f64;
        let d = Self::DECAY;
        self.w = d * self.w + 1.0;
        self.r = d * self.r + r;
        self.rr = d * self.rr + r * r;
        self.y = d * self.y + secs;
        self.ry = d * self.ry + r * secs;
    }

    /// `(t0, t1)` in seconds, once the rows observed vary (a spread of at least
    /// one row) and the fit is positive.
    pub fn fit(&self) -> Option<(f64, f64)> {
        if self.w < 2.0 {
            return None;
        }
        let mean_r = self.r / self.w;
        let var = self.rr / self.w - mean_r * mean_r;
        if var < 0.25 {
            return None;
        }
        let cov = self.ry / self.w - mean_r * self.y / self.w;
        let t1 = cov / var;
        let t0 = self.y / self.w - t1 * mean_r;
        (t0 > 0.0 && t1 > 0.0).then_some((t0, t1))
    }

    /// `t1 / t0`: [`Self::DEFAULT_ROW_RATIO`] until [`Self::fit`] has one.
    pub fn row_ratio(&self) -> f64 {
        self.fit().map_or(Self::DEFAULT_ROW_RATIO, |(t0, t1)| {
            (t1 / t0).clamp(Self::RATIO_RANGE.0, Self::RATIO_RANGE.1)
        })
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

    /// Row price of a lone sequence at the default ratio.
    const ALONE: RowCost = RowCost {
        row_ratio: StepCost::DEFAULT_ROW_RATIO,
        batch: 1,
    };

    #[test]
    fn low_acceptance_pauses_drafting_then_retries() {
        let cfg = SpeculativeConfig {
            num_tokens: 4,
            min_acceptance: 0.25,
            cooldown_steps: 3,
            ..SpeculativeConfig::default()
        };
        let mut s = SpecState::default();
        // Prior 0.6 everywhere: E = 1, 1.6, 1.96, 2.18 for a cost of 1.25 + k / 4: two drafts.
        assert_eq!((s.try_draft(&cfg), s.draft_len(4, ALONE)), (true, 2));
        // Failures: EWMA 0.25 (not below), 0.125 -> pause of 3 steps.
        s.record(2, 0, &cfg);
        assert_eq!(s.cooldown, 0);
        s.record(2, 0, &cfg);
        assert_eq!((s.cooldown, s.backoff), (3, 1));
        assert_eq!(
            [s.try_draft(&cfg), s.try_draft(&cfg), s.try_draft(&cfg)],
            [false; 3]
        );
        // Probation: drafting does not pay at this acceptance, but one token is tried.
        assert!(s.probation);
        assert_eq!((s.ewma, s.draft_len(4, ALONE)), (0.25, 1));
        assert!(s.try_draft(&cfg));
        s.record(1, 0, &cfg);
        assert_eq!((s.cooldown, s.backoff, s.probation), (6, 2, false));
        (0..6).for_each(|_| assert!(!s.try_draft(&cfg)));
        // A success resumes and resets the backoff; steady full acceptance grows the drafts to k.
        assert!(s.try_draft(&cfg));
        s.record(1, 1, &cfg);
        assert_eq!((s.cooldown, s.backoff, s.probation), (0, 0, false));
        for _ in 0..6 {
            s.record(4, 4, &cfg);
        }
        assert_eq!((s.cooldown, s.draft_len(4, ALONE)), (0, 4));
        // Without probation a length that does not pay is 0, and skipping pauses.
        // (min_acceptance 0: only the cost rule can stop it.)
        let mut s = SpecState::default();
        let no_floor = SpeculativeConfig {
            min_acceptance: 0.0,
            ..cfg.clone()
        };
        for _ in 0..3 {
            s.record(2, 0, &no_floor);
        }
        assert_eq!((s.cooldown, s.backoff), (0, 0));
        assert_eq!(s.draft_len(4, ALONE), 0);
        s.skip(&no_floor);
        assert_eq!((s.cooldown, s.backoff), (3, 1));
        s.cooldown = 0;
        s.skip(&no_floor);
        assert_eq!((s.cooldown, s.backoff), (6, 2));
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

    #[test]
    fn acceptance_is_tracked_per_draft_position() {
        let cfg = SpeculativeConfig::default();
        let mut s = SpecState::default();
        assert_eq!(s.acceptance(3), vec![FIRST_PRIOR; 3]);
        // 3 of 4 drafts held, then the 4th failed: positions 0..3 accepted, 3 checked and failed,
        // 4.. never checked (their prior is the estimate one position earlier).
        s.record(4, 3, &cfg);
        let p = s.acceptance(6);
        let w = PRIOR_WEIGHT;
        let p0 = (1.0 + w * FIRST_PRIOR) / (1.0 + w);
        let p1 = (1.0 + w * p0) / (1.0 + w);
        let p2 = (1.0 + w * p1) / (1.0 + w);
        let p3 = w * p2 / (1.0 + w);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(
            close(p[0], p0) && close(p[1], p1) && close(p[2], p2),
            "{p:?}"
        );
        assert!(close(p[3], p3) && p3 < 0.5, "{p:?}");
        assert_eq!(p[4], p[3]);
        assert_eq!(p[5], p[3]);
        // Everything accepted; older counts decay by 0.9.
        s.record(2, 2, &cfg);
        assert_eq!(s.checked[0], 1.9);
        assert_eq!(s.accepted[3], 0.0);
        assert!((s.checked[3] - 0.9).abs() < 1e-12);
        // `accepted` beyond `drafted` is clamped; nothing drafted records nothing.
        let before = s.clone();
        s.record(0, 0, &cfg);
        assert_eq!(s, before);
        s.record(1, 5, &cfg);
        assert_eq!(s.checked[1], before.checked[1] * 0.9);
    }

    #[test]
    fn the_draft_length_weighs_expected_tokens_against_the_row_price() {
        let cfg = SpeculativeConfig::default();
        // Drafts that always hold.
        let mut sure = SpecState::default();
        for _ in 0..30 {
            sure.record(8, 8, &cfg);
        }
        // Cheap rows or dear (one costs the step's whole fixed part): the full length.
        let cost = |row_ratio, batch| RowCost { row_ratio, batch };
        assert_eq!(sure.draft_len(8, cost(0.1, 1)), 8);
        assert_eq!(sure.draft_len(8, cost(1.0, 1)), 8);
        // First draft held half the time, the later ones always (copying after a guess):
        // worth it alone, not in a batch of 4 where the fixed cost is shared.
        let mut half = SpecState::default();
        for i in 0..40 {
            half.record(8, if i % 2 == 0 { 8 } else { 0 }, &cfg);
        }
        assert_eq!(half.draft_len(8, cost(0.25, 1)), 8);
        assert_eq!(half.draft_len(8, cost(1.0, 4)), 0);
        // Drafts that hold 30% at each position: only a short draft pays when rows are cheap.
        let mut weak = SpecState::default();
        for i in 0..200 {
            // 3 of 10 first drafts hold, 1 of 3 second ones.
            let accepted = [1, 0, 0, 1, 0, 0, 0, 2, 0, 0][i % 10];
            weak.record(3, accepted, &cfg);
        }
        let p = weak.acceptance(3);
        assert!(p[0] > 0.2 && p[0] < 0.45, "{p:?}");
        assert_eq!(weak.draft_len(8, cost(0.15, 1)), 1);
        assert_eq!(weak.draft_len(8, cost(0.5, 1)), 0);
        // At most `k`, and nothing for k = 0.
        assert_eq!(sure.draft_len(3, cost(0.1, 1)), 3);
        assert_eq!(sure.draft_len(0, cost(0.1, 1)), 0);
    }

    #[test]
    fn step_cost_fits_the_price_of_a_row() {
        let mut c = StepCost::default();
        assert_eq!(c.fit(), None);
        assert_eq!(c.row_ratio(), StepCost::DEFAULT_ROW_RATIO);
        // Steps of one row only: no slope can be fitted.
        for _ in 0..10 {
            c.observe(1, 0.005);
        }
        assert_eq!(c.fit(), None);
        // t = 4 ms + 1 ms per row, rows 1..=9.
        for i in 0..200 {
            let rows = 1 + i % 9;
            c.observe(rows, 0.004 + 0.001 * rows as f64);
        }
        let (t0, t1) = c.fit().expect("fit");
        assert!(
            (t0 - 0.004).abs() < 2e-4 && (t1 - 0.001).abs() < 5e-5,
            "{t0} {t1}"
        );
        assert!((c.row_ratio() - 0.25).abs() < 0.02);
        // A descheduled step (10x slower), zero rows, huge batches and bad times are ignored.
        let before = c.clone();
        c.observe(2, 0.06);
        c.observe(0, 0.004);
        c.observe(StepCost::MAX_ROWS + 1, 1.0);
        c.observe(3, f64::NAN);
        c.observe(3, -1.0);
        assert_eq!(c, before);
        // The machine's price changes (rows now 2 ms each): the fit follows.
        for i in 0..600 {
            let rows = 1 + i % 9;
            c.observe(rows, 0.004 + 0.002 * rows as f64);
        }
        assert!((c.row_ratio() - 0.5).abs() < 0.05, "{}", c.row_ratio());
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
