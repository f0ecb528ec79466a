//! Queries on `auctions`: creation, reads, and the resolver's compare-and-set
//! on `version`. Nothing on the bid path writes or locks this table, except
//! the load tests' baselines (`bidding::row_lock` and its siblings), which
//! exist to show why.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::db::bids::Progress;
use crate::rules::{AuctionState, AuctionTerms, Increments, Leader};

/// One auction as stored: fixed terms plus the resolver-owned state.
#[derive(Debug, Clone)]
pub struct AuctionRecord {
    /// The auction id.
    pub id: Uuid,
    /// Display title.
    pub title: String,
    /// ISO-style currency code (three uppercase letters).
    pub currency: String,
    /// Terms the rules apply.
    pub terms: AuctionTerms,
    /// `ends_at` as created, before any soft-close extension.
    pub original_ends_at: DateTime<Utc>,
    /// `soft_close_s` as created.
    pub soft_close_s: i32,
    /// State the resolver maintains.
    pub state: AuctionState,
    /// How many bids the resolver has applied (rejected ones included).
    pub resolved_count: i64,
    /// The winner once settled with the reserve met.
    pub winner_id: Option<String>,
    /// Optimistic concurrency version; also the `ETag`.
    pub version: i64,
}

/// A validated request to create an auction.
pub struct NewAuction {
    /// The new auction's id (UUIDv7).
    pub id: Uuid,
    /// Display title.
    pub title: String,
    /// Currency code.
    pub currency: String,
    /// Terms, including the seller.
    pub terms: AuctionTerms,
    /// Scheduled end.
    pub ends_at: DateTime<Utc>,
    /// Soft-close window in seconds.
    pub soft_close_s: i32,
}

const COLUMNS: &str = "id, title, currency, seller_id, starting_price, reserve_price, increments, \
    starts_at, original_ends_at, ends_at, soft_close_s, max_end_at, status, leader_bid_id, \
    leader_bidder_id, leader_max, current_price, bid_count, resolved_count, winner_id, version";

impl AuctionRecord {
    fn from_row(row: &Row) -> Result<Self, tokio_postgres::Error> {
        let increments: serde_json::Value = row.try_get("increments")?;
        // Stored increments were validated on insert; a bad value here means
        // the row was edited by hand, and the default table is the safe reading.
        let increments: Increments =
            serde_json::from_value(increments).unwrap_or_else(|_| Increments::default_table());
        let soft_close_s: i32 = row.try_get("soft_close_s")?;
        let leader = match (
            row.try_get::<_, Option<Uuid>>("leader_bid_id")?,
            row.try_get::<_, Option<String>>("leader_bidder_id")?,
            row.try_get::<_, Option<i64>>("leader_max")?,
        ) {
            (Some(bid_id), Some(bidder_id), Some(max_amount)) => Some(Leader {
                bid_id,
                bidder_id,
                max_amount,
            }),
            _ => None,
        };
        let status: String = row.try_get("status")?;
        Ok(AuctionRecord {
            id: row.try_get("id")?,
            title: row.try_get("title")?,
            currency: row.try_get("currency")?,
            terms: AuctionTerms {
                seller_id: row.try_get("seller_id")?,
                starting_price: row.try_get("starting_price")?,
                reserve_price: row.try_get("reserve_price")?,
                increments,
                starts_at: row.try_get("starts_at")?,
                soft_close: chrono::Duration::seconds(i64::from(soft_close_s)),
                max_end_at: row.try_get("max_end_at")?,
            },
            original_ends_at: row.try_get("original_ends_at")?,
            soft_close_s,
            state: AuctionState {
                leader,
                price: row.try_get("current_price")?,
                bid_count: row.try_get("bid_count")?,
                ends_at: row.try_get("ends_at")?,
                closed: status == "closed",
            },
            resolved_count: row.try_get("resolved_count")?,
            winner_id: row.try_get("winner_id")?,
            version: row.try_get("version")?,
        })
    }
}

/// Inserts a new auction and returns it as stored.
pub async fn insert(
    client: &impl GenericClient,
    new: &NewAuction,
) -> Result<AuctionRecord, tokio_postgres::Error> {
    let increments =
        serde_json::to_value(new.terms.increments.tiers()).expect("increment tiers serialize");
    let sql = format!(
        "INSERT INTO auctions (id, title, currency, seller_id, starting_price, reserve_price, \
         increments, starts_at, original_ends_at, ends_at, soft_close_s, max_end_at, opened) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10, $11, $8 <= now()) \
         RETURNING {COLUMNS}"
    );
    let stmt = client.prepare_cached(&sql).await?;
    let row = client
        .query_one(
            &stmt,
            &[
                &new.id,
                &new.title,
                &new.currency,
                &new.terms.seller_id,
                &new.terms.starting_price,
                &new.terms.reserve_price,
                &increments,
                &new.terms.starts_at,
                &new.ends_at,
                &new.soft_close_s,
                &new.terms.max_end_at,
            ],
        )
        .await?;
    AuctionRecord::from_row(&row)
}

/// Marks up to `limit` auctions whose start has come as opened, bumping
/// their version so their view's `ETag` changes with its status; returns
/// their ids and new versions.
pub async fn open_started(
    client: &impl GenericClient,
    limit: i64,
) -> Result<Vec<(Uuid, i64)>, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(
            "UPDATE auctions SET opened = true, version = version + 1 WHERE id IN ( \
               SELECT id FROM auctions WHERE NOT opened AND starts_at <= now() \
               ORDER BY starts_at LIMIT $1 FOR UPDATE SKIP LOCKED) RETURNING id, version",
        )
        .await?;
    let rows = client.query(&stmt, &[&limit]).await?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}

/// Reads one auction (a plain MVCC read: never waits on the row's locks).
pub async fn get(
    client: &impl GenericClient,
    id: Uuid,
) -> Result<Option<AuctionRecord>, tokio_postgres::Error> {
    select(client, id, Read::Plain)
        .await?
        .map(|row| AuctionRecord::from_row(&row))
        .transpose()
}

/// Reads one auction (a plain MVCC read) with the statement's `now()`:
/// the optimistic baseline (`bidding::optimistic`) applies the rules as of
/// that time.
pub async fn get_with_clock(
    client: &impl GenericClient,
    id: Uuid,
) -> Result<Option<(AuctionRecord, DateTime<Utc>)>, tokio_postgres::Error> {
    select_with_clock(client, id, Read::WithClock).await
}

/// Reads the auctions among `ids` that exist (plain MVCC reads), in no
/// particular order, each with the resolver's progress through its bids.
pub async fn get_many_with_progress(
    client: &impl GenericClient,
    ids: &[Uuid],
) -> Result<Vec<(AuctionRecord, Progress)>, tokio_postgres::Error> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT {COLUMNS}, resolved_xid, resolved_seq, open_xids, ahead_xids, ahead_seqs \
             FROM auctions WHERE id = ANY($1::uuid[])"
        )
    });
    let stmt = client.prepare_cached(&SQL).await?;
    let rows = client.query(&stmt, &[&ids]).await?;
    rows.iter()
        .map(|row| Ok((AuctionRecord::from_row(row)?, Progress::from_row(row)?)))
        .collect()
}

/// Waits for the auction's advisory lock, held until the transaction ends:
/// the lock the resolver takes (without waiting) for the auction it writes.
/// Waiting for it assigns no transaction id.
pub async fn lock(client: &impl GenericClient, id: Uuid) -> Result<(), tokio_postgres::Error> {
    let stmt = client
        .prepare_cached("SELECT pg_advisory_xact_lock(hashtextextended($1::uuid::text, 0))")
        .await?;
    client.execute(&stmt, &[&id]).await?;
    Ok(())
}

/// Reads one auction and locks its row `FOR UPDATE` until the transaction
/// ends, waiting for the lock at most the session's `lock_timeout`; with
/// the transaction's `now()`, the time every `DEFAULT now()` it writes gets.
/// Only the row-lock baseline (`bidding::row_lock`) takes this lock.
pub async fn get_for_update(
    client: &impl GenericClient,
    id: Uuid,
) -> Result<Option<(AuctionRecord, DateTime<Utc>)>, tokio_postgres::Error> {
    select_with_clock(client, id, Read::ForUpdate).await
}

/// One auction read as `read` says, with the statement's `now()`.
async fn select_with_clock(
    client: &impl GenericClient,
    id: Uuid,
    read: Read,
) -> Result<Option<(AuctionRecord, DateTime<Utc>)>, tokio_postgres::Error> {
    select(client, id, read)
        .await?
        .map(|row| Ok((AuctionRecord::from_row(&row)?, row.try_get("now")?)))
        .transpose()
}

/// How [`select`] reads the row.
enum Read {
    Plain,
    WithClock,
    ForUpdate,
}

async fn select(
    client: &impl GenericClient,
    id: Uuid,
    read: Read,
) -> Result<Option<Row>, tokio_postgres::Error> {
    let sql = match read {
        Read::Plain => format!("SELECT {COLUMNS} FROM auctions WHERE id = $1"),
        Read::WithClock => format!("SELECT {COLUMNS}, now() FROM auctions WHERE id = $1"),
        Read::ForUpdate => {
            format!("SELECT {COLUMNS}, now() FROM auctions WHERE id = $1 FOR UPDATE")
        }
    };
    let stmt = client.prepare_cached(&sql).await?;
    client.query_opt(&stmt, &[&id]).await
}

/// The resolver's new state for an auction, written only if nobody else
/// committed since `expected_version` was read.
pub struct StateUpdate<'a> {
    /// The auction.
    pub id: Uuid,
    /// The version the resolver read.
    pub expected_version: i64,
    /// The new state.
    pub state: &'a AuctionState,
    /// Bids applied so far, rejected ones included.
    pub resolved_count: i64,
    /// `Some(winner)` when this update settles the auction (`Some(None)`:
    /// settled without a winner); `None` leaves any earlier settlement as is.
    pub settlement: Option<Option<&'a Leader>>,
    /// The resolver's progress through the auction's bids; `None` leaves
    /// it as it is.
    pub progress: Option<&'a Progress>,
}

/// Compare-and-set on `version`; returns whether this writer won.
///
/// One statement per auction, found by key: the resolver sends one for
/// each auction of a group, all in one round trip. (One statement over
/// arrays of auctions gets a generic plan that scans the table and its
/// dead versions during a burst.)
pub async fn compare_and_set(
    client: &impl GenericClient,
    update: &StateUpdate<'_>,
) -> Result<bool, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(
            "UPDATE auctions SET leader_bid_id = $3, leader_bidder_id = $4, leader_max = $5, \
             current_price = $6, bid_count = $7, ends_at = $8, resolved_count = $9, \
             status = CASE WHEN $10 THEN 'closed' ELSE 'open' END, \
             settled_at = CASE WHEN $13 THEN now() ELSE settled_at END, \
             winner_id = CASE WHEN $13 THEN $11 ELSE winner_id END, \
             winner_bid_id = CASE WHEN $13 THEN $12 ELSE winner_bid_id END, \
             resolved_xid = coalesce($14, resolved_xid), \
             resolved_seq = coalesce($15, resolved_seq), \
             open_xids = coalesce($16, open_xids), \
             ahead_xids = coalesce($17, ahead_xids), \
             ahead_seqs = coalesce($18, ahead_seqs), \
             version = version + 1 \
             WHERE id = $1 AND version = $2",
        )
        .await?;
    let state = update.state;
    let leader = state.leader.as_ref();
    let winner = update.settlement.flatten();
    let progress = update.progress;
    let (ahead_xids, ahead_seqs): (Vec<i64>, Vec<i64>) =
        progress.map_or_else(Default::default, |p| p.ahead.iter().copied().unzip());
    let updated = client
        .execute(
            &stmt,
            &[
                &update.id,
                &update.expected_version,
                &leader.map(|l| l.bid_id),
                &leader.map(|l| l.bidder_id.as_str()),
                &leader.map(|l| l.max_amount),
                &state.price,
                &state.bid_count,
                &state.ends_at,
                &update.resolved_count,
                &state.closed,
                &winner.map(|w| w.bidder_id.as_str()),
                &winner.map(|w| w.bid_id),
                &update.settlement.is_some(),
                &progress.map(|p| p.xid),
                &progress.map(|p| p.seq),
                &progress.map(|p| &p.open_xids),
                &progress.map(|_| &ahead_xids),
                &progress.map(|_| &ahead_seqs),
            ],
        )
        .await?;
    Ok(updated == 1)
}

/// Open auctions whose end (plus `grace`) has passed: candidates to settle.
pub async fn due_to_settle(
    client: &impl GenericClient,
    grace: std::time::Duration,
    limit: i64,
) -> Result<Vec<Uuid>, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(
            "SELECT id FROM auctions WHERE status = 'open' \
             AND ends_at < now() - make_interval(secs => $1) ORDER BY ends_at LIMIT $2",
        )
        .await?;
    let rows = client.query(&stmt, &[&grace.as_secs_f64(), &limit]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
