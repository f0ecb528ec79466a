//! One resolution transaction over a group of auctions, in named steps:
//! lock and read ([`read`]), plan (the pure [`plan`](super::plan)), write
//! ([`write`]), verify, settle and commit, publish.
//!
//! Four round trips to the primary (five when one settles) whatever the
//! number of auctions: begin, the locks with both reads, the writes,
//! commit. Most auctions have a bid or two waiting at each round, and one
//! transaction for each would cost more than its bids (a commit and its
//! WAL flush, a dozen statements each). The reads are one statement each
//! for the whole group; each auction's writes are its compare-and-set (a
//! key lookup), one row of outcomes and one event row, whatever the
//! number of its bids, all in the same round trip. No bid row is written:
//! a bid's status follows from its batch's outcomes and the auction row
//! (the `bids` view).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Transaction};
use tokio_postgres::types::ToSql;
use tokio_postgres::Statement;
use uuid::Uuid;

use super::error::cause;
use super::plan::{self, Batch, Plan, Snapshot};
use super::{instruments, ResolveError, Resolver, Step};
use crate::db::auctions::{self, AuctionRecord};
use crate::db::bids::{self, BidOutcome};
use crate::db::events::{self, BidChange};
use crate::domain::BidStatus;
use crate::rules::{self, Leader};
use crate::signals::{listener, Resolved, Signals};

impl Resolver {
    /// Resolves one auction: [`resolve_auctions`](Self::resolve_auctions)
    /// for it alone.
    pub async fn resolve_auction(&self, auction_id: Uuid) -> Result<Step, ResolveError> {
        let steps = self.resolve_auctions(&[auction_id]).await?;
        Ok(steps.first().map_or(Step::Idle, |&(_, step)| step))
    }

    /// One transaction over several auctions (distinct ids): lock each for
    /// this resolver, apply a batch of each one's pending bids, settle
    /// those due, and compare-and-set them all; returns each auction's
    /// [`Step`]. If any auction's compare-and-set loses, nothing is
    /// written and every auction written for is reported as
    /// [`Step::Conflict`].
    ///
    /// Every statement runs on a generic plan, planned once per session,
    /// and settlement on plans that can only probe rows (`plan_modes`).
    /// An auction takes at most [`BatchSize`](super::BatchSize) bids.
    pub async fn resolve_auctions(
        &self,
        auction_ids: &[Uuid],
    ) -> Result<Vec<(Uuid, Step)>, ResolveError> {
        self.resolve_group(auction_ids, self.batch.get()).await
    }

    /// [`resolve_auctions`](Self::resolve_auctions), each auction taking
    /// at most `limit` bids.
    pub(super) async fn resolve_group(
        &self,
        auction_ids: &[Uuid],
        limit: i64,
    ) -> Result<Vec<(Uuid, Step)>, ResolveError> {
        if auction_ids.is_empty() {
            return Ok(Vec::new());
        }
        let started = Instant::now();
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let [generic_plans, probes_only] = plan_modes(&tx).await?;
        let snapshot = read(&tx, &generic_plans, auction_ids, limit).await?;
        let mut plan = plan::plan(&snapshot, auction_ids, limit, self.grace);
        if plan.batches.is_empty() {
            return Ok(plan.steps);
        }
        let won = write(&tx, &plan, &snapshot, &self.signals).await?;
        if won.contains(&false) {
            // Another writer moved some auction first: write nothing and
            // start over from fresh state.
            let conflicts = plan.batches.iter().map(|b| (b.auction_id, Step::Conflict));
            plan.steps.extend(conflicts);
            return Ok(plan.steps);
        }
        settle(&tx, &probes_only, &plan, &snapshot).await?;
        tx.commit().await?;
        Ok(self.publish(plan, &snapshot, started))
    }

    /// After the commit: records the transaction's metrics, tells waiting
    /// requests, caches and live views of every auction written (with its
    /// view as committed), and returns every auction's step.
    fn publish(&self, plan: Plan<'_>, snapshot: &Snapshot, started: Instant) -> Vec<(Uuid, Step)> {
        instruments::record_transaction(&plan, snapshot.now, started);
        let Plan {
            mut steps,
            outcomes,
            batches,
        } = plan;
        for batch in batches {
            let ids: Arc<[Uuid]> = outcomes[batch.outcomes.clone()]
                .iter()
                .map(|o| o.id)
                .collect();
            self.signals.publish(Resolved {
                auction_id: batch.auction_id,
                bids: Some(ids),
                version: Some(batch.version),
                view: committed_view(snapshot, &batch).map(Arc::new),
            });
            let step = Step::Applied {
                bids: batch.applied.len(),
                settled: batch.settlement.is_some(),
                more: batch.more,
            };
            steps.push((batch.auction_id, step));
        }
        steps
    }
}

/// The auction of `batch` as its transaction committed it: the row read,
/// with the state, count, version and winner the compare-and-set wrote.
fn committed_view(snapshot: &Snapshot, batch: &Batch<'_>) -> Option<AuctionRecord> {
    let mut auction = snapshot.auctions.get(&batch.auction_id)?.clone();
    auction.state = batch.state.clone();
    auction.resolved_count = batch.resolved_count;
    auction.version = batch.version;
    if let Some(winner) = &batch.settlement {
        auction.winner_id = winner.as_ref().map(|w| w.bidder_id.clone());
    }
    Some(auction)
}

/// Takes each auction's advisory lock for this transaction and reads the
/// auctions and their oldest pending bids (at most `limit` each).
///
/// Sent at once and run in order, one round trip: the plan mode's and the
/// lock's statements are prepared, so they are on the wire before either
/// read, and both reads see what was committed before the locks were
/// taken. The reads of auctions not locked are thrown away by the planner.
async fn read(
    tx: &Transaction<'_>,
    generic_plans: &Statement,
    auction_ids: &[Uuid],
    limit: i64,
) -> Result<Snapshot, ResolveError> {
    let lock = tx
        .prepare_cached(
            "SELECT a.id, pg_try_advisory_xact_lock(hashtextextended(a.id::text, 0)), now() \
             FROM unnest($1::uuid[]) AS a(id)",
        )
        .await?;
    let lock_params: [&(dyn ToSql + Sync); 1] = [&auction_ids];
    let (locks, records, pending) = match futures::join!(
        tx.execute(generic_plans, &[]),
        tx.query(&lock, &lock_params),
        auctions::get_many_with_progress(tx, auction_ids),
        bids::pending(tx, auction_ids, limit),
    ) {
        (Ok(_), Ok(locks), Ok(records), Ok(pending)) => (locks, records, pending),
        (plan_mode, locks, records, pending) => {
            return Err(cause([
                plan_mode.err(),
                locks.err(),
                records.err(),
                pending.err(),
            ]))
        }
    };
    let now: DateTime<Utc> = locks[0].get(2);
    let locked: HashSet<Uuid> = locks
        .iter()
        .filter(|row| row.get::<_, bool>(1))
        .map(|row| row.get(0))
        .collect();
    Ok(Snapshot::new(now, locked, records, pending))
}

/// Writes the plan: each auction's compare-and-set (with its progress),
/// the notification of other processes, each batch's outcomes and its
/// event row recording each bid's change; returns whether each
/// compare-and-set won.
///
/// The writes touch different rows and are sent at once, one round trip.
/// If a compare-and-set lost, the caller drops the transaction and none of
/// them is committed.
async fn write(
    tx: &Transaction<'_>,
    plan: &Plan<'_>,
    snapshot: &Snapshot,
    signals: &Signals,
) -> Result<Vec<bool>, ResolveError> {
    let updates: Vec<auctions::StateUpdate> = plan
        .batches
        .iter()
        .map(|b| auctions::StateUpdate {
            id: b.auction_id,
            expected_version: b.version - 1,
            state: &b.state,
            resolved_count: b.resolved_count,
            settlement: b.settlement.as_ref().map(Option::as_ref),
            progress: b.progress.as_ref(),
        })
        .collect();
    let notifications: Vec<String> = plan
        .batches
        .iter()
        .map(|b| signals.notification(b.auction_id))
        .collect();
    let notify = tx
        .prepare_cached("SELECT pg_notify($1, n) FROM unnest($2::text[]) AS n")
        .await?;
    let notify_params: [&(dyn ToSql + Sync); 2] = [&listener::RESOLVED_CHANNEL, &notifications];
    let changes: Vec<(Uuid, i64, Vec<BidChange>)> = (plan.batches.iter())
        .map(|b| {
            (
                b.auction_id,
                b.version,
                bid_changes(b, &plan.outcomes, snapshot),
            )
        })
        .collect();
    match futures::join!(
        futures::future::try_join_all(updates.iter().map(|u| auctions::compare_and_set(tx, u))),
        tx.execute(&notify, &notify_params),
        futures::future::try_join_all(plan.batches.iter().map(|b| {
            bids::record_batch(
                tx,
                b.auction_id,
                b.version,
                &plan.outcomes[b.outcomes.clone()],
            )
        })),
        futures::future::try_join_all((changes.iter()).map(|(id, version, changes)| {
            events::record_bid_changes(tx, *id, 0, *version, changes)
        })),
    ) {
        (Ok(won), Ok(_), Ok(_), Ok(_)) => Ok(won),
        (won, notified, recorded, changed) => Err(cause([
            won.err(),
            notified.err(),
            recorded.err(),
            changed.err(),
        ])),
    }
}

/// The bid changes of one batch, for its event row: the leader it
/// displaced, now outbid, then each bid applied with its outcome.
fn bid_changes<'a>(
    batch: &'a Batch<'_>,
    outcomes: &[BidOutcome],
    snapshot: &'a Snapshot,
) -> Vec<BidChange<'a>> {
    let leader = (snapshot.auctions.get(&batch.auction_id)).and_then(|a| a.state.leader.as_ref());
    let displaced = (batch.displaced_earlier.iter()).filter_map(|&id| {
        let leader = leader.filter(|l| l.bid_id == id)?;
        Some(BidChange {
            bid_id: id,
            bidder_id: &leader.bidder_id,
            status: BidStatus::Outbid,
        })
    });
    let applied =
        (batch.applied.iter().zip(&outcomes[batch.outcomes.clone()])).map(|(bid, o)| BidChange {
            bid_id: o.id,
            bidder_id: &bid.bidder_id,
            status: o.resolution.status,
        });
    displaced.chain(applied).collect()
}

/// Writes the `auction.settled` event row of each auction the plan
/// settles, listing its live bids won and lost: after the outcomes, as it
/// lists the bids they accepted. Reading them joins each batch's bids to
/// their rows, on plans that only probe (`probes_only`).
async fn settle(
    tx: &Transaction<'_>,
    probes_only: &Statement,
    plan: &Plan<'_>,
    snapshot: &Snapshot,
) -> Result<(), ResolveError> {
    if plan.batches.iter().all(|b| b.settlement.is_none()) {
        return Ok(());
    }
    tx.execute(probes_only, &[]).await?;
    futures::future::try_join_all(plan.batches.iter().filter_map(|b| {
        let winner = b.settlement.as_ref()?.as_ref();
        let auction = snapshot.auctions.get(&b.auction_id)?;
        let data = settled_event(auction, b, winner, snapshot.now);
        Some(async move {
            let winning_bid = winner.map(|w| w.bid_id);
            events::settle(tx, b.auction_id, 1, b.version, winning_bid, &data).await
        })
    }))
    .await?;
    Ok(())
}

/// The `data` of an `auction.settled` event (the API contract's fields).
fn settled_event(
    auction: &AuctionRecord,
    batch: &Batch<'_>,
    winner: Option<&Leader>,
    settled_at: DateTime<Utc>,
) -> serde_json::Value {
    serde_json::json!({
        "auction_id": auction.id,
        "status": "closed",
        "winner_id": winner.map(|w| &w.bidder_id),
        "winner_bid_id": winner.map(|w| w.bid_id),
        "price": winner.and(batch.state.price),
        "currency": auction.currency,
        "reserve_met": rules::reserve_met(&auction.terms, &batch.state),
        "bid_count": batch.state.bid_count,
        "settled_at": settled_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    })
}

/// The statements that set how a resolver transaction's statements are
/// planned, prepared: generic plans (`SET LOCAL plan_cache_mode`), then,
/// for settlement, no sequential scan, hash or merge join.
///
/// The resolver's sessions plan every statement for its parameters (see
/// [`PoolSettings::with_custom_plans`](crate::db::PoolSettings::with_custom_plans))
/// outside these transactions. Within them every statement looks rows up by
/// key or by position whatever its parameters, so a generic plan serves it,
/// and planning it once per batch would cost as much as running it. The
/// reads stay probes by their form (see [`bids::pending`]). Settlement
/// joins each batch's bids to their rows, and a generic plan made on a
/// young table would hash the whole log; with those ways switched off, the
/// only plan left looks each bid up by its key.
async fn plan_modes(tx: &impl GenericClient) -> Result<[Statement; 2], tokio_postgres::Error> {
    let generic = tx
        .prepare_cached("SET LOCAL plan_cache_mode = force_generic_plan")
        .await?;
    let probes_only = tx
        .prepare_cached(
            "SELECT set_config('enable_seqscan', 'off', true), \
             set_config('enable_hashjoin', 'off', true), \
             set_config('enable_mergejoin', 'off', true)",
        )
        .await?;
    Ok([generic, probes_only])
}
