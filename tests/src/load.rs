//! What the load test (`tests/tests/load.rs`) and the benchmark's load phase (`bench/`) read from
//! a control plane holding many agents: each agent's state in `GET /agents` (online, and since
//! when its current connection exists), how reconnects are spread, and a histogram of
//! `GET /metrics` with its quantiles.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// One agent as `GET /agents` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentState {
    pub online: bool,
    /// `connected_at` in ms since the epoch: when its current connection was established.
    pub connected_at_ms: Option<i64>,
}

/// The state of every agent of `GET /agents` whose name starts with `prefix`, by name.
pub fn fleet_states(agents: &Value, prefix: &str) -> Result<BTreeMap<String, AgentState>> {
    let agents = agents
        .as_array()
        .with_context(|| format!("GET /agents is not an array: {agents}"))?;
    let mut states = BTreeMap::new();
    for agent in agents {
        let name = agent["name"].as_str().context("an agent without a name")?;
        if !name.starts_with(prefix) {
            continue;
        }
        let connected_at_ms = match &agent["connected_at"] {
            Value::Null => None,
            Value::String(text) => Some(
                chrono::DateTime::parse_from_rfc3339(text)
                    .with_context(|| format!("{name}: connected_at {text:?}"))?
                    .timestamp_millis(),
            ),
            other => bail!("{name}: connected_at is {other}"),
        };
        states.insert(
            name.to_owned(),
            AgentState {
                online: agent["status"] == "online",
                connected_at_ms,
            },
        );
    }
    Ok(states)
}

/// How a set of (re)connection times is spread.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub count: usize,
    /// Different millisecond values among them.
    pub distinct_ms: usize,
    pub first_ms: i64,
    pub last_ms: i64,
    /// The most connections within any 10 ms.
    pub busiest_10ms: usize,
}

impl Spread {
    /// The spread of `times` (ms since the epoch); `None` when there are none.
    pub fn of(times: &[i64]) -> Option<Spread> {
        let mut sorted = times.to_vec();
        sorted.sort_unstable();
        let (first_ms, last_ms) = (*sorted.first()?, *sorted.last()?);
        let mut distinct = sorted.clone();
        distinct.dedup();
        let mut busiest_10ms = 0;
        let mut start = 0;
        for end in 0..sorted.len() {
            while sorted[end] - sorted[start] >= 10 {
                start += 1;
            }
            busiest_10ms = busiest_10ms.max(end - start + 1);
        }
        Some(Spread {
            count: sorted.len(),
            distinct_ms: distinct.len(),
            first_ms,
            last_ms,
            busiest_10ms,
        })
    }

    /// Last minus first, ms.
    pub fn width_ms(&self) -> i64 {
        self.last_ms - self.first_ms
    }
}

/// A histogram family of a Prometheus text exposition: `(upper bound, cumulative count)` per
/// bucket in order (`+Inf` as infinity), the sum and the count.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

impl Histogram {
    /// Reads the unlabelled histogram `name` from `exposition`.
    pub fn parse(exposition: &str, name: &str) -> Result<Histogram> {
        let bucket_prefix = format!("{name}_bucket{{le=\"");
        let mut buckets = Vec::new();
        let (mut sum, mut count) = (None, None);
        for line in exposition.lines() {
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let number = || -> Result<f64> {
                value
                    .parse::<f64>()
                    .with_context(|| format!("not a number in {line:?}"))
            };
            if let Some(bound) = key.strip_prefix(&bucket_prefix) {
                let bound = bound.trim_end_matches("\"}");
                let bound = if bound == "+Inf" {
                    f64::INFINITY
                } else {
                    bound
                        .parse::<f64>()
                        .with_context(|| format!("a bucket bound in {line:?}"))?
                };
                buckets.push((bound, number()?));
            } else if key == format!("{name}_sum") {
                sum = Some(number()?);
            } else if key == format!("{name}_count") {
                count = Some(number()?);
            }
        }
        match (buckets.is_empty(), sum, count) {
            (false, Some(sum), Some(count)) => Ok(Histogram {
                buckets,
                sum,
                count,
            }),
            _ => bail!("no histogram {name} in the exposition"),
        }
    }

    /// What was observed between `earlier` and this one (same buckets).
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        Histogram {
            buckets: self
                .buckets
                .iter()
                .zip(&earlier.buckets)
                .map(|((bound, now), (_, then))| (*bound, now - then))
                .collect(),
            sum: self.sum - earlier.sum,
            count: self.count - earlier.count,
        }
    }

    /// The `q` quantile (0–1) estimated the way Prometheus' `histogram_quantile` does: linear
    /// within the bucket it falls in (from 0 in the first bucket); the highest finite bound when
    /// it falls into `+Inf`. `None` without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * self.count;
        let mut lower = (0.0, 0.0);
        for &(bound, cumulative) in &self.buckets {
            if cumulative >= rank {
                if bound.is_infinite() {
                    return Some(lower.0);
                }
                let in_bucket = cumulative - lower.1;
                let fraction = if in_bucket > 0.0 {
                    (rank - lower.1) / in_bucket
                } else {
                    1.0
                };
                return Some(lower.0 + (bound - lower.0) * fraction);
            }
            lower = (bound, cumulative);
        }
        Some(lower.0)
    }

    /// The mean of the observations.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_count_distinct_times_and_the_busiest_window() {
        let spread = Spread::of(&[1000, 1000, 1003, 1009, 1010, 1050]).unwrap();
        assert_eq!(spread.count, 6);
        assert_eq!(spread.distinct_ms, 5);
        assert_eq!(spread.width_ms(), 50);
        // 1000, 1000, 1003, 1009 lie within 10 ms of each other; 1010 does not with 1000.
        assert_eq!(spread.busiest_10ms, 4);
        assert_eq!(Spread::of(&[]), None);
    }

    #[test]
    fn histograms_parse_and_estimate_quantiles() {
        let text = "# TYPE h histogram\nh_bucket{le=\"0.001\"} 50\nh_bucket{le=\"0.01\"} 90\nh_bucket{le=\"+Inf\"} 100\nh_sum 0.9\nh_count 100\nother 1\n";
        let histogram = Histogram::parse(text, "h").unwrap();
        assert_eq!(histogram.buckets.len(), 3);
        assert_eq!(histogram.quantile(0.5), Some(0.001));
        let p70 = histogram.quantile(0.7).unwrap();
        assert!((p70 - 0.0055).abs() < 1e-12, "{p70}");
        assert_eq!(histogram.quantile(0.99), Some(0.01));
        assert!((histogram.mean().unwrap() - 0.009).abs() < 1e-12);
        let earlier = Histogram::parse(
            "h_bucket{le=\"0.001\"} 10\nh_bucket{le=\"0.01\"} 10\nh_bucket{le=\"+Inf\"} 10\nh_sum 0.01\nh_count 10\n",
            "h",
        )
        .unwrap();
        let delta = histogram.since(&earlier);
        assert_eq!(delta.count, 90.0);
        assert_eq!(delta.buckets[0], (0.001, 40.0));
        assert!(Histogram::parse(text, "missing").is_err());
        assert_eq!(
            Histogram::parse("x_bucket{le=\"+Inf\"} 0\nx_sum 0\nx_count 0\n", "x")
                .unwrap()
                .quantile(0.5),
            None
        );
    }

    #[test]
    fn agent_states_come_from_the_agents_list() {
        let agents = serde_json::json!([
            {"name": "load-0000", "status": "online", "connected_at": "2026-11-27T08:00:00.123Z"},
            {"name": "load-0001", "status": "offline", "connected_at": null},
            {"name": "other", "status": "online", "connected_at": "2026-11-27T08:00:00.000Z"},
        ]);
        let states = fleet_states(&agents, "load-").unwrap();
        assert_eq!(states.len(), 2);
        assert!(states["load-0000"].online);
        assert_eq!(states["load-0000"].connected_at_ms, Some(1_795_766_400_123));
        assert_eq!(
            states["load-0001"],
            AgentState {
                online: false,
                connected_at_ms: None
            }
        );
    }
}
