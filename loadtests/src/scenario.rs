//! Scenario files: what a load-test run offers Gavel.
//!
//! A scenario (TOML, see `loadtests/scenarios/`) names the auctions (one hot,
//! others warm), the bidder population and how it bids, the arrival-rate
//! curve of bids, the readers polling auctions, and the client's retry
//! policy. Every field is checked when the file is read, so a run never
//! starts on a scenario that cannot mean what it says.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context as _};
use serde::{Deserialize, Serialize};

/// One scenario file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name, used in report titles and file names.
    pub name: String,
    /// What the scenario replays, in a sentence or two.
    #[serde(default)]
    pub description: String,
    /// Length of the bidding phase, in seconds.
    pub duration_s: f64,
    /// Seed of every random choice (bidders, amounts, arrival times).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// The auctions bid on.
    pub auctions: Vec<AuctionGroup>,
    /// Who bids and how.
    pub bidders: Bidders,
    /// When bids arrive.
    pub arrival: Arrival,
    /// Clients polling auction views.
    #[serde(default)]
    pub readers: Readers,
    /// Clients watching auctions live (Server-Sent Events).
    #[serde(default)]
    pub watchers: Option<Watchers>,
    /// The game client's timeout and retry policy.
    #[serde(default)]
    pub client: Client,
    /// A recorded trace replayed instead of the synthetic bidders.
    #[serde(default)]
    pub trace: Option<TraceSource>,
    /// When a rate-finding run (`arrival.shape = "steps"`) stops.
    #[serde(default)]
    pub sustainable: Sustainable,
    /// What Gavel's log mode must reach in this scenario.
    #[serde(default)]
    pub targets: Option<Targets>,
    /// How many times `gavel-loadtest bench` runs every mode and the
    /// append ceiling, in turn; the comparison is the median of the rounds.
    #[serde(default = "one_round")]
    pub rounds: u32,
}

fn one_round() -> u32 {
    1
}

/// The figures a run of Gavel (log mode) is held to.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Targets {
    /// Highest p99 of 2xx bid latency, in ms.
    #[serde(default)]
    pub bid_p99_ms: Option<f64>,
    /// Highest p99 of the resolver lag (`resolved_at - received_at`), in ms.
    #[serde(default)]
    pub resolver_lag_p99_ms: Option<f64>,
    /// Highest resident memory of the Gavel process, in MiB.
    #[serde(default)]
    pub rss_mib: Option<f64>,
    /// No 5xx, timeouts or transport errors at all.
    #[serde(default = "yes")]
    pub zero_errors: bool,
    /// Highest p99 of the watchers' delay from a change's commit to its
    /// receipt, in ms; every watcher must also end on its auction's final
    /// version.
    #[serde(default)]
    pub watch_p99_ms: Option<f64>,
}

/// A group of auctions with the same terms and share of the traffic.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuctionGroup {
    /// Label of the group (`hot`, `warm`); auctions are `label`, `label-2`, ...
    pub label: String,
    /// Auctions in the group.
    #[serde(default = "one")]
    pub count: usize,
    /// Share of all bids that go to this group, split evenly among its auctions.
    pub bid_share: f64,
    /// Share of all reads that go to this group.
    #[serde(default)]
    pub read_share: Option<f64>,
    /// Starting price in minor units.
    #[serde(default = "default_starting_price")]
    pub starting_price: i64,
    /// Reserve price, if any.
    #[serde(default)]
    pub reserve_price: Option<i64>,
    /// Soft-close window in seconds (0: hard close).
    #[serde(default)]
    pub soft_close_s: u32,
    /// Longest soft-close extension past the planned end, in seconds.
    #[serde(default = "default_max_extension")]
    pub max_extension_s: u32,
    /// When the auction ends, in seconds after the bidding phase ends
    /// (0: it ends with the run, as in a final minute).
    #[serde(default)]
    pub ends_after_s: f64,
}

/// The bidder population and its strategy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bidders {
    /// Distinct bidders (each gets its own token).
    pub count: usize,
    /// A bid is `next_min_bid` plus a number of increments drawn from this range.
    #[serde(default = "default_steps")]
    pub steps: [u32; 2],
    /// Share of bids that are proxy maxima, well above the minimum.
    #[serde(default)]
    pub proxy_share: f64,
    /// Increments above `next_min_bid` of a proxy maximum.
    #[serde(default = "default_proxy_steps")]
    pub proxy_steps: [u32; 2],
}

/// The shape of the bid arrival rate over the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// `from_rate` throughout.
    Constant,
    /// A straight line from `from_rate` to `to_rate`.
    Linear,
    /// Exponential growth from `from_rate` to `to_rate`, as bidders pile in
    /// toward the close.
    Exponential,
    /// `from_rate`, then `step_rate` more (or `step_factor` times more)
    /// every `step_s`, until steps are not sustainable: finds the highest
    /// sustainable rate.
    Steps,
}

/// How inter-arrival times are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Process {
    /// Exponential gaps (a Poisson process): independent clients.
    Poisson,
    /// Even gaps.
    Uniform,
}

/// The bid arrival-rate curve (bids per second offered, whatever the
/// responses do).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Arrival {
    /// The curve's shape.
    pub shape: Shape,
    /// Rate at the start.
    pub from_rate: f64,
    /// Rate at the end of the ramp (linear, exponential).
    #[serde(default)]
    pub to_rate: Option<f64>,
    /// A final burst at this rate...
    #[serde(default)]
    pub burst_rate: Option<f64>,
    /// ...for the last this many seconds of the run.
    #[serde(default)]
    pub burst_s: f64,
    /// Length of each step (steps).
    #[serde(default = "default_step_s")]
    pub step_s: f64,
    /// Rate added per step (steps).
    #[serde(default)]
    pub step_rate: f64,
    /// Or: each step's rate is the previous one's times this (steps).
    #[serde(default)]
    pub step_factor: Option<f64>,
    /// Inter-arrival process.
    #[serde(default = "default_process")]
    pub process: Process,
}

/// Clients polling auction views, as game clients refresh their screen.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Readers {
    /// Reads per second, spread over the auctions by `read_share`.
    #[serde(default)]
    pub rate: f64,
    /// Send the last seen `ETag` in `If-None-Match`.
    #[serde(default = "yes")]
    pub if_none_match: bool,
}

impl Default for Readers {
    fn default() -> Self {
        Readers {
            rate: 0.0,
            if_none_match: true,
        }
    }
}

/// Game clients watching auctions live: each holds one event stream
/// (`GET /api/auctions/{id}/events`) with its own token, from before second
/// 0 until the auction's `end` event, resuming with `Last-Event-ID` when
/// the stream drops.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Watchers {
    /// Streams held, spread evenly over `auctions`.
    pub count: usize,
    /// Labels of the auctions watched (`hot`, `warm-2`).
    #[serde(default = "default_watched")]
    pub auctions: Vec<String>,
    /// Seconds over which the streams connect, ending before second 0.
    #[serde(default = "default_connect_ramp_s")]
    pub connect_ramp_s: f64,
    /// How long after the bidding phase a watcher waits for its auction's
    /// `end` event before it gives up.
    #[serde(default = "default_end_wait_s")]
    pub end_wait_s: f64,
}

impl Watchers {
    /// Checks every field against the auction `labels` of the run (none
    /// with a trace: its labels are known only once it is read).
    fn check(&self, labels: Option<&[String]>) -> anyhow::Result<()> {
        ensure!(
            (1..=100_000).contains(&self.count),
            "watchers.count: must be 1 to 100000"
        );
        ensure!(
            !self.auctions.is_empty(),
            "watchers.auctions: name at least one"
        );
        if let Some(labels) = labels {
            for label in &self.auctions {
                ensure!(
                    labels.contains(label),
                    "watchers.auctions: no auction '{label}' (the run has {})",
                    labels.join(", ")
                );
            }
        }
        ensure!(
            self.connect_ramp_s.is_finite() && (0.0..=600.0).contains(&self.connect_ramp_s),
            "watchers.connect_ramp_s: must be 0 to 600"
        );
        ensure!(
            self.end_wait_s.is_finite() && (1.0..=3_600.0).contains(&self.end_wait_s),
            "watchers.end_wait_s: must be 1 to 3600"
        );
        Ok(())
    }
}

fn default_watched() -> Vec<String> {
    vec!["hot".into()]
}
fn default_connect_ramp_s() -> f64 {
    5.0
}
fn default_end_wait_s() -> f64 {
    60.0
}

/// The game client's timeout and retry policy (see [`crate::retry`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Client {
    /// A request with no answer after this long is abandoned (and retried).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Attempts per bid, the first included; retries reuse the Idempotency-Key.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Backoff before a retry the server named no wait for: retry `k`
    /// waits a random time in `[d/2, d]`, `d = backoff_base_ms × 2^(k-1)`...
    #[serde(default = "default_backoff_base")]
    pub backoff_base_ms: u64,
    /// ...at most this.
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
    /// The longest wait before a retry. A `Retry-After` (honoured, plus
    /// jitter) longer than this ends the bid with that answer instead.
    #[serde(default = "default_max_retry_wait")]
    pub max_retry_wait_ms: u64,
    /// Retries at most this percentage of the bids' first attempts over
    /// the last `retry_budget_window_s`...
    #[serde(default = "default_retry_budget_pct")]
    pub retry_budget_pct: u32,
    /// ...plus this many per second of the window.
    #[serde(default = "default_retry_budget_min_per_s")]
    pub retry_budget_min_per_s: u32,
    /// The retry budget's sliding window, in seconds.
    #[serde(default = "default_retry_budget_window_s")]
    pub retry_budget_window_s: u32,
    /// Requests the generator keeps open at once; beyond it, requests wait
    /// for a slot (their latency still counts from the intended send time).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// The former `backoff_ms = [low, high]`: read only to name what
    /// replaced it.
    #[serde(default, rename = "backoff_ms", skip_serializing)]
    former_backoff_ms: Option<serde::de::IgnoredAny>,
}

impl Default for Client {
    fn default() -> Self {
        Client {
            timeout_ms: default_timeout_ms(),
            max_attempts: default_attempts(),
            backoff_base_ms: default_backoff_base(),
            backoff_max_ms: default_backoff_max(),
            max_retry_wait_ms: default_max_retry_wait(),
            retry_budget_pct: default_retry_budget_pct(),
            retry_budget_min_per_s: default_retry_budget_min_per_s(),
            retry_budget_window_s: default_retry_budget_window_s(),
            max_in_flight: default_max_in_flight(),
            former_backoff_ms: None,
        }
    }
}

impl Client {
    /// Checks every field; the message names the one that is wrong.
    pub fn check(&self) -> anyhow::Result<()> {
        ensure!(
            self.former_backoff_ms.is_none(),
            "client.backoff_ms: replaced by backoff_base_ms (retry k waits [d/2, d], \
             d = backoff_base_ms x 2^(k-1)) and backoff_max_ms (the cap of d)"
        );
        ensure!(
            (10..=120_000).contains(&self.timeout_ms),
            "client.timeout_ms: must be 10 to 120000"
        );
        ensure!(
            (1..=10).contains(&self.max_attempts),
            "client.max_attempts: must be 1 to 10"
        );
        ensure!(
            (1..=60_000).contains(&self.backoff_base_ms),
            "client.backoff_base_ms: must be 1 to 60000"
        );
        ensure!(
            (self.backoff_base_ms..=60_000).contains(&self.backoff_max_ms),
            "client.backoff_max_ms: must be backoff_base_ms to 60000"
        );
        ensure!(
            (self.backoff_max_ms..=600_000).contains(&self.max_retry_wait_ms),
            "client.max_retry_wait_ms: must be backoff_max_ms to 600000"
        );
        ensure!(
            self.retry_budget_pct <= 1_000,
            "client.retry_budget_pct: must be 0 to 1000"
        );
        ensure!(
            self.retry_budget_min_per_s <= 1_000_000,
            "client.retry_budget_min_per_s: must be 0 to 1000000"
        );
        ensure!(
            (1..=600).contains(&self.retry_budget_window_s),
            "client.retry_budget_window_s: must be 1 to 600"
        );
        ensure!(
            (1..=100_000).contains(&self.max_in_flight),
            "client.max_in_flight: must be 1 to 100000"
        );
        Ok(())
    }

    /// The policy in one line, for reports.
    pub fn policy_text(&self) -> String {
        format!(
            "timeout {} ms; up to {} attempts per bid (same Idempotency-Key), reads not retried; \
             backoff without Retry-After: random in [d/2, d], d = {} ms doubling per retry, at most {} ms; \
             Retry-After on a 503 or 429 honoured, plus up to {:.0}% jitter, up to {} ms (longer: no retry); \
             retry budget {}% of first attempts over {} s plus {}/s, shared by the simulated clients; \
             at most {} requests open",
            self.timeout_ms,
            self.max_attempts,
            self.backoff_base_ms,
            self.backoff_max_ms,
            crate::retry::RETRY_AFTER_JITTER * 100.0,
            self.max_retry_wait_ms,
            self.retry_budget_pct,
            self.retry_budget_window_s,
            self.retry_budget_min_per_s,
            self.max_in_flight,
        )
    }
}

/// A recorded trace: `offset_ms,auction,bidder,amount` rows.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceSource {
    /// CSV file, relative to the scenario file.
    pub file: PathBuf,
    /// Replay speed: 2.0 plays the trace twice as fast.
    #[serde(default = "one_f64")]
    pub speed: f64,
}

/// What counts as sustainable in a rate-finding run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sustainable {
    /// Highest acceptable p99 of bid latency, in ms.
    #[serde(default = "default_sustainable_p99")]
    pub p99_ms: f64,
    /// Failed steps in a row after which the run stops.
    #[serde(default = "default_failed_steps")]
    pub stop_after_failed_steps: u32,
    /// After the ramp, `gavel-loadtest bench` climbs again on a fresh
    /// database from just below the ramp's highest sustainable step, in
    /// steps of this factor (finer than `arrival.step_factor`): the rate is
    /// then known to within this factor rather than the ramp's.
    #[serde(default)]
    pub refine_factor: Option<f64>,
}

impl Default for Sustainable {
    fn default() -> Self {
        Sustainable {
            p99_ms: default_sustainable_p99(),
            stop_after_failed_steps: default_failed_steps(),
            refine_factor: None,
        }
    }
}

/// Steps a refining pass starts below the ramp's highest sustainable rate,
/// so that Gavel and the database warm up before the rates that matter.
pub const REFINE_STEPS_BELOW: u32 = 2;

fn default_seed() -> u64 {
    1
}
fn one() -> usize {
    1
}
fn one_f64() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn default_starting_price() -> i64 {
    1_000
}
fn default_max_extension() -> u32 {
    600
}
fn default_steps() -> [u32; 2] {
    [0, 3]
}
fn default_proxy_steps() -> [u32; 2] {
    [10, 50]
}
fn default_step_s() -> f64 {
    10.0
}
fn default_process() -> Process {
    Process::Poisson
}
fn default_timeout_ms() -> u64 {
    2_000
}
fn default_attempts() -> u32 {
    3
}
fn default_backoff_base() -> u64 {
    200
}
fn default_backoff_max() -> u64 {
    2_000
}
fn default_max_retry_wait() -> u64 {
    10_000
}
fn default_retry_budget_pct() -> u32 {
    20
}
fn default_retry_budget_min_per_s() -> u32 {
    10
}
fn default_retry_budget_window_s() -> u32 {
    10
}
fn default_max_in_flight() -> usize {
    4_096
}
fn default_sustainable_p99() -> f64 {
    100.0
}
fn default_failed_steps() -> u32 {
    2
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the scenario {}", path.display()))?;
        let mut scenario: Scenario =
            toml::from_str(&text).with_context(|| format!("in the scenario {}", path.display()))?;
        if let Some(trace) = &mut scenario.trace {
            if trace.file.is_relative() {
                let base = path.parent().unwrap_or(Path::new("."));
                trace.file = base.join(&trace.file);
            }
        }
        scenario
            .check()
            .with_context(|| format!("in the scenario {}", path.display()))?;
        Ok(scenario)
    }

    /// Checks every field; the message names the one that is wrong.
    pub fn check(&self) -> anyhow::Result<()> {
        ensure!(!self.name.trim().is_empty(), "name: must not be empty");
        ensure!(
            self.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "name: use letters, digits, '-' and '_' (it names report files)"
        );
        ensure!(
            self.duration_s.is_finite() && self.duration_s > 0.0 && self.duration_s <= 3_600.0,
            "duration_s: must be more than 0 and at most 3600"
        );
        self.check_auctions()?;
        self.check_bidders()?;
        self.arrival.check(self.duration_s)?;
        ensure!(
            self.readers.rate.is_finite() && (0.0..=100_000.0).contains(&self.readers.rate),
            "readers.rate: must be 0 to 100000"
        );
        self.client.check()?;
        if let Some(watchers) = &self.watchers {
            let labels = self.trace.is_none().then(|| self.auction_labels());
            watchers.check(labels.as_deref())?;
        }
        if let Some(trace) = &self.trace {
            ensure!(
                trace.speed.is_finite() && trace.speed > 0.0 && trace.speed <= 1_000.0,
                "trace.speed: must be more than 0 and at most 1000"
            );
        }
        self.check_sustainable()
    }

    /// The labels of the synthetic run's auctions, in order: each group's
    /// label, then `label-2`, `label-3`, ...
    pub fn auction_labels(&self) -> Vec<String> {
        (self.auctions.iter())
            .flat_map(|group| {
                (0..group.count).map(move |i| match i {
                    0 => group.label.clone(),
                    _ => format!("{}-{}", group.label, i + 1),
                })
            })
            .collect()
    }

    /// `[[auctions]]`: each group, their labels unique, and (without a
    /// trace) their bid shares adding up to 1.
    fn check_auctions(&self) -> anyhow::Result<()> {
        ensure!(!self.auctions.is_empty(), "auctions: name at least one");
        let mut labels = std::collections::HashSet::new();
        for (i, group) in self.auctions.iter().enumerate() {
            let at = format!("auctions[{i}]");
            group.check_label(&at)?;
            ensure!(
                labels.insert(&group.label),
                "{at}.label: '{}' is used twice",
                group.label
            );
            group.check_terms(&at)?;
        }
        if self.trace.is_none() {
            let total: f64 = self.auctions.iter().map(|g| g.bid_share).sum();
            ensure!(
                (total - 1.0).abs() < 1e-6,
                "auctions: bid_share must add up to 1 (it adds up to {total})"
            );
        }
        Ok(())
    }

    /// `[bidders]`.
    fn check_bidders(&self) -> anyhow::Result<()> {
        ensure!(
            (1..=1_000_000).contains(&self.bidders.count),
            "bidders.count: must be 1 to 1000000"
        );
        ensure!(
            ordered(self.bidders.steps),
            "bidders.steps: [low, high] with low <= high"
        );
        ensure!(
            ordered(self.bidders.proxy_steps),
            "bidders.proxy_steps: [low, high] with low <= high"
        );
        ensure!(
            share(self.bidders.proxy_share),
            "bidders.proxy_share: must be 0 to 1"
        );
        Ok(())
    }

    /// `[sustainable]`: the bound, and a refining factor finer than the
    /// ramp's own.
    fn check_sustainable(&self) -> anyhow::Result<()> {
        ensure!(
            self.sustainable.p99_ms > 0.0,
            "sustainable.p99_ms: must be more than 0"
        );
        if let Some(fine) = self.sustainable.refine_factor {
            let coarse = self
                .arrival
                .step_factor
                .filter(|_| self.arrival.shape == Shape::Steps);
            let Some(coarse) = coarse else {
                bail!("sustainable.refine_factor: refines a ramp of steps with a step_factor only");
            };
            ensure!(
                fine.is_finite() && fine > 1.0 && fine < coarse,
                "sustainable.refine_factor: must be more than 1 and less than arrival.step_factor ({coarse})"
            );
        }
        Ok(())
    }

    /// The refining pass that follows a ramp whose highest sustainable step
    /// offered `best` bids/s, or `None` when the scenario asks for none:
    /// the same scenario, climbing in steps of `sustainable.refine_factor`
    /// from [`REFINE_STEPS_BELOW`] such steps under `best` to one ramp step
    /// above it and one step more, and stopping as the ramp does.
    pub fn refined(&self, best: f64) -> Option<Scenario> {
        let fine = self.sustainable.refine_factor?;
        let coarse = self.arrival.step_factor?;
        let mut refining = self.clone();
        refining.arrival.from_rate = best / fine.powi(REFINE_STEPS_BELOW as i32);
        refining.arrival.step_factor = Some(fine);
        let above = (coarse.ln() / fine.ln()).ceil() + 1.0;
        refining.duration_s =
            (f64::from(REFINE_STEPS_BELOW) + 1.0 + above) * refining.arrival.step_s;
        refining.sustainable.refine_factor = None;
        Some(refining)
    }

    /// The same scenario with every rate multiplied by `factor` and the
    /// bidding phase cut to `duration_s` (for short smoke runs).
    pub fn scaled(mut self, factor: f64, duration_s: Option<f64>) -> anyhow::Result<Scenario> {
        ensure!(
            factor.is_finite() && factor > 0.0,
            "--rate-scale: must be more than 0"
        );
        let a = &mut self.arrival;
        a.from_rate *= factor;
        a.to_rate = a.to_rate.map(|r| r * factor);
        a.burst_rate = a.burst_rate.map(|r| r * factor);
        a.step_rate *= factor;
        self.readers.rate *= factor;
        if let Some(duration) = duration_s {
            let scale = duration / self.duration_s;
            self.duration_s = duration;
            a.burst_s = (a.burst_s * scale).min(duration);
            a.step_s = (a.step_s * scale).max(1.0);
        }
        self.check()?;
        Ok(self)
    }
}

impl AuctionGroup {
    /// The group's label; `at` names it in the message (`auctions[0]`).
    fn check_label(&self, at: &str) -> anyhow::Result<()> {
        ensure!(
            !self.label.is_empty()
                && self
                    .label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "{at}.label: use letters, digits and '-'"
        );
        Ok(())
    }

    /// The group's count, shares, prices and end.
    fn check_terms(&self, at: &str) -> anyhow::Result<()> {
        ensure!(
            (1..=10_000).contains(&self.count),
            "{at}.count: must be 1 to 10000"
        );
        ensure!(share(self.bid_share), "{at}.bid_share: must be 0 to 1");
        if let Some(read_share) = self.read_share {
            ensure!(share(read_share), "{at}.read_share: must be 0 to 1");
        }
        ensure!(
            (1..=gavel::domain::MAX_AMOUNT).contains(&self.starting_price),
            "{at}.starting_price: must be 1 to 10^15"
        );
        if let Some(reserve) = self.reserve_price {
            ensure!(
                reserve >= self.starting_price && reserve <= gavel::domain::MAX_AMOUNT,
                "{at}.reserve_price: must be at least starting_price"
            );
        }
        ensure!(
            self.ends_after_s.is_finite() && (0.0..=86_400.0).contains(&self.ends_after_s),
            "{at}.ends_after_s: must be 0 to 86400"
        );
        Ok(())
    }
}

impl Arrival {
    fn check(&self, duration_s: f64) -> anyhow::Result<()> {
        let rate = |r: f64| r.is_finite() && (0.0..=1_000_000.0).contains(&r);
        ensure!(
            rate(self.from_rate),
            "arrival.from_rate: must be 0 to 1000000"
        );
        match self.shape {
            Shape::Linear | Shape::Exponential => {
                let Some(to) = self.to_rate else {
                    bail!("arrival.to_rate: required for a {:?} ramp", self.shape);
                };
                ensure!(rate(to), "arrival.to_rate: must be 0 to 1000000");
                if self.shape == Shape::Exponential {
                    ensure!(
                        self.from_rate > 0.0 && to > 0.0,
                        "arrival: an exponential ramp needs from_rate and to_rate above 0"
                    );
                }
            }
            Shape::Steps => {
                ensure!(
                    self.step_s.is_finite() && self.step_s >= 1.0,
                    "arrival.step_s: must be at least 1"
                );
                match self.step_factor {
                    Some(factor) => ensure!(
                        factor.is_finite() && factor > 1.0 && factor <= 10.0,
                        "arrival.step_factor: must be more than 1 and at most 10"
                    ),
                    None => ensure!(
                        rate(self.step_rate) && self.step_rate > 0.0,
                        "arrival.step_rate: must be more than 0 (or set step_factor)"
                    ),
                }
                ensure!(
                    self.from_rate > 0.0,
                    "arrival.from_rate: a ramp of steps starts above 0"
                );
            }
            Shape::Constant => {}
        }
        if let Some(burst) = self.burst_rate {
            ensure!(rate(burst), "arrival.burst_rate: must be 0 to 1000000");
            ensure!(
                self.burst_s > 0.0 && self.burst_s <= duration_s,
                "arrival.burst_s: must be more than 0 and at most duration_s"
            );
        }
        Ok(())
    }

    /// Bids per second offered `t` seconds into a run of `duration_s`.
    pub fn rate_at(&self, t: f64, duration_s: f64) -> f64 {
        if let Some(burst) = self.burst_rate {
            if t >= duration_s - self.burst_s {
                return burst;
            }
        }
        let ramp = duration_s - self.burst_rate.map_or(0.0, |_| self.burst_s);
        let x = if ramp > 0.0 {
            (t / ramp).clamp(0.0, 1.0)
        } else {
            1.0
        };
        let to = self.to_rate.unwrap_or(self.from_rate);
        match self.shape {
            Shape::Constant => self.from_rate,
            Shape::Linear => self.from_rate + (to - self.from_rate) * x,
            Shape::Exponential => self.from_rate * (to / self.from_rate).powf(x),
            Shape::Steps => self.step_rate_at(self.step_of(t)),
        }
    }

    /// The step (0, 1, ...) that `t` falls in, for a steps curve.
    pub fn step_of(&self, t: f64) -> usize {
        (t / self.step_s).floor().max(0.0) as usize
    }

    /// The offered rate of step `step`.
    pub fn step_rate_at(&self, step: usize) -> f64 {
        match self.step_factor {
            Some(factor) => self.from_rate * factor.powi(step as i32),
            None => self.from_rate + self.step_rate * step as f64,
        }
    }
}

fn share(x: f64) -> bool {
    x.is_finite() && (0.0..=1.0).contains(&x)
}

fn ordered(range: [u32; 2]) -> bool {
    range[0] <= range[1] && range[1] <= 10_000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> String {
        r#"
            name = "t"
            duration_s = 60
            [[auctions]]
            label = "hot"
            bid_share = 1.0
            [bidders]
            count = 10
            [arrival]
            shape = "exponential"
            from_rate = 100
            to_rate = 1000
            burst_rate = 2000
            burst_s = 10
        "#
        .to_owned()
    }

    #[test]
    fn every_shipped_scenario_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Scenario::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                seen += 1;
            }
        }
        assert!(
            seen >= 3,
            "expected the shipped scenarios in {}",
            dir.display()
        );
    }

    #[test]
    fn an_exponential_ramp_grows_into_the_close_then_bursts() {
        let scenario: Scenario = toml::from_str(&minimal()).unwrap();
        scenario.check().unwrap();
        let a = &scenario.arrival;
        assert!((a.rate_at(0.0, 60.0) - 100.0).abs() < 1e-9);
        // Halfway up an exponential ramp is the geometric mean.
        assert!((a.rate_at(25.0, 60.0) - (100.0f64 * 1000.0).sqrt()).abs() < 1e-6);
        assert!((a.rate_at(49.999, 60.0) - 1000.0).abs() < 1.0);
        assert_eq!(a.rate_at(50.0, 60.0), 2000.0);
        assert_eq!(a.rate_at(59.9, 60.0), 2000.0);
    }

    #[test]
    fn a_wrong_field_is_named() {
        let bad = minimal().replace("bid_share = 1.0", "bid_share = 0.5");
        let scenario: Scenario = toml::from_str(&bad).unwrap();
        let e = scenario.check().unwrap_err().to_string();
        assert!(e.contains("bid_share must add up to 1"), "{e}");

        let bad = minimal().replace("to_rate = 1000", "");
        let scenario: Scenario = toml::from_str(&bad).unwrap();
        let e = scenario.check().unwrap_err().to_string();
        assert!(e.contains("arrival.to_rate"), "{e}");

        let watching = |auctions: &str| {
            let text = format!(
                "{}\n[watchers]\ncount = 5\nauctions = {auctions}\n",
                minimal()
            );
            toml::from_str::<Scenario>(&text).unwrap().check()
        };
        watching(r#"["hot"]"#).unwrap();
        let e = watching(r#"["hot-2"]"#).unwrap_err().to_string();
        assert!(e.contains("watchers.auctions: no auction 'hot-2'"), "{e}");

        let unknown = minimal().replace("count = 10", "count = 10\nspeed = 3");
        let e = toml::from_str::<Scenario>(&unknown)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `speed`"), "{e}");
    }

    #[test]
    fn the_client_policy_has_defaults_and_the_former_backoff_is_named_with_its_replacement() {
        let scenario: Scenario = toml::from_str(&minimal()).unwrap();
        let c = &scenario.client;
        assert_eq!(
            (c.backoff_base_ms, c.backoff_max_ms, c.max_retry_wait_ms),
            (200, 2_000, 10_000)
        );
        assert_eq!(
            (
                c.retry_budget_pct,
                c.retry_budget_min_per_s,
                c.retry_budget_window_s
            ),
            (20, 10, 10)
        );
        let text = c.policy_text();
        assert!(
            text.contains("up to 10000 ms") && text.contains("retry budget 20%"),
            "{text}"
        );

        let with = |client: &str| format!("{}\n[client]\n{client}\n", minimal());
        let former: Scenario = toml::from_str(&with("backoff_ms = [50, 1000]")).unwrap();
        let e = former.check().unwrap_err().to_string();
        assert!(
            e.contains("client.backoff_ms: replaced by backoff_base_ms")
                && e.contains("backoff_max_ms"),
            "{e}"
        );
        let e = toml::from_str::<Scenario>(&with("backoff_min_ms = 5"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `backoff_min_ms`"), "{e}");
        for (client, message) in [
            (
                "backoff_base_ms = 500\nbackoff_max_ms = 100",
                "client.backoff_max_ms",
            ),
            (
                "backoff_max_ms = 20000",
                "client.max_retry_wait_ms: must be backoff_max_ms",
            ),
            ("retry_budget_pct = 1001", "client.retry_budget_pct"),
            ("retry_budget_window_s = 0", "client.retry_budget_window_s"),
        ] {
            let scenario: Scenario = toml::from_str(&with(client)).unwrap();
            let e = scenario.check().unwrap_err().to_string();
            assert!(e.contains(message), "{client}: {e}");
        }
    }

    #[test]
    fn scaling_multiplies_every_rate_and_shortens_the_phases() {
        let scenario: Scenario = toml::from_str(&minimal()).unwrap();
        let small = scenario.scaled(0.1, Some(6.0)).unwrap();
        assert_eq!(small.duration_s, 6.0);
        assert!((small.arrival.from_rate - 10.0).abs() < 1e-9);
        assert_eq!(small.arrival.burst_rate, Some(200.0));
        assert!((small.arrival.burst_s - 1.0).abs() < 1e-9);
    }

    /// [`minimal`] with a ramp of 25% steps instead of its arrival curve.
    fn ramp(refine: &str) -> String {
        let minimal = minimal();
        let (head, _) = minimal.split_once("[arrival]").unwrap();
        format!(
            "{head}[arrival]\nshape = \"steps\"\nfrom_rate = 100\nstep_factor = 1.25\nstep_s = 10\n\
             [sustainable]\n{refine}\n"
        )
    }

    #[test]
    fn a_refining_pass_climbs_in_fine_steps_through_the_ramps_best_to_past_its_next_step() {
        let scenario: Scenario = toml::from_str(&ramp("refine_factor = 1.05")).unwrap();
        scenario.check().unwrap();
        let refining = scenario.refined(4_441.0).unwrap();
        refining.check().unwrap();
        let a = &refining.arrival;
        let rates: Vec<f64> = (0..(refining.duration_s / a.step_s) as usize)
            .map(|k| a.step_rate_at(k))
            .collect();
        // Two steps below the best, the best itself, then 5% steps to
        // beyond the ramp's next step (4,441 x 1.25 = 5,551).
        assert_eq!(rates.len(), 9, "{rates:?}");
        assert!((rates[0] - 4_441.0 / 1.05 / 1.05).abs() < 1e-6, "{rates:?}");
        assert!((rates[2] - 4_441.0).abs() < 1e-6, "{rates:?}");
        assert!((rates[3] - 4_441.0 * 1.05).abs() < 1e-6, "{rates:?}");
        assert!(rates[7] > 4_441.0 * 1.25, "{rates:?}");
        for pair in rates.windows(2) {
            assert!((pair[1] / pair[0] - 1.05).abs() < 1e-9, "{rates:?}");
        }
        assert_eq!(a.step_s, 10.0);
        // A refining pass is not refined again.
        assert!(refining.refined(5_000.0).is_none());
        // Without the setting there is none.
        let plain: Scenario = toml::from_str(&ramp("")).unwrap();
        assert!(plain.refined(4_441.0).is_none());
    }

    #[test]
    fn a_refine_factor_must_be_finer_than_the_ramp_it_refines() {
        for (refine, message) in [
            ("refine_factor = 1.25", "less than arrival.step_factor"),
            ("refine_factor = 1.0", "more than 1"),
        ] {
            let scenario: Scenario = toml::from_str(&ramp(refine)).unwrap();
            let e = scenario.check().unwrap_err().to_string();
            assert!(
                e.contains("sustainable.refine_factor") && e.contains(message),
                "{e}"
            );
        }
        let mut exponential: Scenario = toml::from_str(&minimal()).unwrap();
        exponential.sustainable.refine_factor = Some(1.05);
        let e = exponential.check().unwrap_err().to_string();
        assert!(e.contains("a ramp of steps with a step_factor"), "{e}");
    }
}
