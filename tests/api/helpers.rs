//! Test harness: one private PostgreSQL cluster per test process (started
//! from the machine's server binaries, never a system service), a migrated
//! template database, a fresh database per test, and the real `serve` code
//! booted on port 0.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use gavel::auth::{JwtKeys, Role};
use gavel::config::Config;
use gavel::rules::{self, AuctionState, AuctionTerms, BidInput, Increments, Leader};
use gavel::server::Server;
use pg_cluster::{ClusterOptions, PgCluster};
use reqwest::{Response, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const SECRET: &str = "test-secret-0123456789-abcdefghijklmnop";
pub const TEMPLATE_DB: &str = "gavel_template";

/// Options of a throwaway test cluster in the temp directory.
fn test_cluster_options(name: &str) -> ClusterOptions {
    let dir = std::env::temp_dir().join(format!("gavel-test-{}{name}", std::process::id()));
    let mut options = ClusterOptions::new(dir);
    options.settings = vec![
        ("fsync".into(), "off".into()),
        // A standby needs at least the primary's max_connections.
        ("max_connections".into(), "300".into()),
        // Every test database is written to the WAL; keep enough of it that
        // a replica being cloned or catching up never misses a segment.
        ("wal_keep_size".into(), "256MB".into()),
    ];
    options
}

/// The process-wide cluster with its migrated template database.
pub fn cluster() -> &'static PgCluster {
    static CLUSTER: OnceLock<PgCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let cluster = PgCluster::start(test_cluster_options("")).unwrap_or_else(|e| {
            panic!(
                "the integration tests need PostgreSQL server binaries \
                 (Debian: apt-get install -y postgresql): {e:#}"
            )
        });
        cluster
            .psql("postgres", &format!("CREATE DATABASE {TEMPLATE_DB}"))
            .expect("create template database");
        let url = cluster.url(TEMPLATE_DB);
        // Migrate on a runtime of its own: this may run inside a test's runtime.
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(gavel::db::migrate(&url))
        })
        .join()
        .unwrap()
        .expect("migrate template database");
        cluster
    })
}

/// A primary of its own with a migrated `gavel` database, for a test that
/// restarts it.
pub async fn start_private_primary() -> PgCluster {
    start_primary_and_replicas(0).await.0
}

/// A primary of its own and `count` streaming replicas of it, for a test
/// that pauses or stops replicas without touching any other test.
pub async fn start_primary_and_replicas(count: usize) -> (PgCluster, Vec<PgCluster>) {
    cluster(); // fail early with the install hint when PostgreSQL is missing
    let id = Uuid::new_v4().simple().to_string();
    let (primary, replicas) = tokio::task::spawn_blocking(move || {
        let primary = PgCluster::start(test_cluster_options(&format!("-primary-{id}")))?;
        primary.psql("postgres", "CREATE DATABASE gavel")?;
        let replicas = (1..=count)
            .map(|n| primary.start_replica(test_cluster_options(&format!("-replica{n}-{id}"))))
            .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::Ok((primary, replicas))
    })
    .await
    .unwrap()
    .expect("start a private primary and its replicas");
    gavel::db::migrate(&primary.url("gavel"))
        .await
        .expect("migrate the private primary");
    (primary, replicas)
}

/// Runs a blocking cluster operation (`stop`, `start_again`) off the runtime.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// A response header as text ("" when absent).
pub fn header(response: &Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// A fresh database cloned from the migrated template; returns its URL.
pub async fn fresh_database() -> String {
    create_database(TEMPLATE_DB).await
}

/// A fresh database without Gavel's schema; returns its URL.
pub async fn empty_database() -> String {
    create_database("template1").await
}

async fn create_database(template: &str) -> String {
    let cluster = cluster();
    let name = format!("test_{}", Uuid::new_v4().simple());
    let admin = connect(&cluster.url("postgres")).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
        .await
        .expect("create test database");
    cluster.url(&name)
}

/// A plain connection (outside Gavel's pools).
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to test database");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Test configuration: port 0 listeners, fast polling, short settle grace.
pub fn test_config(database_url: &str) -> Config {
    let vars: HashMap<&str, String> = test_env(database_url).into_iter().collect();
    Config::from_lookup(|name| vars.get(name).cloned()).expect("test config is valid")
}

/// The `GAVEL_*` variables of a test server.
pub fn test_env(database_url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("GAVEL_DATABASE_URL", database_url.to_owned()),
        ("GAVEL_JWT_SECRET", SECRET.to_owned()),
        ("GAVEL_LISTEN", "127.0.0.1:0".to_owned()),
        ("GAVEL_ADMIN_LISTEN", "127.0.0.1:0".to_owned()),
        ("GAVEL_RESOLVER_POLL_MS", "200".to_owned()),
        ("GAVEL_STATEMENT_TIMEOUT_MS", "1000".to_owned()),
        ("GAVEL_SETTLE_GRACE_MS", "1000".to_owned()),
        ("GAVEL_LOG", "warn".to_owned()),
        // Load-shaped tests send many bids per bidder; the limit has its own test.
        ("GAVEL_BID_RATE_LIMIT", "0".to_owned()),
    ]
}

/// A running Gavel (in this process) on its own fresh database.
pub struct TestApp {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub database_url: String,
    pub http: reqwest::Client,
    pub keys: JwtKeys,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    /// Boots the real server code on a fresh database.
    pub async fn spawn() -> TestApp {
        Self::spawn_with(|_| {}).await
    }

    /// Boots with a configuration tweak.
    pub async fn spawn_with(tweak: impl FnOnce(&mut Config)) -> TestApp {
        let database_url = fresh_database().await;
        Self::spawn_on(&database_url, tweak).await
    }

    /// Boots on an existing database.
    pub async fn spawn_on(database_url: &str, tweak: impl FnOnce(&mut Config)) -> TestApp {
        let mut config = test_config(database_url);
        tweak(&mut config);
        let keys = JwtKeys::new(&config.auth.jwt_secret, &config.auth.jwt_audience);
        let server = Server::bind(config).await.expect("bind test server");
        let addr = server.api_addr();
        let admin_addr = server.admin_addr();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));
        TestApp {
            addr,
            admin_addr,
            database_url: database_url.to_owned(),
            http: http_client(),
            keys,
            shutdown,
            task: Some(task),
        }
    }

    /// Stops the server and waits for it to finish.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await
                .expect("server task")
                .expect("server ran cleanly");
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn token(&self, sub: &str, roles: &[Role]) -> String {
        self.keys.mint(sub, roles, 3600)
    }

    pub async fn db(&self) -> tokio_postgres::Client {
        connect(&self.database_url).await
    }

    /// One scrape of the admin listener's `/metrics` (Prometheus text).
    pub async fn metrics_text(&self) -> String {
        self.http
            .get(format!("http://{}/metrics", self.admin_addr))
            .send()
            .await
            .expect("scrape /metrics")
            .text()
            .await
            .unwrap()
    }

    /// Creates an auction as `seller`, overriding fields of a valid body.
    pub async fn create_auction(&self, seller: &str, overrides: Value) -> Value {
        let mut body = json!({
            "title": "Sword of Dawn (legendary)",
            "currency": "GLD",
            "starting_price": 1000,
            "ends_at": (Utc::now() + chrono::Duration::hours(1)).to_rfc3339(),
        });
        for (k, v) in overrides.as_object().expect("overrides are an object") {
            body[k] = v.clone();
        }
        // A busy machine may answer the set-up 503 with Retry-After, as
        // the contract allows (a new process's first connection, say):
        // tried again a few times, since it is not what a test checks.
        for attempt in 1.. {
            let response = self
                .http
                .post(self.url("/api/auctions"))
                .bearer_auth(self.token(seller, &[Role::Seller]))
                .json(&body)
                .send()
                .await
                .expect("create auction");
            if response.status() == StatusCode::SERVICE_UNAVAILABLE && attempt < 4 {
                eprintln!("create auction: 503 (attempt {attempt}), trying again in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            assert_eq!(
                response.status(),
                StatusCode::CREATED,
                "create auction: {body}"
            );
            return response.json().await.unwrap();
        }
        unreachable!("the loop returns or panics")
    }

    /// Places a bid over HTTP.
    pub async fn bid(&self, bidder: &str, auction_id: &str, amount: i64, key: &str) -> Response {
        place_bid(
            &self.http,
            self.addr,
            &self.token(bidder, &[]),
            auction_id,
            amount,
            key,
        )
        .await
    }

    /// Reads an auction over HTTP.
    pub async fn auction(&self, auction_id: &str) -> Value {
        let response = self
            .http
            .get(self.url(&format!("/api/auctions/{auction_id}")))
            .bearer_auth(self.token("reader", &[]))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.unwrap()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(64)
        .build()
        .unwrap()
}

/// `POST /api/auctions/{id}/bids` with a fresh token.
pub async fn place_bid(
    http: &reqwest::Client,
    addr: SocketAddr,
    token: &str,
    auction_id: &str,
    amount: i64,
    key: &str,
) -> Response {
    http.post(format!("http://{addr}/api/auctions/{auction_id}/bids"))
        .bearer_auth(token)
        .header("Idempotency-Key", key)
        .json(&json!({ "amount": amount }))
        .send()
        .await
        .expect("bid request")
}

/// Places a bid the way a game client does: on `503` (the server shedding
/// load) it retries with the same `Idempotency-Key`, so a retry can never
/// become a second bid.
pub async fn place_bid_retrying(
    http: &reqwest::Client,
    addr: SocketAddr,
    token: &str,
    auction_id: &str,
    amount: i64,
) -> Response {
    place_bid_retrying_key(http, addr, token, auction_id, amount, &new_key()).await
}

/// [`place_bid_retrying`] under `key`, as a client retrying its own bid.
pub async fn place_bid_retrying_key(
    http: &reqwest::Client,
    addr: SocketAddr,
    token: &str,
    auction_id: &str,
    amount: i64,
    key: &str,
) -> Response {
    for _ in 0..20 {
        let response = place_bid(http, addr, token, auction_id, amount, key).await;
        if response.status() != StatusCode::SERVICE_UNAVAILABLE {
            return response;
        }
        assert!(
            response.headers().contains_key("retry-after"),
            "503 carries Retry-After"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("still overloaded after 20 attempts");
}

/// Waits until no bid of `auction_id` is pending (or panics after `limit`).
pub async fn wait_resolved(db: &tokio_postgres::Client, auction_id: Uuid, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let pending: i64 = db
            .query_one(
                "SELECT count(*) FROM bids WHERE auction_id = $1 AND status = 'pending'",
                &[&auction_id],
            )
            .await
            .unwrap()
            .get(0);
        if pending == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{pending} bids still pending after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `check` until it returns Some, or panics after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One bid row as the audit needs it.
#[derive(Debug, Clone)]
pub struct AuditBid {
    pub id: Uuid,
    pub bidder_id: String,
    pub amount: i64,
    pub received_at: DateTime<Utc>,
    pub status: String,
    pub reason: Option<String>,
    pub price_after: Option<i64>,
    pub resolution_no: Option<i64>,
}

impl AuditBid {
    /// The bid as the auction rules see it.
    pub fn input(&self) -> BidInput {
        BidInput {
            id: self.id,
            bidder_id: self.bidder_id.clone(),
            amount: self.amount,
            received_at: self.received_at,
        }
    }
}

/// Every bid of an auction in resolution order (pending ones last).
pub async fn audit_bids(db: &tokio_postgres::Client, auction_id: Uuid) -> Vec<AuditBid> {
    db.query(
        "SELECT id, bidder_id, amount, received_at, status, reason, price_after, resolution_no \
         FROM bids WHERE auction_id = $1 ORDER BY resolution_no NULLS LAST, seq",
        &[&auction_id],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| AuditBid {
        id: r.get(0),
        bidder_id: r.get(1),
        amount: r.get(2),
        received_at: r.get(3),
        status: r.get(4),
        reason: r.get(5),
        price_after: r.get(6),
        resolution_no: r.get(7),
    })
    .collect()
}

/// Checks the resolver's work on one auction: every bid resolved exactly
/// once (resolution numbers 1..=n, no gaps, no repeats), at most one leading
/// bid, and the stored state equal to the pure rules replayed over the bids
/// in resolution order. Returns the bids.
pub async fn assert_consistent(db: &tokio_postgres::Client, auction_id: Uuid) -> Vec<AuditBid> {
    let bids = audit_bids(db, auction_id).await;
    for (i, bid) in bids.iter().enumerate() {
        assert_eq!(
            bid.resolution_no,
            Some(i as i64 + 1),
            "bid {} resolution order",
            bid.id
        );
        assert_ne!(bid.status, "pending");
    }
    let row = db
        .query_one(
            "SELECT seller_id, starting_price, reserve_price, increments, starts_at, \
             original_ends_at, ends_at, soft_close_s, max_end_at, status, leader_bid_id, \
             leader_bidder_id, leader_max, current_price, bid_count, resolved_count, winner_id \
             FROM auctions WHERE id = $1",
            &[&auction_id],
        )
        .await
        .unwrap();
    let increments: Increments = serde_json::from_value(row.get::<_, Value>(3)).unwrap();
    let terms = AuctionTerms {
        seller_id: row.get(0),
        starting_price: row.get(1),
        reserve_price: row.get(2),
        increments,
        starts_at: row.get(4),
        soft_close: chrono::Duration::seconds(i64::from(row.get::<_, i32>(7))),
        max_end_at: row.get(8),
    };
    let mut expected = AuctionState::opening(row.get(5));
    let mut leading = HashMap::new();
    for bid in &bids {
        let applied = rules::apply_bid(&terms, &mut expected, &bid.input());
        assert_eq!(
            applied.price_after, bid.price_after,
            "price after bid {}",
            bid.id
        );
        if let rules::Outcome::Rejected(reason) = applied.outcome {
            assert_eq!(
                bid.reason.as_deref(),
                Some(reason.as_str()),
                "reason of {}",
                bid.id
            );
        }
        leading.insert(bid.id, applied.outcome == rules::Outcome::Leading);
        if let Some(displaced) = applied.displaced {
            leading.insert(displaced, false);
        }
    }
    let closed = row.get::<_, String>(9) == "closed";
    let winner = if closed {
        rules::settle(&terms, &mut expected)
    } else {
        None
    };
    let stored_leader = match (
        row.get::<_, Option<Uuid>>(10),
        row.get::<_, Option<String>>(11),
        row.get::<_, Option<i64>>(12),
    ) {
        (Some(bid_id), Some(bidder_id), Some(max_amount)) => Some(Leader {
            bid_id,
            bidder_id,
            max_amount,
        }),
        _ => None,
    };
    assert_eq!(stored_leader, expected.leader, "leader");
    assert_eq!(
        row.get::<_, Option<i64>>(13),
        expected.price,
        "current_price"
    );
    assert_eq!(row.get::<_, i64>(14), expected.bid_count, "bid_count");
    assert_eq!(row.get::<_, i64>(15), bids.len() as i64, "resolved_count");
    assert_eq!(row.get::<_, DateTime<Utc>>(6), expected.ends_at, "ends_at");
    assert_eq!(
        row.get::<_, Option<String>>(16),
        winner.as_ref().map(|w| w.bidder_id.clone()),
        "winner"
    );

    let live: Vec<&AuditBid> = bids.iter().filter(|b| b.status == "leading").collect();
    if closed {
        assert!(live.is_empty(), "no bid stays leading after settlement");
        let won: Vec<&AuditBid> = bids.iter().filter(|b| b.status == "won").collect();
        assert_eq!(
            won.iter().map(|b| b.id).collect::<Vec<_>>(),
            winner.iter().map(|w| w.bid_id).collect::<Vec<_>>()
        );
    } else {
        let expected_leading: Vec<Uuid> = expected.leader.iter().map(|l| l.bid_id).collect();
        assert_eq!(
            live.iter().map(|b| b.id).collect::<Vec<_>>(),
            expected_leading,
            "exactly the leader's bid is leading"
        );
        for bid in &bids {
            if bid.status == "outbid" {
                assert_eq!(leading.get(&bid.id), Some(&false), "bid {} outbid", bid.id);
            }
        }
    }
    assert_events(db, auction_id, &bids, closed).await;
    bids
}

/// The event log agrees with the bid log: each bid's latest change in
/// `events`, in log order, is its status, and a closed auction has one
/// `auction.settled` row.
async fn assert_events(
    db: &tokio_postgres::Client,
    auction_id: Uuid,
    bids: &[AuditBid],
    closed: bool,
) {
    let latest = event_statuses(db, auction_id, EventOrder::Latest).await;
    for bid in bids {
        assert_eq!(
            latest.get(&bid.id),
            Some(&bid.status),
            "latest event of bid {}",
            bid.id
        );
    }
    let settled: i64 = db
        .query_one(
            "SELECT count(*) FROM events WHERE auction_id = $1 AND kind = 'auction.settled'",
            &[&auction_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(settled, i64::from(closed), "auction.settled rows");
}

/// Which of a bid's changes [`event_statuses`] gives.
pub enum EventOrder {
    /// The first change of each bid in log order: its outcome.
    First,
    /// The latest: where it stands now.
    Latest,
}

/// The status each bid of `auction_id` has in the event log, as its first
/// or its latest change (in log order) says.
pub async fn event_statuses(
    db: &tokio_postgres::Client,
    auction_id: Uuid,
    which: EventOrder,
) -> HashMap<Uuid, String> {
    let order = match which {
        EventOrder::First => "xid DESC, n DESC",
        EventOrder::Latest => "xid, n",
    };
    let rows = db
        .query(
            &format!("SELECT bid_ids, statuses FROM events WHERE auction_id = $1 ORDER BY {order}"),
            &[&auction_id],
        )
        .await
        .unwrap();
    let mut statuses: HashMap<Uuid, String> = HashMap::new();
    for row in &rows {
        let (ids, changes): (Vec<Uuid>, Vec<String>) = (row.get(0), row.get(1));
        statuses.extend(ids.into_iter().zip(changes));
    }
    statuses
}

/// A `gavel serve` child process (the real binary) on `database_url`.
pub struct ServeProcess {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Every JSON log line it printed so far.
    pub logs: Arc<Mutex<Vec<Value>>>,
}

impl ServeProcess {
    /// Starts the binary and waits for it to report its listening address.
    pub async fn start(database_url: &str) -> ServeProcess {
        Self::start_with(database_url, &[]).await
    }

    /// Starts the binary with `GAVEL_*` settings on top of the test ones.
    pub async fn start_with(database_url: &str, settings: &[(&str, &str)]) -> ServeProcess {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_gavel"))
            .arg("serve")
            .envs(test_env(database_url))
            .env("GAVEL_LOG", "info")
            .env("GAVEL_LOG_FORMAT", "json")
            .envs(settings.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn gavel serve");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addr, admin_addr) = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                let Ok(event) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                let fields = &event["fields"];
                if let (Some(api), Some(admin)) = (fields["api"].as_str(), fields["admin"].as_str())
                {
                    return (api.parse().unwrap(), admin.parse().unwrap());
                }
            }
            panic!("gavel serve exited before listening");
        })
        .await
        .expect("gavel serve started in time");
        // Keep reading its output so it never blocks on a full pipe.
        let kept = logs.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(event) = serde_json::from_str::<Value>(&line) {
                    kept.lock().unwrap().push(event);
                }
            }
        });
        ServeProcess {
            child,
            addr,
            admin_addr,
            logs,
        }
    }

    /// A client of this process, with the helpers of [`TestApp`].
    pub fn client(&self, database_url: &str) -> TestApp {
        TestApp {
            addr: self.addr,
            admin_addr: self.admin_addr,
            database_url: database_url.to_owned(),
            http: http_client(),
            keys: JwtKeys::new(SECRET, "gavel"),
            shutdown: CancellationToken::new(),
            task: None,
        }
    }

    /// SIGKILL, no cleanup.
    pub async fn kill(&mut self) {
        self.child.kill().await.expect("kill gavel serve");
    }
}

pub fn new_key() -> String {
    Uuid::new_v4().to_string()
}

/// Parses a JSON `id` field.
pub fn id_of(value: &Value) -> Uuid {
    value["id"].as_str().expect("id").parse().expect("uuid id")
}

// Helpers of the bad_input, closing and reads modules.

impl TestApp {
    /// `GET path` as `sub` with `roles`.
    pub async fn get_as(&self, path: &str, sub: &str, roles: &[Role]) -> Response {
        self.http
            .get(self.url(path))
            .bearer_auth(self.token(sub, roles))
            .send()
            .await
            .expect("GET request")
    }

    /// Reads an auction as `sub` with `roles`.
    pub async fn auction_as(&self, auction_id: &str, sub: &str, roles: &[Role]) -> Value {
        let response = self
            .get_as(&format!("/api/auctions/{auction_id}"), sub, roles)
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.unwrap()
    }

    /// Reads a bid as `sub` (its bidder, or an admin with `roles`).
    pub async fn bid_as(&self, bid_id: &str, sub: &str, roles: &[Role]) -> Value {
        let response = self
            .get_as(&format!("/api/bids/{bid_id}"), sub, roles)
            .await;
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "GET /api/bids/{bid_id} as {sub}"
        );
        response.json().await.unwrap()
    }

    /// Places a bid with `Prefer: wait=5` and returns its resolved view.
    pub async fn bid_resolved(&self, bidder: &str, auction_id: &str, amount: i64) -> Value {
        let (status, body) = self.bid_waiting(bidder, auction_id, amount).await;
        assert_eq!(
            status,
            StatusCode::CREATED,
            "bid of {amount} by {bidder} resolved while waiting: {body}"
        );
        body
    }

    /// Places a bid with `Prefer: wait=5`; returns the status and body.
    pub async fn bid_waiting(
        &self,
        bidder: &str,
        auction_id: &str,
        amount: i64,
    ) -> (StatusCode, Value) {
        let response = self
            .http
            .post(self.url(&format!("/api/auctions/{auction_id}/bids")))
            .bearer_auth(self.token(bidder, &[]))
            .header("Idempotency-Key", new_key())
            .header("Prefer", "wait=5")
            .json(&json!({ "amount": amount }))
            .send()
            .await
            .expect("bid request");
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    /// Polls the auction until it is settled `closed`; returns its view.
    pub async fn wait_settled(&self, auction_id: &str, limit: Duration) -> Value {
        eventually(limit, "the auction to settle", || async {
            let view = self.auction(auction_id).await;
            (view["status"] == "closed").then_some(view)
        })
        .await
    }
}

/// Parses an RFC 3339 JSON string.
pub fn time_of(value: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(value.as_str().expect("a time string"))
        .expect("RFC 3339 time")
        .with_timezone(&Utc)
}

/// One scrape of `/metrics`: series text (name and labels) to value.
pub struct Scrape(Vec<(String, HashMap<String, String>, f64)>);

impl Scrape {
    pub async fn take(app: &TestApp) -> Scrape {
        let text = app.metrics_text().await;
        Scrape(text.lines().filter_map(parse_sample).collect())
    }

    /// The sum of `name`'s series whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, value)| value)
            .sum()
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(n, _, _)| n == name)
    }
}

/// `name{k="v",...} value` into its parts; comments give `None`.
fn parse_sample(line: &str) -> Option<(String, HashMap<String, String>, f64)> {
    if line.starts_with('#') || line.trim().is_empty() {
        return None;
    }
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let Some((name, rest)) = series.split_once('{') else {
        return Some((series.to_owned(), HashMap::new(), value));
    };
    let mut labels = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() || key == "}" {
            break;
        }
        assert_eq!(chars.next(), Some('"'), "quoted label value in {line}");
        let mut val = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => val.extend(chars.next()),
                '"' => break,
                c => val.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').to_owned(), val);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    Some((name.to_owned(), labels, value))
}

/// Asserts the headers every response carries (the API contract's
/// conventions), reading each through `header`, which panics when one is
/// missing.
pub fn assert_contract_headers(what: &str, header: impl Fn(&str) -> String) {
    assert_eq!(
        header("strict-transport-security"),
        "max-age=31536000; includeSubDomains",
        "{what}"
    );
    assert_eq!(header("x-frame-options"), "DENY", "{what}");
    assert!(
        header("content-security-policy").contains("frame-ancestors 'none'"),
        "{what}"
    );
    assert_eq!(header("x-content-type-options"), "nosniff", "{what}");
    assert!(
        !header("x-request-id").is_empty(),
        "{what}: empty X-Request-Id"
    );
}

/// Twenty identical bid requests (one key) at once: exactly one creates
/// the bid, every other success replays it (`Idempotent-Replayed`), and a
/// `503` is only a retry that waited past the lock timeout.
pub async fn identical_requests_make_one_bid(
    app: &TestApp,
    auction_id: &str,
    bidder: &str,
    amount: i64,
) {
    let key = new_key();
    let requests: Vec<_> = (0..20)
        .map(|_| {
            let (http, addr, token) = (app.http.clone(), app.addr, app.token(bidder, &[]));
            let (auction_id, key) = (auction_id.to_owned(), key.clone());
            tokio::spawn(async move {
                let response = place_bid(&http, addr, &token, &auction_id, amount, &key).await;
                let replayed = header(&response, "idempotent-replayed");
                let code = response.status();
                (code, replayed, response.json::<Value>().await.unwrap())
            })
        })
        .collect();
    let mut named = std::collections::HashSet::new();
    let (mut created, mut replays) = (0, 0);
    for request in requests {
        let (code, replayed, body) = request.await.unwrap();
        match code {
            StatusCode::CREATED => created += 1,
            StatusCode::OK => {
                assert_eq!(replayed, "true");
                replays += 1;
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(body["code"], "overloaded");
                continue;
            }
            other => panic!("unexpected {other}: {body}"),
        }
        named.insert(body["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(created, 1, "exactly one request created the bid");
    assert!(replays >= 1, "the others replayed it");
    assert_eq!(named.len(), 1, "every success names the same bid");
}
