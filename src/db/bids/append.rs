//! The bid paths' writes: the log path's one-statement append of a batch
//! of coalesced bids (and the look-up of keys already used), and the
//! baselines' key look-up and insert of a bid already resolved. A bid's
//! row holds its idempotency key: the unique index on (auction, bidder,
//! key) makes a key name one bid, and the bid's amount is the request's
//! fingerprint. The append touches only `bid_log`; it never reads, locks
//! or references the `auctions` row.

use std::collections::HashMap;

use deadpool_postgres::GenericClient;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{PgLsn, ToSql};
use uuid::Uuid;

use super::{BidRecord, Resolution, COLUMNS};
use crate::db::reads;

/// The unique index that holds an idempotency key to one bid.
const KEY_INDEX: &str = "bid_log_idempotency_key";

/// An idempotency key as it is scoped: the auction, the bidder, the key.
pub type BidKey = (Uuid, String, String);

/// What an append did for one bid.
#[derive(Debug)]
pub enum Append {
    /// A new bid is durably in the log.
    Inserted(BidRecord),
    /// The bidder already used this key on the auction: the bid it names.
    /// Nothing was written.
    KeyExists(BidRecord),
}

/// A bid for [`append_batch`]: what its request asked for, and the id its
/// row gets.
#[derive(Debug, Clone)]
pub struct NewBid {
    /// The auction bid on.
    pub auction_id: Uuid,
    /// The new bid's id.
    pub id: Uuid,
    /// The bidder.
    pub bidder_id: String,
    /// The bidder's maximum.
    pub amount: i64,
    /// The request's idempotency key.
    pub key: String,
}

/// The bid path's durable write, for any number of bids in one statement
/// (one transaction, one WAL flush): each bid with its idempotency key and
/// the id of the transaction that writes it, by which the resolver finds
/// it (see [`super::Progress`]). A bid whose key the bidder already used
/// on the auction is skipped; returns the rows inserted, in the order of
/// `bids`. No two of `bids` may share an auction, bidder and key (a later
/// one would be skipped like an existing key).
///
/// A concurrent append with one of the same keys waits on the key's unique
/// index until the first commits, then skips it: never two bids. Rows are
/// inserted in (auction, bidder, key) order, so two appends that share
/// several keys wait on each other in one order instead of deadlocking;
/// their sequence numbers are drawn first, in the order of `bids`, so the
/// resolver still takes the batch in the order its bids arrived.
///
/// With the rows comes the primary's WAL position after the commit, read
/// in the same round trip (`None` if it could not be read).
pub async fn append_batch(
    client: &impl GenericClient,
    bids: &[&NewBid],
) -> Result<(Vec<BidRecord>, Option<PgLsn>), tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(
            "WITH input AS ( \
               SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::int8[], $5::text[]) \
                 WITH ORDINALITY AS i(auction_id, id, bidder_id, amount, key, ord)), \
             numbered AS ( \
               SELECT i.*, nextval('bid_log_seq_seq') AS seq FROM input i ORDER BY i.ord) \
             INSERT INTO bid_log (auction_id, id, seq, bidder_id, amount, idempotency_key, xid) \
             OVERRIDING SYSTEM VALUE \
             SELECT auction_id, id, seq, bidder_id, amount, key, pg_current_xact_id()::text::int8 \
             FROM numbered ORDER BY auction_id, bidder_id, key \
             ON CONFLICT (auction_id, bidder_id, idempotency_key) DO NOTHING \
             RETURNING id, seq, received_at",
        )
        .await?;
    let auction_ids: Vec<Uuid> = bids.iter().map(|b| b.auction_id).collect();
    let ids: Vec<Uuid> = bids.iter().map(|b| b.id).collect();
    let bidder_ids: Vec<&str> = bids.iter().map(|b| b.bidder_id.as_str()).collect();
    let amounts: Vec<i64> = bids.iter().map(|b| b.amount).collect();
    let keys: Vec<&str> = bids.iter().map(|b| b.key.as_str()).collect();
    let params: [&(dyn ToSql + Sync); 5] = [&auction_ids, &ids, &bidder_ids, &amounts, &keys];
    let (rows, position) = reads::with_wal_position(client, client.query(&stmt, &params)).await;
    // The row of each bid inserted is what it asked for, pending, with
    // the sequence number and time the insert gave it.
    let by_id: HashMap<Uuid, &NewBid> = bids.iter().map(|&b| (b.id, b)).collect();
    let mut inserted = Vec::with_capacity(bids.len());
    for row in rows? {
        let id: Uuid = row.try_get(0)?;
        let Some(bid) = by_id.get(&id) else {
            continue;
        };
        inserted.push(BidRecord::pending(
            (bid.auction_id, id, row.try_get(1)?),
            bid.bidder_id.clone(),
            bid.amount,
            row.try_get(2)?,
        ));
    }
    // Rows come back in no promised order; `seq` is the order of `bids`.
    inserted.sort_by_key(|bid| bid.seq);
    Ok((inserted, position))
}

/// The bids named by the `wanted` keys, by key, and the primary's WAL
/// position after the look-up, read in the same round trip (`None` if it
/// could not be read): every bid found is at or below it.
pub async fn find_keys(
    client: &impl GenericClient,
    wanted: &[(Uuid, &str, &str)],
) -> Result<(HashMap<BidKey, BidRecord>, Option<PgLsn>), tokio_postgres::Error> {
    // A function, so that its plan is made once per session (see its
    // migration, `key_lookups_planned_once`).
    let stmt = client
        .prepare_cached("SELECT * FROM gavel_find_keys($1::uuid[], $2::text[], $3::text[])")
        .await?;
    let auction_ids: Vec<Uuid> = wanted.iter().map(|(auction, ..)| *auction).collect();
    let bidder_ids: Vec<&str> = wanted.iter().map(|(_, bidder, _)| *bidder).collect();
    let keys: Vec<&str> = wanted.iter().map(|(.., key)| *key).collect();
    let params: [&(dyn ToSql + Sync); 3] = [&auction_ids, &bidder_ids, &keys];
    let (rows, position) = reads::with_wal_position(client, client.query(&stmt, &params)).await;
    let found = rows?
        .iter()
        .map(|row| {
            let bid = BidRecord::from_row(row)?;
            let key = (
                bid.auction_id,
                bid.bidder_id.clone(),
                row.try_get("idempotency_key")?,
            );
            Ok((key, bid))
        })
        .collect::<Result<_, tokio_postgres::Error>>()?;
    Ok((found, position))
}

/// The bid of `bidder_id` named by `key` on `auction_id`, if any.
pub async fn find_key(
    client: &impl GenericClient,
    auction_id: Uuid,
    bidder_id: &str,
    key: &str,
) -> Result<Option<BidRecord>, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM bids \
             WHERE auction_id = $1 AND bidder_id = $2 AND idempotency_key = $3"
        ))
        .await?;
    client
        .query_opt(&stmt, &[&auction_id, &bidder_id, &key])
        .await?
        .as_ref()
        .map(BidRecord::from_row)
        .transpose()
}

/// Whether `e` is an insert refused because the bidder's key on the
/// auction names a bid already: a concurrent writer committed it first.
pub fn key_taken(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        *db.code() == SqlState::UNIQUE_VIOLATION && db.constraint() == Some(KEY_INDEX)
    })
}

/// A bid decided in the same transaction that writes it (the row-lock
/// baseline), with its outcome.
pub struct ResolvedBid<'a> {
    /// The auction bid on.
    pub auction_id: Uuid,
    /// The bid id.
    pub id: Uuid,
    /// The bidder.
    pub bidder_id: &'a str,
    /// The bidder's maximum.
    pub amount: i64,
    /// The request's idempotency key.
    pub idempotency_key: &'a str,
    /// Its outcome.
    pub resolution: Resolution,
}

/// Inserts a bid together with its outcome; `received_at` and
/// `resolved_at` are both the transaction's `now()`. Fails with
/// [`key_taken`] when the key names a bid already.
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
                &bid.resolution.status.as_str(),
                &bid.resolution.reason,
                &bid.resolution.price_after,
                &bid.resolution.resolution_no,
                &bid.resolution.resolved_version,
            ],
        )
        .await?;
    BidRecord::from_row(&row)
}

/// Marks a bid leading before as outbid (the row-lock baseline, which
/// keeps every bid's status in its row, as the classic design does; the
/// `bids` view derives it either way).
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
