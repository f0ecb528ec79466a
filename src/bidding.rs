//! The bid path: where a bid is accepted.
//!
//! A bid is checked against a short-lived snapshot of its auction (only to
//! refuse what the resolver would certainly refuse), then durably appended
//! to `bid_log`, and the resolver is signalled. Concurrent bids share their
//! append: one statement and one commit for all the bids queued while the
//! previous ones were being written (`appender.rs`); so do the key lookups
//! of the bids the snapshot refuses (`lookups.rs`). Nothing
//! here locks or writes the `auctions` row; a snapshot read is a plain MVCC
//! read that never waits on that row's locks.
//!
//! The exceptions are opt-in: the load tests' baselines, kept only to
//! reproduce the incident and to compare Gavel with the classic designs at
//! their strongest, each resolving a bid in its own request (`at_once.rs`):
//! [`BidPath::RowLock`] locks the row for every bid (`row_lock.rs`),
//! [`BidPath::RowLockFn`] does the same in one round trip
//! (`row_lock_fn.rs`), and [`BidPath::Optimistic`] compare-and-sets from
//! every request (`optimistic.rs`).

mod admission;
mod appender;
mod at_once;
mod lookups;
mod optimistic;
mod row_lock;
mod row_lock_fn;

pub use admission::Door;
pub use appender::AppendSettings;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Object;
use futures::future::BoxFuture;
use tokio::sync::broadcast;
use tokio_postgres::types::PgLsn;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::auth::User;
pub use crate::config::BidPath;
use crate::db::{auctions, bids, reads, Pool};
use crate::domain::{Amount, BidStatus, IdempotencyKey};
use crate::error::ApiError;
use crate::rate_limit::RateLimiter;
use crate::rules;
use crate::signals::{Resolved, Signals};
use admission::Admission;
use appender::Appender;
use lookups::KeyLookups;

/// How long an auction snapshot is trusted for the synchronous checks.
const SNAPSHOT_TTL: Duration = Duration::from_millis(250);
/// Snapshots kept before the cache is emptied.
const SNAPSHOT_CAPACITY: usize = 10_000;
/// The wait for connections of a pool built without one.
const DEFAULT_POOL_WAIT: Duration = Duration::from_secs(1);
/// Fallback re-check interval while waiting for an outcome.
const WAIT_POLL: Duration = Duration::from_millis(200);

/// What the synchronous checks need to know about an auction. Every field
/// only ever moves one way (closed stays closed, the price only rises, and
/// `min_bid_floor` bounds the minimum at every price from here on), so a
/// slightly stale snapshot can refuse a bid only when the resolver would
/// refuse it too.
#[derive(Debug, Clone)]
struct Snapshot {
    seller_id: String,
    starting_price: i64,
    closed: bool,
    /// The lowest minimum any later state of the auction can have.
    min_bid_floor: i64,
    leader_bidder: Option<String>,
}

/// A snapshot, when it was read, and whether a request is re-reading it.
struct CachedSnapshot {
    read_at: Instant,
    snapshot: Arc<Snapshot>,
    refreshing: bool,
}

/// The bid path's shared parts.
#[derive(Clone)]
pub struct BidDesk {
    pool: Pool,
    signals: Signals,
    snapshots: Arc<Mutex<HashMap<Uuid, CachedSnapshot>>>,
    rate_limit: Arc<RateLimiter>,
    path: BidPath,
    appender: Appender,
    lookups: KeyLookups,
    admission: Arc<Admission>,
}

/// An earlier bid a request replays, and the primary's WAL position when
/// it was read.
type Replayed = (bids::BidRecord, Option<PgLsn>);

/// The result of placing a bid.
pub struct Placed {
    /// The bid as stored (possibly already resolved).
    pub bid: bids::BidRecord,
    /// Whether this request repeated an earlier one with the same key.
    pub replayed: bool,
    /// Whether the outcome arrived while the client waited.
    pub resolved_in_wait: bool,
    /// The primary's WAL position after the write, for read-your-writes.
    pub wal_position: Option<PgLsn>,
}

impl BidDesk {
    /// A bid desk reading through `pool`, appending through `append_pool`
    /// (coalescing bids as `append` says), waking the resolver via
    /// `signals`, and holding each bidder to `rate_limit`. Bids are
    /// written only while [`BidDesk::run_appender`] runs.
    pub fn new(
        pool: Pool,
        append_pool: Pool,
        signals: Signals,
        rate_limit: RateLimiter,
        append: AppendSettings,
    ) -> Self {
        register_metrics();
        let admission = Arc::new(Admission::new());
        BidDesk {
            appender: Appender::new(append_pool, signals.clone(), append, admission.clone()),
            lookups: KeyLookups::new(pool.clone()),
            admission,
            pool,
            signals,
            snapshots: Arc::default(),
            rate_limit: Arc::new(rate_limit),
            path: BidPath::Log,
        }
    }

    /// The writers of coalesced appends and the key lookups, until
    /// `shutdown`; then bids still queued are written or refused, and the
    /// future ends.
    pub fn run_appender(
        &self,
        shutdown: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let lookups = self.lookups.run(shutdown.clone());
        let appender = self.appender.run(shutdown);
        async move {
            tokio::join!(lookups, appender);
        }
    }

    /// Writes bids along `path` ([`BidPath::Log`] unless told otherwise).
    pub fn with_bid_path(mut self, path: BidPath) -> Self {
        if path == BidPath::Optimistic {
            metrics::counter!("gavel_optimistic_conflicts_total").increment(0);
        }
        self.path = path;
        self
    }

    /// Whether a bid may come in now, and how long it may then wait for
    /// the database (see `admission.rs`); always open on the baselines.
    pub fn admit_bid(&self) -> Door {
        if self.path.resolves_in_request() {
            return Door::Open(self.pool_wait());
        }
        let queue = (self.appender.queued(), self.appender.capacity());
        let door = self.admission.bid(queue, self.pool_wait());
        if matches!(door, Door::Open(_)) {
            admission::count("bid", "admitted");
        }
        door
    }

    /// Whether a read may be served now: not while bids are overloaded.
    /// (Reads beyond their share of the in-flight limit are refused by the
    /// HTTP layer, and counted with [`count_refused_read`].)
    pub fn admit_read(&self) -> Door {
        let door = self.admission.read();
        if matches!(door, Door::Open(_)) {
            admission::count("read", "admitted");
        }
        door
    }

    /// Places `amount` (the bidder's maximum) on `auction_id` for `user`,
    /// idempotently under `key`; waits until `wait_until` for the outcome.
    /// All waits for connections together take at most `queue_wait` (the
    /// pool wait, or less as admission says), so an overloaded database is
    /// answered `503` in about a second at most.
    pub async fn place(
        &self,
        user: &User,
        auction_id: Uuid,
        amount: Amount,
        key: &IdempotencyKey,
        wait_until: Option<Instant>,
        queue_wait: Duration,
    ) -> Result<Placed, ApiError> {
        metrics::counter!("gavel_bids_received_total").increment(1);
        // Every refusal is counted by its code, however it came about.
        async {
            let budget = Instant::now() + queue_wait;
            let bidder = user.id.as_str();
            if let Err(wait) = self.rate_limit.check(bidder) {
                return Err(ApiError::RateLimited {
                    retry_after_s: wait.as_secs_f64().ceil().max(1.0) as u64,
                });
            }
            if self.path.resolves_in_request() {
                // The classic designs have no snapshot precheck: the
                // auction's row itself is read for every bid.
                return self
                    .place_at_once(bidder, key, auction_id, amount, wait_until, budget)
                    .await;
            }
            match self
                .precheck(bidder, auction_id, amount.get(), budget)
                .await
            {
                Ok(()) => {}
                // A retry of a request that was accepted before the auction moved
                // on must still replay, not be refused.
                Err(
                    refusal @ (ApiError::BidTooLow { .. }
                    | ApiError::AuctionClosed
                    | ApiError::SellerCannotBid
                    | ApiError::NotFound(_)),
                ) => {
                    return match self.replay(bidder, key, auction_id, amount, budget).await? {
                        Some((bid, position)) => Ok(self
                            .finish(bid, true, wait_until, None, position, budget)
                            .await),
                        None => Err(refusal),
                    };
                }
                // The database could not be asked: nothing to replay from either.
                Err(unavailable) => return Err(unavailable),
            }
            // Subscribe before the append so no resolution can slip past.
            let resolutions = wait_until.map(|_| self.signals.subscribe());
            let (appended, wal_position) =
                self.append(bidder, key, auction_id, amount, budget).await?;
            match appended {
                bids::Append::Inserted(bid) => {
                    metrics::counter!("gavel_bids_accepted_total").increment(1);
                    Ok(self
                        .finish(bid, false, wait_until, resolutions, wal_position, budget)
                        .await)
                }
                bids::Append::KeyExists(existing) => {
                    let bid = replayed_bid(existing, amount)?;
                    Ok(self
                        .finish(bid, true, wait_until, resolutions, wal_position, budget)
                        .await)
                }
            }
        }
        .await
        .inspect_err(|refusal| {
            metrics::counter!("gavel_bids_rejected_total", "reason" => refusal.code()).increment(1);
        })
    }

    /// The durable append and the resolver's wake-up, shared with the bids
    /// queued alongside (see `appender.rs`): written by a task of its own,
    /// so a client hanging up cannot cut them apart.
    async fn append(
        &self,
        bidder: &str,
        key: &IdempotencyKey,
        auction_id: Uuid,
        amount: Amount,
        budget: Instant,
    ) -> Result<(bids::Append, Option<PgLsn>), ApiError> {
        let bid = bids::NewBid {
            auction_id,
            id: Uuid::now_v7(),
            bidder_id: bidder.to_owned(),
            amount: amount.get(),
            key: key.as_str().to_owned(),
        };
        let appended = self.appender.append(bid, budget).await?;
        Ok((appended.appended, appended.wal_position))
    }

    // `replay`, `finish` and `precheck` are the steps a bid is rarely
    // parked in. Each runs boxed, so a bid waiting for its connection or
    // its append (thousands at once under overload) holds a small future,
    // not the largest of them.

    /// The earlier bid of this bidder's `key` on the auction, if any, once
    /// the request is checked to repeat it.
    fn replay<'a>(
        &'a self,
        bidder: &'a str,
        key: &'a IdempotencyKey,
        auction_id: Uuid,
        amount: Amount,
        budget: Instant,
    ) -> BoxFuture<'a, Result<Option<Replayed>, ApiError>> {
        Box::pin(async move {
            let (existing, position) = (self.lookups)
                .find(auction_id, bidder, key.as_str(), budget)
                .await?;
            let Some(existing) = existing else {
                return Ok(None);
            };
            Ok(Some((replayed_bid(existing, amount)?, position)))
        })
    }

    /// Completes the answer for a bid that is in the log. Infallible: a
    /// committed bid is acknowledged even when the database is struggling.
    fn finish<'a>(
        &'a self,
        bid: bids::BidRecord,
        replayed: bool,
        wait_until: Option<Instant>,
        resolutions: Option<broadcast::Receiver<Resolved>>,
        wal_position: Option<PgLsn>,
        budget: Instant,
    ) -> BoxFuture<'a, Placed> {
        Box::pin(async move {
            if replayed {
                metrics::counter!("gavel_bids_idempotent_replays_total").increment(1);
            }
            // Every bid response carries a consistency token; a replay that did
            // not write still hands out the current position.
            let wal_position = match wal_position {
                Some(position) => Some(position),
                None => match connection(&self.pool, budget).await {
                    Ok(client) => reads::wal_position(&client).await.ok(),
                    Err(_) => None,
                },
            };
            let bid = match wait_until {
                Some(until) if bid.status == BidStatus::Pending && until > Instant::now() => {
                    let resolutions = resolutions.unwrap_or_else(|| self.signals.subscribe());
                    self.wait_for_outcome(bid, until, resolutions).await
                }
                _ => bid,
            };
            let resolved_in_wait = wait_until.is_some() && bid.status != BidStatus::Pending;
            Placed {
                bid,
                replayed,
                resolved_in_wait,
                wal_position,
            }
        })
    }

    /// Refuses only what the resolver would certainly refuse.
    fn precheck<'a>(
        &'a self,
        bidder: &'a str,
        auction_id: Uuid,
        amount: i64,
        budget: Instant,
    ) -> BoxFuture<'a, Result<(), ApiError>> {
        Box::pin(async move {
            let snapshot = self
                .snapshot(auction_id, budget)
                .await?
                .ok_or(ApiError::NotFound("auction"))?;
            if snapshot.seller_id == bidder {
                return Err(ApiError::SellerCannotBid);
            }
            if snapshot.closed {
                return Err(ApiError::AuctionClosed);
            }
            if amount < snapshot.starting_price {
                return Err(ApiError::BidTooLow {
                    next_min_bid: snapshot.starting_price,
                });
            }
            // The leader may raise their own maximum by any amount, so only a
            // bidder who was not leading can be held to the minimum. One who
            // became leader since the snapshot has a maximum at or above it, so
            // a lower amount is refused as `not_above_own_max` anyway.
            if snapshot.leader_bidder.as_deref() != Some(bidder) && amount < snapshot.min_bid_floor
            {
                return Err(ApiError::BidTooLow {
                    next_min_bid: snapshot.min_bid_floor,
                });
            }
            Ok(())
        })
    }

    /// The auction's snapshot. When it is out of date exactly one request
    /// re-reads it while the others keep using the old one, however old, so
    /// a hot auction's row is read a few times a second, not once per bid,
    /// and a slow re-read never turns every bid into a read of its own; a
    /// stale snapshot is as safe as a fresh one (see [`Snapshot`]), only
    /// less sharp.
    async fn snapshot(
        &self,
        auction_id: Uuid,
        budget: Instant,
    ) -> Result<Option<Arc<Snapshot>>, ApiError> {
        {
            let mut snapshots = self.snapshots.lock().expect("snapshot lock");
            if let Some(cached) = snapshots.get_mut(&auction_id) {
                let age = cached.read_at.elapsed();
                if age < SNAPSHOT_TTL || cached.refreshing {
                    return Ok(Some(cached.snapshot.clone()));
                }
                cached.refreshing = true;
            }
        }
        let read = self.read_snapshot(auction_id, budget).await;
        let mut snapshots = self.snapshots.lock().expect("snapshot lock");
        match read {
            Ok(Some(snapshot)) => {
                if snapshots.len() >= SNAPSHOT_CAPACITY {
                    snapshots.clear();
                }
                snapshots.insert(
                    auction_id,
                    CachedSnapshot {
                        read_at: Instant::now(),
                        snapshot: snapshot.clone(),
                        refreshing: false,
                    },
                );
                Ok(Some(snapshot))
            }
            Ok(None) => {
                snapshots.remove(&auction_id);
                Ok(None)
            }
            Err(e) => {
                if let Some(cached) = snapshots.get_mut(&auction_id) {
                    cached.refreshing = false;
                }
                Err(e)
            }
        }
    }

    async fn read_snapshot(
        &self,
        auction_id: Uuid,
        budget: Instant,
    ) -> Result<Option<Arc<Snapshot>>, ApiError> {
        let client = connection(&self.pool, budget).await?;
        let Some(auction) = auctions::get(&client, auction_id).await? else {
            return Ok(None);
        };
        metrics::counter!("gavel_auction_snapshot_reads_total").increment(1);
        Ok(Some(Arc::new(Snapshot {
            min_bid_floor: match auction.state.price {
                Some(price) if auction.state.leader.is_some() => {
                    rules::min_bid_floor(&auction.terms, price)
                }
                _ => auction.terms.starting_price,
            },
            seller_id: auction.terms.seller_id,
            starting_price: auction.terms.starting_price,
            closed: auction.state.closed,
            leader_bidder: auction.state.leader.map(|l| l.bidder_id),
        })))
    }

    /// Waits until the resolver has decided `bid`, or until `until`;
    /// returns the bid's latest known view either way.
    async fn wait_for_outcome(
        &self,
        mut bid: bids::BidRecord,
        until: Instant,
        mut resolutions: broadcast::Receiver<Resolved>,
    ) -> bids::BidRecord {
        let deadline = tokio::time::Instant::from(until);
        loop {
            let recheck = tokio::select! {
                () = tokio::time::sleep_until(deadline) => return bid,
                () = tokio::time::sleep(WAIT_POLL) => true,
                event = resolutions.recv() => match event {
                    Ok(resolved) => resolved.may_concern(bid.auction_id, bid.id),
                    // Missed events: look for ourselves.
                    Err(broadcast::error::RecvError::Lagged(_)) => true,
                    Err(broadcast::error::RecvError::Closed) => {
                        resolutions = self.signals.subscribe();
                        true
                    }
                },
            };
            if recheck {
                match self.latest(bid.id, until).await {
                    Ok(Some(latest)) => bid = latest,
                    Ok(None) => {}
                    // The bid is safe in the log; answer with what we know.
                    Err(e) => {
                        tracing::debug!(error = %e, "could not re-read a bid while waiting");
                        return bid;
                    }
                }
                if bid.status != BidStatus::Pending {
                    return bid;
                }
            }
        }
    }

    /// The bid as stored now, unless that takes past `until`.
    async fn latest(
        &self,
        bid_id: Uuid,
        until: Instant,
    ) -> Result<Option<bids::BidRecord>, ApiError> {
        tokio::time::timeout_at(until.into(), async {
            let client = connection(&self.pool, until).await?;
            Ok(bids::get(&client, bid_id).await?)
        })
        .await
        .unwrap_or(Err(ApiError::DeadlineExceeded))
    }

    /// How long a bid may wait for connections when not overloaded.
    pub fn pool_wait(&self) -> Duration {
        self.pool.timeouts().wait.unwrap_or(DEFAULT_POOL_WAIT)
    }
}

/// The bid an earlier request with the same key on the auction placed,
/// which this request repeats; 422 when it asked for another amount (the
/// bid's amount is the request's fingerprint).
fn replayed_bid(existing: bids::BidRecord, amount: Amount) -> Result<bids::BidRecord, ApiError> {
    if existing.amount != amount.get() {
        return Err(ApiError::IdempotencyKeyReused);
    }
    Ok(existing)
}

/// Counts a read refused at the door.
pub fn count_refused_read() {
    admission::count("read", "refused_at_door");
}

/// The `reason` labels of `gavel_bids_rejected_total`: the problem codes a
/// bid can be refused with.
const REFUSALS: [&str; 10] = [
    "bid_too_low",
    "auction_closed",
    "seller_cannot_bid",
    "not_found",
    "rate_limited",
    "idempotency_key_reused",
    "idempotency_key_in_flight",
    "overloaded",
    "unavailable",
    "internal",
];

/// Registers the bid counters at zero, so rates over them are 0 rather
/// than missing before the first event.
fn register_metrics() {
    for name in [
        "gavel_bids_received_total",
        "gavel_bids_accepted_total",
        "gavel_bids_idempotent_replays_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    for reason in REFUSALS {
        metrics::counter!("gavel_bids_rejected_total", "reason" => reason).increment(0);
    }
}

/// A connection from `pool`, unless none is free (or can be opened) by
/// `budget`: then the request is shed.
async fn connection(pool: &Pool, budget: Instant) -> Result<Object, ApiError> {
    Ok(pool.get_before(budget).await?)
}
