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
        config.api_pool_size = 2;
        config.pool_wait_timeout = Duration::from_secs(1);
        config.request_timeout = DEADLINE;
        // Long enough that only the request deadline ends a blocked request.
        config.statement_timeout = Duration::from_secs(20);
        config.lock_timeout = Duration::from_secs(20);
        config.settle_grace = Duration::from_secs(20);
    })
    .await;
    let auction = app.create_auction("seller", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let warm = app.bid("warmup", &auction_id, 1_000, &new_key()).await;
    assert_eq!(warm.status(), StatusCode::ACCEPTED);

    // Hold every append: the pool's two connections end up waiting on the lock.
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
        config.max_in_flight = 2;
        // Bids stay pending, so `Prefer: wait` holds the request.
        config.resolver_enabled = false;
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
            "gavel-listener",
            "gavel-monitor",
            "gavel-resolver"
        ],
        "backends of this server in pg_stat_activity"
    );
    app.stop().await;
}
