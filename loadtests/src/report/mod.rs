//! Reports: one JSON file per run (a mode of Gavel under one scenario),
//! and a combined report of the modes side by side. This module holds the
//! report data, its figures and its JSON; `markdown` renders `report.md`
//! and `chart` draws `chart.svg`.

use std::path::Path;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::audit::AuditReport;
use crate::cpu::{CpuUse, CpuWindow};
use crate::disk::{self, DiskSecond};
use crate::freshness::{ReadFreshness, WatchReport};
use crate::generator::{RunOutput, StepResult};
use crate::record::{Kind, Point, StreamSummary};
use crate::scenario::{Client, Scenario};
use crate::scrape::ServerSample;

mod chart;
mod cost;
mod markdown;

pub use cost::{Efficiency, FloorCost, FLOOR_MODE};

/// The bid paths kept to compare Gavel with (`GAVEL_BID_PATH`), in the
/// order a bench runs them after `log`.
pub const BASELINES: [&str; 3] = ["row_lock", "row_lock_fn", "optimistic"];

/// One run of one mode.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunReport {
    /// `log`, `row_lock`, `row_lock_fn` or `optimistic` (or any label the
    /// caller chose).
    pub mode: String,
    /// Which round of the bench it was measured in (1 when there was one).
    #[serde(default = "first_round")]
    pub round: u32,
    /// A refining pass: the mode's second climb in the round, in finer
    /// steps around the highest sustainable step of its ramp.
    #[serde(default)]
    pub refining: bool,
    /// The scenario's name.
    pub scenario: String,
    /// When second 0 began.
    pub started_at: DateTime<Utc>,
    /// The bidding phase, in seconds.
    pub duration_s: f64,
    /// The highest bid rate offered in any one second.
    pub peak_offered_bids_per_s: u64,
    /// Bid figures.
    pub bids: StreamSummary,
    /// Read figures.
    pub reads: StreamSummary,
    /// The peaks of Gavel's own metrics.
    pub server: ServerPeaks,
    /// The database audit.
    pub audit: AuditReport,
    /// Steps of a rate-finding run.
    pub steps: Vec<StepResult>,
    /// The database disk's flush latency over the bidding phase, when it
    /// was probed.
    #[serde(default)]
    pub disk: Option<DiskFlushes>,
    /// Where the machine's CPU went, when it was measured: over the
    /// highest sustainable step of a rate-finding run, else over the run.
    #[serde(default)]
    pub cpu: Option<CpuBreakdown>,
    /// The highest step rate that was sustainable (rate-finding runs).
    pub max_sustainable_bids_per_s: Option<f64>,
    /// Nice steps the load generator sent at, below Gavel and PostgreSQL.
    #[serde(default)]
    pub generator_nice: i32,
    /// The clients' timeout and retry policy the run used (none in reports
    /// written before it was recorded).
    #[serde(default)]
    pub client: Option<Client>,
    /// The watchers' streams, measured against the commits (scenarios
    /// with watchers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watchers: Option<WatchReport>,
    /// How stale the readers' answers were (runs with readers, measured
    /// against the commits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_freshness: Option<ReadFreshness>,
    /// The scenario's targets, checked against this run.
    pub targets: Vec<TargetCheck>,
    /// Per-second figures.
    pub series: Series,
}

fn first_round() -> u32 {
    1
}

/// The peaks of Gavel's metrics over a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServerPeaks {
    /// Scrapes taken.
    pub samples: usize,
    /// Most backends waiting on a heavyweight lock at once.
    pub lock_waiters_max: f64,
    /// Most backends blocked by another at once.
    pub blocked_backends_max: f64,
    /// The longest lock wait seen, in seconds.
    pub lock_wait_max_s: f64,
    /// Most requests waiting for an API pool connection.
    pub api_pool_waiting_max: f64,
    /// Most bids waiting for the resolver.
    pub pending_bids_max: f64,
    /// Highest resident memory, in MiB.
    pub rss_max_mib: Option<f64>,
    /// Share of auction view reads answered from Gavel's cache, between
    /// the first and the last scrape (none without such reads).
    #[serde(default)]
    pub views_from_memory: Option<f64>,
}

/// The database disk's flushes over a run ([`crate::disk`]).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct DiskFlushes {
    /// The slowest flush, in ms.
    pub slowest_ms: f64,
    /// Seconds with a flush slower than [`disk::STALL_MS`].
    pub stalled_seconds: usize,
    /// Seconds probed.
    pub seconds: usize,
}

impl DiskFlushes {
    fn of(seconds: &[DiskSecond], duration_s: f64) -> Option<Self> {
        let seconds: Vec<_> = seconds
            .iter()
            .take(duration_s.ceil() as usize)
            .filter(|s| s.flushes > 0)
            .collect();
        (!seconds.is_empty()).then(|| DiskFlushes {
            slowest_ms: seconds.iter().map(|s| s.max_ms).fold(0.0, f64::max),
            stalled_seconds: seconds.iter().filter(|s| s.max_ms > disk::STALL_MS).count(),
            seconds: seconds.len(),
        })
    }
}

/// The machine's CPU use over part of a run, per accepted bid.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuBreakdown {
    /// Which part: `the whole run`, or the step it was measured in.
    pub window: String,
    /// Bids accepted (2xx) within it.
    pub accepted_bids: u64,
    /// Requests answered within it: bids 2xx and reads 200 or 304 (none
    /// in reports written before they were counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<u64>,
    /// CPU use, in cores on average.
    pub cpu: CpuWindow,
}

impl CpuBreakdown {
    fn of(usage: &CpuUse, output: &RunOutput, bids: &StreamSummary) -> Option<Self> {
        let best = output
            .steps
            .iter()
            .filter(|s| s.sustainable)
            .max_by(|a, b| a.rate.total_cmp(&b.rate));
        let answered = |from: usize, cpu: &CpuWindow| {
            let to = from + cpu.seconds;
            let reads = output.recorder.window(Kind::Read, from, to).ok;
            Some(output.recorder.window(Kind::Bid, from, to).ok + reads)
        };
        match best {
            Some(step) => {
                let cpu = step.cpu.clone()?;
                Some(CpuBreakdown {
                    window: format!("the step at {:.0} bids/s", step.rate),
                    accepted_bids: step.window.ok,
                    requests: answered(step.from_s, &cpu),
                    cpu,
                })
            }
            None => {
                let cpu = usage.window(0, output.duration_s.ceil() as usize)?;
                Some(CpuBreakdown {
                    window: "the whole run".into(),
                    accepted_bids: bids.ok,
                    requests: answered(0, &cpu),
                    cpu,
                })
            }
        }
    }

    /// CPU time per accepted bid, in µs, of `cores` on average.
    pub fn us_per_bid(&self, cores: f64) -> Option<f64> {
        (self.accepted_bids > 0)
            .then(|| cores * self.cpu.seconds as f64 * 1e6 / self.accepted_bids as f64)
    }
}

/// A target and whether the run met it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetCheck {
    /// What is required.
    pub target: String,
    /// What was measured.
    pub measured: String,
    /// Whether it was met.
    pub met: bool,
}

/// Per-second figures of a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Series {
    /// Bids, by second.
    pub bids: Vec<Point>,
    /// Reads, by second.
    pub reads: Vec<Point>,
    /// Gavel's metrics, about once a second.
    pub server: Vec<ServerSample>,
    /// The database disk's flushes, by second (when probed).
    #[serde(default)]
    pub disk: Vec<DiskSecond>,
    /// CPU use by process group, by second (when measured).
    #[serde(default)]
    pub cpu: Option<CpuUse>,
    /// The watchers' streams open and versions received, by second.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub watchers: Vec<WatchSecond>,
}

/// The watchers in one second of a run.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct WatchSecond {
    /// Streams open at its end.
    pub open: u32,
    /// Versions received in it.
    pub versions: u64,
}

impl RunReport {
    /// The report of a finished, audited run.
    pub fn new(mode: &str, scenario: &Scenario, output: &RunOutput, audit: AuditReport) -> Self {
        let bids = output.recorder.series(Kind::Bid);
        let full_seconds = output.duration_s.floor() as usize;
        let peak = bids
            .iter()
            .take(full_seconds.max(1))
            .map(|p| p.offered)
            .max()
            .unwrap_or(0);
        let s = &output.server;
        let max = |f: fn(&ServerSample) -> f64| s.iter().map(f).fold(0.0, f64::max);
        let server = ServerPeaks {
            samples: s.len(),
            lock_waiters_max: max(|x| x.lock_waiters),
            blocked_backends_max: max(|x| x.blocked_backends),
            lock_wait_max_s: max(|x| x.lock_wait_max_s),
            api_pool_waiting_max: max(|x| x.api_pool_waiting),
            pending_bids_max: max(|x| x.pending_bids),
            rss_max_mib: s
                .iter()
                .filter_map(|x| x.rss_bytes)
                .reduce(f64::max)
                .map(|b| b / 1_048_576.0),
            views_from_memory: views_from_memory(s),
        };
        let max_sustainable = output
            .steps
            .iter()
            .filter(|s| s.sustainable)
            .map(|s| s.rate)
            .reduce(f64::max);
        let mut report = RunReport {
            mode: mode.to_owned(),
            round: 1,
            refining: false,
            scenario: scenario.name.clone(),
            started_at: output.started_at,
            duration_s: output.duration_s,
            peak_offered_bids_per_s: peak,
            bids: output.recorder.summary(Kind::Bid),
            reads: output.recorder.summary(Kind::Read),
            server,
            audit,
            steps: output.steps.clone(),
            disk: DiskFlushes::of(&output.disk, output.duration_s),
            cpu: None,
            max_sustainable_bids_per_s: max_sustainable,
            generator_nice: output.generator_nice,
            client: Some(scenario.client.clone()),
            targets: Vec::new(),
            series: Series {
                bids,
                reads: output.recorder.series(Kind::Read),
                server: output.server.clone(),
                disk: output.disk.clone(),
                cpu: output.cpu.clone(),
                watchers: watch_seconds(output),
            },
            watchers: None,
            read_freshness: None,
        };
        report.cpu = output
            .cpu
            .as_ref()
            .and_then(|usage| CpuBreakdown::of(usage, output, &report.bids));
        report.targets = report.check_targets(scenario);
        report
    }

    /// Files what the watchers and readers saw against the commits
    /// ([`crate::freshness::measure`]) and checks the targets again.
    pub fn set_freshness(
        &mut self,
        (watchers, readers): (Option<WatchReport>, Option<ReadFreshness>),
        scenario: &Scenario,
    ) {
        (self.watchers, self.read_freshness) = (watchers, readers);
        self.targets = self.check_targets(scenario);
    }

    /// The watchers' targets: the p99 of commit -> receipt, and every
    /// watcher ending on its auction's final version.
    fn check_watchers(&self, p99: f64, checks: &mut Vec<TargetCheck>) {
        let Some(w) = &self.watchers else {
            checks.push(TargetCheck {
                target: format!("watchers: commit -> receipt p99 <= {p99} ms"),
                measured: "not measured".into(),
                met: false,
            });
            return;
        };
        let measured = w.commit_to_receipt_ms.p99;
        checks.push(TargetCheck {
            target: format!("watchers: commit -> receipt p99 <= {p99} ms"),
            measured: format!("{measured:.1} ms"),
            met: w.commit_to_receipt_ms.count > 0 && measured <= p99,
        });
        checks.push(TargetCheck {
            target: "every watcher ends on its auction's final version".into(),
            measured: format!("{} of {}", w.ended_on_final, w.watchers),
            met: w.ended_on_final == w.watchers,
        });
    }

    /// The scenario's targets are Gavel's; the baselines are only there
    /// to be compared with, so they are not held to them.
    fn check_targets(&self, scenario: &Scenario) -> Vec<TargetCheck> {
        let held = !BASELINES.contains(&self.mode.as_str()) && self.mode != FLOOR_MODE;
        let Some(t) = scenario.targets.as_ref().filter(|_| held) else {
            return Vec::new();
        };
        let mut checks = Vec::new();
        if let Some(p99) = t.bid_p99_ms {
            let measured = self.bids.ok_latency_ms.p99;
            checks.push(TargetCheck {
                target: format!("p99 of accepted bids <= {p99} ms"),
                measured: format!("{measured:.1} ms"),
                met: self.bids.ok > 0 && measured <= p99,
            });
        }
        if t.zero_errors {
            let errors = self.bids.errors + self.reads.errors;
            checks.push(TargetCheck {
                target: "no 5xx, timeouts or transport errors".into(),
                measured: format!("{errors} errors"),
                met: errors == 0,
            });
        }
        checks.push(TargetCheck {
            target: "no acknowledged bid lost or counted twice (audit)".into(),
            measured: if self.audit.passed {
                "audit passed".into()
            } else {
                "audit FAILED".into()
            },
            met: self.audit.passed,
        });
        if let Some(lag) = t.resolver_lag_p99_ms {
            let measured = self.audit.resolver_lag_ms.p99;
            checks.push(TargetCheck {
                target: format!("resolver lag p99 <= {lag} ms"),
                measured: format!("{measured:.1} ms"),
                met: measured <= lag,
            });
        }
        if let Some(rss) = t.rss_mib {
            checks.push(TargetCheck {
                target: format!("Gavel RSS <= {rss} MiB"),
                measured: self
                    .server
                    .rss_max_mib
                    .map_or("not exported".into(), |m| format!("{m:.0} MiB")),
                met: self.server.rss_max_mib.is_some_and(|m| m <= rss),
            });
        }
        if let Some(p99) = t.watch_p99_ms {
            self.check_watchers(p99, &mut checks);
        }
        checks
    }

    /// Reads a run report written by [`RunReport::save`].
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the run report {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Writes the run report as JSON.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// A short summary for the terminal.
    pub fn summary_text(&self) -> String {
        let b = &self.bids;
        let mut text = format!(
            "{mode}: {n} bids ({ok} 2xx, {errors} errors, {retries} retries), accepted p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms; \
             {reads} reads (p99 {rp99:.1} ms); resolver lag p99 {lag:.1} ms; audit {audit}",
            mode = self.mode,
            n = b.requests,
            ok = b.ok,
            errors = b.errors,
            retries = b.retries,
            p50 = b.ok_latency_ms.p50,
            p99 = b.ok_latency_ms.p99,
            max = b.ok_latency_ms.max,
            reads = self.reads.requests,
            rp99 = self.reads.ok_latency_ms.p99,
            lag = self.audit.resolver_lag_ms.p99,
            audit = if self.audit.passed { "passed" } else { "FAILED" },
        );
        if b.retries_denied_by_budget + b.retries_over_max_wait > 0 {
            text.push_str(&format!(
                "; retries not made: {} denied by the retry budget, {} over the longest wait",
                b.retries_denied_by_budget, b.retries_over_max_wait
            ));
        }
        if let Some(rate) = self.max_sustainable_bids_per_s {
            text.push_str(&format!("; highest sustainable rate {rate:.0} bids/s"));
        }
        if let Some(d) = self.disk {
            text.push_str(&format!(
                "; slowest disk flush {:.1} ms ({} of {} s over {:.0} ms)",
                d.slowest_ms,
                d.stalled_seconds,
                d.seconds,
                disk::STALL_MS
            ));
        }
        if let Some(c) = &self.cpu {
            text.push_str(&format!(
                "; over {}: CPU busy {:.0}%, stolen {:.0}%",
                c.window,
                c.cpu.share_pct(c.cpu.busy),
                c.cpu.share_pct(c.cpu.steal)
            ));
            if let Some(us) = c.us_per_bid(c.cpu.busy) {
                text.push_str(&format!(", {us:.0} µs of CPU per accepted bid"));
            }
        }
        text
    }
}

/// The watchers' seconds, up to the last one with a stream open.
fn watch_seconds(output: &RunOutput) -> Vec<WatchSecond> {
    let Some(w) = &output.watchers else {
        return Vec::new();
    };
    let seconds = (w.open_by_second.iter().zip(&w.events_by_second))
        .map(|(&open, &versions)| WatchSecond { open, versions });
    let mut seconds: Vec<WatchSecond> = seconds.collect();
    let kept = (seconds.iter())
        .rposition(|s| s.open > 0 || s.versions > 0)
        .map_or(0, |last| last + 1)
        .max(output.duration_s.ceil() as usize);
    seconds.truncate(kept);
    seconds
}

/// The database's raw append ceiling, measured with pgbench.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ceiling {
    /// Which round of the bench it was measured in.
    #[serde(default = "first_round")]
    pub round: u32,
    /// Rows appended per second.
    pub rows_per_s: f64,
    /// Rows per INSERT (one UNNEST statement per transaction).
    pub batch_rows: u32,
    /// pgbench clients.
    pub clients: u32,
    /// Transactions per second.
    pub tps: f64,
    /// Average transaction latency, in ms.
    pub latency_ms: f64,
    /// How long it ran, in seconds.
    pub duration_s: u32,
    /// The CPU of PostgreSQL (the primary's processes and the replica)
    /// and of pgbench while it ran, in cores on average (none in reports
    /// written before it was measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_cores: Option<f64>,
}

/// The machine a report was measured on.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    /// CPUs available.
    pub cpus: usize,
    /// CPU model.
    pub cpu_model: String,
    /// Memory in GiB.
    pub memory_gib: f64,
    /// Kernel release.
    pub kernel: String,
    /// PostgreSQL server version.
    pub postgres: String,
}

impl Machine {
    /// What this machine is, read from `/proc`.
    pub fn detect(postgres: String) -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let meminfo = read("/proc/meminfo");
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model: cpuinfo
                .lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
                .unwrap_or_default(),
            memory_gib: meminfo
                .lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
                .map_or(0.0, |kb| (kb / 1_048_576.0 * 10.0).round() / 10.0),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            postgres,
        }
    }
}

/// Every mode measured in one run of a scenario, side by side.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// When the report was written.
    pub generated_at: DateTime<Utc>,
    /// The command that produced it.
    pub command: String,
    /// Where it was measured.
    pub machine: Machine,
    /// The scenario's name.
    pub scenario: String,
    /// The scenario's description.
    pub description: String,
    /// One run per mode and round, in the order they ran.
    pub runs: Vec<RunReport>,
    /// The database's raw append ceiling, measured in the same run (the
    /// median round's, when there were several).
    pub ceiling: Option<Ceiling>,
    /// The ceiling of every round, in order.
    #[serde(default)]
    pub ceilings: Vec<Ceiling>,
    /// Log mode's CPU per bid over the ceiling's per row, by round
    /// ([`Report::efficiencies`], filed when the report is written).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub efficiency: Vec<Efficiency>,
    /// Gavel's own CPU per request over the HTTP floor's, by round
    /// ([`Report::floor_costs`], filed when the report is written).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_floor: Vec<FloorCost>,
}

/// One round's comparison of log mode with every other mode (the
/// baselines) and with the append ceiling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundComparison {
    /// The round.
    pub round: u32,
    /// Log mode's highest sustainable rate, in bids/s.
    pub log: Option<f64>,
    /// Every other mode's, in the order the modes first ran.
    pub others: Vec<ModeRate>,
    /// The round's raw append ceiling, in rows/s.
    pub ceiling: Option<f64>,
    /// `log / ceiling`.
    pub of_ceiling: Option<f64>,
}

/// A mode's highest sustainable rate in a round, and log mode's over it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModeRate {
    /// The mode (`row_lock`, `row_lock_fn`, `optimistic`, ...).
    pub mode: String,
    /// Its highest sustainable rate, in bids/s.
    pub rate: Option<f64>,
    /// `log / rate`.
    pub log_over: Option<f64>,
}

/// The ratios a report states, as medians over the rounds.
#[derive(Debug, Clone, PartialEq)]
pub struct Ratios {
    /// Log mode's rate over each other mode's, in the order the modes ran.
    pub over: Vec<(String, Option<f64>)>,
    /// Log mode's rate as a share of the append ceiling.
    pub of_ceiling: Option<f64>,
}

/// The share of auction view reads Gavel answered from its cache between
/// the first and the last of `samples`; none when there were no such reads.
fn views_from_memory(samples: &[ServerSample]) -> Option<f64> {
    let (first, last) = (samples.first()?, samples.last()?);
    let hits = last.view_cache_hits - first.view_cache_hits;
    let reads = hits + last.view_cache_misses - first.view_cache_misses;
    (reads > 0.0).then(|| hits / reads)
}

/// The median of `values`, if any (the mean of the middle two when even).
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

impl Report {
    /// A mode's highest sustainable rate in a round: the highest step that
    /// held in its ramp or in the refining pass that followed it.
    fn rate(&self, mode: &str, round: u32) -> Option<f64> {
        self.runs
            .iter()
            .filter(|r| r.mode == mode && r.round == round)
            .filter_map(|r| r.max_sustainable_bids_per_s)
            .reduce(f64::max)
    }

    /// How many rounds the bench ran.
    pub fn rounds(&self) -> u32 {
        self.runs.iter().map(|r| r.round).max().unwrap_or(1)
    }

    /// A run's name in tables and legends: its mode, its round when there
    /// were several, and whether it refined the ramp.
    pub fn label(&self, run: &RunReport) -> String {
        let mut label = run.mode.clone();
        if self.rounds() > 1 {
            label.push_str(&format!(" #{}", run.round));
        }
        if run.refining {
            label.push_str(" refining");
        }
        label
    }

    /// The modes other than log, in the order they first ran (the HTTP
    /// floor is no design to compare rates with: its cost is compared).
    pub fn other_modes(&self) -> Vec<&str> {
        let mut modes: Vec<&str> = Vec::new();
        let other = |r: &&RunReport| r.mode != "log" && r.mode != FLOOR_MODE;
        for run in self.runs.iter().filter(other) {
            if !modes.contains(&run.mode.as_str()) {
                modes.push(&run.mode);
            }
        }
        modes
    }

    /// Each round's comparison: log mode's highest sustainable rate over
    /// every other mode's, and as a share of the round's append ceiling.
    pub fn comparisons(&self) -> Vec<RoundComparison> {
        let others = self.other_modes();
        (1..=self.rounds())
            .map(|round| {
                let log = self.rate("log", round);
                let ceiling = self
                    .ceilings
                    .iter()
                    .chain(&self.ceiling)
                    .find(|c| c.round == round)
                    .map(|c| c.rows_per_s);
                let others = others.iter().map(|&mode| {
                    let rate = self.rate(mode, round);
                    ModeRate {
                        mode: mode.to_owned(),
                        rate,
                        log_over: log.zip(rate).map(|(l, r)| l / r),
                    }
                });
                RoundComparison {
                    round,
                    log,
                    others: others.collect(),
                    ceiling,
                    of_ceiling: log.zip(ceiling).map(|(l, c)| l / c),
                }
            })
            .collect()
    }

    /// The comparisons the report states, as medians over the rounds: log
    /// mode's highest sustainable rate over each other mode's, and as a
    /// share of the append ceiling.
    pub fn ratios(&self) -> Ratios {
        let rounds = self.comparisons();
        let over = self.other_modes().into_iter().map(|mode| {
            let each = rounds.iter().flat_map(|c| &c.others);
            let of_mode = each.filter(|o| o.mode == mode).filter_map(|o| o.log_over);
            (mode.to_owned(), median(of_mode.collect()))
        });
        Ratios {
            over: over.collect(),
            of_ceiling: median(rounds.iter().filter_map(|c| c.of_ceiling).collect()),
        }
    }

    /// Reads `path` as a combined report (`report.json`); `None` when it
    /// is a run report instead.
    pub fn load_combined(path: &Path) -> anyhow::Result<Option<Self>> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the report {}", path.display()))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("in {}", path.display()))?;
        if value.get("runs").is_none() {
            return Ok(None);
        }
        let report =
            serde_json::from_value(value).with_context(|| format!("in {}", path.display()))?;
        Ok(Some(report))
    }

    /// Writes `report.json` (with the cost figures derived from the
    /// runs), `report.md` and `chart.svg` into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = Report {
            efficiency: self.efficiencies(),
            http_floor: self.floor_costs(),
            ..self.clone()
        };
        std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(&json)?)?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        chart::chart(self, &dir.join("chart.svg"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn views_from_memory_is_the_share_of_cache_hits_over_the_run() {
        let sample = |hits, misses| ServerSample {
            view_cache_hits: hits,
            view_cache_misses: misses,
            ..ServerSample::default()
        };
        let run = [sample(10.0, 5.0), sample(50.0, 8.0), sample(100.0, 15.0)];
        // 90 hits and 10 misses between the first and the last scrape.
        assert_eq!(views_from_memory(&run), Some(0.9));
        assert_eq!(views_from_memory(&[sample(3.0, 1.0)]), None, "one scrape");
        assert_eq!(views_from_memory(&[]), None);
        let no_reads = [sample(0.0, 0.0), sample(0.0, 0.0)];
        assert_eq!(views_from_memory(&no_reads), None);
    }

    fn run(mode: &str, round: u32, rate: Option<f64>) -> RunReport {
        RunReport {
            mode: mode.into(),
            round,
            max_sustainable_bids_per_s: rate,
            ..RunReport::default()
        }
    }

    fn ceiling(round: u32, rows_per_s: f64) -> Ceiling {
        Ceiling {
            round,
            rows_per_s,
            ..Ceiling::default()
        }
    }

    fn report(runs: Vec<RunReport>, ceilings: Vec<Ceiling>) -> Report {
        Report {
            generated_at: Utc::now(),
            command: "test".into(),
            machine: Machine::default(),
            scenario: "max-rate".into(),
            description: String::new(),
            runs,
            ceiling: ceilings.get(1).or(ceilings.first()).cloned(),
            ceilings,
            efficiency: Vec::new(),
            http_floor: Vec::new(),
        }
    }

    /// A report cut from a real bench renders exactly as `testdata/` holds
    /// it: the JSON, the Markdown and the chart, byte for byte.
    #[test]
    fn a_fixed_report_renders_byte_for_byte_as_before() {
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/report/testdata");
        let json = std::fs::read(data.join("report.json")).unwrap();
        let report = Report::load_combined(&data.join("report.json"))
            .unwrap()
            .expect("a combined report");
        assert_eq!(serde_json::to_vec_pretty(&report).unwrap(), json);
        let md = std::fs::read_to_string(data.join("report.md")).unwrap();
        assert_eq!(report.markdown(), md);
        let dir = std::env::temp_dir().join(format!("report-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        chart::chart(&report, &dir.join("chart.svg")).unwrap();
        let svg = std::fs::read_to_string(dir.join("chart.svg")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            svg == std::fs::read_to_string(data.join("chart.svg")).unwrap(),
            "chart.svg differs from src/report/testdata/chart.svg"
        );
    }

    #[test]
    fn medians_take_the_middle_value_or_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn rounds_are_compared_pairwise_and_summarised_by_their_medians() {
        let report = report(
            vec![
                run("log", 1, Some(10_000.0)),
                run("row_lock", 1, Some(500.0)),
                run("log", 2, Some(4_000.0)),
                run("row_lock", 2, Some(400.0)),
                run("log", 3, Some(12_000.0)),
                // No step of this round's row-lock run held: it compares nothing.
                run("row_lock", 3, None),
            ],
            vec![
                ceiling(1, 50_000.0),
                ceiling(2, 40_000.0),
                ceiling(3, 60_000.0),
            ],
        );
        assert_eq!(report.rounds(), 3);
        assert_eq!(report.label(&report.runs[2]), "log #2");
        let rounds = report.comparisons();
        assert_eq!(rounds.len(), 3);
        let over_row_lock = |c: &RoundComparison| c.others[0].log_over;
        assert_eq!(over_row_lock(&rounds[0]), Some(20.0));
        assert_eq!(over_row_lock(&rounds[1]), Some(10.0));
        assert_eq!(over_row_lock(&rounds[2]), None);
        assert_eq!(rounds[1].of_ceiling, Some(0.1));
        // Medians: of 20× and 10×; of 20%, 10% and 20%.
        assert_eq!(
            report.ratios(),
            Ratios {
                over: vec![("row_lock".into(), Some(15.0))],
                of_ceiling: Some(0.2)
            }
        );
        let md = report.markdown();
        for needle in [
            "**15.0×** the bid rate of the row-lock design (the median of 3 rounds)",
            "| 3 | 12000 bids/s | - | - | 60000 rows/s | 20% |",
            "the median of the rounds' 50000, 40000, 60000 rows/s",
            "| log #3 |",
        ] {
            assert!(md.contains(needle), "report.md lacks {needle:?}:\n{md}");
        }
    }

    #[test]
    fn log_mode_is_compared_with_every_baseline_round_by_round() {
        let report = report(
            vec![
                run("log", 1, Some(9_000.0)),
                run("row_lock", 1, Some(450.0)),
                run("row_lock_fn", 1, Some(1_800.0)),
                run("optimistic", 1, Some(300.0)),
                run("log", 2, Some(11_000.0)),
                run("row_lock", 2, Some(550.0)),
                run("row_lock_fn", 2, Some(2_200.0)),
                // No step of this round's optimistic run held.
                run("optimistic", 2, None),
            ],
            vec![ceiling(1, 90_000.0), ceiling(2, 110_000.0)],
        );
        assert_eq!(report.other_modes(), BASELINES);
        let rounds = report.comparisons();
        let over = |round: usize| -> Vec<Option<f64>> {
            rounds[round].others.iter().map(|o| o.log_over).collect()
        };
        assert_eq!(over(0), [Some(20.0), Some(5.0), Some(30.0)]);
        assert_eq!(over(1), [Some(20.0), Some(5.0), None]);
        let ratios = report.ratios();
        assert_eq!(
            ratios.over,
            [
                ("row_lock".into(), Some(20.0)),
                ("row_lock_fn".into(), Some(5.0)),
                ("optimistic".into(), Some(30.0)),
            ]
        );
        assert_eq!(ratios.of_ceiling, Some(0.1));
        let md = report.markdown();
        for needle in [
            "**20.0×** the bid rate of the row-lock design (the median of 2 rounds)",
            "**5.0×** the bid rate of the row-lock design in one round trip (`row_lock_fn`) (the median",
            "**30.0×** the bid rate of the optimistic design (`optimistic`) (the median",
            "falls on every mode",
            "| round | log | row_lock | row_lock_fn | optimistic | log / row_lock | log / row_lock_fn | log / optimistic | ceiling | log / ceiling |",
            "| 2 | 11000 bids/s | 550 bids/s | 2200 bids/s | - | 20.0× | 5.0× | - | 110000 rows/s | 10% |",
        ] {
            assert!(md.contains(needle), "report.md lacks {needle:?}:\n{md}");
        }
        // Every mode keeps one hue on the chart, later rounds a lighter one.
        let hues: Vec<_> = (0..8).map(|i| chart::color(&report, i)).collect();
        assert_eq!(hues[..4].iter().collect::<HashSet<_>>().len(), 4);
        assert_ne!(hues[4], hues[0]);
        let [r0, r1] = [hues[0].0, hues[4].0];
        assert!(r1 > r0, "round 2 of log is lighter: {r0} -> {r1}");
    }

    #[test]
    fn a_combined_report_is_read_back_and_a_run_report_is_not_one() {
        let dir = std::env::temp_dir().join(format!("report-{}", std::process::id()));
        let written = report(
            vec![run("log", 1, Some(8_000.0)), run("log", 2, Some(6_000.0))],
            vec![ceiling(1, 50_000.0), ceiling(2, 40_000.0)],
        );
        written.write(&dir).unwrap();
        written.runs[0].save(&dir.join("log-1.json")).unwrap();
        let read = Report::load_combined(&dir.join("report.json"))
            .unwrap()
            .expect("a combined report");
        let run_report = Report::load_combined(&dir.join("log-1.json")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(read.rounds(), 2);
        assert_eq!(read.ceilings.len(), 2);
        assert_eq!(read.comparisons(), written.comparisons());
        assert!(run_report.is_none());
    }

    #[test]
    fn the_bids_table_gives_the_retries_made_and_not_made_and_the_clients_policy() {
        let mut log = run("log", 1, Some(5_000.0));
        log.bids.retries = 12;
        log.bids.retries_denied_by_budget = 5;
        log.bids.retries_over_max_wait = 1;
        log.client = Some(Client::default());
        let mut refining = log.clone();
        refining.refining = true;
        let md = report(vec![log.clone(), refining], vec![]).markdown();
        assert!(
            md.contains("| retries (allowed) | retries denied by budget | Retry-After over cap |"),
            "{md}"
        );
        assert!(md.contains("| 12 | 5 | 1 |"), "{md}");
        // One policy, stated once.
        assert_eq!(md.matches("Clients: timeout 2000 ms").count(), 1, "{md}");
        assert!(
            md.contains("retry budget 20% of first attempts over 10 s plus 10/s"),
            "{md}"
        );

        // Runs with different policies are given one by one.
        let mut patient = run("row_lock", 1, None);
        let mut client = Client::default();
        client.max_retry_wait_ms = 30_000;
        patient.client = Some(client);
        let md = report(vec![log.clone(), patient], vec![]).markdown();
        assert!(md.contains("Clients of **log**: "), "{md}");
        assert!(
            md.contains("Clients of **row_lock**: ") && md.contains("up to 30000 ms"),
            "{md}"
        );

        // A run report keeps its policy; one written before it was recorded still loads.
        let json = serde_json::to_value(&log).unwrap();
        let read: RunReport = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(read.client, log.client);
        assert_eq!(read.bids.retries_denied_by_budget, 5);
        let mut older = json;
        older.as_object_mut().unwrap().remove("client");
        older["bids"]
            .as_object_mut()
            .unwrap()
            .remove("retries_denied_by_budget");
        let read: RunReport = serde_json::from_value(older).unwrap();
        assert_eq!((read.client, read.bids.retries_denied_by_budget), (None, 0));
    }

    #[test]
    fn one_round_keeps_the_plain_mode_names() {
        let report = report(
            vec![
                run("log", 1, Some(9_000.0)),
                run("row_lock", 1, Some(900.0)),
            ],
            vec![ceiling(1, 90_000.0)],
        );
        assert_eq!(report.label(&report.runs[1]), "row_lock");
        assert_eq!(
            report.ratios(),
            Ratios {
                over: vec![("row_lock".into(), Some(10.0))],
                of_ceiling: Some(0.1)
            }
        );
        let md = report.markdown();
        assert!(
            md.contains("**10.0×** the bid rate of the row-lock design.\n"),
            "{md}"
        );
        assert!(!md.contains("| round |"), "{md}");
    }

    #[test]
    fn a_rounds_rate_is_the_highest_step_held_in_its_ramp_or_its_refining_pass() {
        let refining = |mode: &str, round, rate| RunReport {
            refining: true,
            ..run(mode, round, rate)
        };
        let report = report(
            vec![
                run("log", 1, Some(8_674.0)),
                refining("log", 1, Some(9_562.0)),
                run("row_lock", 1, Some(477.0)),
                // The refining pass held less than the ramp: the ramp's step stands.
                refining("row_lock", 1, Some(454.0)),
                run("log", 2, Some(10_842.0)),
                // No step of this refining pass held.
                refining("log", 2, None),
                run("row_lock", 2, Some(596.0)),
            ],
            vec![ceiling(1, 66_000.0), ceiling(2, 71_000.0)],
        );
        let rounds = report.comparisons();
        assert_eq!(rounds[0].log, Some(9_562.0));
        assert_eq!(rounds[0].others[0].rate, Some(477.0));
        assert_eq!(rounds[1].log, Some(10_842.0));
        assert_eq!(rounds[1].others[0].rate, Some(596.0));
        assert_eq!(report.label(&report.runs[1]), "log #1 refining");
        let md = report.markdown();
        for needle in [
            "highest step that held in its ramp or in the refining pass",
            "| 1 | 9562 bids/s | 477 bids/s | 20.0× |",
        ] {
            assert!(md.contains(needle), "report.md lacks {needle:?}:\n{md}");
        }
    }
}
