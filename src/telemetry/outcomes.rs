//! The count of resolved bids by outcome, shared by the resolver and the
//! row-lock baseline, which both resolve bids.

use crate::rules::RejectReason;

/// The `outcome` label of a resolved bid: `accepted` (leading or outbid)
/// or the rejection reason.
fn outcome_label(reason: Option<&'static str>) -> &'static str {
    reason.unwrap_or("accepted")
}

/// Counts resolved bids in `gavel_resolver_bids_resolved_total` by outcome,
/// given each bid's rejection reason (`None`: accepted).
pub fn count_resolved(reasons: impl IntoIterator<Item = Option<&'static str>>) {
    for reason in reasons {
        metrics::counter!("gavel_resolver_bids_resolved_total", "outcome" => outcome_label(reason))
            .increment(1);
    }
}

/// Registers `gavel_resolver_bids_resolved_total` at zero for every
/// outcome, so rates over it are 0 rather than missing before the first bid.
pub fn register_resolved_counter() {
    let outcomes = std::iter::once(None).chain(RejectReason::ALL.map(|r| Some(r.as_str())));
    for reason in outcomes {
        metrics::counter!("gavel_resolver_bids_resolved_total", "outcome" => outcome_label(reason))
            .increment(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_bids_and_each_rejection_reason_have_a_label() {
        assert_eq!(outcome_label(None), "accepted");
        assert_eq!(outcome_label(Some("auction_closed")), "auction_closed");
    }
}
