//! Gavel's configuration: one typed struct read from `GAVEL_*` environment
//! variables and validated at start-up, so a bad value stops the process
//! with one line naming the variable instead of failing later under load.

use std::net::SocketAddr;
use std::time::Duration;

use crate::domain::WebhookSecret;

/// Minimum length of the HS256 secret, in bytes (the API contract).
pub const MIN_JWT_SECRET_LEN: usize = 32;

/// Everything `gavel serve` needs, validated, grouped by concern.
#[derive(Clone)]
pub struct Config {
    /// Primary PostgreSQL URL (`GAVEL_DATABASE_URL`).
    pub database_url: String,
    /// Public API listener (`GAVEL_LISTEN`).
    pub listen: SocketAddr,
    /// Admin listener serving `/metrics` (`GAVEL_ADMIN_LISTEN`).
    pub admin_listen: SocketAddr,
    /// How callers are authenticated.
    pub auth: AuthConfig,
    /// Logs and database sampling.
    pub telemetry: TelemetryConfig,
    /// Connection pools and the timeouts of their connections.
    pub pools: PoolConfig,
    /// Where reads go: replicas, their freshness, the view cache.
    pub reads: ReadConfig,
    /// The background resolver.
    pub resolver: ResolverConfig,
    /// How bids are written and kept.
    pub bids: BidConfig,
    /// How much work the API takes on at once, and for how long.
    pub limits: Limits,
    /// Where the marketplace's events are posted, and how they are signed.
    pub webhooks: WebhookConfig,
}

/// Webhook delivery of the marketplace's events.
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    /// The receivers (`GAVEL_WEBHOOK_URLS`, comma-separated http(s) URLs).
    pub urls: Vec<reqwest::Url>,
    /// The signing secret (`GAVEL_WEBHOOK_SECRET`, required with URLs).
    pub secret: Option<WebhookSecret>,
    /// The first retry's wait before jitter (`GAVEL_WEBHOOK_RETRY_BASE_MS`,
    /// default 4 s; for tests only: the contract's first retry is within 5 s).
    pub retry_base: Duration,
}

/// Bearer tokens (HS256 JWTs).
#[derive(Clone)]
pub struct AuthConfig {
    /// HS256 signing secret (`GAVEL_JWT_SECRET`).
    pub jwt_secret: String,
    /// Expected `aud` claim (`GAVEL_JWT_AUDIENCE`).
    pub jwt_audience: String,
}

/// Logs and the sampling of PostgreSQL for metrics.
#[derive(Clone)]
pub struct TelemetryConfig {
    /// Tracing filter (`GAVEL_LOG`).
    pub log_filter: String,
    /// Log output format (`GAVEL_LOG_FORMAT`: `text` or `json`).
    pub log_json: bool,
    /// How often `pg_stat_activity` and the resolver backlog are sampled
    /// for metrics (`GAVEL_PG_SAMPLE_MS`).
    pub pg_sample_interval: Duration,
}

/// The connection pools, and the limits every pooled connection runs under.
#[derive(Clone)]
pub struct PoolConfig {
    /// Connections the API may hold on the primary (`GAVEL_API_POOL_SIZE`).
    pub api_size: usize,
    /// Connections the resolver may hold on the primary (`GAVEL_RESOLVER_POOL_SIZE`).
    pub resolver_size: usize,
    /// Connections the API may hold on each replica (`GAVEL_REPLICA_POOL_SIZE`).
    pub replica_size: usize,
    /// How long a request waits for a pooled connection before 503 (`GAVEL_POOL_WAIT_TIMEOUT_MS`).
    pub wait_timeout: Duration,
    /// How long opening a new connection may take (`GAVEL_CONNECT_TIMEOUT_MS`).
    pub connect_timeout: Duration,
    /// `statement_timeout` of every connection (`GAVEL_STATEMENT_TIMEOUT_MS`).
    pub statement_timeout: Duration,
    /// `lock_timeout` of every connection (`GAVEL_LOCK_TIMEOUT_MS`, at most the statement timeout).
    pub lock_timeout: Duration,
}

/// Read routing: streaming replicas, how fresh they must be, the view cache.
#[derive(Clone)]
pub struct ReadConfig {
    /// Streaming replica URLs (`GAVEL_REPLICA_URLS`, comma-separated).
    pub replica_urls: Vec<String>,
    /// Percentage of the API pool that reads may hold on the primary
    /// (`GAVEL_PRIMARY_READ_SHARE_PCT`), so reads cannot starve bids.
    pub primary_share_pct: usize,
    /// How often replica health and lag are checked (`GAVEL_REPLICA_CHECK_MS`).
    pub check_interval: Duration,
    /// How stale a replica may be and still serve reads (`GAVEL_REPLICA_MAX_LAG_MS`).
    pub max_lag: Duration,
    /// How far behind the primary's WAL a replica may be and still serve
    /// reads (`GAVEL_REPLICA_MAX_LAG_BYTES`).
    pub max_lag_bytes: u64,
    /// How long an auction view may serve token-less reads from memory
    /// (`GAVEL_READ_CACHE_MS`; 0 turns the cache off).
    pub cache_ttl: Duration,
}

/// The background resolver.
#[derive(Clone)]
pub struct ResolverConfig {
    /// Whether this process runs the resolver (`GAVEL_RESOLVER`: `on` or `off`).
    pub enabled: bool,
    /// Polling fallback of the resolver (`GAVEL_RESOLVER_POLL_MS`).
    pub poll: Duration,
    /// Shortest time between the starts of two rounds woken by new bids
    /// (`GAVEL_RESOLVER_INTERVAL_MS`): bids arriving meanwhile share the
    /// next round's transactions.
    pub interval: Duration,
    /// Wait after `ends_at` before settling, so bids still committing are
    /// resolved first (`GAVEL_SETTLE_GRACE_MS`, default statement timeout + 1 s).
    pub settle_grace: Duration,
}

/// How bids are written, paced and remembered.
#[derive(Clone)]
pub struct BidConfig {
    /// How a bid is written (`GAVEL_BID_PATH`: `log`, the append-only bid
    /// log; or one of the load tests' baselines: `row_lock`, the classic
    /// row-lock design, `row_lock_fn`, the same in one round trip, and
    /// `optimistic`, compare-and-set from every request).
    pub path: BidPath,
    /// Writer tasks of coalesced bid appends, each writing one batch at a
    /// time on a primary connection of its own, beside the API pool
    /// (`GAVEL_APPEND_WRITERS`).
    pub append_writers: usize,
    /// Most bids one append statement writes (`GAVEL_APPEND_BATCH_MAX`).
    pub append_batch_max: usize,
    /// Sustained bids per second one bidder may place (`GAVEL_BID_RATE_LIMIT`, 0 = off).
    pub rate_limit: u32,
    /// Burst of bids one bidder may place at once (`GAVEL_BID_RATE_BURST`).
    pub rate_burst: u32,
}

/// How much work the API takes on at once and how long it may take.
#[derive(Clone)]
pub struct Limits {
    /// Deadline of every API request (`GAVEL_REQUEST_TIMEOUT_MS`).
    pub request_timeout: Duration,
    /// API requests in flight before new ones are shed with 503 (`GAVEL_MAX_IN_FLIGHT`).
    pub max_in_flight: usize,
    /// Client connections and how long a client may take to send.
    pub edge: EdgeLimits,
    /// Event streams open at once in this process (`GAVEL_MAX_STREAMS`).
    pub max_streams: usize,
    /// Auction events a second this process sends over all its streams
    /// (`GAVEL_STREAM_EVENTS_PER_S`): each auction stream waits its share
    /// between two events.
    pub stream_events_per_s: usize,
}

/// What one client may hold and how long it may take to send: the limits
/// that keep slow or idle clients from holding capacity.
#[derive(Debug, Clone, Copy)]
pub struct EdgeLimits {
    /// Open connections per listener before new ones are refused with 503
    /// (`GAVEL_MAX_CONNECTIONS`).
    pub max_connections: usize,
    /// How long a client may take to send a request's headers, from their
    /// first byte (`GAVEL_HEADER_READ_TIMEOUT_MS`).
    pub header_read_timeout: Duration,
    /// How long a kept-alive connection may sit between requests
    /// (`GAVEL_IDLE_TIMEOUT_MS`).
    pub idle_timeout: Duration,
    /// How long a client may take to send a request's body, read before the
    /// request takes an in-flight slot (`GAVEL_BODY_READ_TIMEOUT_MS`).
    pub body_read_timeout: Duration,
}

/// A setting that is missing or invalid; the message names the variable.
#[derive(Debug, thiserror::Error)]
#[error("{name}: {problem}")]
pub struct ConfigError {
    /// The full variable name, e.g. `GAVEL_JWT_SECRET`.
    pub name: String,
    /// What is wrong with it.
    pub problem: String,
}

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the configuration through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env(&lookup);
        let pools = env.pools()?;
        Ok(Config {
            database_url: env.database_url("GAVEL_DATABASE_URL")?,
            listen: env.socket_addr("GAVEL_LISTEN", "127.0.0.1:8080")?,
            admin_listen: env.socket_addr("GAVEL_ADMIN_LISTEN", "127.0.0.1:9090")?,
            auth: AuthConfig {
                jwt_secret: env.jwt_secret("GAVEL_JWT_SECRET")?,
                jwt_audience: env.non_empty("GAVEL_JWT_AUDIENCE", "gavel")?,
            },
            telemetry: TelemetryConfig {
                log_filter: env.log_filter("GAVEL_LOG")?,
                log_json: env.choice("GAVEL_LOG_FORMAT", "text", &["text", "json"])? == "json",
                pg_sample_interval: env.millis("GAVEL_PG_SAMPLE_MS", 2_000, 100..=60_000)?,
            },
            reads: env.reads()?,
            resolver: env.resolver(pools.statement_timeout)?,
            bids: env.bids()?,
            limits: env.limits(&pools)?,
            webhooks: env.webhooks()?,
            pools,
        })
    }
}

impl Env<'_> {
    fn pools(&self) -> Result<PoolConfig, ConfigError> {
        let statement_timeout = self.millis("GAVEL_STATEMENT_TIMEOUT_MS", 5_000, 100..=600_000)?;
        Ok(PoolConfig {
            api_size: self.number("GAVEL_API_POOL_SIZE", 16, 1..=1000)?,
            resolver_size: self.number("GAVEL_RESOLVER_POOL_SIZE", 2, 1..=100)?,
            replica_size: self.number("GAVEL_REPLICA_POOL_SIZE", 8, 1..=1000)?,
            wait_timeout: self.millis("GAVEL_POOL_WAIT_TIMEOUT_MS", 1_000, 1..=30_000)?,
            connect_timeout: self.millis("GAVEL_CONNECT_TIMEOUT_MS", 1_000, 50..=60_000)?,
            statement_timeout,
            lock_timeout: self.at_most(
                "GAVEL_LOCK_TIMEOUT_MS",
                500,
                ("GAVEL_STATEMENT_TIMEOUT_MS", statement_timeout),
            )?,
        })
    }

    fn reads(&self) -> Result<ReadConfig, ConfigError> {
        let check_interval = self.millis("GAVEL_REPLICA_CHECK_MS", 500, 50..=60_000)?;
        Ok(ReadConfig {
            replica_urls: self.replica_urls("GAVEL_REPLICA_URLS")?,
            primary_share_pct: self.number("GAVEL_PRIMARY_READ_SHARE_PCT", 50, 1..=100)?,
            check_interval,
            // Staleness is known to about two check rounds.
            max_lag: self.at_least(
                "GAVEL_REPLICA_MAX_LAG_MS",
                2_000,
                (
                    "twice GAVEL_REPLICA_CHECK_MS plus one check's time limit",
                    check_interval * 2 + check_limit(check_interval),
                ),
            )?,
            max_lag_bytes: self.number(
                "GAVEL_REPLICA_MAX_LAG_BYTES",
                16 << 20,
                8_192..=(1 << 40),
            )? as u64,
            cache_ttl: self.millis("GAVEL_READ_CACHE_MS", 250, 0..=10_000)?,
        })
    }

    fn resolver(&self, statement_timeout: Duration) -> Result<ResolverConfig, ConfigError> {
        Ok(ResolverConfig {
            enabled: self.choice("GAVEL_RESOLVER", "on", &["on", "off"])? == "on",
            poll: self.millis("GAVEL_RESOLVER_POLL_MS", 1_000, 10..=60_000)?,
            interval: self.millis("GAVEL_RESOLVER_INTERVAL_MS", 10, 0..=1_000)?,
            // The grace covers a bid insert still committing at the end.
            settle_grace: self.at_least(
                "GAVEL_SETTLE_GRACE_MS",
                statement_timeout.as_millis() as u64 + 1_000,
                ("GAVEL_STATEMENT_TIMEOUT_MS", statement_timeout),
            )?,
        })
    }

    fn bids(&self) -> Result<BidConfig, ConfigError> {
        Ok(BidConfig {
            path: match self
                .choice(
                    "GAVEL_BID_PATH",
                    "log",
                    &["log", "row_lock", "row_lock_fn", "optimistic"],
                )?
                .as_str()
            {
                "row_lock" => BidPath::RowLock,
                "row_lock_fn" => BidPath::RowLockFn,
                "optimistic" => BidPath::Optimistic,
                _ => BidPath::Log,
            },
            append_writers: self.number("GAVEL_APPEND_WRITERS", 1, 1..=64)?,
            append_batch_max: self.number("GAVEL_APPEND_BATCH_MAX", 500, 1..=5_000)?,
            rate_limit: self.number("GAVEL_BID_RATE_LIMIT", 10, 0..=1_000_000)? as u32,
            rate_burst: self.number("GAVEL_BID_RATE_BURST", 20, 1..=1_000_000)? as u32,
        })
    }

    fn limits(&self, pools: &PoolConfig) -> Result<Limits, ConfigError> {
        let (wait, statement) = (pools.wait_timeout, pools.statement_timeout);
        Ok(Limits {
            // Room for a connection wait and a whole statement, so a request
            // is normally ended by its statement, not cut off mid-query.
            request_timeout: self.at_least(
                "GAVEL_REQUEST_TIMEOUT_MS",
                12_000,
                (
                    "GAVEL_POOL_WAIT_TIMEOUT_MS + GAVEL_STATEMENT_TIMEOUT_MS, and twice the pool wait",
                    (wait + statement).max(wait * 2),
                ),
            )?,
            max_in_flight: self.number("GAVEL_MAX_IN_FLIGHT", 2_048, 1..=1_000_000)?,
            edge: self.edge_limits()?,
            max_streams: self.number("GAVEL_MAX_STREAMS", 10_000, 1..=1_000_000)?,
            stream_events_per_s: self.number(
                "GAVEL_STREAM_EVENTS_PER_S",
                20_000,
                1..=10_000_000,
            )?,
        })
    }
}

impl Env<'_> {
    fn webhooks(&self) -> Result<WebhookConfig, ConfigError> {
        let urls = self.webhook_urls("GAVEL_WEBHOOK_URLS")?;
        let secret = match self.get("GAVEL_WEBHOOK_SECRET") {
            Some(text) => {
                Some(WebhookSecret::parse(&text).map_err(|e| err("GAVEL_WEBHOOK_SECRET", &e))?)
            }
            None if !urls.is_empty() => {
                return Err(err(
                    "GAVEL_WEBHOOK_SECRET",
                    "is required when GAVEL_WEBHOOK_URLS is set",
                ))
            }
            None => None,
        };
        Ok(WebhookConfig {
            urls,
            secret,
            retry_base: self.millis("GAVEL_WEBHOOK_RETRY_BASE_MS", 4_000, 10..=4_000)?,
        })
    }

    fn webhook_urls(&self, name: &str) -> Result<Vec<reqwest::Url>, ConfigError> {
        let Some(raw) = self.get(name) else {
            return Ok(Vec::new());
        };
        let mut urls: Vec<reqwest::Url> = Vec::new();
        for text in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let url = reqwest::Url::parse(text)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
                .ok_or_else(|| err(name, &format!("'{text}' is not an http(s) URL")))?;
            if !urls.contains(&url) {
                urls.push(url);
            }
        }
        Ok(urls)
    }
}

struct Env<'a>(&'a dyn Fn(&str) -> Option<String>);

impl Env<'_> {
    fn get(&self, name: &str) -> Option<String> {
        (self.0)(name).filter(|v| !v.is_empty())
    }

    fn log_filter(&self, name: &str) -> Result<String, ConfigError> {
        let filter = self.non_empty(name, "info")?;
        tracing_subscriber::EnvFilter::try_new(&filter)
            .map(|_| filter.clone())
            .map_err(|e| err(name, &format!("'{filter}' is not a tracing filter: {e}")))
    }

    /// A duration setting that must be at least `floor`, the value of
    /// another setting (named for the error message) or a multiple of it.
    fn at_least(
        &self,
        name: &str,
        default_ms: u64,
        (other, floor): (&str, Duration),
    ) -> Result<Duration, ConfigError> {
        let value = self.millis(
            name,
            default_ms.max(floor.as_millis() as u64),
            0..=3_600_000,
        )?;
        if value < floor {
            return Err(err(
                name,
                &format!("must be at least {} ms (from {other})", floor.as_millis()),
            ));
        }
        Ok(value)
    }

    /// A duration setting that must not exceed `ceiling`, the value of another setting.
    fn at_most(
        &self,
        name: &str,
        default_ms: u64,
        (other, ceiling): (&str, Duration),
    ) -> Result<Duration, ConfigError> {
        let value = self.millis(
            name,
            default_ms.min(ceiling.as_millis() as u64),
            1..=3_600_000,
        )?;
        if value > ceiling {
            return Err(err(
                name,
                &format!("must be at most {other} ({} ms)", ceiling.as_millis()),
            ));
        }
        Ok(value)
    }

    fn edge_limits(&self) -> Result<EdgeLimits, ConfigError> {
        Ok(EdgeLimits {
            max_connections: self.number("GAVEL_MAX_CONNECTIONS", 10_000, 1..=1_000_000)?,
            header_read_timeout: self.millis(
                "GAVEL_HEADER_READ_TIMEOUT_MS",
                5_000,
                100..=600_000,
            )?,
            idle_timeout: self.millis("GAVEL_IDLE_TIMEOUT_MS", 30_000, 100..=3_600_000)?,
            body_read_timeout: self.millis("GAVEL_BODY_READ_TIMEOUT_MS", 2_000, 100..=600_000)?,
        })
    }

    fn required(&self, name: &str) -> Result<String, ConfigError> {
        self.get(name)
            .ok_or_else(|| err(name, "is required but not set"))
    }

    fn non_empty(&self, name: &str, default: &str) -> Result<String, ConfigError> {
        Ok(self.get(name).unwrap_or_else(|| default.to_owned()))
    }

    fn database_url(&self, name: &str) -> Result<String, ConfigError> {
        let url = self.required(name)?;
        check_postgres_url(name, &url)?;
        Ok(url)
    }

    fn replica_urls(&self, name: &str) -> Result<Vec<String>, ConfigError> {
        let Some(raw) = self.get(name) else {
            return Ok(Vec::new());
        };
        raw.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|url| check_postgres_url(name, url).map(|()| url.to_owned()))
            .collect()
    }

    fn socket_addr(&self, name: &str, default: &str) -> Result<SocketAddr, ConfigError> {
        let raw = self.non_empty(name, default)?;
        raw.parse().map_err(|_| {
            err(
                name,
                &format!("'{raw}' is not a socket address like 127.0.0.1:8080"),
            )
        })
    }

    fn jwt_secret(&self, name: &str) -> Result<String, ConfigError> {
        let secret = self.required(name)?;
        if secret.len() < MIN_JWT_SECRET_LEN {
            return Err(err(
                name,
                &format!(
                    "must be at least {MIN_JWT_SECRET_LEN} bytes (got {})",
                    secret.len()
                ),
            ));
        }
        Ok(secret)
    }

    fn choice(&self, name: &str, default: &str, allowed: &[&str]) -> Result<String, ConfigError> {
        let value = self.non_empty(name, default)?;
        if allowed.contains(&value.as_str()) {
            Ok(value)
        } else {
            Err(err(
                name,
                &format!("'{value}' is not one of {}", allowed.join(", ")),
            ))
        }
    }

    fn number(
        &self,
        name: &str,
        default: usize,
        range: std::ops::RangeInclusive<usize>,
    ) -> Result<usize, ConfigError> {
        let Some(raw) = self.get(name) else {
            return Ok(default);
        };
        match raw.parse::<usize>() {
            Ok(n) if range.contains(&n) => Ok(n),
            _ => Err(err(
                name,
                &format!(
                    "'{raw}' must be an integer in {}..={}",
                    range.start(),
                    range.end()
                ),
            )),
        }
    }

    fn millis(
        &self,
        name: &str,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<Duration, ConfigError> {
        let start = *range.start() as usize;
        let end = *range.end() as usize;
        self.number(name, default as usize, start..=end)
            .map(|ms| Duration::from_millis(ms as u64))
    }
}

fn check_postgres_url(name: &str, url: &str) -> Result<(), ConfigError> {
    url.parse::<tokio_postgres::Config>()
        .map(|_| ())
        .map_err(|_| {
            err(
                name,
                "is not a valid PostgreSQL URL (postgres://user@host:port/db)",
            )
        })
}

fn err(name: &str, problem: &str) -> ConfigError {
    ConfigError {
        name: name.to_owned(),
        problem: problem.to_owned(),
    }
}

/// How a bid is written (`GAVEL_BID_PATH`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BidPath {
    /// `log`: the durable append to `bid_log`, resolved in the background.
    #[default]
    Log,
    /// `row_lock`: the classic transaction that locks the auction row
    /// `FOR UPDATE` and resolves the bid at once; a reproduction baseline
    /// for load tests, never for production (see `bidding/row_lock.rs`).
    RowLock,
    /// `row_lock_fn`: the row-lock design at its strongest, the whole
    /// locked transaction in one round trip (a PL/pgSQL function); a
    /// baseline too (see `bidding/row_lock_fn.rs`).
    RowLockFn,
    /// `optimistic`: every request reads the auction, applies the rules and
    /// writes with a compare-and-set on `version`, retrying a few times on
    /// conflict; a baseline too (see `bidding/optimistic.rs`).
    Optimistic,
}

impl BidPath {
    /// The value of `GAVEL_BID_PATH` that selects this path.
    pub fn name(self) -> &'static str {
        match self {
            BidPath::Log => "log",
            BidPath::RowLock => "row_lock",
            BidPath::RowLockFn => "row_lock_fn",
            BidPath::Optimistic => "optimistic",
        }
    }

    /// Whether each bid is resolved in its own request (the baselines),
    /// rather than appended to the log for the resolver.
    pub fn resolves_in_request(self) -> bool {
        self != BidPath::Log
    }
}

/// How long one replica check ([`crate::db::reads`]) may take: the
/// interval, but at least a second.
pub fn check_limit(interval: Duration) -> Duration {
    interval.max(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|name| map.get(name).cloned())
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";
    const URL: &str = "postgres://gavel@127.0.0.1:5999/gavel";

    #[test]
    fn defaults_apply_when_only_required_settings_are_given() {
        let c = config(&[("GAVEL_DATABASE_URL", URL), ("GAVEL_JWT_SECRET", SECRET)]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(c.auth.jwt_audience, "gavel");
        assert!(c.reads.replica_urls.is_empty());
        assert_eq!(c.resolver.settle_grace, Duration::from_millis(6_000));
        assert!(c.resolver.enabled);
        assert_eq!(c.resolver.interval, Duration::from_millis(10));
        assert_eq!(c.bids.path, BidPath::Log);
        assert_eq!(c.pools.lock_timeout, Duration::from_millis(500));
        assert_eq!(c.limits.request_timeout, Duration::from_millis(12_000));
        assert_eq!(c.reads.max_lag, Duration::from_millis(2_000));
        assert_eq!(c.telemetry.pg_sample_interval, Duration::from_millis(2_000));
        assert_eq!(c.reads.cache_ttl, Duration::from_millis(250));
        assert_eq!(c.bids.append_writers, 1);
        assert_eq!(c.bids.append_batch_max, 500);
        assert!(c.webhooks.urls.is_empty() && c.webhooks.secret.is_none());
        assert_eq!(c.webhooks.retry_base, Duration::from_millis(4_000));
        // A short statement timeout caps the default lock timeout.
        let c = config(&[
            ("GAVEL_DATABASE_URL", URL),
            ("GAVEL_JWT_SECRET", SECRET),
            ("GAVEL_STATEMENT_TIMEOUT_MS", "300"),
        ])
        .unwrap();
        assert_eq!(c.pools.lock_timeout, Duration::from_millis(300));
    }

    #[test]
    fn the_bid_path_is_the_log_unless_the_row_lock_baseline_is_chosen() {
        let c = config(&[
            ("GAVEL_DATABASE_URL", URL),
            ("GAVEL_JWT_SECRET", SECRET),
            ("GAVEL_BID_PATH", "row_lock"),
        ])
        .unwrap();
        assert_eq!(c.bids.path, BidPath::RowLock);
        for path in [BidPath::RowLockFn, BidPath::Optimistic] {
            let c = config(&[
                ("GAVEL_DATABASE_URL", URL),
                ("GAVEL_JWT_SECRET", SECRET),
                ("GAVEL_BID_PATH", path.name()),
            ])
            .unwrap();
            assert_eq!(c.bids.path, path);
            assert!(path.resolves_in_request());
        }
        let e = config(&[
            ("GAVEL_DATABASE_URL", URL),
            ("GAVEL_JWT_SECRET", SECRET),
            ("GAVEL_BID_PATH", "rowlock"),
        ])
        .err()
        .expect("an unknown bid path is refused");
        assert_eq!(
            e.to_string(),
            "GAVEL_BID_PATH: 'rowlock' is not one of log, row_lock, row_lock_fn, optimistic"
        );
    }

    #[test]
    fn append_writers_default_to_one_whatever_the_api_pool() {
        let c = config(&[
            ("GAVEL_DATABASE_URL", URL),
            ("GAVEL_JWT_SECRET", SECRET),
            ("GAVEL_API_POOL_SIZE", "1"),
        ])
        .unwrap();
        assert_eq!(
            c.bids.append_writers, 1,
            "writers have connections of their own"
        );
        let c = config(&[
            ("GAVEL_DATABASE_URL", URL),
            ("GAVEL_JWT_SECRET", SECRET),
            ("GAVEL_APPEND_WRITERS", "4"),
            ("GAVEL_APPEND_BATCH_MAX", "1"),
        ])
        .unwrap();
        assert_eq!((c.bids.append_writers, c.bids.append_batch_max), (4, 1));
        let e = config(&[
            ("GAVEL_DATABASE_URL", URL),
            ("GAVEL_JWT_SECRET", SECRET),
            ("GAVEL_APPEND_WRITERS", "0"),
        ])
        .err()
        .expect("no writer is refused");
        assert!(e.to_string().starts_with("GAVEL_APPEND_WRITERS:"), "{e}");
    }

    #[test]
    fn webhooks_need_http_urls_and_a_well_formed_secret() {
        const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let c = config(&[
            ("GAVEL_DATABASE_URL", URL),
            ("GAVEL_JWT_SECRET", SECRET),
            (
                "GAVEL_WEBHOOK_URLS",
                "http://127.0.0.1:9/hook, https://example.com/h",
            ),
            ("GAVEL_WEBHOOK_SECRET", WHSEC),
        ])
        .unwrap();
        assert_eq!(c.webhooks.urls.len(), 2);
        let cases: &[(&str, &str, &str)] = &[
            (
                "ftp://example.com/h",
                WHSEC,
                "GAVEL_WEBHOOK_URLS: 'ftp://example.com/h' is not an http(s) URL",
            ),
            (
                "example.com/h",
                WHSEC,
                "GAVEL_WEBHOOK_URLS: 'example.com/h' is not an http(s) URL",
            ),
            (
                "http://127.0.0.1:9/h",
                "",
                "GAVEL_WEBHOOK_SECRET: is required when GAVEL_WEBHOOK_URLS is set",
            ),
            (
                "http://127.0.0.1:9/h",
                "s3cret",
                "GAVEL_WEBHOOK_SECRET: must start with whsec_",
            ),
            (
                "http://127.0.0.1:9/h",
                "whsec_c2hvcnQ=",
                "GAVEL_WEBHOOK_SECRET: must encode 24 to 64 bytes (it encodes 5)",
            ),
        ];
        for (urls, secret, message) in cases {
            let e = config(&[
                ("GAVEL_DATABASE_URL", URL),
                ("GAVEL_JWT_SECRET", SECRET),
                ("GAVEL_WEBHOOK_URLS", urls),
                ("GAVEL_WEBHOOK_SECRET", secret),
            ])
            .err()
            .expect("refused");
            assert_eq!(&e.to_string(), message);
        }
    }

    #[test]
    fn each_bad_setting_is_named() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("GAVEL_JWT_SECRET", SECRET)], "GAVEL_DATABASE_URL"),
            (&[("GAVEL_DATABASE_URL", URL)], "GAVEL_JWT_SECRET"),
            (
                &[("GAVEL_DATABASE_URL", URL), ("GAVEL_JWT_SECRET", "short")],
                "GAVEL_JWT_SECRET",
            ),
            (
                &[
                    ("GAVEL_DATABASE_URL", "mysql://x"),
                    ("GAVEL_JWT_SECRET", SECRET),
                ],
                "GAVEL_DATABASE_URL",
            ),
            (
                &[
                    ("GAVEL_DATABASE_URL", URL),
                    ("GAVEL_JWT_SECRET", SECRET),
                    ("GAVEL_LISTEN", "nope"),
                ],
                "GAVEL_LISTEN",
            ),
            (
                &[
                    ("GAVEL_DATABASE_URL", URL),
                    ("GAVEL_JWT_SECRET", SECRET),
                    ("GAVEL_API_POOL_SIZE", "0"),
                ],
                "GAVEL_API_POOL_SIZE",
            ),
            (
                &[
                    ("GAVEL_DATABASE_URL", URL),
                    ("GAVEL_JWT_SECRET", SECRET),
                    ("GAVEL_LOG_FORMAT", "xml"),
                ],
                "GAVEL_LOG_FORMAT",
            ),
            (
                &[
                    ("GAVEL_DATABASE_URL", URL),
                    ("GAVEL_JWT_SECRET", SECRET),
                    ("GAVEL_PG_SAMPLE_MS", "10"),
                ],
                "GAVEL_PG_SAMPLE_MS",
            ),
            (
                &[
                    ("GAVEL_DATABASE_URL", URL),
                    ("GAVEL_JWT_SECRET", SECRET),
                    ("GAVEL_LOG", "gavel=[[[bogus"),
                ],
                "GAVEL_LOG",
            ),
            (
                &[
                    ("GAVEL_DATABASE_URL", URL),
                    ("GAVEL_JWT_SECRET", SECRET),
                    ("GAVEL_SETTLE_GRACE_MS", "100"),
                ],
                "GAVEL_SETTLE_GRACE_MS",
            ),
            (
                &[
                    ("GAVEL_DATABASE_URL", URL),
                    ("GAVEL_JWT_SECRET", SECRET),
                    ("GAVEL_LOCK_TIMEOUT_MS", "9000"),
                ],
                "GAVEL_LOCK_TIMEOUT_MS",
            ),
            (
                &[
                    ("GAVEL_DATABASE_URL", URL),
                    ("GAVEL_JWT_SECRET", SECRET),
                    ("GAVEL_REQUEST_TIMEOUT_MS", "5500"),
                ],
                "GAVEL_REQUEST_TIMEOUT_MS",
            ),
            (
                &[
                    ("GAVEL_DATABASE_URL", URL),
                    ("GAVEL_JWT_SECRET", SECRET),
                    ("GAVEL_REPLICA_CHECK_MS", "2000"),
                    ("GAVEL_REPLICA_MAX_LAG_MS", "3000"),
                ],
                "GAVEL_REPLICA_MAX_LAG_MS",
            ),
            (
                &[
                    ("GAVEL_DATABASE_URL", URL),
                    ("GAVEL_JWT_SECRET", SECRET),
                    ("GAVEL_REPLICA_URLS", "postgres://a@127.0.0.1/x, not a url"),
                ],
                "GAVEL_REPLICA_URLS",
            ),
            (
                &[
                    ("GAVEL_DATABASE_URL", URL),
                    ("GAVEL_JWT_SECRET", SECRET),
                    ("GAVEL_PRIMARY_READ_SHARE_PCT", "0"),
                ],
                "GAVEL_PRIMARY_READ_SHARE_PCT",
            ),
            (
                &[
                    ("GAVEL_DATABASE_URL", URL),
                    ("GAVEL_JWT_SECRET", SECRET),
                    ("GAVEL_BID_PATH", "for_update"),
                ],
                "GAVEL_BID_PATH",
            ),
            (
                &[
                    ("GAVEL_DATABASE_URL", URL),
                    ("GAVEL_JWT_SECRET", SECRET),
                    ("GAVEL_APPEND_WRITERS", "0"),
                ],
                "GAVEL_APPEND_WRITERS",
            ),
            (
                &[
                    ("GAVEL_DATABASE_URL", URL),
                    ("GAVEL_JWT_SECRET", SECRET),
                    ("GAVEL_APPEND_BATCH_MAX", "5001"),
                ],
                "GAVEL_APPEND_BATCH_MAX",
            ),
        ];
        for (vars, name) in cases {
            let e = config(vars)
                .err()
                .unwrap_or_else(|| panic!("{name} should be rejected"));
            assert_eq!(&e.name, name);
            assert!(e.to_string().starts_with(name));
        }
    }
}
