//! Auction rules of Gavel: the pure, deterministic proxy-bidding logic
//! (rules 1-11 below, as numbered in the comments) and the increment table.
//!
//! The rules, applied one bid at a time: (1) a bid received before the start
//! is rejected `auction_not_started`, after the current end `auction_closed`;
//! (2) the seller cannot bid; (3) the first bid must reach the starting price
//! and leads at it; (4) the leader may only raise their own maximum; (5) any
//! other bid must reach price + step; (6) above the leader's maximum it takes
//! the lead at min(amount, leader max + step); (7) a tie keeps the earlier
//! bid leading at that amount; (8) below it the leader stays, at
//! min(leader max, amount + step); (9) once the leader's maximum meets the
//! reserve the price is at least the reserve; (10) a bid inside the soft-close
//! window moves the end to its receipt + window, never past the cap; (11) the
//! settled winner is the leader if the reserve is met.
//!
//! This module owns how one bid changes an auction's state, what the next
//! minimum bid is, whether the reserve is met and who wins at settlement. It
//! does no I/O and reads no clock: every time comes in as an argument, so the
//! same bids in the same order always give the same state. Money is `i64`
//! minor units; arithmetic saturates so that amounts up to 10^15 (and any
//! step) can never overflow.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;
use uuid::Uuid;

/// Most tiers an increment table may have.
pub const MAX_INCREMENT_TIERS: usize = 100;

/// One row of an increment table: from price `from` upwards the step is `step`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncrementTier {
    /// Lowest price (inclusive) at which this tier applies.
    pub from: i64,
    /// Minimum raise over the current price while this tier applies.
    pub step: i64,
}

/// A validated increment table: non-empty, starting at 0, strictly ascending, positive steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<IncrementTier>", into = "Vec<IncrementTier>")]
pub struct Increments(Vec<IncrementTier>);

impl Increments {
    /// The default table of the API: `[0:5, 100:25, 500:50, 2500:100, 10000:250, 25000:500, 50000:1000, 100000:2500, 250000:5000, 500000:10000]`.
    pub fn default_table() -> Self {
        const TABLE: [(i64, i64); 10] = [
            (0, 5),
            (100, 25),
            (500, 50),
            (2_500, 100),
            (10_000, 250),
            (25_000, 500),
            (50_000, 1_000),
            (100_000, 2_500),
            (250_000, 5_000),
            (500_000, 10_000),
        ];
        Self(
            TABLE
                .iter()
                .map(|&(from, step)| IncrementTier { from, step })
                .collect(),
        )
    }

    /// Validates a table (non-empty, at most 100 tiers, first `from` is 0, strictly ascending `from`, every step > 0); the error is a human-readable message.
    pub fn new(tiers: Vec<IncrementTier>) -> Result<Self, String> {
        if tiers.is_empty() {
            return Err("increments must have at least one tier".to_owned());
        }
        if tiers.len() > MAX_INCREMENT_TIERS {
            return Err(format!(
                "increments may have at most {MAX_INCREMENT_TIERS} tiers, got {}",
                tiers.len()
            ));
        }
        if tiers[0].from != 0 {
            return Err(format!(
                "the first increment tier must start at 0, got {}",
                tiers[0].from
            ));
        }
        for (i, pair) in tiers.windows(2).enumerate() {
            if pair[1].from <= pair[0].from {
                return Err(format!(
                    "increment tiers must have strictly ascending `from`: tier {} ({}) is not above tier {} ({})",
                    i + 1,
                    pair[1].from,
                    i,
                    pair[0].from
                ));
            }
        }
        if let Some((i, tier)) = tiers.iter().enumerate().find(|(_, t)| t.step <= 0) {
            return Err(format!(
                "increment steps must be positive: tier {i} has step {}",
                tier.step
            ));
        }
        Ok(Self(tiers))
    }

    /// The step of the tier with the greatest `from <= price` (the first tier's step for a negative price).
    pub fn step_at(&self, price: i64) -> i64 {
        let idx = self.0.partition_point(|t| t.from <= price);
        self.0[idx.saturating_sub(1)].step
    }

    /// The tiers, in ascending `from` order.
    pub fn tiers(&self) -> &[IncrementTier] {
        &self.0
    }
}

impl Default for Increments {
    fn default() -> Self {
        Self::default_table()
    }
}

impl TryFrom<Vec<IncrementTier>> for Increments {
    type Error = String;

    fn try_from(tiers: Vec<IncrementTier>) -> Result<Self, Self::Error> {
        Self::new(tiers)
    }
}

impl From<Increments> for Vec<IncrementTier> {
    fn from(increments: Increments) -> Self {
        increments.0
    }
}

/// The fixed terms of an auction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuctionTerms {
    /// The seller's user id; the seller may not bid.
    pub seller_id: String,
    /// The lowest acceptable first bid, and the price it leads at.
    pub starting_price: i64,
    /// The hidden minimum the leader's maximum must reach for a sale, if any.
    pub reserve_price: Option<i64>,
    /// The increment table in force.
    pub increments: Increments,
    /// Bids received before this instant are rejected.
    pub starts_at: DateTime<Utc>,
    /// Soft-close window; zero means a hard close.
    pub soft_close: Duration,
    /// Cap on soft-close extensions of `ends_at`.
    pub max_end_at: DateTime<Utc>,
}

/// The leading bid: the bid that holds the lead and its bidder's maximum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// Id of the leading bid.
    pub bid_id: Uuid,
    /// Who placed it.
    pub bidder_id: String,
    /// The bidder's secret maximum.
    pub max_amount: i64,
}

/// The evolving state the resolver persists on the auctions row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuctionState {
    /// The leading bid, `None` before the first accepted bid.
    pub leader: Option<Leader>,
    /// The current price, `None` before the first accepted bid.
    pub price: Option<i64>,
    /// Number of non-rejected bids applied.
    pub bid_count: i64,
    /// The current end, moved by soft close.
    pub ends_at: DateTime<Utc>,
    /// Whether the auction has been settled.
    pub closed: bool,
}

impl AuctionState {
    /// The state of an auction with no bids yet that ends at `ends_at`.
    pub fn opening(ends_at: DateTime<Utc>) -> Self {
        Self {
            leader: None,
            price: None,
            bid_count: 0,
            ends_at,
            closed: false,
        }
    }
}

/// One bid as the resolver sees it; `amount` is the bidder's maximum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BidInput {
    /// The bid's id.
    pub id: Uuid,
    /// Who placed it.
    pub bidder_id: String,
    /// The bidder's maximum, in minor units.
    pub amount: i64,
    /// When the server received it (database clock).
    pub received_at: DateTime<Utc>,
}

/// Why a bid was rejected; the strings are the API's `reason` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The amount is below the starting price or the next minimum bid.
    BelowMinimum,
    /// The auction is settled or the bid arrived after `ends_at`.
    AuctionClosed,
    /// The bid arrived before `starts_at`.
    AuctionNotStarted,
    /// The leader bid no more than their own current maximum.
    NotAboveOwnMax,
    /// The seller bid on their own auction.
    SellerCannotBid,
}

impl RejectReason {
    /// Every reason, in declaration order.
    pub const ALL: [RejectReason; 5] = [
        RejectReason::BelowMinimum,
        RejectReason::AuctionClosed,
        RejectReason::AuctionNotStarted,
        RejectReason::NotAboveOwnMax,
        RejectReason::SellerCannotBid,
    ];

    /// The API's `reason` string (e.g. `"below_minimum"`).
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::BelowMinimum => "below_minimum",
            RejectReason::AuctionClosed => "auction_closed",
            RejectReason::AuctionNotStarted => "auction_not_started",
            RejectReason::NotAboveOwnMax => "not_above_own_max",
            RejectReason::SellerCannotBid => "seller_cannot_bid",
        }
    }

    /// The reason named by an API `reason` string, if any.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The status one bid gets from the resolver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The bid now holds the lead.
    Leading,
    /// The bid was accepted but another bid holds the lead.
    Outbid,
    /// The bid was rejected and changed nothing.
    Rejected(RejectReason),
}

/// What applying one bid did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The new bid's status.
    pub outcome: Outcome,
    /// The bid that was leading before and lost the lead because of this bid (its status becomes outbid), if any. Includes the case where the leader raises their own maximum (the new bid becomes the leading bid, the previous one is displaced).
    pub displaced: Option<Uuid>,
    /// The auction price right after this bid (None if still no accepted bid).
    pub price_after: Option<i64>,
}

/// Applies one bid (rules 1-10) to `state`, in place.
pub fn apply_bid(terms: &AuctionTerms, state: &mut AuctionState, bid: &BidInput) -> Applied {
    match resolve(terms, state, bid) {
        Err(reason) => Applied {
            outcome: Outcome::Rejected(reason),
            displaced: None,
            price_after: state.price,
        },
        Ok((outcome, displaced)) => {
            apply_reserve(terms, state);
            extend_soft_close(terms, state, bid.received_at);
            state.bid_count = state.bid_count.saturating_add(1);
            Applied {
                outcome,
                displaced,
                price_after: state.price,
            }
        }
    }
}

/// The lowest amount a bidder other than the leader must offer now: starting_price before the first bid, else price + step(price).
pub fn next_min_bid(terms: &AuctionTerms, state: &AuctionState) -> i64 {
    match (&state.leader, state.price) {
        (Some(_), Some(price)) => price.saturating_add(terms.increments.step_at(price)),
        _ => terms.starting_price,
    }
}

/// The lowest `p + step(p)` over every price `p >= price`: a floor under
/// the minimum bid at this price and at any later (higher) price. It equals
/// `price + step(price)` for tables whose steps never shrink; a table with a
/// smaller step in a higher tier can make a later minimum lower.
pub fn min_bid_floor(terms: &AuctionTerms, price: i64) -> i64 {
    let here = price.saturating_add(terms.increments.step_at(price));
    terms
        .increments
        .tiers()
        .iter()
        .filter(|tier| tier.from > price)
        .map(|tier| tier.from.saturating_add(tier.step))
        .fold(here, i64::min)
}

/// Some(true/false) when there is a reserve, None otherwise (met = leader's max >= reserve).
pub fn reserve_met(terms: &AuctionTerms, state: &AuctionState) -> Option<bool> {
    terms.reserve_price.map(|reserve| {
        state
            .leader
            .as_ref()
            .is_some_and(|l| l.max_amount >= reserve)
    })
}

/// Rule 11: marks the state closed and returns the winner (the leader when the reserve, if any, is met), else None.
pub fn settle(terms: &AuctionTerms, state: &mut AuctionState) -> Option<Leader> {
    state.closed = true;
    if reserve_met(terms, state) == Some(false) {
        return None;
    }
    state.leader.clone()
}

/// Rules 1-8: decides the bid and, when it is accepted, updates leader and price.
fn resolve(
    terms: &AuctionTerms,
    state: &mut AuctionState,
    bid: &BidInput,
) -> Result<(Outcome, Option<Uuid>), RejectReason> {
    // Rule 1.
    if state.closed {
        return Err(RejectReason::AuctionClosed);
    }
    if bid.received_at < terms.starts_at {
        return Err(RejectReason::AuctionNotStarted);
    }
    if bid.received_at > state.ends_at {
        return Err(RejectReason::AuctionClosed);
    }
    // Rule 2.
    if bid.bidder_id == terms.seller_id {
        return Err(RejectReason::SellerCannotBid);
    }
    let new_leader = || Leader {
        bid_id: bid.id,
        bidder_id: bid.bidder_id.clone(),
        max_amount: bid.amount,
    };
    // Rule 3. A non-positive amount is never a real offer, whatever the terms say.
    let Some(leader) = state.leader.as_ref() else {
        if bid.amount < terms.starting_price || bid.amount <= 0 {
            return Err(RejectReason::BelowMinimum);
        }
        state.leader = Some(new_leader());
        state.price = Some(terms.starting_price);
        return Ok((Outcome::Leading, None));
    };
    let leader_max = leader.max_amount;
    let leader_bid = leader.bid_id;
    // A leader without a price cannot come out of this module; treat it as the opening price.
    let price = state.price.unwrap_or(terms.starting_price);
    let step = |p: i64| terms.increments.step_at(p);
    // Rule 4.
    if bid.bidder_id == leader.bidder_id {
        if bid.amount <= leader_max {
            return Err(RejectReason::NotAboveOwnMax);
        }
        state.leader = Some(new_leader());
        state.price = Some(price);
        return Ok((Outcome::Leading, Some(leader_bid)));
    }
    // Rule 5.
    if bid.amount < price.saturating_add(step(price)) {
        return Err(RejectReason::BelowMinimum);
    }
    if bid.amount > leader_max {
        // Rule 6.
        state.price = Some(bid.amount.min(leader_max.saturating_add(step(leader_max))));
        state.leader = Some(new_leader());
        Ok((Outcome::Leading, Some(leader_bid)))
    } else if bid.amount == leader_max {
        // Rule 7: on a tie the earlier bid wins.
        state.price = Some(bid.amount);
        Ok((Outcome::Outbid, None))
    } else {
        // Rule 8.
        state.price = Some(leader_max.min(bid.amount.saturating_add(step(bid.amount))));
        Ok((Outcome::Outbid, None))
    }
}

/// Rule 9: once the leader's maximum reaches the reserve, the price is at least the reserve.
fn apply_reserve(terms: &AuctionTerms, state: &mut AuctionState) {
    let (Some(reserve), Some(leader), Some(price)) =
        (terms.reserve_price, state.leader.as_ref(), state.price)
    else {
        return;
    };
    if leader.max_amount >= reserve {
        state.price = Some(price.max(reserve));
    }
}

/// Rule 10: a non-rejected bid inside the soft-close window pushes `ends_at` out, up to `max_end_at`.
fn extend_soft_close(terms: &AuctionTerms, state: &mut AuctionState, received_at: DateTime<Utc>) {
    if terms.soft_close <= Duration::zero() {
        return;
    }
    // A window reaching before the representable range covers every instant.
    let in_window = state
        .ends_at
        .checked_sub_signed(terms.soft_close)
        .is_none_or(|window_start| received_at > window_start);
    if !in_window {
        return;
    }
    let extended = received_at
        .checked_add_signed(terms.soft_close)
        .map_or(terms.max_end_at, |t| t.min(terms.max_end_at));
    state.ends_at = state.ends_at.max(extended);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: i64 = 1_800_000_000;
    const SELLER: &str = "seller";

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(T0 + secs, 0).expect("valid timestamp")
    }

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    /// Starts at t(0), ends at t(100), starting price 100, default table, hard close.
    fn terms() -> AuctionTerms {
        AuctionTerms {
            seller_id: SELLER.to_owned(),
            starting_price: 100,
            reserve_price: None,
            increments: Increments::default_table(),
            starts_at: t(0),
            soft_close: Duration::zero(),
            max_end_at: t(100),
        }
    }

    fn bid(n: u128, bidder: &str, amount: i64, at: i64) -> BidInput {
        BidInput {
            id: id(n),
            bidder_id: bidder.to_owned(),
            amount,
            received_at: t(at),
        }
    }

    fn leader(n: u128, bidder: &str, max: i64) -> Leader {
        Leader {
            bid_id: id(n),
            bidder_id: bidder.to_owned(),
            max_amount: max,
        }
    }

    /// A state with `bidder` leading through bid 1 at maximum `max` and price `price`.
    fn led(bidder: &str, max: i64, price: i64) -> AuctionState {
        AuctionState {
            leader: Some(leader(1, bidder, max)),
            price: Some(price),
            bid_count: 1,
            ends_at: t(100),
            closed: false,
        }
    }

    fn tiers(pairs: &[(i64, i64)]) -> Vec<IncrementTier> {
        pairs
            .iter()
            .map(|&(from, step)| IncrementTier { from, step })
            .collect()
    }

    fn rejected(reason: RejectReason) -> Outcome {
        Outcome::Rejected(reason)
    }

    #[test]
    fn default_table_matches_api() {
        let expected = tiers(&[
            (0, 5),
            (100, 25),
            (500, 50),
            (2_500, 100),
            (10_000, 250),
            (25_000, 500),
            (50_000, 1_000),
            (100_000, 2_500),
            (250_000, 5_000),
            (500_000, 10_000),
        ]);
        assert_eq!(Increments::default_table().tiers(), expected.as_slice());
        assert_eq!(Increments::default(), Increments::default_table());
        assert_eq!(Increments::new(expected), Ok(Increments::default_table()));
    }

    #[test]
    fn step_at_tier_boundaries() {
        let inc = Increments::default_table();
        let cases: &[(i64, i64)] = &[
            (-1, 5),
            (0, 5),
            (1, 5),
            (99, 5),
            (100, 25),
            (499, 25),
            (500, 50),
            (2_499, 50),
            (2_500, 100),
            (9_999, 100),
            (10_000, 250),
            (24_999, 250),
            (25_000, 500),
            (49_999, 500),
            (50_000, 1_000),
            (99_999, 1_000),
            (100_000, 2_500),
            (249_999, 2_500),
            (250_000, 5_000),
            (499_999, 5_000),
            (500_000, 10_000),
            (1_000_000_000_000_000, 10_000),
            (i64::MAX, 10_000),
        ];
        for &(price, step) in cases {
            assert_eq!(inc.step_at(price), step, "step_at({price})");
        }
        let single = Increments::new(tiers(&[(0, 7)])).unwrap();
        for price in [0, 1, 1_000, i64::MAX] {
            assert_eq!(single.step_at(price), 7);
        }
    }

    #[test]
    fn increments_new_validation() {
        let too_many: Vec<IncrementTier> = (0..=MAX_INCREMENT_TIERS as i64)
            .map(|i| IncrementTier {
                from: i * 10,
                step: 1,
            })
            .collect();
        let at_cap: Vec<IncrementTier> = too_many[..MAX_INCREMENT_TIERS].to_vec();
        let cases: Vec<(&str, Vec<IncrementTier>, Option<&str>)> = vec![
            ("empty", vec![], Some("at least one tier")),
            ("too many", too_many, Some("at most 100 tiers")),
            ("first not zero", tiers(&[(1, 5)]), Some("start at 0")),
            (
                "first negative",
                tiers(&[(-5, 5), (0, 5)]),
                Some("start at 0"),
            ),
            (
                "duplicate from",
                tiers(&[(0, 5), (100, 25), (100, 50)]),
                Some("strictly ascending"),
            ),
            (
                "descending from",
                tiers(&[(0, 5), (500, 25), (100, 50)]),
                Some("strictly ascending"),
            ),
            ("zero step", tiers(&[(0, 5), (100, 0)]), Some("positive")),
            ("negative step", tiers(&[(0, -5)]), Some("positive")),
            ("single tier", tiers(&[(0, 1)]), None),
            ("at cap", at_cap, None),
        ];
        for (name, input, expected_err) in cases {
            let result = Increments::new(input.clone());
            match expected_err {
                None => assert_eq!(result.map(|i| i.tiers().to_vec()), Ok(input), "{name}"),
                Some(fragment) => {
                    let err = result.expect_err(name);
                    assert!(err.contains(fragment), "{name}: {err:?} lacks {fragment:?}");
                }
            }
        }
    }

    #[test]
    fn increments_serde_round_trip_and_validation() {
        let json = serde_json::to_string(&Increments::default_table()).unwrap();
        assert!(json.starts_with(r#"[{"from":0,"step":5},{"from":100,"step":25}"#));
        let back: Increments = serde_json::from_str(&json).unwrap();
        assert_eq!(back, Increments::default_table());
        for bad in ["[]", r#"[{"from":5,"step":5}]"#, r#"[{"from":0,"step":0}]"#] {
            assert!(serde_json::from_str::<Increments>(bad).is_err(), "{bad}");
        }
        let v: Vec<IncrementTier> = Increments::default_table().into();
        assert_eq!(Increments::try_from(v), Ok(Increments::default_table()));
    }

    #[test]
    fn reject_reason_strings() {
        let cases = [
            (RejectReason::BelowMinimum, "below_minimum"),
            (RejectReason::AuctionClosed, "auction_closed"),
            (RejectReason::AuctionNotStarted, "auction_not_started"),
            (RejectReason::NotAboveOwnMax, "not_above_own_max"),
            (RejectReason::SellerCannotBid, "seller_cannot_bid"),
        ];
        for (reason, s) in cases {
            assert_eq!(reason.as_str(), s);
            assert_eq!(reason.to_string(), s);
            assert_eq!(RejectReason::parse(s), Some(reason));
        }
        for bad in ["", "BelowMinimum", "below-minimum", "below_minimum ", "won"] {
            assert_eq!(RejectReason::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn opening_state() {
        let s = AuctionState::opening(t(100));
        assert_eq!(s.leader, None);
        assert_eq!(s.price, None);
        assert_eq!(s.bid_count, 0);
        assert_eq!(s.ends_at, t(100));
        assert!(!s.closed);
    }

    /// One rule case: the terms, a starting state, one bid, and what must come out.
    struct Case {
        name: &'static str,
        terms: AuctionTerms,
        state: AuctionState,
        bid: BidInput,
        outcome: Outcome,
        displaced: Option<Uuid>,
        price: Option<i64>,
        leader: Option<Leader>,
        ends_at: DateTime<Utc>,
    }

    fn run_cases(cases: Vec<Case>) {
        for c in cases {
            let mut state = c.state.clone();
            let applied = apply_bid(&c.terms, &mut state, &c.bid);
            assert_eq!(applied.outcome, c.outcome, "{}: outcome", c.name);
            assert_eq!(applied.displaced, c.displaced, "{}: displaced", c.name);
            assert_eq!(applied.price_after, c.price, "{}: price_after", c.name);
            assert_eq!(state.price, c.price, "{}: state.price", c.name);
            assert_eq!(state.leader, c.leader, "{}: leader", c.name);
            assert_eq!(state.ends_at, c.ends_at, "{}: ends_at", c.name);
            assert_eq!(state.closed, c.state.closed, "{}: closed", c.name);
            let counted = i64::from(!matches!(c.outcome, Outcome::Rejected(_)));
            assert_eq!(
                state.bid_count,
                c.state.bid_count + counted,
                "{}: bid_count",
                c.name
            );
            if matches!(c.outcome, Outcome::Rejected(_)) {
                assert_eq!(state, c.state, "{}: a rejection changes nothing", c.name);
            }
        }
    }

    #[test]
    fn rule_1_timing_and_closed() {
        let closed = AuctionState {
            closed: true,
            ..led("alice", 500, 100)
        };
        let base = led("alice", 500, 100);
        let alice = Some(leader(1, "alice", 500));
        run_cases(vec![
            Case {
                name: "settled auction rejects even in time",
                terms: terms(),
                state: closed.clone(),
                bid: bid(2, "bob", 1_000, 50),
                outcome: rejected(RejectReason::AuctionClosed),
                displaced: None,
                price: Some(100),
                leader: alice.clone(),
                ends_at: t(100),
            },
            Case {
                name: "settled auction wins over not started",
                terms: terms(),
                state: closed,
                bid: bid(2, "bob", 1_000, -10),
                outcome: rejected(RejectReason::AuctionClosed),
                displaced: None,
                price: Some(100),
                leader: alice.clone(),
                ends_at: t(100),
            },
            Case {
                name: "before starts_at",
                terms: terms(),
                state: AuctionState::opening(t(100)),
                bid: bid(2, "bob", 1_000, -1),
                outcome: rejected(RejectReason::AuctionNotStarted),
                displaced: None,
                price: None,
                leader: None,
                ends_at: t(100),
            },
            Case {
                name: "exactly at starts_at is allowed",
                terms: terms(),
                state: AuctionState::opening(t(100)),
                bid: bid(2, "bob", 1_000, 0),
                outcome: Outcome::Leading,
                displaced: None,
                price: Some(100),
                leader: Some(leader(2, "bob", 1_000)),
                ends_at: t(100),
            },
            Case {
                name: "exactly at ends_at is allowed",
                terms: terms(),
                state: base.clone(),
                bid: bid(2, "bob", 1_000, 100),
                outcome: Outcome::Leading,
                displaced: Some(id(1)),
                price: Some(550),
                leader: Some(leader(2, "bob", 1_000)),
                ends_at: t(100),
            },
            Case {
                name: "after ends_at",
                terms: terms(),
                state: base.clone(),
                bid: bid(2, "bob", 1_000, 101),
                outcome: rejected(RejectReason::AuctionClosed),
                displaced: None,
                price: Some(100),
                leader: alice.clone(),
                ends_at: t(100),
            },
            Case {
                name: "late beats seller check",
                terms: terms(),
                state: base,
                bid: bid(2, SELLER, 1_000, 101),
                outcome: rejected(RejectReason::AuctionClosed),
                displaced: None,
                price: Some(100),
                leader: alice,
                ends_at: t(100),
            },
        ]);
    }

    #[test]
    fn rule_2_seller_cannot_bid() {
        run_cases(vec![
            Case {
                name: "seller first bid",
                terms: terms(),
                state: AuctionState::opening(t(100)),
                bid: bid(2, SELLER, 1_000, 10),
                outcome: rejected(RejectReason::SellerCannotBid),
                displaced: None,
                price: None,
                leader: None,
                ends_at: t(100),
            },
            Case {
                name: "seller shill bid against a leader",
                terms: terms(),
                state: led("alice", 500, 100),
                bid: bid(2, SELLER, 400, 10),
                outcome: rejected(RejectReason::SellerCannotBid),
                displaced: None,
                price: Some(100),
                leader: Some(leader(1, "alice", 500)),
                ends_at: t(100),
            },
            Case {
                name: "seller below minimum is still seller_cannot_bid",
                terms: terms(),
                state: AuctionState::opening(t(100)),
                bid: bid(2, SELLER, 1, 10),
                outcome: rejected(RejectReason::SellerCannotBid),
                displaced: None,
                price: None,
                leader: None,
                ends_at: t(100),
            },
        ]);
    }

    #[test]
    fn rule_3_first_bid() {
        let open = AuctionState::opening(t(100));
        let first = |n, amount, outcome, price: Option<i64>| Case {
            name: "first bid",
            terms: terms(),
            state: open.clone(),
            bid: bid(n, "bob", amount, 10),
            outcome,
            displaced: None,
            price,
            leader: price.map(|_| leader(n, "bob", amount)),
            ends_at: t(100),
        };
        run_cases(vec![
            Case {
                name: "below starting price",
                ..first(2, 99, rejected(RejectReason::BelowMinimum), None)
            },
            Case {
                name: "zero",
                ..first(2, 0, rejected(RejectReason::BelowMinimum), None)
            },
            Case {
                name: "negative",
                ..first(2, -5, rejected(RejectReason::BelowMinimum), None)
            },
            Case {
                name: "exactly starting price",
                ..first(2, 100, Outcome::Leading, Some(100))
            },
            Case {
                name: "above starting price leads at starting price",
                ..first(2, 10_000, Outcome::Leading, Some(100))
            },
            Case {
                name: "huge maximum",
                ..first(2, 1_000_000_000_000_000, Outcome::Leading, Some(100))
            },
        ]);
    }

    #[test]
    fn rule_4_leader_raises_own_max() {
        let base = led("alice", 500, 150);
        run_cases(vec![
            Case {
                name: "raise keeps price, new bid leads, old displaced",
                terms: terms(),
                state: base.clone(),
                bid: bid(2, "alice", 800, 10),
                outcome: Outcome::Leading,
                displaced: Some(id(1)),
                price: Some(150),
                leader: Some(leader(2, "alice", 800)),
                ends_at: t(100),
            },
            Case {
                name: "raise by one unit is enough (no increment for own max)",
                terms: terms(),
                state: base.clone(),
                bid: bid(2, "alice", 501, 10),
                outcome: Outcome::Leading,
                displaced: Some(id(1)),
                price: Some(150),
                leader: Some(leader(2, "alice", 501)),
                ends_at: t(100),
            },
            Case {
                name: "equal to own max",
                terms: terms(),
                state: base.clone(),
                bid: bid(2, "alice", 500, 10),
                outcome: rejected(RejectReason::NotAboveOwnMax),
                displaced: None,
                price: Some(150),
                leader: Some(leader(1, "alice", 500)),
                ends_at: t(100),
            },
            Case {
                name: "below own max (even below next minimum)",
                terms: terms(),
                state: base,
                bid: bid(2, "alice", 120, 10),
                outcome: rejected(RejectReason::NotAboveOwnMax),
                displaced: None,
                price: Some(150),
                leader: Some(leader(1, "alice", 500)),
                ends_at: t(100),
            },
        ]);
    }

    #[test]
    fn rule_5_below_next_minimum() {
        // Price 150 in the 100:25 tier: need 175.
        let base = led("alice", 500, 150);
        let case = |name, amount, outcome, price| Case {
            name,
            terms: terms(),
            state: base.clone(),
            bid: bid(2, "bob", amount, 10),
            outcome,
            displaced: None,
            price: Some(price),
            leader: Some(leader(1, "alice", 500)),
            ends_at: t(100),
        };
        run_cases(vec![
            case(
                "one below need",
                174,
                rejected(RejectReason::BelowMinimum),
                150,
            ),
            case(
                "equal to price",
                150,
                rejected(RejectReason::BelowMinimum),
                150,
            ),
            case("far below", 1, rejected(RejectReason::BelowMinimum), 150),
            // 175 + step(175)=25 = 200.
            case("exactly need is accepted", 175, Outcome::Outbid, 200),
        ]);
        // Need is computed with the step at the current price, across a tier boundary.
        let mut at_boundary = led("alice", 5_000, 490);
        at_boundary.price = Some(490);
        let mut s = at_boundary.clone();
        assert_eq!(next_min_bid(&terms(), &s), 515);
        let a = apply_bid(&terms(), &mut s, &bid(2, "bob", 514, 10));
        assert_eq!(a.outcome, rejected(RejectReason::BelowMinimum));
        let mut s = at_boundary;
        let a = apply_bid(&terms(), &mut s, &bid(2, "bob", 515, 10));
        // 515 + step(515)=50 = 565.
        assert_eq!((a.outcome, a.price_after), (Outcome::Outbid, Some(565)));
    }

    #[test]
    fn rule_6_new_leader() {
        let case = |name, max, price, amount, new_price| Case {
            name,
            terms: terms(),
            state: led("alice", max, price),
            bid: bid(2, "bob", amount, 10),
            outcome: Outcome::Leading,
            displaced: Some(id(1)),
            price: Some(new_price),
            leader: Some(leader(2, "bob", amount)),
            ends_at: t(100),
        };
        run_cases(vec![
            // leader max 500 -> 500 + step(500)=50 = 550.
            case("capped at leader max plus step", 500, 100, 1_000, 550),
            case("amount below leader max plus step", 500, 100, 520, 520),
            case("amount exactly leader max plus step", 500, 100, 550, 550),
            case("one above leader max", 500, 100, 501, 501),
            // leader max 499 -> 499 + step(499)=25 = 524 (step of the leader max's tier).
            case("step taken at leader max tier", 499, 100, 10_000, 524),
            case("leader max equals price", 100, 100, 1_000, 125),
            case(
                "huge amounts do not overflow",
                999_999_999_999_990,
                999_999_999_980_000,
                1_000_000_000_000_000,
                1_000_000_000_000_000,
            ),
        ]);
    }

    #[test]
    fn rule_7_tie_earlier_bid_keeps_lead() {
        let case = |name, max, price, amount| Case {
            name,
            terms: terms(),
            state: led("alice", max, price),
            bid: bid(2, "bob", amount, 10),
            outcome: Outcome::Outbid,
            displaced: None,
            price: Some(amount),
            leader: Some(leader(1, "alice", max)),
            ends_at: t(100),
        };
        run_cases(vec![
            case("tie at leader max", 500, 100, 500),
            case("tie exactly at need", 125, 100, 125),
            case("tie on a tier boundary", 2_500, 1_000, 2_500),
        ]);
    }

    #[test]
    fn rule_8_leader_keeps_lead() {
        let case = |name, max, price, amount, new_price| Case {
            name,
            terms: terms(),
            state: led("alice", max, price),
            bid: bid(2, "bob", amount, 10),
            outcome: Outcome::Outbid,
            displaced: None,
            price: Some(new_price),
            leader: Some(leader(1, "alice", max)),
            ends_at: t(100),
        };
        run_cases(vec![
            // 200 + step(200)=25 = 225.
            case("amount plus step", 1_000, 100, 200, 225),
            // 490 + 25 = 515 > 500: capped at the leader's max.
            case("capped at leader max", 500, 100, 490, 500),
            // 499 + step(499)=25: the step of the bid's tier, not the next one.
            case("step taken at bid's tier", 10_000, 100, 499, 524),
            case("step at tier start", 10_000, 100, 500, 550),
            case("one below leader max", 500, 100, 499, 500),
        ]);
    }

    #[test]
    fn rule_9_reserve() {
        let with_reserve = |reserve| AuctionTerms {
            reserve_price: Some(reserve),
            ..terms()
        };
        run_cases(vec![
            Case {
                name: "first bid meeting reserve jumps to reserve",
                terms: with_reserve(1_000),
                state: AuctionState::opening(t(100)),
                bid: bid(2, "bob", 1_500, 10),
                outcome: Outcome::Leading,
                displaced: None,
                price: Some(1_000),
                leader: Some(leader(2, "bob", 1_500)),
                ends_at: t(100),
            },
            Case {
                name: "first bid exactly at reserve",
                terms: with_reserve(1_000),
                state: AuctionState::opening(t(100)),
                bid: bid(2, "bob", 1_000, 10),
                outcome: Outcome::Leading,
                displaced: None,
                price: Some(1_000),
                leader: Some(leader(2, "bob", 1_000)),
                ends_at: t(100),
            },
            Case {
                name: "first bid below reserve stays at starting price",
                terms: with_reserve(1_000),
                state: AuctionState::opening(t(100)),
                bid: bid(2, "bob", 999, 10),
                outcome: Outcome::Leading,
                displaced: None,
                price: Some(100),
                leader: Some(leader(2, "bob", 999)),
                ends_at: t(100),
            },
            Case {
                name: "leader raising past reserve lifts the price",
                terms: with_reserve(1_000),
                state: led("alice", 500, 100),
                bid: bid(2, "alice", 2_000, 10),
                outcome: Outcome::Leading,
                displaced: Some(id(1)),
                price: Some(1_000),
                leader: Some(leader(2, "alice", 2_000)),
                ends_at: t(100),
            },
            Case {
                name: "new leader past reserve: reserve above rule 6 price",
                terms: with_reserve(1_000),
                state: led("alice", 500, 100),
                bid: bid(2, "bob", 5_000, 10),
                outcome: Outcome::Leading,
                displaced: Some(id(1)),
                price: Some(1_000),
                leader: Some(leader(2, "bob", 5_000)),
                ends_at: t(100),
            },
            Case {
                name: "outbid bid does not lift past a leader below reserve",
                terms: with_reserve(1_000),
                state: led("alice", 900, 100),
                bid: bid(2, "bob", 600, 10),
                outcome: Outcome::Outbid,
                displaced: None,
                price: Some(650),
                leader: Some(leader(1, "alice", 900)),
                ends_at: t(100),
            },
            Case {
                name: "reserve below rule price leaves it",
                terms: with_reserve(200),
                state: led("alice", 1_000, 100),
                bid: bid(2, "bob", 600, 10),
                outcome: Outcome::Outbid,
                displaced: None,
                price: Some(650),
                leader: Some(leader(1, "alice", 1_000)),
                ends_at: t(100),
            },
            Case {
                name: "rejected bid does not apply reserve",
                terms: with_reserve(200),
                state: led("alice", 1_000, 100),
                bid: bid(2, "bob", 110, 10),
                outcome: rejected(RejectReason::BelowMinimum),
                displaced: None,
                price: Some(100),
                leader: Some(leader(1, "alice", 1_000)),
                ends_at: t(100),
            },
        ]);
    }

    #[test]
    fn rule_10_soft_close() {
        // Ends t(100), window 30 s, cap t(150).
        let soft = AuctionTerms {
            soft_close: Duration::seconds(30),
            max_end_at: t(150),
            ..terms()
        };
        let case = |name, terms: &AuctionTerms, state: AuctionState, b: BidInput, ends| {
            let mut s = state.clone();
            let a = apply_bid(terms, &mut s, &b);
            Case {
                name,
                terms: terms.clone(),
                state,
                bid: b,
                outcome: a.outcome,
                displaced: a.displaced,
                price: a.price_after,
                leader: s.leader,
                ends_at: ends,
            }
        };
        let base = led("alice", 500, 100);
        let hard = terms();
        let late_start = AuctionState {
            ends_at: t(140),
            ..base.clone()
        };
        let capped_soft = AuctionTerms {
            max_end_at: t(110),
            ..soft.clone()
        };
        let cap_before_end = AuctionTerms {
            max_end_at: t(90),
            ..soft.clone()
        };
        run_cases(vec![
            case(
                "outside window",
                &soft,
                base.clone(),
                bid(2, "bob", 200, 60),
                t(100),
            ),
            case(
                "exactly at window start is outside",
                &soft,
                base.clone(),
                bid(2, "bob", 200, 70),
                t(100),
            ),
            case(
                "just inside window",
                &soft,
                base.clone(),
                bid(2, "bob", 200, 71),
                t(101),
            ),
            case(
                "at ends_at",
                &soft,
                base.clone(),
                bid(2, "bob", 200, 100),
                t(130),
            ),
            case(
                "outbid bid extends too",
                &soft,
                base.clone(),
                bid(2, "bob", 150, 90),
                t(120),
            ),
            case(
                "leader raise extends",
                &soft,
                base.clone(),
                bid(2, "alice", 900, 90),
                t(120),
            ),
            case(
                "rejected bid never extends",
                &soft,
                base.clone(),
                bid(2, "bob", 101, 90),
                t(100),
            ),
            case(
                "seller bid never extends",
                &soft,
                base.clone(),
                bid(2, SELLER, 900, 90),
                t(100),
            ),
            case(
                "hard close never extends",
                &hard,
                base.clone(),
                bid(2, "bob", 200, 99),
                t(100),
            ),
            case(
                "capped at max_end_at",
                &capped_soft,
                base.clone(),
                bid(2, "bob", 200, 99),
                t(110),
            ),
            case(
                "already extended ends_at, extension to cap",
                &soft,
                late_start.clone(),
                bid(2, "bob", 200, 130),
                t(150),
            ),
            case(
                "extension past cap is clamped",
                &soft,
                late_start,
                bid(2, "bob", 200, 139),
                t(150),
            ),
            case(
                "cap before ends_at never shrinks",
                &cap_before_end,
                base,
                bid(2, "bob", 200, 95),
                t(100),
            ),
        ]);
    }

    #[test]
    fn soft_close_sequence_extends_repeatedly_up_to_cap() {
        let soft = AuctionTerms {
            soft_close: Duration::seconds(30),
            max_end_at: t(160),
            ..terms()
        };
        let mut s = AuctionState::opening(t(100));
        let steps: &[(&str, i64, i64, i64)] = &[
            ("a", 100, 80, 110),
            ("b", 200, 105, 135),
            ("a", 300, 130, 160),
            ("b", 400, 159, 160),
        ];
        for (n, &(who, amount, at, ends)) in steps.iter().enumerate() {
            let a = apply_bid(&soft, &mut s, &bid(n as u128 + 10, who, amount, at));
            assert_ne!(a.outcome, rejected(RejectReason::AuctionClosed));
            assert_eq!(s.ends_at, t(ends), "after bid {n}");
        }
        let a = apply_bid(&soft, &mut s, &bid(99, "a", 10_000, 161));
        assert_eq!(a.outcome, rejected(RejectReason::AuctionClosed));
    }

    #[test]
    fn full_auction_scenario() {
        let terms = AuctionTerms {
            reserve_price: Some(600),
            ..terms()
        };
        let mut s = AuctionState::opening(t(100));
        assert_eq!(next_min_bid(&terms, &s), 100);
        assert_eq!(reserve_met(&terms, &s), Some(false));
        // (bidder, amount, outcome, displaced bid, price after, next minimum)
        type Step = (&'static str, i64, Outcome, Option<u128>, i64, i64);
        let script: &[Step] = &[
            ("alice", 300, Outcome::Leading, None, 100, 125),
            ("bob", 200, Outcome::Outbid, None, 225, 250),
            ("bob", 300, Outcome::Outbid, None, 300, 325),
            ("bob", 400, Outcome::Leading, Some(1), 325, 350),
            ("bob", 700, Outcome::Leading, Some(4), 600, 650),
            ("carol", 650, Outcome::Outbid, None, 700, 750),
        ];
        for (i, &(who, amount, outcome, displaced, price, next)) in script.iter().enumerate() {
            let n = i as u128 + 1;
            let a = apply_bid(&terms, &mut s, &bid(n, who, amount, 10 + i as i64));
            assert_eq!(a.outcome, outcome, "bid {n}");
            assert_eq!(a.displaced, displaced.map(id), "bid {n}");
            assert_eq!(a.price_after, Some(price), "bid {n}");
            assert_eq!(next_min_bid(&terms, &s), next, "bid {n}");
        }
        assert_eq!(s.bid_count, 6);
        assert_eq!(reserve_met(&terms, &s), Some(true));
        let winner = settle(&terms, &mut s);
        assert_eq!(winner, Some(leader(5, "bob", 700)));
        assert!(s.closed);
        assert_eq!(s.price, Some(700));
        let a = apply_bid(&terms, &mut s, &bid(50, "carol", 5_000, 20));
        assert_eq!(a.outcome, rejected(RejectReason::AuctionClosed));
        assert_eq!(s.bid_count, 6);
    }

    #[test]
    fn next_min_bid_cases() {
        let cases: &[(Option<i64>, i64)] = &[
            (None, 100),
            (Some(100), 125),
            (Some(99), 104),
            (Some(499), 524),
            (Some(500), 550),
            (Some(500_000), 510_000),
            (Some(i64::MAX), i64::MAX),
        ];
        for &(price, expected) in cases {
            let s = match price {
                None => AuctionState::opening(t(100)),
                Some(p) => led("alice", p, p),
            };
            assert_eq!(next_min_bid(&terms(), &s), expected, "price {price:?}");
        }
    }

    #[test]
    fn reserve_met_and_settle_cases() {
        let with_reserve = |r| AuctionTerms {
            reserve_price: r,
            ..terms()
        };
        let open = AuctionState::opening(t(100));
        // (reserve, state, reserve_met, winner)
        type SettleCase = (Option<i64>, AuctionState, Option<bool>, Option<Leader>);
        let cases: Vec<SettleCase> = vec![
            (None, open.clone(), None, None),
            (Some(1_000), open, Some(false), None),
            (
                None,
                led("alice", 500, 100),
                None,
                Some(leader(1, "alice", 500)),
            ),
            (Some(1_000), led("alice", 999, 100), Some(false), None),
            (
                Some(1_000),
                led("alice", 1_000, 1_000),
                Some(true),
                Some(leader(1, "alice", 1_000)),
            ),
            (
                Some(1_000),
                led("alice", 5_000, 1_000),
                Some(true),
                Some(leader(1, "alice", 5_000)),
            ),
        ];
        for (i, (reserve, state, met, winner)) in cases.into_iter().enumerate() {
            let terms = with_reserve(reserve);
            assert_eq!(reserve_met(&terms, &state), met, "case {i}");
            let mut s = state.clone();
            assert_eq!(settle(&terms, &mut s), winner, "case {i}");
            assert!(s.closed, "case {i}");
            assert_eq!(
                s,
                AuctionState {
                    closed: true,
                    ..state
                },
                "case {i}: settle only closes"
            );
            // Settling again is harmless and gives the same answer.
            assert_eq!(settle(&terms, &mut s), winner, "case {i}: idempotent");
        }
    }

    #[test]
    fn extreme_values_do_not_panic() {
        let big = AuctionTerms {
            starting_price: 1,
            increments: Increments::new(tiers(&[(0, i64::MAX)])).unwrap(),
            soft_close: Duration::seconds(i64::MAX / 1_000),
            max_end_at: DateTime::<Utc>::MAX_UTC,
            ..terms()
        };
        let mut s = AuctionState::opening(t(100));
        for (n, amount) in [1, i64::MAX - 1, i64::MAX].into_iter().enumerate() {
            apply_bid(&big, &mut s, &bid(n as u128, "a", amount, 50));
            apply_bid(&big, &mut s, &bid(n as u128 + 10, "b", amount, 50));
        }
        assert!(s.price <= s.leader.as_ref().map(|l| l.max_amount));
        assert_eq!(s.ends_at, DateTime::<Utc>::MAX_UTC);
        assert_eq!(next_min_bid(&big, &s), i64::MAX);
    }

    // ---- property tests ----

    #[derive(Debug, Clone)]
    struct Scenario {
        terms: AuctionTerms,
        ends_at: DateTime<Utc>,
        bids: Vec<BidInput>,
    }

    fn increments_strategy() -> impl Strategy<Value = Increments> {
        prop_oneof![
            Just(Increments::default_table()),
            prop::collection::vec((1i64..100_000, 1i64..5_000), 0..8).prop_map(|raw| {
                let mut from = 0;
                let mut tiers = vec![IncrementTier {
                    from: 0,
                    step: raw.first().map_or(1, |r| r.1),
                }];
                for (gap, step) in raw.into_iter().skip(1) {
                    from += gap;
                    tiers.push(IncrementTier { from, step });
                }
                Increments::new(tiers).expect("generated table is valid")
            }),
        ]
    }

    fn scenario_strategy(max_amount: i64) -> impl Strategy<Value = Scenario> {
        let bidder = prop_oneof![
            1 => Just(SELLER.to_owned()),
            9 => prop::sample::select(vec!["ann", "ben", "cat", "dan", "eve"]).prop_map(str::to_owned),
        ];
        // Times in seconds relative to starts_at = t(0); the auction ends at t(100).
        let one_bid = (bidder, 1i64..max_amount, -20i64..220);
        (
            1i64..10_000,
            prop::option::of(1i64..max_amount),
            prop_oneof![Just(0i64), 1i64..60],
            -30i64..120,
            increments_strategy(),
            prop::collection::vec(one_bid, 0..60),
        )
            .prop_map(
                move |(starting_price, reserve, soft_s, cap_extra, increments, raw)| {
                    let ends_at = t(100);
                    let terms = AuctionTerms {
                        seller_id: SELLER.to_owned(),
                        starting_price,
                        reserve_price: reserve,
                        increments,
                        starts_at: t(0),
                        soft_close: Duration::seconds(soft_s),
                        max_end_at: t(100 + cap_extra),
                    };
                    let bids = raw
                        .into_iter()
                        .enumerate()
                        .map(|(i, (bidder_id, amount, at))| BidInput {
                            id: Uuid::from_u128(i as u128 + 1),
                            bidder_id,
                            amount,
                            received_at: t(at),
                        })
                        .collect();
                    Scenario {
                        terms,
                        ends_at,
                        bids,
                    }
                },
            )
    }

    fn run(sc: &Scenario) -> (AuctionState, Vec<Applied>) {
        let mut state = AuctionState::opening(sc.ends_at);
        let applied = sc
            .bids
            .iter()
            .map(|b| apply_bid(&sc.terms, &mut state, b))
            .collect();
        (state, applied)
    }

    fn check_invariants(sc: &Scenario) -> Result<(), TestCaseError> {
        let mut state = AuctionState::opening(sc.ends_at);
        let bound = sc.ends_at.max(sc.terms.max_end_at);
        let mut highest_accepted: Option<i64> = None;
        let mut accepted = 0i64;
        for b in &sc.bids {
            let before = state.clone();
            let a = apply_bid(&sc.terms, &mut state, b);

            prop_assert_eq!(a.price_after, state.price);
            prop_assert_eq!(state.price.is_some(), state.leader.is_some());
            if let (Some(p0), Some(p1)) = (before.price, state.price) {
                prop_assert!(p1 >= p0, "price went down: {} -> {}", p0, p1);
            }
            prop_assert!(before.price.is_none() || state.price.is_some());
            if let (Some(p), Some(l)) = (state.price, &state.leader) {
                prop_assert!(p <= l.max_amount, "price {} above max {}", p, l.max_amount);
                prop_assert!(p >= sc.terms.starting_price);
                if let Some(r) = sc.terms.reserve_price {
                    if l.max_amount >= r {
                        prop_assert!(p >= r);
                    }
                }
            }
            prop_assert!(state.ends_at >= before.ends_at);
            prop_assert!(state.ends_at <= bound);

            match a.outcome {
                Outcome::Rejected(_) => {
                    prop_assert_eq!(&state, &before);
                    prop_assert_eq!(a.displaced, None);
                }
                Outcome::Leading => {
                    accepted += 1;
                    highest_accepted = highest_accepted.max(Some(b.amount));
                    prop_assert_eq!(state.leader.as_ref().map(|l| l.bid_id), Some(b.id));
                    prop_assert_eq!(a.displaced, before.leader.as_ref().map(|l| l.bid_id));
                }
                Outcome::Outbid => {
                    accepted += 1;
                    highest_accepted = highest_accepted.max(Some(b.amount));
                    prop_assert_eq!(&state.leader, &before.leader);
                    prop_assert_eq!(a.displaced, None);
                }
            }
            if b.bidder_id == SELLER {
                prop_assert!(matches!(a.outcome, Outcome::Rejected(_)));
            }
            prop_assert_eq!(
                state.leader.as_ref().map(|l| l.max_amount),
                highest_accepted
            );
            prop_assert_eq!(state.bid_count, accepted);
            prop_assert!(!state.closed);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn prop_invariants_hold(sc in scenario_strategy(10_000_000)) {
            check_invariants(&sc)?;
        }

        #[test]
        fn prop_invariants_hold_near_max_money(sc in scenario_strategy(1_000_000_000_000_000)) {
            check_invariants(&sc)?;
        }

        #[test]
        fn prop_deterministic(sc in scenario_strategy(10_000_000)) {
            let first = run(&sc);
            let second = run(&sc);
            prop_assert_eq!(first, second);
        }

        #[test]
        fn prop_settle_matches_reserve(sc in scenario_strategy(10_000_000)) {
            let (mut state, _) = run(&sc);
            let before = state.clone();
            let met = reserve_met(&sc.terms, &state);
            let winner = settle(&sc.terms, &mut state);
            prop_assert!(state.closed);
            match met {
                Some(false) => prop_assert_eq!(winner, None),
                _ => prop_assert_eq!(winner, before.leader.clone()),
            }
            // Nothing is accepted once settled.
            for b in &sc.bids {
                let after = state.clone();
                let a = apply_bid(&sc.terms, &mut state, b);
                prop_assert_eq!(a.outcome, Outcome::Rejected(RejectReason::AuctionClosed));
                prop_assert_eq!(&state, &after);
            }
        }

        #[test]
        fn prop_step_at_matches_linear_scan(inc in increments_strategy(), price in -10i64..2_000_000) {
            let expected = inc
                .tiers()
                .iter()
                .rev()
                .find(|t| t.from <= price)
                .map_or(inc.tiers()[0].step, |t| t.step);
            prop_assert_eq!(inc.step_at(price), expected);
        }
    }

    #[test]
    fn min_bid_floor_follows_shrinking_steps() {
        let mut t = terms();
        t.increments = Increments::new(vec![
            IncrementTier { from: 0, step: 100 },
            IncrementTier { from: 150, step: 1 },
        ])
        .unwrap();
        // At 100 the next minimum is 200, but at 150 it is 151.
        assert_eq!(min_bid_floor(&t, 100), 151);
        assert_eq!(min_bid_floor(&t, 150), 151);
        let default = terms();
        assert_eq!(
            min_bid_floor(&default, 1000),
            1000 + default.increments.step_at(1000)
        );
    }

    proptest! {
        #[test]
        fn prop_min_bid_floor_bounds_every_later_minimum(
            steps in proptest::collection::vec((1i64..500, 1i64..300), 1..6),
            price in 0i64..5_000,
            later in 0i64..5_000,
        ) {
            let mut from = 0;
            let mut tiers = Vec::new();
            for (gap, step) in steps {
                tiers.push(IncrementTier { from, step });
                from += gap;
            }
            let mut t = terms();
            t.increments = Increments::new(tiers).unwrap();
            let p = price + later;
            prop_assert!(min_bid_floor(&t, price) <= p + t.increments.step_at(p));
        }
    }
}
