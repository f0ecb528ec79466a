//! Webhook delivery of the marketplace's events (API.md "Webhooks"): each
//! configured URL gets every event of the log, signed per Standard
//! Webhooks v1, at least once, in order per auction.
//!
//! Safe with several processes: per URL, one process at a time queues the
//! log's new events as deliveries and moves the URL's position in the same
//! transaction, and each due delivery is claimed by one process under a
//! lease (see `db::webhooks`). Each URL has its own loop here, so a slow
//! receiver holds up only itself, with at most [`PER_URL`] attempts in
//! flight. Loops wake when the resolver announces a change, and poll.

mod attempt;
pub mod backoff;
pub mod retention;

use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, WebhookConfig};
use crate::db::webhooks::{self, Delivery, Rendered, Settled};
use crate::db::{build_pool, Pool, PoolSettings};
use crate::domain::WebhookSecret;
use crate::marketplace::Event;
use crate::signals::Signals;

pub use attempt::ATTEMPT_LIMIT;

/// Attempts in flight to one URL at most.
pub const PER_URL: usize = 8;
/// How long a claimed delivery is this process's: longer than an attempt
/// and its recording, so it expires only when the process is gone.
pub const LEASE: Duration = Duration::from_secs(20);
/// Events queued per URL per step.
const FILL_LIMIT: i64 = 500;
/// How often a URL's loop looks for due deliveries without a wake-up.
const POLL: Duration = Duration::from_millis(500);
/// The shortest pause between two steps of a URL's loop: in a final
/// minute the resolver announces a change every few milliseconds.
const MIN_GAP: Duration = Duration::from_millis(25);

/// The webhook dispatcher of this process. Cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    pool: Pool,
    http: reqwest::Client,
    secret: WebhookSecret,
    urls: Vec<String>,
    retry_base: Duration,
    signals: Signals,
}

impl Dispatcher {
    /// A dispatcher for the configured URLs, with a pool of its own;
    /// `None` when no URL is configured.
    pub fn new(config: &Config, signals: &Signals) -> anyhow::Result<Option<Self>> {
        let WebhookConfig {
            urls,
            secret,
            retry_base,
        } = &config.webhooks;
        let Some(secret) = secret.clone().filter(|_| !urls.is_empty()) else {
            return Ok(None);
        };
        let pool = build_pool(
            &config.database_url,
            "webhooks",
            &PoolSettings::new(config, PER_URL + 2, "gavel-webhooks"),
        )?;
        Ok(Some(Dispatcher {
            pool,
            http: attempt::client(PER_URL)?,
            secret,
            urls: urls.iter().map(|u| u.to_string()).collect(),
            retry_base: *retry_base,
            signals: signals.clone(),
        }))
    }

    /// The dispatcher's pool, for exporting its occupancy.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The URLs it delivers to.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Delivers until `shutdown`, one loop per URL; an attempt under way
    /// at shutdown finishes first.
    pub async fn run(self, shutdown: CancellationToken) {
        register_metrics(&self.urls);
        while let Err(e) = self.register().await {
            tracing::warn!(error = %e, "could not record the webhook URLs; retrying");
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        let loops = (self.urls.iter()).map(|url| self.follow(url.clone(), shutdown.clone()));
        futures::future::join_all(loops).await;
    }

    /// Records the URLs in the database (a new one starts at the oldest
    /// event kept).
    pub async fn register(&self) -> anyhow::Result<()> {
        let client = self.pool.get().await?;
        webhooks::register(&client, &self.urls).await?;
        Ok(())
    }

    /// One step for every URL ([`Self::step_url`]); returns the attempts made.
    pub async fn step(&self) -> anyhow::Result<usize> {
        let mut attempts = 0;
        for url in &self.urls {
            attempts += self.step_url(url).await?;
        }
        Ok(attempts)
    }

    /// One URL's loop: a step, then the next at once if it was full, else
    /// after a wake-up, the next retry's time or [`POLL`], and [`MIN_GAP`].
    async fn follow(&self, url: String, shutdown: CancellationToken) {
        let mut announced = self.signals.subscribe();
        loop {
            let full = match self.step_url(&url).await {
                Ok(attempts) => attempts == PER_URL,
                Err(e) => {
                    tracing::warn!(url = %label(&url), error = %format!("{e:#}"), "webhook step failed");
                    false
                }
            };
            if full {
                // A backlog: the next step at once, until it is drained.
                if shutdown.is_cancelled() {
                    return;
                }
                continue;
            }
            let pause = self.pause(&url).await;
            announced = announced.resubscribe();
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
                _ = announced.recv() => {}
            }
            tokio::time::sleep(MIN_GAP).await;
        }
    }

    /// How long a URL's loop may sleep: until its next retry is due, at
    /// most [`POLL`].
    async fn pause(&self, url: &str) -> Duration {
        let due = match self.pool.get().await {
            Ok(client) => webhooks::next_due(&client, url).await.ok().flatten(),
            Err(_) => None,
        };
        due.map_or(POLL, |due| due.min(POLL))
    }

    /// Queues `url`'s new events, then claims its due deliveries (at most
    /// [`PER_URL`]) and attempts them together; returns how many.
    pub async fn step_url(&self, url: &str) -> anyhow::Result<usize> {
        let claimed = {
            let mut client = self.pool.get().await?;
            webhooks::fill(&mut client, url, FILL_LIMIT, render)
                .await
                .context("queuing events")?;
            webhooks::claim(&client, url, PER_URL as i64, LEASE)
                .await
                .context("claiming deliveries")?
        };
        let attempts = claimed.len();
        futures::future::join_all(claimed.into_iter().map(|d| self.deliver(d))).await;
        Ok(attempts)
    }

    /// One attempt of `delivery`, and its answer recorded.
    async fn deliver(&self, delivery: Delivery) {
        let started = Instant::now();
        let answer = attempt::post(&self.http, &self.secret, &delivery).await;
        let url = label(&delivery.url);
        metrics::histogram!("gavel_webhook_attempt_duration_seconds", "url" => url.clone())
            .record(started.elapsed().as_secs_f64());
        let settled = match self.record(&delivery, &answer).await {
            Ok(settled) => settled,
            Err(e) => {
                // The lease expires and the delivery is attempted again.
                tracing::warn!(url = %url, event_id = %delivery.event_id, error = %e,
                    "could not record a webhook attempt");
                return;
            }
        };
        observe(&delivery, &url, settled, answer.err());
    }

    async fn record(
        &self,
        delivery: &Delivery,
        answer: &Result<(), String>,
    ) -> Result<Settled, deadpool_postgres::PoolError> {
        let client = self.pool.get().await?;
        let recorded = match answer {
            Ok(()) => webhooks::delivered(&client, delivery).await,
            Err(why) => {
                let jitter = backoff::random_jitter();
                let wait = backoff::retry_wait(self.retry_base, delivery.attempts, jitter);
                webhooks::refused(&client, delivery, wait, backoff::GIVE_UP_AFTER, why).await
            }
        };
        Ok(recorded?)
    }
}

/// An event's delivery body: the feed's JSON form.
fn render(event: &crate::db::marketplace::MarketEvent) -> Rendered {
    let event = Event::from(event);
    Rendered {
        body: serde_json::to_string(&event).expect("an event serializes"),
        event_id: event.id,
    }
}

/// Counts and logs what became of an attempt.
fn observe(delivery: &Delivery, url: &str, settled: Settled, error: Option<String>) {
    let outcome = match settled {
        Settled::Delivered => "delivered",
        Settled::Retrying => "retried",
        Settled::Failed => "failed",
        Settled::LeaseLost => "lease_lost",
    };
    metrics::counter!("gavel_webhook_deliveries_total", "url" => url.to_owned(), "outcome" => outcome)
        .increment(1);
    let (id, attempts) = (&delivery.event_id, delivery.attempts);
    match settled {
        Settled::Delivered => {
            let age = (chrono::Utc::now() - delivery.event_at)
                .num_milliseconds()
                .max(0);
            metrics::histogram!("gavel_webhook_delivery_latency_seconds", "url" => url.to_owned())
                .record(age as f64 / 1000.0);
            tracing::debug!(url, event_id = %id, attempts, "webhook delivered");
        }
        Settled::Retrying => {
            tracing::info!(url, event_id = %id, attempts, error = ?error, "webhook refused; will retry")
        }
        Settled::Failed => tracing::error!(url, event_id = %id, attempts, error = ?error,
            "webhook failed: refused for 24 h, given up (replay with `gavel webhooks replay`)"),
        Settled::LeaseLost => {
            tracing::warn!(url, event_id = %id, "webhook lease lost before its answer was recorded")
        }
    }
}

/// Registers the delivery metrics at zero for each URL.
fn register_metrics(urls: &[String]) {
    for url in urls.iter().map(|u| label(u)) {
        // Registered without a sample: exported (empty) from the first scrape.
        let _ = metrics::histogram!("gavel_webhook_attempt_duration_seconds", "url" => url.clone());
        let _ = metrics::histogram!("gavel_webhook_delivery_latency_seconds", "url" => url.clone());
        for outcome in ["delivered", "retried", "failed", "lease_lost"] {
            metrics::counter!("gavel_webhook_deliveries_total", "url" => url.clone(), "outcome" => outcome)
                .increment(0);
        }
    }
}

/// A URL as metrics and logs name it: without credentials or query.
pub fn label(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => format!(
            "{}://{}{}{}",
            u.scheme(),
            u.host_str().unwrap_or(""),
            u.port().map(|p| format!(":{p}")).unwrap_or_default(),
            u.path()
        ),
        Err(_) => "invalid".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_hides_credentials_and_query() {
        assert_eq!(
            label("https://user:pw@hooks.example.com:8443/in?token=x"),
            "https://hooks.example.com:8443/in"
        );
        assert_eq!(label("http://127.0.0.1/"), "http://127.0.0.1/");
    }
}
