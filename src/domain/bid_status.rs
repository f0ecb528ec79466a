//! A bid's status in `bid_log`, what a resolved bid's outcome writes there,
//! and the count of resolved bids by outcome. Both writers of outcomes (the
//! resolver and the row-lock bid path) use these, so they sit below both.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::rules::Outcome;

/// Where a bid stands: `pending` until resolved, then `leading`, `outbid`
/// or `rejected`, and `won` or `lost` once its auction is settled. The
/// strings are the API's and the `bid_log.status` column's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BidStatus {
    /// In the log, not yet resolved.
    Pending,
    /// Holds the lead.
    Leading,
    /// Accepted, but another bid holds the lead.
    Outbid,
    /// Refused by the rules (see the bid's reason).
    Rejected,
    /// The winning bid of a settled auction.
    Won,
    /// An accepted bid of a settled auction that did not win.
    Lost,
}

impl BidStatus {
    /// Every status, in declaration order.
    pub const ALL: [BidStatus; 6] = [
        BidStatus::Pending,
        BidStatus::Leading,
        BidStatus::Outbid,
        BidStatus::Rejected,
        BidStatus::Won,
        BidStatus::Lost,
    ];

    /// The status as the API and `bid_log.status` spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            BidStatus::Pending => "pending",
            BidStatus::Leading => "leading",
            BidStatus::Outbid => "outbid",
            BidStatus::Rejected => "rejected",
            BidStatus::Won => "won",
            BidStatus::Lost => "lost",
        }
    }
}

impl fmt::Display for BidStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no bid status.
#[derive(Debug, thiserror::Error)]
#[error("unknown bid status {0:?}")]
pub struct UnknownBidStatus(String);

impl FromStr for BidStatus {
    type Err = UnknownBidStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownBidStatus(s.to_owned()))
    }
}

/// The `bid_log` status and rejection reason a resolved bid is written with.
pub fn outcome_columns(outcome: Outcome) -> (BidStatus, Option<&'static str>) {
    match outcome {
        Outcome::Leading => (BidStatus::Leading, None),
        Outcome::Outbid => (BidStatus::Outbid, None),
        Outcome::Rejected(reason) => (BidStatus::Rejected, Some(reason.as_str())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::RejectReason;

    #[test]
    fn statuses_spell_as_the_api_and_the_column_do() {
        let spelled: Vec<&str> = BidStatus::ALL.map(BidStatus::as_str).to_vec();
        assert_eq!(
            spelled,
            ["pending", "leading", "outbid", "rejected", "won", "lost"]
        );
        for status in BidStatus::ALL {
            let json = serde_json::to_string(&status).unwrap();
            assert_eq!(json, format!("\"{status}\""));
            assert_eq!(status.as_str().parse::<BidStatus>().unwrap(), status);
        }
        assert!("Pending".parse::<BidStatus>().is_err());
        assert!("".parse::<BidStatus>().is_err());
    }

    #[test]
    fn outcomes_map_to_their_columns() {
        assert_eq!(
            outcome_columns(Outcome::Leading),
            (BidStatus::Leading, None)
        );
        assert_eq!(outcome_columns(Outcome::Outbid), (BidStatus::Outbid, None));
        assert_eq!(
            outcome_columns(Outcome::Rejected(RejectReason::BelowMinimum)),
            (BidStatus::Rejected, Some("below_minimum"))
        );
    }
}
