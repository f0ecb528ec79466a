//! Queries on `bid_log` and `idempotency_keys`: the one-statement durable
//! append of the bid path (one statement for a whole batch of coalesced
//! bids), reads of bids, and the resolver's outcome writes.
//!
//! The append touches only `bid_log` and `idempotency_keys`; it never reads,
//! locks or references the `auctions` row. The row-lock baseline
//! (`bidding::row_lock`) claims a key and inserts an already resolved bid
//! through [`claim_key`] and [`insert_resolved`].

use std::collections::HashMap;
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::types::{PgLsn, ToSql};
use tokio_postgres::Row;
use uuid::Uuid;

use super::reads;

/// One row of the bid log.
#[derive(Debug, Clone)]
pub struct BidRecord {
    /// The auction bid on.
    pub auction_id: Uuid,
    /// The bid id.
    pub id: Uuid,
    /// Insertion sequence (history order; not the resolution order).
    pub seq: i64,
    /// The bidder (token `sub`).
    pub bidder_id: String,
    /// The bidder's maximum.
    pub amount: i64,
    /// `pending`, `leading`, `outbid`, `rejected`, `won` or `lost`.
    pub status: String,
    /// Why the bid was rejected.
    pub reason: Option<String>,
    /// The auction price right after this bid was applied.
    pub price_after: Option<i64>,
    /// Database clock at insertion.
    pub received_at: DateTime<Utc>,
    /// When the resolver applied the bid.
    pub resolved_at: Option<DateTime<Utc>>,
    /// Position in the auction's resolution order.
    pub resolution_no: Option<i64>,
}

const COLUMNS: &str = "auction_id, id, seq, bidder_id, amount, status, reason, price_after, \
    received_at, resolved_at, resolution_no";

impl BidRecord {
    /// The bid as the auction rules see it.
    pub fn input(&self) -> crate::rules::BidInput {
        crate::rules::BidInput {
            id: self.id,
            bidder_id: self.bidder_id.clone(),
            amount: self.amount,
            received_at: self.received_at,
        }
    }

    fn from_row(row: &Row) -> Result<Self, tokio_postgres::Error> {
        Ok(BidRecord {
            auction_id: row.try_get("auction_id")?,
            id: row.try_get("id")?,
            seq: row.try_get("seq")?,
            bidder_id: row.try_get("bidder_id")?,
            amount: row.try_get("amount")?,
            status: row.try_get("status")?,
            reason: row.try_get("reason")?,
            price_after: row.try_get("price_after")?,
            received_at: row.try_get("received_at")?,
            resolved_at: row.try_get("resolved_at")?,
            resolution_no: row.try_get("resolution_no")?,
        })
    }
}

/// A stored idempotency key: what the first request with it asked for.
#[derive(Debug, Clone)]
pub struct KeyRecord {
    /// The auction of the first request.
    pub auction_id: Uuid,
    /// The amount of the first request.
    pub amount: i64,
    /// The bid the first request created.
    pub bid_id: Uuid,
    /// That bid as stored, when it was read together with the key (so a
    /// replay needs no second query, nor a second connection).
    pub bid: Option<BidRecord>,
}

/// What an append did for one bid.
#[derive(Debug)]
pub enum Append {
    /// A new bid is durably in the log.
    Inserted(BidRecord),
    /// The bidder already used this key; nothing was written.
    KeyExists(KeyRecord),
}

/// A bid for [`append_batch`]: what its request asked for, and the id its
/// row gets.
#[derive(Debug, Clone)]
pub struct NewBid {
    /// The auction bid on.
    pub auction_id: Uuid,
    /// The new bid's id (also stored with its idempotency key).
    pub id: Uuid,
    /// The bidder.
    pub bidder_id: String,
    /// The bidder's maximum.
    pub amount: i64,
    /// The request's idempotency key.
    pub key: String,
}

/// The bid path's durable write, for any number of bids in one statement
/// (one transaction, one WAL flush): each bid's idempotency key and the bid
/// itself. A bid whose key the bidder already used is skipped; returns the
/// rows inserted, in the order of `bids`. No two of `bids` may share a
/// bidder and key (a later one would be skipped like an existing key).
///
/// A concurrent append with one of the same keys waits on the key's unique
/// index until the first commits, then skips it: never two bids. Keys are
/// inserted in (bidder, key) order, so two appends that share several keys
/// wait on each other in one order instead of deadlocking.
///
/// With the rows comes the primary's WAL position after the commit, read
/// in the same round trip (`None` if it could not be read).
pub async fn append_batch(
    client: &impl GenericClient,
    bids: &[&NewBid],
) -> Result<(Vec<BidRecord>, Option<PgLsn>), tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(&format!(
            "WITH input AS ( \
               SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::int8[], $5::text[]) \
                 WITH ORDINALITY AS i(auction_id, id, bidder_id, amount, key, ord)), \
             keys AS ( \
               INSERT INTO idempotency_keys (bidder_id, key, auction_id, amount, bid_id) \
               SELECT bidder_id, key, auction_id, amount, id FROM input ORDER BY bidder_id, key \
               ON CONFLICT (bidder_id, key) DO NOTHING \
               RETURNING bid_id) \
             INSERT INTO bid_log (auction_id, id, bidder_id, amount, idempotency_key) \
             SELECT i.auction_id, i.id, i.bidder_id, i.amount, i.key \
             FROM input i JOIN keys k ON k.bid_id = i.id ORDER BY i.ord \
             RETURNING {COLUMNS}"
        ))
        .await?;
    let auction_ids: Vec<Uuid> = bids.iter().map(|b| b.auction_id).collect();
    let ids: Vec<Uuid> = bids.iter().map(|b| b.id).collect();
    let bidder_ids: Vec<&str> = bids.iter().map(|b| b.bidder_id.as_str()).collect();
    let amounts: Vec<i64> = bids.iter().map(|b| b.amount).collect();
    let keys: Vec<&str> = bids.iter().map(|b| b.key.as_str()).collect();
    let params: [&(dyn ToSql + Sync); 5] = [&auction_ids, &ids, &bidder_ids, &amounts, &keys];
    let (rows, position) = reads::with_wal_position(client, client.query(&stmt, &params)).await;
    let mut inserted = rows?
        .iter()
        .map(BidRecord::from_row)
        .collect::<Result<Vec<_>, _>>()?;
    // Rows come back in no promised order; `seq` is the insertion order.
    inserted.sort_by_key(|bid| bid.seq);
    Ok((inserted, position))
}

/// The stored idempotency keys among `wanted` (bidder, key) pairs, by pair,
/// and the primary's WAL position after the look-up, read in the same round
/// trip (`None` if it could not be read): every bid found is at or below it.
pub async fn find_keys(
    client: &impl GenericClient,
    wanted: &[(&str, &str)],
) -> Result<(HashMap<(String, String), KeyRecord>, Option<PgLsn>), tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(
            "SELECT k.bidder_id AS key_bidder_id, k.key AS key_key, \
                    k.auction_id AS key_auction_id, k.amount AS key_amount, \
                    k.bid_id AS key_bid_id, b.* \
             FROM unnest($1::text[], $2::text[]) AS w(bidder_id, key) \
             JOIN idempotency_keys k ON k.bidder_id = w.bidder_id AND k.key = w.key \
             LEFT JOIN bid_log b ON b.auction_id = k.auction_id AND b.id = k.bid_id",
        )
        .await?;
    let bidder_ids: Vec<&str> = wanted.iter().map(|(bidder, _)| *bidder).collect();
    let keys: Vec<&str> = wanted.iter().map(|(_, key)| *key).collect();
    let params: [&(dyn ToSql + Sync); 2] = [&bidder_ids, &keys];
    let (rows, position) = reads::with_wal_position(client, client.query(&stmt, &params)).await;
    let found = rows?
        .iter()
        .map(|row| {
            let bid = match row.try_get::<_, Option<Uuid>>("id")? {
                Some(_) => Some(BidRecord::from_row(row)?),
                None => None,
            };
            let record = KeyRecord {
                auction_id: row.try_get("key_auction_id")?,
                amount: row.try_get("key_amount")?,
                bid_id: row.try_get("key_bid_id")?,
                bid,
            };
            Ok((
                (row.try_get("key_bidder_id")?, row.try_get("key_key")?),
                record,
            ))
        })
        .collect::<Result<_, tokio_postgres::Error>>()?;
    Ok((found, position))
}

/// Claims `key` of `bidder_id` for the new bid `bid_id`, in the caller's
/// transaction (the row-lock baseline writes its bid later in it). Returns
/// the earlier request's record when the bidder already used the key
/// (nothing written), `None` once claimed. A concurrent request with the
/// same key waits on the key's unique index until the first one ends.
pub async fn claim_key(
    client: &impl GenericClient,
    bidder_id: &str,
    key: &str,
    auction_id: Uuid,
    amount: i64,
    bid_id: Uuid,
) -> Result<Option<KeyRecord>, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(
            "INSERT INTO idempotency_keys (bidder_id, key, auction_id, amount, bid_id) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (bidder_id, key) DO NOTHING \
             RETURNING bid_id",
        )
        .await?;
    loop {
        let claimed = client
            .query_opt(&stmt, &[&bidder_id, &key, &auction_id, &amount, &bid_id])
            .await?;
        if claimed.is_some() {
            return Ok(None);
        }
        // If the conflicting key vanished in between (purged), claim again.
        if let Some(existing) = find_key(client, bidder_id, key).await? {
            return Ok(Some(existing));
        }
    }
}

/// A bid decided in the same transaction that writes it (the row-lock
/// baseline), with its outcome.
pub struct ResolvedBid<'a> {
    /// The auction bid on.
    pub auction_id: Uuid,
    /// The bid id (the one its idempotency key names).
    pub id: Uuid,
    /// The bidder.
    pub bidder_id: &'a str,
    /// The bidder's maximum.
    pub amount: i64,
    /// The request's idempotency key.
    pub idempotency_key: &'a str,
    /// `leading`, `outbid` or `rejected`.
    pub status: &'static str,
    /// Why the bid was rejected.
    pub reason: Option<&'static str>,
    /// The auction price right after the bid.
    pub price_after: Option<i64>,
    /// Position in the auction's resolution order.
    pub resolution_no: i64,
    /// The auction version the bid's outcome was committed with.
    pub resolved_version: i64,
}

/// Inserts a bid together with its outcome; `received_at` and
/// `resolved_at` are both the transaction's `now()`.
pub async fn insert_resolved(
    client: &impl GenericClient,
    bid: &ResolvedBid<'_>,
) -> Result<BidRecord, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(&format!(
            "INSERT INTO bid_log (auction_id, id, bidder_id, amount, idempotency_key, status, \
             reason, price_after, resolution_no, resolved_version, resolved_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now()) RETURNING {COLUMNS}"
        ))
        .await?;
    let row = client
        .query_one(
            &stmt,
            &[
                &bid.auction_id,
                &bid.id,
                &bid.bidder_id,
                &bid.amount,
                &bid.idempotency_key,
                &bid.status,
                &bid.reason,
                &bid.price_after,
                &bid.resolution_no,
                &bid.resolved_version,
            ],
        )
        .await?;
    BidRecord::from_row(&row)
}

/// The stored idempotency key of `bidder_id`, if any.
pub async fn find_key(
    client: &impl GenericClient,
    bidder_id: &str,
    key: &str,
) -> Result<Option<KeyRecord>, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(
            "SELECT auction_id, amount, bid_id FROM idempotency_keys \
             WHERE bidder_id = $1 AND key = $2",
        )
        .await?;
    Ok(client
        .query_opt(&stmt, &[&bidder_id, &key])
        .await?
        .map(|row| KeyRecord {
            auction_id: row.get(0),
            amount: row.get(1),
            bid_id: row.get(2),
            bid: None,
        }))
}

/// One bid by id.
pub async fn get(
    client: &impl GenericClient,
    bid_id: Uuid,
) -> Result<Option<BidRecord>, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(&format!("SELECT {COLUMNS} FROM bid_log WHERE id = $1"))
        .await?;
    client
        .query_opt(&stmt, &[&bid_id])
        .await?
        .map(|row| BidRecord::from_row(&row))
        .transpose()
}

/// A page of an auction's bid history, newest first, strictly before `before_seq`.
pub async fn history(
    client: &impl GenericClient,
    auction_id: Uuid,
    before_seq: Option<i64>,
    limit: i64,
) -> Result<Vec<BidRecord>, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM bid_log WHERE auction_id = $1 AND seq < $2 \
             ORDER BY seq DESC LIMIT $3"
        ))
        .await?;
    let rows = client
        .query(
            &stmt,
            &[&auction_id, &before_seq.unwrap_or(i64::MAX), &limit],
        )
        .await?;
    rows.iter().map(BidRecord::from_row).collect()
}

/// A pending bid as the resolver read it inside its transaction.
pub struct PendingBid {
    /// The bid.
    pub bid: BidRecord,
    /// Where the row version read lives (`bid_log.ctid`, as text): the
    /// outcome write finds the row by it, whatever the statistics say.
    /// Only meaningful inside the transaction that read it.
    pub row_version: String,
}

/// The oldest pending bids of each of `auction_ids` (at most `limit` per
/// auction), in sequence order within an auction, found by state: the
/// queue of pending bids, which every bid inserted pending joins in its
/// own statement (see the `pending_queue` migration).
pub async fn pending(
    client: &impl GenericClient,
    auction_ids: &[Uuid],
    limit: i64,
) -> Result<Vec<PendingBid>, tokio_postgres::Error> {
    // Per auction, the queue is read in key order up to the limit, and
    // each queued bid is looked up by key in `bid_log` (`OFFSET 0` keeps
    // the lookup a subquery, so the planner cannot turn it into a join
    // over the auction's whole log): one plan whatever the statistics and
    // the parameters, so it serves as a generic plan (see the resolver's
    // `plan_modes`). A join planned for the auction's whole log took 24 ms
    // per batch of a hot auction.
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT b.* FROM unnest($1::uuid[]) AS a(id) \
             CROSS JOIN LATERAL \
               (SELECT seq, id FROM pending_bids \
                WHERE auction_id = a.id ORDER BY seq LIMIT $2) q \
             CROSS JOIN LATERAL \
               (SELECT {COLUMNS}, ctid::text AS row_version FROM bid_log \
                WHERE auction_id = a.id AND id = q.id OFFSET 0) b \
             ORDER BY b.auction_id, q.seq"
        )
    });
    let stmt = client.prepare_cached(&SQL).await?;
    let rows = client.query(&stmt, &[&auction_ids, &limit]).await?;
    rows.iter()
        .map(|row| {
            Ok(PendingBid {
                bid: BidRecord::from_row(row)?,
                row_version: row.try_get("row_version")?,
            })
        })
        .collect()
}

/// Auctions that have pending bids (found by state, not by a watermark).
pub async fn auctions_with_pending(
    client: &impl GenericClient,
    limit: i64,
) -> Result<Vec<Uuid>, tokio_postgres::Error> {
    let stmt = client
        // A skip scan over the queue's key: one probe per auction, however
        // many bids a hot auction has waiting.
        .prepare_cached(
            "WITH RECURSIVE auction AS ( \
               (SELECT auction_id FROM pending_bids ORDER BY auction_id LIMIT 1) \
               UNION ALL \
               SELECT (SELECT q.auction_id FROM pending_bids q \
                       WHERE q.auction_id > auction.auction_id \
                       ORDER BY q.auction_id LIMIT 1) \
               FROM auction WHERE auction.auction_id IS NOT NULL) \
             SELECT auction_id FROM auction WHERE auction_id IS NOT NULL LIMIT $1",
        )
        .await?;
    let rows = client.query(&stmt, &[&limit]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The resolver's outcome for a batch of pending bids (of one auction or
/// several), column-wise.
#[derive(Default)]
pub struct Outcomes<'a> {
    /// The auction of each bid.
    pub auction_ids: Vec<Uuid>,
    /// Bid sequence numbers (their key in the queue of pending bids).
    pub seqs: Vec<i64>,
    /// Bid ids.
    pub ids: Vec<Uuid>,
    /// Where each bid's row version lives ([`PendingBid::row_version`]).
    pub row_versions: Vec<&'a str>,
    /// New status of each bid.
    pub statuses: Vec<&'static str>,
    /// Rejection reason of each bid.
    pub reasons: Vec<Option<&'static str>>,
    /// Price right after each bid.
    pub prices: Vec<Option<i64>>,
    /// Position of each bid in its auction's resolution order.
    pub resolution_nos: Vec<i64>,
    /// The auction version each outcome is committed with.
    pub versions: Vec<i64>,
}

impl Outcomes<'_> {
    /// Bids in the batch.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the batch has no bids.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Takes the bids of `outcomes` off the queue of pending bids, in the
/// resolver's transaction that writes their outcomes; returns how many were
/// still queued (the caller aborts the transaction if that is not all).
///
/// The range of the sequence numbers bounds the index scan: the queue's
/// statistics lag its contents by a whole burst, and without the range a
/// planner that believes an auction has few queued bids reads all of them.
/// (Each queue row found by its row version instead, as the outcomes are,
/// cost twice as much to plan and run.)
pub async fn dequeue(
    client: &impl GenericClient,
    outcomes: &Outcomes<'_>,
) -> Result<u64, tokio_postgres::Error> {
    let (Some(&first), Some(&last)) = (outcomes.seqs.iter().min(), outcomes.seqs.iter().max())
    else {
        return Ok(0);
    };
    let mut auction_ids = outcomes.auction_ids.clone();
    auction_ids.dedup();
    let stmt = client
        .prepare_cached(
            "DELETE FROM pending_bids \
             WHERE auction_id = ANY($1::uuid[]) AND seq BETWEEN $2 AND $3 \
             AND seq = ANY($4::int8[])",
        )
        .await?;
    client
        .execute(&stmt, &[&auction_ids, &first, &last, &outcomes.seqs])
        .await
}

/// Writes the outcomes of pending bids; returns how many rows were still
/// pending (the caller aborts the transaction if that is not all of them).
///
/// No index of `bid_log` covers an outcome column, so each outcome is a
/// HOT update: a new version on the same page, no index entry written.
///
/// Each outcome names the row version the resolver read in this
/// transaction, and the join fetches exactly that tuple (a TID scan per
/// outcome), so the plan does not depend on statistics. Those lag a hot
/// auction by hundreds of thousands of bids in its final minutes:
/// - looked up by auction and id, a planner that believed the auction had
///   a few dozen bids scanned all of them for every batch (67 ms for a
///   1,000-bid batch at 330,000 bids, against 4 ms by row version);
/// - with the versions as one `ctid = ANY(...)` list joined to the
///   outcomes by id, fresh statistics that said almost no bid was pending
///   made the planner rescan the whole list for every outcome (about 1 s
///   per 2,000-bid batch; the resolver fell behind at 6,000 bids/s).
///
/// The id and the pending status are checked again: a version that changed
/// since the read is not written, and the count tells the caller.
pub async fn record_outcomes(
    client: &impl GenericClient,
    outcomes: &Outcomes<'_>,
) -> Result<u64, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(
            "UPDATE bid_log b SET status = u.status, reason = u.reason, price_after = u.price, \
             resolution_no = u.no, resolved_version = u.version, resolved_at = now() \
             FROM unnest($1::text[]::tid[], $2::uuid[], $3::text[], $4::text[], $5::int8[], \
                         $6::int8[], $7::int8[]) AS u(row_version, id, status, reason, price, no, \
                                                     version) \
             WHERE b.ctid = u.row_version AND b.id = u.id AND b.status = 'pending'",
        )
        .await?;
    client
        .execute(
            &stmt,
            &[
                &outcomes.row_versions,
                &outcomes.ids,
                &outcomes.statuses,
                &outcomes.reasons,
                &outcomes.prices,
                &outcomes.resolution_nos,
                &outcomes.versions,
            ],
        )
        .await
}

/// Marks a previously leading bid as outbid.
///
/// One statement per bid, looked up by key: the resolver sends one for
/// each auction of a group whose leader was outbid, all in one round trip.
/// One statement over arrays of bids, joined to `bid_log`, ran on a
/// generic plan that scanned the log: 11.5 ms per call at 140,000 bids
/// (BENCHMARKS.md as of 2026-12-06, "Quiet auctions resolved together").
pub async fn mark_outbid(
    client: &impl GenericClient,
    auction_id: Uuid,
    bid_id: Uuid,
) -> Result<u64, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(
            "UPDATE bid_log SET status = 'outbid' \
             WHERE auction_id = $1 AND id = $2 AND status = 'leading'",
        )
        .await?;
    client.execute(&stmt, &[&auction_id, &bid_id]).await
}

/// Settlement: the winning bid becomes `won`, every other live bid `lost`.
pub async fn settle_outcomes(
    client: &impl GenericClient,
    auction_id: Uuid,
    winning_bid: Option<Uuid>,
) -> Result<u64, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(
            "UPDATE bid_log SET status = CASE WHEN id = $2 THEN 'won' ELSE 'lost' END \
             WHERE auction_id = $1 AND status IN ('leading', 'outbid')",
        )
        .await?;
    client.execute(&stmt, &[&auction_id, &winning_bid]).await
}

/// Vacuums the queue of pending bids, skipping it if someone else holds it.
///
/// Every resolved bid leaves a dead queue row, and the resolver's scans walk
/// dead index entries until a vacuum removes them: during a burst that is
/// hundreds of thousands of entries a minute, while autovacuum looks at a
/// database at most once a minute (`autovacuum_naptime`).
pub async fn vacuum_queue(client: &impl GenericClient) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute("VACUUM (SKIP_LOCKED) pending_bids")
        .await
}

/// Deletes up to `limit` idempotency keys older than `retention`; returns how many.
pub async fn purge_idempotency_keys(
    client: &impl GenericClient,
    retention: std::time::Duration,
    limit: i64,
) -> Result<u64, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(
            "DELETE FROM idempotency_keys WHERE (bidder_id, key) IN ( \
               SELECT bidder_id, key FROM idempotency_keys \
               WHERE created_at < now() - make_interval(secs => $1) LIMIT $2 \
               FOR UPDATE SKIP LOCKED)",
        )
        .await?;
    client
        .execute(&stmt, &[&retention.as_secs_f64(), &limit])
        .await
}
