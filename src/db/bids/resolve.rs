//! The resolver's queries: the pending bids (which auctions have some,
//! the next of each, found by the transactions that wrote them: see
//! [`Progress`]) and the outcome record of each batch (`bid_outcomes`;
//! settlement is in [`crate::db::events`]).
//!
//! Each statement's plan must not depend on statistics that lag a hot
//! auction by a whole burst: the comments say how each one avoids that.

use std::sync::LazyLock;

use deadpool_postgres::GenericClient;
use uuid::Uuid;

use super::{BidRecord, Resolution};

/// A pending bid as the resolver read it inside its transaction.
pub struct PendingBid {
    /// The bid.
    pub bid: BidRecord,
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
/// leaves the list at the next move. Bids applied that the position has
/// not passed (applied after one held back before them, or of a
/// transaction still open) are listed in `ahead` and not read again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// The transaction of the last bid passed.
    pub xid: i64,
    /// Its sequence number.
    pub seq: i64,
    /// Transactions that may still hold bids at or before the position,
    /// all below `xid`.
    pub open_xids: Vec<i64>,
    /// Bids applied that lie after the position or belong to a transaction
    /// of `open_xids`, as (transaction, sequence), in that order.
    pub ahead: Vec<(i64, i64)>,
}

impl Progress {
    /// The progress stored on an auction's row.
    pub(crate) fn from_row(row: &tokio_postgres::Row) -> Result<Self, tokio_postgres::Error> {
        let ahead_xids: Vec<i64> = row.try_get("ahead_xids")?;
        let ahead_seqs: Vec<i64> = row.try_get("ahead_seqs")?;
        Ok(Progress {
            xid: row.try_get("resolved_xid")?,
            seq: row.try_get("resolved_seq")?,
            open_xids: row.try_get("open_xids")?,
            ahead: ahead_xids.into_iter().zip(ahead_seqs).collect(),
        })
    }

    /// Whether the bid at (`xid`, `seq`) is still looked at: after the
    /// position, or of a transaction left open.
    pub fn covers(&self, xid: i64, seq: i64) -> bool {
        (xid, seq) > (self.xid, self.seq) || self.open_xids.contains(&xid)
    }
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
/// log. Bids already applied there are in `a.ahead_seqs` (see
/// [`Progress::ahead`]); rows written with their outcome are not pending.
pub const UNRESOLVED: [&str; 2] = [
    "bid_log b WHERE b.auction_id = a.id \
     AND (b.xid, b.seq) > (a.resolved_xid, a.resolved_seq) AND b.status = 'pending' \
     AND b.seq <> ALL(a.ahead_seqs)",
    "unnest(a.open_xids) AS o(xid) CROSS JOIN LATERAL (SELECT * FROM bid_log \
       WHERE auction_id = a.id AND xid = o.xid AND status = 'pending' \
         AND seq <> ALL(a.ahead_seqs) OFFSET 0) b",
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

/// What the resolver reads of a pending bid `b`: what the rules need.
const PENDING_COLUMNS: &str =
    "b.auction_id, b.id, b.seq, b.bidder_id, b.amount, b.received_at, b.xid";

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
             CROSS JOIN LATERAL (SELECT id, resolved_xid, resolved_seq, open_xids, ahead_seqs \
                                 FROM auctions WHERE id = u.id OFFSET 0) a \
             CROSS JOIN LATERAL ( \
               (SELECT {columns}, false AS reopened FROM {after} ORDER BY b.xid, b.seq LIMIT $2) \
               UNION ALL \
               (SELECT {columns}, true FROM {open})) p \
             CROSS JOIN snapshot",
            columns = PENDING_COLUMNS,
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
                bid: BidRecord::pending(
                    (
                        row.try_get("auction_id")?,
                        row.try_get("id")?,
                        row.try_get("seq")?,
                    ),
                    row.try_get("bidder_id")?,
                    row.try_get("amount")?,
                    row.try_get("received_at")?,
                ),
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

/// The resolver's outcome for one pending bid, as its transaction records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BidOutcome {
    /// The auction of the bid.
    pub auction_id: Uuid,
    /// The bid id.
    pub id: Uuid,
    /// Its sequence number (`bid_log.seq`).
    pub seq: i64,
    /// Its outcome.
    pub resolution: Resolution,
}

/// Records the outcomes of one auction's batch (at least one, in
/// resolution order) as its `bid_outcomes` row, written with the auction's
/// `version`: one row whatever the number of bids. Each bid's status
/// follows from it and the auction row (the `bids` view).
pub async fn record_batch(
    client: &impl GenericClient,
    auction_id: Uuid,
    version: i64,
    outcomes: &[BidOutcome],
) -> Result<u64, tokio_postgres::Error> {
    let Some(first) = outcomes.first() else {
        return Ok(0);
    };
    let stmt = client
        .prepare_cached(
            "INSERT INTO bid_outcomes (auction_id, version, first_seq, last_seq, first_no, \
             seqs, reasons, prices) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .await?;
    let seqs: Vec<i64> = outcomes.iter().map(|o| o.seq).collect();
    let reasons: Vec<Option<&str>> = outcomes.iter().map(|o| o.resolution.reason).collect();
    let prices: Vec<Option<i64>> = outcomes.iter().map(|o| o.resolution.price_after).collect();
    let first_seq = seqs.iter().copied().min().unwrap_or(first.seq);
    let last_seq = seqs.iter().copied().max().unwrap_or(first.seq);
    client
        .execute(
            &stmt,
            &[
                &auction_id,
                &version,
                &first_seq,
                &last_seq,
                &first.resolution.resolution_no,
                &seqs,
                &reasons,
                &prices,
            ],
        )
        .await
}
