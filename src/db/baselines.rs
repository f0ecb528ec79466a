//! The statements of two load-test baselines that write a bid in one
//! statement, so in one round trip with its commit:
//! [`place_bid_in_function`] calls `gavel_place_bid`, the row-lock
//! transaction as a PL/pgSQL function (`bidding::row_lock_fn`); and
//! [`write_if_unchanged`] is the optimistic baseline's compare-and-set
//! together with everything the bid writes (`bidding::optimistic`).
//! Both pipeline the read of the WAL position behind their statement.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::types::{PgLsn, ToSql};
use uuid::Uuid;

use super::auctions::StateUpdate;
use super::bids::{key_taken, BidRecord, Resolution, COLUMNS};
use super::events::BidChange;
use super::reads;

/// What `gavel_place_bid` did.
#[derive(Debug)]
pub enum FunctionPlacement {
    /// The bid is in the log with its outcome; the auction's new version.
    Placed { bid: BidRecord, version: i64 },
    /// The bidder already used the key on the auction: the bid it names.
    /// Nothing was written.
    KeyExists(BidRecord),
    /// No such auction.
    NoAuction,
}

/// Places a bid with `gavel_place_bid` (see its migration): one statement
/// in its own transaction.
pub async fn place_bid_in_function(
    client: &impl GenericClient,
    bid: &BidRequest<'_>,
) -> Result<(FunctionPlacement, Option<PgLsn>), tokio_postgres::Error> {
    let stmt = client
        .prepare_cached("SELECT * FROM gavel_place_bid($1, $2, $3, $4, $5)")
        .await?;
    let params: [&(dyn ToSql + Sync); 5] = [
        &bid.auction_id,
        &bid.id,
        &bid.bidder_id,
        &bid.key,
        &bid.amount,
    ];
    let (row, position) = reads::with_wal_position(client, client.query_one(&stmt, &params)).await;
    let row = row?;
    let placement = match row.try_get::<_, &str>("result")? {
        "placed" => FunctionPlacement::Placed {
            bid: BidRecord::from_row(&row)?,
            version: row.try_get("version")?,
        },
        "replay" => FunctionPlacement::KeyExists(BidRecord::from_row(&row)?),
        _ => FunctionPlacement::NoAuction,
    };
    Ok((placement, position))
}

/// What a bid request asked for, with the id its bid gets.
#[derive(Debug, Clone, Copy)]
pub struct BidRequest<'a> {
    /// The auction bid on.
    pub auction_id: Uuid,
    /// The new bid's id.
    pub id: Uuid,
    /// The bidder.
    pub bidder_id: &'a str,
    /// The request's idempotency key.
    pub key: &'a str,
    /// The bidder's maximum.
    pub amount: i64,
}

/// Everything one optimistic bid writes, decided from one read of its
/// auction.
pub struct OptimisticWrite<'a> {
    /// The auction's new state, written only if its version is unchanged.
    pub update: StateUpdate<'a>,
    /// The bid.
    pub bid: &'a BidRequest<'a>,
    /// The clock the rules were applied at: the bid's `received_at`.
    pub received_at: DateTime<Utc>,
    /// The bid's outcome.
    pub resolution: Resolution,
    /// The leading bid it displaced, now outbid.
    pub displaced: Option<Uuid>,
    /// The event row's entries.
    pub changes: &'a [BidChange<'a>],
}

/// What [`write_if_unchanged`] did.
#[derive(Debug)]
pub enum Written {
    /// Everything was written and committed: the bid as stored.
    Placed(BidRecord),
    /// The auction's version moved since it was read: nothing was written.
    Conflict,
    /// The bidder's key on the auction was taken meanwhile: nothing was
    /// written.
    KeyTaken,
}

/// The optimistic baseline's write, one statement (one transaction): the
/// compare-and-set on the auction's version, and only if it wins the bid
/// with its key and outcome, the displaced leader's mark and the event
/// row. A key taken by a concurrent request fails the statement on the
/// key's unique index (and so undoes the compare-and-set) once that
/// request commits.
pub async fn write_if_unchanged(
    client: &impl GenericClient,
    write: &OptimisticWrite<'_>,
) -> Result<(Written, Option<PgLsn>), tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(&format!(
            "WITH cas AS ( \
               UPDATE auctions SET leader_bid_id = $3, leader_bidder_id = $4, leader_max = $5, \
                      current_price = $6, bid_count = $7, ends_at = $8, resolved_count = $9, \
                      version = version + 1 \
               WHERE id = $1 AND version = $2 RETURNING id), \
             outbid AS ( \
               UPDATE bid_log SET status = 'outbid' \
               WHERE auction_id = $1 AND id = $17 AND status = 'leading' \
                 AND EXISTS (SELECT FROM cas)), \
             recorded AS ( \
               INSERT INTO events (auction_id, n, kind, bid_ids, bidders, statuses, version) \
               SELECT $1::uuid, 0, 'bids', $18::uuid[], $19::text[], $20::text[], $2::int8 + 1 \
               FROM cas) \
             INSERT INTO bid_log (auction_id, id, bidder_id, amount, idempotency_key, \
                    received_at, status, reason, price_after, resolution_no, resolved_version, \
                    resolved_at) \
             SELECT $1::uuid, $10::uuid, $11::text, $13::int8, $12::text, $14::timestamptz, $15::text, \
                    $16::text, $6::int8, $9::int8, $2::int8 + 1, now() \
             FROM cas RETURNING {COLUMNS}"
        ))
        .await?;
    let (update, bid, resolution) = (&write.update, write.bid, &write.resolution);
    let leader = update.state.leader.as_ref();
    let bid_ids: Vec<Uuid> = write.changes.iter().map(|c| c.bid_id).collect();
    let bidders: Vec<&str> = write.changes.iter().map(|c| c.bidder_id).collect();
    let statuses: Vec<&str> = write.changes.iter().map(|c| c.status.as_str()).collect();
    let params: [&(dyn ToSql + Sync); 20] = [
        &update.id,
        &update.expected_version,
        &leader.map(|l| l.bid_id),
        &leader.map(|l| l.bidder_id.as_str()),
        &leader.map(|l| l.max_amount),
        &update.state.price,
        &update.state.bid_count,
        &update.state.ends_at,
        &update.resolved_count,
        &bid.id,
        &bid.bidder_id,
        &bid.key,
        &bid.amount,
        &write.received_at,
        &resolution.status.as_str(),
        &resolution.reason,
        &write.displaced,
        &bid_ids,
        &bidders,
        &statuses,
    ];
    let (rows, position) = reads::with_wal_position(client, client.query(&stmt, &params)).await;
    let written = match rows {
        Ok(rows) => match rows.first() {
            Some(row) => Written::Placed(BidRecord::from_row(row)?),
            None => Written::Conflict,
        },
        Err(e) if key_taken(&e) => Written::KeyTaken,
        Err(e) => return Err(e),
    };
    Ok((written, position))
}
