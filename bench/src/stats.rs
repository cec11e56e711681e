//! Summary statistics of latency samples: mean, p50 and p99 (nearest rank).

use serde_json::{Value, json};

/// The summary of a set of samples, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    /// How many samples were taken.
    pub count: usize,
    /// The arithmetic mean.
    pub mean: f64,
    /// The median (nearest rank).
    pub p50: f64,
    /// The 99th percentile (nearest rank).
    pub p99: f64,
    /// The smallest sample.
    pub min: f64,
    /// The largest sample.
    pub max: f64,
}

impl Summary {
    /// Summarises `samples` (milliseconds). Panics on an empty slice: every phase takes at least
    /// one sample or fails before summarising.
    pub fn of(samples: &[f64]) -> Summary {
        assert!(!samples.is_empty(), "no samples to summarise");
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        Summary {
            count: sorted.len(),
            mean: sorted.iter().sum::<f64>() / sorted.len() as f64,
            p50: percentile(&sorted, 0.50),
            p99: percentile(&sorted, 0.99),
            min: sorted[0],
            max: sorted[sorted.len() - 1],
        }
    }

    /// The summary as JSON (milliseconds).
    pub fn to_json(self) -> Value {
        json!({
            "count": self.count,
            "mean_ms": self.mean,
            "p50_ms": self.p50,
            "p99_ms": self.p99,
            "min_ms": self.min,
            "max_ms": self.max,
        })
    }
}

/// The nearest-rank percentile of sorted samples: the smallest sample such that at least
/// `quantile` of all samples are less than or equal to it.
fn percentile(sorted: &[f64], quantile: f64) -> f64 {
    let rank = (quantile * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<f64> = (1..=200).map(f64::from).collect();
        let summary = Summary::of(&samples);
        assert_eq!(summary.p50, 100.0);
        assert_eq!(summary.p99, 198.0);
        assert_eq!(summary.mean, 100.5);
        assert_eq!(Summary::of(&[7.0]).p99, 7.0);
    }
}
