//! The open-model load generator.
//!
//! Bids and reads are sent on an arrival schedule drawn from the scenario
//! (or a trace) that never waits for responses: each request is spawned at
//! its intended send time, and its latency runs from that instant. When
//! more than `client.max_in_flight` requests are open, new ones wait for a
//! slot, and that wait counts as latency too. Bids are retried on a
//! timeout, a transport error, a 503 or a 429 with `Retry-After`, with the
//! same Idempotency-Key, as a game client would: after the server's
//! `Retry-After` or a jittered exponential backoff, and within a retry
//! budget ([`crate::retry`]). Every bid sent is remembered with what the
//! client knows of its fate, for the audit.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use hyper::header::{
    HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, ETAG, IF_NONE_MATCH, RETRY_AFTER,
};
use hyper::{Request, StatusCode, Uri};
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::client::{self, Client, Failure};
use crate::cpu::{CpuProbe, CpuSeconds, CpuUse, CpuWatch, CpuWindow};
use crate::disk::{DiskProbe, DiskSecond, DiskSeconds};
use crate::priority::LoweredRuntime;
use crate::record::{Ended, Ending, Kind, Recorder, Window};
use crate::retry::{Decision, Retries};
use crate::scenario::{AuctionGroup, Process, Scenario, Shape};
use crate::scrape::{self, ServerSample};
use crate::trace::TraceBid;
use gavel::auth::{JwtKeys, Role};
use gavel::rules::Increments;

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
}

static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

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
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        .build()?;
    let client = Client::new(&target.api).await?;
    let keys = JwtKeys::new(&target.jwt_secret, &target.jwt_audience);
    let duration_s = match (trace, &scenario.trace) {
        (Some(bids), Some(source)) => {
            let last = bids.last().map_or(0, |b| b.offset_ms) as f64 / 1000.0;
            (last / source.speed).max(1.0)
        }
        _ => scenario.duration_s,
    };
    // Second 0 starts once setup is surely done; auctions end relative to it.
    let lead = Duration::from_secs(3);
    let start_wall = Utc::now() + chrono::Duration::from_std(lead)?;
    let auctions = plan_auctions(scenario, trace, start_wall, duration_s);
    eprintln!(
        "setting up: {} auctions, minting tokens ...",
        auctions.len()
    );
    let seller = keys.mint("loadtest-seller", &[Role::Seller], 24 * 3600);
    let mut created = Vec::with_capacity(auctions.len());
    for (planned, group) in &auctions {
        created.push(create_auction(&http, &target.api, &seller, planned, group).await?);
    }
    let bidder_names: Vec<String> = match trace {
        Some(bids) => {
            let mut names: Vec<String> = bids.iter().map(|b| b.bidder.clone()).collect();
            names.sort();
            names.dedup();
            names
        }
        None => (0..scenario.bidders.count)
            .map(|i| format!("bidder-{i}"))
            .collect(),
    };
    let bearer = bidder_names
        .iter()
        .map(|name| {
            HeaderValue::from_str(&format!(
                "Bearer {}",
                keys.mint(name, &[Role::Bidder], 24 * 3600)
            ))
            .expect("a JWT is a valid header value")
        })
        .collect();
    let starting: Vec<i64> = auctions.iter().map(|(_, g)| g.starting_price).collect();
    let t0 = Instant::now() + lead.saturating_sub(Duration::from_millis(200));
    let probe = match &target.disk_probe {
        Some(dir) => Some(DiskProbe::start(dir, t0)?),
        None => None,
    };
    let cpu_probe = match CpuProbe::start(target.cpu, t0) {
        Ok(probe) => Some(probe),
        Err(e) => {
            eprintln!("(no CPU accounting: {e:#})");
            None
        }
    };
    let shared = Arc::new(Shared {
        t0,
        bid_paths: created
            .iter()
            .map(|a| Uri::try_from(format!("/api/auctions/{}/bids", a.id)))
            .collect::<Result<_, _>>()?,
        read_paths: created
            .iter()
            .map(|a| Uri::try_from(format!("/api/auctions/{}", a.id)))
            .collect::<Result<_, _>>()?,
        bearer,
        bidder_names,
        increments: Increments::default_table(),
        book: Book {
            next_min: starting.iter().map(|&p| AtomicI64::new(p)).collect(),
            etags: starting.iter().map(|_| Mutex::new(None)).collect(),
        },
        recorder: Mutex::new(Recorder::new()),
        sent: Mutex::new(Vec::new()),
        slots: Semaphore::new(scenario.client.max_in_flight),
        open: AtomicUsize::new(0),
        timeout: Duration::from_millis(scenario.client.timeout_ms),
        retries: Retries::new(&scenario.client),
        if_none_match: scenario.readers.if_none_match,
        stop: AtomicBool::new(false),
        ramp_stopped_ms: AtomicU64::new(u64::MAX),
        disk: probe.as_ref().map(DiskProbe::seconds),
        cpu: cpu_probe.as_ref().map(CpuProbe::seconds),
        client,
        scraper: http,
    });
    // The wall-clock instant of second 0, for the report.
    let started_at = Utc::now()
        + chrono::Duration::from_std(shared.t0.saturating_duration_since(Instant::now()))?;

    let steps = Arc::new(Mutex::new(Vec::new()));
    let server = Arc::new(Mutex::new(Vec::new()));
    let monitor = tokio::spawn(monitor(
        shared.clone(),
        scenario.clone(),
        duration_s,
        target.metrics.clone(),
        steps.clone(),
        server.clone(),
    ));
    let label_index: HashMap<&str, usize> = created
        .iter()
        .enumerate()
        .map(|(i, a)| (a.label.as_str(), i))
        .collect();
    let bidder_index: HashMap<&str, usize> = shared
        .bidder_names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    // The requests go out from the load's own runtime (every task they
    // spawn, their connections included, stays on it); the set-up, the
    // monitor and the probes stay on this one.
    let load = LoweredRuntime::start(target.generator_nice)?;
    let readers = load.spawn(schedule_reads(shared.clone(), scenario.clone(), duration_s));
    let bids = match (trace, &scenario.trace) {
        (Some(bids), Some(source)) => {
            let plan: Vec<_> = bids
                .iter()
                .map(|b| {
                    let at = Duration::from_secs_f64(b.offset_ms as f64 / 1000.0 / source.speed);
                    (
                        at,
                        label_index[b.auction.as_str()],
                        bidder_index[b.bidder.as_str()],
                        Amount::Exact(b.amount),
                    )
                })
                .collect();
            load.spawn(schedule_bids(shared.clone(), plan.into_iter()))
        }
        _ => {
            let plan = synthetic_bids(scenario, duration_s, shared.bidder_names.len());
            load.spawn(schedule_bids(shared.clone(), plan))
        }
    };
    bids.await?;
    readers.await?;
    // Let every request finish: each attempt waits at most a client timeout
    // for a slot and another for its answer, then backs off.
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
    shared.stop.store(true, Ordering::Release);
    monitor.await?;
    load.stop().await;

    let shared = Arc::into_inner(shared).context("every request task has finished")?;
    let mut steps = std::mem::take(&mut *steps.lock().expect("steps"));
    if scenario.arrival.shape == Shape::Steps {
        // Judge the steps the monitor had no time to. A step the stop cut
        // short is not judged: a few seconds of it say nothing of the rate.
        let judged = steps.len();
        let stopped_ms = shared.ramp_stopped_ms.load(Ordering::Acquire);
        let until_s = duration_s.min(stopped_ms as f64 / 1000.0);
        let recorder = shared.recorder.lock().expect("recorder");
        let rest = judge_steps(&recorder, scenario, until_s, judged);
        steps.extend(rest.into_iter().map(|mut step| {
            measure_step(&shared, scenario, &mut step);
            step
        }));
    }
    let disk = probe.map(DiskProbe::stop).unwrap_or_default();
    let cpu = cpu_probe.map(CpuProbe::stop);
    let server = std::mem::take(&mut *server.lock().expect("server samples"));
    Ok(RunOutput {
        started_at,
        duration_s,
        recorder: shared.recorder.into_inner().expect("recorder"),
        sent: shared.sent.into_inner().expect("sent bids"),
        auctions: created,
        server,
        steps,
        disk,
        cpu,
        generator_nice: target.generator_nice,
    })
}

/// Fills in what the probes saw during `step`: the slowest disk flush and
/// the CPU use.
fn measure_step(shared: &Shared, scenario: &Scenario, step: &mut StepResult) {
    let to = step.from_s + scenario.arrival.step_s.round() as usize;
    step.slowest_flush_ms = shared.disk.as_ref().and_then(|d| d.max_ms(step.from_s, to));
    step.cpu = shared.cpu.as_ref().and_then(|c| c.window(step.from_s, to));
}

/// The auctions of the run with the group whose terms each gets.
fn plan_auctions<'a>(
    scenario: &'a Scenario,
    trace: Option<&[TraceBid]>,
    start: DateTime<Utc>,
    duration_s: f64,
) -> Vec<(RunAuction, &'a AuctionGroup)> {
    let end_of_bidding = start + chrono::Duration::milliseconds((duration_s * 1000.0) as i64);
    let make = |label: String, group: &'a AuctionGroup| {
        let ends_at =
            end_of_bidding + chrono::Duration::milliseconds((group.ends_after_s * 1000.0) as i64);
        let max_end_at = ends_at + chrono::Duration::seconds(i64::from(group.max_extension_s));
        (
            RunAuction {
                id: Uuid::nil(),
                label,
                ends_at,
                max_end_at,
            },
            group,
        )
    };
    match trace {
        Some(bids) => {
            let mut labels: Vec<&str> = bids.iter().map(|b| b.auction.as_str()).collect();
            labels.sort_unstable();
            labels.dedup();
            labels
                .into_iter()
                .map(|label| {
                    let group = scenario
                        .auctions
                        .iter()
                        .find(|g| label == g.label || label.starts_with(&format!("{}-", g.label)))
                        .unwrap_or(&scenario.auctions[0]);
                    make(label.to_owned(), group)
                })
                .collect()
        }
        None => scenario
            .auctions
            .iter()
            .flat_map(|group| {
                (0..group.count).map(move |i| {
                    let label = if i == 0 {
                        group.label.clone()
                    } else {
                        format!("{}-{}", group.label, i + 1)
                    };
                    (label, group)
                })
            })
            .map(|(label, group)| make(label, group))
            .collect(),
    }
}

async fn create_auction(
    http: &reqwest::Client,
    api: &str,
    seller: &str,
    planned: &RunAuction,
    group: &AuctionGroup,
) -> anyhow::Result<RunAuction> {
    let mut body = serde_json::json!({
        "title": format!("Load test: {}", planned.label),
        "currency": "GLD",
        "starting_price": group.starting_price,
        "ends_at": planned.ends_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "soft_close_s": group.soft_close_s,
    });
    if let Some(reserve) = group.reserve_price {
        body["reserve_price"] = reserve.into();
    }
    if group.soft_close_s > 0 {
        body["max_end_at"] = planned
            .max_end_at
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            .into();
    }
    let response = http
        .post(format!("{api}/api/auctions"))
        .bearer_auth(seller)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("creating an auction at {api}: is Gavel running?"))?;
    let status = response.status();
    let text = response.text().await?;
    ensure!(
        status == StatusCode::CREATED,
        "creating the auction '{}' answered {status}: {text}",
        planned.label
    );
    #[derive(Deserialize)]
    struct Created {
        id: Uuid,
    }
    let created: Created = serde_json::from_str(&text)?;
    Ok(RunAuction {
        id: created.id,
        ..planned.clone()
    })
}

/// The synthetic bids of a scenario: (offset, auction, bidder, amount).
fn synthetic_bids(
    scenario: &Scenario,
    duration_s: f64,
    bidders: usize,
) -> impl Iterator<Item = (Duration, usize, usize, Amount)> + Send + 'static {
    let mut rng = SmallRng::seed_from_u64(scenario.seed);
    let arrival = scenario.arrival.clone();
    let b = scenario.bidders.clone();
    // Cumulative bid shares over the auctions, each group split evenly.
    let mut cumulative = Vec::new();
    let mut total = 0.0;
    for group in &scenario.auctions {
        for _ in 0..group.count {
            total += group.bid_share / group.count as f64;
            cumulative.push(total);
        }
    }
    let mut t = 0.0f64;
    std::iter::from_fn(move || loop {
        let rate = arrival.rate_at(t, duration_s);
        if rate <= 0.0 {
            t += 0.001;
            if t >= duration_s {
                return None;
            }
            continue;
        }
        t += match arrival.process {
            Process::Poisson => -(1.0 - rng.gen::<f64>()).ln() / rate,
            Process::Uniform => 1.0 / rate,
        };
        if t >= duration_s {
            return None;
        }
        let pick = rng.gen::<f64>() * total;
        let auction = cumulative
            .partition_point(|&c| c < pick)
            .min(cumulative.len() - 1);
        let bidder = rng.gen_range(0..bidders);
        let range = if rng.gen::<f64>() < b.proxy_share {
            b.proxy_steps
        } else {
            b.steps
        };
        let steps = rng.gen_range(range[0]..=range[1]);
        return Some((
            Duration::from_secs_f64(t),
            auction,
            bidder,
            Amount::Steps(steps),
        ));
    })
}

async fn schedule_bids(
    shared: Arc<Shared>,
    plan: impl Iterator<Item = (Duration, usize, usize, Amount)>,
) {
    for (at, auction, bidder, amount) in plan {
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        let intended = shared.t0 + at;
        tokio::time::sleep_until(intended.into()).await;
        let second = at.as_secs() as usize;
        shared
            .recorder
            .lock()
            .expect("recorder")
            .offered(Kind::Bid, second);
        shared.open.fetch_add(1, Ordering::AcqRel);
        let shared = shared.clone();
        tokio::spawn(async move {
            send_bid(&shared, intended, auction, bidder, amount).await;
            shared.open.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

async fn schedule_reads(shared: Arc<Shared>, scenario: Scenario, duration_s: f64) {
    let rate = scenario.readers.rate;
    if rate <= 0.0 {
        return;
    }
    let mut rng = SmallRng::seed_from_u64(scenario.seed ^ 0x5eed_5eed);
    let mut cumulative = Vec::new();
    let mut total = 0.0;
    for group in &scenario.auctions {
        let share = group.read_share.unwrap_or(group.bid_share);
        for _ in 0..group.count {
            total += share / group.count as f64;
            cumulative.push(total);
        }
    }
    let auctions = shared.read_paths.len();
    let mut t = 0.0f64;
    loop {
        t += match scenario.arrival.process {
            Process::Poisson => -(1.0 - rng.gen::<f64>()).ln() / rate,
            Process::Uniform => 1.0 / rate,
        };
        if t >= duration_s || shared.stop.load(Ordering::Acquire) {
            return;
        }
        // A trace's auctions need not match the groups: spread evenly then.
        let auction = if cumulative.len() == auctions && total > 0.0 {
            let pick = rng.gen::<f64>() * total;
            cumulative.partition_point(|&c| c < pick).min(auctions - 1)
        } else {
            rng.gen_range(0..auctions)
        };
        let reader = rng.gen_range(0..shared.bearer.len());
        let at = Duration::from_secs_f64(t);
        let intended = shared.t0 + at;
        tokio::time::sleep_until(intended.into()).await;
        shared
            .recorder
            .lock()
            .expect("recorder")
            .offered(Kind::Read, at.as_secs() as usize);
        shared.open.fetch_add(1, Ordering::AcqRel);
        let shared = shared.clone();
        tokio::spawn(async move {
            send_read(&shared, intended, auction, reader).await;
            shared.open.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// The answer to one attempt.
enum Answer {
    Status(StatusCode, Option<Duration>, bytes::Bytes, bool),
    Timeout,
    Transport,
    /// No slot came free within the client timeout: nothing was sent.
    NotSent,
}

/// A slot among the generator's open requests, waiting at most the client
/// timeout (an overwhelmed target must not pile up requests without end).
async fn slot(shared: &Shared) -> Option<tokio::sync::SemaphorePermit<'_>> {
    tokio::time::timeout(shared.timeout, shared.slots.acquire())
        .await
        .ok()
        .map(|permit| permit.expect("the semaphore is never closed"))
}

async fn attempt(shared: &Shared, request: Request<client::Body>) -> Answer {
    let Some(_slot) = slot(shared).await else {
        return Answer::NotSent;
    };
    match shared.client.send(request, shared.timeout).await {
        Ok(response) => {
            let retry_after = response
                .headers
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_secs);
            let replayed = response
                .headers
                .get(&IDEMPOTENT_REPLAYED)
                .is_some_and(|v| v.as_bytes() == b"true");
            Answer::Status(response.status, retry_after, response.body, replayed)
        }
        Err(Failure::Timeout) => Answer::Timeout,
        Err(Failure::Transport) => Answer::Transport,
    }
}

fn problem_code(status: StatusCode, body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Problem {
        code: String,
    }
    serde_json::from_slice::<Problem>(body)
        .map(|p| p.code)
        .unwrap_or_else(|_| status.as_u16().to_string())
}

/// What a bid's client does after one attempt.
enum Next {
    /// The bid ended so (ending, fate, replayed).
    Done(Ending, Fate, bool),
    /// The bid may be tried again, after at least the server's
    /// `Retry-After` (if any); if it is not, it ends so.
    Retry(Ending, Fate, Option<Duration>),
}

/// Judges the answer to one attempt of a bid on `auction`. `ambiguous`
/// says whether some attempt may have reached the log; it is updated.
fn judge_bid_answer(shared: &Shared, auction: usize, answer: Answer, ambiguous: &mut bool) -> Next {
    let unknown_or = |ambiguous: bool, fate: Fate| if ambiguous { Fate::Unknown } else { fate };
    match answer {
        Answer::Status(status, _, body, replayed) if status.is_success() => {
            acknowledged(shared, auction, &body, replayed)
        }
        Answer::Status(status, retry_after, body, _)
            if status == StatusCode::SERVICE_UNAVAILABLE =>
        {
            *ambiguous = true;
            let ending = Ending::ServerError(problem_code(status, &body));
            Next::Retry(ending, Fate::Unknown, retry_after)
        }
        Answer::Status(status, Some(retry_after), body, _)
            if status == StatusCode::TOO_MANY_REQUESTS =>
        {
            let code = problem_code(status, &body);
            let fate = unknown_or(*ambiguous, Fate::Refused(code.clone()));
            Next::Retry(Ending::Refused(code), fate, Some(retry_after))
        }
        Answer::Status(status, _, body, _) => {
            let code = problem_code(status, &body);
            // A 5xx may come after the bid committed: only a 4xx is sure.
            if status.is_server_error() {
                Next::Done(Ending::ServerError(code), Fate::Unknown, false)
            } else {
                let fate = unknown_or(*ambiguous, Fate::Refused(code.clone()));
                Next::Done(Ending::Refused(code), fate, false)
            }
        }
        Answer::Timeout => {
            *ambiguous = true;
            Next::Retry(Ending::Timeout, Fate::Unknown, None)
        }
        Answer::Transport => {
            *ambiguous = true;
            Next::Retry(Ending::Transport, Fate::Unknown, None)
        }
        Answer::NotSent => {
            Next::Retry(Ending::Timeout, unknown_or(*ambiguous, Fate::NotSent), None)
        }
    }
}

/// A 2xx to a bid: what the clients learn of the auction's price.
fn acknowledged(shared: &Shared, auction: usize, body: &[u8], replayed: bool) -> Next {
    #[derive(Deserialize)]
    struct Bid {
        id: Uuid,
        auction_price: Option<i64>,
    }
    match serde_json::from_slice::<Bid>(body) {
        Ok(bid) => {
            if let Some(price) = bid.auction_price {
                let next = price.saturating_add(shared.increments.step_at(price));
                shared.book.next_min[auction].fetch_max(next, Ordering::Relaxed);
            }
            Next::Done(Ending::Ok, Fate::Acked(bid.id), replayed)
        }
        Err(_) => Next::Done(
            Ending::ServerError("unparsable 2xx body".into()),
            Fate::Unknown,
            false,
        ),
    }
}

async fn send_bid(
    shared: &Shared,
    intended: Instant,
    auction: usize,
    bidder: usize,
    amount: Amount,
) {
    let amount = match amount {
        Amount::Exact(amount) => amount,
        Amount::Steps(steps) => {
            let floor = shared.book.next_min[auction].load(Ordering::Relaxed);
            let step = shared.increments.step_at(floor);
            floor.saturating_add(step.saturating_mul(i64::from(steps)))
        }
    };
    let key = Uuid::new_v4().to_string();
    let key_header = HeaderValue::from_str(&key).expect("a UUID is a valid header value");
    let body = Bytes::from(format!("{{\"amount\":{amount}}}"));
    let since_t0 = || Instant::now().saturating_duration_since(shared.t0);
    shared.retries.first_attempt(since_t0());
    let (mut attempts, mut ambiguous, mut withheld) = (0, false, None);
    let (ending, fate, replayed) = loop {
        attempts += 1;
        let request = Request::post(shared.bid_paths[auction].clone())
            .header(AUTHORIZATION, shared.bearer[bidder].clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(&IDEMPOTENCY_KEY, key_header.clone())
            .body(client::Body::new(body.clone()))
            .expect("the request is well formed");
        let answer = attempt(shared, request).await;
        let (ending, fate, retry_after) =
            match judge_bid_answer(shared, auction, answer, &mut ambiguous) {
                Next::Done(ending, fate, replayed) => break (ending, fate, replayed),
                Next::Retry(ending, fate, retry_after) => (ending, fate, retry_after),
            };
        let decision =
            shared
                .retries
                .decide(attempts, retry_after, since_t0(), &mut rand::thread_rng());
        match decision {
            Decision::Retry(wait) => tokio::time::sleep(wait).await,
            Decision::Exhausted => break (ending, fate, false),
            Decision::Withheld(why) => {
                withheld = Some(why);
                break (ending, fate, false);
            }
        }
    };
    let done = Instant::now();
    let sent = intended.saturating_duration_since(shared.t0);
    shared.recorder.lock().expect("recorder").ended(Ended {
        kind: Kind::Bid,
        sent_s: sent.as_secs() as usize,
        done_s: done.saturating_duration_since(shared.t0).as_secs() as usize,
        latency: done - intended,
        attempts,
        ending: &ending,
        replayed,
        withheld,
    });
    shared.sent.lock().expect("sent bids").push(SentBid {
        key,
        bidder: shared.bidder_names[bidder].clone(),
        auction,
        amount,
        offset_ms: sent.as_millis() as u64,
        fate,
    });
}

async fn send_read(shared: &Shared, intended: Instant, auction: usize, reader: usize) {
    let mut request = Request::get(shared.read_paths[auction].clone())
        .header(AUTHORIZATION, shared.bearer[reader].clone());
    if shared.if_none_match {
        if let Some(tag) = shared.book.etags[auction].lock().expect("etag").clone() {
            request = request.header(IF_NONE_MATCH, tag);
        }
    }
    let request = request
        .body(client::Body::default())
        .expect("the request is well formed");
    let ending = match attempt_read(shared, request, auction).await {
        Answer::Status(status, _, _, _)
            if status.is_success() || status == StatusCode::NOT_MODIFIED =>
        {
            Ending::Ok
        }
        Answer::Status(status, _, body, _) if status.is_server_error() => {
            Ending::ServerError(problem_code(status, &body))
        }
        Answer::Status(status, _, body, _) => Ending::Refused(problem_code(status, &body)),
        Answer::Timeout | Answer::NotSent => Ending::Timeout,
        Answer::Transport => Ending::Transport,
    };
    let done = Instant::now();
    shared.recorder.lock().expect("recorder").ended(Ended {
        kind: Kind::Read,
        sent_s: intended.saturating_duration_since(shared.t0).as_secs() as usize,
        done_s: done.saturating_duration_since(shared.t0).as_secs() as usize,
        latency: done - intended,
        attempts: 1,
        ending: &ending,
        replayed: false,
        withheld: None,
    });
}

/// One read; a fresh view updates what the clients know of the auction.
async fn attempt_read(shared: &Shared, request: Request<client::Body>, auction: usize) -> Answer {
    let Some(_slot) = slot(shared).await else {
        return Answer::NotSent;
    };
    let response = match shared.client.send(request, shared.timeout).await {
        Ok(response) => response,
        Err(Failure::Timeout) => return Answer::Timeout,
        Err(Failure::Transport) => return Answer::Transport,
    };
    if response.status == StatusCode::OK {
        #[derive(Deserialize)]
        struct View {
            next_min_bid: i64,
        }
        if let Ok(view) = serde_json::from_slice::<View>(&response.body) {
            shared.book.next_min[auction].fetch_max(view.next_min_bid, Ordering::Relaxed);
        }
        if let Some(etag) = response.headers.get(ETAG) {
            *shared.book.etags[auction].lock().expect("etag") = Some(etag.clone());
        }
    }
    Answer::Status(response.status, None, response.body, false)
}

/// Prints progress once a second, scrapes Gavel's metrics, and judges the
/// steps of a rate-finding run (stopping it after failed steps).
async fn monitor(
    shared: Arc<Shared>,
    scenario: Scenario,
    duration_s: f64,
    metrics: Option<String>,
    steps: Arc<Mutex<Vec<StepResult>>>,
    server: Arc<Mutex<Vec<ServerSample>>>,
) {
    let mut tick = tokio::time::interval_at(
        (shared.t0 + Duration::from_secs(1)).into(),
        Duration::from_secs(1),
    );
    let mut scrape_failures = 0u32;
    loop {
        tick.tick().await;
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let now = shared.t0.elapsed().as_secs_f64();
        let mut sample = None;
        if let Some(url) = &metrics {
            match scrape::scrape(&shared.scraper, url, now).await {
                Ok(s) => sample = Some(s),
                Err(e) => {
                    scrape_failures += 1;
                    if scrape_failures <= 3 {
                        eprintln!("  (could not read Gavel's metrics: {e})");
                    }
                }
            }
        }
        let last = (now as usize).saturating_sub(1);
        let (bids, reads, judged) = {
            let recorder = shared.recorder.lock().expect("recorder");
            let judged = if scenario.arrival.shape == Shape::Steps {
                let done = steps.lock().expect("steps").len();
                judge_ready_steps(&recorder, &scenario, duration_s, done, now, shared.timeout)
            } else {
                Vec::new()
            };
            (
                recorder.point(Kind::Bid, last),
                recorder.point(Kind::Read, last),
                judged,
            )
        };
        let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1} ms"));
        let mut line = format!(
            "[{now:>5.0} s] bids: offered {}/s, ok {}/s, refused {}/s, errors {}, p99 {} | reads: ok {}/s, p99 {} | open {}",
            bids.offered,
            bids.ok,
            bids.refused,
            bids.errors,
            ms(bids.p99_ms),
            reads.ok,
            ms(reads.p99_ms),
            shared.open.load(Ordering::Relaxed),
        );
        if let Some(disk) = &shared.disk {
            let flush = disk.max_ms(last, last + 1);
            line.push_str(&format!(" | disk flush max {}", ms(flush)));
        }
        // The probe's second ends at about this tick: show the last one it has.
        if let Some(cpu) = shared.cpu.as_ref().and_then(CpuSeconds::latest) {
            line.push_str(&format!(" | {}", cpu_text(&cpu)));
        }
        if let Some(s) = &sample {
            line.push_str(&format!(
                " | pg lock waiters {:.0}, pending bids {:.0}",
                s.lock_waiters, s.pending_bids
            ));
            if let Some(rss) = s.rss_bytes {
                line.push_str(&format!(", rss {:.0} MiB", rss / 1_048_576.0));
            }
        }
        eprintln!("{line}");
        if let Some(s) = sample {
            server.lock().expect("server samples").push(s);
        }
        if !judged.is_empty() {
            let mut steps = steps.lock().expect("steps");
            for mut step in judged {
                measure_step(&shared, &scenario, &mut step);
                let probed: Vec<String> = step
                    .slowest_flush_ms
                    .map(|f| format!("slowest disk flush {f:.1} ms"))
                    .into_iter()
                    .chain(step.cpu.as_ref().map(cpu_text))
                    .collect();
                let probed = if probed.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", probed.join(", "))
                };
                eprintln!(
                    "  step at {:.0} bids/s: p99 {}, {} errors{probed}: {}",
                    step.rate,
                    ms(step.window.p99_ms),
                    step.window.errors,
                    if step.sustainable {
                        "sustainable"
                    } else {
                        "NOT sustainable"
                    }
                );
                steps.push(step);
            }
            let failed = steps.iter().rev().take_while(|s| !s.sustainable).count();
            if failed as u32 >= scenario.sustainable.stop_after_failed_steps {
                eprintln!("  {failed} steps in a row were not sustainable: stopping the ramp");
                shared
                    .ramp_stopped_ms
                    .store((now * 1000.0) as u64, Ordering::Release);
                shared.stop.store(true, Ordering::Release);
            }
        }
    }
}

/// The machine's CPU use, for a progress line.
fn cpu_text(cpu: &CpuWindow) -> String {
    format!(
        "cpu busy {:.0}%, stolen {:.0}%",
        cpu.share_pct(cpu.busy),
        cpu.share_pct(cpu.steal)
    )
}

/// Steps that ended at least one client timeout before `now`: by then a
/// request of the step still open has taken too long anyway.
fn judge_ready_steps(
    recorder: &Recorder,
    scenario: &Scenario,
    duration_s: f64,
    judged: usize,
    now: f64,
    timeout: Duration,
) -> Vec<StepResult> {
    let a = &scenario.arrival;
    let total = (duration_s / a.step_s).ceil() as usize;
    (judged..total)
        .take_while(|&k| (k + 1) as f64 * a.step_s + timeout.as_secs_f64() + 0.5 <= now)
        .map(|k| judge_step(recorder, scenario, k))
        .collect()
}

/// Every step from `judged` on that ran its whole length by `until_s`.
fn judge_steps(
    recorder: &Recorder,
    scenario: &Scenario,
    until_s: f64,
    judged: usize,
) -> Vec<StepResult> {
    let step_s = scenario.arrival.step_s;
    let complete = ((until_s + 1e-6) / step_s).floor() as usize;
    (judged..complete)
        .map(|k| judge_step(recorder, scenario, k))
        .take_while(|s| s.window.offered > 0)
        .collect()
}

fn judge_step(recorder: &Recorder, scenario: &Scenario, k: usize) -> StepResult {
    let a = &scenario.arrival;
    let from = (k as f64 * a.step_s).round() as usize;
    let to = ((k + 1) as f64 * a.step_s).round() as usize;
    let window = recorder.window(Kind::Bid, from, to);
    let sustainable = window.ok > 0
        && window.errors == 0
        && window
            .p99_ms
            .is_some_and(|p| p <= scenario.sustainable.p99_ms);
    StepResult {
        rate: a.step_rate_at(k),
        from_s: from,
        window,
        slowest_flush_ms: None,
        cpu: None,
        sustainable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp() -> Scenario {
        toml::from_str(
            r#"
                name = "ramp"
                duration_s = 40
                [[auctions]]
                label = "hot"
                bid_share = 1.0
                [bidders]
                count = 10
                [arrival]
                shape = "steps"
                from_rate = 10
                step_factor = 2.0
                step_s = 10
            "#,
        )
        .unwrap()
    }

    /// Every bid sent in seconds `from..to`, answered 2xx after `latency`.
    fn answered(r: &mut Recorder, from: usize, to: usize, latency: Duration) {
        for second in from..to {
            r.offered(Kind::Bid, second);
            r.ended(Ended {
                kind: Kind::Bid,
                sent_s: second,
                done_s: second,
                latency,
                attempts: 1,
                ending: &Ending::Ok,
                replayed: false,
                withheld: None,
            });
        }
    }

    #[test]
    fn a_step_the_stop_cut_short_is_not_judged() {
        let scenario = ramp();
        let mut r = Recorder::new();
        answered(&mut r, 0, 10, Duration::from_millis(5));
        answered(&mut r, 10, 20, Duration::from_millis(500));
        // The ramp stopped 2.5 s into the third step, whose few bids were fast.
        answered(&mut r, 20, 23, Duration::from_millis(5));

        let steps = judge_steps(&r, &scenario, 22.5, 0);
        let judged: Vec<(f64, bool)> = steps.iter().map(|s| (s.rate, s.sustainable)).collect();
        assert_eq!(judged, vec![(10.0, true), (20.0, false)]);

        // Run to its end, the same third step is judged.
        assert_eq!(judge_steps(&r, &scenario, 40.0, 0).len(), 3);
    }
}
