//! The steps of a rate-finding run (`arrival.shape = "steps"`): each judged
//! sustainable or not once it is over, with what the probes saw during it.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Shared, StepResult};
use crate::record::{Kind, Recorder};
use crate::scenario::Scenario;

/// After the run, judges the steps the monitor had no time to. A step the
/// stop cut short is not judged: a few seconds of it say nothing of the rate.
pub(super) fn judge_the_rest(
    shared: &Shared,
    scenario: &Scenario,
    duration_s: f64,
    steps: &mut Vec<StepResult>,
) {
    let judged = steps.len();
    let stopped_ms = shared.ramp_stopped_ms.load(Ordering::Acquire);
    let until_s = duration_s.min(stopped_ms as f64 / 1000.0);
    let recorder = shared.recorder.lock().expect("recorder");
    let rest = judge_steps(&recorder, scenario, until_s, judged);
    steps.extend(rest.into_iter().map(|mut step| {
        measure_step(shared, scenario, &mut step);
        step
    }));
}

/// Fills in what the probes saw during `step`: the slowest disk flush and
/// the CPU use.
pub(super) fn measure_step(shared: &Shared, scenario: &Scenario, step: &mut StepResult) {
    let to = step.from_s + scenario.arrival.step_s.round() as usize;
    step.slowest_flush_ms = shared.disk.as_ref().and_then(|d| d.max_ms(step.from_s, to));
    step.cpu = shared.cpu.as_ref().and_then(|c| c.window(step.from_s, to));
}

/// Steps that ended at least one client timeout before `now`: by then a
/// request of the step still open has taken too long anyway.
pub(super) fn judge_ready_steps(
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
    use crate::record::{Ended, Ending};

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
