//! The one-writer drain: how fast one resolver works through a backlog of
//! pending bids on one auction, the rate that bounds a hot auction however
//! fast bids are appended. On a fresh database of the bench's private
//! PostgreSQL: an auction created through Gavel's API (its resolver off),
//! a backlog appended to `bid_log` in one statement with Gavel stopped,
//! then Gavel started with its resolver, and the auction's
//! `resolved_count` read every 100 ms until the backlog is gone.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::bench::start_clusters;
use crate::cpu::{CpuProbe, CpuWatch, CpuWindow};
use crate::launch::{Launcher, Server};
use crate::report::Machine;
use gavel::auth::{JwtKeys, Role};
use pg_cluster::PgCluster;

/// The auction's starting price: in the top tier of the default
/// increments (10,000), so each bid of the backlog, 20,000 above the one
/// before, is exactly the next minimum bid.
const STARTING_PRICE: i64 = 1_000_000;
/// Between two bids of the backlog.
const RAISE: i64 = 20_000;
/// Bidders the backlog's bids rotate over.
const BIDDERS: u64 = 1_000;
/// How often progress is read.
const POLL: Duration = Duration::from_millis(100);
/// The database the drain uses (made afresh).
const DATABASE: &str = "gavel_drain";

/// What to drain.
#[derive(Debug, Clone)]
pub struct DrainOptions {
    /// How Gavel is started.
    pub launcher: Launcher,
    /// `GAVEL_*` settings (the environment's win over these).
    pub settings: Vec<(String, String)>,
    /// Pending bids in the backlog.
    pub bids: u64,
    /// Where the private PostgreSQL lives while it runs.
    pub work_dir: PathBuf,
    /// Where `drain.md` and `drain.json` go.
    pub out_dir: PathBuf,
    /// Start a streaming replica (it replays the resolver's writes).
    pub replica: bool,
    /// The longest the drain may take.
    pub timeout: Duration,
    /// The command line, for the report.
    pub command: String,
}

/// Resolved bids at one moment of the drain.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DrainSample {
    /// Seconds since Gavel was being started with its resolver.
    pub t_s: f64,
    /// The auction's `resolved_count`.
    pub resolved: u64,
}

/// What a drain measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrainReport {
    /// When the report was written.
    pub generated_at: DateTime<Utc>,
    /// The command that produced it.
    pub command: String,
    /// Where it was measured.
    pub machine: Machine,
    /// Pending bids in the backlog, all on one auction.
    pub bids: u64,
    /// How long appending the backlog took, in seconds.
    pub preload_s: f64,
    /// From the last reading before the first bid was resolved to the
    /// first reading with none left, in seconds.
    pub drain_s: f64,
    /// `bids / drain_s`.
    pub bids_per_s: f64,
    /// The most bids resolved within one second (between readings at
    /// least a second apart, the closest such pair).
    pub peak_bids_per_s: f64,
    /// The machine's CPU while it drained, when `/proc` could be read.
    pub cpu: Option<CpuWindow>,
    /// Every reading.
    pub samples: Vec<DrainSample>,
}

/// Runs the drain and writes its report into `options.out_dir`.
pub async fn drain(options: DrainOptions) -> anyhow::Result<DrainReport> {
    ensure!(options.bids > 0, "--bids: at least 1");
    std::fs::create_dir_all(&options.out_dir)
        .with_context(|| format!("creating {}", options.out_dir.display()))?;
    let (primary, replica) =
        start_clusters(options.work_dir.clone(), options.replica, false).await?;
    let postgres = primary.psql("postgres", "SHOW server_version")?;
    let measured = measure(&options, &primary, replica.as_ref()).await;
    tokio::task::spawn_blocking(move || drop((replica, primary))).await?;
    let (preload_s, samples, cpu) = measured?;
    let (drain_s, peak) = rates(&samples, options.bids).context("the backlog was not drained")?;
    let report = DrainReport {
        generated_at: Utc::now(),
        command: options.command.clone(),
        machine: Machine::detect(postgres),
        bids: options.bids,
        preload_s,
        drain_s,
        bids_per_s: options.bids as f64 / drain_s,
        peak_bids_per_s: peak,
        cpu,
        samples,
    };
    report.write(&options.out_dir)?;
    Ok(report)
}

/// The drain's steps on a fresh database: the auction, the backlog, then
/// Gavel with its resolver, watched until the backlog is gone.
async fn measure(
    options: &DrainOptions,
    primary: &PgCluster,
    replica: Option<&PgCluster>,
) -> anyhow::Result<(f64, Vec<DrainSample>, Option<CpuWindow>)> {
    primary.psql("postgres", &format!("DROP DATABASE IF EXISTS {DATABASE}"))?;
    primary.psql("postgres", &format!("CREATE DATABASE {DATABASE}"))?;
    let url = primary.url(DATABASE);
    options.launcher.migrate(&url).await?;
    let mut settings: HashMap<String, String> = options.settings.iter().cloned().collect();
    settings.insert("GAVEL_DATABASE_URL".into(), url.clone());
    let replica_url = replica.map(|r| r.url(DATABASE)).unwrap_or_default();
    settings.insert("GAVEL_REPLICA_URLS".into(), replica_url);
    settings.insert("GAVEL_RESOLVER".into(), "off".into());
    let gavel = Server::gavel(&options.launcher, settings.clone()).await?;
    let auction = create_auction(&gavel).await;
    gavel.stop().await?;
    let auction = auction?;
    let preload_s = preload(&url, auction, options.bids).await?;
    settings.insert("GAVEL_RESOLVER".into(), "on".into());
    // Readings start before Gavel does: its resolver may begin before
    // Gavel answers as ready.
    let readings = tokio::spawn(read_progress(
        connect(&url).await?,
        auction,
        options.clone(),
    ));
    let gavel = match Server::gavel(&options.launcher, settings).await {
        Ok(gavel) => gavel,
        Err(e) => {
            readings.abort();
            return Err(e);
        }
    };
    let watch = CpuWatch {
        gavel: gavel.pid(),
        primary: primary.postmaster_pid(),
        replica: replica.and_then(PgCluster::postmaster_pid),
        floor: false,
    };
    let probe = CpuProbe::start(watch, Instant::now()).ok();
    let samples = readings.await;
    let cpu = probe.and_then(|p| p.stop().window(0, usize::MAX));
    gavel.stop().await?;
    Ok((preload_s, samples??, cpu))
}

/// Creates the auction through Gavel's API, as a seller, ending in a day.
async fn create_auction(gavel: &Server) -> anyhow::Result<Uuid> {
    let target = gavel.target();
    let keys = JwtKeys::new(&target.jwt_secret, &target.jwt_audience);
    let seller = keys.mint("drain-seller", &[Role::Seller], 3600);
    let ends_at = Utc::now() + chrono::Duration::days(1);
    let body = serde_json::json!({
        "title": "Load test: one-writer drain",
        "currency": "GLD",
        "starting_price": STARTING_PRICE,
        "ends_at": ends_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    });
    let response = reqwest::Client::new()
        .post(format!("{}/api/auctions", gavel.api()))
        .bearer_auth(seller)
        .json(&body)
        .send()
        .await?;
    let status = response.status();
    let text = response.text().await?;
    ensure!(
        status == reqwest::StatusCode::CREATED,
        "creating the auction answered {status}: {text}"
    );
    #[derive(Deserialize)]
    struct Created {
        id: Uuid,
    }
    Ok(serde_json::from_str::<Created>(&text)?.id)
}

/// Appends `bids` pending bids on `auction` in one statement, with only
/// the columns every bid is written with: the schema queues them as it
/// queues any bid appended pending. Amounts rise by two increments from
/// bid to bid, over [`BIDDERS`] bidders. Returns the seconds it took
/// (statistics refreshed after it, as autovacuum would have).
async fn preload(url: &str, auction: Uuid, bids: u64) -> anyhow::Result<f64> {
    eprintln!("appending a backlog of {bids} pending bids on one auction ...");
    let client = connect(url).await?;
    let by_transaction: bool = client
        .query_one(crate::bench::BY_TRANSACTION, &[])
        .await?
        .get(0);
    let (xid_column, xid_value) = crate::bench::append_xid(by_transaction);
    let started = Instant::now();
    let appended = client
        .execute(
            &format!(
                "INSERT INTO bid_log (auction_id, id, bidder_id, amount, idempotency_key{xid_column}) \
                 SELECT $1, gen_random_uuid(), 'bidder-' || (g % $2), $3 + g * $4, 'drain-' || g{xid_value} \
                 FROM generate_series(1, $5::bigint) AS g"
            ),
            &[
                &auction,
                &(BIDDERS as i64),
                &STARTING_PRICE,
                &RAISE,
                &(bids as i64),
            ],
        )
        .await
        .context("appending the backlog")?;
    let preload_s = started.elapsed().as_secs_f64();
    ensure!(appended == bids, "{appended} of {bids} bids appended");
    client.batch_execute("ANALYZE").await?;
    eprintln!("appended in {preload_s:.1} s");
    Ok(preload_s)
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connecting to the drain's database")?;
    tokio::spawn(connection);
    Ok(client)
}

/// Reads the auction's `resolved_count` every [`POLL`] from now until
/// every bid is resolved (or the timeout).
async fn read_progress(
    client: tokio_postgres::Client,
    auction: Uuid,
    options: DrainOptions,
) -> anyhow::Result<Vec<DrainSample>> {
    let started = Instant::now();
    let mut samples: Vec<DrainSample> = Vec::new();
    let mut tick = tokio::time::interval(POLL);
    while samples.last().is_none_or(|s| s.resolved < options.bids) {
        tick.tick().await;
        ensure!(
            started.elapsed() < options.timeout,
            "{} of {} bids resolved after {:?}",
            samples.last().map_or(0, |s| s.resolved),
            options.bids,
            options.timeout
        );
        let row = client
            .query_one(
                "SELECT resolved_count FROM auctions WHERE id = $1",
                &[&auction],
            )
            .await?;
        let resolved = row.get::<_, i64>(0) as u64;
        let t_s = started.elapsed().as_secs_f64();
        if samples.len() % 10 == 9 {
            eprintln!("{t_s:5.1} s: {resolved} of {} bids resolved", options.bids);
        }
        samples.push(DrainSample { t_s, resolved });
    }
    Ok(samples)
}

/// The drain's length, from the last reading with nothing resolved to the
/// first with all `bids` resolved, and the most bids resolved between two
/// readings at least a second apart (the closest such pair), per second.
/// None when the readings never reach `bids`.
pub fn rates(samples: &[DrainSample], bids: u64) -> Option<(f64, f64)> {
    let end = samples.iter().position(|s| s.resolved >= bids)?;
    let start = samples[..end].iter().rposition(|s| s.resolved == 0)?;
    let drain_s = samples[end].t_s - samples[start].t_s;
    let peak = (start..end)
        .filter_map(|i| {
            let a = samples[i];
            let b = samples[i..].iter().find(|b| b.t_s - a.t_s >= 1.0)?;
            Some(b.resolved.saturating_sub(a.resolved) as f64 / (b.t_s - a.t_s))
        })
        .reduce(f64::max)
        // A drain within a second: its whole rate.
        .unwrap_or(bids as f64 / drain_s);
    (drain_s > 0.0).then_some((drain_s, peak))
}

impl DrainReport {
    /// Writes `drain.json` and `drain.md` into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::write(dir.join("drain.json"), serde_json::to_vec_pretty(self)?)?;
        std::fs::write(dir.join("drain.md"), self.markdown())?;
        Ok(())
    }

    /// The report as Markdown.
    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut md = format!(
            "# One-writer drain\n\n- Measured {} on {} CPUs ({}), {} GiB, Linux {}, {}.\n- Command: `{}`\n- Every reading: [drain.json](drain.json).\n\n",
            self.generated_at.format("%Y-%m-%d %H:%M UTC"),
            m.cpus, m.cpu_model, m.memory_gib, m.kernel, m.postgres, self.command
        );
        md.push_str(&format!(
            "A backlog of {} pending bids on one auction (appended in one statement in {:.1} s, Gavel stopped), then Gavel with one resolver, the auction's `resolved_count` read every {} ms.\n\n\
             - **{:.0} bids/s** over the whole drain ({:.2} s)\n- **{:.0} bids/s** at its fastest second\n",
            self.bids, self.preload_s, POLL.as_millis(), self.bids_per_s, self.drain_s, self.peak_bids_per_s
        ));
        self.cpu_table(&mut md);
        self.seconds_table(&mut md);
        md
    }

    /// Where the CPU went while it drained, per bid resolved.
    fn cpu_table(&self, md: &mut String) {
        let Some(cpu) = &self.cpu else { return };
        let per_bid = |cores: f64| cores * cpu.seconds as f64 * 1e6 / self.bids as f64;
        md.push_str(&format!(
            "\n## Where the CPU went\n\nOver the {} s measured; CPU time per bid resolved.\n\n| process | share of the machine | per bid |\n| --- | ---: | ---: |\n",
            cpu.seconds
        ));
        let rows = (cpu.groups.iter().map(|(n, c)| (group_name(n), *c))).chain([
            ("other processes", cpu.other),
            ("**machine busy**", cpu.busy),
        ]);
        for (name, cores) in rows {
            md.push_str(&format!(
                "| {name} | {:.1}% | {:.1} µs |\n",
                cpu.share_pct(cores),
                per_bid(cores)
            ));
        }
    }

    /// Bids resolved by the end of each second.
    fn seconds_table(&self, md: &mut String) {
        md.push_str(
            "\n## Progress\n\n| second | resolved | in that second |\n| ---: | ---: | ---: |\n",
        );
        let mut before = 0;
        for second in 1.. {
            let Some(s) = self.samples.iter().rev().find(|s| s.t_s <= second as f64) else {
                break;
            };
            md.push_str(&format!(
                "| {second} | {} | {} |\n",
                s.resolved,
                s.resolved - before
            ));
            before = s.resolved;
            if s.resolved >= self.bids {
                break;
            }
        }
    }
}

/// A CPU group's name in the drain's report: this process only reads the
/// progress here, it generates no load.
fn group_name(name: &str) -> &str {
    match name {
        "load generator" => "gavel-loadtest (the readings)",
        name => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t_s: f64, resolved: u64) -> DrainSample {
        DrainSample { t_s, resolved }
    }

    #[test]
    fn the_drain_runs_from_the_last_idle_reading_to_the_first_empty_one() {
        let samples = [
            at(0.0, 0),
            at(0.1, 0),
            at(0.2, 0),
            at(0.3, 1_000),
            at(0.8, 6_000),
            at(1.3, 16_000),
            at(1.8, 19_000),
            at(2.2, 20_000),
            at(2.3, 20_000),
        ];
        let (drain_s, peak) = rates(&samples, 20_000).unwrap();
        assert!((drain_s - 2.0).abs() < 1e-9, "{drain_s}");
        // 0.3 s -> 1.3 s: 15,000 bids in one second, the best pair.
        assert!((peak - 15_000.0).abs() < 1e-6, "{peak}");
        assert_eq!(rates(&samples[..5], 20_000), None, "never drained");
    }

    #[test]
    fn a_drain_within_a_second_peaks_at_its_own_rate() {
        let samples = [at(0.0, 0), at(0.1, 0), at(0.6, 5_000)];
        let (drain_s, peak) = rates(&samples, 5_000).unwrap();
        assert!((drain_s - 0.5).abs() < 1e-9);
        assert!((peak - 10_000.0).abs() < 1e-6, "{peak}");
    }
}
