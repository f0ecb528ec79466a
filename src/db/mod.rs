//! Database access: bounded connection pools on the primary, read routing
//! to replicas with a micro-cache of auction views in front, the embedded
//! migrations, and the queries of each table (`auctions`, `bids`).
//!
//! Runtime queries go through deadpool-postgres and tokio-postgres prepared
//! statements; sqlx is used only for its migrator.

pub mod auction_cache;
pub mod auctions;
pub mod baselines;
pub mod bids;
pub mod events;
pub mod marketplace;
pub mod reads;
pub mod silence;
pub mod webhooks;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use deadpool_postgres::{
    Manager, ManagerConfig, Object, PoolError, RecyclingMethod, Runtime, Status, TimeoutType,
};
use metrics::{Counter, Gauge, Histogram};

use crate::config::Config;

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The primary pools of one Gavel process, split so API pressure cannot
/// starve the resolver and the other way round. Replica pools live in
/// [`reads::Reads`].
#[derive(Clone)]
pub struct Pools {
    /// Request handlers' connections to the primary.
    pub api: Pool,
    /// The bid appender's writers' connections to the primary, one per
    /// writer: appends never queue behind request handlers' waits, so
    /// accepted bids keep flowing while requests wait for the API pool.
    pub append: Pool,
    /// The resolver's connections to the primary.
    pub resolver: Pool,
    /// Health checks and probes: `/readyz` and replica lag checks keep
    /// working while the other pools are saturated.
    pub monitor: Pool,
}

impl Pools {
    /// Builds (lazily connecting) pools from the configuration.
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let url = &config.database_url;
        Ok(Pools {
            api: build_pool(
                url,
                "api",
                &PoolSettings::new(config, config.pools.api_size, "gavel-api"),
            )?,
            append: build_pool(
                url,
                "append",
                &PoolSettings::new(config, config.bids.append_writers, "gavel-append"),
            )?,
            resolver: build_pool(
                url,
                "resolver",
                &PoolSettings::new(config, config.pools.resolver_size, "gavel-resolver")
                    .with_custom_plans(),
            )?,
            monitor: build_pool(
                url,
                "monitor",
                &PoolSettings::new(config, MONITOR_POOL_SIZE, "gavel-monitor"),
            )?,
        })
    }

    /// The primary pools, for exporting their occupancy.
    pub fn all(&self) -> [&Pool; 4] {
        [&self.api, &self.append, &self.resolver, &self.monitor]
    }

    /// Closes every pool; connections are dropped as they are returned.
    pub fn close(&self) {
        self.api.close();
        self.append.close();
        self.resolver.close();
        self.monitor.close();
    }
}

/// Connections of a monitor pool: one for checks, one for a probe.
pub const MONITOR_POOL_SIZE: usize = 2;

/// The time limits every Gavel connection carries.
#[derive(Clone, Copy, Debug)]
pub struct SessionLimits {
    /// How long opening a connection may take.
    pub connect_timeout: Duration,
    /// `statement_timeout`.
    pub statement_timeout: Duration,
    /// `lock_timeout`.
    pub lock_timeout: Duration,
}

impl SessionLimits {
    /// The limits configured for this process.
    pub fn from_config(config: &Config) -> Self {
        SessionLimits {
            connect_timeout: config.pools.connect_timeout,
            statement_timeout: config.pools.statement_timeout,
            lock_timeout: config.pools.lock_timeout,
        }
    }
}

/// Sizing and session settings of one pool.
pub struct PoolSettings {
    /// Maximum number of connections.
    pub size: usize,
    /// How long a caller waits for a free connection.
    pub wait_timeout: Duration,
    /// Connect, statement and lock timeouts.
    pub limits: SessionLimits,
    /// `application_name`, so SREs can attribute backends in `pg_stat_activity`.
    pub application_name: &'static str,
    /// Plan every statement for its parameters (`plan_cache_mode =
    /// force_custom_plan`) instead of reusing a generic plan.
    pub custom_plans: bool,
}

impl PoolSettings {
    /// A pool of `size` connections with the configured timeouts.
    pub fn new(config: &Config, size: usize, application_name: &'static str) -> Self {
        PoolSettings {
            size,
            wait_timeout: config.pools.wait_timeout,
            limits: SessionLimits::from_config(config),
            application_name,
            custom_plans: false,
        }
    }

    /// Plans each statement for its parameters. For the resolver's scans
    /// (the auctions with bids to resolve or due to settle): a generic
    /// plan, made once while the tables were small, can scan them whole
    /// ever after; they run a few times a second, so planning each costs
    /// little. Within its transactions the resolver switches to generic
    /// plans that can only probe rows (see
    /// `resolver::transaction::plan_modes`).
    pub fn with_custom_plans(mut self) -> Self {
        self.custom_plans = true;
        self
    }
}

/// The tokio-postgres configuration for `url` with Gavel's session settings.
pub fn session_config(
    url: &str,
    application_name: &str,
    limits: &SessionLimits,
) -> anyhow::Result<tokio_postgres::Config> {
    let mut pg: tokio_postgres::Config = url.parse().context("invalid PostgreSQL URL")?;
    let statement_ms = limits.statement_timeout.as_millis();
    // An idle transaction holding locks is cut off so it cannot stall the
    // resolver; Gavel's own transactions never wait on the client. No JIT:
    // every statement is a short lookup or a batch write, and estimates
    // that lag a hot auction had the resolver's scan compile for 20 ms to
    // run for 1.
    pg.application_name(application_name)
        .connect_timeout(limits.connect_timeout)
        // Notice a silently dead connection (the listener idles for long).
        .keepalives_idle(Duration::from_secs(30))
        .options(format!(
            "-c statement_timeout={statement_ms} -c lock_timeout={} \
             -c idle_in_transaction_session_timeout={} -c jit=off",
            limits.lock_timeout.as_millis(),
            statement_ms * 2
        ));
    Ok(pg)
}

/// Makes the sessions of `pg` plan every statement for its parameters
/// (see [`PoolSettings::with_custom_plans`]).
pub fn plan_for_parameters(pg: &mut tokio_postgres::Config) {
    let options = pg.get_options().unwrap_or_default().to_owned();
    pg.options(format!("{options} -c plan_cache_mode=force_custom_plan"));
}

/// A bounded connection pool that measures itself: how long callers wait
/// for a connection, how often a wait runs out, and (exported at each
/// scrape) its size, idle connections and waiters. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: deadpool_postgres::Pool,
    metrics: Arc<PoolMetrics>,
    heartbeat: Arc<silence::Heartbeat>,
}

struct PoolMetrics {
    wait: Histogram,
    timeouts: Counter,
    max: Gauge,
    size: Gauge,
    available: Gauge,
    waiting: Gauge,
    /// Callers waiting through another task (see [`Pool::wait_started`]).
    waiting_through: AtomicUsize,
}

/// How a wait made through another task ended (see [`Pool::wait_started`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitEnd {
    /// The caller's work got a connection.
    Served,
    /// The caller's time ran out first: it is shed.
    TimedOut,
    /// The caller went away: its wait is not recorded.
    Abandoned,
}

impl Pool {
    /// Wraps `inner`, labelling its metrics `pool="{name}"`; `heartbeat` is
    /// its server's.
    pub fn new(
        inner: deadpool_postgres::Pool,
        name: &str,
        heartbeat: Arc<silence::Heartbeat>,
    ) -> Self {
        let labels = [("pool", name.to_owned())];
        let metrics = PoolMetrics {
            wait: metrics::histogram!("gavel_db_pool_wait_seconds", &labels),
            timeouts: metrics::counter!("gavel_db_pool_timeouts_total", &labels),
            max: metrics::gauge!("gavel_db_pool_max_connections", &labels),
            size: metrics::gauge!("gavel_db_pool_connections", &labels),
            available: metrics::gauge!("gavel_db_pool_available_connections", &labels),
            waiting: metrics::gauge!("gavel_db_pool_waiting_requests", &labels),
            waiting_through: AtomicUsize::new(0),
        };
        // Present from the start, so a rate over it is 0, not missing.
        metrics.timeouts.increment(0);
        let pool = Pool {
            inner,
            metrics: Arc::new(metrics),
            heartbeat,
        };
        pool.export_status();
        pool
    }

    /// A connection, waiting at most the pool's wait timeout.
    pub async fn get(&self) -> Result<Object, PoolError> {
        let started = Instant::now();
        let result = self.inner.get().await;
        self.record_wait(started, &result);
        result
    }

    /// A connection, waiting at most until `deadline` (and the pool's wait
    /// timeout); running out of time is a wait timeout.
    pub async fn get_before(&self, deadline: Instant) -> Result<Object, PoolError> {
        let started = Instant::now();
        let result = self.get_before_on_behalf(deadline).await;
        self.record_wait(started, &result);
        result
    }

    /// Counts a caller that waits for a connection through another task (a
    /// bid queued for a coalesced append, whose writer takes the connection
    /// for a whole batch): among the waiters until [`Pool::wait_ended`],
    /// which records the wait like one made with [`Pool::get_before`].
    pub fn wait_started(&self) {
        self.metrics.waiting_through.fetch_add(1, Ordering::Relaxed);
    }

    /// Ends a wait counted by [`Pool::wait_started`] at `started`.
    pub fn wait_ended(&self, started: Instant, end: WaitEnd) {
        self.metrics.waiting_through.fetch_sub(1, Ordering::Relaxed);
        if end != WaitEnd::Abandoned {
            self.metrics.wait.record(started.elapsed().as_secs_f64());
        }
        if end == WaitEnd::TimedOut {
            self.metrics.timeouts.increment(1);
        }
    }

    /// A connection for a task that waits on behalf of callers counted with
    /// [`Pool::wait_started`], waiting at most until `deadline`: their
    /// waits are recorded, so this one is not.
    pub async fn get_before_on_behalf(&self, deadline: Instant) -> Result<Object, PoolError> {
        tokio::time::timeout_at(deadline.into(), self.inner.get())
            .await
            .unwrap_or(Err(PoolError::Timeout(TimeoutType::Wait)))
    }

    fn record_wait(&self, started: Instant, result: &Result<Object, PoolError>) {
        self.metrics.wait.record(started.elapsed().as_secs_f64());
        if let Err(PoolError::Timeout(TimeoutType::Wait)) = result {
            self.metrics.timeouts.increment(1);
        }
    }

    /// When the pool's server last sent anything (see [`silence`]).
    pub fn heartbeat(&self) -> &Arc<silence::Heartbeat> {
        &self.heartbeat
    }

    /// The pool's wait, create and recycle timeouts.
    pub fn timeouts(&self) -> deadpool_postgres::Timeouts {
        self.inner.timeouts()
    }

    /// Size, idle connections and waiters right now.
    pub fn status(&self) -> Status {
        self.inner.status()
    }

    /// Sets the pool's gauges to its current status.
    pub fn export_status(&self) {
        let status = self.inner.status();
        self.metrics.max.set(status.max_size as f64);
        self.metrics.size.set(status.size as f64);
        self.metrics.available.set(status.available as f64);
        let waiting_through = self.metrics.waiting_through.load(Ordering::Relaxed);
        self.metrics
            .waiting
            .set((status.waiting + waiting_through) as f64);
    }

    /// Closes the pool; connections are dropped as they are returned.
    pub fn close(&self) {
        self.inner.close();
    }
}

/// A bounded pool named `name` in metrics, whose callers wait at most
/// `wait_timeout` for a connection and `connect_timeout` for a new one, and
/// whose connections are given up on when their server falls silent.
pub fn build_pool(url: &str, name: &str, settings: &PoolSettings) -> anyhow::Result<Pool> {
    let mut pg = session_config(url, settings.application_name, &settings.limits)?;
    if settings.custom_plans {
        plan_for_parameters(&mut pg);
    }
    let heartbeat = silence::Heartbeat::of(&pg);
    let manager = Manager::from_connect(
        pg,
        silence::WatchedConnect,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let inner = deadpool_postgres::Pool::builder(manager)
        .max_size(settings.size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(settings.wait_timeout))
        .create_timeout(Some(settings.limits.connect_timeout))
        .recycle_timeout(Some(settings.limits.connect_timeout))
        .build()
        .context("building the connection pool")?;
    Ok(Pool::new(inner, name, heartbeat))
}

/// Applies pending migrations to the database at `url`.
pub async fn migrate(url: &str) -> anyhow::Result<()> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .context("connecting to the primary to migrate")?;
    MIGRATOR
        .run(&mut conn)
        .await
        .context("applying migrations")?;
    conn.close().await.ok();
    Ok(())
}

/// Whether every embedded migration has been applied (for `/readyz`).
pub async fn schema_is_current(
    client: &tokio_postgres::Client,
) -> Result<bool, tokio_postgres::Error> {
    let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    let row = client
        .query_opt(
            "SELECT max(version) FROM _sqlx_migrations WHERE success",
            &[],
        )
        .await?;
    let applied: Option<i64> = row.and_then(|r| r.get(0));
    // A newer schema than this binary knows is fine (rolling deploys).
    Ok(applied.is_some_and(|v| v >= latest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_plans_are_added_to_the_session_settings() {
        let limits = SessionLimits {
            connect_timeout: Duration::from_millis(700),
            statement_timeout: Duration::from_millis(5_000),
            lock_timeout: Duration::from_millis(1_000),
        };
        let mut pg = session_config(
            "postgres://gavel@127.0.0.1:5999/gavel",
            "gavel-resolver",
            &limits,
        )
        .unwrap();
        plan_for_parameters(&mut pg);
        let options = pg.get_options().unwrap();
        assert!(
            options.contains("-c plan_cache_mode=force_custom_plan"),
            "{options}"
        );
        assert!(options.contains("statement_timeout=5000"), "{options}");
    }

    #[test]
    fn every_connection_carries_its_name_and_time_limits() {
        let limits = SessionLimits {
            connect_timeout: Duration::from_millis(700),
            statement_timeout: Duration::from_millis(5_000),
            lock_timeout: Duration::from_millis(1_000),
        };
        let pg = session_config(
            "postgres://gavel@127.0.0.1:5999/gavel",
            "gavel-api",
            &limits,
        )
        .unwrap();
        assert_eq!(pg.get_application_name(), Some("gavel-api"));
        assert_eq!(pg.get_connect_timeout(), Some(&Duration::from_millis(700)));
        let options = pg.get_options().unwrap();
        for setting in [
            "statement_timeout=5000",
            "lock_timeout=1000",
            "idle_in_transaction_session_timeout=10000",
            "jit=off",
        ] {
            assert!(options.contains(setting), "{setting} in {options:?}");
        }
    }
}
