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
//! Auctions with new bids are resolved together, one transaction per
//! group of them (see [`Resolver::resolve_auctions`]); each auction keeps
//! its own lock and its own compare-and-set.
//!
//! Pending work is found by state (the `pending_bids` queue, which every bid
//! inserted pending joins in its own statement), never by a sequence
//! watermark, so a bid whose transaction commits late is not skipped.
//! Within a batch bids are applied in receipt order (`received_at`, then
//! `seq`). Near the end of a soft-close auction a bid received after the
//! current end is held back until every bid received before it must have
//! committed (the settle grace), because such an earlier bid may still
//! extend the end and make the later one valid.

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
use crate::signals::{listener, Resolved, Signals};

/// Most bids applied in one transaction.
pub const BATCH_LIMIT: i64 = 2_000;
/// Fewest bids a batch shrinks to after statement timeouts.
const MIN_BATCH: i64 = 50;
/// Most auctions resolved in one transaction.
const GROUP_MAX: usize = 32;
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
        let steps = match self.resolve_auctions_limited(&auction_ids, limit).await {
            Ok(steps) => steps,
            Err(e) => {
                if is_statement_timeout(&e) {
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

    /// Resolves one auction: [`resolve_auctions`](Self::resolve_auctions)
    /// for it alone.
    pub async fn resolve_auction(&self, auction_id: Uuid) -> anyhow::Result<Step> {
        let steps = self.resolve_auctions(&[auction_id]).await?;
        Ok(steps.first().map_or(Step::Idle, |&(_, step)| step))
    }

    /// One transaction over several auctions (distinct ids): lock each for
    /// this resolver, apply a batch of each one's pending bids, settle
    /// those due, and compare-and-set them all; returns each auction's
    /// [`Step`]. If any auction's compare-and-set loses, or some bid was no
    /// longer queued and pending, nothing is written and every auction
    /// written for is reported as [`Step::Conflict`].
    ///
    /// Four round trips to the primary (five when one settles) whatever
    /// the number of auctions: begin, the locks with both reads, the
    /// writes, commit. Most auctions have a bid or two waiting at each
    /// round, and one transaction for each cost more than its bids: a
    /// commit and its WAL flush, and a dozen statements run (two of them
    /// planned) per auction. The reads and the writes over the bids are
    /// one statement each for the whole group; the compare-and-set and the
    /// outbid mark are one key lookup per auction, in the same round trip
    /// (BENCHMARKS.md as of 2026-12-06, "Quiet auctions resolved together").
    /// The statements that look rows up by key run on generic plans, the
    /// writes over the batch's arrays on plans made for them ([`plan_modes`]).
    /// An auction takes at most `limit` bids, [`BatchSize`] by default.
    pub async fn resolve_auctions(
        &self,
        auction_ids: &[Uuid],
    ) -> anyhow::Result<Vec<(Uuid, Step)>> {
        self.resolve_auctions_limited(auction_ids, self.batch.get())
            .await
    }

    async fn resolve_auctions_limited(
        &self,
        auction_ids: &[Uuid],
        limit: i64,
    ) -> anyhow::Result<Vec<(Uuid, Step)>> {
        if auction_ids.is_empty() {
            return Ok(Vec::new());
        }
        let started = Instant::now();
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let lock = tx
            .prepare_cached(
                "SELECT a.id, pg_try_advisory_xact_lock(hashtextextended(a.id::text, 0)), now() \
                 FROM unnest($1::uuid[]) AS a(id)",
            )
            .await?;
        let [generic_plans, custom_plans] = plan_modes(&tx).await?;
        let lock_params: [&(dyn ToSql + Sync); 1] = [&auction_ids];
        // Sent at once and run in order, one round trip: the plan mode's
        // and the lock's statements are prepared, so they are on the wire
        // before either read, and both reads see what was committed before
        // the locks were taken. The reads of auctions not locked are
        // thrown away.
        let (locks, records, mut pending) = match futures::join!(
            tx.execute(&generic_plans, &[]),
            tx.query(&lock, &lock_params),
            auctions::get_many(&tx, auction_ids),
            bids::pending(&tx, auction_ids, limit),
        ) {
            (Ok(_), Ok(locks), Ok(records), Ok(pending)) => (locks, records, pending),
            (plan_mode, locks, records, pending) => {
                return Err(
                    cause([plan_mode.err(), locks.err(), records.err(), pending.err()]).into(),
                )
            }
        };
        let now: DateTime<Utc> = locks[0].get(2);
        let locked: HashSet<Uuid> = locks
            .iter()
            .filter(|row| row.get::<_, bool>(1))
            .map(|row| row.get(0))
            .collect();
        let records: HashMap<Uuid, auctions::AuctionRecord> =
            records.into_iter().map(|a| (a.id, a)).collect();
        pending.sort_by_key(|p| (p.bid.auction_id, p.bid.received_at, p.bid.seq));
        let pending_of: HashMap<Uuid, &[bids::PendingBid]> = pending
            .chunk_by(|a, b| a.bid.auction_id == b.bid.auction_id)
            .map(|bids| (bids[0].bid.auction_id, bids))
            .collect();
        let grace = chrono::Duration::from_std(self.settle_grace)?;

        let mut steps = Vec::with_capacity(auction_ids.len());
        let mut outcomes = bids::Outcomes::default();
        let mut batches = Vec::new();
        for &auction_id in auction_ids {
            if !locked.contains(&auction_id) {
                steps.push((auction_id, Step::Busy));
                continue;
            }
            let pending = pending_of.get(&auction_id).copied().unwrap_or_default();
            let Some(auction) = records.get(&auction_id) else {
                if !pending.is_empty() {
                    tracing::error!(%auction_id, "pending bids reference an unknown auction");
                }
                steps.push((auction_id, Step::Idle));
                continue;
            };
            let full = pending.len() as i64 == limit;
            match plan_batch(auction, pending, full, now, grace, &mut outcomes) {
                Some(batch) => batches.push(batch),
                None => steps.push((auction_id, Step::Idle)),
            }
        }
        if batches.is_empty() {
            return Ok(steps);
        }

        let updates: Vec<auctions::StateUpdate> = batches
            .iter()
            .map(|b| auctions::StateUpdate {
                id: b.auction_id,
                expected_version: b.version - 1,
                state: &b.state,
                resolved_count: b.resolved_count,
                settlement: b.settlement.as_ref().map(Option::as_ref),
            })
            .collect();
        let marks: Vec<(Uuid, Uuid)> = batches
            .iter()
            .flat_map(|b| b.displaced_earlier.iter().map(|&bid| (b.auction_id, bid)))
            .collect();
        let notifications: Vec<String> = batches
            .iter()
            .map(|b| self.signals.notification(b.auction_id))
            .collect();
        let notify = tx
            .prepare_cached("SELECT pg_notify($1, n) FROM unnest($2::text[]) AS n")
            .await?;
        let notify_params: [&(dyn ToSql + Sync); 2] = [&listener::RESOLVED_CHANNEL, &notifications];
        // The writes touch different rows and are sent at once, one round
        // trip. If a compare-and-set lost, or some bid was no longer
        // queued and pending, the transaction is dropped and none of them
        // is committed. The statements over the batch's arrays come after
        // the switch back to custom plans (prepared, so on the wire before
        // them).
        let (won, dequeued, written) = match futures::join!(
            futures::future::try_join_all(
                updates
                    .iter()
                    .map(|update| auctions::compare_and_set(&tx, update))
            ),
            tx.execute(&notify, &notify_params),
            futures::future::try_join_all(
                marks
                    .iter()
                    .map(|&(auction_id, bid_id)| bids::mark_outbid(&tx, auction_id, bid_id)),
            ),
            tx.execute(&custom_plans, &[]),
            bids::dequeue(&tx, &outcomes),
            bids::record_outcomes(&tx, &outcomes),
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
        let conflict = |mut steps: Vec<(Uuid, Step)>| {
            steps.extend(batches.iter().map(|b| (b.auction_id, Step::Conflict)));
            steps
        };
        if won.contains(&false) {
            return Ok(conflict(steps));
        }
        if dequeued != written || written != outcomes.len() as u64 {
            // Someone resolved some of these bids outside the version
            // protocol; write nothing and start over from fresh state.
            tracing::error!(
                auctions = batches.len(),
                dequeued,
                written,
                expected = outcomes.len(),
                "bids already resolved"
            );
            return Ok(conflict(steps));
        }
        // After the outcomes: it settles the bids they made leading.
        futures::future::try_join_all(batches.iter().filter_map(|b| {
            let winner = b.settlement.as_ref()?;
            Some(bids::settle_outcomes(
                &tx,
                b.auction_id,
                winner.as_ref().map(|w| w.bid_id),
            ))
        }))
        .await?;
        tx.commit().await?;
        self.dequeued.fetch_add(dequeued, Ordering::Relaxed);

        record_metrics(&batches, &outcomes.reasons, now, started);
        for batch in batches {
            let settled = batch.settlement.is_some();
            let range = batch.outcomes;
            self.signals.publish(Resolved {
                auction_id: batch.auction_id,
                bids: Some(Arc::from(&outcomes.ids[range])),
                version: Some(batch.version),
            });
            steps.push((
                batch.auction_id,
                Step::Applied {
                    bids: batch.applied.len(),
                    settled,
                    more: batch.more,
                },
            ));
        }
        Ok(steps)
    }
}

/// One auction's part of a resolution transaction.
struct Batch<'a> {
    auction_id: Uuid,
    /// The version the transaction writes (one above the one read).
    version: i64,
    state: rules::AuctionState,
    resolved_count: i64,
    /// `Some(winner)` when the batch settles the auction.
    settlement: Option<Option<rules::Leader>>,
    /// The bids applied, in resolution order.
    applied: Vec<&'a bids::BidRecord>,
    /// Their outcomes' place among the transaction's.
    outcomes: std::ops::Range<usize>,
    /// Bids leading before the batch that it outbid.
    displaced_earlier: Vec<Uuid>,
    /// Whether pending bids remain beyond the batch.
    more: bool,
}

/// Applies `pending` (an auction's oldest pending bids in receipt order;
/// `full` when more may be waiting) to `auction` by the rules, appending
/// the bids' outcomes to `outcomes`, and settles the auction if it is due;
/// `None` when there is nothing to write.
fn plan_batch<'a>(
    auction: &auctions::AuctionRecord,
    pending: &'a [bids::PendingBid],
    full: bool,
    now: DateTime<Utc>,
    grace: chrono::Duration,
    outcomes: &mut bids::Outcomes<'a>,
) -> Option<Batch<'a>> {
    let terms = &auction.terms;
    // Bids received after the current end of a soft-close auction wait
    // until every earlier bid must have committed (see the module docs).
    let held_back = |bid: &bids::BidRecord, ends_at: DateTime<Utc>| {
        terms.soft_close > chrono::Duration::zero()
            && !auction.state.closed
            && bid.received_at > ends_at
            && now < bid.received_at + grace
    };
    let version = auction.version + 1;
    let first = outcomes.len();
    let mut state = auction.state.clone();
    let mut position: HashMap<Uuid, usize> = HashMap::with_capacity(pending.len());
    let mut displaced_earlier = Vec::new();
    let mut resolved_count = auction.resolved_count;
    let mut applied = Vec::with_capacity(pending.len());
    for bids::PendingBid { bid, row_version } in pending {
        // Sorted by receipt: every later bid would be held back too.
        if held_back(bid, state.ends_at) {
            break;
        }
        let outcome = rules::apply_bid(terms, &mut state, &bid.input());
        if let Some(displaced) = outcome.displaced {
            match position.get(&displaced) {
                Some(&i) => outcomes.statuses[i] = "outbid",
                None => displaced_earlier.push(displaced),
            }
        }
        let (status, reason) = outcome_columns(outcome.outcome);
        resolved_count += 1;
        position.insert(bid.id, outcomes.len());
        outcomes.auction_ids.push(auction.id);
        outcomes.seqs.push(bid.seq);
        outcomes.ids.push(bid.id);
        outcomes.row_versions.push(row_version);
        outcomes.statuses.push(status);
        outcomes.reasons.push(reason);
        outcomes.prices.push(outcome.price_after);
        outcomes.resolution_nos.push(resolved_count);
        outcomes.versions.push(version);
        applied.push(bid);
    }
    let all_applied = applied.len() == pending.len();
    // Settle only when nothing received before the end can still be pending.
    let settling = !state.closed && !full && all_applied && now > state.ends_at + grace;
    if applied.is_empty() && !settling {
        return None;
    }
    let settlement = settling.then(|| rules::settle(terms, &mut state));
    Some(Batch {
        auction_id: auction.id,
        version,
        state,
        resolved_count,
        settlement,
        applied,
        outcomes: first..outcomes.len(),
        displaced_earlier,
        more: full && all_applied,
    })
}

/// Splits `work` into groups resolved one transaction each: as few as
/// hold it in groups of at most [`GROUP_MAX`], spread round-robin. One
/// transaction per auction, even two groups where one would do, cost the
/// primary more than running them side by side saved (BENCHMARKS.md as of 2026-12-06,
/// "Quiet auctions resolved together").
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
/// much statement time as executing them (BENCHMARKS.md as of 2026-12-06, "Generic plans
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

/// Records one committed transaction: its bids, duration and outcomes,
/// each auction's lag (the age of its oldest bid in the batch) and
/// settlement.
fn record_metrics(
    batches: &[Batch<'_>],
    reasons: &[Option<&'static str>],
    now: DateTime<Utc>,
    started: Instant,
) {
    let bids: usize = batches.iter().map(|b| b.applied.len()).sum();
    metrics::histogram!("gavel_resolver_batch_size").record(bids as f64);
    metrics::histogram!("gavel_resolver_batch_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    count_resolved(reasons);
    for batch in batches {
        if let Some(oldest) = batch.applied.iter().map(|b| b.received_at).min() {
            let lag = (now - oldest).num_milliseconds().max(0) as f64 / 1000.0;
            metrics::histogram!("gavel_resolver_lag_seconds").record(lag);
        }
        if batch.settlement.is_some() {
            metrics::counter!("gavel_auctions_settled_total").increment(1);
        }
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
