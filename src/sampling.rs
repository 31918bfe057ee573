//! Selection: logits → next token.
//!
//! Randomness is counter-based: the uniform draw for a token is a pure function
//! of `(seed, completion index, position)`, so a seeded request gives the same
//! tokens whatever batch it shares, and across preemption and restart.

/// SplitMix64 finalizer: a strong 64-bit mixing function.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform draw in `[0, 1)` keyed on `(seed, index, position)`.
pub fn uniform(seed: u64, index: u64, position: u64) -> f64 {
    let h = mix64(mix64(mix64(seed) ^ index.wrapping_mul(0xD6E8_FEB8_6659_FD93)) ^ position);
    (h >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Index of the largest logit (lowest index wins ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// `log(sum(exp(logits)))`, computed stably.
pub fn logsumexp(logits: &[f32]) -> f32 {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    if !m.is_finite() {
        return m;
    }
    let s: f64 = logits.iter().map(|&v| ((v - m) as f64).exp()).sum();
    m + s.ln() as f32
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let w: Vec<f64> = logits.iter().map(|&v| (((v - m) / t) as f64).exp()).collect();
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
}
