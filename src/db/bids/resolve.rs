//! The resolver's queries: the pending bids (which auctions have some,
//! the next of each, found by the transactions that wrote them: see
//! [`Progress`]), the outcome writes of its transaction (into `bid_log`,
//! displaced leaders; settlement is in [`crate::db::events`]).
//!
//! Each statement's plan must not depend on statistics that lag a hot
//! auction by a whole burst: the comments say how each one avoids that.

use std::sync::LazyLock;

use deadpool_postgres::GenericClient;
use uuid::Uuid;

use super::{BidRecord, Resolution, COLUMNS};

/// A pending bid as the resolver read it inside its transaction.
pub struct PendingBid {
    /// The bid.
    pub bid: BidRecord,
    /// Where the row version read lives (`bid_log.ctid`, as text): the
    /// outcome write finds the row by it, whatever the statistics say.
    /// Only meaningful inside the transaction that read it.
    pub row_version: String,
    /// The transaction that appended it (`bid_log.xid`).
    pub xid: i64,
    /// Whether it lies at or before its auction's progress, written by one
    /// of the transactions left open there ([`Progress::open_xids`]).
    pub reopened: bool,
}

/// How far the resolver has come through an auction's bids: every bid at
/// or before (`xid`, `seq`) in (transaction, sequence) order is resolved,
/// except those of the transactions in `open_xids`. Stored on the auction
/// row and written by the resolver's compare-and-set.
///
/// Why no bid is skipped: the resolver reads bids in one statement, under
/// one snapshot, and only visible bids are read. Every transaction id
/// below the snapshot's `xmax` that is not in its list of transactions in
/// progress has ended, so its bids are visible (or were rolled back); a
/// transaction in progress, or one that gets its id later (ids are handed
/// out in increasing order when a transaction first writes), is either in
/// that list or above `xmax`. The resolver moves the progress only over a
/// prefix of what it read and applied, so every bid at or before the new
/// position is resolved, except bids of transactions the snapshot saw in
/// progress below it: those go to `open_xids`, with any transaction whose
/// bids read there were not all applied. A transaction that rolled back
/// leaves the list at the next move. Bids resolved beyond the progress
/// (held back before them, applied after) are read again and skipped by
/// their status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// The transaction of the last bid passed.
    pub xid: i64,
    /// Its sequence number.
    pub seq: i64,
    /// Transactions that may still hold bids at or before the position,
    /// all below `xid`.
    pub open_xids: Vec<i64>,
}

/// What [`pending`] read: the bids, and the transactions its snapshot saw
/// in progress.
pub struct PendingRead {
    /// Per auction, the first bids after its progress (at most `limit`) in
    /// (transaction, sequence) order, then the pending bids of its open
    /// transactions.
    pub bids: Vec<PendingBid>,
    /// The transactions in progress in the snapshot that read them
    /// (empty when no bid was read).
    pub in_progress: Vec<i64>,
}

/// The bids not yet resolved of an auction `a`, as two sources of its bids
/// `b` (each a `FROM` list with its `WHERE`): those after its progress, one
/// index range scan, and those of its open transactions, one index probe
/// per transaction. The open transactions are all below the progress's
/// transaction, so the two never overlap (see [`Progress`]). A subquery
/// per open transaction (`OFFSET 0` keeps it one) stays a probe whatever
/// the statistics: as a condition `b.xid = ANY(a.open_xids)`, or as a
/// join, a generic plan made on a young table scanned the auction's whole
/// log.
pub const UNRESOLVED: [&str; 2] = [
    "bid_log b WHERE b.auction_id = a.id \
     AND (b.xid, b.seq) > (a.resolved_xid, a.resolved_seq) AND b.status = 'pending'",
    "unnest(a.open_xids) AS o(xid) CROSS JOIN LATERAL (SELECT *, ctid FROM bid_log \
       WHERE auction_id = a.id AND xid = o.xid AND status = 'pending' OFFSET 0) b",
];

/// The bids not yet resolved of each auction `a` as one lateral subquery
/// of `columns` (of its bids `b`): the two sources of [`UNRESOLVED`].
pub fn unresolved(columns: &str) -> String {
    let [after, open] = UNRESOLVED;
    format!("(SELECT {columns} FROM {after} UNION ALL SELECT {columns} FROM {open})")
}

/// How long after its settlement an auction is still looked at for bids not
/// yet resolved (by the resolver's scan and the backlog it reports).
pub const SETTLED_LATELY: std::time::Duration = std::time::Duration::from_secs(600);

/// [`COLUMNS`] of the bids `b`.
fn qualified_columns() -> String {
    COLUMNS
        .split(',')
        .map(|c| format!("b.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The pending bids of each of `auction_ids` the resolver applies next
/// (see [`PendingRead`]), found by the transactions that wrote them (see
/// [`Progress`]). The snapshot's transactions in progress come from the
/// same statement, so from the same snapshot.
pub async fn pending(
    client: &impl GenericClient,
    auction_ids: &[Uuid],
    limit: i64,
) -> Result<PendingRead, tokio_postgres::Error> {
    // Per auction, its row by key (`OFFSET 0` keeps the lookup a subquery,
    // so no plan scans the auctions), then the two sources of UNRESOLVED:
    // after the progress in order, up to the limit, and the open
    // transactions' bids (few). One plan whatever the statistics, so it
    // serves as a generic plan (see the resolver's `plan_modes`).
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH snapshot AS MATERIALIZED ( \
               SELECT ARRAY(SELECT x::text::int8 FROM pg_snapshot_xip(pg_current_snapshot()) x) \
                 AS in_progress) \
             SELECT p.*, snapshot.in_progress FROM unnest($1::uuid[]) AS u(id) \
             CROSS JOIN LATERAL (SELECT id, resolved_xid, resolved_seq, open_xids \
                                 FROM auctions WHERE id = u.id OFFSET 0) a \
             CROSS JOIN LATERAL ( \
               (SELECT {columns}, b.xid, b.ctid::text AS row_version, false AS reopened \
                FROM {after} ORDER BY b.xid, b.seq LIMIT $2) \
               UNION ALL \
               (SELECT {columns}, b.xid, b.ctid::text, true FROM {open})) p \
             CROSS JOIN snapshot",
            columns = qualified_columns(),
            after = UNRESOLVED[0],
            open = UNRESOLVED[1],
        )
    });
    let stmt = client.prepare_cached(&SQL).await?;
    let rows = client.query(&stmt, &[&auction_ids, &limit]).await?;
    let in_progress = match rows.first() {
        Some(row) => row.try_get("in_progress")?,
        None => Vec::new(),
    };
    let bids = rows
        .iter()
        .map(|row| {
            Ok(PendingBid {
                bid: BidRecord::from_row(row)?,
                row_version: row.try_get("row_version")?,
                xid: row.try_get("xid")?,
                reopened: row.try_get("reopened")?,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()?;
    Ok(PendingRead { bids, in_progress })
}

/// Auctions that have bids not yet resolved (see [`Progress`]), at most
/// `limit`: every open auction, and those settled within `recent`, or
/// every auction when `recent` is `None` (a bid can still reach a settled
/// auction whose closing a process has not seen yet; the resolver rejects
/// it).
///
/// One or two index probes per auction, however many bids a hot auction
/// has waiting.
pub async fn auctions_with_pending(
    client: &impl GenericClient,
    recent: Option<std::time::Duration>,
    limit: i64,
) -> Result<Vec<Uuid>, tokio_postgres::Error> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT a.id FROM auctions a \
             WHERE ($1::float8 IS NULL OR a.status = 'open' \
                    OR a.settled_at > now() - make_interval(secs => $1::float8)) \
               AND (EXISTS (SELECT 1 FROM {}) \
                    OR EXISTS (SELECT 1 FROM {})) \
             LIMIT $2",
            UNRESOLVED[0], UNRESOLVED[1],
        )
    });
    let stmt = client.prepare_cached(&SQL).await?;
    let recent = recent.map(|r| r.as_secs_f64());
    let rows = client.query(&stmt, &[&recent, &limit]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The resolver's outcome for one pending bid, as its transaction writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BidOutcome<'a> {
    /// The auction of the bid.
    pub auction_id: Uuid,
    /// The bid id.
    pub id: Uuid,
    /// Where the bid's row version lives ([`PendingBid::row_version`]).
    pub row_version: &'a str,
    /// What the bid's row gets.
    pub resolution: Resolution,
}

/// Writes the outcomes of pending bids; returns how many rows were still
/// pending (the caller aborts the transaction if that is not all of them).
///
/// No index of `bid_log` covers an outcome column, so each outcome is a
/// HOT update: a new version on the same page, no index entry written.
///
/// Each outcome names the row version the resolver read in this
/// transaction, and the join fetches exactly that tuple (a TID scan per
/// outcome), so the plan does not depend on statistics, which lag a hot
/// auction by hundreds of thousands of bids in its final minutes: looked
/// up by auction and id, or by a list of row versions, the planner chose
/// scans of the auction's whole log, or of the whole list, per outcome.
///
/// The id and the pending status are checked again: a version that changed
/// since the read is not written, and the count tells the caller.
pub async fn record_outcomes(
    client: &impl GenericClient,
    outcomes: &[BidOutcome<'_>],
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
    // The statement takes one array per column.
    let row_versions: Vec<&str> = outcomes.iter().map(|o| o.row_version).collect();
    let ids: Vec<Uuid> = outcomes.iter().map(|o| o.id).collect();
    let resolutions = || outcomes.iter().map(|o| &o.resolution);
    let statuses: Vec<&str> = resolutions().map(|r| r.status.as_str()).collect();
    let reasons: Vec<Option<&str>> = resolutions().map(|r| r.reason).collect();
    let prices: Vec<Option<i64>> = resolutions().map(|r| r.price_after).collect();
    let resolution_nos: Vec<i64> = resolutions().map(|r| r.resolution_no).collect();
    let versions: Vec<i64> = resolutions().map(|r| r.resolved_version).collect();
    client
        .execute(
            &stmt,
            &[
                &row_versions,
                &ids,
                &statuses,
                &reasons,
                &prices,
                &resolution_nos,
                &versions,
            ],
        )
        .await
}

/// Marks a previously leading bid as outbid.
///
/// One statement per bid, looked up by key: the resolver sends one for
/// each auction of a group whose leader was outbid, all in one round trip.
/// One statement over arrays of bids, joined to `bid_log`, ran on a
/// generic plan that scanned the log.
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
