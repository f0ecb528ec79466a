//! `gavel serve` as a library: binds the API and admin listeners, starts the
//! resolver and the notification listener, and shuts everything down on one
//! cancellation token: stop accepting, drain in-flight requests with a bound
//! (the resolver keeps resolving meanwhile), then stop the workers after
//! their current step, then close the pools.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::auth::JwtKeys;
use crate::bidding::{AppendSettings, BidDesk, BidPath};
use crate::config::{Config, EdgeLimits};
use crate::db::auction_cache::AuctionCache;
use crate::db::reads::Reads;
use crate::db::{self, Pools, SessionLimits};
use crate::http::serve;
use crate::http::{self, AppState, Shared};
use crate::live::{BidderFeeds, LiveViews};
use crate::rate_limit::RateLimiter;
use crate::resolver::Resolver;
use crate::signals::{listener, Signals};
use crate::telemetry::{self, activity::ActivitySampler};
use crate::webhooks::retention::Upkeep;
use crate::webhooks::Dispatcher;

/// How long in-flight requests may take to finish after shutdown starts.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A bound, not yet running Gavel server.
pub struct Server {
    config: Config,
    api: TcpListener,
    admin: TcpListener,
    state: AppState,
    activity: ActivitySampler,
}

impl Server {
    /// Binds both listeners (port 0 picks a free port) and builds the pools.
    pub async fn bind(config: Config) -> anyhow::Result<Self> {
        // Before any pool registers its metrics.
        telemetry::metrics_handle();
        db::silence::register_metrics();
        let api = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding GAVEL_LISTEN {}", config.listen))?;
        let admin = TcpListener::bind(config.admin_listen)
            .await
            .with_context(|| format!("binding GAVEL_ADMIN_LISTEN {}", config.admin_listen))?;
        let pools = Pools::new(&config)?;
        let reads = Reads::new(&config, pools.api.clone())?;
        let signals = Signals::new();
        let activity = ActivitySampler::new(&config)?;
        let auction_views = AuctionCache::new(reads.clone(), &signals, config.reads.cache_ttl);
        let streams_end = CancellationToken::new();
        let state = AppState::new(Shared {
            live: LiveViews::new(
                auction_views.clone(),
                &signals,
                &config.limits,
                streams_end.clone(),
            ),
            bidders: BidderFeeds::new(pools.api.clone(), &signals, streams_end.clone()),
            shutdown: streams_end,
            auction_views,
            reads,
            request_timeout: config.limits.request_timeout,
            max_in_flight: config.limits.max_in_flight,
            body_read_timeout: config.limits.edge.body_read_timeout,
            read_slots: Arc::new(Semaphore::new((config.limits.max_in_flight / 4).max(1))),
            bids: BidDesk::new(
                pools.api.clone(),
                pools.append.clone(),
                signals.clone(),
                RateLimiter::new(config.bids.rate_limit, config.bids.rate_burst),
                AppendSettings {
                    writers: config.bids.append_writers,
                    batch_max: config.bids.append_batch_max,
                    write_limit: config.pools.statement_timeout + Duration::from_secs(1),
                },
            )
            .with_bid_path(config.bids.path),
            jwt: JwtKeys::new(&config.auth.jwt_secret, &config.auth.jwt_audience),
            pools,
            signals,
        });
        Ok(Server {
            config,
            api,
            admin,
            state,
            activity,
        })
    }

    /// The API's bound address.
    pub fn api_addr(&self) -> SocketAddr {
        self.api
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The admin listener's bound address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Serves until `shutdown` is cancelled, then drains and stops.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Server {
            config,
            api,
            admin,
            state,
            activity,
        } = self;
        end_streams_at(&shutdown, &state);
        let metrics = telemetry::metrics_handle();
        // Background workers outlive the HTTP drain, so requests waiting for
        // their bid's outcome still get it while the server shuts down.
        let workers = CancellationToken::new();
        let exported = exported_pools(&state, &activity);
        let mut tasks = spawn_workers(&config, &state, activity, &workers)?;
        tasks.spawn(metrics_upkeep(metrics.clone(), workers.clone()));

        announce(&config, &api, &admin)?;
        let (pools, reads) = (state.pools.clone(), state.reads.clone());
        let routers = (
            http::api_router(state),
            http::admin_router(metrics, exported),
        );
        serve_until_drained(api, admin, routers, config.limits.edge, &shutdown).await;
        stop_workers(&workers, tasks).await;
        pools.close();
        reads.close();
        tracing::info!("gavel stopped");
        Ok(())
    }

    /// Serves until the process receives Ctrl-C or SIGTERM, then drains and
    /// stops.
    pub async fn run_until_signalled(self) -> anyhow::Result<()> {
        let shutdown = CancellationToken::new();
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            trigger.cancel();
        });
        self.run(shutdown).await
    }
}

/// Ends the event streams when shutdown starts, so the drain can finish.
fn end_streams_at(shutdown: &CancellationToken, state: &AppState) {
    let (shutdown, streams) = (shutdown.clone(), state.shutdown.clone());
    tokio::spawn(async move {
        shutdown.cancelled().await;
        streams.cancel();
    });
}

/// Every pool whose occupancy `/metrics` exports.
fn exported_pools(state: &AppState, activity: &ActivitySampler) -> Vec<db::Pool> {
    (state.pools.all().into_iter())
        .chain(state.reads.pools())
        .chain([activity.pool()])
        .cloned()
        .collect()
}

/// Starts the background workers: the activity sampler, the bid appender,
/// the replica checks, the notification listener, the marketplace's
/// webhooks and upkeep, and the resolver (or, without it, the forwarding
/// of bid notifications). They stop on `workers`.
fn spawn_workers(
    config: &Config,
    state: &AppState,
    activity: ActivitySampler,
    workers: &CancellationToken,
) -> anyhow::Result<JoinSet<()>> {
    let listen_config = db::session_config(
        &config.database_url,
        "gavel-listener",
        &SessionLimits::from_config(config),
    )?;
    let mut tasks = JoinSet::new();
    tasks.spawn(activity.run(workers.clone()));
    // Stopped with the workers, after the HTTP drain: bids still queued
    // then are written or refused before the pools close.
    tasks.spawn(state.bids.run_appender(workers.clone()));
    tasks.spawn(state.reads.clone().watch(workers.clone()));
    tasks.spawn(listener::listen(
        listen_config,
        state.signals.clone(),
        config.resolver.enabled,
        workers.clone(),
    ));
    spawn_marketplace(config, state, &mut tasks, workers)?;
    if matches!(config.bids.path, BidPath::RowLockFn | BidPath::Optimistic) {
        // On the resolver's pool, which these paths leave almost idle, so
        // that the announcements never wait behind bids for a connection.
        tasks.spawn(listener::forward_resolved(
            state.pools.resolver.clone(),
            state.signals.clone(),
            workers.clone(),
        ));
    }
    if config.resolver.enabled {
        let resolver = Resolver::new(
            state.pools.resolver.clone(),
            state.signals.clone(),
            &config.resolver,
        );
        tasks.spawn(resolver.run(workers.clone()));
    } else {
        tasks.spawn(listener::forward_bids(
            state.pools.api.clone(),
            state.signals.clone(),
            workers.clone(),
        ));
    }
    Ok(tasks)
}

/// Starts the webhook dispatcher (when URLs are configured) and the
/// periodic upkeep of the event log and deliveries (backlog metrics,
/// retention).
fn spawn_marketplace(
    config: &Config,
    state: &AppState,
    tasks: &mut JoinSet<()>,
    workers: &CancellationToken,
) -> anyhow::Result<()> {
    if let Some(dispatcher) = Dispatcher::new(config, &state.signals)? {
        tracing::info!(urls = dispatcher.urls().len(), "webhook delivery on");
        tasks.spawn(dispatcher.run(workers.clone()));
    }
    tasks.spawn(Upkeep::new(config)?.run(workers.clone()));
    Ok(())
}

/// Runs the Prometheus recorder's upkeep every few seconds until `shutdown`.
async fn metrics_upkeep(metrics: PrometheusHandle, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(5)) => metrics.run_upkeep(),
        }
    }
}

/// Logs where Gavel listens, and warns when it runs a load-test baseline.
fn announce(config: &Config, api: &TcpListener, admin: &TcpListener) -> anyhow::Result<()> {
    tracing::info!(api = %api.local_addr()?, admin = %admin.local_addr()?, "gavel serving");
    let design = match config.bids.path {
        BidPath::Log => return Ok(()),
        BidPath::RowLock => {
            "the classic row-lock bid path, a reproduction baseline for load tests; not for \
             production (every bid queues on its auction's row lock)"
        }
        BidPath::RowLockFn => {
            "the row-lock bid path in one round trip (a PL/pgSQL function), a reproduction \
             baseline for load tests; not for production (every bid queues on its auction's \
             lock)"
        }
        BidPath::Optimistic => {
            "the optimistic bid path (read, then compare-and-set from every request), a \
             reproduction baseline for load tests; not for production (bids on a hot auction \
             conflict and are shed)"
        }
    };
    tracing::warn!("GAVEL_BID_PATH={}: {design}", config.bids.path.name());
    Ok(())
}

/// Serves the API and admin routers until `shutdown`, then waits for
/// in-flight requests at most [`DRAIN_TIMEOUT`].
async fn serve_until_drained(
    api: TcpListener,
    admin: TcpListener,
    (api_router, admin_router): (Router, Router),
    limits: EdgeLimits,
    shutdown: &CancellationToken,
) {
    let servers = async {
        tokio::join!(
            serve::serve("api", api, api_router, limits, shutdown.clone()),
            serve::serve("admin", admin, admin_router, limits, shutdown.clone()),
        )
    };
    tokio::pin!(servers);
    tokio::select! {
        ((), ()) = &mut servers => {}
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(DRAIN_TIMEOUT).await;
        } => tracing::warn!("in-flight requests did not finish within {DRAIN_TIMEOUT:?}"),
    }
}

/// Stops the background workers after their current step, waiting for them
/// at most [`DRAIN_TIMEOUT`].
async fn stop_workers(workers: &CancellationToken, mut tasks: JoinSet<()>) {
    workers.cancel();
    let joined = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if joined.is_err() {
        tracing::warn!("background workers did not stop within {DRAIN_TIMEOUT:?}");
    }
}

/// Resolves when the process receives Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
