//! `gavel dev`: a zero-configuration local run. Starts a private PostgreSQL
//! primary and a streaming replica from the machine's server binaries under
//! `.gavel/dev`, migrates, seeds a demo auction ending a few minutes later,
//! serves (reads from the replica), prints what to try (a `curl` and the
//! watch page's URL, each with a ready token), and stops both servers on
//! Ctrl-C. The primary's data is kept between runs; the replica is cloned
//! from it afresh each time. Built only with the `dev` feature,
//! which brings in the `pg_cluster` crate.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context as _;
use chrono::{Duration, Utc};
use pg_cluster::{ClusterOptions, PgCluster};
use uuid::Uuid;

use crate::auth::{JwtKeys, Role};
use crate::config::Config;
use crate::db::{self, auctions};
use crate::rules::{AuctionTerms, Increments};
use crate::{server, telemetry};

/// The signing secret used when `GAVEL_JWT_SECRET` is not set (local only).
const DEV_JWT_SECRET: &str = "gavel-dev-secret-not-for-production-use";
/// Where the private cluster lives, relative to the working directory.
const DEV_DIR: &str = ".gavel/dev";

/// Runs `gavel dev` until Ctrl-C.
pub async fn run() -> anyhow::Result<()> {
    let log = std::env::var("GAVEL_LOG").unwrap_or_else(|_| "info".into());
    let json = std::env::var("GAVEL_LOG_FORMAT").is_ok_and(|f| f == "json");
    telemetry::init_tracing(&log, json);

    let dir = std::env::current_dir()?.join(DEV_DIR);
    println!("Starting a private PostgreSQL in {} ...", dir.display());
    let (cluster, replica) = start_clusters(dir).await?;
    let database_url = cluster.url("gavel");
    let replica_url = replica.url("gavel");

    let config = dev_config(&database_url, &replica_url)?;
    db::migrate(&config.database_url).await?;
    let keys = JwtKeys::new(&config.auth.jwt_secret, &config.auth.jwt_audience);
    let auction_id = seed_demo_auction(&config).await?;

    let server = server::Server::bind(config).await?;
    let bidder_token = keys.mint("demo-bidder", &[Role::Bidder], 24 * 3600);
    print_welcome(
        &server,
        &database_url,
        &replica_url,
        auction_id,
        &bidder_token,
    );

    let served = server.run_until_signalled().await;
    tokio::task::spawn_blocking(move || {
        drop(replica);
        drop(cluster);
    })
    .await?;
    println!("Stopped.");
    served
}

/// Starts (or restarts) the kept primary with a `gavel` database, and a
/// streaming replica cloned from it afresh.
async fn start_clusters(dir: PathBuf) -> anyhow::Result<(PgCluster, PgCluster)> {
    let mut options = ClusterOptions::new(dir.join("primary"));
    options.reuse = true;
    let replica_options = ClusterOptions::new(dir.join("replica"));
    tokio::task::spawn_blocking(move || {
        let cluster = PgCluster::start(options).context("starting the private PostgreSQL")?;
        if cluster.psql(
            "postgres",
            "SELECT 1 FROM pg_database WHERE datname = 'gavel'",
        )? != "1"
        {
            cluster.psql("postgres", "CREATE DATABASE gavel")?;
        }
        let replica = cluster
            .start_replica(replica_options)
            .context("starting the streaming replica")?;
        anyhow::Ok((cluster, replica))
    })
    .await?
}

/// The configuration from the environment, with the private clusters and a
/// local signing secret for what is not set.
fn dev_config(database_url: &str, replica_url: &str) -> anyhow::Result<Config> {
    let defaults: HashMap<&str, String> = HashMap::from([
        ("GAVEL_DATABASE_URL", database_url.to_owned()),
        ("GAVEL_REPLICA_URLS", replica_url.to_owned()),
        ("GAVEL_JWT_SECRET", DEV_JWT_SECRET.to_owned()),
    ]);
    // A variable that is set wins, even empty (`GAVEL_REPLICA_URLS=` reads
    // from the primary only); the private replica is no replica of a
    // database the user chose.
    let own_database = std::env::var_os("GAVEL_DATABASE_URL").is_some();
    Ok(Config::from_lookup(|name| match std::env::var(name) {
        Ok(value) => Some(value),
        Err(_) if name == "GAVEL_REPLICA_URLS" && own_database => None,
        Err(_) => defaults.get(name).cloned(),
    })?)
}

/// Tells the user where everything is and what to try.
fn print_welcome(
    server: &server::Server,
    database_url: &str,
    replica_url: &str,
    auction_id: Uuid,
    bidder_token: &str,
) {
    let api = server.api_addr();
    println!();
    println!("Gavel is running.");
    println!("  API:        http://{api}");
    println!("  Metrics:    http://{}/metrics", server.admin_addr());
    println!("  PostgreSQL: {database_url} (primary)");
    println!("              {replica_url} (streaming replica, serves reads)");
    println!("  Demo auction {auction_id} ends in 5 minutes (30 s soft close).");
    println!();
    println!("Watch it live in a browser, and bid from there:");
    println!("  http://{api}/watch#auction={auction_id}&token={bidder_token}");
    println!("Place a bid:");
    println!(
        "  curl -i -X POST http://{api}/api/auctions/{auction_id}/bids \\\n    \
         -H 'Authorization: Bearer {bidder_token}' \\\n    \
         -H 'Content-Type: application/json' -H \"Idempotency-Key: $(cat /proc/sys/kernel/random/uuid)\" \\\n    \
         -H 'Prefer: wait=2' -d '{{\"amount\": 1500}}'"
    );
    println!("See the auction:");
    println!("  curl -s http://{api}/api/auctions/{auction_id} -H 'Authorization: Bearer {bidder_token}'");
    println!();
    println!("Press Ctrl-C to stop Gavel and its PostgreSQL.");
}

async fn seed_demo_auction(config: &Config) -> anyhow::Result<Uuid> {
    let pool = db::build_pool(
        &config.database_url,
        "dev-seed",
        &db::PoolSettings::new(config, 1, "gavel-dev-seed"),
    )?;
    let client = pool
        .get()
        .await
        .context("connecting to seed the demo auction")?;
    let now = Utc::now();
    let ends_at = now + Duration::minutes(5);
    let auction = auctions::insert(
        &client,
        &auctions::NewAuction {
            id: Uuid::now_v7(),
            title: "Sword of Dawn (legendary)".into(),
            currency: "GLD".into(),
            terms: AuctionTerms {
                seller_id: "demo-seller".into(),
                starting_price: 1000,
                reserve_price: Some(5000),
                increments: Increments::default_table(),
                starts_at: now,
                soft_close: Duration::seconds(30),
                max_end_at: ends_at + Duration::minutes(30),
            },
            ends_at,
            soft_close_s: 30,
        },
    )
    .await?;
    Ok(auction.id)
}
