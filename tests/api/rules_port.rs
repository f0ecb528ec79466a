//! The PL/pgSQL port of the auction rules (`gavel_apply_bid`, which the
//! `row_lock_fn` baseline applies under its lock) against the Rust rules
//! (`rules::apply_bid`): random auctions and bid sequences, each bid
//! applied by both to the state each of them produced, every outcome and
//! every state compared. Terms, bidders, times and amounts are drawn the
//! way the rules' own property tests draw them, with money near its limit,
//! steps large enough to saturate and times to the microsecond.

use chrono::{DateTime, Duration, Utc};
use gavel::rules::{
    self, AuctionState, AuctionTerms, BidInput, IncrementTier, Increments, Leader, Outcome,
};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};
use uuid::Uuid;

use crate::helpers::*;

const SCENARIOS: usize = 300;
const SELLER: &str = "seller";

/// A moment `micros` microseconds after a fixed start.
fn at(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).unwrap() + Duration::microseconds(micros)
}

fn increments() -> impl Strategy<Value = Increments> {
    let tiers = |max_step: i64| {
        prop::collection::vec((1i64..100_000, 1i64..max_step), 1..8).prop_map(|raw| {
            let mut from = 0;
            let tiers = raw.iter().enumerate().map(|(i, &(gap, step))| {
                from += if i == 0 { 0 } else { gap };
                IncrementTier { from, step }
            });
            Increments::new(tiers.collect()).unwrap()
        })
    };
    prop_oneof![
        Just(Increments::default_table()),
        tiers(5_000),
        tiers(i64::MAX),
    ]
}

/// Terms and a state to start from (opening, or already settled), then
/// bids as (bidder, amount, receipt in microseconds from the start).
fn scenario() -> impl Strategy<Value = (AuctionTerms, AuctionState, Vec<BidInput>)> {
    let second = 1_000_000i64;
    let bidder = prop_oneof![
        1 => Just(SELLER),
        9 => prop::sample::select(vec!["ann", "ben", "cat", "dan", "eve"]),
    ];
    let amount = prop_oneof![
        8 => 1i64..20_000,
        1 => 1i64..1_000_000_000_000_000,
        1 => prop::sample::select(vec![-5, 0, 1_000_000_000_000_000, i64::MAX]),
    ];
    let one_bid = (bidder, amount, -20 * second..220 * second);
    (
        (1i64..10_000, prop::option::of(1i64..30_000), increments()),
        (
            prop_oneof![Just(0i32), 1i32..60],
            -30 * second..120 * second,
        ),
        prop::bool::weighted(0.05),
        prop::collection::vec(one_bid, 0..40),
    )
        .prop_map(
            move |((starting_price, reserve, increments), (soft_s, cap), closed, raw)| {
                let terms = AuctionTerms {
                    seller_id: SELLER.to_owned(),
                    starting_price,
                    reserve_price: reserve,
                    increments,
                    starts_at: at(0),
                    soft_close: Duration::seconds(i64::from(soft_s)),
                    max_end_at: at(100 * second + cap),
                };
                let state = AuctionState {
                    closed,
                    ..AuctionState::opening(at(100 * second))
                };
                let bids = raw
                    .into_iter()
                    .enumerate()
                    .map(|(i, (bidder, amount, micros))| BidInput {
                        id: Uuid::from_u128(i as u128 + 1),
                        bidder_id: bidder.to_owned(),
                        amount,
                        received_at: at(micros),
                    })
                    .collect();
                (terms, state, bids)
            },
        )
}

/// What a bid did, in the port's words: status, reason, displaced bid,
/// and the state after it.
type Step = (String, Option<String>, Option<Uuid>, AuctionState);

fn rust_step(terms: &AuctionTerms, state: &mut AuctionState, bid: &BidInput) -> Step {
    let applied = rules::apply_bid(terms, state, bid);
    let (status, reason) = match applied.outcome {
        Outcome::Leading => ("leading", None),
        Outcome::Outbid => ("outbid", None),
        Outcome::Rejected(reason) => ("rejected", Some(reason.as_str().to_owned())),
    };
    assert_eq!(applied.price_after, state.price);
    (status.to_owned(), reason, applied.displaced, state.clone())
}

async fn sql_step(
    db: &tokio_postgres::Client,
    terms: &AuctionTerms,
    state: &AuctionState,
    bid: &BidInput,
) -> Step {
    let increments = serde_json::to_value(terms.increments.tiers()).unwrap();
    let soft_close_s = terms.soft_close.num_seconds() as i32;
    let leader = state.leader.as_ref();
    let row = db
        .query_one(
            "SELECT * FROM gavel_apply_bid($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, \
             $12, $13, $14, $15, $16, $17, $18)",
            &[
                &terms.seller_id,
                &terms.starting_price,
                &terms.reserve_price,
                &increments,
                &terms.starts_at,
                &soft_close_s,
                &terms.max_end_at,
                &leader.map(|l| l.bid_id),
                &leader.map(|l| l.bidder_id.as_str()),
                &leader.map(|l| l.max_amount),
                &state.price,
                &state.bid_count,
                &state.ends_at,
                &state.closed,
                &bid.id,
                &bid.bidder_id,
                &bid.amount,
                &bid.received_at,
            ],
        )
        .await
        .unwrap_or_else(|e| panic!("gavel_apply_bid failed on {bid:?}: {e:?}"));
    let leader = match (
        row.get::<_, Option<Uuid>>("new_leader_bid_id"),
        row.get::<_, Option<String>>("new_leader_bidder_id"),
        row.get::<_, Option<i64>>("new_leader_max"),
    ) {
        (Some(bid_id), Some(bidder_id), Some(max_amount)) => Some(Leader {
            bid_id,
            bidder_id,
            max_amount,
        }),
        _ => None,
    };
    let after = AuctionState {
        leader,
        price: row.get("new_price"),
        bid_count: row.get("new_bid_count"),
        ends_at: row.get("new_ends_at"),
        closed: state.closed,
    };
    (
        row.get("status"),
        row.get("reason"),
        row.get("displaced"),
        after,
    )
}

#[tokio::test]
async fn the_sql_rules_port_matches_the_rust_rules_on_random_bid_sequences() {
    let db = connect(&fresh_database().await).await;
    let mut runner = TestRunner::new(RunnerConfig {
        rng_algorithm: proptest::test_runner::RngAlgorithm::ChaCha,
        ..RunnerConfig::default()
    });
    let (mut bids_applied, mut outcomes_seen) = (0, std::collections::HashSet::new());
    for n in 0..SCENARIOS {
        let (terms, opening, bids) = scenario().new_tree(&mut runner).unwrap().current();
        let (mut rust_state, mut sql_state) = (opening.clone(), opening);
        for (i, bid) in bids.iter().enumerate() {
            let expected = rust_step(&terms, &mut rust_state, bid);
            let got = sql_step(&db, &terms, &sql_state, bid).await;
            assert_eq!(
                got, expected,
                "scenario {n}, bid {i}: {bid:?}\nterms {terms:?}"
            );
            sql_state = got.3;
            outcomes_seen.insert((expected.0, expected.1));
            bids_applied += 1;
        }
    }
    // The draw reaches every outcome, so no branch of the port goes untried.
    assert!(bids_applied > SCENARIOS * 10, "{bids_applied} bids");
    for reason in rules::RejectReason::ALL {
        let seen =
            outcomes_seen.contains(&("rejected".to_owned(), Some(reason.as_str().to_owned())));
        assert!(seen, "some bid was rejected {reason}");
    }
    for status in ["leading", "outbid"] {
        assert!(
            outcomes_seen.contains(&(status.to_owned(), None)),
            "some bid {status}"
        );
    }
}
