//! The resolver's background loop: it wakes on a signal of new bids or on
//! its polling interval, finds the auctions with work (pending bids, or
//! due to settle), resolves them in groups, one transaction per group, and
//! then drains, one by one, those with bids left; each auction gets a turn
//! of a few batches so a hot one cannot starve the others.
//!
//! Rounds start at most once per interval (`GAVEL_RESOLVER_INTERVAL_MS`):
//! under a stream of bids, each round would otherwise take the few bids
//! appended since the last, and a transaction's fixed cost (its round
//! trips, its commit) would weigh on every bid. A round after a quiet
//! spell starts at once.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::batch_size::MIN_BATCH;
use super::{ResolveError, Resolver, Step};
use crate::db::{auctions, bids};
use crate::signals::Resolved;

/// Most auctions resolved in one transaction.
const GROUP_MAX: usize = 32;
/// Batches one auction may take before others get a turn.
const BATCHES_PER_TURN: usize = 4;
/// Wait before retrying an auction another resolver holds.
const BUSY_RETRY: Duration = Duration::from_millis(20);
/// Version conflicts in a row before a drain gives up until the next round.
const MAX_CONFLICTS: u32 = 10;
/// Most auctions found by one polling scan.
const SCAN_LIMIT: i64 = 1_000;
/// How often a scan looks at every auction, however long ago settled.
const FULL_SCAN_EVERY: Duration = Duration::from_secs(600);

impl Resolver {
    /// Runs until `shutdown`, finishing the step in progress.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut next_scan = Instant::now();
        let mut next_full_scan = Instant::now();
        loop {
            let round = Instant::now();
            let mut work: BTreeSet<Uuid> = self.signals.take_dirty().into_iter().collect();
            if work.remove(&Uuid::nil()) || Instant::now() >= next_scan {
                let full = Instant::now() >= next_full_scan;
                if full {
                    next_full_scan = Instant::now() + FULL_SCAN_EVERY;
                }
                match self.scan(full).await {
                    Ok(found) => work.extend(found),
                    Err(e) => tracing::warn!(error = format!("{e:#}"), "resolver scan failed"),
                }
                next_scan = Instant::now() + self.poll;
            }
            self.drain_all(work).await;
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.signals.woken() => {}
                () = tokio::time::sleep_until(next_scan.into()) => {}
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until((round + self.interval).into()) => {}
            }
        }
    }

    /// Finds and resolves all outstanding work once: every auction with
    /// pending bids or due to settle. Returns the number of bids resolved.
    pub async fn run_once(&self) -> Result<usize, ResolveError> {
        let work = self.scan(true).await?;
        let mut total = 0;
        for auction_id in work {
            total += self.drain(auction_id).await?;
        }
        Ok(total)
    }

    /// The auctions with work: pending bids, or due to settle. A bid may
    /// reach an auction settled long ago only if a process missed its
    /// closing for that long, so only a `full` scan looks at every auction;
    /// the others look at open auctions and those settled lately.
    async fn scan(&self, full: bool) -> Result<BTreeSet<Uuid>, ResolveError> {
        let client = self.pool.get().await?;
        for (auction_id, version) in auctions::open_started(&client, SCAN_LIMIT).await? {
            // Its view changed: cached copies must go.
            self.signals.publish(Resolved {
                auction_id,
                bids: Some(Arc::from([])),
                version: Some(version),
                view: None,
            });
        }
        let recent = (!full).then_some(bids::SETTLED_LATELY);
        let mut work: BTreeSet<Uuid> = bids::auctions_with_pending(&client, recent, SCAN_LIMIT)
            .await?
            .into_iter()
            .collect();
        work.extend(auctions::due_to_settle(&client, self.settle_grace, SCAN_LIMIT).await?);
        Ok(work)
    }

    /// Resolves `work`: auctions together in groups, one transaction per
    /// group, as many groups at once as the resolver has connections; then,
    /// one by one, those with bids left beyond their group's batch or whose
    /// group lost a compare-and-set.
    async fn drain_all(&self, work: BTreeSet<Uuid>) {
        let groups = groups(work.into_iter().collect());
        futures::stream::iter(groups)
            .for_each_concurrent(self.concurrency, |group| self.drain_group(group))
            .await;
    }

    async fn drain_group(&self, auction_ids: Vec<Uuid>) {
        if let [auction_id] = auction_ids[..] {
            // Logged in the auction's span by `drain`.
            let _ = self.drain(auction_id).await;
            return;
        }
        let limit = group_limit(self.batch.get(), auction_ids.len());
        let steps = match self.resolve_group(&auction_ids, limit).await {
            Ok(steps) => steps,
            Err(e) => {
                if e.is_statement_timeout() {
                    self.batch.timed_out();
                }
                // Left to the next scan, as a failed `drain` is.
                tracing::warn!(
                    auctions = auction_ids.len(),
                    error = format!("{e:#}"),
                    "resolving a group of auctions failed; will retry"
                );
                return;
            }
        };
        if steps.iter().any(|(_, step)| *step == Step::Conflict) {
            metrics::counter!("gavel_resolver_conflicts_total").increment(1);
        } else if steps
            .iter()
            .any(|(_, step)| matches!(step, Step::Applied { .. }))
        {
            self.batch.succeeded();
        }
        for (auction_id, step) in steps {
            match step {
                Step::Applied { more: true, .. } | Step::Conflict => {
                    let _ = self.drain(auction_id).await;
                }
                Step::Busy => self.retry_later(auction_id),
                Step::Applied { .. } | Step::Idle => {}
            }
        }
    }

    /// Resolves an auction until nothing is pending, or until it has had its
    /// turn; returns bids resolved.
    #[tracing::instrument(skip(self), fields(%auction_id))]
    pub async fn drain(&self, auction_id: Uuid) -> Result<usize, ResolveError> {
        let drained = self.drain_turn(auction_id).await;
        if let Err(e) = &drained {
            tracing::warn!(error = format!("{e:#}"), "resolving failed; will retry");
        }
        drained
    }

    async fn drain_turn(&self, auction_id: Uuid) -> Result<usize, ResolveError> {
        let mut total = 0;
        let mut conflicts = 0;
        let mut batches = 0;
        loop {
            let step = match self.resolve_auction(auction_id).await {
                Ok(step) => step,
                Err(e) if e.is_statement_timeout() => {
                    let smaller = self.batch.timed_out();
                    tracing::warn!(
                        batch = smaller,
                        "a resolution batch hit the statement timeout; trying smaller batches"
                    );
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            match step {
                Step::Applied { bids, more, .. } => {
                    self.batch.succeeded();
                    total += bids;
                    batches += 1;
                    if !more {
                        return Ok(total);
                    }
                    if batches >= BATCHES_PER_TURN {
                        // A hot auction must not starve the others: requeue.
                        self.signals.bid_appended(auction_id);
                        return Ok(total);
                    }
                }
                Step::Conflict => {
                    metrics::counter!("gavel_resolver_conflicts_total").increment(1);
                    conflicts += 1;
                    if conflicts >= MAX_CONFLICTS {
                        return Err(ResolveError::Conflicts(conflicts));
                    }
                }
                Step::Busy => {
                    // The holder may have read the pending set before our
                    // bids committed; look again once it is likely done.
                    self.retry_later(auction_id);
                    return Ok(total);
                }
                Step::Idle => return Ok(total),
            }
        }
    }

    fn retry_later(&self, auction_id: Uuid) {
        if !self.retrying.lock().expect("retry set").insert(auction_id) {
            return;
        }
        let (signals, retrying) = (self.signals.clone(), self.retrying.clone());
        tokio::spawn(async move {
            tokio::time::sleep(BUSY_RETRY).await;
            retrying.lock().expect("retry set").remove(&auction_id);
            signals.bid_appended(auction_id);
        });
    }
}

/// Splits `work` into groups resolved one transaction each: as few as
/// hold it in groups of at most [`GROUP_MAX`], spread round-robin. Every
/// transaction costs the primary a commit and its statements, more than
/// running more of them side by side saves.
fn groups(work: Vec<Uuid>) -> Vec<Vec<Uuid>> {
    let count = work.len().div_ceil(GROUP_MAX);
    let mut groups = vec![Vec::new(); count];
    for (i, auction_id) in work.into_iter().enumerate() {
        groups[i % count].push(auction_id);
    }
    groups
}

/// Bids each of `auctions` auctions may take in one group's transaction,
/// given the batch size: the batch size while the group holds at most
/// [`BATCHES_PER_TURN`] batches' worth, else shares of that (never fewer
/// than [`MIN_BATCH`]), so a group of busy auctions stays a bounded
/// transaction.
fn group_limit(batch: i64, auctions: usize) -> i64 {
    let auctions = i64::try_from(auctions.max(1)).unwrap_or(i64::MAX);
    (batch * BATCHES_PER_TURN as i64 / auctions).clamp(MIN_BATCH.min(batch), batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolver::BATCH_LIMIT;

    #[test]
    fn work_is_split_into_the_fewest_groups_of_bounded_size() {
        let sizes = |n: usize| {
            let work: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
            let groups = groups(work.clone());
            let mut all: Vec<Uuid> = groups.iter().flatten().copied().collect();
            all.sort();
            let mut expected = work;
            expected.sort();
            assert_eq!(all, expected, "each auction in exactly one group");
            groups.iter().map(Vec::len).collect::<Vec<_>>()
        };
        assert_eq!(sizes(0), Vec::<usize>::new());
        assert_eq!(sizes(1), [1]);
        assert_eq!(sizes(11), [11]);
        assert_eq!(sizes(GROUP_MAX), [GROUP_MAX]);
        assert_eq!(sizes(GROUP_MAX + 1), [17, 16]);
        assert_eq!(sizes(100), [25, 25, 25, 25]);
    }

    #[test]
    fn a_group_takes_at_most_a_turn_of_batches() {
        assert_eq!(group_limit(BATCH_LIMIT, 1), BATCH_LIMIT);
        assert_eq!(group_limit(BATCH_LIMIT, 4), BATCH_LIMIT);
        assert_eq!(group_limit(BATCH_LIMIT, 6), 1_333);
        assert_eq!(group_limit(BATCH_LIMIT, 32), 250);
        assert_eq!(group_limit(100, 32), MIN_BATCH, "never below the floor");
        assert_eq!(group_limit(MIN_BATCH, 32), MIN_BATCH);
    }
}
