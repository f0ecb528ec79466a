//! The tuned row-lock bid path (`GAVEL_BID_PATH=row_lock_fn`), a load-test
//! baseline: the row-lock design of `row_lock.rs` at its strongest, so
//! that Gavel's ratio against it is honest.
//!
//! The same transaction, rules and outcomes, but sent as one statement,
//! `SELECT * FROM gavel_place_bid(...)`, in autocommit: one round trip per
//! bid, commit included (the WAL position for read-your-writes rides
//! behind it in the same round trip). The function (see its migration)
//! answers a retry of a finished request before taking any lock, then
//! takes the auction's advisory lock (the resolver's, in the same order as
//! `row_lock`), reads the row, looks the key up again, applies a PL/pgSQL
//! port of the rules, writes the row, the bid already resolved, the
//! displaced leader's mark and the event row. No network round trip happens while
//! the lock is held; the commit's WAL flush still does.
//!
//! Other processes hear of the change from a NOTIFY sent after the commit,
//! coalesced per auction (`listener::forward_resolved`), not from one
//! inside the locked transaction: NOTIFY serializes the commits of every
//! notifying transaction in the database.
//!
//! Every bid of an auction still queues on that auction's lock (wait event
//! `Lock:advisory`), for one function call and one commit each; a bid that
//! waits longer than `lock_timeout` is answered `503 overloaded`. The
//! resolver settles auctions at their end, as with `row_lock`.

use deadpool_postgres::Object;
use tokio_postgres::types::PgLsn;

use super::at_once::{taken_key, Placement};
use crate::db::baselines::{self, BidRequest, FunctionPlacement};
use crate::db::bids;
use crate::error::ApiError;
use crate::rules::RejectReason;

/// Places the bid with one call of `gavel_place_bid`; with the placement
/// comes the WAL position after the commit.
pub(super) async fn write(
    client: &Object,
    request: &BidRequest<'_>,
) -> Result<(Placement, Option<PgLsn>), ApiError> {
    let (placement, wal_position) = match baselines::place_bid_in_function(client, request).await {
        // A writer that does not take the auction's lock (the log path of
        // another process) wrote the key first.
        Err(e) if bids::key_taken(&e) => return Ok((taken_key(client, request).await?, None)),
        placed => placed?,
    };
    let placement = match placement {
        FunctionPlacement::Placed { bid, version } => Placement::Resolved {
            reason: (bid.reason.as_deref())
                .and_then(RejectReason::parse)
                .map(RejectReason::as_str),
            bid,
            version,
        },
        FunctionPlacement::KeyExists(existing) => Placement::KeyExists(existing),
        FunctionPlacement::NoAuction => return Err(ApiError::NotFound("auction")),
    };
    Ok((placement, wal_position))
}
