//! Per-token mask times: a lock-free histogram with fine geometric buckets
//! (5% wide, 1 µs to ~10 s), so `brigade bench` can report p50/p99 close to
//! the exact values; every observation also goes to the Prometheus histogram
//! `brigade:guided_decoding_mask_seconds` ([`crate::metrics`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bucket `i` holds times in `[FIRST * GROWTH^(i-1), FIRST * GROWTH^i)`; bucket 0 all below `FIRST`.
const FIRST_S: f64 = 1e-6;
const GROWTH: f64 = 1.05;
const BUCKETS: usize = 330;

/// Counts of mask times per bucket.
#[derive(Debug)]
pub struct MaskTimes {
    counts: Vec<AtomicU64>,
}

impl Default for MaskTimes {
    fn default() -> Self {
        Self {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

fn bucket(s: f64) -> usize {
    if s < FIRST_S {
        return 0;
    }
    ((s / FIRST_S).ln() / GROWTH.ln()).floor() as usize + 1
}

/// Upper edge of bucket `i`, seconds.
fn upper(i: usize) -> f64 {
    FIRST_S * GROWTH.powi(i as i32)
}

impl MaskTimes {
    /// Records one mask computation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(c) = self.counts.get(bucket(s).min(BUCKETS - 1)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        crate::metrics::observe_guided_mask(s);
    }

    /// The counts now (subtract two snapshots for an interval).
    pub fn snapshot(&self) -> MaskTimesSnapshot {
        MaskTimesSnapshot {
            counts: self
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

/// Bucket counts at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MaskTimesSnapshot {
    counts: Vec<u64>,
}

impl MaskTimesSnapshot {
    /// Observations since `earlier`.
    pub fn since(&self, earlier: &MaskTimesSnapshot) -> MaskTimesSnapshot {
        let counts = self
            .counts
            .iter()
            .enumerate()
            .map(|(i, &c)| c.saturating_sub(earlier.counts.get(i).copied().unwrap_or(0)))
            .collect();
        MaskTimesSnapshot { counts }
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The `q` quantile in seconds (the upper edge of its bucket: within 5%
    /// above the exact value); 0 without observations.
    pub fn quantile(&self, q: f64) -> f64 {
        let n = self.count();
        if n == 0 {
            return 0.0;
        }
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).max(1);
        let mut acc = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            acc += c;
            if acc >= rank {
                return upper(i);
            }
        }
        upper(self.counts.len().saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_land_within_one_bucket_of_the_exact_values() {
        let t = MaskTimes {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        };
        let before = t.snapshot();
        // 1..=1000 µs: p50 = 500 µs, p99 = 990 µs.
        for us in 1..=1000u64 {
            let s = us as f64 * 1e-6;
            t.counts[bucket(s)].fetch_add(1, Ordering::Relaxed);
        }
        let s = t.snapshot().since(&before);
        assert_eq!(s.count(), 1000);
        for (q, exact) in [(0.5, 500e-6), (0.99, 990e-6), (1.0, 1000e-6)] {
            let got = s.quantile(q);
            assert!(
                got >= exact && got <= exact * GROWTH * 1.0001,
                "q {q}: {got} vs {exact}"
            );
        }
        assert_eq!(MaskTimesSnapshot::default().quantile(0.5), 0.0);
    }
}
