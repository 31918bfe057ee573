//! Benchmarks run by the `brigade` command: [`engine`] (`brigade bench`,
//! offline throughput through the actor runtime) and [`http`] (`brigade
//! bench-serve`, a running server driven over HTTP).
//!
//! Owns: synthetic workloads, per-request measurement and the latency
//! statistics both report ([`Pct`], one percentile routine). Does not own: argument
//! parsing or printing (the binary's `cli` module), the criterion
//! micro-benchmarks (`benches/`).

pub mod engine;
pub mod http;

use serde::Serialize;

use crate::sampling::SplitMix64;

/// The value at quantile `q` (in `[0, 1]`) of ascending `sorted`: the element
/// at rank `round(q * (len - 1))`; 0 when `sorted` is empty.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let Some(last) = sorted.len().checked_sub(1) else {
        return 0.0;
    };
    let rank = (q.clamp(0.0, 1.0) * last as f64).round() as usize;
    sorted.get(rank.min(last)).copied().unwrap_or(0.0)
}

/// Mean and percentiles of a latency, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Pct {
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
}

impl Pct {
    /// Statistics of `v` (ms); all zero when `v` is empty.
    pub fn of(v: &[f64]) -> Self {
        Self::with_max(v).map(|s| s.pct).unwrap_or_default()
    }

    /// Statistics of `v` (ms) with its maximum; `None` when `v` is empty.
    pub(crate) fn with_max(v: &[f64]) -> Option<PctMax> {
        if v.is_empty() {
            return None;
        }
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        let mean = s.iter().sum::<f64>() / s.len() as f64;
        let pct = Self {
            mean,
            p50: percentile(&s, 0.5),
            p90: percentile(&s, 0.9),
            p99: percentile(&s, 0.99),
        };
        Some(PctMax {
            pct,
            max: percentile(&s, 1.0),
        })
    }
}

/// [`Pct`] and the maximum (the HTTP benchmark reports it, like `vllm bench serve`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct PctMax {
    /// Mean and percentiles.
    #[serde(flatten)]
    pub pct: Pct,
    /// Largest value.
    pub max: f64,
}

/// Seconds until the next arrival of a Poisson process of `rate` per second.
pub(crate) fn poisson_gap_s(rng: &mut SplitMix64, rate: f64) -> f64 {
    -rng.next_open01().ln() / rate
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_the_rounded_rank() {
        let v: Vec<f64> = (1..=11).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 0.5), 6.0);
        assert_eq!(percentile(&v, 0.9), 10.0);
        assert_eq!(percentile(&v, 0.99), 11.0);
        assert_eq!(percentile(&v, 1.0), 11.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn pct_sorts_and_reports_empty_as_zero_or_none() {
        let s = Pct::with_max(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(
            s.pct,
            Pct {
                mean: 2.5,
                p50: 3.0,
                p90: 4.0,
                p99: 4.0
            }
        );
        assert_eq!(s.max, 4.0);
        assert_eq!(Pct::of(&[]), Pct::default());
        assert!(Pct::with_max(&[]).is_none());
        // Flattened: the HTTP report's keys.
        let v = serde_json::to_value(s).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 5, "{v}");
        assert!(
            ["mean", "p50", "p90", "p99", "max"]
                .iter()
                .all(|k| keys.contains(k)),
            "{v}"
        );
    }

    #[test]
    fn poisson_gaps_have_mean_one_over_rate() {
        let mut rng = SplitMix64::new(7);
        let n = 20_000;
        let mean = (0..n).map(|_| poisson_gap_s(&mut rng, 4.0)).sum::<f64>() / n as f64;
        assert!((mean - 0.25).abs() < 0.01, "{mean}");
    }
}
