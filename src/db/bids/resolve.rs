//! The resolver's queries: its queue of pending bids (which auctions have
//! some, the oldest of each), the outcome writes of its transaction (off
//! the queue, into `bid_log`, displaced leaders; settlement is in
//! [`crate::db::events`]), and its
//! housekeeping (vacuuming the queue, purging expired idempotency keys).
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
    // `plan_modes`).
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

/// The resolver's outcome for one pending bid, as its transaction writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BidOutcome<'a> {
    /// The auction of the bid.
    pub auction_id: Uuid,
    /// The bid's sequence number (its key in the queue of pending bids).
    pub seq: i64,
    /// The bid id.
    pub id: Uuid,
    /// Where the bid's row version lives ([`PendingBid::row_version`]).
    pub row_version: &'a str,
    /// What the bid's row gets.
    pub resolution: Resolution,
}

/// Takes the bids of `outcomes` off the queue of pending bids, in the
/// resolver's transaction that writes their outcomes; returns how many were
/// still queued (the caller aborts the transaction if that is not all).
///
/// The range of the sequence numbers bounds the index scan: the queue's
/// statistics lag its contents by a whole burst, and without the range a
/// planner that believes an auction has few queued bids reads all of them.
pub async fn dequeue(
    client: &impl GenericClient,
    outcomes: &[BidOutcome<'_>],
) -> Result<u64, tokio_postgres::Error> {
    let seqs: Vec<i64> = outcomes.iter().map(|o| o.seq).collect();
    let (Some(&first), Some(&last)) = (seqs.iter().min(), seqs.iter().max()) else {
        return Ok(0);
    };
    let mut auction_ids: Vec<Uuid> = outcomes.iter().map(|o| o.auction_id).collect();
    auction_ids.dedup();
    let stmt = client
        .prepare_cached(
            "DELETE FROM pending_bids \
             WHERE auction_id = ANY($1::uuid[]) AND seq BETWEEN $2 AND $3 \
             AND seq = ANY($4::int8[])",
        )
        .await?;
    client
        .execute(&stmt, &[&auction_ids, &first, &last, &seqs])
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
