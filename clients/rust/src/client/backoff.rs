//! Full-jitter exponential backoff: attempt `n` waits a uniformly random time
//! in `0 ..= min(cap, base · 2ⁿ)` (the "Full Jitter" of the AWS Architecture
//! Blog's *Exponential Backoff and Jitter*), so a crowd of clients dropped at
//! once spreads its reconnects instead of arriving together.

use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Backoff {
    /// The longest wait of attempt `attempt` (0-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A random wait for attempt `attempt`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt).as_millis() as u64;
        Duration::from_millis(rand::random_range(0..=ceiling))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_up_to_the_cap() {
        let b = Backoff { base: Duration::from_millis(100), cap: Duration::from_secs(1) };
        let ceilings: Vec<u64> = (0..6).map(|n| b.ceiling(n).as_millis() as u64).collect();
        assert_eq!(ceilings, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.ceiling(1000), Duration::from_secs(1));
    }

    #[test]
    fn delays_are_spread_within_the_ceiling() {
        let b = Backoff { base: Duration::from_millis(100), cap: Duration::from_secs(30) };
        let delays: Vec<Duration> = (0..200).map(|_| b.delay(3)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(800)));
        // Full jitter: both halves of the range are used.
        assert!(delays.iter().any(|d| *d < Duration::from_millis(400)));
        assert!(delays.iter().any(|d| *d >= Duration::from_millis(400)));
    }
}
