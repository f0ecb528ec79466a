//! Reports: one JSON file per run (a mode of Gavel under one scenario),
//! and a combined report of the modes measured side by side: JSON, a
//! Markdown summary and an SVG chart of throughput, p50/p99 latency and
//! errors over time, every mode on the same axes.

use std::path::Path;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::audit::AuditReport;
use crate::cpu::{CpuSecond, CpuUse, CpuWindow};
use crate::disk::{self, DiskSecond};
use crate::generator::{RunOutput, StepResult};
use crate::record::{Kind, Point, StreamSummary};
use crate::scenario::{Client, Scenario};
use crate::scrape::ServerSample;

/// One run of one mode.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunReport {
    /// `log` or `row_lock` (or any label the caller chose).
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
        match best {
            Some(step) => Some(CpuBreakdown {
                window: format!("the step at {:.0} bids/s", step.rate),
                accepted_bids: step.window.ok,
                cpu: step.cpu.clone()?,
            }),
            None => Some(CpuBreakdown {
                window: "the whole run".into(),
                accepted_bids: bids.ok,
                cpu: usage.window(0, output.duration_s.ceil() as usize)?,
            }),
        }
    }

    /// CPU time per accepted bid, in µs, of `cores` on average.
    pub fn us_per_bid(&self, cores: f64) -> Option<f64> {
        (self.accepted_bids > 0)
            .then(|| cores * self.cpu.seconds as f64 * 1e6 / self.accepted_bids as f64)
    }

    /// Every row of the breakdown: the groups, other processes, the
    /// machine busy, stolen and idle time, in cores.
    fn rows(&self) -> Vec<(String, f64, bool)> {
        let c = &self.cpu;
        let mut rows: Vec<(String, f64, bool)> = c
            .groups
            .iter()
            .map(|(n, v)| (n.clone(), *v, true))
            .collect();
        rows.push(("other processes".into(), c.other, true));
        rows.push(("**machine busy**".into(), c.busy, true));
        rows.push(("stolen by the hypervisor".into(), c.steal, false));
        rows.push((
            "idle".into(),
            (c.cores as f64 - c.busy - c.steal).max(0.0),
            false,
        ));
        rows
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
            },
        };
        report.cpu = output
            .cpu
            .as_ref()
            .and_then(|usage| CpuBreakdown::of(usage, output, &report.bids));
        report.targets = report.check_targets(scenario);
        report
    }

    /// The scenario's targets are Gavel's; the row-lock baseline is only
    /// there to be compared with, so it is not held to them.
    fn check_targets(&self, scenario: &Scenario) -> Vec<TargetCheck> {
        let Some(t) = scenario
            .targets
            .as_ref()
            .filter(|_| self.mode != "row_lock")
        else {
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
}

/// One round's comparison of log mode with the row-lock design.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RoundComparison {
    /// The round.
    pub round: u32,
    /// Log mode's highest sustainable rate, in bids/s.
    pub log: Option<f64>,
    /// row_lock mode's.
    pub row_lock: Option<f64>,
    /// The round's raw append ceiling, in rows/s.
    pub ceiling: Option<f64>,
    /// `log / row_lock`.
    pub over_row_lock: Option<f64>,
    /// `log / ceiling`.
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

    /// Each round's comparison: log mode's highest sustainable rate over
    /// row_lock's, and as a share of the round's append ceiling.
    pub fn comparisons(&self) -> Vec<RoundComparison> {
        (1..=self.rounds())
            .map(|round| {
                let (log, row_lock) = (self.rate("log", round), self.rate("row_lock", round));
                let ceiling = self
                    .ceilings
                    .iter()
                    .chain(&self.ceiling)
                    .find(|c| c.round == round)
                    .map(|c| c.rows_per_s);
                RoundComparison {
                    round,
                    log,
                    row_lock,
                    ceiling,
                    over_row_lock: log.zip(row_lock).map(|(l, r)| l / r),
                    of_ceiling: log.zip(ceiling).map(|(l, c)| l / c),
                }
            })
            .collect()
    }

    /// The comparisons the report states, as medians over the rounds: log
    /// mode's highest sustainable rate over row_lock's, and as a share of
    /// the append ceiling.
    pub fn ratios(&self) -> (Option<f64>, Option<f64>) {
        let rounds = self.comparisons();
        let of =
            |f: fn(&RoundComparison) -> Option<f64>| median(rounds.iter().filter_map(f).collect());
        (of(|c| c.over_row_lock), of(|c| c.of_ceiling))
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

    /// Writes `report.json`, `report.md` and `chart.svg` into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(self)?)?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        chart(self, &dir.join("chart.svg"))?;
        Ok(())
    }

    /// The Markdown summary.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine;
        md.push_str(&format!("# Load test: {}\n\n", self.scenario));
        if !self.description.is_empty() {
            md.push_str(&format!("{}\n\n", self.description.trim()));
        }
        md.push_str(&format!(
            "- Measured {} on {} CPUs ({}), {} GiB, Linux {}, {}.\n- Command: `{}`\n- Chart: [chart.svg](chart.svg); every figure: [report.json](report.json).\n\n",
            self.generated_at.format("%Y-%m-%d %H:%M UTC"),
            m.cpus,
            m.cpu_model,
            m.memory_gib,
            m.kernel,
            m.postgres,
            self.command
        ));
        self.bids_section(&mut md);
        md.push_str("## Endings\n\n");
        for r in &self.runs {
            let endings: Vec<String> = r
                .bids
                .endings
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            md.push_str(&format!(
                "- **{}** bids: {}\n",
                self.label(r),
                endings.join(", ")
            ));
            let endings: Vec<String> = r
                .reads
                .endings
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            let from_memory = r.server.views_from_memory.map_or(String::new(), |share| {
                format!(
                    "; auction views answered from Gavel's cache: {:.0}%",
                    share * 100.0
                )
            });
            md.push_str(&format!(
                "- **{}** reads ({} requests, p99 {:.1} ms): {}{from_memory}\n",
                self.label(r),
                r.reads.requests,
                r.reads.ok_latency_ms.p99,
                endings.join(", ")
            ));
        }
        md.push_str(&format!("\n## Gavel and PostgreSQL during the run\n\n| mode | lock waiters (max) | blocked backends (max) | longest lock wait | API pool waiters (max) | pending bids (max) | RSS (max) | slowest disk flush | seconds with a flush over {:.0} ms |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n", disk::STALL_MS));
        for r in &self.runs {
            let s = &r.server;
            md.push_str(&format!(
                "| {} | {:.0} | {:.0} | {:.2} s | {:.0} | {:.0} | {} | {} | {} |\n",
                self.label(r),
                s.lock_waiters_max,
                s.blocked_backends_max,
                s.lock_wait_max_s,
                s.api_pool_waiting_max,
                s.pending_bids_max,
                s.rss_max_mib.map_or("-".into(), |m| format!("{m:.0} MiB")),
                r.disk
                    .map_or("-".into(), |d| format!("{:.1} ms", d.slowest_ms)),
                r.disk.map_or("-".into(), |d| format!(
                    "{} of {}",
                    d.stalled_seconds, d.seconds
                )),
            ));
        }
        if self.runs.iter().any(|r| r.disk.is_some()) {
            md.push_str("\nEvery acknowledged bid waits for a WAL flush: a slow flush of the database's disk (probed beside it, one 8 kB write and `fdatasync` every 10 ms) holds every bid committing at that moment, whatever Gavel does.\n");
        }
        if self.runs.iter().any(|r| !r.steps.is_empty()) {
            md.push_str("\n## Highest sustainable bid rate\n\n");
            for r in &self.runs {
                if r.steps.is_empty() {
                    continue;
                }
                md.push_str(&format!(
                    "**{}**: {}\n\n| offered | 2xx | errors | p99 | slowest disk flush | CPU busy | CPU stolen | sustainable |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n",
                    self.label(r),
                    r.max_sustainable_bids_per_s
                        .map_or("no step was sustainable".into(), |v| format!("{v:.0} bids/s"))
                ));
                for s in &r.steps {
                    let pct = |f: fn(&CpuWindow) -> f64| {
                        s.cpu
                            .as_ref()
                            .map_or("-".into(), |c| format!("{:.0}%", c.share_pct(f(c))))
                    };
                    md.push_str(&format!(
                        "| {:.0}/s | {} | {} | {} | {} | {} | {} | {} |\n",
                        s.rate,
                        s.window.ok,
                        s.window.errors,
                        s.window.p99_ms.map_or("-".into(), |p| format!("{p:.1} ms")),
                        s.slowest_flush_ms
                            .map_or("-".into(), |f| format!("{f:.1} ms")),
                        pct(|c| c.busy),
                        pct(|c| c.steal),
                        if s.sustainable { "yes" } else { "no" }
                    ));
                }
                md.push('\n');
            }
        }
        self.cpu_section(&mut md);
        if let Some(c) = &self.ceiling {
            md.push_str(&format!(
                "\n## Raw append ceiling\n\npgbench, {} clients, one {}-row UNNEST INSERT per transaction into a scratch copy of `bid_log` (same indexes): **{:.0} rows/s** ({:.0} transactions/s, {:.1} ms each) over {} s",
                c.clients, c.batch_rows, c.rows_per_s, c.tps, c.latency_ms, c.duration_s
            ));
            if self.ceilings.len() > 1 {
                let each: Vec<String> = self
                    .ceilings
                    .iter()
                    .map(|c| format!("{:.0}", c.rows_per_s))
                    .collect();
                md.push_str(&format!(
                    ", the median of the rounds' {} rows/s",
                    each.join(", ")
                ));
            }
            md.push_str(".\n");
        }
        self.comparison_section(&mut md);
        for r in &self.runs {
            if r.targets.is_empty() {
                continue;
            }
            md.push_str(&format!(
                "\n## Targets: {}\n\n| target | measured | met |\n| --- | --- | --- |\n",
                self.label(r)
            ));
            for t in &r.targets {
                md.push_str(&format!(
                    "| {} | {} | {} |\n",
                    t.target,
                    t.measured,
                    if t.met { "yes" } else { "**no**" }
                ));
            }
        }
        md.push_str("\n## Audit\n\n");
        for r in &self.runs {
            md.push_str(&format!(
                "**{}** ({} bids sent, {} acknowledged, {} in bid_log; settled {:.1} s after the end):\n\n",
                self.label(r), r.audit.bids_sent, r.audit.bids_acknowledged, r.audit.bids_in_log, r.audit.settle_wait_s
            ));
            for c in &r.audit.checks {
                md.push_str(&format!(
                    "- {} {}: {}\n",
                    if c.passed { "✔" } else { "✘" },
                    c.name,
                    c.detail
                ));
            }
            md.push('\n');
        }
        md
    }
}

/// One colour per run (mode, round and pass), in the order they ran.
const COLORS: [RGBColor; 12] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
    RGBColor(23, 190, 207),
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
    RGBColor(127, 127, 127),
    RGBColor(0, 0, 128),
    RGBColor(128, 0, 0),
];

impl Report {
    /// "Bids": the load's priority, each run's bid figures, and the
    /// clients' policy.
    fn bids_section(&self, md: &mut String) {
        let mut nices: Vec<i32> = self.runs.iter().map(|r| r.generator_nice).collect();
        nices.dedup();
        if let [nice] = nices[..] {
            if nice > 0 {
                md.push_str(&format!("The load generator (and pgbench) ran {nice} nice steps below Gavel and PostgreSQL, all on this machine; latency still counts from each request's intended send time.\n\n"));
            }
        } else if !nices.is_empty() {
            md.push_str("The load generator ran at different nice steps in these runs: see `generator_nice` in report.json.\n\n");
        }
        md.push_str("## Bids\n\n| mode | peak offered | bids | 2xx | errors (5xx, timeouts) | p50 | p99 | max | retries (allowed) | retries denied by budget | Retry-After over cap | resolver lag p99 | audit |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n");
        for r in &self.runs {
            let b = &r.bids;
            md.push_str(&format!(
                "| {} | {}/s | {} | {} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {} | {} | {} | {:.1} ms | {} |\n",
                self.label(r),
                r.peak_offered_bids_per_s,
                b.requests,
                b.ok,
                b.errors,
                b.ok_latency_ms.p50,
                b.ok_latency_ms.p99,
                b.ok_latency_ms.max,
                b.retries,
                b.retries_denied_by_budget,
                b.retries_over_max_wait,
                r.audit.resolver_lag_ms.p99,
                if r.audit.passed { "passed" } else { "**FAILED**" }
            ));
        }
        md.push_str("\nLatency is measured from each request's intended send time (open model), retries included, over the bids answered 2xx.\n\n");
        let mut policies: Vec<&Client> =
            self.runs.iter().filter_map(|r| r.client.as_ref()).collect();
        policies.dedup();
        match policies[..] {
            [] => {}
            [client] => md.push_str(&format!("Clients: {}.\n\n", client.policy_text())),
            _ => {
                for r in &self.runs {
                    if let Some(client) = &r.client {
                        md.push_str(&format!(
                            "Clients of **{}**: {}.\n\n",
                            self.label(r),
                            client.policy_text()
                        ));
                    }
                }
            }
        }
    }

    /// "Comparison": the ratios, as medians of the rounds when there were
    /// several, with each round's figures.
    fn comparison_section(&self, md: &mut String) {
        let (over_row_lock, of_ceiling) = self.ratios();
        if over_row_lock.is_none() && of_ceiling.is_none() {
            return;
        }
        let rounds = self.comparisons();
        let of_rounds = if rounds.len() > 1 {
            format!(" (the median of {} rounds)", rounds.len())
        } else {
            String::new()
        };
        md.push_str("\n## Comparison\n\n");
        if self.runs.iter().any(|r| r.refining) {
            md.push_str("A mode's rate in a round is the highest step that held in its ramp or in the refining pass that followed it: a second climb on a fresh database, in finer steps from just below the ramp's best to past its next step.\n\n");
        }
        if let Some(x) = over_row_lock {
            md.push_str(&format!(
                "- Log mode sustains **{x:.1}×** the bid rate of the row-lock design{of_rounds}.\n"
            ));
        }
        if let Some(x) = of_ceiling {
            md.push_str(&format!(
                "- Log mode sustains **{:.0}%** of the database's raw append ceiling{of_rounds}.\n",
                x * 100.0
            ));
        }
        if rounds.len() > 1 {
            md.push_str("\nThe modes ran in turn, round after round, so that a slow spell of the machine falls on both:\n\n| round | log | row_lock | log / row_lock | ceiling | log / ceiling |\n| ---: | ---: | ---: | ---: | ---: | ---: |\n");
            let rate =
                |v: Option<f64>, unit: &str| v.map_or("-".into(), |v| format!("{v:.0} {unit}"));
            for c in &rounds {
                md.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} |\n",
                    c.round,
                    rate(c.log, "bids/s"),
                    rate(c.row_lock, "bids/s"),
                    c.over_row_lock.map_or("-".into(), |x| format!("{x:.1}×")),
                    rate(c.ceiling, "rows/s"),
                    c.of_ceiling
                        .map_or("-".into(), |x| format!("{:.0}%", x * 100.0)),
                ));
            }
        }
    }

    /// "Where the CPU went": each mode's CPU use by process group, as a
    /// share of the machine and per accepted bid.
    fn cpu_section(&self, md: &mut String) {
        let runs: Vec<(&RunReport, &CpuBreakdown)> = self
            .runs
            .iter()
            .filter_map(|r| Some((r, r.cpu.as_ref()?)))
            .collect();
        if runs.is_empty() {
            return;
        }
        md.push_str("\n## Where the CPU went\n\nRead from `/proc` once a second; each cell is the share of the machine's cores and the CPU time per accepted bid (reads included).\n\n");
        for (r, c) in &runs {
            md.push_str(&format!(
                "- **{}**: over {} ({} s, {} accepted bids)\n",
                self.label(r),
                c.window,
                c.cpu.seconds,
                c.accepted_bids
            ));
        }
        md.push_str("\n| process |");
        for (r, _) in &runs {
            md.push_str(&format!(" {} |", self.label(r)));
        }
        md.push_str("\n| --- |");
        md.push_str(&" ---: |".repeat(runs.len()));
        md.push('\n');
        let rows: Vec<Vec<(String, f64, bool)>> = runs.iter().map(|(_, c)| c.rows()).collect();
        // Rows by name, in the first run's order, then any only others have.
        let mut names: Vec<(&str, bool)> = Vec::new();
        for (name, _, per_bid) in rows.iter().flatten() {
            if !names.iter().any(|(n, _)| n == name) {
                names.push((name, *per_bid));
            }
        }
        for (name, per_bid) in names {
            md.push_str(&format!("| {name} |"));
            for ((_, c), rows) in runs.iter().zip(&rows) {
                let cell = rows.iter().find(|(n, ..)| n == name).map_or(
                    "-".to_owned(),
                    |&(_, cores, _)| {
                        let share = format!("{:.1}%", c.cpu.share_pct(cores));
                        match c.us_per_bid(cores).filter(|_| per_bid) {
                            Some(us) => format!("{share} · {us:.0} µs"),
                            None => share,
                        }
                    },
                );
                md.push_str(&format!(" {cell} |"));
            }
            md.push('\n');
        }
    }
}

/// Throughput, latency, errors and CPU over time, one line per run.
fn chart(report: &Report, path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1200, 1450)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let root = root
        .titled(
            &format!(
                "Gavel load test: {} (x: seconds since the start)",
                report.scenario
            ),
            ("sans-serif", 22),
        )
        .map_err(plot_error)?;
    let panels = root.split_evenly((4, 1));
    let x_max = report
        .runs
        .iter()
        .map(|r| r.series.bids.len())
        .max()
        .unwrap_or(1)
        .max(1) as f64;

    // Throughput: offered (thin) and answered 2xx (thick), per second.
    let y_max = report
        .runs
        .iter()
        .flat_map(|r| r.series.bids.iter().map(|p| p.offered.max(p.completed_ok)))
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.1;
    let mut c = panel(
        &panels[0],
        "Bids per second: answered 2xx (thick), offered (thin)",
    )
    .build_cartesian_2d(0f64..x_max, 0f64..y_max)
    .map_err(plot_error)?;
    c.configure_mesh()
        .y_desc("bids/s")
        .draw()
        .map_err(plot_error)?;
    for (i, r) in report.runs.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points = |f: fn(&Point) -> u64| {
            r.series
                .bids
                .iter()
                .map(move |p| (p.t as f64, f(p) as f64))
                .collect::<Vec<_>>()
        };
        c.draw_series(LineSeries::new(
            points(|p| p.completed_ok),
            color.stroke_width(2),
        ))
        .map_err(plot_error)?
        .label(report.label(r))
        .legend(legend_line(color));
        c.draw_series(LineSeries::new(points(|p| p.offered), color.mix(0.5)))
            .map_err(plot_error)?;
    }
    draw_legend(&mut c)?;

    // Latency, log scale: p99 (thick) and p50 (thin) of bids answered 2xx.
    let lat_max = report
        .runs
        .iter()
        .flat_map(|r| {
            let bids = r.series.bids.iter().filter_map(|p| p.p99_ms);
            bids.chain(r.series.disk.iter().map(|s| s.max_ms))
        })
        .fold(10.0f64, f64::max)
        * 1.5;
    let mut c = panel(&panels[1], "Bid latency from the intended send time: p99 (thick), p50 (thin); the disk's slowest flush (x)")
        .build_cartesian_2d(0f64..x_max, (0.1f64..lat_max).log_scale())
        .map_err(plot_error)?;
    c.configure_mesh().y_desc("ms").draw().map_err(plot_error)?;
    for (i, r) in report.runs.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points = |f: fn(&Point) -> Option<f64>| {
            r.series
                .bids
                .iter()
                .filter_map(move |p| f(p).map(|v| (p.t as f64, v.max(0.1))))
                .collect::<Vec<_>>()
        };
        c.draw_series(LineSeries::new(points(|p| p.p99_ms), color.stroke_width(2)))
            .map_err(plot_error)?
            .label(report.label(r))
            .legend(legend_line(color));
        c.draw_series(LineSeries::new(points(|p| p.p50_ms), color.mix(0.6)))
            .map_err(plot_error)?;
        // Every bid waits for a flush: a slow one shows beside the spike it causes.
        let flushes = r
            .series
            .disk
            .iter()
            .enumerate()
            .filter(|(_, s)| s.flushes > 0);
        c.draw_series(
            flushes.map(|(t, s)| Cross::new((t as f64, s.max_ms.max(0.1)), 3, color.mix(0.7))),
        )
        .map_err(plot_error)?;
    }
    draw_legend(&mut c)?;

    // Errors: 5xx, timeouts and transport errors per second.
    let err_max = report
        .runs
        .iter()
        .flat_map(|r| r.series.bids.iter().map(|p| p.errors))
        .max()
        .unwrap_or(0)
        .max(1) as f64
        * 1.1;
    let mut c = panel(
        &panels[2],
        "Bid errors per second (5xx, timeouts, transport errors)",
    )
    .build_cartesian_2d(0f64..x_max, 0f64..err_max)
    .map_err(plot_error)?;
    c.configure_mesh()
        .y_desc("errors/s")
        .draw()
        .map_err(plot_error)?;
    for (i, r) in report.runs.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        c.draw_series(LineSeries::new(
            r.series.bids.iter().map(|p| (p.t as f64, p.errors as f64)),
            color.stroke_width(2),
        ))
        .map_err(plot_error)?
        .label(report.label(r))
        .legend(legend_line(color));
    }
    draw_legend(&mut c)?;

    // CPU: the machine busy and stolen, as a share of its cores.
    let mut c = panel(
        &panels[3],
        "CPU: the machine busy (thick), stolen by the hypervisor (thin), % of the cores",
    )
    .build_cartesian_2d(0f64..x_max, 0f64..105f64)
    .map_err(plot_error)?;
    c.configure_mesh()
        .x_desc("seconds")
        .y_desc("%")
        .draw()
        .map_err(plot_error)?;
    for (i, r) in report.runs.iter().enumerate() {
        let Some(cpu) = &r.series.cpu else {
            continue;
        };
        let color = COLORS[i % COLORS.len()];
        let share = |f: fn(&CpuSecond) -> f64| {
            let cores = cpu.cores.max(1) as f64;
            cpu.seconds
                .iter()
                .enumerate()
                .map(move |(t, s)| (t as f64, 100.0 * f(s) / cores))
                .collect::<Vec<_>>()
        };
        c.draw_series(LineSeries::new(share(|s| s.busy), color.stroke_width(2)))
            .map_err(plot_error)?
            .label(report.label(r))
            .legend(legend_line(color));
        c.draw_series(LineSeries::new(share(|s| s.steal), color.mix(0.6)))
            .map_err(plot_error)?;
    }
    draw_legend(&mut c)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

/// A chart panel with its caption and the margins every panel shares.
fn panel<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, plotters::coord::Shift>,
    caption: &str,
) -> ChartBuilder<'a, 'static, DB> {
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(caption, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70);
    builder
}

/// The legend's sample of a mode's line.
fn legend_line(color: RGBColor) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
}

/// Draws a panel's legend: one entry per mode.
fn draw_legend<'a, CT: CoordTranslate>(
    c: &mut ChartContext<'a, SVGBackend<'a>, CT>,
) -> anyhow::Result<()> {
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)
}

fn plot_error<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the chart: {e:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

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
        }
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
        assert_eq!(rounds[0].over_row_lock, Some(20.0));
        assert_eq!(rounds[1].over_row_lock, Some(10.0));
        assert_eq!(rounds[2].over_row_lock, None);
        assert_eq!(rounds[1].of_ceiling, Some(0.1));
        // Medians: of 20× and 10×; of 20%, 10% and 20%.
        assert_eq!(report.ratios(), (Some(15.0), Some(0.2)));
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
        assert_eq!(report.ratios(), (Some(10.0), Some(0.1)));
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
        assert_eq!(rounds[0].row_lock, Some(477.0));
        assert_eq!(rounds[1].log, Some(10_842.0));
        assert_eq!(rounds[1].row_lock, Some(596.0));
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
