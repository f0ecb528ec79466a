//! Per-bidder rate limit of the bid path: a token bucket per bidder, kept in
//! memory (each process limits what it receives). A bidder over the limit
//! gets `429 rate_limited` with `Retry-After` before any database work.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Buckets kept before idle (full) ones are dropped.
const SWEEP_AT: usize = 100_000;

/// Token buckets keyed by bidder id.
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<Buckets>,
}

/// The buckets, and when idle ones may next be swept.
#[derive(Default)]
struct Buckets {
    by_bidder: HashMap<String, Bucket>,
    /// A sweep keeps every bucket touched within the refill time, so with
    /// that many busy bidders sweeping again at once would free nothing:
    /// sweeps are at least a refill time apart (never one per bid).
    next_sweep: Option<Instant>,
    sweeps: u64,
}

struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl RateLimiter {
    /// `per_second` sustained bids per bidder, bursts of `burst`; a rate of 0 disables the limit.
    pub fn new(per_second: u32, burst: u32) -> Self {
        RateLimiter {
            per_second: f64::from(per_second),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::default(),
        }
    }

    /// Takes one token for `bidder`, or says how long until one is available.
    pub fn check(&self, bidder: &str) -> Result<(), Duration> {
        self.check_at(bidder, Instant::now())
    }

    fn check_at(&self, bidder: &str, now: Instant) -> Result<(), Duration> {
        if self.per_second <= 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        let buckets = &mut *buckets;
        if buckets.by_bidder.len() >= SWEEP_AT && buckets.next_sweep.is_none_or(|at| now >= at) {
            let full_after = Duration::from_secs_f64(self.burst / self.per_second);
            buckets
                .by_bidder
                .retain(|_, b| now.saturating_duration_since(b.refilled) < full_after);
            buckets.next_sweep = Some(now + full_after);
            buckets.sweeps += 1;
        }
        // Looked up before it is inserted: a known bidder costs no allocation.
        if !buckets.by_bidder.contains_key(bidder) {
            let full = Bucket {
                tokens: self.burst,
                refilled: now,
            };
            buckets.by_bidder.insert(bidder.to_owned(), full);
        }
        let bucket = buckets.by_bidder.get_mut(bidder).expect("inserted above");
        let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.burst);
        bucket.refilled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.per_second,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_the_burst_then_refills_at_the_rate() {
        let limiter = RateLimiter::new(10, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check_at("alice", t0).is_ok());
        }
        let wait = limiter.check_at("alice", t0).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100));
        // Another bidder has a bucket of their own.
        assert!(limiter.check_at("bob", t0).is_ok());
        // 100 ms later one token is back.
        let t1 = t0 + Duration::from_millis(100);
        assert!(limiter.check_at("alice", t1).is_ok());
        assert!(limiter.check_at("alice", t1).is_err());
    }

    #[test]
    fn idle_buckets_are_swept_at_most_once_per_refill_time() {
        // 10/s with a burst of 20: a bucket is full again after 2 s.
        let limiter = RateLimiter::new(10, 20);
        let t0 = Instant::now();
        for i in 0..SWEEP_AT {
            assert!(limiter.check_at(&format!("b{i}"), t0).is_ok());
        }
        // Every bucket is busy: one sweep frees nothing, and the next
        // thousand bids do not sweep again.
        for i in 0..1_000 {
            assert!(limiter.check_at(&format!("late{i}"), t0).is_ok());
        }
        let swept = |l: &RateLimiter| {
            let b = l.buckets.lock().unwrap();
            (b.sweeps, b.by_bidder.len())
        };
        assert_eq!(swept(&limiter), (1, SWEEP_AT + 1_000));
        // Once they are full again, the next sweep drops them.
        let later = t0 + Duration::from_secs(3);
        assert!(limiter.check_at("fresh", later).is_ok());
        assert_eq!(swept(&limiter), (2, 1));
    }

    #[test]
    fn a_zero_rate_disables_the_limit() {
        let limiter = RateLimiter::new(0, 1);
        let now = Instant::now();
        assert!((0..1000).all(|_| limiter.check_at("alice", now).is_ok()));
    }
}
