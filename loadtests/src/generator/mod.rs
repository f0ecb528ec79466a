//! The open-model load generator: bids and reads go out on an arrival
//! schedule that never waits for answers, each latency measured from its
//! intended send time; bids are retried with the same Idempotency-Key as a
//! game client would ([`crate::retry`]), and every bid sent is kept with
//! what its client knows of its fate, for the audit. Watchers hold live
//! streams beside them and file when each version reached them. A run's
//! steps are the submodules: `setup`, `schedule`, `send`, `watchers`,
//! `monitor` and `steps`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use chrono::{DateTime, Utc};
use hyper::header::HeaderValue;
use hyper::Uri;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::client::Client;
use crate::cpu::{CpuSeconds, CpuUse, CpuWatch, CpuWindow};
use crate::disk::{DiskSecond, DiskSeconds};
use crate::priority::LoweredRuntime;
use crate::receipts::Seen;
use crate::record::{Recorder, Window};
use crate::retry::Retries;
use crate::scenario::{Scenario, Shape};
use crate::scrape::ServerSample;
use crate::trace::TraceBid;
use gavel::rules::Increments;

mod monitor;
mod schedule;
mod send;
mod setup;
mod steps;
mod watchers;

pub use watchers::{WatchCounts, WatchOutput, WatcherEnd};

/// Where the Gavel under test is and how to sign its tokens.
#[derive(Debug, Clone)]
pub struct Target {
    /// Base URL of the API, e.g. `http://127.0.0.1:8080`.
    pub api: String,
    /// URL of the admin listener's `/metrics`, if it is reachable.
    pub metrics: Option<String>,
    /// `GAVEL_JWT_SECRET` of the target.
    pub jwt_secret: String,
    /// `GAVEL_JWT_AUDIENCE` of the target.
    pub jwt_audience: String,
    /// A directory on the database's disk, to measure its flush latency
    /// in during the run ([`crate::disk`]); `None` when the database is
    /// elsewhere.
    pub disk_probe: Option<PathBuf>,
    /// The processes to account CPU time to beside the load generator
    /// ([`crate::cpu`]), when they run on this machine.
    pub cpu: CpuWatch,
    /// Nice steps the requests are sent at, below this process's other
    /// threads (0: at the same priority; see [`crate::priority`]).
    pub generator_nice: i32,
}

/// An auction created for the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunAuction {
    /// Its id.
    pub id: Uuid,
    /// `hot`, `warm-3`, or the trace's label.
    pub label: String,
    /// Its planned end.
    pub ends_at: DateTime<Utc>,
    /// Latest end a soft close can move it to.
    pub max_end_at: DateTime<Utc>,
}

/// What the client knows of a bid it sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// A 2xx named this bid id: it must be in the log exactly once.
    Acked(Uuid),
    /// Every attempt got a definite refusal (a 4xx): it must not be in the log.
    Refused(String),
    /// No attempt was ever sent (the generator had no slot for it within
    /// the client timeout): it must not be in the log.
    NotSent,
    /// Some attempt timed out, failed or got a 5xx: the bid may or may not
    /// be in the log, but at most once.
    Unknown,
}

/// One bid the generator sent (all its attempts shared one key).
#[derive(Debug, Clone)]
pub struct SentBid {
    /// The Idempotency-Key.
    pub key: String,
    /// The bidder.
    pub bidder: String,
    /// Index into the run's auctions.
    pub auction: usize,
    /// The amount (the bidder's maximum).
    pub amount: i64,
    /// Milliseconds after the start it was meant to be sent.
    pub offset_ms: u64,
    /// What the client knows of it.
    pub fate: Fate,
}

/// One step of a rate-finding run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepResult {
    /// Bids per second offered.
    pub rate: f64,
    /// First second of the step.
    pub from_s: usize,
    /// Figures of its bids.
    #[serde(flatten)]
    pub window: Window,
    /// The slowest flush of the database's disk during the step, in ms.
    #[serde(default)]
    pub slowest_flush_ms: Option<f64>,
    /// The machine's CPU use during the step, when it was measured.
    #[serde(default)]
    pub cpu: Option<CpuWindow>,
    /// p99 within the bound and no errors.
    pub sustainable: bool,
}

/// Everything a run produced, for the audit and the report.
pub struct RunOutput {
    /// When second 0 began.
    pub started_at: DateTime<Utc>,
    /// The bidding phase, in seconds.
    pub duration_s: f64,
    /// Per-second and total figures.
    pub recorder: Recorder,
    /// Every bid sent.
    pub sent: Vec<SentBid>,
    /// The auctions bid on.
    pub auctions: Vec<RunAuction>,
    /// Gavel's metrics, about once a second.
    pub server: Vec<ServerSample>,
    /// Steps of a rate-finding run, in order.
    pub steps: Vec<StepResult>,
    /// The database disk's flush latency per second, when it was probed.
    pub disk: Vec<DiskSecond>,
    /// CPU use per second by process group, when `/proc` could be read.
    pub cpu: Option<CpuUse>,
    /// Nice steps the requests were sent at, below the other threads.
    pub generator_nice: i32,
    /// The wall-clock instant that receipt times count from.
    pub origin_at: DateTime<Utc>,
    /// What the watchers measured, when the scenario has them.
    pub watchers: Option<WatchOutput>,
    /// Every read answered with a view (`200` or `304`), in no order.
    pub seen: Vec<Seen>,
}

/// The auctions' last known next minimum bid and ETag, as the clients
/// learn them from reads and bid answers.
struct Book {
    next_min: Vec<AtomicI64>,
    etags: Vec<Mutex<Option<HeaderValue>>>,
}

/// What a bid task needs.
struct Shared {
    /// Bids and reads.
    client: Client,
    /// Metrics scrapes.
    scraper: reqwest::Client,
    t0: Instant,
    bid_paths: Vec<Uri>,
    read_paths: Vec<Uri>,
    bearer: Vec<HeaderValue>,
    bidder_names: Vec<String>,
    increments: Increments,
    book: Book,
    recorder: Mutex<Recorder>,
    sent: Mutex<Vec<SentBid>>,
    slots: Semaphore,
    open: AtomicUsize,
    timeout: Duration,
    /// The clients' retry policy and their shared retry budget.
    retries: Retries,
    if_none_match: bool,
    stop: AtomicBool,
    /// When the ramp was stopped (ms since second 0), or `u64::MAX`.
    ramp_stopped_ms: AtomicU64,
    /// The database disk's flush latency, when it is probed.
    disk: Option<DiskSeconds>,
    /// CPU use by process group, when it is measured.
    cpu: Option<CpuSeconds>,
    /// The instant receipt times count from (before any watcher connects).
    origin: Instant,
    /// The watchers, when the scenario has them.
    watching: Option<watchers::Watching>,
    /// The versions the readers' answers showed.
    seen: Mutex<Vec<Seen>>,
}

/// How one bid's amount is chosen.
#[derive(Debug, Clone, Copy)]
enum Amount {
    /// `steps` increments above the last known next minimum.
    Steps(u32),
    /// Exactly this (a trace).
    Exact(i64),
}

/// Runs `scenario` against `target` and returns what it measured.
pub async fn run(
    scenario: &Scenario,
    trace: Option<&[TraceBid]>,
    target: &Target,
) -> anyhow::Result<RunOutput> {
    let setup::Setup {
        shared,
        auctions,
        probes,
        duration_s,
        origin_at,
    } = setup::prepare(scenario, trace, target).await?;
    // The wall-clock instant of second 0, for the report.
    let started_at = Utc::now()
        + chrono::Duration::from_std(shared.t0.saturating_duration_since(Instant::now()))?;
    let monitor = monitor::Monitor::spawn(&shared, scenario, duration_s, target.metrics.clone());
    // The requests go out from the load's own runtime (every task they
    // spawn, their connections included, stays on it); the set-up, the
    // monitor and the probes stay on this one.
    let load = LoweredRuntime::start(target.generator_nice)?;
    // The watchers' streams run on a runtime of their own, at the same
    // priority: thousands of them must not queue ahead of the requests'
    // schedule on the same workers.
    let streams = LoweredRuntime::start(target.generator_nice)?;
    let watchers = watchers::start(&streams, &shared);
    schedule::offer(&load, &shared, scenario, trace, &auctions, duration_s).await?;
    wait_for_open_requests(&shared).await?;
    watchers::finish(&shared, watchers, duration_s).await;
    shared.stop.store(true, Ordering::Release);
    let (mut steps, server) = monitor.finish().await?;
    streams.stop().await;
    load.stop().await;

    let shared = Arc::into_inner(shared).context("every request task has finished")?;
    if scenario.arrival.shape == Shape::Steps {
        steps::judge_the_rest(&shared, scenario, duration_s, &mut steps);
    }
    let (disk, cpu) = probes.stop();
    Ok(RunOutput {
        started_at,
        duration_s,
        recorder: shared.recorder.into_inner().expect("recorder"),
        sent: shared.sent.into_inner().expect("sent bids"),
        auctions,
        server,
        steps,
        disk,
        cpu,
        generator_nice: target.generator_nice,
        origin_at,
        watchers: shared.watching.map(watchers::Watching::output),
        seen: shared.seen.into_inner().expect("seen views"),
    })
}

/// Lets every request finish: each attempt waits at most a client timeout
/// for a slot and another for its answer, then backs off.
async fn wait_for_open_requests(shared: &Shared) -> anyhow::Result<()> {
    let patience = shared.retries.policy().longest(shared.timeout) + Duration::from_secs(2);
    let waited = Instant::now();
    while shared.open.load(Ordering::Acquire) > 0 && waited.elapsed() < patience {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(
        shared.open.load(Ordering::Acquire) == 0,
        "{} requests were still open {:?} after the run",
        shared.open.load(Ordering::Acquire),
        patience
    );
    Ok(())
}
