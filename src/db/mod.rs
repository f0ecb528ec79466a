//! Database access: bounded connection pools on the primary, the embedded
//! migrations, and the queries of each table (`auctions`, `bids`).
//!
//! Runtime queries go through deadpool-postgres and tokio-postgres prepared
//! statements; sqlx is used only for its migrator.

pub mod auctions;
pub mod bids;

use std::time::Duration;

use anyhow::Context as _;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::config::Config;

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The pools of one Gavel process, split so API pressure cannot starve the
/// resolver and the other way round.
#[derive(Clone)]
pub struct Pools {
    /// Request handlers' connections to the primary.
    pub api: Pool,
    /// The resolver's connections to the primary.
    pub resolver: Pool,
}

impl Pools {
    /// Builds (lazily connecting) pools from the configuration.
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let settings = |size, name| PoolSettings {
            size,
            wait_timeout: config.pool_wait_timeout,
            statement_timeout: config.statement_timeout,
            application_name: name,
        };
        Ok(Pools {
            api: build_pool(
                &config.database_url,
                &settings(config.api_pool_size, "gavel-api"),
            )?,
            resolver: build_pool(
                &config.database_url,
                &settings(config.resolver_pool_size, "gavel-resolver"),
            )?,
        })
    }
}

/// Sizing and session settings of one pool.
pub struct PoolSettings {
    /// Maximum number of connections.
    pub size: usize,
    /// How long a caller waits for a free connection.
    pub wait_timeout: Duration,
    /// `statement_timeout` (and, derived from it, the lock and idle timeouts).
    pub statement_timeout: Duration,
    /// `application_name`, so SREs can attribute backends in `pg_stat_activity`.
    pub application_name: &'static str,
}

/// The tokio-postgres configuration for `url` with Gavel's session settings.
pub fn session_config(
    url: &str,
    application_name: &str,
    statement_timeout: Duration,
) -> anyhow::Result<tokio_postgres::Config> {
    let mut pg: tokio_postgres::Config = url.parse().context("invalid PostgreSQL URL")?;
    let statement_ms = statement_timeout.as_millis();
    // A lock wait can never be longer than a statement; an idle transaction
    // holding locks is cut off so it cannot stall the resolver.
    pg.application_name(application_name)
        .connect_timeout(Duration::from_secs(5))
        // Notice a silently dead connection (the listener idles for long).
        .keepalives_idle(Duration::from_secs(30))
        .options(format!(
            "-c statement_timeout={statement_ms} -c lock_timeout={statement_ms} \
             -c idle_in_transaction_session_timeout={}",
            statement_ms * 2
        ));
    Ok(pg)
}

/// A bounded pool whose callers wait at most `wait_timeout` for a connection.
pub fn build_pool(url: &str, settings: &PoolSettings) -> anyhow::Result<Pool> {
    let pg = session_config(url, settings.application_name, settings.statement_timeout)?;
    let manager = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(settings.size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(settings.wait_timeout))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .context("building the connection pool")
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
