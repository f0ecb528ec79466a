//! Read routing. GET endpoints read from a streaming replica whose lag is
//! within bounds, spreading load over the healthy ones; a client that sends
//! back the WAL position of its last write (the consistency token) is served
//! by a replica only once that replica has replayed past it. Otherwise the
//! read goes to the primary, through a bounded share of the API pool so a
//! replica outage cannot take every connection from bids.
//!
//! Lag is checked in the background over dedicated monitor connections. A
//! replica's staleness is measured against samples of the primary's WAL
//! position: a replica that has replayed the position the primary had at
//! time `t` holds every write committed before `t`, so it is at most
//! `now - t` stale. This needs no clock agreement between servers and does
//! not count an idle primary as lag.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use deadpool_postgres::{GenericClient, Object, PoolError, TimeoutType};
use futures::future::BoxFuture;
use tokio::sync::Semaphore;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::PgLsn;
use tokio_util::sync::CancellationToken;

use super::{build_pool, Pool, PoolSettings, MONITOR_POOL_SIZE};
use crate::config::{check_limit, Config};
use crate::error::ApiError;

/// The primary's current WAL insert position: after this session's writes.
pub async fn wal_position(client: &impl GenericClient) -> Result<PgLsn, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached("SELECT pg_current_wal_insert_lsn()")
        .await?;
    Ok(client.query_one(&stmt, &[]).await?.get(0))
}

/// Runs `statement`, an autocommitted query of a statement already
/// prepared on `client`, and reads the WAL insert position right after its
/// commit: both are sent at once, one round trip. The query goes on the
/// wire when first polled, and `futures::join!` polls it before the
/// position's, so the position is read after the statement has committed
/// (or failed). The position is `None` when it could not be read.
pub async fn with_wal_position<T>(
    client: &impl GenericClient,
    statement: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> (Result<T, tokio_postgres::Error>, Option<PgLsn>) {
    let (result, position) = futures::join!(statement, wal_position(client));
    (result, position.ok())
}

/// How far the primary's WAL is durably flushed. Every write whose commit
/// has returned is at or below it (with `synchronous_commit` on); unlike
/// the insert position it does not run ahead of what a replica can receive,
/// since WAL inserted but not flushed (such as a table lock logged for
/// standbys on an idle primary) is not sent to replicas until a flush.
async fn flushed_wal_position(client: &impl GenericClient) -> Result<PgLsn, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached("SELECT pg_current_wal_flush_lsn()")
        .await?;
    Ok(client.query_one(&stmt, &[]).await?.get(0))
}

/// The primary's WAL page and segment sizes, needed to compare positions.
#[derive(Debug, Clone, Copy)]
struct WalGeometry {
    page: u64,
    segment: u64,
}

/// Header at the start of every WAL page, and of every segment's first page.
const WAL_PAGE_HEADER: u64 = 24;
const WAL_SEGMENT_HEADER: u64 = 40;

impl WalGeometry {
    async fn read(client: &impl GenericClient) -> Result<Self, tokio_postgres::Error> {
        let row = client
            .query_one(
                "SELECT current_setting('wal_block_size')::bigint, \
                        pg_size_bytes(current_setting('wal_segment_size'))",
                &[],
            )
            .await?;
        let (page, segment): (i64, i64) = (row.get(0), row.get(1));
        Ok(WalGeometry {
            page: page as u64,
            segment: segment as u64,
        })
    }

    /// A WAL position moved back over a page header: an insert position at
    /// the start of a page points just past the header, while a replica
    /// that replayed everything before it reports the page boundary. No WAL
    /// record ends inside a header, so both mean the same data.
    fn normalize(self, lsn: u64) -> u64 {
        let header = if lsn % self.segment == WAL_SEGMENT_HEADER {
            WAL_SEGMENT_HEADER
        } else if lsn % self.page == WAL_PAGE_HEADER {
            WAL_PAGE_HEADER
        } else {
            0
        };
        lsn - header
    }
}

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

/// Why a read went where it went (a metric label).
#[derive(Debug, Clone, Copy)]
enum Reason {
    /// A replica within the lag bounds, no token.
    Fresh,
    /// A replica that has replayed past the client's token.
    CaughtUp,
    /// No replica has replayed the client's token yet.
    TokenAhead,
    /// No replica is configured.
    NoReplicas,
    /// Every replica is down or beyond the lag bounds.
    NoHealthyReplica,
    /// The chosen replica had no free connection in time.
    ReplicaBusy,
    /// The chosen replica failed the read (down, or a recovery conflict).
    ReplicaFailed,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::Fresh => "fresh",
            Reason::CaughtUp => "caught_up",
            Reason::TokenAhead => "token_ahead",
            Reason::NoReplicas => "no_replicas",
            Reason::NoHealthyReplica => "no_healthy_replica",
            Reason::ReplicaBusy => "replica_busy",
            Reason::ReplicaFailed => "replica_failed",
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

struct Replica {
    name: String,
    pool: Pool,
    monitor: Pool,
    state: Mutex<ReplicaState>,
}

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

    /// Runs `query` on a replica when one may serve it, else on the primary.
    /// A read with `token` sees every write up to that WAL position. Waiting
    /// for connections takes at most the pool wait in all: half of it on a
    /// replica, the rest on the primary.
    pub async fn run<T>(
        &self,
        token: Option<PgLsn>,
        query: impl for<'c> Fn(&'c Object) -> Query<'c, T> + Send + Sync,
    ) -> Result<(T, ReadSource), ApiError> {
        let started = Instant::now();
        let token = token.map(|t| self.position(t));
        let reason = match self
            .on_replica(token, &query, started + self.inner.wait_timeout / 2)
            .await?
        {
            Ok((value, source)) => return Ok((value, source)),
            Err(reason) => reason,
        };
        let position = self.latest_sample().map(PgLsn::from);
        // The query's snapshot is taken after this, on the primary itself.
        let fresh_at = Instant::now();
        let value = self
            .on_primary(&query, started + self.inner.wait_timeout)
            .await?;
        count_read(Target::Primary, reason);
        Ok((
            value,
            ReadSource {
                target: Target::Primary,
                position,
                fresh_at,
            },
        ))
    }

    /// Runs `query` on the primary within the reads' share of the API pool.
    async fn on_primary<T>(
        &self,
        query: &(impl for<'c> Fn(&'c Object) -> Query<'c, T> + Send + Sync),
        until: Instant,
    ) -> Result<T, ApiError> {
        let inner = &self.inner;
        let share = inner.primary_share.acquire();
        let Ok(permit) = tokio::time::timeout_at(until.into(), share).await else {
            return Err(ApiError::Overloaded);
        };
        let _permit = permit.expect("the read share is never closed");
        // Counted as a pool wait timeout when it runs out, like any other.
        let client = inner.primary.get_before(until).await?;
        Ok(query(&client).await?)
    }

    /// Runs `query` on a replica that may serve it, finishing by `until`;
    /// `Err(reason)` when the primary must answer instead.
    async fn on_replica<T>(
        &self,
        token: Option<u64>,
        query: &(impl for<'c> Fn(&'c Object) -> Query<'c, T> + Send + Sync),
        until: Instant,
    ) -> Result<Result<(T, ReadSource), Reason>, ApiError> {
        let index = match self.pick(token) {
            Ok(index) => index,
            Err(reason) => return Ok(Err(reason)),
        };
        let replica = &self.inner.replicas[index];
        let client = match replica.pool.get_before(until).await {
            Ok(client) => client,
            Err(PoolError::Timeout(TimeoutType::Wait)) => return Ok(Err(Reason::ReplicaBusy)),
            Err(e) => {
                self.mark_down(index, &e);
                return Ok(Err(Reason::ReplicaFailed));
            }
        };
        // The wait may have taken the replica out of bounds.
        let state = *replica.state.lock().expect("replica state");
        let Some(fresh_at) = state
            .covered_at
            .filter(|_| self.within_bounds(&state, Instant::now()))
        else {
            return Ok(Err(Reason::NoHealthyReplica));
        };
        let reason = match token {
            None => Reason::Fresh,
            // A new connection may be to a server that restarted since the
            // last check and replayed less than it had: ask it.
            Some(token)
                if state.replayed >= token && Object::metrics(&client).recycle_count > 0 =>
            {
                Reason::CaughtUp
            }
            Some(token) => {
                let asked = tokio::time::timeout_at(until.into(), replay_position(&client)).await;
                match asked {
                    Ok(Ok(Some(replayed))) => {
                        let replayed = self.position(replayed);
                        let mut state = replica.state.lock().expect("replica state");
                        state.replayed = state.replayed.max(replayed);
                        if replayed < token {
                            return Ok(Err(Reason::TokenAhead));
                        }
                        Reason::CaughtUp
                    }
                    Ok(Ok(None)) => return Ok(Err(Reason::TokenAhead)),
                    Ok(Err(e)) => {
                        if connection_lost(&e) {
                            self.mark_down(index, &e);
                        }
                        return Ok(Err(Reason::ReplicaFailed));
                    }
                    Err(_) => {
                        self.give_up(index, client);
                        return Ok(Err(Reason::ReplicaFailed));
                    }
                }
            }
        };
        let position = replica.state.lock().expect("replica state").replayed;
        let outcome = tokio::time::timeout_at(until.into(), query(&client)).await;
        match outcome {
            Ok(Ok(value)) => {
                count_read(Target::Replica, reason);
                let source = ReadSource {
                    target: Target::Replica,
                    position: Some(PgLsn::from(position)),
                    fresh_at,
                };
                Ok(Ok((value, source)))
            }
            Ok(Err(e)) if recovery_conflict(&e) => Ok(Err(Reason::ReplicaFailed)),
            Ok(Err(e)) if connection_lost(&e) => {
                self.mark_down(index, &e);
                Ok(Err(Reason::ReplicaFailed))
            }
            Ok(Err(e)) => Err(e.into()),
            Err(_) => {
                self.give_up(index, client);
                Ok(Err(Reason::ReplicaFailed))
            }
        }
    }

    /// The replica to try: round-robin over those within bounds, preferring
    /// one whose last known position already covers the token.
    fn pick(&self, token: Option<u64>) -> Result<usize, Reason> {
        let inner = &self.inner;
        if inner.replicas.is_empty() {
            return Err(Reason::NoReplicas);
        }
        let now = Instant::now();
        let start = inner.next.fetch_add(1, Ordering::Relaxed);
        let count = inner.replicas.len();
        let mut candidates: Vec<(usize, ReplicaState)> = (0..count)
            .map(|k| (start + k) % count)
            .map(|i| (i, *inner.replicas[i].state.lock().expect("replica state")))
            .filter(|(_, state)| self.within_bounds(state, now))
            .collect();
        if let Some(token) = token {
            candidates.sort_by_key(|(_, state)| state.replayed < token);
        }
        candidates
            .first()
            .map(|(index, _)| *index)
            .ok_or(Reason::NoHealthyReplica)
    }

    /// A replica that did not answer in time: its connection may still be
    /// busy, so it is dropped rather than pooled, and the replica is skipped
    /// until its next successful check.
    fn give_up(&self, index: usize, client: Object) {
        drop(Object::take(client));
        self.mark_down(index, &"no answer within the pool wait");
    }

    /// A WAL position as a number comparable with the replicas'.
    fn position(&self, lsn: PgLsn) -> u64 {
        let lsn = u64::from(lsn);
        match self.inner.geometry.get() {
            Some(geometry) => geometry.normalize(lsn),
            None => lsn,
        }
    }

    fn within_bounds(&self, state: &ReplicaState, now: Instant) -> bool {
        state.healthy
            && state.lag_bytes <= self.inner.max_lag_bytes
            && state
                .staleness(now)
                .is_some_and(|stale| stale <= self.inner.max_lag)
    }

    fn mark_down(&self, index: usize, error: &dyn std::fmt::Display) {
        let replica = &self.inner.replicas[index];
        let mut state = replica.state.lock().expect("replica state");
        if state.healthy {
            tracing::warn!(replica = %replica.name, %error, "replica failed a read; reading from the primary until it checks healthy");
        }
        state.healthy = false;
    }

    fn latest_sample(&self) -> Option<u64> {
        let samples = self.inner.samples.lock().expect("samples");
        samples.back().map(|(_, lsn)| *lsn)
    }

    /// Checks the replicas every check interval until `shutdown`. The
    /// samples also prove each server alive, so meanwhile a connection
    /// waiting on a server that sends nothing for the silence limit is
    /// given up on (see [`super::silence`]).
    pub async fn watch(self, shutdown: CancellationToken) {
        for replica in &self.inner.replicas {
            tracing::info!(replica = %replica.name, "reading from a streaming replica when it is within the lag bounds");
        }
        let limit = self.silence_limit();
        let _monitored: Vec<_> = std::iter::once(&self.inner.sampler)
            .chain(self.inner.replicas.iter().map(|replica| &replica.monitor))
            .map(|pool| pool.heartbeat().monitor(limit))
            .collect();
        loop {
            self.check().await;
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.inner.check_interval) => {}
            }
        }
    }

    /// How long a server may send nothing while a connection waits on it:
    /// the pool wait, and at least two check intervals, so a live server
    /// is always heard in time.
    pub fn silence_limit(&self) -> Duration {
        self.inner.wait_timeout.max(self.inner.check_interval * 2)
    }

    /// One round of checks: the primary's position, then every replica's.
    pub async fn check(&self) {
        let inner = &self.inner;
        let limit = check_limit(inner.check_interval);
        let sampled = tokio::time::timeout(limit, async {
            let client = inner.sampler.get().await.map_err(anyhow::Error::from)?;
            if inner.geometry.get().is_none() {
                let _ = inner.geometry.set(WalGeometry::read(&client).await?);
            }
            // The time is taken before the position is read: every write
            // committed before it is at or below the position. (With
            // `synchronous_commit` off a commit may reach the flushed WAL
            // up to a few WAL writer rounds later, and staleness is
            // understated by that much.)
            let at = Instant::now();
            Ok::<_, anyhow::Error>((at, flushed_wal_position(&client).await?))
        })
        .await;
        match sampled {
            Ok(Ok((at, lsn))) => {
                let lsn = self.position(lsn);
                let mut samples = inner.samples.lock().expect("samples");
                samples.push_back((at, lsn));
                // Keep what can still prove a replica within the bound.
                while samples.len() > 1
                    && samples
                        .front()
                        .is_some_and(|(t, _)| at.duration_since(*t) > inner.max_lag * 2)
                {
                    samples.pop_front();
                }
            }
            Ok(Err(e)) => tracing::debug!(
                error = format!("{e:#}"),
                "could not read the primary's WAL position"
            ),
            Err(_) => tracing::debug!("reading the primary's WAL position timed out"),
        }
        let checks = inner
            .replicas
            .iter()
            .map(|replica| tokio::time::timeout(limit, check_replica(replica)));
        let results = futures::future::join_all(checks).await;
        let now = Instant::now();
        for (replica, result) in inner.replicas.iter().zip(results) {
            let replayed = match result {
                Ok(Ok(replayed)) => Ok(Replayed {
                    position: self.position(replayed.position),
                    caught_up_to: self.position(replayed.caught_up_to),
                }),
                Ok(Err(e)) => Err(format!("{e:#}")),
                Err(_) => Err(format!("no answer within {limit:?}")),
            };
            self.record_check(replica, replayed, now);
        }
    }

    fn record_check(
        &self,
        replica: &Replica,
        replayed: Result<Replayed<u64>, String>,
        now: Instant,
    ) {
        let (covered_at, latest) = {
            let samples = self.inner.samples.lock().expect("samples");
            let covered_at = replayed.as_ref().ok().and_then(|replayed| {
                samples
                    .iter()
                    .rev()
                    .find(|(_, lsn)| *lsn <= replayed.caught_up_to)
                    .map(|(t, _)| *t)
            });
            (covered_at, samples.back().map(|(_, lsn)| *lsn))
        };
        let mut state = replica.state.lock().expect("replica state");
        let was_healthy = state.healthy;
        match replayed {
            Ok(replayed) => {
                state.healthy = true;
                // Assigned, not raised: a server that restarted may have
                // replayed less than before.
                state.replayed = replayed.position;
                state.covered_at = covered_at;
                let caught_up_to = replayed.caught_up_to;
                state.lag_bytes = latest.unwrap_or(caught_up_to).saturating_sub(caught_up_to);
                if !was_healthy {
                    tracing::info!(replica = %replica.name, "replica is healthy");
                }
            }
            Err(error) => {
                state.healthy = false;
                if was_healthy {
                    tracing::warn!(replica = %replica.name, %error, "replica check failed; reading from the primary");
                }
            }
        }
        let state = *state;
        let labels = [("replica", replica.name.clone())];
        metrics::gauge!("gavel_replica_healthy", &labels).set(f64::from(u8::from(state.healthy)));
        metrics::gauge!("gavel_replica_lag_bytes", &labels).set(state.lag_bytes as f64);
        if let Some(stale) = state.staleness(now) {
            metrics::gauge!("gavel_replica_lag_seconds", &labels).set(stale.as_secs_f64());
        }
    }
}

/// A replica's replay position, failing when it is not a standby.
/// What one check learned about a replica's WAL.
#[derive(Debug, Clone, Copy)]
struct Replayed<T> {
    /// `pg_last_wal_replay_lsn()`: what queries on the replica see.
    position: T,
    /// Up to where the replica holds every complete WAL record, for
    /// measuring lag. Ahead of `position` when the replica has received WAL
    /// ending in an incomplete record and replayed everything before it:
    /// an idle primary can leave a record cut at its last flush for long,
    /// and the replica then lacks no committed write.
    caught_up_to: T,
}

/// Asks a replica for its positions. The received position is read before
/// the recovery process's wait: if that process is then waiting for WAL,
/// it has replayed every complete record received up to that position.
async fn check_replica(replica: &Replica) -> anyhow::Result<Replayed<PgLsn>> {
    let client = replica.monitor.get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT pg_is_in_recovery(), pg_last_wal_receive_lsn(),                (SELECT wait_event = 'RecoveryWalStream' FROM pg_stat_activity                  WHERE backend_type = 'startup'),                pg_last_wal_replay_lsn()",
        )
        .await?;
    let row = client.query_one(&stmt, &[]).await?;
    let in_recovery: bool = row.get(0);
    let received: Option<PgLsn> = row.get(1);
    let waiting_for_wal: Option<bool> = row.get(2);
    let replayed: Option<PgLsn> = row.get(3);
    match (in_recovery, replayed) {
        (true, Some(position)) => {
            let caught_up_to = match (waiting_for_wal, received) {
                (Some(true), Some(received)) if received > position => received,
                _ => position,
            };
            Ok(Replayed {
                position,
                caught_up_to,
            })
        }
        (true, None) => anyhow::bail!("the replica has not replayed any WAL yet"),
        (false, _) => anyhow::bail!("the server is not a standby (promoted?)"),
    }
}

async fn replay_position(client: &Object) -> Result<Option<PgLsn>, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached("SELECT pg_last_wal_replay_lsn()")
        .await?;
    Ok(client.query_one(&stmt, &[]).await?.get(0))
}

fn count_read(target: Target, reason: Reason) {
    metrics::counter!(
        "gavel_db_reads_total",
        "target" => target.as_str(),
        "reason" => reason.as_str()
    )
    .increment(1);
}

/// A standby cancelled the query because replay needed what it read.
fn recovery_conflict(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::T_R_SERIALIZATION_FAILURE)
}

/// The server went away, or is shutting down.
fn connection_lost(e: &tokio_postgres::Error) -> bool {
    e.is_closed()
        || e.code().is_some_and(|code| {
            *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
                || code.code().starts_with("08")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_just_past_a_page_header_means_the_page_boundary() {
        for (page, segment) in [(8_192, 16 << 20), (32_768, 64 << 20)] {
            let geometry = WalGeometry { page, segment };
            let position = |lsn| geometry.normalize(lsn);
            assert_eq!(position(3 * page + 24), 3 * page);
            assert_eq!(position(2 * segment + 40), 2 * segment);
            // Inside a page, or 40 bytes into a page that does not start a segment.
            assert_eq!(position(3 * page + 40), 3 * page + 40);
            assert_eq!(position(3 * page + 25), 3 * page + 25);
            assert_eq!(position(12_345_678), 12_345_678);
        }
        // 40 bytes past a 16 MiB boundary that does not start a 64 MiB segment.
        let large = WalGeometry {
            page: 8_192,
            segment: 64 << 20,
        };
        assert_eq!(large.normalize((16 << 20) + 40), (16 << 20) + 40);
    }
}
