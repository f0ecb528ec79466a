//! What the load tests' baselines share: each resolves a bid in its own
//! request, in the design its module describes (`row_lock.rs`,
//! `row_lock_fn.rs`, `optimistic.rs`), and answers it the same way. The
//! bid's outcome is known at once, so it is answered like a bid resolved
//! while its client waited: `201 Created` with the resolved view,
//! rejections by the rules included. `bid_log` holds the same facts the
//! resolver writes (one outcome per bid, resolution numbers 1..n), so an
//! audit replaying it through the rules gets the auction row either way.

use std::sync::Arc;
use std::time::Instant;

use deadpool_postgres::GenericClient;
use uuid::Uuid;

use super::{
    connection, optimistic, replayed_bid, row_lock, row_lock_fn, BidDesk, BidPath, Placed,
};
use crate::db::baselines::BidRequest;
use crate::db::events::BidChange;
use crate::db::{bids, reads};
use crate::domain::{Amount, BidStatus, IdempotencyKey};
use crate::error::ApiError;
use crate::rules::{Applied, AuctionState};
use crate::signals::{Resolved, Signals};
use crate::telemetry::outcomes::count_resolved;

/// What one baseline transaction did.
pub(super) enum Placement {
    /// The bid is in the log with its outcome (`reason` when rejected).
    Resolved {
        bid: bids::BidRecord,
        reason: Option<&'static str>,
        /// The auction's version after the bid.
        version: i64,
    },
    /// The bidder already used this key on the auction: the bid it names.
    /// Nothing was written.
    KeyExists(bids::BidRecord),
}

impl BidDesk {
    /// Places a bid along this desk's baseline path, resolving it at once,
    /// within the same pool-wait `budget` as the log path.
    pub(super) async fn place_at_once(
        &self,
        bidder: &str,
        key: &IdempotencyKey,
        auction_id: Uuid,
        amount: Amount,
        wait_until: Option<Instant>,
        budget: Instant,
    ) -> Result<Placed, ApiError> {
        let (pool, signals, path) = (self.pool.clone(), self.signals.clone(), self.path);
        let (bidder, key_text) = (bidder.to_owned(), key.as_str().to_owned());
        // A task of its own, so a client hanging up mid-request cannot cut
        // the transaction apart from its wake-ups and metrics.
        let (placement, wal_position) = tokio::spawn(async move {
            let mut client = connection(&pool, budget).await?;
            let request = BidRequest {
                auction_id,
                id: Uuid::now_v7(),
                bidder_id: &bidder,
                key: &key_text,
                amount: amount.get(),
            };
            let (placement, wal_position) = match path {
                BidPath::RowLockFn => row_lock_fn::write(&client, &request).await?,
                BidPath::Optimistic => optimistic::write(&client, &request).await?,
                BidPath::RowLock | BidPath::Log => (
                    row_lock::write(&mut client, &signals, &request).await?,
                    None,
                ),
            };
            announce(&signals, path, auction_id, &placement);
            // From here on the bid is committed: nothing may fail the
            // request. A path whose write did not bring the WAL position
            // asks for it now, after the wake-ups.
            let wal_position = match (&placement, wal_position) {
                (Placement::Resolved { .. }, None) => reads::wal_position(&client).await.ok(),
                (_, position) => position,
            };
            Ok::<_, ApiError>((placement, wal_position))
        })
        .await
        .map_err(|e| ApiError::Internal(e.into()))??;
        match placement {
            Placement::Resolved { bid, .. } => {
                let mut placed = self
                    .finish(bid, false, wait_until, None, wal_position, budget)
                    .await;
                // Resolved at once: answered like a bid resolved while its
                // client waited, whether or not it asked to wait.
                placed.resolved_in_wait = true;
                Ok(placed)
            }
            Placement::KeyExists(existing) => {
                let bid = replayed_bid(existing, amount)?;
                Ok(self.finish(bid, true, wait_until, None, None, budget).await)
            }
        }
    }
}

/// The bid of a key another writer took first: the bid's insert was
/// refused by the key's unique index ([`bids::key_taken`]), which waits for
/// that writer's commit, so the bid is there to replay.
pub(super) async fn taken_key(
    client: &impl GenericClient,
    request: &BidRequest<'_>,
) -> Result<Placement, ApiError> {
    let found = bids::find_key(client, request.auction_id, request.bidder_id, request.key).await?;
    let bid = found.ok_or_else(|| {
        ApiError::Internal(anyhow::anyhow!("a taken idempotency key names no bid"))
    })?;
    Ok(Placement::KeyExists(bid))
}

/// After a bid's commit: counts it, and tells waiting requests and the
/// other processes of its auction's change.
fn announce(signals: &Signals, path: BidPath, auction_id: Uuid, placement: &Placement) {
    let Placement::Resolved {
        bid,
        reason,
        version,
    } = placement
    else {
        return;
    };
    metrics::counter!("gavel_bids_accepted_total").increment(1);
    count_resolved([*reason]);
    signals.publish(Resolved {
        auction_id,
        bids: Some(Arc::from([bid.id])),
        version: Some(*version),
        view: None,
    });
    // The row-lock transaction notified other processes itself.
    if path != BidPath::RowLock {
        signals.changed_here(auction_id);
    }
}

/// The entries of the event row for one bid: the leader it displaced (from
/// the state `before` it), now outbid, then the bid itself (`new`).
pub(super) fn bid_changes<'a>(
    before: &'a AuctionState,
    applied: &Applied,
    new: BidChange<'a>,
) -> Vec<BidChange<'a>> {
    let displaced = (applied.displaced)
        .and_then(|id| before.leader.as_ref().filter(|l| l.bid_id == id))
        .map(|leader| BidChange {
            bid_id: leader.bid_id,
            bidder_id: &leader.bidder_id,
            status: BidStatus::Outbid,
        });
    displaced.into_iter().chain([new]).collect()
}
