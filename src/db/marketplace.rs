//! The marketplace's reading of the event log (see the `events` and
//! `events_marketplace` migrations): every kind but the bidders' `bids`
//! rows, in log order, only below the oldest transaction still running,
//! so a page never skips an event that commits late. Shared by the feed
//! and the webhook dispatcher: one log, several readers. Also the log's
//! retention ([`prune`]).

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde_json::Value;
use uuid::Uuid;

use super::events::Position;

/// Before every position: where a reader with no cursor starts.
pub const START: Position = Position {
    xid: 0,
    auction_id: Uuid::nil(),
    n: -1,
};

/// A position after every row of transactions below `horizon` and before
/// any row of a later one: safe to resume from once those are read.
pub fn watermark(horizon: i64) -> Position {
    Position {
        xid: horizon,
        auction_id: Uuid::nil(),
        n: -1,
    }
}

/// One marketplace event as the log stores it.
#[derive(Debug, Clone)]
pub struct MarketEvent {
    /// Where it stands in the log (its id derives from this).
    pub position: Position,
    /// Its type, e.g. `auction.settled`.
    pub kind: String,
    /// When its transaction ran.
    pub at: DateTime<Utc>,
    /// Its `data`.
    pub data: Value,
}

/// The oldest transaction still running, and at most `limit` marketplace
/// events after `after` from transactions below it, in log order.
pub async fn page(
    client: &impl GenericClient,
    after: Position,
    limit: i64,
) -> Result<(i64, Vec<MarketEvent>), tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(
            "WITH h AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin) \
             SELECT h.xmin::text::int8, e.xid::text::int8, e.auction_id, e.n, e.kind, e.at, \
                    e.data \
             FROM h LEFT JOIN LATERAL ( \
               SELECT * FROM events \
               WHERE kind <> 'bids' \
                 AND (xid, auction_id, n) > ($1::int8::text::xid8, $2, $3) \
                 AND xid < h.xmin \
               ORDER BY xid, auction_id, n LIMIT $4) e ON true",
        )
        .await?;
    let rows = client
        .query(&stmt, &[&after.xid, &after.auction_id, &after.n, &limit])
        .await?;
    let horizon = rows.first().map_or(after.xid, |row| row.get(0));
    let events = rows
        .iter()
        .filter(|row| row.get::<_, Option<i64>>(1).is_some())
        .map(market_event)
        .collect::<Result<_, _>>()?;
    Ok((horizon, events))
}

/// Whether a reader may resume from `position`: a watermark at or below
/// the current horizon, or a marketplace event still in the log.
pub async fn knows(
    client: &impl GenericClient,
    position: Position,
) -> Result<bool, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(
            "SELECT CASE WHEN $3::int2 < 0 AND $2::uuid = '00000000-0000-0000-0000-000000000000' \
                    THEN $1::int8 <= pg_snapshot_xmin(pg_current_snapshot())::text::int8 \
                    ELSE EXISTS (SELECT 1 FROM events WHERE kind <> 'bids' \
                      AND xid = $1::int8::text::xid8 AND auction_id = $2 AND n = $3) END",
        )
        .await?;
    let row = client
        .query_one(&stmt, &[&position.xid, &position.auction_id, &position.n])
        .await?;
    Ok(row.get(0))
}

fn market_event(row: &tokio_postgres::Row) -> Result<MarketEvent, tokio_postgres::Error> {
    Ok(MarketEvent {
        position: Position {
            xid: row.try_get(1)?,
            auction_id: row.try_get(2)?,
            n: row.try_get(3)?,
        },
        kind: row.try_get(4)?,
        at: row.try_get(5)?,
        data: row.try_get::<_, Option<Value>>(6)?.unwrap_or(Value::Null),
    })
}

/// Deletes at most `batch` of the oldest log rows (any kind) older than
/// `keep` and before every position in `urls`' queues, so no configured
/// URL loses an event it has not queued yet. Returns how many.
pub async fn prune(
    client: &impl GenericClient,
    keep: std::time::Duration,
    urls: &[String],
    batch: i64,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "DELETE FROM events WHERE (xid, auction_id, n) IN ( \
               SELECT xid, auction_id, n FROM events \
               WHERE xid < coalesce((SELECT min(xid) FROM webhook_endpoints \
                                     WHERE url = ANY($2)), '18446744073709551615'::xid8) \
               ORDER BY xid, auction_id, n LIMIT $3) \
             AND at < now() - $1 * interval '1 millisecond'",
            &[&(keep.as_millis() as f64), &urls, &batch],
        )
        .await
}
