//! When a refused delivery is tried again (API.md "Webhooks"): the first
//! retry within 5 s, each later wait about twice the previous with ±25 %
//! jitter, capped at 1 h; retried for 24 h, then failed.

use std::time::Duration;

/// How long deliveries are retried before they are marked failed.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 3600);
/// The longest wait between two attempts.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);
/// The default first wait before jitter: with +25 % it is still within 5 s.
pub const DEFAULT_BASE: Duration = Duration::from_secs(4);

/// The wait after the `attempts`th refused attempt: `base` doubled per
/// earlier attempt, times `1 + jitter / 4` (`jitter` in -1..=1), at most
/// [`MAX_WAIT`].
pub fn retry_wait(base: Duration, attempts: i32, jitter: f64) -> Duration {
    let doublings = (attempts.max(1) - 1).min(30) as u32;
    let wait = base.saturating_mul(1 << doublings.min(20)).min(MAX_WAIT);
    wait.mul_f64(1.0 + jitter.clamp(-1.0, 1.0) / 4.0)
        .min(MAX_WAIT)
}

/// A uniformly random jitter in -1..=1.
pub fn random_jitter() -> f64 {
    let bits = (uuid::Uuid::new_v4().as_u128() >> 64) as u64;
    bits as f64 / u64::MAX as f64 * 2.0 - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_within_a_quarter_and_stop_at_an_hour() {
        let base = DEFAULT_BASE;
        for jitter in [-1.0, 0.0, 1.0] {
            assert!(retry_wait(base, 1, jitter) <= Duration::from_secs(5));
            assert!(retry_wait(base, 1, jitter) >= Duration::from_secs(3));
        }
        assert_eq!(retry_wait(base, 2, 0.0), Duration::from_secs(8));
        assert_eq!(retry_wait(base, 3, 0.0), Duration::from_secs(16));
        assert_eq!(retry_wait(base, 3, 1.0), Duration::from_secs(20));
        assert_eq!(retry_wait(base, 3, -1.0), Duration::from_secs(12));
        assert_eq!(retry_wait(base, 11, 0.0), MAX_WAIT);
        assert_eq!(retry_wait(base, 11, 1.0), MAX_WAIT);
        assert_eq!(retry_wait(base, 1_000, -1.0), MAX_WAIT.mul_f64(0.75));
    }

    #[test]
    fn retries_last_at_least_a_day() {
        // Even with every wait at its shortest, a day passes in a bounded
        // number of attempts: the delivery is retried for the whole period.
        let mut waited = Duration::ZERO;
        let mut attempts = 0;
        while waited < GIVE_UP_AFTER {
            attempts += 1;
            waited += retry_wait(DEFAULT_BASE, attempts, -1.0);
        }
        assert!(attempts < 60, "{attempts}");
    }

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..1_000 {
            let j = random_jitter();
            assert!((-1.0..=1.0).contains(&j));
        }
    }
}
