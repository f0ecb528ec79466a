//! The batch planner: from what a resolution transaction read, which bids
//! of each auction it applies, their outcomes by the pure
//! [`rules`](crate::rules), each auction's new state, and whether it
//! settles. No database and no clock of its own: the transaction reads,
//! this decides, the transaction writes.
//!
//! Within a batch bids are applied in receipt order (`received_at`, then
//! `seq`). Near the end of a soft-close auction a bid received after the
//! current end is held back until every bid received before it must have
//! committed (the settle grace), because such an earlier bid may still
//! extend the end and make the later one valid.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::Step;
use crate::db::auctions::AuctionRecord;
use crate::db::bids::{BidOutcome, BidRecord, PendingBid, PendingRead, Progress, Resolution};
use crate::domain::BidStatus;
use crate::rules::{self, AuctionState, Leader};

/// What a resolution transaction read once it had taken its locks.
pub(super) struct Snapshot {
    /// The database's clock in the transaction.
    pub now: DateTime<Utc>,
    /// The auctions this transaction holds the lock of.
    pub locked: HashSet<Uuid>,
    /// The auctions read, by id.
    pub auctions: HashMap<Uuid, AuctionRecord>,
    /// The resolver's progress through each auction's bids, by id.
    progress: HashMap<Uuid, Progress>,
    /// Their next pending bids, by auction and then in receipt order.
    pending: Vec<PendingBid>,
    /// The transactions the read of `pending` saw in progress.
    in_progress: Vec<i64>,
}

impl Snapshot {
    /// Puts `pending` in the order the planner applies it.
    pub fn new(
        now: DateTime<Utc>,
        locked: HashSet<Uuid>,
        auctions: impl IntoIterator<Item = (AuctionRecord, Progress)>,
        read: PendingRead,
    ) -> Self {
        let PendingRead {
            bids: mut pending,
            in_progress,
        } = read;
        pending.sort_by_key(|p| (p.bid.auction_id, p.bid.received_at, p.bid.seq));
        let (auctions, progress) = auctions
            .into_iter()
            .map(|(a, p)| {
                let id = a.id;
                ((id, a), (id, p))
            })
            .unzip();
        Snapshot {
            now,
            locked,
            auctions,
            progress,
            pending,
            in_progress,
        }
    }
}

/// What a resolution transaction writes.
pub(super) struct Plan<'a> {
    /// The auctions with nothing to write (busy or idle), in the order asked.
    pub steps: Vec<(Uuid, Step)>,
    /// Every applied bid's outcome, batch after batch.
    pub outcomes: Vec<BidOutcome>,
    /// The auctions with something to write.
    pub batches: Vec<Batch<'a>>,
}

/// One auction's part of a resolution transaction.
pub(super) struct Batch<'a> {
    pub auction_id: Uuid,
    /// The version the transaction writes (one above the one read).
    pub version: i64,
    pub state: AuctionState,
    pub resolved_count: i64,
    /// `Some(winner)` when the batch settles the auction.
    pub settlement: Option<Option<Leader>>,
    /// The bids applied, in resolution order.
    pub applied: Vec<&'a BidRecord>,
    /// Their outcomes' place among the plan's.
    pub outcomes: Range<usize>,
    /// Bids leading before the batch that it outbid.
    pub displaced_earlier: Vec<Uuid>,
    /// Whether pending bids remain beyond the batch.
    pub more: bool,
    /// The auction's progress after the batch; `None` leaves it as it is.
    pub progress: Option<Progress>,
}

/// Plans the batches of `auction_ids` (distinct) from `snapshot`, each
/// auction having taken at most `limit` pending bids; auctions are settled
/// `grace` after their end.
pub(super) fn plan<'a>(
    snapshot: &'a Snapshot,
    auction_ids: &[Uuid],
    limit: i64,
    grace: chrono::Duration,
) -> Plan<'a> {
    let pending_of: HashMap<Uuid, &[PendingBid]> = snapshot
        .pending
        .chunk_by(|a, b| a.bid.auction_id == b.bid.auction_id)
        .map(|bids| (bids[0].bid.auction_id, bids))
        .collect();
    let mut plan = Plan {
        steps: Vec::with_capacity(auction_ids.len()),
        outcomes: Vec::new(),
        batches: Vec::new(),
    };
    for &auction_id in auction_ids {
        if !snapshot.locked.contains(&auction_id) {
            plan.steps.push((auction_id, Step::Busy));
            continue;
        }
        let pending = pending_of.get(&auction_id).copied().unwrap_or_default();
        let Some(auction) = snapshot.auctions.get(&auction_id) else {
            if !pending.is_empty() {
                tracing::error!(%auction_id, "pending bids reference an unknown auction");
            }
            plan.steps.push((auction_id, Step::Idle));
            continue;
        };
        let read_after = pending.iter().filter(|p| !p.reopened).count();
        let full = read_after as i64 == limit;
        match plan_batch(
            auction,
            pending,
            full,
            snapshot.now,
            grace,
            &mut plan.outcomes,
        ) {
            Some(mut batch) => {
                let old = snapshot
                    .progress
                    .get(&auction_id)
                    .cloned()
                    .unwrap_or_default();
                batch.progress = progress(&old, pending, &batch, &snapshot.in_progress);
                plan.batches.push(batch);
            }
            None => plan.steps.push((auction_id, Step::Idle)),
        }
    }
    plan
}

/// Applies `pending` (an auction's oldest pending bids in receipt order;
/// `full` when more may be waiting) to `auction` by the rules, appending
/// the bids' outcomes to `outcomes`, and settles the auction if it is due;
/// `None` when there is nothing to write.
fn plan_batch<'a>(
    auction: &AuctionRecord,
    pending: &'a [PendingBid],
    full: bool,
    now: DateTime<Utc>,
    grace: chrono::Duration,
    outcomes: &mut Vec<BidOutcome>,
) -> Option<Batch<'a>> {
    let terms = &auction.terms;
    // Bids received after the current end of a soft-close auction wait
    // until every earlier bid must have committed (see the module docs).
    let held_back = |bid: &BidRecord, ends_at: DateTime<Utc>| {
        terms.soft_close > chrono::Duration::zero()
            && !auction.state.closed
            && bid.received_at > ends_at
            && now < bid.received_at + grace
    };
    let version = auction.version + 1;
    let first = outcomes.len();
    let mut state = auction.state.clone();
    let mut position: HashMap<Uuid, usize> = HashMap::with_capacity(pending.len());
    let mut displaced_earlier = Vec::new();
    let mut resolved_count = auction.resolved_count;
    let mut applied = Vec::with_capacity(pending.len());
    for PendingBid { bid, .. } in pending {
        // Sorted by receipt: every later bid would be held back too.
        if held_back(bid, state.ends_at) {
            break;
        }
        let outcome = rules::apply_bid(terms, &mut state, &bid.input());
        if let Some(displaced) = outcome.displaced {
            match position.get(&displaced) {
                Some(&i) => outcomes[i].resolution.status = BidStatus::Outbid,
                None => displaced_earlier.push(displaced),
            }
        }
        resolved_count += 1;
        position.insert(bid.id, outcomes.len());
        outcomes.push(BidOutcome {
            auction_id: auction.id,
            id: bid.id,
            seq: bid.seq,
            resolution: Resolution::new(&outcome, resolved_count, version),
        });
        applied.push(bid);
    }
    let all_applied = applied.len() == pending.len();
    // Settle only when nothing received before the end can still be pending.
    let settling = !state.closed && !full && all_applied && now > state.ends_at + grace;
    if applied.is_empty() && !settling {
        return None;
    }
    let settlement = settling.then(|| rules::settle(terms, &mut state));
    Some(Batch {
        auction_id: auction.id,
        version,
        state,
        resolved_count,
        settlement,
        applied,
        outcomes: first..outcomes.len(),
        displaced_earlier,
        more: full && all_applied,
        progress: None,
    })
}

/// The auction's progress once `batch` is applied (see [`Progress`] for
/// why no bid is skipped; `None` when the batch applied nothing, and the
/// progress stays). The position moves past the longest run of bids read
/// after the old one, in (transaction, sequence) order, that the batch
/// applied. Open are the transactions of `in_progress` below the new
/// position, and those of bids read there that the batch did not apply.
/// Ahead are the bids applied, now or before, that the new progress
/// still covers.
fn progress(
    old: &Progress,
    pending: &[PendingBid],
    batch: &Batch<'_>,
    in_progress: &[i64],
) -> Option<Progress> {
    if batch.applied.is_empty() {
        return None;
    }
    let applied: HashSet<Uuid> = batch.applied.iter().map(|b| b.id).collect();
    let mut after: Vec<&PendingBid> = pending.iter().filter(|p| !p.reopened).collect();
    after.sort_by_key(|p| (p.xid, p.bid.seq));
    let (xid, seq) = after
        .iter()
        .take_while(|p| applied.contains(&p.bid.id))
        .last()
        .map_or((old.xid, old.seq), |p| (p.xid, p.bid.seq));
    let unapplied = (pending.iter())
        .filter(|p| p.reopened && !applied.contains(&p.bid.id))
        .map(|p| p.xid);
    let mut open_xids: Vec<i64> = (in_progress.iter().copied())
        .filter(|&x| x < xid)
        .chain(unapplied)
        .collect();
    open_xids.sort_unstable();
    open_xids.dedup();
    let mut new = Progress {
        xid,
        seq,
        open_xids,
        ahead: Vec::new(),
    };
    let applied_now = (pending.iter())
        .filter(|p| applied.contains(&p.bid.id))
        .map(|p| (p.xid, p.bid.seq));
    let mut ahead: Vec<(i64, i64)> = (old.ahead.iter().copied())
        .chain(applied_now)
        .filter(|&(x, s)| new.covers(x, s))
        .collect();
    ahead.sort_unstable();
    ahead.dedup();
    new.ahead = ahead;
    Some(new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{AuctionTerms, Increments, Outcome, RejectReason};

    const GRACE: chrono::Duration = chrono::Duration::seconds(5);

    /// `s` seconds after the auctions' start.
    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    /// An auction without bids, ending at `t(1_000)`, read at `version`.
    fn auction(soft_close_s: i64, version: i64) -> AuctionRecord {
        AuctionRecord {
            id: Uuid::now_v7(),
            title: "A lamp".into(),
            currency: "EUR".into(),
            terms: AuctionTerms {
                seller_id: "seller".into(),
                starting_price: 100,
                reserve_price: None,
                increments: Increments::default_table(),
                starts_at: t(0),
                soft_close: chrono::Duration::seconds(soft_close_s),
                max_end_at: t(10_000),
            },
            original_ends_at: t(1_000),
            soft_close_s: soft_close_s as i32,
            state: AuctionState::opening(t(1_000)),
            resolved_count: 0,
            winner_id: None,
            version,
        }
    }

    /// A pending bid on `auction`: `(seq, bidder, amount, received at)`.
    fn pending(
        auction: &AuctionRecord,
        (seq, bidder, amount, at): (i64, &str, i64, i64),
    ) -> PendingBid {
        PendingBid {
            bid: BidRecord {
                auction_id: auction.id,
                id: Uuid::now_v7(),
                seq,
                bidder_id: bidder.into(),
                amount,
                status: BidStatus::Pending,
                reason: None,
                price_after: None,
                received_at: t(at),
                resolved_at: None,
                resolution_no: None,
            },
            xid: 100 + seq,
            reopened: false,
        }
    }

    /// What a transaction at `t(now)` holding the lock of `auction` reads,
    /// with its pending `bids`.
    fn read(now: i64, auction: &AuctionRecord, bids: &[(i64, &str, i64, i64)]) -> Snapshot {
        let bids = bids.iter().map(|&bid| pending(auction, bid)).collect();
        read_with(now, auction, bids, vec![])
    }

    /// What a transaction at `t(now)` holding the lock of `auction` reads,
    /// with `bids`, its snapshot seeing `in_progress`.
    fn read_with(
        now: i64,
        auction: &AuctionRecord,
        bids: Vec<PendingBid>,
        in_progress: Vec<i64>,
    ) -> Snapshot {
        read_after(now, auction, Progress::default(), bids, in_progress)
    }

    /// [`read_with`] once the resolver has come to `progress`.
    fn read_after(
        now: i64,
        auction: &AuctionRecord,
        progress: Progress,
        bids: Vec<PendingBid>,
        in_progress: Vec<i64>,
    ) -> Snapshot {
        let read = PendingRead { bids, in_progress };
        let auctions = [(auction.clone(), progress)];
        Snapshot::new(t(now), HashSet::from([auction.id]), auctions, read)
    }

    /// Each outcome's bid (by sequence number) and status, in the order
    /// recorded.
    fn statuses(plan: &Plan<'_>) -> Vec<(i64, BidStatus)> {
        plan.outcomes
            .iter()
            .map(|o| (o.seq, o.resolution.status))
            .collect()
    }

    #[test]
    fn bids_apply_in_receipt_order_and_an_outbid_leader_of_the_batch_is_marked_in_it() {
        let lamp = auction(0, 7);
        // Bob's bid got the lower sequence number but was received later.
        let read = read(30, &lamp, &[(1, "bob", 1_000, 20), (2, "ann", 500, 10)]);
        let plan = plan(&read, &[lamp.id], 10, GRACE);

        assert!(plan.steps.is_empty());
        assert_eq!(
            statuses(&plan),
            [(2, BidStatus::Outbid), (1, BidStatus::Leading)]
        );
        let numbers: Vec<(i64, i64)> = plan
            .outcomes
            .iter()
            .map(|o| (o.resolution.resolution_no, o.resolution.resolved_version))
            .collect();
        assert_eq!(
            numbers,
            [(1, 8), (2, 8)],
            "numbered in order, at the next version"
        );
        assert!(plan
            .outcomes
            .iter()
            .all(|o| o.resolution.reason.is_none() && o.resolution.price_after.is_some()));
        let [batch] = &plan.batches[..] else {
            panic!("one batch")
        };
        assert_eq!(
            (batch.auction_id, batch.version, batch.resolved_count),
            (lamp.id, 8, 2)
        );
        assert_eq!(batch.outcomes, 0..2);
        assert!(batch.displaced_earlier.is_empty());
        assert_eq!(batch.state.leader.as_ref().unwrap().bidder_id, "bob");
        assert!(batch.settlement.is_none() && !batch.more);
    }

    #[test]
    fn a_leader_of_an_earlier_batch_is_left_to_the_outbid_mark() {
        let mut lamp = auction(0, 3);
        let earlier = Uuid::now_v7();
        let ann = rules::BidInput {
            id: earlier,
            bidder_id: "ann".into(),
            amount: 500,
            received_at: t(5),
        };
        let applied = rules::apply_bid(&lamp.terms, &mut lamp.state, &ann);
        assert_eq!(applied.outcome, Outcome::Leading);
        lamp.resolved_count = 1;
        let read = read(30, &lamp, &[(9, "bob", 1_000, 20)]);
        let plan = plan(&read, &[lamp.id], 10, GRACE);

        assert_eq!(statuses(&plan), [(9, BidStatus::Leading)]);
        assert_eq!(plan.outcomes[0].resolution.resolution_no, 2);
        assert_eq!(plan.batches[0].displaced_earlier, [earlier]);
    }

    #[test]
    fn auctions_locked_elsewhere_without_work_or_unknown_write_nothing() {
        let (busy, idle) = (auction(0, 1), auction(0, 1));
        let unknown = Uuid::now_v7();
        let read = Snapshot::new(
            t(30),
            HashSet::from([idle.id, unknown]),
            [busy.clone(), idle.clone()].map(|a| (a, Progress::default())),
            PendingRead {
                bids: vec![pending(&busy, (1, "ann", 500, 10))],
                in_progress: vec![],
            },
        );
        let plan = plan(&read, &[busy.id, idle.id, unknown], 10, GRACE);

        assert_eq!(
            plan.steps,
            [
                (busy.id, Step::Busy),
                (idle.id, Step::Idle),
                (unknown, Step::Idle)
            ]
        );
        assert!(plan.outcomes.is_empty() && plan.batches.is_empty());
    }

    #[test]
    fn a_bid_after_a_soft_close_end_waits_out_the_grace_then_the_auction_settles() {
        let lamp = auction(60, 1);
        let bids = [(1, "ann", 500, 900), (2, "bob", 900, 1_001)];

        // Within the grace of Bob's bid: an earlier bid might still extend the end.
        let early_read = read(1_002, &lamp, &bids);
        let early = plan(&early_read, &[lamp.id], 10, GRACE);
        assert_eq!(statuses(&early), [(1, BidStatus::Leading)]);
        assert!(early.batches[0].settlement.is_none(), "a bid is held back");
        assert!(!early.batches[0].more);

        let late_read = read(1_010, &lamp, &bids);
        let late = plan(&late_read, &[lamp.id], 10, GRACE);
        assert_eq!(
            statuses(&late),
            [(1, BidStatus::Leading), (2, BidStatus::Rejected)]
        );
        assert_eq!(
            late.outcomes[1].resolution.reason,
            Some(RejectReason::AuctionClosed.as_str())
        );
        let batch = &late.batches[0];
        let winner = batch.settlement.as_ref().expect("settled").as_ref();
        assert_eq!(winner.map(|w| w.bidder_id.as_str()), Some("ann"));
        assert!(batch.state.closed);
    }

    #[test]
    fn a_full_batch_has_more_to_come_and_does_not_settle() {
        let lamp = auction(0, 1);
        let read = read(2_000, &lamp, &[(1, "ann", 500, 10), (2, "bob", 900, 20)]);

        let full = plan(&read, &[lamp.id], 2, GRACE);
        assert!(full.batches[0].more);
        assert!(full.batches[0].settlement.is_none(), "more may be pending");

        let all = plan(&read, &[lamp.id], 3, GRACE);
        assert!(!all.batches[0].more);
        assert!(all.batches[0].settlement.is_some());
    }

    #[test]
    fn an_auction_due_without_bids_settles_without_a_winner() {
        let lamp = auction(0, 4);
        let early_read = read(1_004, &lamp, &[]);
        let early = plan(&early_read, &[lamp.id], 10, GRACE);
        assert_eq!(
            early.steps,
            [(lamp.id, Step::Idle)],
            "not before the grace has passed"
        );

        let due_read = read(1_006, &lamp, &[]);
        let due = plan(&due_read, &[lamp.id], 10, GRACE);
        assert!(due.steps.is_empty() && due.outcomes.is_empty());
        let batch = &due.batches[0];
        assert_eq!(batch.settlement, Some(None));
        assert_eq!((batch.version, batch.outcomes.clone()), (5, 0..0));
    }

    #[test]
    fn the_progress_passes_the_bids_applied_and_keeps_older_transactions_in_progress_open() {
        let lamp = auction(0, 1);
        let bids = vec![
            pending(&lamp, (1, "ann", 500, 10)),
            pending(&lamp, (2, "bob", 900, 11)),
        ];
        // 90, 99 and 150 were in progress: 90 and 99 below the new
        // position, 150 above it.
        let read = read_with(30, &lamp, bids, vec![90, 99, 150]);
        let plan = plan(&read, &[lamp.id], 10, GRACE);

        let expected = Progress {
            xid: 102,
            seq: 2,
            open_xids: vec![90, 99],
            ahead: vec![],
        };
        assert_eq!(plan.batches[0].progress, Some(expected));
    }

    #[test]
    fn the_progress_stops_before_a_bid_held_back_and_lists_the_bids_applied_beyond_it() {
        let lamp = auction(60, 1);
        let bids = [(1, "ann", 500, 900), (2, "bob", 900, 1_001)];
        let early = read(1_002, &lamp, &bids);
        let early_plan = plan(&early, &[lamp.id], 10, GRACE);
        assert_eq!(
            early_plan.batches[0]
                .progress
                .as_ref()
                .map(|p| (p.xid, p.seq)),
            Some((101, 1))
        );

        // Bob's bid, held back, has the lower transaction id: nothing passes.
        let mut held = pending(&lamp, (2, "bob", 900, 1_001));
        held.xid = 50;
        let first = read_with(
            1_002,
            &lamp,
            vec![pending(&lamp, (1, "ann", 500, 900)), held],
            vec![],
        );
        let first_plan = plan(&first, &[lamp.id], 10, GRACE);
        assert_eq!(first_plan.outcomes.len(), 1);
        let ahead = Progress {
            ahead: vec![(101, 1)],
            ..Progress::default()
        };
        assert_eq!(first_plan.batches[0].progress.as_ref(), Some(&ahead));

        // Once the grace has passed, Bob's bid is applied (the read no
        // longer returns Ann's): the position passes it, and Ann's bid
        // stays listed, still after the position.
        let mut held = pending(&lamp, (2, "bob", 900, 1_001));
        held.xid = 50;
        let second = read_after(1_010, &lamp, ahead, vec![held], vec![]);
        let second_plan = plan(&second, &[lamp.id], 10, GRACE);
        let expected = Progress {
            xid: 50,
            seq: 2,
            open_xids: vec![],
            ahead: vec![(101, 1)],
        };
        assert_eq!(second_plan.batches[0].progress, Some(expected));

        // A later bid passed takes Ann's off the list.
        let progress = second_plan.batches[0].progress.clone().unwrap();
        let cay = pending(&lamp, (3, "cay", 2_000, 1_011));
        let third = read_after(1_020, &lamp, progress, vec![cay], vec![]);
        let third_plan = plan(&third, &[lamp.id], 10, GRACE);
        let progress = third_plan.batches[0].progress.clone().unwrap();
        assert_eq!((progress.xid, progress.seq), (103, 3));
        assert!(progress.ahead.is_empty());
    }

    #[test]
    fn a_settlement_alone_leaves_the_progress_as_it_is() {
        let lamp = auction(0, 4);
        let due = read(1_006, &lamp, &[]);
        let plan = plan(&due, &[lamp.id], 10, GRACE);
        assert!(plan.batches[0].settlement.is_some());
        assert_eq!(plan.batches[0].progress, None);
    }

    #[test]
    fn an_open_transaction_stays_open_until_its_bids_are_applied() {
        let lamp = auction(60, 1);
        let mut late = pending(&lamp, (7, "bob", 900, 1_001));
        (late.xid, late.reopened) = (40, true);
        let mut early = pending(&lamp, (8, "cay", 800, 920));
        (early.xid, early.reopened) = (41, true);
        let after = pending(&lamp, (9, "ann", 500, 900));
        let read = read_with(1_002, &lamp, vec![late, early, after], vec![]);
        let plan = plan(&read, &[lamp.id], 10, GRACE);

        // Bob's bid is held back (received after the end, within the grace).
        assert_eq!(plan.outcomes.len(), 2);
        let progress = plan.batches[0].progress.clone().unwrap();
        assert_eq!(
            (progress.xid, progress.seq, progress.open_xids),
            (109, 9, vec![40])
        );
        assert!(
            progress.ahead.is_empty(),
            "cay's transaction is no longer open"
        );
    }

    #[test]
    fn a_bid_applied_from_a_transaction_still_open_is_listed_ahead() {
        let lamp = auction(60, 1);
        let progress = Progress {
            xid: 100,
            seq: 5,
            open_xids: vec![40],
            ahead: vec![],
        };
        let mut late = pending(&lamp, (7, "bob", 900, 1_001));
        (late.xid, late.reopened) = (40, true);
        let mut early = pending(&lamp, (8, "cay", 800, 920));
        (early.xid, early.reopened) = (40, true);
        let read = read_after(1_002, &lamp, progress, vec![late, early], vec![]);
        let plan = plan(&read, &[lamp.id], 10, GRACE);

        // Bob's bid is held back; Cay's, of the same transaction, applied.
        assert_eq!(statuses(&plan), [(8, BidStatus::Leading)]);
        let expected = Progress {
            xid: 100,
            seq: 5,
            open_xids: vec![40],
            ahead: vec![(40, 8)],
        };
        assert_eq!(plan.batches[0].progress, Some(expected));
    }
}
