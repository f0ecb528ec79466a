//! The bid paths' writes: the log path's one-statement append of a batch
//! of coalesced bids with their idempotency keys (and the look-up of keys
//! already used), and the row-lock baseline's key claim and insert of a bid
//! already resolved. The append touches only `bid_log` and
//! `idempotency_keys`; it never reads, locks or references the `auctions`
//! row.

use std::collections::HashMap;

use deadpool_postgres::GenericClient;
use tokio_postgres::types::{PgLsn, ToSql};
use uuid::Uuid;

use super::{BidRecord, Resolution, COLUMNS};
use crate::db::reads;

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
/// itself, with the id of the transaction that writes it, by which the
/// resolver finds it (see [`super::Progress`]). A bid whose key the bidder already used is skipped; returns the
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
             INSERT INTO bid_log (auction_id, id, bidder_id, amount, idempotency_key, xid) \
             SELECT i.auction_id, i.id, i.bidder_id, i.amount, i.key, \
                    pg_current_xact_id()::text::int8 \
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
    /// Its outcome.
    pub resolution: Resolution,
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
