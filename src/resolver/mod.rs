//! The resolver: the only writer of auction state.
//!
//! It takes each auction's pending bids in sequence order, applies the pure
//! [`rules`](crate::rules), and commits the new state with a compare-and-set
//! on `auctions.version` in the same transaction as every bid's outcome.
//! Several processes may run a resolver on one database: a transaction-level
//! advisory lock per auction makes one of them the writer at a time, and the
//! version check keeps a bid from being applied twice even if that lock were
//! bypassed: a bid's outcome is written only together with taking it off the
//! queue of pending bids, and only while it is still pending.
//!
//! Pending work is found by state (the `pending_bids` queue, which every bid
//! inserted pending joins in its own statement), never by a sequence
//! watermark, so a bid whose transaction commits late is not skipped.
//! Within a batch bids are applied in receipt order (`received_at`, then
//! `seq`). Near the end of a soft-close auction a bid received after the
//! current end is held back until every bid received before it must have
//! committed (the settle grace), because such an earlier bid may still
//! extend the end and make the later one valid.

pub mod listener;
pub mod signals;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use tokio_postgres::types::ToSql;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::{auctions, bids, Pool};
use crate::rules::{self, Outcome};
pub use signals::{Resolved, Signals};

/// Most bids applied in one transaction.
pub const BATCH_LIMIT: i64 = 2_000;
/// Fewest bids a batch shrinks to after statement timeouts.
const MIN_BATCH: i64 = 50;
/// Batches one auction may take before others get a turn.
const BATCHES_PER_TURN: usize = 4;
/// Wait before retrying an auction another resolver holds.
const BUSY_RETRY: Duration = Duration::from_millis(20);
/// Version conflicts in a row before a drain gives up until the next round.
const MAX_CONFLICTS: u32 = 10;
/// Idempotency keys deleted per housekeeping round.
const PURGE_BATCH: i64 = 10_000;
/// How often expired idempotency keys are looked for.
const PURGE_EVERY: Duration = Duration::from_secs(600);
/// Most auctions found by one polling scan.
const SCAN_LIMIT: i64 = 1_000;
/// Bids resolved (queue rows deleted) between vacuums of the queue.
const QUEUE_VACUUM_AFTER: u64 = 20_000;

/// What one resolution step did for an auction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do.
    Idle,
    /// Bids applied (and possibly the auction settled); `more` when pending
    /// bids remain beyond the batch.
    Applied {
        /// Bids resolved in this step.
        bids: usize,
        /// Whether the auction was settled closed.
        settled: bool,
        /// Whether more pending bids remain.
        more: bool,
    },
    /// Another resolver holds this auction right now.
    Busy,
    /// Another writer committed first; nothing was written. Retry.
    Conflict,
}

/// The background resolver of one process.
#[derive(Clone)]
pub struct Resolver {
    pool: Pool,
    signals: Signals,
    settle_grace: Duration,
    poll: Duration,
    concurrency: usize,
    key_retention: Duration,
    /// Auctions with a delayed retry scheduled (one at a time per auction).
    retrying: Arc<Mutex<HashSet<Uuid>>>,
    batch: Arc<BatchSize>,
    /// Queue rows deleted since the queue was last vacuumed.
    dequeued: Arc<AtomicU64>,
}

/// The size of a resolution batch: halved when a batch hits the statement
/// timeout (a struggling database still sees progress, in smaller steps),
/// grown back a quarter at a time while batches succeed.
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

/// Of the errors of statements sent together in one transaction, the one
/// that failed it. The statements after it fail with "current transaction
/// is aborted", and whichever error is seen first must not hide the cause
/// (a statement timeout shrinks the next batches, see [`BatchSize`]).
fn cause(errors: impl IntoIterator<Item = Option<tokio_postgres::Error>>) -> tokio_postgres::Error {
    let errors: Vec<_> = errors.into_iter().flatten().collect();
    let first_cause = errors
        .iter()
        .position(|e| e.code() != Some(&tokio_postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION))
        .unwrap_or(0);
    errors
        .into_iter()
        .nth(first_cause)
        .expect("called with at least one error")
}

/// Whether `error` is a statement cancelled by `statement_timeout`.
fn is_statement_timeout(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<tokio_postgres::Error>()
            .and_then(tokio_postgres::Error::code)
            == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
    })
}

impl Resolver {
    /// A resolver writing through `pool`, settling auctions `settle_grace`
    /// after their end, scanning for missed work every `poll`.
    pub fn new(pool: Pool, signals: Signals, settle_grace: Duration, poll: Duration) -> Self {
        let concurrency = pool.status().max_size.max(1);
        register_metrics();
        Resolver {
            pool,
            signals,
            settle_grace,
            poll,
            concurrency,
            key_retention: Duration::from_secs(48 * 3600),
            retrying: Arc::default(),
            batch: Arc::default(),
            dequeued: Arc::default(),
        }
    }

    /// Bids the next resolution batch takes.
    pub fn batch_size(&self) -> i64 {
        self.batch.get()
    }

    /// Keeps idempotency keys for `retention` (the contract promises 24 h at least).
    pub fn with_key_retention(mut self, retention: Duration) -> Self {
        self.key_retention = retention;
        self
    }

    /// Runs until `shutdown`, finishing the step in progress.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut next_scan = Instant::now();
        let mut next_purge = Instant::now();
        loop {
            if Instant::now() >= next_purge {
                // Bounded per round so housekeeping never delays resolution for long.
                match self.purge_expired_keys().await {
                    Ok(n) if n == PURGE_BATCH as u64 => {}
                    Ok(_) => next_purge = Instant::now() + PURGE_EVERY,
                    Err(e) => {
                        tracing::warn!(error = %e, "purging idempotency keys failed");
                        next_purge = Instant::now() + PURGE_EVERY;
                    }
                }
            }
            let mut work: BTreeSet<Uuid> = self.signals.take_dirty().into_iter().collect();
            if work.remove(&Uuid::nil()) || Instant::now() >= next_scan {
                match self.scan().await {
                    Ok(found) => work.extend(found),
                    Err(e) => tracing::warn!(error = %e, "resolver scan failed"),
                }
                next_scan = Instant::now() + self.poll;
            }
            self.drain_all(work).await;
            self.vacuum_queue_if_due().await;
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.signals.woken() => {}
                () = tokio::time::sleep_until(next_scan.into()) => {}
            }
        }
    }

    /// Finds and resolves all outstanding work once: every auction with
    /// pending bids or due to settle. Returns the number of bids resolved.
    pub async fn run_once(&self) -> anyhow::Result<usize> {
        let work = self.scan().await?;
        let mut total = 0;
        for auction_id in work {
            total += self.drain(auction_id).await?;
        }
        Ok(total)
    }

    /// Deletes one batch of idempotency keys past their retention.
    pub async fn purge_expired_keys(&self) -> anyhow::Result<u64> {
        let client = self.pool.get().await?;
        Ok(bids::purge_idempotency_keys(&client, self.key_retention, PURGE_BATCH).await?)
    }

    /// Vacuums the queue of pending bids once [`QUEUE_VACUUM_AFTER`] bids
    /// have left it, so a burst's dead rows never pile up for autovacuum's
    /// next visit (see [`bids::vacuum_queue`]).
    async fn vacuum_queue_if_due(&self) {
        if self.dequeued.load(Ordering::Relaxed) < QUEUE_VACUUM_AFTER {
            return;
        }
        self.dequeued.store(0, Ordering::Relaxed);
        let started = Instant::now();
        let vacuumed = async {
            let client = self.pool.get().await?;
            anyhow::Ok(bids::vacuum_queue(&client).await?)
        };
        match vacuumed.await {
            Ok(()) => {
                metrics::counter!("gavel_resolver_queue_vacuums_total").increment(1);
                tracing::debug!(elapsed = ?started.elapsed(), "vacuumed the pending-bids queue");
            }
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "vacuuming the pending-bids queue failed"
            ),
        }
    }

    async fn scan(&self) -> anyhow::Result<BTreeSet<Uuid>> {
        let client = self.pool.get().await?;
        for (auction_id, version) in auctions::open_started(&client, SCAN_LIMIT).await? {
            // Its view changed: cached copies must go.
            self.signals.publish(Resolved {
                auction_id,
                bids: Some(Arc::from([])),
                version: Some(version),
            });
        }
        let mut work: BTreeSet<Uuid> = bids::auctions_with_pending(&client, SCAN_LIMIT)
            .await?
            .into_iter()
            .collect();
        work.extend(auctions::due_to_settle(&client, self.settle_grace, SCAN_LIMIT).await?);
        Ok(work)
    }

    async fn drain_all(&self, work: BTreeSet<Uuid>) {
        futures::stream::iter(work)
            .for_each_concurrent(self.concurrency, |auction_id| async move {
                // Logged in the auction's span by `drain`.
                let _ = self.drain(auction_id).await;
            })
            .await;
    }

    /// Resolves an auction until nothing is pending, or until it has had its
    /// turn; returns bids resolved.
    #[tracing::instrument(skip(self), fields(%auction_id))]
    pub async fn drain(&self, auction_id: Uuid) -> anyhow::Result<usize> {
        let drained = self.drain_turn(auction_id).await;
        if let Err(e) = &drained {
            tracing::warn!(error = format!("{e:#}"), "resolving failed; will retry");
        }
        drained
    }

    async fn drain_turn(&self, auction_id: Uuid) -> anyhow::Result<usize> {
        let mut total = 0;
        let mut conflicts = 0;
        let mut batches = 0;
        loop {
            let step = match self.resolve_auction(auction_id).await {
                Ok(step) => step,
                Err(e) if is_statement_timeout(&e) => {
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
                        anyhow::bail!(
                            "{conflicts} version conflicts in a row; leaving it to the next round"
                        );
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

    /// One transaction: lock the auction for this resolver, apply a batch
    /// of pending bids (at most [`BATCH_LIMIT`]), settle if due,
    /// compare-and-set. Four round trips to the primary (five when it
    /// settles): begin, the lock with both reads, the writes, commit.
    /// The statements that look rows up by key run on generic plans, the
    /// writes over the batch's arrays on plans made for them ([`plan_modes`]).
    /// Fewer round trips make each batch shorter, which on a saturated
    /// machine is what keeps the resolver's lag down.
    pub async fn resolve_auction(&self, auction_id: Uuid) -> anyhow::Result<Step> {
        let started = Instant::now();
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let lock = tx
            .prepare_cached(
                "SELECT pg_try_advisory_xact_lock(hashtextextended($1::text, 0)), now()",
            )
            .await?;
        let [generic_plans, custom_plans] = plan_modes(&tx).await?;
        let limit = self.batch.get();
        let lock_key = auction_id.to_string();
        let lock_params: [&(dyn ToSql + Sync); 1] = [&lock_key];
        // Sent at once and run in order, one round trip: the plan mode's
        // and the lock's statements are prepared, so they are on the wire
        // before either read, and both reads see what was committed before
        // the lock was taken. Without the lock, the reads are thrown away.
        let (row, auction, mut pending) = match futures::join!(
            tx.execute(&generic_plans, &[]),
            tx.query_one(&lock, &lock_params),
            auctions::get(&tx, auction_id),
            bids::pending(&tx, auction_id, limit),
        ) {
            (Ok(_), Ok(row), Ok(auction), Ok(pending)) => (row, auction, pending),
            (plan_mode, row, auction, pending) => {
                return Err(
                    cause([plan_mode.err(), row.err(), auction.err(), pending.err()]).into(),
                )
            }
        };
        if !row.get::<_, bool>(0) {
            return Ok(Step::Busy);
        }
        let now: DateTime<Utc> = row.get(1);
        let Some(auction) = auction else {
            tracing::error!(%auction_id, "pending bids reference an unknown auction");
            return Ok(Step::Idle);
        };
        let more = pending.len() as i64 == limit;
        pending.sort_by_key(|p| (p.bid.received_at, p.bid.seq));
        let grace = chrono::Duration::from_std(self.settle_grace)?;
        let terms = &auction.terms;
        // Bids received after the current end of a soft-close auction wait
        // until every earlier bid must have committed (see the module docs).
        let held_back = |bid: &bids::BidRecord, ends_at: DateTime<Utc>| {
            terms.soft_close > chrono::Duration::zero()
                && !auction.state.closed
                && bid.received_at > ends_at
                && now < bid.received_at + grace
        };

        let mut state = auction.state.clone();
        let mut outcomes = bids::Outcomes::default();
        let mut position: HashMap<Uuid, usize> = HashMap::with_capacity(pending.len());
        let mut displaced_earlier = Vec::new();
        let mut resolution_no = auction.resolved_count;
        let mut applied_bids = Vec::with_capacity(pending.len());
        for bids::PendingBid { bid, row_version } in &pending {
            // Sorted by receipt: every later bid would be held back too.
            if held_back(bid, state.ends_at) {
                break;
            }
            let applied = rules::apply_bid(terms, &mut state, &bid.input());
            if let Some(displaced) = applied.displaced {
                match position.get(&displaced) {
                    Some(&i) => outcomes.statuses[i] = "outbid",
                    None => displaced_earlier.push(displaced),
                }
            }
            let (status, reason) = outcome_columns(applied.outcome);
            resolution_no += 1;
            position.insert(bid.id, outcomes.ids.len());
            outcomes.seqs.push(bid.seq);
            outcomes.ids.push(bid.id);
            outcomes.row_versions.push(row_version);
            outcomes.statuses.push(status);
            outcomes.reasons.push(reason);
            outcomes.prices.push(applied.price_after);
            outcomes.resolution_nos.push(resolution_no);
            applied_bids.push(bid);
        }
        let all_applied = applied_bids.len() == pending.len();
        // Settle only when nothing received before the end can still be pending.
        let settling = !state.closed && !more && all_applied && now > state.ends_at + grace;
        if applied_bids.is_empty() && !settling {
            return Ok(Step::Idle);
        }
        let winner = if settling {
            rules::settle(terms, &mut state)
        } else {
            None
        };

        let version = auction.version + 1;
        let update = auctions::StateUpdate {
            id: auction_id,
            expected_version: auction.version,
            state: &state,
            resolved_count: resolution_no,
            settlement: settling.then_some(winner.as_ref()),
        };
        let notification = self.signals.notification(auction_id);
        let notify = tx.prepare_cached("SELECT pg_notify($1, $2)").await?;
        let notify_params: [&(dyn ToSql + Sync); 2] = [&listener::RESOLVED_CHANNEL, &notification];
        // The writes touch different rows and are sent at once, one round
        // trip. If the compare-and-set lost, or some bid was no longer
        // queued and pending, the transaction is dropped and none of them
        // is committed. The statements over the batch's arrays come after
        // the switch back to custom plans (prepared, so on the wire before
        // them).
        let (won, dequeued, written) = match futures::join!(
            auctions::compare_and_set(&tx, &update),
            tx.execute(&notify, &notify_params),
            futures::future::try_join_all(
                displaced_earlier
                    .iter()
                    .map(|&displaced| bids::mark_outbid(&tx, auction_id, displaced)),
            ),
            tx.execute(&custom_plans, &[]),
            bids::dequeue(&tx, auction_id, &outcomes.seqs),
            bids::record_outcomes(&tx, version, &outcomes),
        ) {
            (Ok(won), Ok(_), Ok(_), Ok(_), Ok(dequeued), Ok(written)) => (won, dequeued, written),
            (won, notified, marked, plan_mode, dequeued, written) => {
                return Err(cause([
                    won.err(),
                    notified.err(),
                    marked.err(),
                    plan_mode.err(),
                    dequeued.err(),
                    written.err(),
                ])
                .into())
            }
        };
        if !won {
            return Ok(Step::Conflict);
        }
        if dequeued != written || written != outcomes.ids.len() as u64 {
            // Someone resolved some of these bids outside the version
            // protocol; write nothing and start over from fresh state.
            tracing::error!(
                %auction_id,
                dequeued,
                written,
                expected = outcomes.ids.len(),
                "bids already resolved"
            );
            return Ok(Step::Conflict);
        }
        if settling {
            // After the outcomes: it settles the bids they made leading.
            bids::settle_outcomes(&tx, auction_id, winner.as_ref().map(|w| w.bid_id)).await?;
        }
        tx.commit().await?;
        self.dequeued.fetch_add(dequeued, Ordering::Relaxed);

        record_metrics(&applied_bids, &outcomes.reasons, now, started, settling);
        let resolved: Arc<[Uuid]> = outcomes.ids.into();
        self.signals.publish(Resolved {
            auction_id,
            bids: Some(resolved),
            version: Some(version),
        });
        Ok(Step::Applied {
            bids: applied_bids.len(),
            settled: settling,
            more: more && all_applied,
        })
    }
}

/// The statements that switch a resolver transaction to generic plans and
/// back to custom ones (`SET LOCAL plan_cache_mode`), prepared.
///
/// The resolver's sessions plan every statement for its parameters (see
/// [`PoolSettings::with_custom_plans`](crate::db::PoolSettings::with_custom_plans)),
/// which its writes over a batch's arrays need. Its other statements
/// (the lock, the auction's row, the pending bids in queue order, the
/// compare-and-set, the outbid marks, the notification) look rows up by
/// key whatever their parameters, so a generic plan serves them all; at
/// a few thousand bids per second, planning them once per batch cost as
/// much statement time as executing them (BENCHMARKS.md, "Generic plans
/// for the resolver's key lookups").
async fn plan_modes(
    tx: &impl deadpool_postgres::GenericClient,
) -> Result<[tokio_postgres::Statement; 2], tokio_postgres::Error> {
    let generic = tx
        .prepare_cached("SET LOCAL plan_cache_mode = force_generic_plan")
        .await?;
    let custom = tx
        .prepare_cached("SET LOCAL plan_cache_mode = force_custom_plan")
        .await?;
    Ok([generic, custom])
}

/// The `bid_log` status and reason a resolved bid is written with.
pub(crate) fn outcome_columns(outcome: Outcome) -> (&'static str, Option<&'static str>) {
    match outcome {
        Outcome::Leading => ("leading", None),
        Outcome::Outbid => ("outbid", None),
        Outcome::Rejected(reason) => ("rejected", Some(reason.as_str())),
    }
}

/// The `outcome` label of a resolved bid: `accepted` (leading or outbid)
/// or the rejection reason.
fn outcome_label(reason: Option<&'static str>) -> &'static str {
    reason.unwrap_or("accepted")
}

/// Counts resolved bids in `gavel_resolver_bids_resolved_total` by outcome,
/// given each bid's rejection reason (`None`: accepted).
pub(crate) fn count_resolved(reasons: &[Option<&'static str>]) {
    for reason in reasons {
        metrics::counter!("gavel_resolver_bids_resolved_total", "outcome" => outcome_label(*reason))
            .increment(1);
    }
}

/// Registers the resolver's counters at zero, so rates over them are 0
/// rather than missing before the first event (and a stalled resolver
/// shows as no progress).
fn register_metrics() {
    let outcomes = std::iter::once(None).chain(rules::RejectReason::ALL.map(|r| Some(r.as_str())));
    for reason in outcomes {
        metrics::counter!("gavel_resolver_bids_resolved_total", "outcome" => outcome_label(reason))
            .increment(0);
    }
    metrics::counter!("gavel_resolver_conflicts_total").increment(0);
    metrics::counter!("gavel_resolver_queue_vacuums_total").increment(0);
    metrics::gauge!("gavel_resolver_batch_limit").set(BATCH_LIMIT as f64);
    metrics::counter!("gavel_auctions_settled_total").increment(0);
}

fn record_metrics(
    pending: &[&bids::BidRecord],
    reasons: &[Option<&'static str>],
    now: DateTime<Utc>,
    started: Instant,
    settled: bool,
) {
    metrics::histogram!("gavel_resolver_batch_size").record(pending.len() as f64);
    metrics::histogram!("gavel_resolver_batch_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    count_resolved(reasons);
    if let Some(oldest) = pending.iter().map(|b| b.received_at).min() {
        let lag = (now - oldest).num_milliseconds().max(0) as f64 / 1000.0;
        metrics::histogram!("gavel_resolver_lag_seconds").record(lag);
    }
    if settled {
        metrics::counter!("gavel_auctions_settled_total").increment(1);
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
