//! When each request goes out: the arrival schedule of bids (synthetic or
//! a trace's) and of reads, each request spawned at its intended send time
//! and never waiting for an earlier one's answer.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};

use super::send::{send_bid, send_read};
use super::{Amount, RunAuction, Shared};
use crate::priority::LoweredRuntime;
use crate::record::Kind;
use crate::scenario::{Process, Scenario};
use crate::trace::TraceBid;

/// One bid to send: (offset from second 0, auction, bidder, amount).
type PlannedBid = (Duration, usize, usize, Amount);

/// Sends every bid and read of the run from the `load` runtime; returns
/// once the last one has gone out (not once it is answered).
pub(super) async fn offer(
    load: &LoweredRuntime,
    shared: &Arc<Shared>,
    scenario: &Scenario,
    trace: Option<&[TraceBid]>,
    auctions: &[RunAuction],
    duration_s: f64,
) -> anyhow::Result<()> {
    let readers = load.spawn(schedule_reads(shared.clone(), scenario.clone(), duration_s));
    let bids = match (trace, &scenario.trace) {
        (Some(bids), Some(source)) => {
            let plan = trace_bids(bids, source.speed, auctions, &shared.bidder_names);
            load.spawn(schedule_bids(shared.clone(), plan.into_iter()))
        }
        _ => {
            let plan = synthetic_bids(scenario, duration_s, shared.bidder_names.len());
            load.spawn(schedule_bids(shared.clone(), plan))
        }
    };
    bids.await?;
    readers.await?;
    Ok(())
}

/// A trace's bids, played at `speed`, with their auctions and bidders as
/// indexes into the run's.
fn trace_bids(
    bids: &[TraceBid],
    speed: f64,
    auctions: &[RunAuction],
    bidder_names: &[String],
) -> Vec<PlannedBid> {
    let label_index: HashMap<&str, usize> = auctions
        .iter()
        .enumerate()
        .map(|(i, a)| (a.label.as_str(), i))
        .collect();
    let bidder_index: HashMap<&str, usize> = bidder_names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    bids.iter()
        .map(|b| {
            let at = Duration::from_secs_f64(b.offset_ms as f64 / 1000.0 / speed);
            (
                at,
                label_index[b.auction.as_str()],
                bidder_index[b.bidder.as_str()],
                Amount::Exact(b.amount),
            )
        })
        .collect()
}

/// The synthetic bids of a scenario: (offset, auction, bidder, amount).
fn synthetic_bids(
    scenario: &Scenario,
    duration_s: f64,
    bidders: usize,
) -> impl Iterator<Item = PlannedBid> + Send + 'static {
    let mut rng = SmallRng::seed_from_u64(scenario.seed);
    let arrival = scenario.arrival.clone();
    let b = scenario.bidders.clone();
    // Cumulative bid shares over the auctions, each group split evenly.
    let mut cumulative = Vec::new();
    let mut total = 0.0;
    for group in &scenario.auctions {
        for _ in 0..group.count {
            total += group.bid_share / group.count as f64;
            cumulative.push(total);
        }
    }
    let mut t = 0.0f64;
    std::iter::from_fn(move || loop {
        let rate = arrival.rate_at(t, duration_s);
        if rate <= 0.0 {
            t += 0.001;
            if t >= duration_s {
                return None;
            }
            continue;
        }
        t += match arrival.process {
            Process::Poisson => -(1.0 - rng.gen::<f64>()).ln() / rate,
            Process::Uniform => 1.0 / rate,
        };
        if t >= duration_s {
            return None;
        }
        let pick = rng.gen::<f64>() * total;
        let auction = cumulative
            .partition_point(|&c| c < pick)
            .min(cumulative.len() - 1);
        let bidder = rng.gen_range(0..bidders);
        let range = if rng.gen::<f64>() < b.proxy_share {
            b.proxy_steps
        } else {
            b.steps
        };
        let steps = rng.gen_range(range[0]..=range[1]);
        return Some((
            Duration::from_secs_f64(t),
            auction,
            bidder,
            Amount::Steps(steps),
        ));
    })
}

async fn schedule_bids(shared: Arc<Shared>, plan: impl Iterator<Item = PlannedBid>) {
    for (at, auction, bidder, amount) in plan {
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        let intended = shared.t0 + at;
        tokio::time::sleep_until(intended.into()).await;
        let second = at.as_secs() as usize;
        shared
            .recorder
            .lock()
            .expect("recorder")
            .offered(Kind::Bid, second);
        shared.open.fetch_add(1, Ordering::AcqRel);
        let shared = shared.clone();
        tokio::spawn(async move {
            send_bid(&shared, intended, auction, bidder, amount).await;
            shared.open.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

async fn schedule_reads(shared: Arc<Shared>, scenario: Scenario, duration_s: f64) {
    let rate = scenario.readers.rate;
    if rate <= 0.0 {
        return;
    }
    let mut rng = SmallRng::seed_from_u64(scenario.seed ^ 0x5eed_5eed);
    let mut cumulative = Vec::new();
    let mut total = 0.0;
    for group in &scenario.auctions {
        let share = group.read_share.unwrap_or(group.bid_share);
        for _ in 0..group.count {
            total += share / group.count as f64;
            cumulative.push(total);
        }
    }
    let auctions = shared.read_paths.len();
    let mut t = 0.0f64;
    loop {
        t += match scenario.arrival.process {
            Process::Poisson => -(1.0 - rng.gen::<f64>()).ln() / rate,
            Process::Uniform => 1.0 / rate,
        };
        if t >= duration_s || shared.stop.load(Ordering::Acquire) {
            return;
        }
        // A trace's auctions need not match the groups: spread evenly then.
        let auction = if cumulative.len() == auctions && total > 0.0 {
            let pick = rng.gen::<f64>() * total;
            cumulative.partition_point(|&c| c < pick).min(auctions - 1)
        } else {
            rng.gen_range(0..auctions)
        };
        let reader = rng.gen_range(0..shared.bearer.len());
        let at = Duration::from_secs_f64(t);
        let intended = shared.t0 + at;
        tokio::time::sleep_until(intended.into()).await;
        shared
            .recorder
            .lock()
            .expect("recorder")
            .offered(Kind::Read, at.as_secs() as usize);
        shared.open.fetch_add(1, Ordering::AcqRel);
        let shared = shared.clone();
        tokio::spawn(async move {
            send_read(&shared, intended, auction, reader).await;
            shared.open.fetch_sub(1, Ordering::AcqRel);
        });
    }
}
