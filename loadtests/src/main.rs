//! `gavel-loadtest`: `bench` (the one-command comparison), `run` (one
//! scenario against a running Gavel), `report` (combine run reports),
//! `drain` (one resolver against a backlog) and `floor` (the HTTP floor
//! server); one function per subcommand, the work itself in the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use gavel_loadtest::bench::{self, BenchOptions, Launcher};
use gavel_loadtest::report::{Machine, Report, RunReport, BASELINES, FLOOR_MODE};
use gavel_loadtest::scenario::Scenario;
use gavel_loadtest::{audit, cpu, freshness, generator, trace};

/// mimalloc, as in `gavel`: the generator allocates per request on every
/// worker thread, and should spend the machine's cores on load, not malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Replays auction endings against Gavel and reports how it held.
#[derive(Debug, Parser)]
#[command(name = "gavel-loadtest", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options that reshape a scenario for a shorter or lighter run.
#[derive(Debug, clap::Args)]
struct Shape {
    /// Multiply every rate of the scenario (bids and reads) by this.
    #[arg(long, default_value_t = 1.0)]
    rate_scale: f64,
    /// Cut the bidding phase to this many seconds (phases shrink with it).
    #[arg(long)]
    duration_s: Option<f64>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a private PostgreSQL and Gavel, run the scenario in each mode,
    /// measure the append ceiling, and write the combined report.
    Bench(BenchArgs),
    /// Run a scenario against a Gavel that is already running, then audit
    /// its database and write a run report.
    Run(RunArgs),
    /// Combine run reports (JSON) into report.json, report.md and chart.svg,
    /// or draw a combined report.json again (with its ceilings and rounds).
    Report(ReportArgs),
    /// On a private PostgreSQL, append a backlog of pending bids on one
    /// auction, start Gavel with its resolver, and measure how fast the
    /// one resolver drains it.
    Drain(DrainArgs),
    /// Serve the HTTP floor: Gavel's HTTP stack answering the generator's
    /// requests without a database (`bench --modes floor` starts it).
    Floor(FloorArgs),
}

/// `drain`'s options.
#[derive(Debug, clap::Args)]
struct DrainArgs {
    /// Pending bids in the backlog, all on one auction.
    #[arg(long, default_value_t = 500_000)]
    bids: u64,
    /// The `gavel` binary (default: next to this one).
    #[arg(long)]
    gavel_bin: Option<PathBuf>,
    /// Report directory (default: loadtests/reports/drain-<time>).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// No streaming replica (by default one replays the resolver's writes,
    /// as in the bench).
    #[arg(long)]
    no_replica: bool,
    /// Give up after this many seconds of draining.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
}

/// `floor`'s options.
#[derive(Debug, clap::Args)]
struct FloorArgs {
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
}

/// `bench`'s options.
#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// The scenario file (TOML).
    scenario: PathBuf,
    #[command(flatten)]
    shape: Shape,
    /// Bid-path modes to run, in order (`GAVEL_BID_PATH` values): `log`,
    /// Gavel's path, and the baselines it is compared with, `row_lock`
    /// (the classic row-lock transaction), `row_lock_fn` (the same in one
    /// round trip) and `optimistic` (compare-and-set from every request);
    /// and `floor`, the HTTP floor in Gavel's place (no database).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "log,row_lock,row_lock_fn,optimistic"
    )]
    modes: Vec<String>,
    /// The `gavel` binary (default: next to this one).
    #[arg(long)]
    gavel_bin: Option<PathBuf>,
    /// Report directory (default: loadtests/reports/<scenario>-<time>).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Seconds of pgbench for the raw append ceiling (0 skips it).
    #[arg(long, default_value_t = 20)]
    ceiling_s: u32,
    /// Read from the primary only (no streaming replica).
    #[arg(long)]
    no_replica: bool,
    /// Run every mode and the ceiling this many times, in turn, and
    /// compare the medians (default: the scenario's `rounds`, else 1).
    #[arg(long)]
    rounds: Option<u32>,
    /// Also profile the primary's statements (`pg_stat_statements`,
    /// planning included) and write statements-<run>.md beside the
    /// report. The tracking costs the database some CPU: for finding
    /// where the time goes, not for the figures.
    #[arg(long)]
    statements: bool,
    /// Nice steps the load generator (and pgbench) run below Gavel and
    /// PostgreSQL, so that the load does not take the cores of the
    /// service it measures (0 to 19; 0: the same priority).
    #[arg(long, default_value_t = 10)]
    generator_nice: i32,
}

/// `run`'s options.
#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The scenario file (TOML).
    scenario: PathBuf,
    #[command(flatten)]
    shape: Shape,
    /// Gavel's API base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    target: String,
    /// Gavel's metrics URL (its admin listener), read once a second.
    #[arg(long, default_value = "http://127.0.0.1:9090/metrics")]
    metrics: String,
    /// Gavel's primary database, for the audit.
    #[arg(long, env = "GAVEL_DATABASE_URL")]
    database_url: String,
    /// Gavel's JWT secret, to mint bidder tokens.
    #[arg(long, env = "GAVEL_JWT_SECRET", hide_env_values = true)]
    jwt_secret: String,
    /// Gavel's JWT audience.
    #[arg(long, env = "GAVEL_JWT_AUDIENCE", default_value = "gavel")]
    jwt_audience: String,
    /// A label for this run in reports (e.g. the bid path in use).
    #[arg(long, default_value = "log")]
    mode: String,
    /// Where the run report (JSON) goes.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write the bids sent as a trace (CSV) for later replay.
    #[arg(long)]
    record_trace: Option<PathBuf>,
    /// A directory on the database's disk (when it is on this
    /// machine): its flush latency is probed beside the run.
    #[arg(long)]
    disk_probe: Option<PathBuf>,
    /// Gavel's process id, when it runs on this machine: its CPU time
    /// is accounted beside the generator's and the machine's.
    #[arg(long)]
    gavel_pid: Option<u32>,
    /// Nice steps the requests are sent at, below this process's other
    /// threads: when Gavel shares this machine (0 to 19).
    #[arg(long, default_value_t = 0)]
    generator_nice: i32,
}

/// `report`'s options.
#[derive(Debug, clap::Args)]
struct ReportArgs {
    /// Run reports written by `run` or `bench`, or one report.json.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Output directory.
    #[arg(long)]
    out_dir: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}

fn load_scenario(path: &Path, shape: &Shape) -> anyhow::Result<Scenario> {
    let scenario = Scenario::load(path)?;
    if shape.rate_scale == 1.0 && shape.duration_s.is_none() {
        return Ok(scenario);
    }
    scenario
        .scaled(shape.rate_scale, shape.duration_s)
        .context("--rate-scale / --duration-s")
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Bench(args) => bench(args).await,
        Command::Run(args) => run_scenario(args).await,
        Command::Report(args) => report(args),
        Command::Drain(args) => drain(args).await,
        Command::Floor(args) => gavel_loadtest::floor::run(args.listen).await,
    }
}

/// `bench`: the whole comparison on a private PostgreSQL.
async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    gavel_loadtest::priority::ensure_valid(args.generator_nice)?;
    let scenario = load_scenario(&args.scenario, &args.shape)?;
    let rounds = args.rounds.unwrap_or(scenario.rounds);
    anyhow::ensure!(rounds >= 1, "--rounds: at least 1");
    for mode in &args.modes {
        anyhow::ensure!(
            mode == "log" || mode == FLOOR_MODE || BASELINES.contains(&mode.as_str()),
            "--modes: '{mode}' is not a bid path (log, {}) or {FLOOR_MODE}",
            BASELINES.join(", ")
        );
    }
    let gavel_bin = gavel_binary(args.gavel_bin)?;
    let stamp = chrono::Utc::now().format("%Y%m%d-%H%M%S");
    let out_dir = args.out_dir.unwrap_or_else(|| {
        PathBuf::from("loadtests/reports").join(format!("{}-{stamp}", scenario.name))
    });
    let work_dir = std::env::temp_dir().join(format!("gavel-loadtest-{}", std::process::id()));
    let report = bench::bench(BenchOptions {
        scenario_path: args.scenario,
        scenario,
        modes: args.modes,
        launcher: Launcher::Process(gavel_bin),
        out_dir: out_dir.clone(),
        work_dir,
        ceiling_s: args.ceiling_s,
        rounds,
        replica: !args.no_replica,
        settings: Vec::new(),
        statements: args.statements,
        generator_nice: args.generator_nice,
        command: command_line(),
    })
    .await?;
    println!("{}", report.markdown());
    eprintln!("report: {}", out_dir.join("report.md").display());
    Ok(())
}

/// `drain`: one resolver against a backlog, on a private PostgreSQL.
async fn drain(args: DrainArgs) -> anyhow::Result<()> {
    let stamp = chrono::Utc::now().format("%Y%m%d-%H%M%S");
    let out_dir = (args.out_dir)
        .unwrap_or_else(|| PathBuf::from("loadtests/reports").join(format!("drain-{stamp}")));
    let report = gavel_loadtest::drain::drain(gavel_loadtest::drain::DrainOptions {
        launcher: Launcher::Process(gavel_binary(args.gavel_bin)?),
        settings: Vec::new(),
        bids: args.bids,
        work_dir: std::env::temp_dir().join(format!("gavel-drain-{}", std::process::id())),
        out_dir: out_dir.clone(),
        replica: !args.no_replica,
        timeout: std::time::Duration::from_secs(args.timeout_s),
        command: command_line(),
    })
    .await?;
    println!("{}", report.markdown());
    eprintln!("report: {}", out_dir.join("drain.md").display());
    Ok(())
}

/// The `gavel` binary to start: the one named, else the one next to this.
fn gavel_binary(named: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let gavel_bin = match named {
        Some(bin) => bin,
        None => std::env::current_exe()?.with_file_name("gavel"),
    };
    anyhow::ensure!(
        gavel_bin.is_file(),
        "no gavel binary at {}: build it with `cargo build --release -p gavel` or pass --gavel-bin",
        gavel_bin.display()
    );
    Ok(gavel_bin)
}

/// `run`: one scenario against a running Gavel, audited.
async fn run_scenario(args: RunArgs) -> anyhow::Result<()> {
    gavel_loadtest::priority::ensure_valid(args.generator_nice)?;
    let scenario = load_scenario(&args.scenario, &args.shape)?;
    let trace = match &scenario.trace {
        Some(source) => Some(trace::load(&source.file)?),
        None => None,
    };
    let target = generator::Target {
        api: args.target.trim_end_matches('/').to_owned(),
        metrics: Some(args.metrics),
        jwt_secret: args.jwt_secret,
        jwt_audience: args.jwt_audience,
        disk_probe: args.disk_probe,
        cpu: cpu::CpuWatch {
            gavel: args.gavel_pid,
            ..Default::default()
        },
        generator_nice: args.generator_nice,
    };
    let output = generator::run(&scenario, trace.as_deref(), &target).await?;
    if let Some(path) = args.record_trace {
        record_trace(&path, &output)?;
    }
    let audit = audit::audit_run(&args.database_url, &output).await?;
    let mut report = RunReport::new(&args.mode, &scenario, &output, audit);
    report.set_freshness(
        freshness::measure(&args.database_url, &output).await?,
        &scenario,
    );
    let out = args.out.unwrap_or_else(|| {
        PathBuf::from(format!(
            "{}-{}-{}.json",
            scenario.name,
            args.mode,
            chrono::Utc::now().format("%Y%m%d-%H%M%S")
        ))
    });
    report.save(&out)?;
    eprintln!("{}", report.summary_text());
    for check in &report.audit.checks {
        eprintln!(
            "  {} {}: {}",
            if check.passed { "ok  " } else { "FAIL" },
            check.name,
            check.detail
        );
    }
    eprintln!("run report: {}", out.display());
    anyhow::ensure!(report.audit.passed, "the audit failed");
    Ok(())
}

/// Writes the bids a run sent as a trace, in the order they were meant to go.
fn record_trace(path: &Path, output: &generator::RunOutput) -> anyhow::Result<()> {
    let mut sent = output.sent.clone();
    sent.sort_by_key(|b| b.offset_ms);
    let bids: Vec<trace::TraceBid> = sent
        .iter()
        .map(|b| trace::TraceBid {
            offset_ms: b.offset_ms,
            auction: output.auctions[b.auction].label.clone(),
            bidder: b.bidder.clone(),
            amount: b.amount,
        })
        .collect();
    trace::write(path, &bids)?;
    eprintln!("trace of {} bids: {}", bids.len(), path.display());
    Ok(())
}

/// `report`: combine run reports, or draw a combined report again.
fn report(args: ReportArgs) -> anyhow::Result<()> {
    let ReportArgs { runs, out_dir } = args;
    if let [path] = runs.as_slice() {
        if let Some(report) = Report::load_combined(path)? {
            report.write(&out_dir)?;
            eprintln!("report: {}", out_dir.join("report.md").display());
            return Ok(());
        }
    }
    let runs = runs
        .iter()
        .map(|p| RunReport::load(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let scenario = runs[0].scenario.clone();
    let report = Report {
        generated_at: chrono::Utc::now(),
        command: command_line(),
        machine: Machine::detect(String::new()),
        scenario,
        description: String::new(),
        runs,
        ceiling: None,
        ceilings: Vec::new(),
        efficiency: Vec::new(),
        http_floor: Vec::new(),
    };
    report.write(&out_dir)?;
    eprintln!("report: {}", out_dir.join("report.md").display());
    Ok(())
}
