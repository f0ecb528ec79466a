//! What a bid costs the machine, against two floors measured in the same
//! bench: the database's raw append (the ceiling's CPU per row) and an HTTP
//! endpoint with nothing behind it (the `floor` mode's CPU per request).
//! Both compare CPU time, not rates, so they say how much work a bid is,
//! whatever else shared the machine.

use serde::{Deserialize, Serialize};

use super::{median, CpuBreakdown, Report, RunReport};
use crate::cpu::CpuWindow;

/// The CPU group of Gavel's own process.
pub const GAVEL: &str = "Gavel";
/// The CPU group of the HTTP floor's process ([`crate::floor`]).
pub const FLOOR: &str = "HTTP floor";
/// The mode that runs a scenario against the HTTP floor.
pub const FLOOR_MODE: &str = "floor";

/// Log mode's CPU per accepted bid (Gavel and PostgreSQL: the primary's
/// backends and own processes, the replica) over the ceiling's CPU per row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Efficiency {
    /// The round.
    pub round: u32,
    /// The run measured (its label in the report).
    pub run: String,
    /// Over which part of it: its highest held step, or the whole run.
    pub window: String,
    /// Gavel's and PostgreSQL's CPU per accepted bid, in µs.
    pub service_us_per_bid: f64,
    /// PostgreSQL's and pgbench's CPU per row of the round's append
    /// ceiling, in µs.
    pub ceiling_us_per_row: f64,
    /// Whether the ceiling's CPU was measured; else every core of the
    /// machine is counted as busy while pgbench ran.
    pub ceiling_cpu_measured: bool,
    /// `service_us_per_bid / ceiling_us_per_row`.
    pub ratio: f64,
}

/// Gavel's own CPU per request against the HTTP floor's, in one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FloorCost {
    /// The round.
    pub round: u32,
    /// Log mode's run and the part of it measured.
    pub gavel_window: String,
    /// Gavel's own CPU per request answered (bids and reads), in µs.
    pub gavel_us_per_request: f64,
    /// The floor's run and the part of it measured.
    pub floor_window: String,
    /// The floor's CPU per request answered, in µs.
    pub floor_us_per_request: f64,
    /// `gavel_us_per_request / floor_us_per_request`.
    pub ratio: f64,
}

/// Gavel's and PostgreSQL's cores in `cpu` (none for Gavel when it ran
/// inside the generator's process).
pub(super) fn service_cores(cpu: &CpuWindow) -> (Option<f64>, Option<f64>) {
    let gavel = group_cores(cpu, GAVEL);
    let postgres = (cpu.groups.iter())
        .filter(|(n, _)| n.starts_with("PostgreSQL"))
        .map(|(_, c)| *c)
        .sum();
    (gavel, Some(postgres))
}

fn group_cores(cpu: &CpuWindow, group: &str) -> Option<f64> {
    (cpu.groups.iter())
        .find(|(n, _)| n == group)
        .map(|(_, c)| *c)
}

impl Report {
    /// The run of `mode` in `round` whose CPU stands for it: the one with
    /// the highest step held (ramp or refining pass), else the first.
    fn costed_run(&self, mode: &str, round: u32) -> Option<(&RunReport, &CpuBreakdown)> {
        let rate = |r: &RunReport| r.max_sustainable_bids_per_s.unwrap_or(-1.0);
        (self.runs.iter())
            .filter(|r| r.mode == mode && r.round == round)
            .filter_map(|r| Some((r, r.cpu.as_ref()?)))
            .reduce(|best, next| {
                if rate(next.0) > rate(best.0) {
                    next
                } else {
                    best
                }
            })
    }

    /// The machine's CPU per row of `round`'s append ceiling, in µs, and
    /// whether it was measured.
    fn ceiling_us_per_row(&self, round: u32) -> Option<(f64, bool)> {
        let ceiling = (self.ceilings.iter().chain(&self.ceiling)).find(|c| c.round == round)?;
        let cores = ceiling.cpu_cores.unwrap_or(self.machine.cpus as f64);
        (ceiling.rows_per_s > 0.0 && cores > 0.0).then(|| {
            (
                cores * 1e6 / ceiling.rows_per_s,
                ceiling.cpu_cores.is_some(),
            )
        })
    }

    /// Each round's efficiency, where log mode's CPU (Gavel in a process
    /// of its own) and the round's ceiling were both measured.
    pub fn efficiencies(&self) -> Vec<Efficiency> {
        (1..=self.rounds())
            .filter_map(|round| {
                let (run, cpu) = self.costed_run("log", round)?;
                let (gavel, postgres) = service_cores(&cpu.cpu);
                let service_us_per_bid = cpu.us_per_bid(gavel? + postgres?)?;
                let (ceiling_us_per_row, measured) = self.ceiling_us_per_row(round)?;
                Some(Efficiency {
                    round,
                    run: self.label(run),
                    window: cpu.window.clone(),
                    service_us_per_bid,
                    ceiling_us_per_row,
                    ceiling_cpu_measured: measured,
                    ratio: service_us_per_bid / ceiling_us_per_row,
                })
            })
            .collect()
    }

    /// Each round's Gavel against the HTTP floor, where both ran in
    /// processes of their own and counted the requests they answered.
    pub fn floor_costs(&self) -> Vec<FloorCost> {
        let per_request = |mode: &str, round: u32, group: &str| {
            let (run, cpu) = self.costed_run(mode, round)?;
            let us = cpu.us_per_request(group_cores(&cpu.cpu, group)?)?;
            Some((format!("{}, over {}", self.label(run), cpu.window), us))
        };
        (1..=self.rounds())
            .filter_map(|round| {
                let (gavel_window, gavel) = per_request("log", round, GAVEL)?;
                let (floor_window, floor) = per_request(FLOOR_MODE, round, FLOOR)?;
                Some(FloorCost {
                    round,
                    gavel_window,
                    gavel_us_per_request: gavel,
                    floor_window,
                    floor_us_per_request: floor,
                    ratio: gavel / floor,
                })
            })
            .collect()
    }

    /// The medians over the rounds of the efficiency ratio and of Gavel
    /// over the HTTP floor.
    pub fn cost_ratios(&self) -> (Option<f64>, Option<f64>) {
        (
            median(self.efficiencies().iter().map(|e| e.ratio).collect()),
            median(self.floor_costs().iter().map(|f| f.ratio).collect()),
        )
    }
}

impl CpuBreakdown {
    /// CPU time per request answered (bids 2xx, reads 200 or 304), in µs,
    /// of `cores` on average; none in reports that did not count them.
    pub fn us_per_request(&self, cores: f64) -> Option<f64> {
        let requests = self.requests.filter(|&n| n > 0)?;
        Some(cores * self.cpu.seconds as f64 * 1e6 / requests as f64)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::report::Ceiling;

    fn testdata() -> Report {
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/report/testdata");
        Report::load_combined(&data.join("report.json"))
            .unwrap()
            .expect("a combined report")
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6 * b.abs().max(1.0)
    }

    /// On the fixed report: Gavel 0.534 + primary backends 0.714 + its own
    /// processes 0.059 + replica 0.277 cores over 10 s and 83,627 bids
    /// is 189.4 µs a bid; 2 cores over 82,365 rows/s is 24.3 µs a row.
    #[test]
    fn efficiency_is_log_modes_service_cpu_per_bid_over_the_ceilings_per_row() {
        let report = testdata();
        let rounds = report.efficiencies();
        assert_eq!(rounds.len(), 2);
        let [first, second] = [&rounds[0], &rounds[1]];
        assert_eq!((first.run.as_str(), first.round), ("log #1", 1));
        assert!(close(first.service_us_per_bid, 189.413_774_888_780_6));
        assert!(close(first.ceiling_us_per_row, 2e6 / 82_364.565_2));
        assert!(close(first.ratio, 7.800_491_605_802_548));
        assert!(!first.ceiling_cpu_measured, "every core is assumed");
        // Round 2's rate came from its refining pass: its CPU stands for it.
        assert_eq!(second.run, "log #2 refining");
        assert!(close(second.ratio, 7.154_359_778_266_906));
        let (of_ceiling, of_floor) = report.cost_ratios();
        assert!(close(
            of_ceiling.unwrap(),
            (7.800_491_605_802_548 + 7.154_359_778_266_906) / 2.0
        ));
        assert_eq!(of_floor, None, "no floor ran");
        // report.json files what the runs give.
        assert_eq!(report.efficiency, rounds);
    }

    #[test]
    fn a_measured_ceiling_counts_its_cores_and_gavel_in_process_has_no_ratio() {
        let mut report = testdata();
        report.ceilings[0].cpu_cores = Some(1.5);
        let first = &report.efficiencies()[0];
        assert!(first.ceiling_cpu_measured);
        assert!(close(first.ceiling_us_per_row, 1.5e6 / 82_364.565_2));
        // Gavel inside the generator's process: its CPU is not its own.
        for run in &mut report.runs {
            if let Some(cpu) = &mut run.cpu {
                cpu.cpu.groups.retain(|(name, _)| name != GAVEL);
            }
        }
        assert!(report.efficiencies().is_empty());
        report.ceilings = vec![Ceiling::default()];
        report.ceiling = None;
        assert!(report.floor_costs().is_empty());
    }

    fn costed(mode: &str, rate: f64, group: &str, cores: f64, requests: u64) -> RunReport {
        RunReport {
            mode: mode.into(),
            round: 1,
            max_sustainable_bids_per_s: Some(rate),
            cpu: Some(CpuBreakdown {
                window: format!("the step at {rate:.0} bids/s"),
                accepted_bids: requests - 1_000,
                requests: Some(requests),
                cpu: CpuWindow {
                    seconds: 10,
                    cores: 2,
                    groups: vec![(group.into(), cores)],
                    ..CpuWindow::default()
                },
            }),
            ..RunReport::default()
        }
    }

    #[test]
    fn gavel_is_compared_with_the_floor_per_request_at_each_ones_highest_step() {
        let mut report = testdata();
        report.runs = vec![
            costed("log", 9_000.0, GAVEL, 0.5, 100_000),
            costed(FLOOR_MODE, 15_000.0, FLOOR, 0.2, 160_000),
            // A lower step of the floor does not stand for it.
            costed(FLOOR_MODE, 12_000.0, FLOOR, 0.9, 130_000),
        ];
        let floor = report.floor_costs();
        assert_eq!(floor.len(), 1);
        // 0.5 cores × 10 s / 100,000 = 50 µs; 0.2 × 10 / 160,000 = 12.5 µs.
        assert!(close(floor[0].gavel_us_per_request, 50.0));
        assert!(close(floor[0].floor_us_per_request, 12.5));
        assert!(close(floor[0].ratio, 4.0));
        assert_eq!(
            floor[0].floor_window,
            "floor, over the step at 15000 bids/s"
        );
        let md = report.markdown();
        assert!(
            md.contains("a request costs Gavel **4.0×** the CPU"),
            "{md}"
        );
        assert!(
            md.contains("| 1 | log, over the step at 9000 bids/s | 50.0 µs |"),
            "{md}"
        );
        assert!(
            !md.contains("log / floor"),
            "the floor's rate is not compared: {md}"
        );
    }
}
