//! Webhook deliveries (see the `webhook_deliveries` migration): queuing
//! each URL's events from the log, claiming due deliveries under a lease,
//! recording each attempt's answer, replaying failed ones, pruning, and
//! the backlog the metrics show.

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Object};
use uuid::Uuid;

use super::events::Position;
use super::marketplace::{self, watermark, MarketEvent};

/// A delivery as an attempt needs it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The receiver.
    pub url: String,
    /// The event's row in the log.
    pub position: Position,
    /// The event's id: the `webhook-id` of every attempt.
    pub event_id: String,
    /// The event's type.
    pub event_type: String,
    /// When the event happened.
    pub event_at: DateTime<Utc>,
    /// The JSON body, as signed.
    pub body: String,
    /// Attempts so far, this one included.
    pub attempts: i32,
    /// The claim's token: the answer is recorded only while it holds.
    pub lease: Uuid,
}

/// One event rendered for delivery: its id and body.
pub struct Rendered {
    pub event_id: String,
    pub body: String,
}

/// Records the configured URLs; a new one starts at the oldest event kept.
pub async fn register(
    client: &impl GenericClient,
    urls: &[String],
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO webhook_endpoints (url, xid, auction_id, n) \
             SELECT u, '0'::xid8, '00000000-0000-0000-0000-000000000000', -1 \
             FROM unnest($1::text[]) AS u ON CONFLICT (url) DO NOTHING",
            &[&urls],
        )
        .await?;
    Ok(())
}

/// Queues for `url` at most `limit` events after its position, and moves
/// the position, in one transaction; nothing when another process holds
/// the URL. Returns how many were queued.
pub async fn fill(
    client: &mut Object,
    url: &str,
    limit: i64,
    render: impl Fn(&MarketEvent) -> Rendered,
) -> Result<usize, tokio_postgres::Error> {
    // Most steps find nothing new: find that out without locking (a row
    // lock would take a transaction id and write).
    if !has_new_events(&*client, url).await? {
        return Ok(0);
    }
    let tx = client.transaction().await?;
    let Some(row) = tx
        .query_opt(
            "SELECT xid::text::int8, auction_id, n FROM webhook_endpoints \
             WHERE url = $1 FOR UPDATE SKIP LOCKED",
            &[&url],
        )
        .await?
    else {
        return Ok(0);
    };
    let from = Position {
        xid: row.get(0),
        auction_id: row.get(1),
        n: row.get(2),
    };
    let (horizon, events) = marketplace::page(&tx, from, limit).await?;
    queue(&tx, url, &events, render).await?;
    // A short page read everything final: resume from the horizon.
    let to = match events.last() {
        Some(last) if events.len() as i64 == limit => last.position,
        _ => watermark(horizon).max(from),
    };
    tx.execute(
        "UPDATE webhook_endpoints SET xid = $2::int8::text::xid8, auction_id = $3, n = $4 \
         WHERE url = $1",
        &[&url, &to.xid, &to.auction_id, &to.n],
    )
    .await?;
    tx.commit().await?;
    Ok(events.len())
}

/// Whether the log has an event after `url`'s position that may be read.
async fn has_new_events(
    client: &impl GenericClient,
    url: &str,
) -> Result<bool, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM webhook_endpoints w JOIN events e \
               ON e.kind <> 'bids' AND (e.xid, e.auction_id, e.n) > (w.xid, w.auction_id, w.n) \
               AND e.xid < pg_snapshot_xmin(pg_current_snapshot()) \
             WHERE w.url = $1)",
        )
        .await?;
    Ok(client.query_one(&stmt, &[&url]).await?.get(0))
}

async fn queue(
    tx: &impl GenericClient,
    url: &str,
    events: &[MarketEvent],
    render: impl Fn(&MarketEvent) -> Rendered,
) -> Result<(), tokio_postgres::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let rendered: Vec<Rendered> = events.iter().map(render).collect();
    let xids: Vec<i64> = events.iter().map(|e| e.position.xid).collect();
    let auctions: Vec<Uuid> = events.iter().map(|e| e.position.auction_id).collect();
    let ns: Vec<i16> = events.iter().map(|e| e.position.n).collect();
    let types: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    let ats: Vec<DateTime<Utc>> = events.iter().map(|e| e.at).collect();
    let ids: Vec<&str> = rendered.iter().map(|r| r.event_id.as_str()).collect();
    let bodies: Vec<&str> = rendered.iter().map(|r| r.body.as_str()).collect();
    tx.execute(
        "INSERT INTO webhook_deliveries \
           (url, xid, auction_id, n, event_type, event_at, event_id, body) \
         SELECT $1, x::text::xid8, a, n, t, at, id, b \
         FROM unnest($2::int8[], $3::uuid[], $4::int2[], $5::text[], $6::timestamptz[], \
                     $7::text[], $8::text[]) AS q(x, a, n, t, at, id, b) \
         ON CONFLICT DO NOTHING",
        &[&url, &xids, &auctions, &ns, &types, &ats, &ids, &bodies],
    )
    .await?;
    Ok(())
}

/// Claims at most `limit` due deliveries of `url` for `lease`, oldest
/// first, skipping any whose auction has an earlier one still pending
/// (events of one auction go in order) or that another process holds.
pub async fn claim(
    client: &impl GenericClient,
    url: &str,
    limit: i64,
    lease: Duration,
) -> Result<Vec<Delivery>, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(
            "WITH due AS ( \
               SELECT d.url, d.xid, d.auction_id, d.n FROM webhook_deliveries d \
               WHERE d.status = 'pending' AND d.url = $1 AND d.next_attempt_at <= now() \
                 AND (d.lease_until IS NULL OR d.lease_until < now()) \
                 AND NOT EXISTS (SELECT 1 FROM webhook_deliveries e \
                   WHERE e.status = 'pending' AND e.url = d.url AND e.auction_id = d.auction_id \
                     AND (e.xid, e.n) < (d.xid, d.n)) \
               ORDER BY d.xid, d.auction_id, d.n LIMIT $2 FOR UPDATE SKIP LOCKED) \
             UPDATE webhook_deliveries w \
             SET lease = $3, lease_until = now() + $4 * interval '1 millisecond', \
                 attempts = w.attempts + 1 \
             FROM due WHERE (w.url, w.xid, w.auction_id, w.n) = (due.url, due.xid, due.auction_id, due.n) \
             RETURNING w.url, w.xid::text::int8, w.auction_id, w.n, w.event_id, w.event_type, \
                       w.event_at, w.body, w.attempts",
        )
        .await?;
    let token = Uuid::new_v4();
    let millis = lease.as_millis() as f64;
    let rows = client
        .query(&stmt, &[&url, &limit, &token, &millis])
        .await?;
    let mut claimed: Vec<Delivery> = rows
        .iter()
        .map(|row| Delivery {
            url: row.get(0),
            position: Position {
                xid: row.get(1),
                auction_id: row.get(2),
                n: row.get(3),
            },
            event_id: row.get(4),
            event_type: row.get(5),
            event_at: row.get(6),
            body: row.get(7),
            attempts: row.get(8),
            lease: token,
        })
        .collect();
    claimed.sort_by_key(|d| d.position);
    Ok(claimed)
}

/// How long until `url`'s next claimable delivery is due (zero when one
/// is due now), `None` when none is pending.
pub async fn next_due(
    client: &impl GenericClient,
    url: &str,
) -> Result<Option<Duration>, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(
            "SELECT extract(epoch FROM min(greatest(next_attempt_at, lease_until)) - now())::float8 \
             FROM webhook_deliveries d WHERE d.status = 'pending' AND d.url = $1 \
               AND NOT EXISTS (SELECT 1 FROM webhook_deliveries e \
                 WHERE e.status = 'pending' AND e.url = d.url AND e.auction_id = d.auction_id \
                   AND (e.xid, e.n) < (d.xid, d.n))",
        )
        .await?;
    let row = client.query_one(&stmt, &[&url]).await?;
    Ok(row
        .get::<_, Option<f64>>(0)
        .map(|s| Duration::from_secs_f64(s.max(0.0))))
}

/// What became of a delivery after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Acknowledged by the receiver.
    Delivered,
    /// Refused or unanswered; tried again later.
    Retrying,
    /// Refused for the whole retry period: given up.
    Failed,
    /// The lease was lost (another process took over); nothing recorded.
    LeaseLost,
}

/// Records an acknowledged delivery.
pub async fn delivered(
    client: &impl GenericClient,
    d: &Delivery,
) -> Result<Settled, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(
            "UPDATE webhook_deliveries SET status = 'delivered', finished_at = now(), \
               lease = NULL, lease_until = NULL, last_error = NULL \
             WHERE url = $1 AND xid = $2::int8::text::xid8 AND auction_id = $3 AND n = $4 \
               AND lease = $5 AND status = 'pending'",
        )
        .await?;
    let p = &d.position;
    let n = client
        .execute(&stmt, &[&d.url, &p.xid, &p.auction_id, &p.n, &d.lease])
        .await?;
    Ok(if n == 1 {
        Settled::Delivered
    } else {
        Settled::LeaseLost
    })
}

/// Records a refused attempt: tried again after `wait`, or failed once
/// `give_up_after` has passed since the delivery was queued.
pub async fn refused(
    client: &impl GenericClient,
    d: &Delivery,
    wait: Duration,
    give_up_after: Duration,
    error: &str,
) -> Result<Settled, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(
            "UPDATE webhook_deliveries SET \
               status = CASE WHEN now() >= created_at + $6 * interval '1 millisecond' \
                        THEN 'failed' ELSE 'pending' END, \
               finished_at = CASE WHEN now() >= created_at + $6 * interval '1 millisecond' \
                             THEN now() END, \
               next_attempt_at = now() + $7 * interval '1 millisecond', \
               lease = NULL, lease_until = NULL, last_error = $8 \
             WHERE url = $1 AND xid = $2::int8::text::xid8 AND auction_id = $3 AND n = $4 \
               AND lease = $5 AND status = 'pending' \
             RETURNING status",
        )
        .await?;
    let p = &d.position;
    let (give_up, wait) = (give_up_after.as_millis() as f64, wait.as_millis() as f64);
    let row = client
        .query_opt(
            &stmt,
            &[
                &d.url,
                &p.xid,
                &p.auction_id,
                &p.n,
                &d.lease,
                &give_up,
                &wait,
                &error,
            ],
        )
        .await?;
    Ok(match row.map(|r| r.get::<_, String>(0)).as_deref() {
        Some("failed") => Settled::Failed,
        Some(_) => Settled::Retrying,
        None => Settled::LeaseLost,
    })
}

/// Puts failed deliveries (of `url`, or of every URL) back in the queue
/// as new: due now, with a fresh retry period. Returns how many.
pub async fn replay_failed(
    client: &impl GenericClient,
    url: Option<&str>,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "UPDATE webhook_deliveries SET status = 'pending', attempts = 0, \
               created_at = now(), next_attempt_at = now(), finished_at = NULL \
             WHERE status = 'failed' AND ($1::text IS NULL OR url = $1)",
            &[&url],
        )
        .await
}

/// Deletes at most `batch` finished deliveries older than `keep`.
pub async fn prune_finished(
    client: &impl GenericClient,
    keep: Duration,
    batch: i64,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "DELETE FROM webhook_deliveries WHERE (url, xid, auction_id, n) IN ( \
               SELECT url, xid, auction_id, n FROM webhook_deliveries \
               WHERE status <> 'pending' \
                 AND finished_at < now() - $1 * interval '1 millisecond' LIMIT $2)",
            &[&(keep.as_millis() as f64), &batch],
        )
        .await
}

/// One URL's queue: deliveries waiting and the age of the oldest event
/// among them, in seconds (0 when none wait).
pub async fn backlog(
    client: &impl GenericClient,
    url: &str,
) -> Result<(i64, f64), tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT count(*), coalesce(extract(epoch FROM now() - min(event_at))::float8, 0) \
             FROM webhook_deliveries WHERE status = 'pending' AND url = $1",
            &[&url],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}
