//! One command for the whole comparison: start a private PostgreSQL
//! (fsync on, as in production) with a streaming replica, run the scenario
//! against Gavel in each bid-path mode on a fresh database, audit each run,
//! measure the database's raw append ceiling with pgbench in the same
//! session, and write the combined report.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, ensure, Context as _};
use rustix::process::{getrlimit, setrlimit, Resource};

use crate::audit::{self, AuditReport, Check};
use crate::cpu::{self, CpuProbe, CpuWatch, CpuWindow};
use crate::freshness;
use crate::generator::{self, Target};
pub use crate::launch::Launcher;
use crate::launch::Server;
use crate::report::{Ceiling, Machine, Report, RunReport, FLOOR_MODE};
use crate::scenario::Scenario;
use crate::trace;
use pg_cluster::{self, ClusterOptions, PgCluster};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The scenario file.
    pub scenario_path: PathBuf,
    /// The scenario, already scaled as asked.
    pub scenario: Scenario,
    /// Bid-path modes, in order (`log`, then baselines such as `row_lock`,
    /// `row_lock_fn`, `optimistic`), and `floor`: the HTTP floor in
    /// Gavel's place ([`crate::floor`]).
    pub modes: Vec<String>,
    /// How Gavel is started.
    pub launcher: Launcher,
    /// Where the report goes.
    pub out_dir: PathBuf,
    /// Where the private PostgreSQL lives while it runs.
    pub work_dir: PathBuf,
    /// Seconds of pgbench for the append ceiling (0: skip).
    pub ceiling_s: u32,
    /// Times to run every mode and the ceiling, in turn (at least 1).
    pub rounds: u32,
    /// Start a streaming replica for reads.
    pub replica: bool,
    /// `GAVEL_*` settings for every mode (the environment's win over these).
    pub settings: Vec<(String, String)>,
    /// Record the primary's statements (`pg_stat_statements`, planning
    /// included) and write the costliest of each run beside the report.
    pub statements: bool,
    /// Nice steps the load generator and pgbench run below Gavel and
    /// PostgreSQL (see [`crate::priority`]).
    pub generator_nice: i32,
    /// The command line, for the report.
    pub command: String,
}

/// Rows per INSERT when measuring the append ceiling.
const CEILING_BATCH: u32 = 100;
/// pgbench clients when measuring the append ceiling.
const CEILING_CLIENTS: u32 = 8;

/// Runs every mode and writes the report; fails when an audit fails.
pub async fn bench(options: BenchOptions) -> anyhow::Result<Report> {
    let trace = match &options.scenario.trace {
        Some(source) => Some(trace::load(&source.file)?),
        None => None,
    };
    std::fs::create_dir_all(&options.out_dir)
        .with_context(|| format!("creating {}", options.out_dir.display()))?;
    eprintln!(
        "starting a private PostgreSQL in {} ...",
        options.work_dir.display()
    );
    let (primary, replica) = start_clusters(
        options.work_dir.clone(),
        options.replica,
        options.statements,
    )
    .await?;
    let postgres = primary.psql("postgres", "SHOW server_version")?;
    let clusters = (&primary, replica.as_ref());
    let (runs, ceilings) = run_rounds(&options, clusters, trace.as_deref()).await?;
    let ceiling = median_ceiling(&ceilings);
    // Keep the primary's log (checkpoints, autovacuum) with the report.
    let log = options.work_dir.join("primary").join("postgres.log");
    if let Err(e) = std::fs::copy(&log, options.out_dir.join("postgres.log")) {
        eprintln!("(could not keep PostgreSQL's log {}: {e})", log.display());
    }
    tokio::task::spawn_blocking(move || {
        drop(replica);
        drop(primary);
    })
    .await?;
    let report = Report {
        generated_at: chrono::Utc::now(),
        command: options.command.clone(),
        machine: Machine::detect(postgres),
        scenario: options.scenario.name.clone(),
        description: options.scenario.description.clone(),
        runs,
        ceiling,
        ceilings,
        efficiency: Vec::new(),
        http_floor: Vec::new(),
    };
    report.write(&options.out_dir)?;
    let failed: Vec<&str> = report
        .runs
        .iter()
        .filter(|r| !r.audit.passed)
        .map(|r| r.mode.as_str())
        .collect();
    ensure!(
        failed.is_empty(),
        "the audit failed for {}: see {}",
        failed.join(", "),
        options.out_dir.join("report.md").display()
    );
    Ok(report)
}

/// Every round: each mode (and its refining pass), then the append ceiling.
async fn run_rounds(
    options: &BenchOptions,
    clusters: (&PgCluster, Option<&PgCluster>),
    trace: Option<&[trace::TraceBid]>,
) -> anyhow::Result<(Vec<RunReport>, Vec<Ceiling>)> {
    let mut runs = Vec::new();
    let mut ceilings = Vec::new();
    let rounds = options.rounds.max(1);
    for round in 1..=rounds {
        if rounds > 1 {
            eprintln!("\n=== round {round} of {rounds} ===");
        }
        for mode in &options.modes {
            runs.extend(run_and_refine(options, clusters, mode, trace, round).await?);
        }
        if options.ceiling_s > 0 {
            eprintln!(
                "\n== raw append ceiling (pgbench, {} s) ==",
                options.ceiling_s
            );
            let mut ceiling = append_ceiling(
                clusters,
                options.ceiling_s,
                options.generator_nice,
                &options.work_dir,
            )?;
            ceiling.round = round;
            ceilings.push(ceiling);
        }
    }
    Ok((runs, ceilings))
}

/// One mode in one round: its run, then, when the scenario refines and a
/// step held, its refining pass.
async fn run_and_refine(
    options: &BenchOptions,
    clusters: (&PgCluster, Option<&PgCluster>),
    mode: &str,
    trace: Option<&[trace::TraceBid]>,
    round: u32,
) -> anyhow::Result<Vec<RunReport>> {
    let scenario = &options.scenario;
    let ramp = run_mode(options, scenario, clusters, mode, trace).await?;
    let best = ramp.max_sustainable_bids_per_s;
    let mut runs = vec![keep_run(options, clusters.0, ramp, round)?];
    // Between two steps of the ramp, the rate is known only to
    // within its step factor: climb again in finer steps.
    if let Some(refining) = best.and_then(|best| scenario.refined(best)) {
        eprintln!(
            "\n== {mode} mode: refining from {:.0} bids/s in steps of {:.0}% ==",
            refining.arrival.from_rate,
            (refining.arrival.step_factor.unwrap_or(1.0) - 1.0) * 100.0
        );
        let mut run = run_mode(options, &refining, clusters, mode, trace).await?;
        run.refining = true;
        runs.push(keep_run(options, clusters.0, run, round)?);
    }
    Ok(runs)
}

/// The median round's ceiling (the lower middle one of an even count).
fn median_ceiling(ceilings: &[Ceiling]) -> Option<Ceiling> {
    let mut sorted = ceilings.to_vec();
    sorted.sort_by(|a, b| a.rows_per_s.total_cmp(&b.rows_per_s));
    sorted.get(sorted.len().saturating_sub(1) / 2).cloned()
}

/// Files a finished run of `round`: its JSON (and statement profile)
/// beside the report, and its summary on the terminal.
fn keep_run(
    options: &BenchOptions,
    primary: &PgCluster,
    mut run: RunReport,
    round: u32,
) -> anyhow::Result<RunReport> {
    run.round = round;
    let mut name = run.mode.clone();
    if options.rounds > 1 {
        name.push_str(&format!("-{round}"));
    }
    if run.refining {
        name.push_str("-refining");
    }
    run.save(&options.out_dir.join(format!("{name}.json")))?;
    if options.statements {
        let profile = statement_profile(primary, &run.mode)?;
        let file = options.out_dir.join(format!("statements-{name}.md"));
        std::fs::write(&file, profile).with_context(|| format!("writing {}", file.display()))?;
    }
    eprintln!("{}", run.summary_text());
    Ok(run)
}

/// Runs `scenario` once in `mode` on a fresh database of the `(primary,
/// replica)` clusters, audits it, and stops Gavel.
async fn run_mode(
    options: &BenchOptions,
    scenario: &Scenario,
    (primary, replica): (&PgCluster, Option<&PgCluster>),
    mode: &str,
    trace: Option<&[trace::TraceBid]>,
) -> anyhow::Result<RunReport> {
    if mode == FLOOR_MODE {
        return run_floor(options, scenario, (primary, replica), trace).await;
    }
    let database = database_of(mode);
    primary.psql("postgres", &format!("DROP DATABASE IF EXISTS {database}"))?;
    primary.psql("postgres", &format!("CREATE DATABASE {database}"))?;
    let database_url = primary.url(&database);
    options.launcher.migrate(&database_url).await?;
    if options.statements {
        primary.psql(
            &database,
            "CREATE EXTENSION pg_stat_statements; SELECT pg_stat_statements_reset()",
        )?;
    }
    let mut settings: HashMap<String, String> = options.settings.iter().cloned().collect();
    settings.insert("GAVEL_DATABASE_URL".into(), database_url.clone());
    settings.insert(
        "GAVEL_REPLICA_URLS".into(),
        replica.map(|r| r.url(&database)).unwrap_or_default(),
    );
    settings.insert("GAVEL_BID_PATH".into(), mode.to_owned());
    if let Some(watchers) = &scenario.watchers {
        room_for_streams(&mut settings, watchers.count);
    }
    eprintln!("\n== {mode} mode: {} ==", scenario.name);
    let gavel = Server::gavel(&options.launcher, settings).await?;
    let target = Target {
        // The work directory holds the primary's and the replica's data.
        disk_probe: Some(options.work_dir.clone()),
        cpu: CpuWatch {
            gavel: gavel.pid(),
            primary: primary.postmaster_pid(),
            replica: replica.and_then(PgCluster::postmaster_pid),
            floor: false,
        },
        generator_nice: options.generator_nice,
        ..gavel.target()
    };
    let measured = async {
        let output = generator::run(scenario, trace, &target).await?;
        let audit = audit::audit_run(&database_url, &output).await?;
        let mut report = RunReport::new(mode, scenario, &output, audit);
        report.set_freshness(freshness::measure(&database_url, &output).await?, scenario);
        anyhow::Ok(report)
    }
    .await;
    gavel.stop().await?;
    measured
}

/// Runs `scenario` once against the HTTP floor in Gavel's place: the same
/// requests, answered without a database, so there is nothing to audit.
/// The clusters stay up, idle, as in every other run.
async fn run_floor(
    options: &BenchOptions,
    scenario: &Scenario,
    (primary, replica): (&PgCluster, Option<&PgCluster>),
    trace: Option<&[trace::TraceBid]>,
) -> anyhow::Result<RunReport> {
    ensure!(
        scenario.watchers.is_none(),
        "the HTTP floor serves no event streams: run --modes floor with a scenario without watchers"
    );
    eprintln!("\n== the HTTP floor: {} ==", scenario.name);
    let floor = Server::floor(&options.launcher).await?;
    let target = Target {
        cpu: CpuWatch {
            gavel: floor.pid(),
            primary: primary.postmaster_pid(),
            replica: replica.and_then(PgCluster::postmaster_pid),
            floor: true,
        },
        generator_nice: options.generator_nice,
        ..floor.target()
    };
    let output = generator::run(scenario, trace, &target).await;
    floor.stop().await?;
    Ok(RunReport::new(
        FLOOR_MODE,
        scenario,
        &output?,
        not_audited(),
    ))
}

/// The audit of a run that kept nothing.
fn not_audited() -> AuditReport {
    AuditReport {
        passed: true,
        checks: vec![Check {
            name: "not audited".into(),
            passed: true,
            detail: "the HTTP floor keeps no bids".into(),
        }],
        ..AuditReport::default()
    }
}

/// Gavel's defaults hold 10,000 streams and 10,000 connections in all:
/// with `watchers` streams open, Gavel is given a tenth more stream places
/// (a dropped stream's place is freed within seconds, while its watcher
/// comes back at once) and 10,000 connections for the requests beside
/// them, unless the settings say otherwise. The open-file limit of this
/// process, which Gavel inherits, is raised to its hard limit to hold them.
fn room_for_streams(settings: &mut HashMap<String, String>, watchers: usize) {
    let streams = watchers + watchers / 10;
    let connections = streams + 10_000;
    settings
        .entry("GAVEL_MAX_STREAMS".into())
        .or_insert_with(|| streams.max(10_000).to_string());
    settings
        .entry("GAVEL_MAX_CONNECTIONS".into())
        .or_insert_with(|| connections.to_string());
    let mut files = getrlimit(Resource::Nofile);
    files.current = files.maximum;
    let _ = setrlimit(Resource::Nofile, files);
    let open_files = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    if open_files < (watchers + 10_000) as u64 {
        eprintln!(
            "(the open-file limit is {open_files}: too low for {watchers} streams beside the requests; \
             raise it with `ulimit -n` before the bench)"
        );
    }
}

/// The database a run in `mode` uses (made afresh for each run).
fn database_of(mode: &str) -> String {
    format!("gavel_{mode}")
}

/// Statements shown in a statement profile.
const PROFILE_STATEMENTS: u32 = 25;

/// The costliest statements of the last run in `mode`, as Markdown: what
/// `pg_stat_statements` recorded in its database since the run began.
fn statement_profile(primary: &PgCluster, mode: &str) -> anyhow::Result<String> {
    let rows = primary.psql(
        &database_of(mode),
        &format!(
            "COPY (SELECT calls, plans, rows, round(total_plan_time::numeric, 1), \
               round(total_exec_time::numeric, 1), \
               round(((total_plan_time + total_exec_time) / calls * 1000)::numeric, 1), \
               left(regexp_replace(query, '\\s+', ' ', 'g'), 1000) \
             FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             ORDER BY total_plan_time + total_exec_time DESC LIMIT {PROFILE_STATEMENTS}) \
             TO STDOUT"
        ),
    )?;
    let mut out = format!(
        "# The primary's statements: {mode}\n\n\
         The {PROFILE_STATEMENTS} statements that took the most time over the run \
         (`pg_stat_statements`, planning tracked). Times are wall time: on a busy \
         machine they include waiting for a core, and tracking planning adds to it.\n\n\
         | calls | plans | rows | planning (ms) | executing (ms) | per call (µs) | statement |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n"
    );
    for line in rows.lines().filter(|l| !l.is_empty()) {
        let fields: Vec<&str> = line.split('\t').collect();
        anyhow::ensure!(
            fields.len() == 7,
            "unexpected pg_stat_statements row: {line}"
        );
        let statement = fields[6].replace('|', "\\|");
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | `{statement}` |\n",
            fields[0], fields[1], fields[2], fields[3], fields[4], fields[5]
        ));
    }
    Ok(out)
}

/// Starts the private primary in `dir` (fsync on, as in production) and,
/// `with_replica`, a streaming replica of it; `with_statements` loads
/// `pg_stat_statements` on the primary.
pub(crate) async fn start_clusters(
    dir: PathBuf,
    with_replica: bool,
    with_statements: bool,
) -> anyhow::Result<(PgCluster, Option<PgCluster>)> {
    tokio::task::spawn_blocking(move || {
        let mut primary_options = ClusterOptions::new(dir.join("primary"));
        // Production-like durability: every commit waits for its WAL flush.
        primary_options.settings = vec![
            ("fsync".into(), "on".into()),
            ("synchronous_commit".into(), "on".into()),
            ("shared_buffers".into(), "256MB".into()),
            // Sized as a write-heavy primary is in production: checkpoints
            // every 30 minutes rather than every few hundred MB of WAL, so
            // the full-page writes that follow a checkpoint's start do not
            // land in the few minutes a run measures (BENCHMARKS.md).
            ("max_wal_size".into(), "8GB".into()),
            ("checkpoint_timeout".into(), "30min".into()),
            // What the database did in the background, for reading a stall
            // in the report against (the log is kept with the report).
            ("log_checkpoints".into(), "on".into()),
            ("log_autovacuum_min_duration".into(), "0".into()),
            // When each change committed, for the watchers' and readers'
            // delays (crate::freshness).
            ("track_commit_timestamp".into(), "on".into()),
        ];
        if with_statements {
            primary_options.settings.extend([
                (
                    "shared_preload_libraries".into(),
                    "pg_stat_statements".into(),
                ),
                ("pg_stat_statements.track_planning".into(), "on".into()),
            ]);
        }
        let primary =
            PgCluster::start(primary_options).context("starting the private PostgreSQL")?;
        let replica = if with_replica {
            Some(
                primary
                    .start_replica(ClusterOptions::new(dir.join("replica")))
                    .context("starting the streaming replica")?,
            )
        } else {
            None
        };
        anyhow::Ok((primary, replica))
    })
    .await?
}

/// Whether the schema finds pending bids by the transaction that wrote
/// them (`bid_log.xid`), as today's Gavel does; an older build under test
/// (`--gavel-bin`) may run on a schema from before.
pub(crate) const BY_TRANSACTION: &str = "SELECT EXISTS (SELECT 1 FROM information_schema.columns \
     WHERE table_name = 'bid_log' AND column_name = 'xid')";

/// The column and value a pending bid's insert adds when the schema finds
/// pending bids by their transaction (`bid_log.xid`), as Gavel's append
/// writes them; nothing on an older schema.
pub(crate) fn append_xid(by_transaction: bool) -> (&'static str, &'static str) {
    match by_transaction {
        true => (", xid", ", pg_current_xact_id()::text::int8"),
        false => ("", ""),
    }
}

/// Writes pgbench's script for the append ceiling: one batch of rows into
/// the copy of `bid_log`, written as Gavel's append writes them.
fn ceiling_script(primary: &PgCluster, database: &str, work_dir: &Path) -> anyhow::Result<PathBuf> {
    // A schema that finds pending bids by their transaction (`bid_log.xid`)
    // has the append write it, as Gavel's does.
    let by_transaction = primary.psql(database, BY_TRANSACTION)? == "t";
    let (xid_column, xid_value) = append_xid(by_transaction);
    let script = work_dir.join("append-ceiling.sql");
    std::fs::write(
        &script,
        format!(
            "INSERT INTO bid_log_scratch (auction_id, id, bidder_id, amount, idempotency_key{xid_column})\n\
             SELECT '00000000-0000-7000-8000-000000000001'::uuid, gen_random_uuid(), 'bidder-' || (g % 20000), 1000 + g, gen_random_uuid()::text{xid_value}\n\
             FROM unnest(ARRAY(SELECT generate_series(1, {CEILING_BATCH}))) AS g;\n"
        ),
    )?;
    Ok(script)
}

/// The most rows per second PostgreSQL appends to a copy of `bid_log`
/// (same columns, defaults and indexes) with batched UNNEST inserts.
/// pgbench runs `nice` steps below the database, as the load generator does.
fn append_ceiling(
    (primary, replica): (&PgCluster, Option<&PgCluster>),
    seconds: u32,
    nice: i32,
    work_dir: &Path,
) -> anyhow::Result<Ceiling> {
    let database = "gavel_ceiling";
    primary.psql("postgres", &format!("DROP DATABASE IF EXISTS {database}"))?;
    primary.psql("postgres", &format!("CREATE DATABASE {database} TEMPLATE gavel_log"))
        .or_else(|_| -> anyhow::Result<String> {
            bail!("the ceiling is measured on the schema of the log-mode database: run the log mode too")
        })?;
    primary.psql(
        database,
        "CREATE TABLE bid_log_scratch (LIKE bid_log INCLUDING ALL)",
    )?;
    let script = ceiling_script(primary, database, work_dir)?;
    // PostgreSQL's CPU and pgbench's while it runs: what a row of the
    // ceiling costs (the report's efficiency ratio).
    let watch = CpuWatch {
        primary: primary.postmaster_pid(),
        replica: replica.and_then(PgCluster::postmaster_pid),
        ..CpuWatch::default()
    };
    let probe = CpuProbe::start(watch, Instant::now());
    let reaped = cpu::reaped_children_s();
    let stdout = pgbench(&script, nice, seconds, &primary.url(database))?;
    let (tps, latency_ms) = parse_pgbench(&stdout)?;
    let pgbench_s = cpu::reaped_children_s().zip(reaped).map(|(a, b)| a - b);
    let cpu_cores = probe
        .ok()
        .and_then(|p| p.stop().window(0, seconds as usize))
        .zip(pgbench_s)
        .map(|(w, pgbench_s)| postgres_cores(&w) + pgbench_s / f64::from(seconds));
    primary.psql("postgres", &format!("DROP DATABASE {database}"))?;
    let ceiling = Ceiling {
        round: 1,
        rows_per_s: tps * f64::from(CEILING_BATCH),
        batch_rows: CEILING_BATCH,
        clients: CEILING_CLIENTS,
        tps,
        latency_ms,
        duration_s: seconds,
        cpu_cores,
    };
    eprintln!(
        "append ceiling: {:.0} rows/s ({tps:.0} tps of {CEILING_BATCH} rows, {latency_ms:.1} ms)",
        ceiling.rows_per_s
    );
    Ok(ceiling)
}

/// PostgreSQL's cores in `window`: the primary's processes and the replica.
fn postgres_cores(window: &CpuWindow) -> f64 {
    (window.groups.iter())
        .filter(|(name, _)| name.starts_with("PostgreSQL"))
        .map(|(_, cores)| cores)
        .sum()
}

/// Runs pgbench `nice` steps down for `seconds` with the ceiling's clients,
/// each running `script` against `url`; returns what it printed.
fn pgbench(script: &Path, nice: i32, seconds: u32, url: &str) -> anyhow::Result<String> {
    let pgbench = pg_cluster::find_bin_dir()?.join("pgbench");
    ensure!(
        pgbench.is_file(),
        "pgbench was not found at {}: install it with apt-get install -y postgresql-contrib (or postgresql)",
        pgbench.display()
    );
    let output = Command::new("nice")
        .args(["-n", &nice.to_string()])
        .arg(&pgbench)
        .args(["-n", "-M", "prepared", "-f"])
        .arg(script)
        .args([
            "-c",
            &CEILING_CLIENTS.to_string(),
            "-j",
            "2",
            "-T",
            &seconds.to_string(),
        ])
        .arg(url)
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null())
        .output()
        .context("running pgbench")?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    ensure!(
        output.status.success(),
        "pgbench failed: {}{}",
        stdout,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(stdout)
}

/// Transactions per second and average latency from pgbench's output.
fn parse_pgbench(text: &str) -> anyhow::Result<(f64, f64)> {
    let number_after = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
    };
    let tps = number_after("tps = ").context("pgbench printed no tps")?;
    let latency = number_after("latency average = ").context("pgbench printed no latency")?;
    Ok((tps, latency))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgbench_output_is_read() {
        let out = "transaction type: append-ceiling.sql\nnumber of clients: 8\n\
                   latency average = 14.020 ms\ninitial connection time = 9.1 ms\n\
                   tps = 570.588383 (without initial connection time)\n";
        let (tps, latency) = parse_pgbench(out).unwrap();
        assert!((tps - 570.588383).abs() < 1e-9);
        assert!((latency - 14.02).abs() < 1e-9);
    }
}
