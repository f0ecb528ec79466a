//! Queries on `bid_log`, one file per caller: [`append`] for the bid paths
//! (the log path's one-statement append of a batch of bids, the key
//! look-ups, the baselines' resolved insert), [`reads`] for reading bids
//! back, and [`resolve`] for the resolver (the pending bids, its outcome
//! records). What they share is here: a bid as readers see it (the `bids`
//! view over `bid_log`, with its status derived), and a bid's outcome.

use chrono::{DateTime, Utc};
use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::domain::bid_status::outcome_columns;
use crate::domain::BidStatus;
use crate::rules;

pub mod append;
pub mod reads;
pub mod resolve;

pub use append::{
    append_batch, find_key, find_keys, insert_resolved, key_taken, mark_outbid, Append, BidKey,
    NewBid, ResolvedBid,
};
pub use reads::{get, history};
pub use resolve::{
    auctions_with_pending, pending, record_batch, unresolved, BidOutcome, PendingBid, PendingRead,
    Progress, SETTLED_LATELY, UNRESOLVED,
};

/// One bid as the `bids` view shows it: its row of the bid log, with its
/// outcome and status.
#[derive(Debug, Clone)]
pub struct BidRecord {
    /// The auction bid on.
    pub auction_id: Uuid,
    /// The bid id.
    pub id: Uuid,
    /// Insertion sequence (history order; not the resolution order).
    pub seq: i64,
    /// The bidder (token `sub`).
    pub bidder_id: String,
    /// The bidder's maximum.
    pub amount: i64,
    /// Where the bid stands.
    pub status: BidStatus,
    /// Why the bid was rejected.
    pub reason: Option<String>,
    /// The auction price right after this bid was applied.
    pub price_after: Option<i64>,
    /// Database clock at insertion.
    pub received_at: DateTime<Utc>,
    /// When the resolver applied the bid.
    pub resolved_at: Option<DateTime<Utc>>,
    /// Position in the auction's resolution order.
    pub resolution_no: Option<i64>,
}

/// The columns of a [`BidRecord`], in `SELECT` and `RETURNING` lists.
pub(crate) const COLUMNS: &str =
    "auction_id, id, seq, bidder_id, amount, status, reason, price_after, \
    received_at, resolved_at, resolution_no";

impl BidRecord {
    /// The bid as the auction rules see it.
    pub fn input(&self) -> crate::rules::BidInput {
        crate::rules::BidInput {
            id: self.id,
            bidder_id: self.bidder_id.clone(),
            amount: self.amount,
            received_at: self.received_at,
        }
    }

    /// A bid just appended, not yet resolved.
    pub(crate) fn pending(
        (auction_id, id, seq): (Uuid, Uuid, i64),
        bidder_id: String,
        amount: i64,
        received_at: DateTime<Utc>,
    ) -> Self {
        BidRecord {
            auction_id,
            id,
            seq,
            bidder_id,
            amount,
            status: BidStatus::Pending,
            reason: None,
            price_after: None,
            received_at,
            resolved_at: None,
            resolution_no: None,
        }
    }

    pub(crate) fn from_row(row: &Row) -> Result<Self, tokio_postgres::Error> {
        Ok(BidRecord {
            auction_id: row.try_get("auction_id")?,
            id: row.try_get("id")?,
            seq: row.try_get("seq")?,
            bidder_id: row.try_get("bidder_id")?,
            amount: row.try_get("amount")?,
            status: row.try_get("status")?,
            reason: row.try_get("reason")?,
            price_after: row.try_get("price_after")?,
            received_at: row.try_get("received_at")?,
            resolved_at: row.try_get("resolved_at")?,
            resolution_no: row.try_get("resolution_no")?,
        })
    }
}

/// A bid's outcome, whichever path resolves it: the resolver records it in
/// its batch's `bid_outcomes` row, the row-lock baselines in the bid's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// `leading`, `outbid` or `rejected`.
    pub status: BidStatus,
    /// Why the bid was rejected.
    pub reason: Option<&'static str>,
    /// The auction price right after the bid.
    pub price_after: Option<i64>,
    /// The bid's position in its auction's resolution order.
    pub resolution_no: i64,
    /// The auction version the outcome is committed with.
    pub resolved_version: i64,
}

impl Resolution {
    /// The outcome of a bid as the rules `applied` it, `resolution_no`th in
    /// its auction, committed with the auction's `resolved_version`.
    pub fn new(applied: &rules::Applied, resolution_no: i64, resolved_version: i64) -> Self {
        let (status, reason) = outcome_columns(applied.outcome);
        Resolution {
            status,
            reason,
            price_after: applied.price_after,
            resolution_no,
            resolved_version,
        }
    }
}

/// `bid_log.status` is text; a value outside [`BidStatus`] is an error.
impl<'a> FromSql<'a> for BidStatus {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(<&str as FromSql>::from_sql(ty, raw)?.parse()?)
    }

    fn accepts(ty: &Type) -> bool {
        <&str as FromSql>::accepts(ty)
    }
}
