//! When clients received each version of an auction: the watchers' events
//! and the readers' answers, kept compactly during a run so that, once the
//! run is over and the versions' commit times are known
//! ([`crate::freshness`]), every receipt's delay from its commit can be
//! counted.
//!
//! Ten thousand watchers receiving thousands of versions are tens of
//! millions of receipts, too many to keep one by one. All watchers of an
//! auction receive a version within a short spread, so each version keeps
//! its first receipt and a count per [`BUCKET_US`] after it (a lock-free
//! increment per receipt); the rare receipt later than the buckets reach is
//! kept exactly.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// The width of a receipt bucket, in µs: the resolution of the delays.
pub const BUCKET_US: u64 = 100;
/// Buckets per version: receipts up to 204.8 ms after its first one.
const BUCKETS: usize = 2_048;
/// Versions above this are not kept (an auction changes far less often).
const MAX_VERSION: i64 = 10_000_000;

/// The receipts of one version of one auction.
struct VersionReceipts {
    /// The first receipt, in µs since second 0 (`u64::MAX` before it).
    first_us: AtomicU64,
    /// Receipts per bucket after the first.
    buckets: Box<[AtomicU32]>,
    /// Receipts past the last bucket, in µs since second 0.
    late: Mutex<Vec<u64>>,
}

impl VersionReceipts {
    fn new() -> Self {
        VersionReceipts {
            first_us: AtomicU64::new(u64::MAX),
            buckets: (0..BUCKETS).map(|_| AtomicU32::new(0)).collect(),
            late: Mutex::new(Vec::new()),
        }
    }

    fn record(&self, at_us: u64) {
        let first = match self.first_us.compare_exchange(
            u64::MAX,
            at_us,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => at_us,
            Err(first) => first,
        };
        // A receipt timed just before the first one's is counted with it.
        let bucket = (at_us.saturating_sub(first) / BUCKET_US) as usize;
        match self.buckets.get(bucket) {
            Some(count) => {
                count.fetch_add(1, Ordering::Relaxed);
            }
            None => self.late.lock().expect("late receipts").push(at_us),
        }
    }

    /// Each receipt time (a bucket's middle) with its count.
    fn each(&self, mut f: impl FnMut(u64, u64)) {
        let first = self.first_us.load(Ordering::Acquire);
        if first == u64::MAX {
            return;
        }
        for (i, count) in self.buckets.iter().enumerate() {
            let n = count.load(Ordering::Relaxed);
            if n > 0 {
                f(first + i as u64 * BUCKET_US + BUCKET_US / 2, u64::from(n));
            }
        }
        for &at in self.late.lock().expect("late receipts").iter() {
            f(at, 1);
        }
    }
}

/// The receipts of every version of every auction of a run. Shared by the
/// watcher tasks.
pub struct Receipts {
    /// By auction (the run's index), then by version.
    auctions: Vec<RwLock<Vec<Option<Arc<VersionReceipts>>>>>,
}

impl Receipts {
    /// Room for the versions of `auctions` auctions.
    pub fn new(auctions: usize) -> Self {
        Receipts {
            auctions: (0..auctions).map(|_| RwLock::new(Vec::new())).collect(),
        }
    }

    /// Counts a receipt of `version` of `auction`, `at_us` after second 0.
    pub fn record(&self, auction: usize, version: i64, at_us: u64) {
        let Some(versions) = self.auctions.get(auction) else {
            return;
        };
        if !(0..=MAX_VERSION).contains(&version) {
            return;
        }
        let slot = version as usize;
        let known = versions.read().expect("receipts").get(slot).cloned();
        let receipts = match known.flatten() {
            Some(receipts) => receipts,
            None => {
                let mut versions = versions.write().expect("receipts");
                if versions.len() <= slot {
                    versions.resize(slot + 1, None);
                }
                versions[slot]
                    .get_or_insert_with(|| Arc::new(VersionReceipts::new()))
                    .clone()
            }
        };
        receipts.record(at_us);
    }

    /// Every receipt: `f(auction, version, µs since second 0, count)`.
    pub fn each(&self, mut f: impl FnMut(usize, i64, u64, u64)) {
        for (auction, versions) in self.auctions.iter().enumerate() {
            for (version, receipts) in versions.read().expect("receipts").iter().enumerate() {
                if let Some(receipts) = receipts {
                    receipts.each(|at, n| f(auction, version as i64, at, n));
                }
            }
        }
    }
}

/// A reader's answer: the version it showed, and when it came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// The run's index of the auction.
    pub auction: u32,
    /// The version the answer showed (a `304`: the one the client had).
    pub version: i64,
    /// When the answer came, in µs since second 0.
    pub at_us: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(receipts: &Receipts) -> Vec<(usize, i64, u64, u64)> {
        let mut out = Vec::new();
        receipts.each(|a, v, at, n| out.push((a, v, at, n)));
        out
    }

    #[test]
    fn receipts_are_counted_per_bucket_after_the_versions_first_and_late_ones_exactly() {
        let receipts = Receipts::new(2);
        receipts.record(1, 7, 10_000);
        receipts.record(1, 7, 10_040);
        receipts.record(1, 7, 10_250);
        receipts.record(1, 7, 9_990);
        receipts.record(1, 7, 10_000 + 300_000);
        receipts.record(0, 3, 5_000);
        receipts.record(0, -1, 5_000);
        assert_eq!(
            all(&receipts),
            [
                (0, 3, 5_050, 1),
                (1, 7, 10_050, 3),
                (1, 7, 10_250, 1),
                (1, 7, 310_000, 1)
            ]
        );
    }
}
