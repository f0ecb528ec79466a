//! Overload and outages fail fast: a saturated pool, a full in-flight limit
//! and a restarting primary are answered with `503` and `Retry-After` in
//! about a second, no request outlives its deadline, the service recovers
//! by itself, and no acknowledged bid is lost.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::{Response, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::*;

/// Asserts a `503 overloaded` problem with `Retry-After`.
async fn assert_overloaded(response: Response, what: &str) {
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "{what}");
    assert!(
        response.headers().contains_key("retry-after"),
        "{what}: Retry-After"
    );
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "overloaded", "{what}: {problem}");
}

#[tokio::test]
async fn a_saturated_pool_answers_503_fast_and_recovers_without_a_restart() {
    const DEADLINE: Duration = Duration::from_secs(3);
    let app = TestApp::spawn_with(|config| {
        config.pools.api_size = 2;
        // Two batches in flight, one held bid each, the rest queued.
        config.bids.append_writers = 2;
        config.pools.wait_timeout = Duration::from_secs(1);
        config.limits.request_timeout = DEADLINE;
        // Long enough that only the request deadline ends a blocked request.
        config.pools.statement_timeout = Duration::from_secs(20);
        config.pools.lock_timeout = Duration::from_secs(20);
        config.resolver.settle_grace = Duration::from_secs(20);
    })
    .await;
    let auction = app.create_auction("seller", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let warm = app.bid("warmup", &auction_id, 1_000, &new_key()).await;
    assert_eq!(warm.status(), StatusCode::ACCEPTED);

    // Hold every append: the two writers' batches end up waiting on the lock.
    let locker = app.db().await;
    locker
        .batch_execute("BEGIN; LOCK TABLE bid_log IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let blocked_keys: Vec<String> = (0..2).map(|_| new_key()).collect();
    let blocked: Vec<_> = blocked_keys
        .iter()
        .enumerate()
        .map(|(i, key)| {
            let (http, addr, token) = (
                app.http.clone(),
                app.addr,
                app.token(&format!("held-{i}"), &[]),
            );
            let (auction_id, key) = (auction_id.clone(), key.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let response =
                    place_bid(&http, addr, &token, &auction_id, 2_000 + i as i64, &key).await;
                (started.elapsed(), response)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Every further bid waits at most the pool wait, then sheds.
    for i in 0..5 {
        let started = Instant::now();
        let response = app
            .bid(&format!("shed-{i}"), &auction_id, 3_000, &new_key())
            .await;
        let took = started.elapsed();
        assert_overloaded(response, "a bid while the pool is saturated").await;
        assert!(took < Duration::from_millis(1_500), "503 took {took:?}");
        eprintln!("saturated pool: a bid answered 503 overloaded after {took:?}");
    }
    // Readiness is checked over its own connections: still ready.
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);

    // The held requests end at their deadline, not later.
    for handle in blocked {
        let (took, response) = handle.await.unwrap();
        assert_overloaded(response, "a bid held past its deadline").await;
        eprintln!("saturated pool: a held bid answered 503 after {took:?} ({DEADLINE:?} deadline)");
        assert!(
            took >= DEADLINE - Duration::from_millis(100)
                && took < DEADLINE + Duration::from_millis(1_500),
            "a held request took {took:?} with a {DEADLINE:?} deadline"
        );
    }

    locker.batch_execute("COMMIT").await.unwrap();
    // Recovered: new bids are accepted at once, and a retry of a held bid
    // under its key is accepted once: as a replay of the held append, or
    // first when the retry's append commits before the held one (which then
    // finds the key taken).
    let started = Instant::now();
    let fresh = app.bid("after", &auction_id, 5_000, &new_key()).await;
    assert_eq!(fresh.status(), StatusCode::ACCEPTED);
    assert!(started.elapsed() < Duration::from_secs(1));
    for (i, key) in blocked_keys.iter().enumerate() {
        let retry = eventually(
            Duration::from_secs(10),
            "the held bid to replay",
            || async {
                let response = app
                    .bid(&format!("held-{i}"), &auction_id, 2_000 + i as i64, key)
                    .await;
                response.status().is_success().then_some(response)
            },
        )
        .await;
        let bid: Value = retry.json().await.unwrap();
        assert_eq!(bid["amount"], 2_000 + i as i64);
    }
    let db = app.db().await;
    let auction_uuid: Uuid = auction_id.parse().unwrap();
    wait_resolved(&db, auction_uuid, Duration::from_secs(10)).await;
    let bids = assert_consistent(&db, auction_uuid).await;
    assert_eq!(
        bids.len(),
        4,
        "warm-up, two held and one fresh bid, each once: {bids:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn requests_beyond_the_in_flight_limit_are_shed_at_once() {
    let app = TestApp::spawn_with(|config| {
        config.limits.max_in_flight = 2;
        // Bids stay pending, so `Prefer: wait` holds the request.
        config.resolver.enabled = false;
    })
    .await;
    let auction = app.create_auction("seller", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let waiting: Vec<_> = (0..2)
        .map(|i| {
            let request = app
                .http
                .post(app.url(&format!("/api/auctions/{auction_id}/bids")))
                .bearer_auth(app.token(&format!("waiter-{i}"), &[]))
                .header("Idempotency-Key", new_key())
                .header("Prefer", "wait=3")
                .json(&json!({"amount": 1_000 + i}));
            tokio::spawn(async move { request.send().await.unwrap().status() })
        })
        .collect();
    // Both waiting bids are in: they hold the two places.
    let db = app.db().await;
    let auction_uuid: Uuid = auction_id.parse().unwrap();
    eventually(
        Duration::from_secs(5),
        "both waiting bids to be logged",
        || async {
            let logged: i64 = db
                .query_one(
                    "SELECT count(*) FROM bid_log WHERE auction_id = $1",
                    &[&auction_uuid],
                )
                .await
                .unwrap()
                .get(0);
            (logged == 2).then_some(())
        },
    )
    .await;

    let started = Instant::now();
    let shed = app
        .get_as(&format!("/api/auctions/{auction_id}"), "reader", &[])
        .await;
    assert_overloaded(shed, "a read beyond the in-flight limit").await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "shed in {:?}",
        started.elapsed()
    );
    // Probes are never shed.
    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);

    for handle in waiting {
        assert_eq!(
            handle.await.unwrap(),
            StatusCode::ACCEPTED,
            "the wait ended unresolved"
        );
    }
    let view = app.auction(&auction_id).await;
    assert_eq!(view["id"], auction_id.as_str());
    app.stop().await;
}

/// One bid of the trickle: when it was sent, how long it took, its answer.
struct Sent {
    at: Instant,
    took: Duration,
    status: StatusCode,
    bid_id: Option<String>,
}

#[tokio::test]
async fn a_primary_restart_fails_fast_recovers_by_itself_and_loses_no_bid() {
    let primary = start_private_primary().await;
    let database_url = primary.url("gavel");
    let app = TestApp::spawn_on(&database_url, |_| {}).await;
    let auction = app.create_auction("seller", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();

    // A steady trickle of bids, and a readiness probe, all along.
    let sent: Arc<Mutex<Vec<Sent>>> = Arc::default();
    let ready: Arc<Mutex<Vec<(Instant, StatusCode)>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let trickle = {
        let (http, addr, sent, stop) = (app.http.clone(), app.addr, sent.clone(), stop.clone());
        let tokens: Vec<String> = (0..10)
            .map(|i| app.token(&format!("bidder-{i}"), &[]))
            .collect();
        let auction_id = auction_id.clone();
        tokio::spawn(async move {
            let mut n = 0i64;
            while !stop.is_cancelled() {
                let at = Instant::now();
                let token = &tokens[n as usize % tokens.len()];
                let response = place_bid(
                    &http,
                    addr,
                    token,
                    &auction_id,
                    1_000 + n * 10_000,
                    &new_key(),
                )
                .await;
                let status = response.status();
                let bid_id = if status.is_success() {
                    let bid: Value = response.json().await.unwrap();
                    Some(bid["id"].as_str().unwrap().to_owned())
                } else {
                    None
                };
                sent.lock().unwrap().push(Sent {
                    at,
                    took: at.elapsed(),
                    status,
                    bid_id,
                });
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let probe = {
        let (http, url, ready, stop) = (
            app.http.clone(),
            app.url("/readyz"),
            ready.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let status = http.get(&url).send().await.unwrap().status();
                ready.lock().unwrap().push((Instant::now(), status));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut primary = primary;
    let stopped_at = Instant::now();
    let mut primary = blocking(move || {
        primary.stop().expect("stop the primary");
        primary
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restart_at = Instant::now();
    let primary = blocking(move || {
        primary.start_again().expect("start the primary again");
        primary
    })
    .await;
    let back_at = Instant::now();
    let recovered_at = eventually(
        Duration::from_secs(15),
        "a bid to be accepted after the restart",
        || async {
            sent.lock()
                .unwrap()
                .iter()
                .find(|s| s.at >= back_at && s.status.is_success())
                .map(|s| s.at + s.took)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    trickle.await.unwrap();
    probe.await.unwrap();

    let sent = std::mem::take(&mut *sent.lock().unwrap());
    let failed: Vec<&Sent> = sent.iter().filter(|s| !s.status.is_success()).collect();
    assert!(!failed.is_empty(), "the outage was seen");
    for s in &failed {
        assert_eq!(
            s.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "an outage answer"
        );
    }
    let slowest = sent.iter().map(|s| s.took).max().unwrap();
    assert!(
        slowest < Duration::from_millis(1_500),
        "slowest bid answer: {slowest:?}"
    );
    let ready = std::mem::take(&mut *ready.lock().unwrap());
    assert!(
        ready.iter().any(|(t, s)| *t > stopped_at
            && *t < restart_at
            && *s == StatusCode::SERVICE_UNAVAILABLE),
        "/readyz reported the primary down"
    );
    assert_eq!(ready.last().unwrap().1, StatusCode::OK, "/readyz is back");
    eprintln!(
        "primary restart: {} bids sent, {} answered 503 (slowest answer {slowest:?}); \
         first bid accepted {:?} after the primary accepted connections again",
        sent.len(),
        failed.len(),
        recovered_at.saturating_duration_since(back_at),
    );

    // Every acknowledged bid is in the log exactly once and gets resolved.
    let db = connect(&database_url).await;
    let auction_uuid: Uuid = auction_id.parse().unwrap();
    wait_resolved(&db, auction_uuid, Duration::from_secs(15)).await;
    let logged = assert_consistent(&db, auction_uuid).await;
    for s in sent.iter().filter(|s| s.status.is_success()) {
        let id: Uuid = s.bid_id.as_deref().unwrap().parse().unwrap();
        assert_eq!(
            logged.iter().filter(|b| b.id == id).count(),
            1,
            "acknowledged bid {id} is in the log once"
        );
    }
    app.stop().await;
    drop(primary);
}

#[tokio::test]
async fn every_backend_says_which_part_of_gavel_it_serves() {
    let app = TestApp::spawn().await;
    let auction = app.create_auction("seller", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap();
    app.bid_resolved("alice", auction_id, 1_000).await;
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    let db = app.db().await;
    let names: Vec<String> = db
        .query(
            "SELECT DISTINCT application_name FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name LIKE 'gavel-%' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        names,
        [
            "gavel-api",
            "gavel-append",
            "gavel-listener",
            "gavel-monitor",
            "gavel-resolver",
            "gavel-upkeep"
        ],
        "backends of this server in pg_stat_activity"
    );
    app.stop().await;
}

/// Auctions of the burst test. Bidder `i` bids only on auction `i`, so it
/// leads there and no bid is refused as too low whatever order the bids
/// arrive in (one that arrives after a higher one of its bidder is
/// acknowledged, then rejected by the resolver: still goodput).
const BURST_AUCTIONS: usize = 8;
/// Closed-loop clients measuring what the small Gavel sustains: twice the
/// batch maximum below, so the writer is always busy but no bid waits long.
const CAPACITY_CLIENTS: usize = 8;
/// How long the capacity is measured.
const CAPACITY_RUN: Duration = Duration::from_secs(2);
/// How long the burst lasts.
const BURST: Duration = Duration::from_secs(4);
/// The burst's bid rate, as a multiple of the measured capacity.
const BURST_FACTOR: f64 = 4.0;
/// The most bids a second this test sends: it shares a small machine with
/// the server it overloads (on 2 cores it cannot send much over 2,500
/// requests a second, even to `/healthz`).
const MAX_BURST_RATE: f64 = 2_000.0;
/// One read is sent with every this many bids of the burst.
const BIDS_PER_READ: usize = 10;
/// Client connections opened before the burst: a burst of players already
/// connected. Opening thousands of connections during it would measure the
/// kernel's accept queue (it overflows, and each dropped SYN costs the
/// client a 1 s retransmission), not admission.
const BURST_CONNECTIONS: usize = 512;
/// By then admission has seen the overload: the window open when the burst
/// starts closes within an interval (500 ms), and the next full window, or
/// the one after if the queue was still short at its start, finds it. Bids
/// admitted before then may still wait up to the whole pool wait (1 s).
const DETECTED_WITHIN: Duration = Duration::from_millis(1_500);
/// A database whose commits are slow, like a disk taking 10 ms per flush:
/// every append statement sleeps 10 ms, so the writer (one, of at most 4
/// bids a statement) commits a few hundred bids a second and is what runs
/// out, not this machine's CPU. Only in this test's own database.
const SLOW_APPENDS: &str = "
    CREATE FUNCTION slow_append() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN PERFORM pg_sleep(0.01); RETURN NULL; END $$;
    CREATE TRIGGER slow_append AFTER INSERT ON bid_log
        FOR EACH STATEMENT EXECUTE FUNCTION slow_append();";

/// One request of the burst test and its answer.
#[derive(Debug)]
struct Exchange {
    /// The bid's `Idempotency-Key`; `None` for a read.
    key: Option<String>,
    sent_at: Instant,
    /// Until the whole answer was read.
    took: Duration,
    /// `None`: no answer (a connection error or the client's timeout).
    status: Option<StatusCode>,
    retry_after: Option<String>,
    content_type: String,
    /// The problem code of an error answer.
    code: Option<String>,
    /// Why there was no answer.
    error: Option<String>,
}

impl Exchange {
    fn ok(&self) -> bool {
        self.status.is_some_and(|s| s.is_success())
    }

    fn refused(&self) -> bool {
        self.status == Some(StatusCode::SERVICE_UNAVAILABLE)
    }

    fn answered_at(&self) -> Instant {
        self.sent_at + self.took
    }
}

/// Sends `request` once (no retry) and records its answer.
async fn exchange(request: reqwest::RequestBuilder, key: Option<String>) -> Exchange {
    let sent_at = Instant::now();
    let mut exchange = Exchange {
        key,
        sent_at,
        took: Duration::ZERO,
        status: None,
        retry_after: None,
        content_type: String::new(),
        code: None,
        error: None,
    };
    let response = match request.send().await {
        Ok(response) => response,
        Err(e) => {
            exchange.took = sent_at.elapsed();
            exchange.error = Some(e.to_string());
            return exchange;
        }
    };
    let status = response.status();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap_or("<not text>").to_owned());
    let content_type = header(&response, "content-type");
    let body = response.bytes().await;
    exchange.took = sent_at.elapsed();
    match body {
        Ok(body) => {
            exchange.status = Some(status);
            exchange.retry_after = retry_after;
            exchange.content_type = content_type;
            if !status.is_success() {
                exchange.code = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|problem| problem["code"].as_str().map(str::to_owned));
            }
        }
        Err(e) => exchange.error = Some(format!("reading the body: {e}")),
    }
    exchange
}

/// What the burst test's clients share. Cheap to clone.
#[derive(Clone)]
struct BurstLoad {
    http: reqwest::Client,
    addr: std::net::SocketAddr,
    auctions: Arc<Vec<String>>,
    tokens: Arc<Vec<String>>,
    /// Bid amounts rise with every bid sent.
    amounts: Arc<std::sync::atomic::AtomicI64>,
}

impl BurstLoad {
    /// A bid of bidder `i` on auction `i`, higher than all sent before.
    fn bid(&self, i: usize) -> impl std::future::Future<Output = Exchange> + Send + 'static {
        let i = i % BURST_AUCTIONS;
        let n = self
            .amounts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = new_key();
        let request = self
            .http
            .post(format!(
                "http://{}/api/auctions/{}/bids",
                self.addr, self.auctions[i]
            ))
            .bearer_auth(&self.tokens[i])
            .header("Idempotency-Key", &key)
            .json(&json!({ "amount": 1_000 + 10 * n }));
        exchange(request, Some(key))
    }

    /// A read of auction `i`.
    fn read(&self, i: usize) -> impl std::future::Future<Output = Exchange> + Send + 'static {
        let i = i % BURST_AUCTIONS;
        let request = self
            .http
            .get(format!(
                "http://{}/api/auctions/{}",
                self.addr, self.auctions[i]
            ))
            .bearer_auth(&self.tokens[i]);
        exchange(request, None)
    }

    /// `clients` closed-loop clients bidding as fast as they are answered
    /// for `run`; all their exchanges.
    async fn closed_loop(&self, clients: usize, run: Duration) -> Vec<Exchange> {
        let clients: Vec<_> = (0..clients)
            .map(|c| {
                let load = self.clone();
                tokio::spawn(async move {
                    let until = Instant::now() + run;
                    let mut done = Vec::new();
                    while Instant::now() < until {
                        done.push(load.bid(c).await);
                    }
                    done
                })
            })
            .collect();
        let mut done = Vec::new();
        for client in clients {
            done.extend(client.await.unwrap());
        }
        done
    }
}

/// The `p` quantile (0..=1) of the exchanges' latencies (nearest rank);
/// zero when there are none.
fn quantile<'a>(exchanges: impl IntoIterator<Item = &'a &'a Exchange>, p: f64) -> Duration {
    let mut sorted: Vec<Duration> = exchanges.into_iter().map(|e| e.took).collect();
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted.sort();
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Exchanges counted by status and problem code (`none`: no answer).
fn by_status(exchanges: &[&Exchange]) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for e in exchanges {
        let status = e.status.map_or("none".to_owned(), |s| {
            format!("{} {}", s.as_u16(), e.code.as_deref().unwrap_or(""))
                .trim_end()
                .to_owned()
        });
        *counts.entry(status).or_insert(0) += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_beyond_capacity_keeps_goodput_and_refuses_the_excess_fast() {
    // A small Gavel in a process of its own (its admission metrics are this
    // test's alone) on a database with slow commits: the writer is what
    // runs out, as in a real overload, not the machine.
    let database_url = fresh_database().await;
    connect(&database_url)
        .await
        .batch_execute(SLOW_APPENDS)
        .await
        .unwrap();
    let process = ServeProcess::start_with(
        &database_url,
        &[
            ("GAVEL_API_POOL_SIZE", "2"),
            ("GAVEL_APPEND_WRITERS", "1"),
            ("GAVEL_APPEND_BATCH_MAX", "4"),
            ("GAVEL_MAX_IN_FLIGHT", "256"),
            ("GAVEL_BID_RATE_LIMIT", "0"),
            // No access log line per request; admission's own lines stay.
            ("GAVEL_LOG", "info,gavel::http=warn"),
        ],
    )
    .await;
    let app = process.client(&database_url);
    let mut auctions = Vec::new();
    let mut tokens = Vec::new();
    for i in 0..BURST_AUCTIONS {
        let auction = app.create_auction("seller", json!({})).await;
        auctions.push(auction["id"].as_str().unwrap().to_owned());
        tokens.push(app.token(&format!("burst-bidder-{i}"), &[]));
    }
    let load = BurstLoad {
        // One attempt per request, never waiting long for an answer.
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(BURST_CONNECTIONS)
            .build()
            .unwrap(),
        addr: app.addr,
        auctions: Arc::new(auctions),
        tokens: Arc::new(tokens),
        amounts: Arc::default(),
    };
    // Requests all in flight at once each open a connection.
    let opening: Vec<_> = (0..BURST_CONNECTIONS)
        .map(|_| tokio::spawn(load.http.get(app.url("/healthz")).send()))
        .collect();
    for opened in opening {
        assert_eq!(opened.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    let connections = Scrape::take(&app)
        .await
        .sum("gavel_http_connections_open", &[("listener", "api")]);
    eprintln!("burst: {connections} client connections open");
    let mut acknowledged: Vec<String> = Vec::new();
    let mut unacknowledged: Vec<String> = Vec::new();
    let mut keep = |e: &Exchange| {
        if let Some(key) = &e.key {
            if e.ok() {
                acknowledged.push(key.clone());
            } else {
                unacknowledged.push(key.clone());
            }
        }
    };

    // Phase 1: what the small Gavel sustains without overload, closed loop
    // (after a warm-up that caches the auction snapshots).
    for e in load
        .closed_loop(CAPACITY_CLIENTS, Duration::from_millis(500))
        .await
    {
        assert!(e.ok(), "warm-up bid: {e:?}");
        keep(&e);
    }
    let started = Instant::now();
    let phase1 = load.closed_loop(CAPACITY_CLIENTS, CAPACITY_RUN).await;
    let phase1_took = started.elapsed();
    phase1.iter().for_each(&mut keep);
    let phase1: Vec<&Exchange> = phase1.iter().collect();
    assert!(
        phase1.iter().all(|e| e.ok()),
        "without overload every bid is acknowledged: {:?}",
        by_status(&phase1)
    );
    let capacity = phase1.len() as f64 / phase1_took.as_secs_f64();
    eprintln!(
        "burst: capacity {capacity:.0} bids/s ({} bids from {CAPACITY_CLIENTS} closed-loop \
         clients in {phase1_took:.2?}; latency p50 {:.1?}, p99 {:.1?})",
        phase1.len(),
        quantile(&phase1, 0.5),
        quantile(&phase1, 0.99),
    );

    // Phase 2: an open-loop burst of several times that, one attempt per
    // request, with some reads alongside.
    let rate = (BURST_FACTOR * capacity).min(MAX_BURST_RATE);
    let total = (rate * BURST.as_secs_f64()) as usize;
    let mut requests = Vec::with_capacity(total + total / BIDS_PER_READ);
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let started = Instant::now();
    let started_wall = chrono::Utc::now();
    let mut sent = 0;
    let mut late = Duration::ZERO;
    while sent < total && started.elapsed() < BURST + Duration::from_secs(1) {
        tick.tick().await;
        let now = started.elapsed();
        let due = ((now.as_secs_f64() * rate) as usize).min(total);
        while sent < due {
            late = late.max(now.saturating_sub(Duration::from_secs_f64(sent as f64 / rate)));
            requests.push(tokio::spawn(load.bid(sent)));
            if sent % BIDS_PER_READ == BIDS_PER_READ - 1 {
                requests.push(tokio::spawn(load.read(sent)));
            }
            sent += 1;
        }
    }
    let sending_took = started.elapsed();
    let mut burst = Vec::with_capacity(requests.len());
    for request in requests {
        burst.push(request.await.unwrap());
    }
    burst.iter().for_each(&mut keep);

    let bids: Vec<&Exchange> = burst.iter().filter(|e| e.key.is_some()).collect();
    let reads: Vec<&Exchange> = burst.iter().filter(|e| e.key.is_none()).collect();
    let ok: Vec<&Exchange> = bids.iter().copied().filter(|e| e.ok()).collect();
    let refused: Vec<&Exchange> = burst.iter().filter(|e| e.refused()).collect();
    // Admitted once admission knew of the overload: a short queue wait.
    let ok_detected: Vec<&Exchange> = ok
        .iter()
        .copied()
        .filter(|e| e.sent_at >= started + DETECTED_WITHIN)
        .collect();
    // Goodput: acknowledged bids over the burst, from its first request to
    // its last acknowledgement (at least its sending time).
    let window = ok
        .iter()
        .map(|e| e.answered_at().saturating_duration_since(started))
        .max()
        .unwrap_or_default()
        .max(sending_took);
    let goodput = ok.len() as f64 / window.as_secs_f64();
    let sent_rate = sent as f64 / sending_took.as_secs_f64();
    let mut retry_afters = std::collections::BTreeMap::new();
    for e in &refused {
        let value = e.retry_after.clone().unwrap_or_default();
        *retry_afters.entry(value).or_insert(0) += 1;
    }
    let p99_ok = quantile(&ok, 0.99);
    let p99_ok_detected = quantile(&ok_detected, 0.99);
    let p99_refused = quantile(&refused, 0.99);
    eprintln!(
        "burst: offered {rate:.0} bids/s, sent {sent} bids ({sent_rate:.0}/s, {:.1}x capacity; \
         at most {late:.1?} behind schedule) and {} reads in {sending_took:.2?}",
        sent_rate / capacity,
        reads.len(),
    );
    eprintln!(
        "burst: bids {:?}; reads {:?}",
        by_status(&bids),
        by_status(&reads)
    );
    eprintln!(
        "burst: goodput {goodput:.0} bids/s over {window:.2?} ({:.0}% of capacity)",
        100.0 * goodput / capacity,
    );
    eprintln!(
        "burst: 2xx latency p50 {:.1?} p99 {p99_ok:.1?} max {:.1?}; once the overload was \
         known (sent after {DETECTED_WITHIN:?}, {} bids) p50 {:.1?} p99 {p99_ok_detected:.1?} \
         max {:.1?}",
        quantile(&ok, 0.5),
        quantile(&ok, 1.0),
        ok_detected.len(),
        quantile(&ok_detected, 0.5),
        quantile(&ok_detected, 1.0),
    );
    eprintln!(
        "burst: 503 latency p50 {:.1?} p99 {p99_refused:.1?} max {:.1?}; \
         Retry-After {retry_afters:?}",
        quantile(&refused, 0.5),
        quantile(&refused, 1.0),
    );
    for event in process.logs.lock().unwrap().iter() {
        let message = event["fields"]["message"].as_str().unwrap_or("");
        if message.contains("admission") || message.contains("overload") {
            let at = time_of(&event["timestamp"]) - started_wall;
            eprintln!(
                "burst:   {:>+6} ms: {message} {}",
                at.num_milliseconds(),
                event["fields"]
            );
        }
    }
    for from in (0..window.as_millis() as u64).step_by(500) {
        let slot = Duration::from_millis(from)..Duration::from_millis(from + 500);
        let sent: Vec<&Exchange> = bids
            .iter()
            .copied()
            .filter(|e| slot.contains(&e.sent_at.saturating_duration_since(started)))
            .collect();
        let ok: Vec<&Exchange> = sent.iter().copied().filter(|e| e.ok()).collect();
        let refused: Vec<&Exchange> = sent.iter().copied().filter(|e| e.refused()).collect();
        eprintln!(
            "burst:   bids sent {:>4}-{:>4} ms: {:>4}, {:>4} acknowledged (p50 {:>7.1?}, max \
             {:>7.1?}), {:>4} refused (max {:>6.1?})",
            from,
            from + 500,
            sent.len(),
            ok.len(),
            quantile(&ok, 0.5),
            quantile(&ok, 1.0),
            refused.len(),
            quantile(&refused, 1.0),
        );
    }

    // Every request was answered: acknowledged, or refused 503 `overloaded`
    // with a Retry-After, and reads were served or refused the same way.
    let unanswered: Vec<&Exchange> = burst.iter().filter(|e| e.status.is_none()).collect();
    assert!(
        unanswered.is_empty(),
        "{} requests got no answer, e.g. {:?}",
        unanswered.len(),
        unanswered.first()
    );
    for e in &bids {
        assert!(e.ok() || e.refused(), "a bid of the burst: {e:?}");
    }
    for e in &reads {
        assert!(
            e.status == Some(StatusCode::OK) || e.refused(),
            "a read during the overload: {e:?}"
        );
    }
    for e in &refused {
        assert_eq!(e.code.as_deref(), Some("overloaded"), "{e:?}");
        assert!(
            e.content_type.starts_with("application/problem+json"),
            "{e:?}"
        );
        assert!(
            e.retry_after
                .as_deref()
                .is_some_and(|s| s.parse::<u64>().is_ok_and(|s| s >= 1)),
            "Retry-After is a whole number of seconds, at least 1: {e:?}"
        );
    }
    assert!(
        sent_rate >= 2.0 * capacity,
        "the burst was several times the capacity: {sent_rate:.0} bids/s sent"
    );
    assert!(
        !refused.is_empty() && ok.len() < bids.len(),
        "the burst exceeded what Gavel commits: {:?}",
        by_status(&bids)
    );
    // The acceptance figures.
    assert!(
        goodput >= 0.5 * capacity,
        "goodput under overload {goodput:.0} bids/s fell below half the capacity \
         {capacity:.0} bids/s"
    );
    assert!(
        p99_refused < Duration::from_millis(300),
        "refusals are fast: p99 {p99_refused:?}"
    );
    assert!(
        p99_ok_detected < Duration::from_millis(500),
        "bids admitted during the overload wait little: p99 {p99_ok_detected:?}"
    );
    // Before admission sees the overload, a bid waits at most the pool wait.
    assert!(
        p99_ok < Duration::from_millis(1_500),
        "no acknowledged bid waited much beyond the pool wait: p99 {p99_ok:?}"
    );

    // Once the burst is over, bids are accepted at once and the overload
    // ends by itself.
    let burst_ended = Instant::now();
    let first = load.bid(0).await;
    keep(&first);
    assert!(first.ok(), "a bid right after the burst: {first:?}");
    assert!(
        first.took < Duration::from_millis(200),
        "a bid right after the burst took {:?}",
        first.took
    );
    let after = Mutex::new(Vec::new());
    eventually(Duration::from_secs(2), "the overload to end", || async {
        let e = load.bid(1).await;
        let scrape = Scrape::take(&app).await;
        after.lock().unwrap().push(e);
        (scrape.sum("gavel_admission_overloaded", &[]) == 0.0).then_some(())
    })
    .await;
    let after = after.into_inner().unwrap();
    after.iter().for_each(&mut keep);
    let after: Vec<&Exchange> = after.iter().collect();
    eprintln!(
        "burst: a bid right after it took {:.1?}; overload over {:.2?} after the burst, {} \
         bids later (slowest {:.1?})",
        first.took,
        burst_ended.elapsed(),
        after.len(),
        quantile(&after, 1.0),
    );
    for e in &after {
        assert!(e.ok(), "a bid after the burst: {e:?}");
    }
    let read = load.read(2).await;
    assert_eq!(read.status, Some(StatusCode::OK), "a read after the burst");

    let scrape = Scrape::take(&app).await;
    let decisions = |kind: &str, decision: &str| {
        scrape.sum(
            "gavel_admission_decisions_total",
            &[("kind", kind), ("decision", decision)],
        )
    };
    let (at_door, in_queue) = (
        decisions("bid", "refused_at_door"),
        decisions("bid", "refused_in_queue"),
    );
    eprintln!(
        "burst: admission: bids admitted {}, refused at the door {at_door}, in the queue \
         {in_queue}; reads admitted {}, refused {}; shed by the in-flight limit {}",
        decisions("bid", "admitted"),
        decisions("read", "admitted"),
        decisions("read", "refused_at_door"),
        scrape.sum("gavel_http_shed_total", &[("reason", "in_flight_limit")]),
    );
    assert!(
        at_door + in_queue > 0.0,
        "admission refused bids of the burst"
    );

    // The audit: every acknowledged bid is in the log exactly once, and
    // every auction's state is what its bids make it.
    let db = app.db().await;
    for auction_id in load.auctions.iter() {
        let auction_id: Uuid = auction_id.parse().unwrap();
        wait_resolved(&db, auction_id, Duration::from_secs(20)).await;
        assert_consistent(&db, auction_id).await;
    }
    let logged: std::collections::HashMap<String, i64> = db
        .query(
            "SELECT idempotency_key, count(*) FROM bid_log GROUP BY idempotency_key",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    for key in &acknowledged {
        assert_eq!(
            logged.get(key).copied().unwrap_or(0),
            1,
            "acknowledged bid {key} is in the log once"
        );
    }
    let mut refused_but_logged = 0;
    for key in &unacknowledged {
        let rows = logged.get(key).copied().unwrap_or(0);
        assert!(rows <= 1, "refused bid {key} is in the log {rows} times");
        refused_but_logged += rows;
    }
    eprintln!(
        "burst: audit: {} acknowledged bids each in the log once; {} refused, \
         {refused_but_logged} of them logged anyway",
        acknowledged.len(),
        unacknowledged.len(),
    );
}
