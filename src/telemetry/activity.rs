//! What PostgreSQL itself is doing, sampled for SREs: backends of Gavel's
//! database by state and wait event (a hot row shows as `Lock`
//! `transactionid`/`tuple` and `LWLock` `BufferContent` waiters), blocked
//! backends, the longest current lock wait, deadlocks, and the resolver's
//! backlog (pending bids and the age of the oldest one).
//!
//! The sampler has a connection of its own, so it keeps reporting while the
//! API and resolver pools are saturated: that is when it is needed.

use std::collections::HashSet;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db::{bids, build_pool, Pool, PoolSettings};

/// Client backends of this database (not the sampler itself), grouped by
/// state and wait event as PostgreSQL spells them.
const BACKENDS: &str = "\
    SELECT coalesce(state, 'unknown'), coalesce(wait_event_type, 'none'), \
           coalesce(wait_event, 'none'), count(*) \
    FROM pg_stat_activity \
    WHERE datname = current_database() AND backend_type = 'client backend' \
      AND pid <> pg_backend_pid() \
    GROUP BY 1, 2, 3";

/// Backends blocked by another's heavyweight lock, the longest current
/// lock wait in seconds, and the database's deadlock count.
const LOCKS: &str = "\
    SELECT \
      (SELECT count(*) FROM pg_stat_activity \
        WHERE datname = current_database() AND wait_event_type = 'Lock' \
          AND cardinality(pg_blocking_pids(pid)) > 0), \
      (SELECT coalesce(extract(epoch FROM clock_timestamp() - min(l.waitstart)), 0)::float8 \
        FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
        WHERE NOT l.granted AND a.datname = current_database()), \
      (SELECT coalesce(deadlocks, 0) FROM pg_stat_database WHERE datname = current_database())";

/// The resolver's backlog: the bids not yet resolved of open auctions and
/// of those settled lately (the auctions the resolver's scan looks at).
static BACKLOG: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT count(*), \
           coalesce(extract(epoch FROM clock_timestamp() - min(p.received_at)), 0)::float8 \
         FROM auctions a CROSS JOIN LATERAL {} p \
         WHERE a.status = 'open' OR a.settled_at > now() - make_interval(secs => {})",
        bids::unresolved("received_at"),
        bids::SETTLED_LATELY.as_secs(),
    )
});

/// Samples `pg_stat_activity` and the backlog every `interval`.
pub struct ActivitySampler {
    pool: Pool,
    interval: Duration,
    /// Label sets reported before, so one that disappears is set to 0.
    seen: HashSet<[String; 3]>,
}

impl ActivitySampler {
    /// A sampler on its own connection to the primary.
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let pool = build_pool(
            &config.database_url,
            "activity-sampler",
            &PoolSettings::new(config, 1, "gavel-monitor"),
        )?;
        Ok(ActivitySampler {
            pool,
            interval: config.telemetry.pg_sample_interval,
            seen: HashSet::new(),
        })
    }

    /// The sampler's pool, for exporting its occupancy.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Samples until `shutdown`; a failed sample is logged and counted.
    pub async fn run(mut self, shutdown: CancellationToken) {
        metrics::counter!("gavel_pg_sample_errors_total").increment(0);
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = ticks.tick() => {}
            }
            if let Err(e) = self.sample().await {
                metrics::counter!("gavel_pg_sample_errors_total").increment(1);
                tracing::warn!(error = format!("{e:#}"), "sampling pg_stat_activity failed");
            }
        }
        self.pool.close();
    }

    /// Takes one sample and sets the gauges.
    pub async fn sample(&mut self) -> anyhow::Result<()> {
        let client = self.pool.get().await?;
        let mut current = HashSet::new();
        for row in client.query(BACKENDS, &[]).await? {
            let labels: [String; 3] = [row.get(0), row.get(1), row.get(2)];
            backends_gauge(&labels).set(row.get::<_, i64>(3) as f64);
            current.insert(labels);
        }
        for gone in self.seen.difference(&current) {
            backends_gauge(gone).set(0.0);
        }
        self.seen.extend(current);

        let locks = client.query_one(LOCKS, &[]).await?;
        metrics::gauge!("gavel_pg_blocked_backends").set(locks.get::<_, i64>(0) as f64);
        metrics::gauge!("gavel_pg_lock_wait_max_seconds").set(locks.get::<_, f64>(1));
        metrics::counter!("gavel_pg_deadlocks_total").absolute(locks.get::<_, i64>(2) as u64);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        metrics::gauge!("gavel_pg_last_sample_timestamp_seconds").set(now.as_secs_f64());

        // Last, so a lock on `bid_log` cannot hold back the activity
        // figures, which are what shows such a lock.
        let backlog = client.query_one(BACKLOG.as_str(), &[]).await?;
        metrics::gauge!("gavel_resolver_pending_bids").set(backlog.get::<_, i64>(0) as f64);
        metrics::gauge!("gavel_resolver_oldest_pending_seconds").set(backlog.get::<_, f64>(1));
        Ok(())
    }
}

fn backends_gauge([state, wait_event_type, wait_event]: &[String; 3]) -> metrics::Gauge {
    metrics::gauge!(
        "gavel_pg_backends",
        "state" => state.clone(),
        "wait_event_type" => wait_event_type.clone(),
        "wait_event" => wait_event.clone(),
    )
}
