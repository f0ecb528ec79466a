//! The periodic upkeep of `gavel serve`: the webhook backlog per URL for
//! the metrics, and retention: finished deliveries and event log rows are
//! kept [`KEEP`] (the bidders' streams resume from the log that far back),
//! log rows longer while a configured URL has not queued them.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::label;
use crate::config::Config;
use crate::db::{build_pool, marketplace, webhooks, Pool, PoolSettings};

/// How long delivered and failed deliveries, and log rows, are kept.
pub const KEEP: Duration = Duration::from_secs(24 * 3600);
/// How often the backlog is sampled.
const SAMPLE: Duration = Duration::from_secs(5);
/// Retention runs every this many samples (one minute).
const PRUNE_EVERY: u32 = 12;
/// Rows deleted per statement, so no delete holds locks for long.
const PRUNE_BATCH: i64 = 5_000;

/// The upkeep of this process.
pub struct Upkeep {
    pool: Pool,
    urls: Vec<String>,
}

impl Upkeep {
    /// Upkeep for the configured URLs, with a connection of its own.
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let pool = build_pool(
            &config.database_url,
            "upkeep",
            &PoolSettings::new(config, 1, "gavel-upkeep"),
        )?;
        let urls = config.webhooks.urls.iter().map(|u| u.to_string()).collect();
        Ok(Upkeep { pool, urls })
    }

    /// Samples and prunes until `shutdown`; failures are logged.
    pub async fn run(self, shutdown: CancellationToken) {
        for table in ["events", "webhook_deliveries"] {
            metrics::counter!("gavel_rows_pruned_total", "table" => table).increment(0);
        }
        let mut round = 0u32;
        loop {
            if let Err(e) = self.sample().await {
                tracing::warn!(error = %format!("{e:#}"), "sampling the webhook backlog failed");
            }
            if round % PRUNE_EVERY == 0 {
                if let Err(e) = self.prune().await {
                    tracing::warn!(error = %format!("{e:#}"), "pruning old events failed");
                }
            }
            round = round.wrapping_add(1);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(SAMPLE) => {}
            }
        }
    }

    /// Sets each URL's backlog gauges.
    pub async fn sample(&self) -> anyhow::Result<()> {
        let client = self.pool.get().await?;
        for url in &self.urls {
            let (waiting, oldest) = webhooks::backlog(&client, url).await?;
            let url = label(url);
            metrics::gauge!("gavel_webhook_backlog", "url" => url.clone()).set(waiting as f64);
            metrics::gauge!("gavel_webhook_oldest_undelivered_seconds", "url" => url).set(oldest);
        }
        Ok(())
    }

    /// Deletes what is past retention, a batch at a time.
    pub async fn prune(&self) -> anyhow::Result<()> {
        let client = self.pool.get().await?;
        loop {
            let n = webhooks::prune_finished(&client, KEEP, PRUNE_BATCH).await?;
            metrics::counter!("gavel_rows_pruned_total", "table" => "webhook_deliveries")
                .increment(n);
            if n < PRUNE_BATCH as u64 {
                break;
            }
        }
        loop {
            let n = marketplace::prune(&client, KEEP, &self.urls, PRUNE_BATCH).await?;
            metrics::counter!("gavel_rows_pruned_total", "table" => "events").increment(n);
            if n < PRUNE_BATCH as u64 {
                return Ok(());
            }
        }
    }
}
