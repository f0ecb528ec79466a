//! Before second 0: the run's auctions created on Gavel, the bidders'
//! tokens minted, the probes started and the state every request task
//! shares built.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use chrono::{DateTime, Utc};
use hyper::header::HeaderValue;
use hyper::{StatusCode, Uri};
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::watchers::{Tally, Watching};
use super::{Book, RunAuction, Shared, Target};
use crate::client::Client;
use crate::cpu::{CpuProbe, CpuUse};
use crate::disk::{DiskProbe, DiskSecond};
use crate::receipts::Receipts;
use crate::record::Recorder;
use crate::retry::Retries;
use crate::scenario::{AuctionGroup, Scenario, Watchers};
use crate::trace::TraceBid;
use gavel::auth::{JwtKeys, Role};
use gavel::rules::Increments;

/// A run ready to start at second 0.
pub(super) struct Setup {
    /// What every request task shares.
    pub shared: Arc<Shared>,
    /// The auctions created, in the order the requests index them.
    pub auctions: Vec<RunAuction>,
    /// The probes watching the machine beside the run.
    pub probes: Probes,
    /// The bidding phase, in seconds.
    pub duration_s: f64,
    /// The wall-clock instant of `shared.origin`.
    pub origin_at: DateTime<Utc>,
}

/// Creates the run's auctions, mints its tokens and starts the probes.
pub(super) async fn prepare(
    scenario: &Scenario,
    trace: Option<&[TraceBid]>,
    target: &Target,
) -> anyhow::Result<Setup> {
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        .build()?;
    let client = Client::new(&target.api).await?;
    let keys = JwtKeys::new(&target.jwt_secret, &target.jwt_audience);
    let duration_s = run_duration(scenario, trace);
    let (origin, origin_at) = (Instant::now(), Utc::now());
    // Second 0 starts once setup is surely done and the watchers have
    // connected; auctions end relative to it.
    let ramp = (scenario.watchers.as_ref()).map_or(Duration::ZERO, |w| {
        Duration::from_secs_f64(w.connect_ramp_s + 1.0)
    });
    let lead = Duration::from_secs(3) + ramp;
    let start_wall = Utc::now() + chrono::Duration::from_std(lead)?;
    let planned = plan_auctions(scenario, trace, start_wall, duration_s);
    eprintln!("setting up: {} auctions, minting tokens ...", planned.len());
    let auctions = create_auctions(&http, &target.api, &keys, &planned).await?;
    let bidder_names = bidder_names(scenario, trace);
    let bearer = bearer_tokens(&keys, &bidder_names);
    let starting: Vec<i64> = planned.iter().map(|(_, g)| g.starting_price).collect();
    let t0 = Instant::now() + lead.saturating_sub(Duration::from_millis(200));
    let watching = match &scenario.watchers {
        Some(watchers) => Some(watching(watchers, &auctions, &keys, duration_s)?),
        None => None,
    };
    let probes = Probes::start(target, t0)?;
    let shared = Shared {
        t0,
        bid_paths: auction_paths(&auctions, "/bids")?,
        read_paths: auction_paths(&auctions, "")?,
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
        disk: probes.disk.as_ref().map(DiskProbe::seconds),
        cpu: probes.cpu.as_ref().map(CpuProbe::seconds),
        client,
        scraper: http,
        origin,
        watching,
        seen: Mutex::new(Vec::new()),
    };
    Ok(Setup {
        shared: Arc::new(shared),
        auctions,
        probes,
        duration_s,
        origin_at,
    })
}

/// The watchers of the run: their auctions' stream paths, their tokens
/// (`watcher-<n>`, bidders who only watch), and their connect ramp,
/// starting now.
fn watching(
    watchers: &Watchers,
    auctions: &[RunAuction],
    keys: &JwtKeys,
    duration_s: f64,
) -> anyhow::Result<Watching> {
    let watched = (watchers.auctions.iter())
        .map(|label| {
            let index = (auctions.iter().position(|a| &a.label == label))
                .with_context(|| format!("watchers.auctions: the run has no auction '{label}'"))?;
            let path = Uri::try_from(format!("/api/auctions/{}/events", auctions[index].id))?;
            anyhow::Ok((index, path))
        })
        .collect::<Result<_, _>>()?;
    let names: Vec<String> = (0..watchers.count)
        .map(|i| format!("watcher-{i}"))
        .collect();
    let (events_by_second, open_by_second) = Watching::seconds(duration_s);
    Ok(Watching {
        watched,
        bearer: bearer_tokens(keys, &names),
        first_connect: Instant::now(),
        ramp: Duration::from_secs_f64(watchers.connect_ramp_s),
        end_wait: Duration::from_secs_f64(watchers.end_wait_s),
        stop: CancellationToken::new(),
        receipts: Receipts::new(auctions.len()),
        tally: Tally::default(),
        open: AtomicUsize::new(0),
        events_by_second,
        open_by_second,
        endings: Mutex::new(Vec::new()),
        idle: Mutex::new(Vec::new()),
    })
}

/// The probes of the database's disk and of the machine's CPU.
pub(super) struct Probes {
    disk: Option<DiskProbe>,
    cpu: Option<CpuProbe>,
}

impl Probes {
    /// Starts the disk probe (when the target names a directory) and the
    /// CPU probe (when `/proc` can be read).
    fn start(target: &Target, t0: Instant) -> anyhow::Result<Self> {
        let disk = match &target.disk_probe {
            Some(dir) => Some(DiskProbe::start(dir, t0)?),
            None => None,
        };
        let cpu = match CpuProbe::start(target.cpu, t0) {
            Ok(probe) => Some(probe),
            Err(e) => {
                eprintln!("(no CPU accounting: {e:#})");
                None
            }
        };
        Ok(Probes { disk, cpu })
    }

    /// Stops both probes and returns what they saw, second by second.
    pub(super) fn stop(self) -> (Vec<DiskSecond>, Option<CpuUse>) {
        let disk = self.disk.map(DiskProbe::stop).unwrap_or_default();
        let cpu = self.cpu.map(CpuProbe::stop);
        (disk, cpu)
    }
}

/// The bidding phase: the scenario's, or as long as the trace lasts at its
/// speed.
fn run_duration(scenario: &Scenario, trace: Option<&[TraceBid]>) -> f64 {
    match (trace, &scenario.trace) {
        (Some(bids), Some(source)) => {
            let last = bids.last().map_or(0, |b| b.offset_ms) as f64 / 1000.0;
            (last / source.speed).max(1.0)
        }
        _ => scenario.duration_s,
    }
}

/// The bidders: the trace's, or the scenario's `bidder-<n>`.
fn bidder_names(scenario: &Scenario, trace: Option<&[TraceBid]>) -> Vec<String> {
    match trace {
        Some(bids) => {
            let mut names: Vec<String> = bids.iter().map(|b| b.bidder.clone()).collect();
            names.sort();
            names.dedup();
            names
        }
        None => (0..scenario.bidders.count)
            .map(|i| format!("bidder-{i}"))
            .collect(),
    }
}

/// Each bidder's `Authorization` header.
fn bearer_tokens(keys: &JwtKeys, bidder_names: &[String]) -> Vec<HeaderValue> {
    bidder_names
        .iter()
        .map(|name| {
            HeaderValue::from_str(&format!(
                "Bearer {}",
                keys.mint(name, &[Role::Bidder], 24 * 3600)
            ))
            .expect("a JWT is a valid header value")
        })
        .collect()
}

/// `/api/auctions/<id><suffix>` of every auction, in order.
fn auction_paths(auctions: &[RunAuction], suffix: &str) -> anyhow::Result<Vec<Uri>> {
    Ok(auctions
        .iter()
        .map(|a| Uri::try_from(format!("/api/auctions/{}{suffix}", a.id)))
        .collect::<Result<_, _>>()?)
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
        None => {
            let groups = (scenario.auctions.iter())
                .flat_map(|group| std::iter::repeat_n(group, group.count));
            (scenario.auction_labels().into_iter().zip(groups))
                .map(|(label, group)| make(label, group))
                .collect()
        }
    }
}

/// Creates the planned auctions on Gavel, as a seller, one after another.
async fn create_auctions(
    http: &reqwest::Client,
    api: &str,
    keys: &JwtKeys,
    planned: &[(RunAuction, &AuctionGroup)],
) -> anyhow::Result<Vec<RunAuction>> {
    let seller = keys.mint("loadtest-seller", &[Role::Seller], 24 * 3600);
    let mut created = Vec::with_capacity(planned.len());
    for (auction, group) in planned {
        created.push(create_auction(http, api, &seller, auction, group).await?);
    }
    Ok(created)
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
