//! `report.md`: the combined report as Markdown, one function per section,
//! in the order the sections appear.

use super::cost::service_cores;
use super::{CpuBreakdown, Efficiency, FloorCost, Report, RoundComparison, RunReport};
use crate::cpu::CpuWindow;
use crate::disk;
use crate::freshness::FanOut;
use crate::scenario::Client;

impl Report {
    /// The Markdown summary.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        self.header(&mut md);
        self.bids_section(&mut md);
        self.endings_section(&mut md);
        self.server_section(&mut md);
        self.watching_section(&mut md);
        self.steps_section(&mut md);
        self.cpu_section(&mut md);
        self.ceiling_section(&mut md);
        self.comparison_section(&mut md);
        self.cost_section(&mut md);
        self.targets_section(&mut md);
        self.audit_section(&mut md);
        md
    }

    /// The title, the scenario's description, the machine and the command.
    fn header(&self, md: &mut String) {
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
    }

    /// "Bids": the load's priority, each run's bid figures, and the
    /// clients' policy.
    fn bids_section(&self, md: &mut String) {
        self.generator_priority(md);
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
        self.attempts(md);
        self.client_policies(md);
    }

    /// Each bid attempt on its own, when some were answered `503`: what
    /// the server took to accept or refuse, apart from the waits its
    /// `Retry-After` asked for.
    fn attempts(&self, md: &mut String) {
        if self
            .runs
            .iter()
            .all(|r| r.bids.unavailable_attempts_ms.count == 0)
        {
            return;
        }
        md.push_str("Each bid attempt on its own, from when it was due (the first at the bid's intended send time, a retry when its wait ended):\n\n| mode | attempts answered 2xx | p50 | p99 | answered 503 | p50 | p99 |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n");
        for r in &self.runs {
            let (ok, refused) = (&r.bids.ok_attempts_ms, &r.bids.unavailable_attempts_ms);
            md.push_str(&format!(
                "| {} | {} | {:.1} ms | {:.1} ms | {} | {:.1} ms | {:.1} ms |\n",
                self.label(r),
                ok.count,
                ok.p50,
                ok.p99,
                refused.count,
                refused.p50,
                refused.p99
            ));
        }
        md.push('\n');
    }

    /// The nice steps the load generator ran below Gavel and PostgreSQL.
    fn generator_priority(&self, md: &mut String) {
        let mut nices: Vec<i32> = self.runs.iter().map(|r| r.generator_nice).collect();
        nices.dedup();
        if let [nice] = nices[..] {
            if nice > 0 {
                md.push_str(&format!("The load generator (and pgbench) ran {nice} nice steps below Gavel and PostgreSQL, all on this machine; latency still counts from each request's intended send time.\n\n"));
            }
        } else if !nices.is_empty() {
            md.push_str("The load generator ran at different nice steps in these runs: see `generator_nice` in report.json.\n\n");
        }
    }

    /// The clients' timeout and retry policy: once when every run used the
    /// same, else run by run.
    fn client_policies(&self, md: &mut String) {
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

    /// "Endings": how each run's bids and reads ended.
    fn endings_section(&self, md: &mut String) {
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
    }

    /// "Gavel and PostgreSQL during the run": the peaks of Gavel's metrics
    /// and the disk's slowest flushes.
    fn server_section(&self, md: &mut String) {
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
    }

    /// "Watching and polling": the watchers' streams, the readers'
    /// staleness, and what Gavel and PostgreSQL spent while they ran; only
    /// for runs that measured either.
    fn watching_section(&self, md: &mut String) {
        let measured = |r: &&RunReport| r.watchers.is_some() || r.read_freshness.is_some();
        if !self.runs.iter().any(|r| measured(&r)) {
            return;
        }
        md.push_str("\n## Watching and polling\n\nDelays run from each change's commit (PostgreSQL's commit timestamp of the transaction that made the auction's version) to its receipt by the client, on this machine's one clock (loadtests/README.md, \"Watchers\").\n\n");
        self.watchers_table(md);
        self.staleness_table(md);
        md.push_str("\n| mode | Gavel CPU | PostgreSQL CPU | Gavel + PostgreSQL | Gavel RSS (max) |\n| --- | ---: | ---: | ---: | ---: |\n");
        for r in self.runs.iter().filter(measured) {
            let (gavel, postgres) = r
                .cpu
                .as_ref()
                .map_or((None, None), |c| service_cores(&c.cpu));
            let cores = |c: Option<f64>| c.map_or("-".into(), |c| format!("{c:.2} cores"));
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                self.label(r),
                cores(gavel),
                cores(postgres),
                cores(gavel.zip(postgres).map(|(g, p)| g + p)),
                (r.server.rss_max_mib).map_or("-".into(), |m| format!("{m:.0} MiB")),
            ));
        }
        md.push_str("\nCPU is CPU-seconds per second over the run's bidding phase (cores on average), read from `/proc`.\n");
    }

    /// The watchers of each run that had them.
    fn watchers_table(&self, md: &mut String) {
        if self.runs.iter().all(|r| r.watchers.is_none()) {
            return;
        }
        md.push_str("| mode | watchers (auctions) | streams open (max) | reconnects | refused (503) | versions received | versions skipped | commit → receipt p50 | p99 | max | ended on the final version |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
        for r in &self.runs {
            let Some(w) = &r.watchers else { continue };
            let d = &w.commit_to_receipt_ms;
            md.push_str(&format!(
                "| {} | {} ({}) | {} | {} | {} | {} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {} of {} |\n",
                self.label(r),
                w.watchers,
                w.auctions.join(", "),
                w.open_max,
                w.counts.reconnects,
                w.counts.refused,
                w.counts.received,
                w.counts.skipped,
                d.p50,
                d.p99,
                d.max,
                w.ended_on_final,
                w.watchers,
            ));
            let notes = [
                (w.ended_elsewhere > 0).then(|| {
                    format!(
                        "{} watchers got `end` but not the final version before it",
                        w.ended_elsewhere
                    )
                }),
                (w.never_ended > 0).then(|| format!("{} watchers never got `end`", w.never_ended)),
                w.fanned_out.as_ref().map(fan_out_note),
                (w.without_commit_time > 0).then(|| {
                    format!(
                        "{} versions received have no commit time",
                        w.without_commit_time
                    )
                }),
                w.note.clone(),
            ];
            for note in notes.into_iter().flatten() {
                md.push_str(&format!("\n- **{}**: {note}.\n", self.label(r)));
            }
        }
    }

    /// The staleness of the readers' answers in each run that had readers.
    fn staleness_table(&self, md: &mut String) {
        if self.runs.iter().all(|r| r.read_freshness.is_none()) {
            return;
        }
        md.push_str("\n| mode | reads answered with a view | stale answers | staleness p50 | p99 | max |\n| --- | ---: | ---: | ---: | ---: | ---: |\n");
        for r in &self.runs {
            let Some(f) = &r.read_freshness else { continue };
            let q = &f.staleness_ms;
            md.push_str(&format!(
                "| {} | {} | {} | {:.1} ms | {:.1} ms | {:.1} ms |\n",
                self.label(r),
                f.answers,
                f.stale,
                q.p50,
                q.p99,
                q.max
            ));
        }
        md.push_str("\nAn answer is stale when a newer version had committed before it came; its staleness is how long before (0 otherwise). A screen polled once a second is, between polls, up to a second older still.\n");
    }

    /// "Highest sustainable bid rate": the steps of each rate-finding run.
    fn steps_section(&self, md: &mut String) {
        if self.runs.iter().all(|r| r.steps.is_empty()) {
            return;
        }
        md.push_str("\n## Highest sustainable bid rate\n\n");
        for r in self.runs.iter().filter(|r| !r.steps.is_empty()) {
            self.steps_table(md, r);
        }
    }

    /// One run's steps: what each offered and how it held.
    fn steps_table(&self, md: &mut String, r: &RunReport) {
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
        cpu_rows(md, &runs);
    }

    /// "Raw append ceiling": the pgbench figures, with each round's.
    fn ceiling_section(&self, md: &mut String) {
        let Some(c) = &self.ceiling else {
            return;
        };
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

    /// "Comparison": the ratios, as medians of the rounds when there were
    /// several, with each round's figures.
    fn comparison_section(&self, md: &mut String) {
        let ratios = self.ratios();
        if ratios.over.iter().all(|(_, x)| x.is_none()) && ratios.of_ceiling.is_none() {
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
        for (mode, x) in &ratios.over {
            if let Some(x) = x {
                md.push_str(&format!(
                    "- Log mode sustains **{x:.1}×** the bid rate of {}{of_rounds}.\n",
                    design(mode)
                ));
            }
        }
        if let Some(x) = ratios.of_ceiling {
            md.push_str(&format!(
                "- Log mode sustains **{:.0}%** of the database's raw append ceiling{of_rounds}.\n",
                x * 100.0
            ));
        }
        if rounds.len() > 1 {
            rounds_table(md, &rounds);
        }
    }

    /// "Cost per bid": log mode's CPU per bid against the append
    /// ceiling's per row, and Gavel's own against the HTTP floor's.
    fn cost_section(&self, md: &mut String) {
        let (efficiency, floor) = (self.efficiencies(), self.floor_costs());
        if efficiency.is_empty() && floor.is_empty() {
            return;
        }
        md.push_str("\n## Cost per bid\n\n");
        let (of_ceiling, of_floor) = self.cost_ratios();
        let of_rounds = |n: usize| match n {
            1 => String::new(),
            n => format!(" (the median of {n} rounds)"),
        };
        if let Some(x) = of_ceiling {
            md.push_str(&format!("- **Efficiency**: an accepted bid in log mode costs Gavel and PostgreSQL **{x:.1}×** the CPU of a row of the raw append ceiling{}.\n", of_rounds(efficiency.len())));
        }
        if let Some(x) = of_floor {
            md.push_str(&format!("- **HTTP floor**: a request costs Gavel **{x:.1}×** the CPU it costs an endpoint on the same HTTP stack with no database behind it{}.\n", of_rounds(floor.len())));
        }
        efficiency_table(md, &efficiency);
        floor_table(md, &floor);
    }

    /// "Targets": each run held to the scenario's targets, target by target.
    fn targets_section(&self, md: &mut String) {
        for r in self.runs.iter().filter(|r| !r.targets.is_empty()) {
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
    }

    /// "Audit": each run's audit, check by check.
    fn audit_section(&self, md: &mut String) {
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
    }
}

/// How the comparison names a mode's design.
fn design(mode: &str) -> String {
    match mode {
        "row_lock" => "the row-lock design".into(),
        "row_lock_fn" => "the row-lock design in one round trip (`row_lock_fn`)".into(),
        "optimistic" => "the optimistic design (`optimistic`)".into(),
        other => format!("`{other}`"),
    }
}

/// Each round's rates, ceiling and ratios: a rate and a ratio column for
/// every mode beside log.
fn rounds_table(md: &mut String, rounds: &[RoundComparison]) {
    let modes: Vec<&str> = rounds[0].others.iter().map(|o| o.mode.as_str()).collect();
    let all = if modes.len() > 1 {
        "every mode"
    } else {
        "both"
    };
    let rates: String = modes.iter().map(|m| format!(" {m} |")).collect();
    let over: String = modes.iter().map(|m| format!(" log / {m} |")).collect();
    let align = " ---: |".repeat(2 * modes.len());
    md.push_str(&format!("\nThe modes ran in turn, round after round, so that a slow spell of the machine falls on {all}:\n\n| round | log |{rates}{over} ceiling | log / ceiling |\n| ---: | ---: |{align} ---: | ---: |\n"));
    let rate = |v: Option<f64>, unit: &str| v.map_or("-".into(), |v| format!("{v:.0} {unit}"));
    for c in rounds {
        let rates: String = (c.others.iter())
            .map(|o| format!(" {} |", rate(o.rate, "bids/s")))
            .collect();
        let over: String = (c.others.iter())
            .map(|o| {
                format!(
                    " {} |",
                    o.log_over.map_or("-".into(), |x| format!("{x:.1}×"))
                )
            })
            .collect();
        md.push_str(&format!(
            "| {} | {} |{rates}{over} {} | {} |\n",
            c.round,
            rate(c.log, "bids/s"),
            rate(c.ceiling, "rows/s"),
            c.of_ceiling
                .map_or("-".into(), |x| format!("{:.0}%", x * 100.0)),
        ));
    }
}

/// Each round's efficiency: log mode's CPU per accepted bid against the
/// ceiling's per row.
fn efficiency_table(md: &mut String, rounds: &[Efficiency]) {
    if rounds.is_empty() {
        return;
    }
    md.push_str("\nGavel and PostgreSQL: Gavel's process, the primary's client backends and its own processes, and the replica, over log mode's highest held step (the whole run without steps). A row of the ceiling: the CPU of PostgreSQL (primary and replica) and of pgbench while pgbench ran, over the rows appended.\n\n| round | run | over | Gavel + PostgreSQL per accepted bid | ceiling per row | ratio |\n| ---: | --- | --- | ---: | ---: | ---: |\n");
    for e in rounds {
        let assumed = if e.ceiling_cpu_measured {
            ""
        } else {
            " (every core)"
        };
        md.push_str(&format!(
            "| {} | {} | {} | {:.0} µs | {:.1} µs{assumed} | {:.1}× |\n",
            e.round, e.run, e.window, e.service_us_per_bid, e.ceiling_us_per_row, e.ratio
        ));
    }
    if rounds.iter().any(|e| !e.ceiling_cpu_measured) {
        md.push_str("\n(every core): the ceiling's CPU was not measured in this report; every core of the machine is counted as busy while pgbench ran.\n");
    }
}

/// Each round's Gavel against the HTTP floor, per request answered.
fn floor_table(md: &mut String, rounds: &[FloorCost]) {
    if rounds.is_empty() {
        return;
    }
    md.push_str("\nThe floor (`--modes floor`): the same generator and requests against an axum endpoint on the same HTTP/1.1 stack that answers every bid `202` and every read `200` without a database. CPU of the serving process per request answered (bids and reads), over each run's highest held step (the whole run without steps).\n\n| round | Gavel | per request | HTTP floor | per request | Gavel / floor |\n| ---: | --- | ---: | --- | ---: | ---: |\n");
    for f in rounds {
        md.push_str(&format!(
            "| {} | {} | {:.1} µs | {} | {:.1} µs | {:.1}× |\n",
            f.round,
            f.gavel_window,
            f.gavel_us_per_request,
            f.floor_window,
            f.floor_us_per_request,
            f.ratio
        ));
    }
}

/// The rows of the CPU table: each process group's share of the machine
/// (and CPU time per accepted bid) in every run.
fn cpu_rows(md: &mut String, runs: &[(&RunReport, &CpuBreakdown)]) {
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
            let cell =
                rows.iter()
                    .find(|(n, ..)| n == name)
                    .map_or("-".to_owned(), |&(_, cores, _)| {
                        let share = format!("{:.1}%", c.cpu.share_pct(cores));
                        match c.us_per_bid(cores).filter(|_| per_bid) {
                            Some(us) => format!("{share} · {us:.0} µs"),
                            None => share,
                        }
                    });
            md.push_str(&format!(" {cell} |"));
        }
        md.push('\n');
    }
}

impl CpuBreakdown {
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

/// The commit → receipt delays of versions sent to most watchers at once,
/// against the others'.
fn fan_out_note(f: &FanOut) -> String {
    let (most, others) = (&f.to_most_ms, &f.others_ms);
    format!(
        "{} versions went to more than half of their auction's watchers at once \
         ({} receipts: p50 {:.1} ms, p99 {:.1} ms); the other {} receipts: p50 {:.1} ms, \
         p99 {:.1} ms",
        f.versions, most.count, most.p50, most.p99, others.count, others.p50, others.p99
    )
}
