//! Read routing. GET endpoints read from a streaming replica whose lag is
//! within bounds, spreading load over the healthy ones; a client that sends
//! back the WAL position of its last write (the consistency token) is served
//! by a replica only once that replica has replayed past it. Otherwise the
//! read goes to the primary, through a bounded share of the API pool so a
//! replica outage cannot take every connection from bids.
//!
//! [`Reads`] holds what routing and lag monitoring share: the pools and each
//! replica's last known state. [`router`] picks the server for one read,
//! [`lag`] checks the replicas in the background, and [`wal`] reads and
//! compares WAL positions.

mod lag;
mod router;
mod wal;

pub use wal::{wal_position, with_wal_position};

use std::collections::VecDeque;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::sync::Semaphore;
use tokio_postgres::types::PgLsn;

use self::wal::WalGeometry;
use super::{build_pool, Pool, PoolSettings, MONITOR_POOL_SIZE};
use crate::config::Config;

/// A read to run on whichever server routing picks.
pub type Query<'c, T> = BoxFuture<'c, Result<T, tokio_postgres::Error>>;

/// Which server answered a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The primary.
    Primary,
    /// A streaming replica.
    Replica,
}

impl Target {
    /// The name used in the `Gavel-Read-From` header and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Primary => "primary",
            Target::Replica => "replica",
        }
    }
}

/// Where a read was served, and how new its data is at least.
#[derive(Debug, Clone, Copy)]
pub struct ReadSource {
    /// The server that answered.
    pub target: Target,
    /// A lower bound of the position the read saw, when known.
    pub position: Option<PgLsn>,
    /// The read saw every write committed before this instant.
    pub fresh_at: Instant,
}

/// The read router of one process. Cheap to clone.
#[derive(Clone)]
pub struct Reads {
    inner: Arc<Inner>,
}

/// Shared by the router and the lag checks.
struct Inner {
    primary: Pool,
    primary_share: Arc<Semaphore>,
    wait_timeout: Duration,
    /// A connection of its own on the primary for the position samples.
    sampler: Pool,
    /// Known once the primary has been sampled; until then positions are
    /// compared as they are, which only errs towards the primary.
    geometry: OnceLock<WalGeometry>,
    replicas: Vec<Replica>,
    check_interval: Duration,
    max_lag: Duration,
    max_lag_bytes: u64,
    next: AtomicUsize,
    /// Recent samples of the primary's WAL position, oldest first.
    samples: Mutex<VecDeque<(Instant, u64)>>,
}

/// One replica: its read pool, its check connection and what the checks
/// last learned.
struct Replica {
    name: String,
    pool: Pool,
    monitor: Pool,
    state: Mutex<ReplicaState>,
}

/// What the latest check (or read) learned about a replica.
#[derive(Debug, Clone, Copy, Default)]
struct ReplicaState {
    healthy: bool,
    /// The replay position last seen.
    replayed: u64,
    /// The latest sample time whose primary position the replica has replayed.
    covered_at: Option<Instant>,
    /// How far the replica is behind the latest primary sample.
    lag_bytes: u64,
}

impl ReplicaState {
    /// How stale the replica's data is at most, once a sample covers it.
    fn staleness(&self, now: Instant) -> Option<Duration> {
        self.covered_at.map(|t| now.saturating_duration_since(t))
    }
}

impl Reads {
    /// A router over `primary` (the API pool) and the configured replicas.
    /// Builds pools; connects lazily.
    pub fn new(config: &Config, primary: Pool) -> anyhow::Result<Self> {
        let share = (config.pools.api_size * config.reads.primary_share_pct).div_ceil(100);
        let replicas = config
            .reads
            .replica_urls
            .iter()
            .enumerate()
            .map(|(i, url)| {
                let reads = PoolSettings::new(config, config.pools.replica_size, "gavel-api");
                let checks = PoolSettings::new(config, MONITOR_POOL_SIZE, "gavel-monitor");
                let name = format!("replica-{}", i + 1);
                Ok(Replica {
                    pool: build_pool(url, &name, &reads)?,
                    monitor: build_pool(url, &format!("{name}-monitor"), &checks)?,
                    name,
                    state: Mutex::default(),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Reads {
            inner: Arc::new(Inner {
                primary,
                primary_share: Arc::new(Semaphore::new(share.max(1))),
                wait_timeout: config.pools.wait_timeout,
                sampler: build_pool(
                    &config.database_url,
                    "wal-sampler",
                    &PoolSettings::new(config, 1, "gavel-monitor"),
                )?,
                geometry: OnceLock::new(),
                replicas,
                check_interval: config.reads.check_interval,
                max_lag: config.reads.max_lag,
                max_lag_bytes: config.reads.max_lag_bytes,
                next: AtomicUsize::new(0),
                samples: Mutex::default(),
            }),
        })
    }

    /// How stale a read without a consistency token may be.
    pub fn max_lag(&self) -> Duration {
        self.inner.max_lag
    }

    /// Whether data read at WAL position `seen` holds every write up to
    /// `token`.
    pub fn covers(&self, seen: PgLsn, token: PgLsn) -> bool {
        self.position(seen) >= self.position(token)
    }

    /// The pools of the replicas and of the position sampler.
    pub fn pools(&self) -> impl Iterator<Item = &Pool> {
        let replicas = self.inner.replicas.iter();
        std::iter::once(&self.inner.sampler)
            .chain(replicas.flat_map(|replica| [&replica.pool, &replica.monitor]))
    }

    /// Closes the sampler's and the replicas' pools.
    pub fn close(&self) {
        self.inner.sampler.close();
        for replica in &self.inner.replicas {
            replica.pool.close();
            replica.monitor.close();
        }
    }

    /// A WAL position as a number comparable with the replicas'.
    fn position(&self, lsn: PgLsn) -> u64 {
        let lsn = u64::from(lsn);
        match self.inner.geometry.get() {
            Some(geometry) => geometry.normalize(lsn),
            None => lsn,
        }
    }
}
