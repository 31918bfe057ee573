//! Selection: logits → next token.
//!
//! Randomness is counter-based: the uniform draw for a token is a pure function
//! of `(seed, completion index, position)`, so a seeded request gives the same
//! tokens whatever batch it shares, and across preemption and restart.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Sampling controls, named as in the OpenAI and vLLM APIs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Most new tokens per completion.
    pub max_tokens: usize,
    /// EOS and stop tokens are ignored until this many tokens were generated.
    pub min_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens (-1 or 0 = off).
    pub top_k: i32,
    /// Nucleus mass in (0, 1].
    pub top_p: f32,
    /// Drop tokens with probability < min_p * max probability; in [0, 1].
    pub min_p: f32,
    /// Multiplicative penalty on logits of tokens seen in prompt or output (1 = off).
    pub repetition_penalty: f32,
    /// Subtracted once from logits of tokens present in the output; in [-2, 2].
    pub presence_penalty: f32,
    /// Subtracted per occurrence in the output; in [-2, 2].
    pub frequency_penalty: f32,
    /// Token id → bias added to its logit; bias in [-100, 100].
    pub logit_bias: HashMap<u32, f32>,
    /// Seed of the counter-based random stream (None: drawn fresh, reported back).
    pub seed: Option<u64>,
    /// Stop strings (not included in the output).
    pub stop: Vec<String>,
    /// Extra token ids that end a completion.
    pub stop_token_ids: Vec<u32>,
    /// Keep going past end-of-generation tokens.
    pub ignore_eos: bool,
    /// Return the log-probability of each chosen token and this many top alternatives (0..=20).
    pub logprobs: Option<usize>,
    /// Return log-probabilities of prompt tokens with this many alternatives (0..=20).
    pub prompt_logprobs: Option<usize>,
    /// Completions of this prompt.
    pub n: usize,
    /// Skip special tokens when detokenizing.
    pub skip_special_tokens: bool,
    /// What the output must match (structured output, tool calls); `None`: free text.
    pub constraint: Option<crate::guidance::Constraint>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: 16,
            min_tokens: 0,
            temperature: 1.0,
            top_k: -1,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: HashMap::new(),
            seed: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            prompt_logprobs: None,
            n: 1,
            skip_special_tokens: true,
            constraint: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding of `max_tokens` tokens.
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            max_tokens,
            temperature: 0.0,
            ..Self::default()
        }
    }
}

/// SplitMix64's increment (2^64 / golden ratio).
const SPLITMIX64_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64 finalizer: a strong 64-bit mixing function.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(SPLITMIX64_GAMMA);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The SplitMix64 generator (Steele, Lea and Flood, 2014): tiny, seedable and
/// good enough for synthetic weights, prompts and arrival times. The crate's
/// one home for pseudo-random sequences, so the library does not depend on
/// `rand`; sampling itself is counter-based ([`uniform`]).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let r = mix64(self.0);
        self.0 = self.0.wrapping_add(SPLITMIX64_GAMMA);
        r
    }

    /// Uniform in the open interval `(0, 1)` (never 0, so its logarithm is finite).
    pub fn next_open01(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
}

/// Uniform draw in `[0, 1)` keyed on `(seed, index, position)`.
pub fn uniform(seed: u64, index: u64, position: u64) -> f64 {
    let h = mix64(mix64(mix64(seed) ^ index.wrapping_mul(0xD6E8_FEB8_6659_FD93)) ^ position);
    (h >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Index of the largest logit (lowest index wins ties; NaNs are ignored).
pub fn argmax(logits: &[f32]) -> u32 {
    // Two passes, both vectorizable: the maximum, then its first position.
    let m = max_of(logits);
    logits.iter().position(|&v| v == m).unwrap_or(0) as u32
}

/// `exp(x)` for `x <= 0` with < 5e-7 relative error: range reduction to
/// `2^n * 2^f` and a degree-6 polynomial, written so the compiler vectorizes
/// loops over it (no libm call). Inputs below -87 give 0.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    let x = x.max(-87.0);
    // Cody-Waite range reduction: x = n ln2 + r, |r| <= ln2 / 2.
    // Round to nearest with the 1.5 * 2^23 trick: plain adds, so the loop
    // vectorizes without SSE4.1's round instruction (no libm call).
    const MAGIC: f32 = 12_582_912.0;
    let n = (x * std::f32::consts::LOG2_E + MAGIC) - MAGIC;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    // e^r: Taylor series to degree 7 (error < 1e-8 for |r| <= 0.35)
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let bits = ((n as i32 + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

/// `sum_i exp(v[i] - m)` (SIMD kernel; relative error < 1e-6).
pub fn sum_exp(v: &[f32], m: f32) -> f64 {
    crate::kernels::sum_exp(v, m)
}

/// Largest value (NEG_INFINITY for an empty slice; NaNs are skipped).
pub fn max_of(v: &[f32]) -> f32 {
    crate::kernels::max_f32(v)
}

/// `log(sum(exp(logits)))`, computed stably.
pub fn logsumexp(logits: &[f32]) -> f32 {
    let m = max_of(logits);
    if !m.is_finite() {
        return m;
    }
    m + sum_exp(logits, m).ln() as f32
}

/// Log-probability of `token` under softmax(logits).
pub fn logprob(logits: &[f32], token: u32) -> f32 {
    logits[token as usize] - logsumexp(logits)
}

/// Samples from softmax(logits / temperature) with the uniform draw `u`;
/// `temperature == 0` is greedy.
pub fn sample_temperature(logits: &[f32], temperature: f32, u: f64) -> u32 {
    if temperature <= 0.0 {
        return argmax(logits);
    }
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let inv_t = 1.0 / temperature as f64;
    let total: f64 = logits.iter().map(|&v| ((v - m) as f64 * inv_t).exp()).sum();
    let target = u * total;
    let mut acc = 0.0f64;
    for (i, &v) in logits.iter().enumerate() {
        acc += ((v - m) as f64 * inv_t).exp();
        if acc > target {
            return i as u32;
        }
    }
    argmax(logits)
}

/// Picks the `k` largest entries of `logits` as `(index, logit)`, best first
/// (ties: lower index first). Partial selection, no full sort of the vocabulary.
pub fn top_k_entries(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let k = k.min(logits.len());
    if k == 0 {
        return Vec::new();
    }
    let cmp = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if k <= 32 {
        // Log-probability alternatives (k <= 20): one pass keeping the best k in
        // order, no vocabulary-sized buffer.
        let mut top: Vec<(u32, f32)> = Vec::with_capacity(k);
        for (i, &v) in logits.iter().enumerate() {
            let e = (i as u32, v);
            if top.len() == k {
                match top.last() {
                    Some(worst) if cmp(&e, worst).is_lt() => {
                        top.pop();
                    }
                    _ => continue,
                }
            }
            let at = top.partition_point(|t| cmp(t, &e).is_lt());
            top.insert(at, e);
        }
        return top;
    }
    let mut idx: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, v))
        .collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
        // The result may be kept (per token): it must not hold the vocabulary-sized buffer.
        idx.shrink_to_fit();
    }
    idx.sort_unstable_by(cmp);
    idx
}

/// What the sampler needs for one row: parameters and the keys of its random stream.
#[derive(Clone, Copy, Debug)]
pub struct RowParams<'a> {
    /// Sampling parameters.
    pub params: &'a SamplingParams,
    /// Seed of the random stream.
    pub seed: u64,
    /// Completion index.
    pub index: usize,
    /// Position of the token being chosen (the sequence length before it).
    pub position: usize,
    /// Prompt tokens (repetition penalty).
    pub prompt: &'a [u32],
    /// Generated tokens so far (penalties).
    pub output: &'a [u32],
    /// Mask these ids (stop tokens while `min_tokens` is not reached).
    pub masked: &'a [u32],
}

/// Result of sampling one row.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    /// Chosen token.
    pub token: u32,
    /// Its log-probability under the raw (unprocessed) distribution.
    pub logprob: f32,
    /// Top alternatives under the raw distribution, best first (if requested).
    pub top: Vec<(u32, f32)>,
}

/// Applies the logits processors in place, in this fixed order:
///
/// 1. **penalties** — repetition (divide positive / multiply negative logits of
///    tokens in prompt or output, as in CTRL/HF/vLLM), then presence and
///    frequency (subtract once / per occurrence in the output, as OpenAI);
///    they describe the model's raw preferences, so they come first;
/// 2. **logit bias** — the caller's explicit per-token edit, applied on the
///    penalized logits so it is not undone by them (OpenAI semantics);
/// 3. **stop-token mask** while `min_tokens` is not reached.
///
/// Temperature and truncation (top-k, top-p, min-p) follow in [`sample`],
/// truncation after temperature so that top-p/min-p act on the distribution
/// actually sampled from (vLLM's order).
pub fn apply_processors(logits: &mut [f32], r: &RowParams<'_>) {
    let p = r.params;
    let vocab = logits.len();
    if p.repetition_penalty != 1.0 {
        let rp = p.repetition_penalty;
        let mut seen = vec![false; vocab];
        for &t in r.prompt.iter().chain(r.output) {
            if let Some(s) = seen.get_mut(t as usize) {
                *s = true;
            }
        }
        for (l, _) in logits.iter_mut().zip(&seen).filter(|(_, &s)| s) {
            *l = if *l > 0.0 { *l / rp } else { *l * rp };
        }
    }
    if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
        let mut counts: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
        for &t in r.output {
            *counts.entry(t).or_default() += 1;
        }
        for (&t, &c) in &counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= p.presence_penalty + p.frequency_penalty * c as f32;
            }
        }
    }
    for (&t, &b) in &p.logit_bias {
        if let Some(l) = logits.get_mut(t as usize) {
            *l += b;
        }
    }
    for &t in r.masked {
        if let Some(l) = logits.get_mut(t as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// The candidate set kept by top-k, then top-p, then min-p, on logits already
/// divided by the temperature, as `(token, logit)`. Partial selection only:
/// top-p grows a sorted head of the distribution (64, 256, … entries) until it
/// holds the requested mass, so the whole vocabulary is never sorted.
pub fn truncate(scaled: &[f32], top_k: i32, top_p: f32, min_p: f32) -> Vec<(u32, f32)> {
    let vocab = scaled.len();
    let k = if top_k > 0 {
        (top_k as usize).min(vocab)
    } else {
        vocab
    };
    let m = max_of(scaled);
    let mut cand = if top_p < 1.0 {
        // Mass is normalized over the top-k set (the whole vocabulary when k is off).
        let z = if k < vocab {
            top_k_entries(scaled, k)
                .iter()
                .map(|&(_, v)| fast_exp(v - m) as f64)
                .sum()
        } else {
            sum_exp(scaled, m)
        };
        let mut want = 64.min(k);
        loop {
            let head = top_k_entries(scaled, want);
            let mut acc = 0.0f64;
            let cut = head.iter().position(|&(_, v)| {
                acc += fast_exp(v - m) as f64 / z;
                acc >= top_p as f64
            });
            match cut {
                Some(c) => {
                    let mut head = head;
                    head.truncate(c + 1);
                    break head;
                }
                None if want >= k => break head,
                None => want = (want * 4).min(k),
            }
        }
    } else if k < vocab {
        top_k_entries(scaled, k)
    } else {
        scaled
            .iter()
            .enumerate()
            .map(|(i, &v)| (i as u32, v))
            .collect()
    };
    if min_p > 0.0 {
        // p_i >= min_p * p_max  <=>  v_i >= m + ln(min_p)
        let thr = m + min_p.ln();
        cand.retain(|&(_, v)| v >= thr);
    }
    if cand.is_empty() {
        cand.push((argmax(scaled), m));
    }
    cand
}

/// Whether [`apply_processors`] would change any logit of this row.
fn processors_active(r: &RowParams<'_>) -> bool {
    let p = r.params;
    p.repetition_penalty != 1.0
        || p.presence_penalty != 0.0
        || p.frequency_penalty != 0.0
        || !p.logit_bias.is_empty()
        || !r.masked.is_empty()
}

/// Samples one token from the model's logits `raw` for row `r`: processors
/// ([`apply_processors`]), temperature and truncation run on `work` (scratch
/// of `raw.len()` floats, overwritten with a copy of `raw` when needed; a
/// plain greedy row never copies). Reported log-probabilities are those of
/// the unmodified `raw`. Over a 262k vocabulary a greedy row costs three
/// vectorized passes (max, first position of the max, sum of exps).
pub fn sample(raw: &[f32], work: &mut [f32], r: &RowParams<'_>) -> Sampled {
    sample_allowed(raw, work, r, None)
}

/// Sets to `-inf` the logit of every token whose bit is clear in `allowed`
/// (bit `i % 32` of word `i / 32`; ids past the bits are disallowed).
pub fn apply_allowed(logits: &mut [f32], allowed: &[u32]) {
    for (w, chunk) in logits.chunks_mut(32).enumerate() {
        let bits = allowed.get(w).copied().unwrap_or(0);
        if bits == u32::MAX && chunk.len() == 32 {
            continue;
        }
        if bits == 0 {
            chunk.fill(f32::NEG_INFINITY);
            continue;
        }
        for (b, l) in chunk.iter_mut().enumerate() {
            if bits & (1 << b) == 0 {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// [`sample`] restricted to the tokens set in `allowed` (a constraint's
/// mask, see [`apply_allowed`]), applied after the processors and before
/// temperature and truncation; masked tokens are never chosen, and the draw
/// is the same counter-based one, so a seeded constrained row gives the same
/// token whatever batch it is in. At least one token must be allowed.
pub fn sample_allowed(
    raw: &[f32],
    work: &mut [f32],
    r: &RowParams<'_>,
    allowed: Option<&[u32]>,
) -> Sampled {
    let p = r.params;
    let m_raw = max_of(raw);
    let greedy_raw = p.temperature <= 0.0 && !processors_active(r) && allowed.is_none();
    let logits: &mut [f32] = if greedy_raw {
        &mut []
    } else {
        work.copy_from_slice(raw);
        apply_processors(work, r);
        if let Some(bits) = allowed {
            apply_allowed(work, bits);
        }
        work
    };
    let token = if greedy_raw {
        raw.iter().position(|&v| v == m_raw).unwrap_or(0) as u32
    } else if p.temperature <= 0.0 {
        argmax(logits)
    } else {
        let inv_t = 1.0 / p.temperature;
        for l in logits.iter_mut() {
            *l *= inv_t;
        }
        let u = uniform(r.seed, r.index as u64, r.position as u64);
        let truncating = p.top_k > 0 || p.top_p < 1.0 || p.min_p > 0.0;
        if truncating {
            let mut cand = truncate(logits, p.top_k, p.top_p, p.min_p);
            // Masked tokens (-inf) are never candidates, however the exp rounds.
            if cand.iter().any(|c| c.1 > f32::NEG_INFINITY) {
                cand.retain(|c| c.1 > f32::NEG_INFINITY);
            }
            let m = cand.iter().fold(f32::NEG_INFINITY, |a, c| a.max(c.1));
            let total: f64 = cand.iter().map(|&(_, v)| fast_exp(v - m) as f64).sum();
            let target = u * total;
            let mut acc = 0.0;
            let mut chosen = cand[cand.len() - 1].0;
            for &(t, v) in &cand {
                acc += fast_exp(v - m) as f64;
                if acc > target {
                    chosen = t;
                    break;
                }
            }
            chosen
        } else {
            // Whole vocabulary: one pass for the total, one scan to the target.
            let m = max_of(logits);
            // The total (SIMD exp) and the scan (scalar exp) round differently:
            // when a draw within rounding of 1 is not reached, the last
            // selectable token is the one the draw points at.
            let target = u * sum_exp(logits, m);
            let mut acc = 0.0f64;
            let mut last = argmax(logits);
            'scan: {
                for (i, &v) in logits.iter().enumerate() {
                    // Masked (-inf) tokens weigh nothing (fast_exp would give ~1e-38).
                    if v == f32::NEG_INFINITY {
                        continue;
                    }
                    acc += fast_exp(v - m) as f64;
                    if acc > target {
                        break 'scan i as u32;
                    }
                    last = i as u32;
                }
                last
            }
        }
    };
    let lse = if m_raw.is_finite() {
        m_raw + sum_exp(raw, m_raw).ln() as f32
    } else {
        m_raw
    };
    let top = match p.logprobs {
        Some(n) if n > 0 => top_k_entries(raw, n)
            .into_iter()
            .map(|(t, v)| (t, v - lse))
            .collect(),
        _ => Vec::new(),
    };
    Sampled {
        token,
        logprob: raw[token as usize] - lse,
        top,
    }
}

#[cfg(test)]
mod tests {

    fn row<'a>(p: &'a SamplingParams, prompt: &'a [u32], output: &'a [u32]) -> RowParams<'a> {
        RowParams {
            params: p,
            seed: 1,
            index: 0,
            position: 0,
            prompt,
            output,
            masked: &[],
        }
    }

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // Reference outputs of Vigna's splitmix64.c seeded with 0.
        let mut rng = super::SplitMix64::new(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(rng.next_u64(), 0x06C4_5D18_8009_454F);
        let u = rng.next_open01();
        assert!(u > 0.0 && u < 1.0, "{u}");
    }

    fn softmax(v: &[f32]) -> Vec<f64> {
        let m = v.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let e: Vec<f64> = v.iter().map(|&x| ((x - m) as f64).exp()).collect();
        let z: f64 = e.iter().sum();
        e.into_iter().map(|x| x / z).collect()
    }

    /// Chi-square statistic of observed counts against expected probabilities
    /// (cells with p = 0 must have count 0).
    fn chi2(counts: &[u64], probs: &[f64], n: u64) -> f64 {
        let mut chi = 0.0;
        for (&c, &p) in counts.iter().zip(probs) {
            if p == 0.0 {
                assert_eq!(c, 0, "token with zero probability was sampled");
                continue;
            }
            let e = p * n as f64;
            chi += (c as f64 - e).powi(2) / e;
        }
        chi
    }

    #[test]
    fn frequencies_match_softmax_at_several_temperatures() {
        let logits = [2.0f32, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.5];
        // 0.1% critical value of chi-square with 7 degrees of freedom.
        let crit = 24.32;
        for &t in &[0.3f32, 0.7, 1.0, 1.8] {
            let p = SamplingParams {
                temperature: t,
                ..Default::default()
            };
            let n = 60_000u64;
            let mut counts = [0u64; 8];
            for pos in 0..n {
                let mut w = logits;
                let r = RowParams {
                    position: pos as usize,
                    ..row(&p, &[], &[])
                };
                counts[sample(&logits, &mut w, &r).token as usize] += 1;
            }
            let scaled: Vec<f32> = logits.iter().map(|v| v / t).collect();
            let chi = chi2(&counts, &softmax(&scaled), n);
            assert!(chi < crit, "T={t}: chi-square {chi}, counts {counts:?}");
        }
    }

    #[test]
    fn truncations_keep_exactly_the_intended_sets() {
        // probabilities (T=1): softmax of these logits
        let logits = [3.0f32, 2.0, 1.0, 0.0, -1.0, 2.5];
        let probs = softmax(&logits);
        let set = |v: Vec<(u32, f32)>| {
            let mut s: Vec<u32> = v.into_iter().map(|c| c.0).collect();
            s.sort();
            s
        };
        assert_eq!(set(truncate(&logits, 2, 1.0, 0.0)), vec![0, 5]);
        assert_eq!(set(truncate(&logits, 0, 1.0, 0.0)).len(), 6);
        assert_eq!(set(truncate(&logits, -1, 1.0, 0.0)).len(), 6);
        // top-p: smallest prefix (by probability) whose mass reaches p
        let mut order: Vec<usize> = (0..6).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        for &p in &[0.3f32, 0.5, 0.8, 0.95, 0.999] {
            let mut acc = 0.0;
            let mut want = Vec::new();
            for &i in &order {
                want.push(i as u32);
                acc += probs[i];
                if acc >= p as f64 {
                    break;
                }
            }
            want.sort();
            assert_eq!(set(truncate(&logits, -1, p, 0.0)), want, "top_p {p}");
        }
        // min-p: keep p_i >= min_p * p_max
        for &mp in &[0.05f32, 0.2, 0.5, 0.9] {
            let pmax = probs[0];
            let mut want: Vec<u32> = (0..6)
                .filter(|&i| probs[i] >= mp as f64 * pmax - 1e-12)
                .map(|i| i as u32)
                .collect();
            want.sort();
            assert_eq!(set(truncate(&logits, -1, 1.0, mp)), want, "min_p {mp}");
        }
        // combined: top-k 3 then top-p 0.7 within the renormalized top-3
        let k3 = [probs[0], probs[5], probs[1]];
        let z: f64 = k3.iter().sum();
        assert!(probs[0] / z < 0.7);
        assert_eq!(set(truncate(&logits, 3, 0.7, 0.0)), vec![0, 5]);
    }

    #[test]
    fn sampled_tokens_stay_inside_the_truncated_set() {
        let logits: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
            .collect();
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 5,
            ..Default::default()
        };
        let allowed: Vec<u32> = top_k_entries(&logits, 5).into_iter().map(|c| c.0).collect();
        let mut counts = std::collections::HashMap::new();
        for pos in 0..20_000 {
            let mut w = logits.clone();
            let r = RowParams {
                position: pos,
                ..row(&p, &[], &[])
            };
            let t = sample(&logits, &mut w, &r).token;
            assert!(allowed.contains(&t));
            *counts.entry(t).or_insert(0u64) += 1;
        }
        // frequencies follow the renormalized top-5 softmax
        let top: Vec<f32> = allowed.iter().map(|&t| logits[t as usize]).collect();
        let probs = softmax(&top);
        let c: Vec<u64> = allowed
            .iter()
            .map(|t| counts.get(t).copied().unwrap_or(0))
            .collect();
        assert!(chi2(&c, &probs, 20_000) < 18.47, "counts {c:?}"); // 4 dof, 0.1%
    }

    #[test]
    fn penalties_and_bias_match_hand_computed_values() {
        // logits for tokens 0..5
        let base = [2.0f32, -1.0, 0.5, 3.0, -2.0];
        let prompt = [0u32];
        let output = [3u32, 3, 2];
        let p = SamplingParams {
            repetition_penalty: 2.0,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            logit_bias: [(1u32, 5.0f32), (4, -1.0)].into_iter().collect(),
            ..Default::default()
        };
        let mut l = base;
        apply_processors(&mut l, &row(&p, &prompt, &output));
        // token 0: in prompt, positive -> 2/2 = 1; not in output
        // token 1: unseen -> -1 + bias 5 = 4
        // token 2: in output once, positive -> 0.5/2 = 0.25, - 0.5 - 0.25*1 = -0.5
        // token 3: in output twice -> 3/2 = 1.5, - 0.5 - 0.25*2 = 0.5
        // token 4: unseen -> -2 + bias -1 = -3
        assert_eq!(l, [1.0, 4.0, -0.5, 0.5, -3.0]);
        // negative logit with repetition penalty is multiplied
        let p2 = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut l2 = base;
        apply_processors(&mut l2, &row(&p2, &[1], &[]));
        assert_eq!(l2[1], -2.0);
        // masked tokens can never be chosen
        let p3 = SamplingParams::greedy(1);
        let mut l3 = base;
        let r = RowParams {
            masked: &[3],
            ..row(&p3, &[], &[])
        };
        assert_eq!(sample(&base, &mut l3, &r).token, 0);
    }

    #[test]
    fn reported_logprobs_are_raw_log_softmax() {
        let raw = [1.0f32, 2.0, 3.0, 0.0];
        let p = SamplingParams {
            temperature: 0.0,
            logprobs: Some(2),
            logit_bias: [(0u32, 100.0f32)].into_iter().collect(),
            ..Default::default()
        };
        let mut w = raw;
        let s = sample(&raw, &mut w, &row(&p, &[], &[]));
        assert_eq!(s.token, 0); // the bias decides the choice
        let lse = logsumexp(&raw);
        assert!((s.logprob - (1.0 - lse)).abs() < 1e-6); // ...but not the reported logprob
        assert_eq!(s.top.len(), 2);
        assert_eq!(s.top[0].0, 2);
        assert!((s.top[0].1 - (3.0 - lse)).abs() < 1e-6);
    }

    use super::*;

    #[test]
    fn allowed_masks_restrict_every_sampling_mode() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 100) as f32 / 10.0).collect();
        // Allow 3, 40, 77 (none of them the argmax: 37*i % 100 = 99 at i = 27).
        let mut bits = vec![0u32; 4];
        for t in [3usize, 40, 77] {
            bits[t / 32] |= 1 << (t % 32);
        }
        let best = *[3usize, 40, 77]
            .iter()
            .max_by(|&&a, &&b| logits[a].total_cmp(&logits[b]))
            .unwrap() as u32;
        for p in [
            SamplingParams::greedy(1),
            SamplingParams {
                temperature: 1.0,
                ..Default::default()
            },
            SamplingParams {
                temperature: 2.0,
                top_k: 50,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.0,
                top_p: 0.9,
                min_p: 0.01,
                ..Default::default()
            },
        ] {
            let mut seen = std::collections::HashSet::new();
            for pos in 0..2000 {
                let mut w = logits.clone();
                let r = RowParams {
                    position: pos,
                    ..row(&p, &[], &[])
                };
                let s = sample_allowed(&logits, &mut w, &r, Some(&bits));
                assert!([3, 40, 77].contains(&s.token), "{p:?}: {}", s.token);
                seen.insert(s.token);
                if p.temperature == 0.0 {
                    assert_eq!(s.token, best);
                }
            }
            if p.temperature >= 1.0 && p.top_k < 0 && p.top_p == 1.0 {
                assert_eq!(seen.len(), 3, "{p:?}");
            }
        }
        // Ids past the mask's words are disallowed.
        let mut l = vec![0.0f32; 40];
        apply_allowed(&mut l, &[u32::MAX]);
        assert!(
            l[..32].iter().all(|v| *v == 0.0) && l[32..].iter().all(|v| *v == f32::NEG_INFINITY)
        );
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let want = (x as f64).exp();
            let rel = ((fast_exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.001;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(fast_exp(-1000.0), fast_exp(-87.0));
        let v: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin() * 10.0).collect();
        let exact: f64 = v.iter().map(|&x| (x as f64 - 10.0).exp()).sum();
        assert!((sum_exp(&v, 10.0) / exact - 1.0).abs() < 1e-6);
    }

    #[test]
    fn uniform_is_in_range_and_keyed() {
        let a = uniform(1, 0, 5);
        assert_eq!(a, uniform(1, 0, 5));
        assert_ne!(a, uniform(1, 0, 6));
        assert_ne!(a, uniform(2, 0, 5));
        assert_ne!(a, uniform(1, 1, 5));
        for p in 0..1000 {
            let u = uniform(42, 0, p);
            assert!((0.0..1.0).contains(&u));
        }
    }

    #[test]
    fn sampling_frequencies_follow_softmax() {
        let logits = [1.0f32, 2.0, 0.5, -1.0];
        let t = 0.8f32;
        let m = 2.0f32;
        let w: Vec<f64> = logits
            .iter()
            .map(|&v| (((v - m) / t) as f64).exp())
            .collect();
        let z: f64 = w.iter().sum();
        let n = 40_000u64;
        let mut counts = [0u64; 4];
        for p in 0..n {
            counts[sample_temperature(&logits, t, uniform(7, 0, p)) as usize] += 1;
        }
        // chi-square with 3 degrees of freedom; 16.27 is the 0.1% critical value
        let chi: f64 = counts
            .iter()
            .zip(&w)
            .map(|(&c, &wi)| {
                let e = wi / z * n as f64;
                (c as f64 - e).powi(2) / e
            })
            .sum();
        assert!(chi < 16.27, "chi-square {chi}, counts {counts:?}");
    }

    #[test]
    fn greedy_and_logprob() {
        let logits = [0.0f32, 3.0, 3.0, 1.0];
        assert_eq!(argmax(&logits), 1);
        assert_eq!(sample_temperature(&logits, 0.0, 0.9), 1);
        let lp: f32 = (0..4).map(|i| logprob(&logits, i).exp()).sum();
        assert!((lp - 1.0).abs() < 1e-6);
    }

    #[test]
    fn top_k_entries_match_a_full_sort_and_hold_only_k() {
        let mut x: u64 = 7;
        for len in [1usize, 5, 40, 1000] {
            for k in [1usize, 3, 20, 32, 33, 100] {
                let logits: Vec<f32> = (0..len)
                    .map(|_| {
                        x = mix64(x);
                        ((x >> 40) % 17) as f32 * 0.5 // many ties
                    })
                    .collect();
                let mut all: Vec<(u32, f32)> = logits
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| (i as u32, v))
                    .collect();
                all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                all.truncate(k.min(len));
                let got = top_k_entries(&logits, k);
                assert_eq!(got, all, "len {len} k {k}");
                assert!(
                    got.capacity() <= k.max(1),
                    "len {len} k {k}: capacity {}",
                    got.capacity()
                );
            }
        }
    }
}
