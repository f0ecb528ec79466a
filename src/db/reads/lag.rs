//! Lag monitoring. The replicas are checked in the background over
//! dedicated monitor connections. A replica's staleness is measured against
//! samples of the primary's WAL position: a replica that has replayed the
//! position the primary had at time `t` holds every write committed before
//! `t`, so it is at most `now - t` stale. This needs no clock agreement
//! between servers and does not count an idle primary as lag.

use std::time::{Duration, Instant};

use tokio_postgres::types::PgLsn;
use tokio_util::sync::CancellationToken;

use super::wal::{flushed_wal_position, WalGeometry};
use super::{Reads, Replica};
use crate::config::check_limit;

impl Reads {
    /// Checks the replicas every check interval until `shutdown`. The
    /// samples also prove each server alive, so meanwhile a connection
    /// waiting on a server that sends nothing for the silence limit is
    /// given up on (see [`crate::db::silence`]).
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
        let limit = check_limit(self.inner.check_interval);
        self.sample_primary(limit).await;
        self.check_replicas(limit).await;
    }

    /// Records the primary's flushed WAL position, keeping the samples that
    /// can still prove a replica within the bound.
    async fn sample_primary(&self, limit: Duration) {
        let inner = &self.inner;
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
    }

    /// Asks every replica for its positions at once and records the answers.
    async fn check_replicas(&self, limit: Duration) {
        let inner = &self.inner;
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

    /// Records what one check of `replica` learned (or that it failed) and
    /// sets its gauges.
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

    /// The primary's latest sampled WAL position.
    pub(super) fn latest_sample(&self) -> Option<u64> {
        let samples = self.inner.samples.lock().expect("samples");
        samples.back().map(|(_, lsn)| *lsn)
    }
}

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
