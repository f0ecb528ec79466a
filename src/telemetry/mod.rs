//! Observability plumbing: the tracing subscriber (text or JSON) and the
//! process-wide Prometheus recorder behind the admin `/metrics` endpoint,
//! with the list of every metric Gavel exports; [`activity`] samples what
//! PostgreSQL itself is doing into those metrics.

pub mod activity;
pub mod outcomes;

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use Kind::{Counter, Gauge, Histogram};

/// Latency buckets in seconds: fine below 100 ms, where the bid path lives,
/// and up to the request deadline.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];
/// Resolver lag buckets in seconds: a backlog can grow far past any
/// request's deadline while the resolver is held up.
const LAG_BUCKETS: &[f64] = &[
    0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// Batch-size buckets (bids per resolver transaction).
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0,
];

/// The kind of a Prometheus metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (`_total`).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations in buckets (`_bucket`, `_sum`, `_count`).
    Histogram,
}

/// One metric Gavel exports: the single list behind the `# HELP` lines and
/// the table in `dashboards/README.md` (a test keeps the two equal).
#[derive(Debug, Clone, Copy)]
pub struct MetricDoc {
    /// The metric's name.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// Its labels; every value set is bounded (no auction or bidder ids).
    pub labels: &'static [&'static str],
    /// What it measures.
    pub help: &'static str,
}

const fn metric(
    name: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    help: &'static str,
) -> MetricDoc {
    MetricDoc {
        name,
        kind,
        labels,
        help,
    }
}

/// Every metric Gavel exports.
pub const METRICS: &[MetricDoc] = &[
    metric("gavel_http_requests_total", Counter, &["method", "route", "status"],
        "HTTP requests answered, by method, matched route and status."),
    metric("gavel_http_request_duration_seconds", Histogram, &["method", "route", "status"],
        "Time to answer an HTTP request."),
    metric("gavel_http_shed_total", Counter, &["reason"],
        "API requests answered 503 by the in-flight limit (in_flight_limit) or their deadline (deadline)."),
    metric("gavel_http_connections_open", Gauge, &["listener"],
        "Open client connections of a listener (api, admin)."),
    metric("gavel_http_connections_closed_total", Counter, &["listener", "reason"],
        "Client connections Gavel closed or refused: header_timeout, idle_timeout, connection_limit (refused with 503), malformed (hyper answered a request it could not parse), error."),
    metric("gavel_http_body_refusals_total", Counter, &["reason"],
        "Requests refused while their body was read, before taking an in-flight slot: timeout and incomplete (400), too_large (413)."),
    metric("gavel_http_head_refusals_total", Counter, &["reason"],
        "Requests refused for their head: uri_too_long (414), headers_too_large (431)."),
    metric("gavel_bids_received_total", Counter, &[],
        "Bids that reached the bid path (valid requests)."),
    metric("gavel_bids_accepted_total", Counter, &[],
        "Bids appended to bid_log and acknowledged (a new bid, not a replay)."),
    metric("gavel_bids_rejected_total", Counter, &["reason"],
        "Bids refused at the API, by problem code (overloaded and unavailable are overload rejections)."),
    metric("gavel_bids_idempotent_replays_total", Counter, &[],
        "Retries answered from an earlier bid with the same Idempotency-Key."),
    metric("gavel_auction_snapshot_reads_total", Counter, &[],
        "Auction snapshots read from the database by the bid path's pre-check (others come from its cache)."),
    metric("gavel_auction_cache_total", Counter, &["result"],
        "Auction view reads answered from the in-process cache (hit) or read from the database (miss)."),
    metric("gavel_streams_open", Gauge, &[],
        "Event streams open in this process."),
    metric("gavel_streams_refused_total", Counter, &[],
        "Event streams refused with 503 because GAVEL_MAX_STREAMS were open."),
    metric("gavel_stream_versions_total", Counter, &[],
        "Auction versions published to this process's live feeds: each change read once, whatever the number of watchers."),
    metric("gavel_stream_events_total", Counter, &["event"],
        "Events sent on the event streams (auction, end; bid on the bidders' streams)."),
    metric("gavel_stream_delivery_seconds", Histogram, &[],
        "Time from the moment this process learned of an auction change (its announcement, milliseconds after the commit) to its event being handed to a watcher's connection."),
    metric("gavel_stream_versions_skipped_total", Counter, &[],
        "Auction versions a watcher never received because a newer one replaced them before it read or before its pause ended."),
    metric("gavel_stream_pause_seconds", Gauge, &[],
        "The mean pause each auction stream takes between two events: open streams over 80% of GAVEL_STREAM_EVENTS_PER_S (under 1 ms: none)."),
    metric("gavel_admission_decisions_total", Counter, &["kind", "decision"],
        "Admission decisions at the door and in the append queue: bids and reads admitted, refused_at_door (overloaded: refused before any work), refused_in_queue (a bid whose queue wait ran out)."),
    metric("gavel_admission_queue_wait_seconds", Histogram, &[],
        "Time each bid waited in the append queue before a writer took it into a batch (the admission controller's signal)."),
    metric("gavel_admission_overloaded", Gauge, &[],
        "1 while the append batches commit bids older than the admission target (50 ms): the process refuses the excess at once."),
    metric("gavel_bids_append_batch_size", Histogram, &[],
        "Bids written per append statement (concurrent bids are coalesced into one INSERT)."),
    metric("gavel_resolver_bids_resolved_total", Counter, &["outcome"],
        "Bids resolved, by outcome: accepted (leading or outbid) or the rules' rejection reason."),
    metric("gavel_resolver_batch_size", Histogram, &[],
        "Bids applied per resolver transaction."),
    metric("gavel_resolver_batch_duration_seconds", Histogram, &[],
        "Duration of one resolver transaction."),
    metric("gavel_resolver_batch_limit", Gauge, &[],
        "Bids the next resolver batch may take (halved after a statement timeout)."),
    metric("gavel_resolver_lag_seconds", Histogram, &[],
        "Age of the oldest bid of each batch when it was resolved."),
    metric("gavel_resolver_conflicts_total", Counter, &[],
        "Optimistic version conflicts (another writer changed the auction first)."),
    metric("gavel_resolver_pending_bids", Gauge, &[],
        "Bids in bid_log waiting for the resolver (sampled)."),
    metric("gavel_resolver_oldest_pending_seconds", Gauge, &[],
        "Age of the oldest pending bid: the resolver lag (sampled)."),
    metric("gavel_auctions_settled_total", Counter, &[],
        "Auctions settled (closed with a winner or none)."),
    metric("gavel_events_written_total", Counter, &["type"],
        "Marketplace events written to the event log, by type (auction.settled), each in the transaction of its state change."),
    metric("gavel_webhook_deliveries_total", Counter, &["url", "outcome"],
        "Webhook attempts by what became of the delivery: delivered (2xx), retried (refused or unanswered, tried again later), failed (refused for 24 h, given up), lease_lost (another process had taken it over)."),
    metric("gavel_webhook_attempt_duration_seconds", Histogram, &["url"],
        "Time of one webhook attempt, from sending to the receiver's answer or the 10 s limit."),
    metric("gavel_webhook_delivery_latency_seconds", Histogram, &["url"],
        "Time from an event's transaction to its acknowledgement by the receiver (settlement to delivery)."),
    metric("gavel_webhook_backlog", Gauge, &["url"],
        "Deliveries waiting for a URL, due or retrying (sampled every 5 s)."),
    metric("gavel_webhook_oldest_undelivered_seconds", Gauge, &["url"],
        "Age of the oldest event not yet delivered to a URL, 0 when none waits (sampled every 5 s)."),
    metric("gavel_rows_pruned_total", Counter, &["table"],
        "Rows deleted by retention: events (the log, after 24 h) and webhook_deliveries (finished, after 24 h)."),
    metric("gavel_db_pool_max_connections", Gauge, &["pool"],
        "Maximum connections of a pool."),
    metric("gavel_db_pool_connections", Gauge, &["pool"],
        "Connections a pool holds open."),
    metric("gavel_db_pool_available_connections", Gauge, &["pool"],
        "Idle connections of a pool."),
    metric("gavel_db_pool_waiting_requests", Gauge, &["pool"],
        "Callers waiting for a connection of a pool."),
    metric("gavel_db_pool_wait_seconds", Histogram, &["pool"],
        "Time callers waited for a pooled connection (including opening one)."),
    metric("gavel_db_pool_timeouts_total", Counter, &["pool"],
        "Waits for a pooled connection that ran out of time."),
    metric("gavel_db_connections_abandoned_total", Counter, &["reason"],
        "Database connections given up on while waiting for a reply: silent (the server sent nothing, on any connection, for the silence limit)."),
    metric("gavel_db_reads_total", Counter, &["target", "reason"],
        "API reads by the server that answered (primary, replica) and why it was chosen."),
    metric("gavel_replica_healthy", Gauge, &["replica"],
        "1 when the replica answered its last check, else 0."),
    metric("gavel_replica_lag_bytes", Gauge, &["replica"],
        "WAL bytes the replica is behind the primary's latest sampled position."),
    metric("gavel_replica_lag_seconds", Gauge, &["replica"],
        "How stale the replica's data is, at most."),
    metric("gavel_pg_backends", Gauge, &["state", "wait_event_type", "wait_event"],
        "Client backends of Gavel's database by state and wait event (pg_stat_activity; none = not waiting)."),
    metric("gavel_pg_blocked_backends", Gauge, &[],
        "Backends waiting for a heavyweight lock another backend holds (pg_blocking_pids)."),
    metric("gavel_pg_lock_wait_max_seconds", Gauge, &[],
        "The longest current wait for a heavyweight lock (pg_locks.waitstart)."),
    metric("gavel_pg_deadlocks_total", Counter, &[],
        "Deadlocks detected in Gavel's database (pg_stat_database)."),
    metric("gavel_pg_last_sample_timestamp_seconds", Gauge, &[],
        "Unix time of the last successful pg_stat_activity sample."),
    metric("gavel_pg_sample_errors_total", Counter, &[],
        "pg_stat_activity or backlog samples that failed."),
    // The process itself, read at each scrape (metrics-process).
    metric("process_resident_memory_bytes", Gauge, &[],
        "Resident memory of the Gavel process, in bytes."),
    metric("process_virtual_memory_bytes", Gauge, &[],
        "Virtual memory of the Gavel process, in bytes."),
    metric("process_virtual_memory_max_bytes", Gauge, &[],
        "The most virtual memory the Gavel process may use, in bytes (its address-space limit)."),
    metric("process_cpu_seconds_total", Counter, &[],
        "CPU time the Gavel process has used (user and system), in seconds."),
    metric("process_open_fds", Gauge, &[],
        "File descriptors the Gavel process holds open (sockets included)."),
    metric("process_max_fds", Gauge, &[],
        "The most file descriptors the Gavel process may open."),
    metric("process_threads", Gauge, &[],
        "Threads of the Gavel process."),
    metric("process_start_time_seconds", Gauge, &[],
        "Unix time the Gavel process started."),
];

/// Reads the process metrics (`process_*`) into the recorder; called at
/// each scrape, so they are as fresh as the scrape.
pub fn collect_process_metrics() {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR
        .get_or_init(metrics_process::Collector::default)
        .collect();
}

/// Installs the global tracing subscriber; `filter` uses `EnvFilter` syntax.
pub fn init_tracing(filter: &str, json: bool) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    // A second initialisation (tests, `dev` after `serve` set-up) is harmless.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                // A full name is matched before any suffix.
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("gavel_resolver_lag_seconds".into()),
                        LAG_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_batch_size".into()), BATCH_BUCKETS)
                })
                .expect("bucket lists are non-empty")
                .install_recorder()
                .expect("the Prometheus recorder is installed once");
            for doc in METRICS {
                match doc.kind {
                    Counter => metrics::describe_counter!(doc.name, doc.help),
                    Gauge => metrics::describe_gauge!(doc.name, doc.help),
                    Histogram => metrics::describe_histogram!(doc.name, doc.help),
                }
            }
            handle
        })
        .clone()
}
