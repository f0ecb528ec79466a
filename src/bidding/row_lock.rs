//! The classic row-lock bid path (`GAVEL_BID_PATH=row_lock`), kept as the
//! reproduction baseline for load tests: the design of the incident Gavel
//! exists to prevent, selectable on the same schema, rules and HTTP stack so
//! one load-test run can compare both.
//!
//! Each bid is one transaction on an API pool connection: take the
//! auction's lock (the advisory lock the resolver takes too), then
//! `SELECT ... FROM auctions WHERE id = $1 FOR UPDATE`, look the
//! idempotency key up, apply the pure [`rules`] to the locked state, `UPDATE`
//! the row (the resolver's compare-and-set, which cannot lose while the
//! lock is held), insert the bid already resolved, mark a displaced leader
//! outbid, record both changes in the event log, and commit. The bid's outcome is known at once, so it is answered like a bid
//! resolved while its client waited: `201 Created` with the resolved view,
//! rejections by the rules included. `bid_log` holds the same facts the
//! resolver writes (one outcome per bid, resolution numbers 1..n), so an
//! audit replaying it through the rules gets the auction row either way.
//!
//! It is never the default because every bid of an auction queues on that
//! auction's lock for a whole transaction (PostgreSQL wait events
//! `Lock:advisory`, and `Lock:tuple` and `Lock:transactionid` behind
//! anything else holding the row): a hot auction takes one bid at a
//! time, API connections fill up with waiters, and a bid that waits longer
//! than `lock_timeout` is answered `503 overloaded`.
//!
//! The background resolver keeps running: it finds no pending bids, but
//! still settles auctions after their end (soft close is the rules' own
//! doing, on every bid).

use deadpool_postgres::{Object, Transaction};

use super::at_once::{bid_changes, taken_key, Placement};
use crate::db::auctions::{self, AuctionRecord};
use crate::db::baselines::BidRequest;
use crate::db::events::BidChange;
use crate::db::{bids, events};
use crate::error::ApiError;
use crate::rules::{self, BidInput};
use crate::signals::{listener, Signals};

/// The row-lock transaction. The row stays locked from the `FOR UPDATE`
/// until the commit; lock and statement timeouts surface as errors that
/// answer `503 overloaded`, and the transaction is rolled back.
pub(super) async fn write(
    client: &mut Object,
    signals: &Signals,
    request: &BidRequest<'_>,
) -> Result<Placement, ApiError> {
    let &BidRequest {
        auction_id,
        id: bid_id,
        bidder_id: bidder,
        key,
        amount,
    } = request;
    let tx = client.transaction().await?;
    // The auction's lock, then its row, then the key. Waiting for the row
    // alone would not do: a row lock takes a transaction id before it
    // waits, and waiters are not granted the row in that order. Waiting on
    // the auction's advisory lock (the resolver's) takes no id, so ids
    // follow the order in which the auction's changes commit, as the event
    // log's readers need (see the `events` migration). A retry waits here
    // for the first request to end, then replays: a key belongs to one
    // auction, and the row-lock paths write an auction's bids only under
    // its lock, so a key found unused here stays so until this bid is
    // written (any other writer is stopped by the key's unique index).
    auctions::lock(&tx, auction_id).await?;
    let Some((auction, now)) = auctions::get_for_update(&tx, auction_id).await? else {
        tx.rollback().await?;
        return Err(ApiError::NotFound("auction"));
    };
    if let Some(existing) = bids::find_key(&tx, auction_id, bidder, key).await? {
        tx.rollback().await?;
        return Ok(Placement::KeyExists(existing));
    }
    let bid = BidInput {
        id: bid_id,
        bidder_id: bidder.to_owned(),
        amount,
        // The transaction's clock: the bid row's `received_at` too.
        received_at: now,
    };
    let Some((bid, reason)) = apply_locked(&tx, &auction, bid, key).await? else {
        // A writer that does not take the lock (the log path of another
        // process) wrote the key first.
        tx.rollback().await?;
        return taken_key(&*client, request).await;
    };
    // Requests of other processes waiting on this auction hear of it.
    tx.execute(
        "SELECT pg_notify($1, $2)",
        &[
            &listener::RESOLVED_CHANNEL,
            &signals.notification(auction_id),
        ],
    )
    .await?;
    tx.commit().await?;
    Ok(Placement::Resolved {
        bid,
        reason,
        version: auction.version + 1,
    })
}

/// Applies `bid` to the locked `auction` by the rules, writes the auction's
/// new state, inserts the bid with its outcome (idempotency `key`), and
/// marks a displaced leader outbid, recording both changes in the event
/// log; returns the bid as stored and its rejection reason, or `None` when
/// the key names a bid already (the transaction is then aborted).
async fn apply_locked(
    tx: &Transaction<'_>,
    auction: &AuctionRecord,
    bid: BidInput,
    key: &str,
) -> Result<Option<(bids::BidRecord, Option<&'static str>)>, ApiError> {
    let mut state = auction.state.clone();
    let applied = rules::apply_bid(&auction.terms, &mut state, &bid);
    let resolution_no = auction.resolved_count + 1;
    // Written even for a rejected bid, as the classic design does: the
    // resolution count moves with every bid.
    let written = auctions::compare_and_set(
        tx,
        &auctions::StateUpdate {
            id: auction.id,
            expected_version: auction.version,
            state: &state,
            resolved_count: resolution_no,
            settlement: None,
            progress: None,
        },
    )
    .await?;
    if !written {
        return Err(ApiError::Internal(anyhow::anyhow!(
            "auction {} changed while its row was locked FOR UPDATE",
            auction.id
        )));
    }
    let resolved = bids::ResolvedBid {
        auction_id: auction.id,
        id: bid.id,
        bidder_id: &bid.bidder_id,
        amount: bid.amount,
        idempotency_key: key,
        resolution: bids::Resolution::new(&applied, resolution_no, auction.version + 1),
    };
    let stored = match bids::insert_resolved(tx, &resolved).await {
        Ok(stored) => stored,
        Err(e) if bids::key_taken(&e) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if let Some(displaced) = applied.displaced {
        bids::mark_outbid(tx, auction.id, displaced).await?;
    }
    let new = BidChange {
        bid_id: stored.id,
        bidder_id: &stored.bidder_id,
        status: stored.status,
    };
    let changes = bid_changes(&auction.state, &applied, new);
    events::record_bid_changes(tx, auction.id, 0, auction.version + 1, &changes).await?;
    Ok(Some((stored, resolved.resolution.reason)))
}
