//! Exponential backoff with full jitter.

use std::time::Duration;

use rand::Rng;

/// Delays that double from `base` up to `max`; each delay is drawn uniformly from zero to the
/// current ceiling ("full jitter"), so many agents restarting together spread out.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max: max.max(base),
            failures: 0,
        }
    }

    /// The delay before the next attempt; every call raises the ceiling.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::thread_rng().gen_range(0..=millis))
    }

    /// Starts over from `base` (after a session that worked).
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }

    fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_maximum_and_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let ceilings: Vec<u128> = (0..6)
            .map(|_| {
                let ceiling = backoff.ceiling();
                assert!(backoff.next_delay() <= ceiling);
                ceiling.as_millis()
            })
            .collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        for _ in 0..100 {
            backoff.next_delay();
        }
        assert_eq!(backoff.ceiling(), Duration::from_millis(1000));
        backoff.reset();
        assert_eq!(backoff.ceiling(), Duration::from_millis(100));
    }

    /// Many agents losing the control plane at the same instant (a restart) each draw their
    /// first delay: the draws cover the whole range up to the ceiling instead of clustering, so
    /// their reconnects do not arrive as one herd.
    #[test]
    fn agents_dropped_together_draw_spread_first_delays() {
        let ceiling = Duration::from_millis(100);
        let delays: Vec<Duration> = (0..1000)
            .map(|_| Backoff::new(ceiling, Duration::from_secs(30)).next_delay())
            .collect();
        assert!(delays.iter().all(|delay| *delay <= ceiling));
        let distinct: std::collections::BTreeSet<Duration> = delays.iter().copied().collect();
        // 1,000 uniform draws over 101 values: missing half of them has a negligible chance.
        assert!(distinct.len() > 50, "{} distinct delays", distinct.len());
        let quarter = ceiling / 4;
        assert!(delays.iter().any(|delay| *delay < quarter));
        assert!(delays.iter().any(|delay| *delay > ceiling - quarter));
        // No value holds more than a tenth of the draws (each should hold about 1%).
        let busiest = distinct
            .iter()
            .map(|value| delays.iter().filter(|delay| *delay == value).count())
            .max()
            .unwrap();
        assert!(busiest < 100, "one delay drawn {busiest} times");
    }
}
