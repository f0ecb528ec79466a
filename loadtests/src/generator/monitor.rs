//! Once a second during a run: a progress line, a scrape of Gavel's
//! metrics, and the judging of the steps of a rate-finding run (stopping
//! the ramp after too many failed steps in a row).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;

use super::steps::{judge_ready_steps, measure_step};
use super::{Shared, StepResult};
use crate::cpu::{CpuSeconds, CpuWindow};
use crate::record::{Kind, Point};
use crate::scenario::{Scenario, Shape};
use crate::scrape::{self, ServerSample};

/// The monitor task and what it collects.
pub(super) struct Monitor {
    task: JoinHandle<()>,
    steps: Arc<Mutex<Vec<StepResult>>>,
    server: Arc<Mutex<Vec<ServerSample>>>,
}

impl Monitor {
    /// Starts monitoring the run on this runtime, from second 1.
    pub(super) fn spawn(
        shared: &Arc<Shared>,
        scenario: &Scenario,
        duration_s: f64,
        metrics: Option<String>,
    ) -> Self {
        let steps = Arc::new(Mutex::new(Vec::new()));
        let server = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(monitor(
            shared.clone(),
            scenario.clone(),
            duration_s,
            metrics,
            steps.clone(),
            server.clone(),
        ));
        Monitor {
            task,
            steps,
            server,
        }
    }

    /// Waits for the monitor to see the run stopped; returns the steps it
    /// judged and Gavel's metrics it read.
    pub(super) async fn finish(self) -> anyhow::Result<(Vec<StepResult>, Vec<ServerSample>)> {
        self.task.await?;
        let steps = std::mem::take(&mut *self.steps.lock().expect("steps"));
        let server = std::mem::take(&mut *self.server.lock().expect("server samples"));
        Ok((steps, server))
    }
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
    let mut scraper = Scraper {
        url: metrics,
        failures: 0,
    };
    loop {
        tick.tick().await;
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let now = shared.t0.elapsed().as_secs_f64();
        let sample = scraper.scrape(&shared, now).await;
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
        if let Some(watching) = &shared.watching {
            watching.sample_open(last);
        }
        let line = progress_line(&shared, now, last, (&bids, &reads), sample.as_ref());
        eprintln!("{line}");
        if let Some(s) = sample {
            server.lock().expect("server samples").push(s);
        }
        if !judged.is_empty() {
            let mut steps = steps.lock().expect("steps");
            for mut step in judged {
                measure_step(&shared, &scenario, &mut step);
                eprintln!("{}", step_line(&step));
                steps.push(step);
            }
            stop_ramp_after_failed_steps(&shared, &scenario, &steps, now);
        }
    }
}

/// Reads Gavel's metrics, saying so the first few times it cannot.
struct Scraper {
    url: Option<String>,
    failures: u32,
}

impl Scraper {
    async fn scrape(&mut self, shared: &Shared, now: f64) -> Option<ServerSample> {
        let url = self.url.as_ref()?;
        match scrape::scrape(&shared.scraper, url, now).await {
            Ok(s) => Some(s),
            Err(e) => {
                self.failures += 1;
                if self.failures <= 3 {
                    eprintln!("  (could not read Gavel's metrics: {e})");
                }
                None
            }
        }
    }
}

/// A latency for a progress line.
fn ms(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |v| format!("{v:.1} ms"))
}

/// The last second's bids and reads, open requests, the probes' figures and
/// Gavel's own, on one line.
fn progress_line(
    shared: &Shared,
    now: f64,
    last: usize,
    (bids, reads): (&Point, &Point),
    sample: Option<&ServerSample>,
) -> String {
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
    if let Some(watching) = &shared.watching {
        let open = watching.open.load(Ordering::Acquire);
        let events = (watching.events_by_second.get(last)).map_or(0, |c| c.load(Ordering::Relaxed));
        line.push_str(&format!(" | watchers: open {open}, versions {events}/s"));
    }
    if let Some(disk) = &shared.disk {
        let flush = disk.max_ms(last, last + 1);
        line.push_str(&format!(" | disk flush max {}", ms(flush)));
    }
    // The probe's second ends at about this tick: show the last one it has.
    if let Some(cpu) = shared.cpu.as_ref().and_then(CpuSeconds::latest) {
        line.push_str(&format!(" | {}", cpu_text(&cpu)));
    }
    if let Some(s) = sample {
        line.push_str(&format!(
            " | pg lock waiters {:.0}, pending bids {:.0}",
            s.lock_waiters, s.pending_bids
        ));
        if let Some(rss) = s.rss_bytes {
            line.push_str(&format!(", rss {:.0} MiB", rss / 1_048_576.0));
        }
    }
    line
}

/// A judged step, its probes' figures and whether it held.
fn step_line(step: &StepResult) -> String {
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
    format!(
        "  step at {:.0} bids/s: p99 {}, {} errors{probed}: {}",
        step.rate,
        ms(step.window.p99_ms),
        step.window.errors,
        if step.sustainable {
            "sustainable"
        } else {
            "NOT sustainable"
        }
    )
}

/// Stops the run once the last `stop_after_failed_steps` steps all failed.
fn stop_ramp_after_failed_steps(
    shared: &Shared,
    scenario: &Scenario,
    steps: &[StepResult],
    now: f64,
) {
    let failed = steps.iter().rev().take_while(|s| !s.sustainable).count();
    if failed as u32 >= scenario.sustainable.stop_after_failed_steps {
        eprintln!("  {failed} steps in a row were not sustainable: stopping the ramp");
        shared
            .ramp_stopped_ms
            .store((now * 1000.0) as u64, Ordering::Release);
        shared.stop.store(true, Ordering::Release);
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
