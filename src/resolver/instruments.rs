//! The resolver's metrics: registered at zero when it starts, so rates over
//! them are 0 rather than missing before the first event (and a stalled
//! resolver shows as no progress), and recorded after each commit.

use std::time::Instant;

use chrono::{DateTime, Utc};

use super::plan::Plan;
use super::BATCH_LIMIT;
use crate::telemetry::outcomes;

/// Registers the resolver's counters and gauges.
pub(super) fn register() {
    outcomes::register_resolved_counter();
    metrics::counter!("gavel_resolver_conflicts_total").increment(0);
    metrics::gauge!("gavel_resolver_batch_limit").set(BATCH_LIMIT as f64);
    metrics::counter!("gavel_auctions_settled_total").increment(0);
    metrics::counter!("gavel_events_written_total", "type" => "auction.settled").increment(0);
}

/// Records one committed transaction: its bids, duration and outcomes,
/// each auction's lag (the age of its oldest bid in the batch) and
/// settlement.
pub(super) fn record_transaction(plan: &Plan<'_>, now: DateTime<Utc>, started: Instant) {
    let bids: usize = plan.batches.iter().map(|b| b.applied.len()).sum();
    metrics::histogram!("gavel_resolver_batch_size").record(bids as f64);
    metrics::histogram!("gavel_resolver_batch_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    outcomes::count_resolved(plan.outcomes.iter().map(|o| o.resolution.reason));
    for batch in &plan.batches {
        if let Some(oldest) = batch.applied.iter().map(|b| b.received_at).min() {
            let lag = (now - oldest).num_milliseconds().max(0) as f64 / 1000.0;
            metrics::histogram!("gavel_resolver_lag_seconds").record(lag);
        }
        if batch.settlement.is_some() {
            metrics::counter!("gavel_auctions_settled_total").increment(1);
            // Its `auction.settled` event, committed with it.
            metrics::counter!("gavel_events_written_total", "type" => "auction.settled")
                .increment(1);
        }
    }
}
