//! The event log (`events`, see its migration): bid status changes and
//! settlements, written in the transaction that makes them, and read in
//! transaction-id order only below the oldest transaction still running,
//! so a reader never skips a row that commits late.

use deadpool_postgres::GenericClient;
use serde_json::Value;
use uuid::Uuid;

use super::bids::{BidRecord, COLUMNS};
use crate::domain::BidStatus;

/// One bid's new status, as an event row records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BidChange<'a> {
    /// The bid.
    pub bid_id: Uuid,
    /// Its bidder.
    pub bidder_id: &'a str,
    /// What it became.
    pub status: BidStatus,
}

/// Where a row stands in the log: its transaction, its auction, and its
/// place among that transaction's rows for the auction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// The writing transaction's id (`xid8`, which fits an `i64`).
    pub xid: i64,
    /// The auction.
    pub auction_id: Uuid,
    /// The row's place in its transaction for this auction.
    pub n: i16,
}

/// A row of the log, as the bidders' streams read it.
#[derive(Debug, Clone)]
pub struct EventRow {
    /// Where the row stands.
    pub position: Position,
    /// The bids changed, their bidders and new statuses, entry by entry.
    pub bid_ids: Vec<Uuid>,
    pub bidders: Vec<String>,
    pub statuses: Vec<String>,
}

/// Records the bid changes of `auction_id` in the calling transaction, as
/// its `n`th row for the auction, which makes the auction's `version`;
/// nothing when there are none.
pub async fn record_bid_changes(
    client: &impl GenericClient,
    auction_id: Uuid,
    n: i16,
    version: i64,
    changes: &[BidChange<'_>],
) -> Result<u64, tokio_postgres::Error> {
    if changes.is_empty() {
        return Ok(0);
    }
    let stmt = client
        .prepare_cached(
            "INSERT INTO events (auction_id, n, kind, bid_ids, bidders, statuses, version) \
             VALUES ($1, $2, 'bids', $3, $4, $5, $6)",
        )
        .await?;
    let bid_ids: Vec<Uuid> = changes.iter().map(|c| c.bid_id).collect();
    let bidders: Vec<&str> = changes.iter().map(|c| c.bidder_id).collect();
    let statuses: Vec<&str> = changes.iter().map(|c| c.status.as_str()).collect();
    client
        .execute(
            &stmt,
            &[&auction_id, &n, &bid_ids, &bidders, &statuses, &version],
        )
        .await
}

/// Records the settlement of `auction_id`'s bids, in one statement: the
/// `auction.settled` row (its `n`th for the auction in this transaction,
/// which makes the auction's `version`) lists every live bid, the winning
/// one `won` and the others `lost`, with the marketplace's `data`. No bid
/// row changes: the `bids` view derives both from the settled auction.
///
/// The live bids are those the resolver's batches accepted (each looked up
/// by its sequence number) and those written with their outcome (the
/// row-lock baselines and bids resolved before outcomes were kept per
/// batch), which are the auction's rows without a transaction id.
pub async fn settle(
    client: &impl GenericClient,
    auction_id: Uuid,
    n: i16,
    version: i64,
    winning_bid: Option<Uuid>,
    data: &Value,
) -> Result<u64, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(
            "WITH live AS ( \
               SELECT b.id, b.bidder_id FROM bid_outcomes o \
               CROSS JOIN LATERAL unnest(o.seqs, o.reasons) AS u(seq, reason) \
               CROSS JOIN LATERAL (SELECT id, bidder_id FROM bid_log \
                                   WHERE auction_id = o.auction_id AND seq = u.seq OFFSET 0) b \
               WHERE o.auction_id = $1 AND u.reason IS NULL \
               UNION ALL \
               SELECT id, bidder_id FROM bid_log \
               WHERE auction_id = $1 AND xid IS NULL AND status IN ('leading', 'outbid')) \
             INSERT INTO events (auction_id, n, kind, bid_ids, bidders, statuses, data, version) \
             SELECT $1, $2, 'auction.settled', \
                    coalesce(array_agg(id ORDER BY id), '{}'), \
                    coalesce(array_agg(bidder_id ORDER BY id), '{}'), \
                    coalesce(array_agg(CASE WHEN id = $3 THEN 'won' ELSE 'lost' END ORDER BY id), \
                             '{}'), \
                    $4, $5 \
             FROM live",
        )
        .await?;
    client
        .execute(&stmt, &[&auction_id, &n, &winning_bid, data, &version])
        .await
}

/// The oldest transaction still running: every row below it is final.
pub async fn horizon(client: &impl GenericClient) -> Result<i64, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::int8")
        .await?;
    Ok(client.query_one(&stmt, &[]).await?.get(0))
}

/// The oldest transaction still running, and the rows of transactions
/// from `from` up to it: every row below it is final.
pub async fn read_from(
    client: &impl GenericClient,
    from: i64,
) -> Result<(i64, Vec<EventRow>), tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(
            "WITH h AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin) \
             SELECT h.xmin::text::int8, e.xid::text::int8, e.auction_id, e.n, \
                    e.bid_ids, e.bidders, e.statuses \
             FROM h LEFT JOIN events e \
               ON e.xid >= $1::int8::text::xid8 AND e.xid < h.xmin \
             ORDER BY e.xid, e.auction_id, e.n",
        )
        .await?;
    let rows = client.query(&stmt, &[&from]).await?;
    let horizon = rows.first().map_or(from, |row| row.get(0));
    let events = rows
        .iter()
        .filter(|row| row.get::<_, Option<i64>>(1).is_some())
        .map(|row| event_row(row, 1))
        .collect::<Result<_, _>>()?;
    Ok((horizon, events))
}

/// The rows changing a bid of `bidder_id` from `from` on (that row
/// included) and below transaction `below`, in order.
pub async fn bidder_rows(
    client: &impl GenericClient,
    bidder_id: &str,
    from: Position,
    below: i64,
) -> Result<Vec<EventRow>, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(
            "SELECT xid::text::int8, auction_id, n, bid_ids, bidders, statuses FROM events \
             WHERE bidders @> ARRAY[$1::text] \
               AND (xid, auction_id, n) >= ($2::int8::text::xid8, $3, $4) \
               AND xid < $5::int8::text::xid8 \
             ORDER BY xid, auction_id, n",
        )
        .await?;
    let rows = client
        .query(
            &stmt,
            &[&bidder_id, &from.xid, &from.auction_id, &from.n, &below],
        )
        .await?;
    rows.iter().map(|row| event_row(row, 0)).collect()
}

/// Whether the row at `position` is still in the log.
pub async fn exists(
    client: &impl GenericClient,
    position: Position,
) -> Result<bool, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM events \
             WHERE xid = $1::int8::text::xid8 AND auction_id = $2 AND n = $3)",
        )
        .await?;
    let row = client
        .query_one(&stmt, &[&position.xid, &position.auction_id, &position.n])
        .await?;
    Ok(row.get(0))
}

/// The bids named by `keys` (auction, bid), in any order, as readers see
/// them (the `bids` view).
pub async fn bids(
    client: &impl GenericClient,
    keys: &[(Uuid, Uuid)],
) -> Result<Vec<BidRecord>, tokio_postgres::Error> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM bids \
             WHERE (auction_id, id) IN (SELECT * FROM unnest($1::uuid[], $2::uuid[]))"
        ))
        .await?;
    let auctions: Vec<Uuid> = keys.iter().map(|k| k.0).collect();
    let ids: Vec<Uuid> = keys.iter().map(|k| k.1).collect();
    let rows = client.query(&stmt, &[&auctions, &ids]).await?;
    rows.iter().map(BidRecord::from_row).collect()
}

fn event_row(row: &tokio_postgres::Row, at: usize) -> Result<EventRow, tokio_postgres::Error> {
    Ok(EventRow {
        position: Position {
            xid: row.try_get(at)?,
            auction_id: row.try_get(at + 1)?,
            n: row.try_get(at + 2)?,
        },
        bid_ids: row.try_get(at + 3)?,
        bidders: row.try_get(at + 4)?,
        statuses: row.try_get(at + 5)?,
    })
}
