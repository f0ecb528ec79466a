//! The optimistic bid path (`GAVEL_BID_PATH=optimistic`), a load-test
//! baseline: compare-and-set from every request, the design DESIGN.md
//! measured failing under contention, built as strong as it goes so that
//! Gavel's ratio against it is honest.
//!
//! Each attempt is two round trips and takes no lock while Gavel works:
//! 1. read the auction with the database's clock, and the bid of the
//!    bidder's key on it (two statements sent at once); a retry of a
//!    finished request replays here;
//! 2. apply the pure [`rules`] in Gavel, then write with one statement,
//!    so one transaction and its commit: `UPDATE auctions ... WHERE id = $1
//!    AND version = $v`, and only if it wins, the bid with its key and
//!    outcome, the displaced leader's mark and the event row (see
//!    `db::baselines::write_if_unchanged`); the WAL position rides behind.
//!    A concurrent request with the same key cannot write too: its
//!    compare-and-set finds the version moved, or its insert the key's
//!    unique index taken.
//!
//! The row is locked only while that statement runs and commits, inside
//! PostgreSQL. A write that finds the version moved writes nothing; the
//! bid is tried again from a fresh read, after a jittered exponential
//! backoff, at most [`ATTEMPTS`] times, then answered `503 overloaded`
//! with `Retry-After`. A concurrent write of the same row makes the
//! statement wait for that one's commit (wait event `Lock:transactionid`)
//! before it finds the version moved.
//!
//! The resolver keeps running: it finds no pending bids, and settles
//! auctions at their end with its own compare-and-set, so a bid and a
//! settlement never both apply to one version. Every write of an auction
//! reads the version it replaces before it takes a transaction id, so the
//! ids of its committed transactions follow their commit order, as the
//! event log's readers need.

use std::time::Duration;

use deadpool_postgres::Object;
use tokio_postgres::types::PgLsn;
use uuid::Uuid;

use super::at_once::{bid_changes, taken_key, Placement};
use crate::db::auctions::{self, StateUpdate};
use crate::db::baselines::{self, BidRequest, OptimisticWrite, Written};
use crate::db::bids;
use crate::db::events::BidChange;
use crate::error::ApiError;
use crate::rules::{self, BidInput};

/// Attempts per bid before it is shed.
pub const ATTEMPTS: u32 = 5;
/// The mean wait before the second attempt; it doubles each attempt.
const FIRST_BACKOFF: Duration = Duration::from_millis(2);

/// Places the bid by read-then-compare-and-set, retrying conflicts; with
/// the placement comes the WAL position after the commit.
pub(super) async fn write(
    client: &Object,
    request: &BidRequest<'_>,
) -> Result<(Placement, Option<PgLsn>), ApiError> {
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(backoff(attempt)).await;
        }
        if let Some(placed) = attempt_once(client, request).await? {
            return Ok(placed);
        }
        metrics::counter!("gavel_optimistic_conflicts_total").increment(1);
    }
    Err(ApiError::Overloaded)
}

/// One read and one conditional write; `None` when the auction moved
/// between them (nothing was written).
async fn attempt_once(
    client: &Object,
    request: &BidRequest<'_>,
) -> Result<Option<(Placement, Option<PgLsn>)>, ApiError> {
    let (read, key) = futures::join!(
        auctions::get_with_clock(client, request.auction_id),
        bids::find_key(client, request.auction_id, request.bidder_id, request.key),
    );
    if let Some(existing) = key? {
        return Ok(Some((Placement::KeyExists(existing), None)));
    }
    let Some((auction, now)) = read? else {
        return Err(ApiError::NotFound("auction"));
    };
    let bid = BidInput {
        id: request.id,
        bidder_id: request.bidder_id.to_owned(),
        amount: request.amount,
        received_at: now,
    };
    let mut state = auction.state.clone();
    let applied = rules::apply_bid(&auction.terms, &mut state, &bid);
    let (resolution_no, version) = (auction.resolved_count + 1, auction.version + 1);
    let resolution = bids::Resolution::new(&applied, resolution_no, version);
    let new = BidChange {
        bid_id: request.id,
        bidder_id: request.bidder_id,
        status: resolution.status,
    };
    let changes = bid_changes(&auction.state, &applied, new);
    let write = OptimisticWrite {
        update: StateUpdate {
            id: auction.id,
            expected_version: auction.version,
            state: &state,
            resolved_count: resolution_no,
            settlement: None,
            progress: None,
        },
        bid: request,
        received_at: now,
        resolution: resolution.clone(),
        displaced: applied.displaced,
        changes: &changes,
    };
    let (written, wal_position) = baselines::write_if_unchanged(client, &write).await?;
    let placement = match written {
        Written::Placed(bid) => Placement::Resolved {
            bid,
            reason: resolution.reason,
            version,
        },
        Written::Conflict => return Ok(None),
        // A concurrent request with the key committed first: replay it.
        Written::KeyTaken => taken_key(client, request).await?,
    };
    Ok(Some((placement, wal_position)))
}

/// The wait before attempt `attempt` (1, 2, ...): [`FIRST_BACKOFF`]
/// doubled each attempt, spread over half to one and a half times that so
/// that bids that conflicted together do not retry together.
fn backoff(attempt: u32) -> Duration {
    let mean = FIRST_BACKOFF * 2u32.pow(attempt.saturating_sub(1).min(16));
    let spread = (Uuid::new_v4().as_u128() % 1_000) as f64 / 1_000.0;
    mean.mul_f64(0.5 + spread)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_each_attempt_within_its_jitter() {
        for attempt in 1..ATTEMPTS {
            let mean = FIRST_BACKOFF * 2u32.pow(attempt - 1);
            for _ in 0..100 {
                let wait = backoff(attempt);
                assert!(
                    wait >= mean / 2 && wait < mean * 3 / 2,
                    "{attempt}: {wait:?}"
                );
            }
        }
    }
}
