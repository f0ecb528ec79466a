//! The size of a resolution batch, adapted to how the database copes: a
//! struggling database still sees progress, in smaller steps.

use std::sync::atomic::{AtomicI64, Ordering};

/// Most bids applied in one transaction.
pub const BATCH_LIMIT: i64 = 2_000;
/// Fewest bids a batch shrinks to after statement timeouts.
pub(super) const MIN_BATCH: i64 = 50;

/// The size of a resolution batch: halved when a batch hits the statement
/// timeout, grown back a quarter at a time while batches succeed.
#[derive(Debug)]
pub struct BatchSize(AtomicI64);

impl BatchSize {
    /// Starts at the largest batch.
    pub fn new() -> Self {
        BatchSize(AtomicI64::new(BATCH_LIMIT))
    }

    /// Bids to take in the next batch.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }

    /// A batch hit the statement timeout.
    pub fn timed_out(&self) -> i64 {
        self.update(|n| (n / 2).max(MIN_BATCH))
    }

    /// A batch was committed.
    pub fn succeeded(&self) -> i64 {
        self.update(|n| (n + (n / 4).max(MIN_BATCH)).min(BATCH_LIMIT))
    }

    fn update(&self, f: impl Fn(i64) -> i64) -> i64 {
        let previous = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(f(n)))
            .expect("the update always applies");
        let now = f(previous);
        if now != previous {
            metrics::gauge!("gavel_resolver_batch_limit").set(now as f64);
        }
        now
    }
}

impl Default for BatchSize {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_halve_on_timeouts_and_grow_back_while_they_succeed() {
        let batch = BatchSize::new();
        assert_eq!(batch.get(), BATCH_LIMIT);
        assert_eq!(batch.timed_out(), 1_000);
        assert_eq!(batch.timed_out(), 500);
        for _ in 0..10 {
            batch.timed_out();
        }
        assert_eq!(batch.get(), MIN_BATCH, "never below the floor");
        assert_eq!(batch.succeeded(), 100);
        assert_eq!(batch.succeeded(), 150);
        assert_eq!(batch.succeeded(), 200);
        assert_eq!(batch.succeeded(), 250);
        assert_eq!(batch.succeeded(), 312);
        for _ in 0..20 {
            batch.succeeded();
        }
        assert_eq!(batch.get(), BATCH_LIMIT, "never above the limit");
    }
}
