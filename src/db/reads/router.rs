//! Routing one read: a replica within the lag bounds (round-robin,
//! preferring one known to cover the client's consistency token), else the
//! primary within the reads' share of the API pool. A replica that fails a
//! read is skipped until its next successful check.

use std::sync::atomic::Ordering;
use std::time::Instant;

use deadpool_postgres::{Object, PoolError, TimeoutType};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::PgLsn;

use super::wal::replay_position;
use super::{Query, ReadSource, Reads, ReplicaState, Target};
use crate::error::ApiError;

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

/// Why the chosen replica does not serve a read after all.
enum Declined {
    /// The primary answers, for this reason.
    Because(Reason),
    /// The replica did not answer in time: its connection is given up on.
    Unanswered,
}

impl Reads {
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
        let reason = match self
            .covers_token(index, &state, token, &client, until)
            .await
        {
            Ok(reason) => reason,
            Err(Declined::Because(reason)) => return Ok(Err(reason)),
            Err(Declined::Unanswered) => {
                self.give_up(index, client);
                return Ok(Err(Reason::ReplicaFailed));
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

    /// Whether the replica at `index`, last seen in `state`, has replayed
    /// `token`: the reason it may serve the read, or why it does not.
    async fn covers_token(
        &self,
        index: usize,
        state: &ReplicaState,
        token: Option<u64>,
        client: &Object,
        until: Instant,
    ) -> Result<Reason, Declined> {
        let Some(token) = token else {
            return Ok(Reason::Fresh);
        };
        // A new connection may be to a server that restarted since the
        // last check and replayed less than it had: ask it.
        if state.replayed >= token && Object::metrics(client).recycle_count > 0 {
            return Ok(Reason::CaughtUp);
        }
        let asked = tokio::time::timeout_at(until.into(), replay_position(client)).await;
        match asked {
            Ok(Ok(Some(replayed))) => {
                let replayed = self.position(replayed);
                let replica = &self.inner.replicas[index];
                let mut state = replica.state.lock().expect("replica state");
                state.replayed = state.replayed.max(replayed);
                if replayed < token {
                    return Err(Declined::Because(Reason::TokenAhead));
                }
                Ok(Reason::CaughtUp)
            }
            Ok(Ok(None)) => Err(Declined::Because(Reason::TokenAhead)),
            Ok(Err(e)) => {
                if connection_lost(&e) {
                    self.mark_down(index, &e);
                }
                Err(Declined::Because(Reason::ReplicaFailed))
            }
            Err(_) => Err(Declined::Unanswered),
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

    /// Whether a replica in `state` may serve reads without a token.
    fn within_bounds(&self, state: &ReplicaState, now: Instant) -> bool {
        state.healthy
            && state.lag_bytes <= self.inner.max_lag_bytes
            && state
                .staleness(now)
                .is_some_and(|stale| stale <= self.inner.max_lag)
    }

    /// Skips the replica at `index` until its next successful check.
    fn mark_down(&self, index: usize, error: &dyn std::fmt::Display) {
        let replica = &self.inner.replicas[index];
        let mut state = replica.state.lock().expect("replica state");
        if state.healthy {
            tracing::warn!(replica = %replica.name, %error, "replica failed a read; reading from the primary until it checks healthy");
        }
        state.healthy = false;
    }
}

/// Counts a read by the server that answered and why.
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
