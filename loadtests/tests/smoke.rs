//! Smoke runs of the load tester against a real Gavel on a private
//! PostgreSQL: a few seconds at a low rate, to check that the generator,
//! the audit and the reports work (benchmarks are run with
//! `loadtests/run.sh`, not here).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use gavel_loadtest::audit;
use gavel_loadtest::bench::{self, BenchOptions, Launcher};
use gavel_loadtest::generator::{self, Fate, Target};
use gavel_loadtest::report::RunReport;
use gavel_loadtest::scenario::Scenario;
use gavel_loadtest::trace;
use pg_cluster::{ClusterOptions, PgCluster};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "smoke-secret-0123456789-abcdefghijklmnop";

fn scenarios() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gavel-loadtest-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Every bid path the bench compares, in its default order.
const MODES: [&str; 4] = ["log", "row_lock", "row_lock_fn", "optimistic"];

/// Settings that keep a smoke run short: auctions settle soon after they end.
fn quick_settings() -> Vec<(String, String)> {
    vec![
        ("GAVEL_STATEMENT_TIMEOUT_MS".into(), "1000".into()),
        ("GAVEL_SETTLE_GRACE_MS".into(), "1500".into()),
        ("GAVEL_LOG".into(), "warn".into()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_every_mode_audits_them_and_writes_the_reports() {
    let path = scenarios().join("smoke.toml");
    let out_dir = scratch("bench-report");
    let report = bench::bench(BenchOptions {
        scenario_path: path.clone(),
        scenario: Scenario::load(&path).unwrap(),
        modes: MODES.map(String::from).to_vec(),
        launcher: Launcher::InProcess,
        out_dir: out_dir.clone(),
        work_dir: scratch("bench-pg"),
        ceiling_s: 2,
        rounds: 1,
        replica: true,
        settings: quick_settings(),
        statements: true,
        generator_nice: 10,
        command: "smoke test".into(),
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "the smoke bench failed (it needs PostgreSQL server binaries and pgbench; \
             Debian: apt-get install -y postgresql): {e:#}"
        )
    });

    assert_eq!(report.runs.len(), MODES.len());
    for run in &report.runs {
        let bids = &run.bids;
        assert!(
            bids.requests >= 50,
            "{}: {} bids offered",
            run.mode,
            bids.requests
        );
        assert!(
            bids.ok > bids.requests / 2,
            "{}: {} of {} bids 2xx",
            run.mode,
            bids.ok,
            bids.requests
        );
        assert_eq!(bids.errors, 0, "{}: {:?}", run.mode, bids.endings);
        assert!(
            run.reads.ok >= 40,
            "{}: {} reads answered",
            run.mode,
            run.reads.ok
        );
        assert!(bids.ok_latency_ms.p99 > 0.0 && bids.ok_latency_ms.p99 < 2_000.0);
        assert!(run.audit.passed, "{}: {:#?}", run.mode, run.audit.checks);
        assert_eq!(run.generator_nice, 10);
        // Five checks across the run, and one replay per auction (hot, warm, warm-2).
        assert_eq!(run.audit.checks.len(), 5 + 3, "{:#?}", run.audit.checks);
        assert_eq!(
            run.audit.bids_in_log,
            run.audit.bids_acknowledged + run.audit.unknown_fate_in_log
        );
        assert!(
            run.server.samples >= 2,
            "Gavel's metrics were read during the run"
        );
        let rss = run
            .server
            .rss_max_mib
            .expect("Gavel exports its resident memory");
        assert!(rss > 1.0, "rss {rss} MiB");
        let from_memory = run
            .server
            .views_from_memory
            .expect("Gavel counts its auction view reads");
        assert!((0.0..=1.0).contains(&from_memory), "{from_memory}");
        let offered: u64 = run.series.bids.iter().map(|p| p.offered).sum();
        assert_eq!(
            offered, bids.requests,
            "every bid is filed under one second"
        );
        // The database's disk was probed beside the run, second by second.
        let disk = run.disk.expect("the disk was probed");
        assert!(disk.seconds >= 1 && disk.slowest_ms > 0.0, "{disk:?}");
        assert!(run.series.disk.iter().map(|s| s.flushes).sum::<u32>() > 10);
        // CPU time was accounted to Gavel (here in the generator's process),
        // the primary's backends and the replica, second by second.
        let cpu = run.cpu.as_ref().expect("CPU use was measured");
        assert_eq!(cpu.window, "the whole run");
        assert!(cpu.cpu.seconds as f64 >= run.duration_s - 1.0, "{cpu:?}");
        let cores = |name: &str| {
            cpu.cpu
                .groups
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, c)| *c)
                .unwrap_or_else(|| panic!("no group {name:?} in {cpu:?}"))
        };
        for group in [
            "load generator and Gavel (one process)",
            "PostgreSQL primary: client backends",
            "PostgreSQL replica: replay and reads",
        ] {
            assert!(
                cores(group) > 0.0,
                "{}: {group} used no CPU: {cpu:?}",
                run.mode
            );
        }
        let watched: f64 = cpu.cpu.groups.iter().map(|(_, c)| c).sum();
        assert!(cpu.cpu.busy + 0.05 >= watched, "{cpu:?}");
        assert!(cpu.us_per_bid(cpu.cpu.busy).is_some_and(|us| us > 0.0));
        let series = run.series.cpu.as_ref().expect("CPU use by second");
        assert!(series.seconds.len() >= cpu.cpu.seconds);
        watchers_saw_every_auction_to_its_end(run);
    }
    // The baselines resolve in the request (the row-lock ones at their
    // receipt, the optimistic one a write after the read that received
    // it); the log path through the resolver.
    let log = &report.runs[0];
    assert!(log.audit.resolver_lag_ms.max > 0.0);
    for baseline in &report.runs[1..] {
        let lag = &baseline.audit.resolver_lag_ms;
        let at_once = if baseline.mode == "optimistic" {
            100.0
        } else {
            1.0
        };
        assert!(lag.p99 < at_once, "{}: {lag:?}", baseline.mode);
        assert!(
            baseline.bids.endings.contains_key("ok"),
            "{}",
            baseline.mode
        );
    }
    let ceiling = report
        .ceiling
        .as_ref()
        .expect("the append ceiling was measured");
    assert!(ceiling.rows_per_s > 1_000.0, "{ceiling:?}");
    // PostgreSQL's and pgbench's CPU while it ran, for its CPU per row.
    assert!(ceiling.cpu_cores.is_some_and(|c| c > 0.0), "{ceiling:?}");

    // The files: every run report, the combined JSON, Markdown and chart.
    for mode in MODES {
        let run = RunReport::load(&out_dir.join(format!("{mode}.json"))).unwrap();
        assert_eq!(run.mode, mode);
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("report.json")).unwrap())
            .unwrap();
    assert_eq!(json["runs"].as_array().unwrap().len(), MODES.len());
    let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    for needle in [
        "| log |",
        "| row_lock |",
        "| row_lock_fn |",
        "| optimistic |",
        "Raw append ceiling",
        "slowest disk flush",
        "Where the CPU went",
        "auction views answered from Gavel's cache",
        "| PostgreSQL primary: client backends |",
        "✔ every bid answered 2xx",
        "ran 10 nice steps below Gavel and PostgreSQL",
        "## Watching and polling",
        "| 12 (hot, warm-2) |",
    ] {
        assert!(md.contains(needle), "report.md lacks {needle:?}:\n{md}");
    }
    let pg_log = std::fs::read_to_string(out_dir.join("postgres.log")).unwrap();
    assert!(
        pg_log.contains("checkpoint") || pg_log.contains("database system is ready"),
        "{pg_log}"
    );
    // Each run's statements, as the primary recorded them in its database.
    for (mode, statement) in [
        ("log", "INSERT INTO bid_log"),
        ("row_lock", "FOR UPDATE"),
        ("row_lock_fn", "gavel_place_bid"),
        ("optimistic", "WITH cas AS"),
    ] {
        let profile =
            std::fs::read_to_string(out_dir.join(format!("statements-{mode}.md"))).unwrap();
        let row = profile
            .lines()
            .find(|l| l.starts_with("| ") && l.contains(statement))
            .unwrap_or_else(|| panic!("no {statement:?} in the {mode} profile:\n{profile}"));
        let calls: u64 = row.split('|').nth(1).unwrap().trim().parse().unwrap();
        assert!(calls > 0, "{row}");
    }
    let svg = std::fs::read_to_string(out_dir.join("chart.svg")).unwrap();
    assert!(
        svg.starts_with("<svg")
            && MODES.iter().all(|mode| svg.contains(mode))
            && svg.contains("<polyline")
            && svg.contains("Watchers: versions received"),
        "{}",
        &svg[..200.min(svg.len())]
    );
    std::fs::remove_dir_all(&out_dir).unwrap();
}

/// The smoke scenario's watchers (on `hot` and `warm-2`) each held a
/// stream, received versions timed from their commits, and ended on their
/// auction's final version; the readers' answers were timed too.
fn watchers_saw_every_auction_to_its_end(run: &RunReport) {
    let w = run
        .watchers
        .as_ref()
        .expect("the smoke scenario has watchers");
    assert_eq!(
        (w.watchers, &w.auctions[..]),
        (12, &["hot".to_owned(), "warm-2".to_owned()][..])
    );
    assert!(
        w.counts.connects >= 12 && w.open_max > 0,
        "{}: {w:?}",
        run.mode
    );
    assert!(w.counts.received >= 12, "{}: {w:?}", run.mode);
    assert_eq!(w.counts.initial, 12, "{}: {w:?}", run.mode);
    assert_eq!(w.ended_on_final, 12, "{}: {w:?}", run.mode);
    let delay = &w.commit_to_receipt_ms;
    assert_eq!(w.note, None, "{}: {w:?}", run.mode);
    assert!(
        delay.count > 0 && delay.count + w.without_commit_time == w.counts.received,
        "{}: {w:?}",
        run.mode
    );
    assert!(
        delay.p50 > 0.0 && delay.max < 2_000.0,
        "{}: {w:?}",
        run.mode
    );
    let versions: u64 = run.series.watchers.iter().map(|s| s.versions).sum();
    assert!(
        versions > 0 && versions <= w.counts.received,
        "{versions} {w:?}"
    );
    let reads = run.read_freshness.as_ref().expect("the readers' staleness");
    assert!(reads.answers > 0 && reads.note.is_none(), "{reads:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ramp_is_refined_in_finer_steps_around_its_highest_sustainable_step() {
    let scenario: Scenario = toml::from_str(
        r#"
            name = "smoke-ramp"
            duration_s = 3
            [[auctions]]
            label = "hot"
            bid_share = 1.0
            [bidders]
            count = 40
            [arrival]
            shape = "steps"
            from_rate = 10
            step_factor = 2.0
            step_s = 1
            [readers]
            rate = 10
            [client]
            timeout_ms = 1000
            [sustainable]
            p99_ms = 900
            stop_after_failed_steps = 3
            refine_factor = 1.5
        "#,
    )
    .unwrap();
    scenario.check().unwrap();
    let out_dir = scratch("ramp-report");
    let report = bench::bench(BenchOptions {
        scenario_path: scenarios().join("smoke-ramp.toml"),
        scenario,
        modes: vec!["log".into()],
        launcher: Launcher::InProcess,
        out_dir: out_dir.clone(),
        work_dir: scratch("ramp-pg"),
        ceiling_s: 0,
        rounds: 1,
        replica: false,
        settings: quick_settings(),
        statements: false,
        generator_nice: 0,
        command: "smoke test".into(),
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "the ramp bench failed (it needs PostgreSQL server binaries; \
             Debian: apt-get install -y postgresql): {e:#}"
        )
    });

    let [ramp, refining] = &report.runs[..] else {
        panic!("expected the ramp and its refining pass: {:?}", report.runs);
    };
    assert!(!ramp.refining && refining.refining);
    let best = ramp
        .max_sustainable_bids_per_s
        .unwrap_or_else(|| panic!("no step of the ramp held: {:#?}", ramp.steps));
    // Two steps of 1.5x below the ramp's best, the best itself, then up.
    let rates: Vec<f64> = refining.steps.iter().map(|s| s.rate).collect();
    assert!(rates.len() >= 4, "{rates:?}");
    assert!((rates[0] - best / 2.25).abs() < 1e-6, "{best} {rates:?}");
    assert!((rates[2] - best).abs() < 1e-6, "{best} {rates:?}");
    assert!((rates[3] - best * 1.5).abs() < 1e-6, "{best} {rates:?}");
    assert!(refining.audit.passed, "{:#?}", refining.audit.checks);
    assert!(refining.bids.ok > 0);
    // The round's rate is the highest step held in either pass.
    let held = ramp
        .steps
        .iter()
        .chain(&refining.steps)
        .filter(|s| s.sustainable)
        .map(|s| s.rate)
        .fold(0.0, f64::max);
    assert_eq!(report.comparisons()[0].log, Some(held));
    let saved = RunReport::load(&out_dir.join("log-refining.json")).unwrap();
    assert!(saved.refining);
    let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    assert!(md.contains("**log refining**"), "{md}");
    std::fs::remove_dir_all(&out_dir).unwrap();
}

/// A private primary with a migrated database and a Gavel serving it.
struct Served {
    _cluster: PgCluster,
    database_url: String,
    api: String,
    metrics: String,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn serve(name: &str) -> Served {
    let dir = scratch(name);
    let cluster = tokio::task::spawn_blocking(move || {
        let cluster = PgCluster::start(ClusterOptions::new(dir)).expect(
            "the smoke tests need PostgreSQL server binaries (Debian: apt-get install -y postgresql)",
        );
        cluster.psql("postgres", "CREATE DATABASE gavel").unwrap();
        cluster
    })
    .await
    .unwrap();
    let database_url = cluster.url("gavel");
    gavel::db::migrate(&database_url).await.unwrap();
    let mut settings: Vec<(String, String)> = quick_settings();
    settings.extend([
        ("GAVEL_DATABASE_URL".into(), database_url.clone()),
        ("GAVEL_JWT_SECRET".into(), SECRET.into()),
        ("GAVEL_LISTEN".into(), "127.0.0.1:0".into()),
        ("GAVEL_ADMIN_LISTEN".into(), "127.0.0.1:0".into()),
    ]);
    let config = gavel::config::Config::from_lookup(|name| {
        settings
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    })
    .unwrap();
    let server = gavel::server::Server::bind(config).await.unwrap();
    let (api, admin) = (server.api_addr(), server.admin_addr());
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(server.run(shutdown.clone()));
    Served {
        _cluster: cluster,
        database_url,
        api: format!("http://{api}"),
        metrics: format!("http://{admin}/metrics"),
        shutdown,
        handle,
    }
}

impl Served {
    async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_is_recorded_replayed_by_the_cli_and_a_tampered_log_fails_the_audit() {
    let served = serve("cli").await;
    let work = scratch("cli-files");
    std::fs::create_dir_all(&work).unwrap();
    let trace_path = work.join("recorded.csv");
    let run_json = work.join("run.json");
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_gavel-loadtest"))
            .args(args)
            .env("GAVEL_JWT_SECRET", SECRET)
            .env("GAVEL_DATABASE_URL", &served.database_url)
            .output()
            .unwrap()
    };

    // A synthetic run through the CLI, recording what it sent as a trace.
    let smoke = scenarios().join("smoke.toml");
    let out = cli(&[
        "run",
        smoke.to_str().unwrap(),
        "--target",
        &served.api,
        "--metrics",
        &served.metrics,
        "--duration-s",
        "2",
        "--out",
        run_json.to_str().unwrap(),
        "--record-trace",
        trace_path.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "gavel-loadtest run failed:\n{stderr}");
    assert!(
        stderr.contains("bids: offered"),
        "live progress is printed:\n{stderr}"
    );
    let run = RunReport::load(&run_json).unwrap();
    assert!(run.audit.passed, "{:#?}", run.audit.checks);
    let recorded = trace::load(&trace_path).unwrap();
    assert_eq!(recorded.len() as u64, run.bids.requests);

    // Replay the recording at 4x through a scenario that points at it.
    let replay = work.join("replay.toml");
    std::fs::write(
        &replay,
        std::fs::read_to_string(scenarios().join("trace-replay.toml"))
            .unwrap()
            .replace("../traces/final-seconds.csv", "recorded.csv")
            .replace("speed = 2.0", "speed = 4.0"),
    )
    .unwrap();
    let replay_json = work.join("replay.json");
    let out = cli(&[
        "run",
        replay.to_str().unwrap(),
        "--target",
        &served.api,
        "--metrics",
        &served.metrics,
        "--mode",
        "replay",
        "--out",
        replay_json.to_str().unwrap(),
        "--generator-nice",
        "5",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replayed = RunReport::load(&replay_json).unwrap();
    assert_eq!(
        replayed.bids.requests, run.bids.requests,
        "every recorded bid is replayed"
    );
    assert!(
        replayed.duration_s < run.duration_s,
        "4x faster: {} s vs {} s",
        replayed.duration_s,
        run.duration_s
    );
    assert!(replayed.audit.passed, "{:#?}", replayed.audit.checks);
    assert_eq!(
        replayed.generator_nice, 5,
        "the replay ran at the asked priority"
    );
    assert_eq!(
        run.generator_nice, 0,
        "`run` sends at its own priority by default"
    );

    // A priority out of range is refused before anything is sent.
    let out = cli(&[
        "run",
        smoke.to_str().unwrap(),
        "--target",
        &served.api,
        "--generator-nice",
        "20",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("must be 0 to 19"), "{stderr}");

    // A scenario with a mistake is refused with the field named.
    let bad = work.join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&smoke)
            .unwrap()
            .replace("bid_share = 0.2", "bid_share = 0.3"),
    )
    .unwrap();
    let out = cli(&["run", bad.to_str().unwrap(), "--target", &served.api]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bid_share must add up to 1"), "{stderr}");

    // The audit catches a lost bid and a wrongly resolved one.
    let scenario = Scenario::load(&smoke)
        .unwrap()
        .scaled(1.0, Some(2.0))
        .unwrap();
    let target = Target {
        api: served.api.clone(),
        metrics: None,
        jwt_secret: SECRET.into(),
        jwt_audience: "gavel".into(),
        disk_probe: None,
        cpu: Default::default(),
        generator_nice: 0,
    };
    let output = generator::run(&scenario, None, &target).await.unwrap();
    let audit_now = || {
        audit::audit(
            &served.database_url,
            &output.auctions,
            &output.sent,
            Duration::from_secs(60),
        )
    };
    let clean = audit_now().await.unwrap();
    assert!(clean.passed, "{:#?}", clean.checks);
    let (acked, acked_auction) = output
        .sent
        .iter()
        .find_map(|b| match b.fate {
            Fate::Acked(id) => Some((id, b.auction)),
            _ => None,
        })
        .expect("some bid was acknowledged");
    let other = output.auctions[(acked_auction + 1) % output.auctions.len()].id;
    let (db, connection) = tokio_postgres::connect(&served.database_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    db.execute("DELETE FROM bid_log WHERE id = $1", &[&acked])
        .await
        .unwrap();
    let changed = db
        .execute(
            "UPDATE bid_outcomes SET prices[1] = COALESCE(prices[1], 0) + 1 \
             WHERE auction_id = $1 AND first_no = 1",
            &[&other],
        )
        .await
        .unwrap();
    assert_eq!(changed, 1, "every smoke auction gets bids");
    let tampered = audit_now().await.unwrap();
    assert!(!tampered.passed);
    let failed: Vec<&str> = tampered
        .checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| c.detail.as_str())
        .collect();
    assert!(
        failed
            .iter()
            .any(|d| d.contains(&format!("bid {acked}")) && d.contains("0 matching rows")),
        "{failed:#?}"
    );
    assert!(
        failed.iter().any(|d| d.contains("price after")),
        "{failed:#?}"
    );

    served.stop().await;
    std::fs::remove_dir_all(&work).unwrap();
}

/// The HTTP floor answers the generator's requests with no database, as a
/// process of its own (`gavel-loadtest floor`) and in `bench --modes floor`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_floor_answers_every_request_and_the_bench_runs_the_scenario_against_it() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut floor = Command::new(env!("CARGO_BIN_EXE_gavel-loadtest"))
        .args(["floor", "--listen", &format!("127.0.0.1:{port}")])
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let url = format!(
        "http://127.0.0.1:{port}/api/auctions/{}/bids",
        uuid::Uuid::nil()
    );
    let mut answer = None;
    for _ in 0..100 {
        if let Ok(r) = http.post(&url).body(r#"{"amount": 100}"#).send().await {
            answer = Some((r.status().as_u16(), r.text().await.unwrap()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = floor.kill();
    let _ = floor.wait();
    let (status, body) = answer.expect("the floor answered");
    assert_eq!(status, 202, "{body}");
    assert!(body.contains(r#""status":"pending""#), "{body}");

    let path = scenarios().join("smoke.toml");
    let mut scenario = Scenario::load(&path).unwrap();
    scenario.watchers = None;
    let out_dir = scratch("floor-report");
    let report = bench::bench(BenchOptions {
        scenario_path: path,
        scenario,
        modes: vec!["floor".into()],
        launcher: Launcher::InProcess,
        out_dir: out_dir.clone(),
        work_dir: scratch("floor-pg"),
        ceiling_s: 0,
        rounds: 1,
        replica: false,
        settings: Vec::new(),
        statements: false,
        generator_nice: 0,
        command: "smoke test".into(),
    })
    .await
    .unwrap();
    let run = &report.runs[0];
    assert_eq!(run.mode, "floor");
    assert!(run.bids.requests >= 50, "{:?}", run.bids);
    assert_eq!(run.bids.ok, run.bids.requests, "{:?}", run.bids.endings);
    assert!(run.reads.ok >= 40, "{:?}", run.reads.endings);
    assert!(run.targets.is_empty(), "the floor is held to no target");
    let cpu = run.cpu.as_ref().expect("CPU use was measured");
    assert!(cpu.requests.is_some_and(|n| n >= run.bids.ok), "{cpu:?}");
    assert!(
        (cpu.cpu.groups.iter()).any(|(n, _)| n == "load generator and HTTP floor (one process)"),
        "{cpu:?}"
    );
    let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    assert!(
        md.contains("| floor |") && md.contains("not audited"),
        "{md}"
    );
    std::fs::remove_dir_all(&out_dir).unwrap();
}

/// A backlog appended straight into `bid_log` on one auction is queued by
/// the schema and drained by one resolver, and the drain's report says how
/// fast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_on_one_auction_is_drained_by_one_resolver() {
    let out_dir = scratch("drain-report");
    let report = gavel_loadtest::drain::drain(gavel_loadtest::drain::DrainOptions {
        launcher: Launcher::InProcess,
        settings: quick_settings(),
        bids: 5_000,
        work_dir: scratch("drain-pg"),
        out_dir: out_dir.clone(),
        replica: false,
        timeout: Duration::from_secs(60),
        command: "smoke test".into(),
    })
    .await
    .unwrap_or_else(|e| panic!("the drain failed: {e:#}"));
    assert_eq!(report.bids, 5_000);
    assert_eq!(report.samples.last().unwrap().resolved, 5_000);
    assert!(
        report.drain_s > 0.0 && report.bids_per_s > 0.0,
        "{report:?}"
    );
    assert!(report.peak_bids_per_s > 0.0, "{report:?}");
    let md = std::fs::read_to_string(out_dir.join("drain.md")).unwrap();
    assert!(
        md.contains("# One-writer drain") && md.contains("bids/s** over the whole drain"),
        "{md}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("drain.json")).unwrap())
            .unwrap();
    assert_eq!(json["bids"], 5_000);
    std::fs::remove_dir_all(&out_dir).unwrap();
}
