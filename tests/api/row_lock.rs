//! `GAVEL_BID_PATH=row_lock`, the classic row-lock baseline: every bid is
//! resolved at once in a transaction that locks its auction row, answered
//! `201` with the outcome the resolver would give, recorded in `bid_log` so
//! that replaying the log through the rules gives the auction row; and a bid
//! queued behind a held row lock is the incident, answered `503 overloaded`
//! after the lock timeout while PostgreSQL shows it waiting on a `Lock`.
//! The resolver still runs: it settles row-locked auctions at their end.

use std::time::{Duration, Instant};

use chrono::Utc;
use gavel::bidding::BidPath;
use gavel::config::Config;
use gavel::db::{PoolSettings, SessionLimits};
use gavel::rules::{self, AuctionState};
use reqwest::{Response, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::*;

/// A server on the row-lock path, with `tweak` applied on top.
async fn row_lock_app(tweak: impl FnOnce(&mut Config)) -> TestApp {
    TestApp::spawn_with(|config| {
        config.bids.path = BidPath::RowLock;
        tweak(config);
    })
    .await
}

/// The status, headers and body of a bid response.
async fn answer(response: Response) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let (status, headers) = (response.status(), response.headers().clone());
    (status, headers, response.json().await.unwrap())
}

#[tokio::test]
async fn every_bid_is_resolved_at_once_with_the_outcome_the_rules_give() {
    let app = row_lock_app(|_| {}).await;
    let auction = app.create_auction("seller-1", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();

    // Starting price 1000, the default increment table (step 50 from 500).
    // (bidder, maximum, status, reason, price right after the bid)
    let sequence: [(&str, i64, &str, Option<&str>, i64); 8] = [
        // The first bid leads at the starting price.
        ("alice", 1_500, "leading", None, 1_000),
        // Below alice's maximum: she stays ahead at bob's bid + 50.
        ("bob", 1_200, "outbid", None, 1_250),
        // The minimum is 1250 + 50.
        ("carol", 1_250, "rejected", Some("below_minimum"), 1_250),
        (
            "seller-1",
            2_000,
            "rejected",
            Some("seller_cannot_bid"),
            1_250,
        ),
        // A tie keeps the earlier maximum ahead, at that amount.
        ("dave", 1_500, "outbid", None, 1_500),
        // A proxy maximum takes the lead one step above alice's maximum.
        ("erin", 3_000, "leading", None, 1_550),
        // The leader raises her own maximum: the price stays.
        ("erin", 4_000, "leading", None, 1_550),
        ("alice", 1_600, "outbid", None, 1_650),
    ];
    let mut ids = Vec::new();
    for (bidder, amount, status, reason, price) in sequence {
        let (code, headers, bid) =
            answer(app.bid(bidder, &auction_id, amount, &new_key()).await).await;
        let what = format!("{bidder} bidding {amount}: {bid}");
        assert_eq!(code, StatusCode::CREATED, "{what}");
        assert_eq!(bid["status"], status, "{what}");
        assert_eq!(bid["reason"].as_str(), reason, "{what}");
        assert_eq!(bid["auction_price"], price, "{what}");
        assert!(!bid["resolved_at"].is_null(), "{what}");
        assert_eq!(
            headers["location"],
            format!("/api/bids/{}", id_of(&bid)).as_str()
        );
        assert!(headers.contains_key("gavel-consistency-token"), "{what}");
        assert!(!headers.contains_key("idempotent-replayed"), "{what}");
        assert!(
            !headers.contains_key("preference-applied"),
            "{what}: no Prefer sent"
        );
        ids.push(id_of(&bid));
    }

    // With `Prefer: wait` the answer is the same, and says the wait applied.
    let response = app
        .http
        .post(app.url(&format!("/api/auctions/{auction_id}/bids")))
        .bearer_auth(app.token("frank", &[]))
        .header("Idempotency-Key", new_key())
        .header("Prefer", "wait=5")
        .json(&json!({"amount": 1_700}))
        .send()
        .await
        .unwrap();
    let (code, headers, bid) = answer(response).await;
    assert_eq!(code, StatusCode::CREATED, "{bid}");
    assert_eq!(headers["preference-applied"], "wait=5");
    assert_eq!(bid["status"], "outbid");
    assert_eq!(bid["auction_price"], 1_750, "frank's 1700 + 50");
    ids.push(id_of(&bid));

    // An unknown auction is 404, and leaves nothing behind.
    let response = app
        .bid("alice", &Uuid::now_v7().to_string(), 1_500, &new_key())
        .await;
    let (code, _, problem) = answer(response).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_eq!(problem["code"], "not_found");

    let view = app.auction_as(&auction_id, "seller-1", &[]).await;
    assert_eq!(view["current_price"], 1_750);
    assert_eq!(view["leading_bidder"], "erin");
    assert_eq!(view["bid_count"], 7, "every bid but the two rejected ones");
    assert_eq!(view["next_min_bid"], 1_800);
    assert_eq!(view["status"], "open");
    assert_eq!(
        view["version"].as_i64().unwrap(),
        auction["version"].as_i64().unwrap() + 9,
        "one row update per bid, rejected ones included"
    );

    // The log: every bid once, resolved in order, none pending; earlier
    // leaders were moved to outbid in the same transactions.
    let db = app.db().await;
    let auction_uuid: Uuid = auction_id.parse().unwrap();
    let bids = assert_consistent(&db, auction_uuid).await;
    assert_eq!(bids.iter().map(|b| b.id).collect::<Vec<_>>(), ids);
    assert_eq!(
        bids.iter()
            .map(|b| b.resolution_no.unwrap())
            .collect::<Vec<_>>(),
        (1..=9).collect::<Vec<i64>>()
    );
    let statuses: Vec<&str> = bids.iter().map(|b| b.status.as_str()).collect();
    assert_eq!(
        statuses,
        [
            "outbid", "outbid", "rejected", "rejected", "outbid", "outbid", "leading", "outbid",
            "outbid"
        ]
    );
    let unknown: i64 = db
        .query_one(
            "SELECT count(*) FROM bid_log WHERE auction_id <> $1",
            &[&auction_uuid],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(unknown, 0, "the 404 bid was rolled back");
    // The received time is the transaction's clock, as the resolver's rules saw it.
    let same_clock: bool = db
        .query_one(
            "SELECT bool_and(received_at = resolved_at) FROM bid_log WHERE auction_id = $1",
            &[&auction_uuid],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        same_clock,
        "received_at and resolved_at come from one transaction"
    );
}

#[tokio::test]
async fn a_retried_key_replays_its_bid_and_a_reused_one_is_refused() {
    let app = row_lock_app(|_| {}).await;
    let auction = app.create_auction("seller-1", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();

    let key = new_key();
    let (code, headers, first) = answer(app.bid("alice", &auction_id, 1_500, &key).await).await;
    assert_eq!(code, StatusCode::CREATED, "{first}");
    assert!(!headers.contains_key("idempotent-replayed"));
    assert_eq!(first["status"], "leading");

    let (code, headers, replay) = answer(app.bid("alice", &auction_id, 1_500, &key).await).await;
    assert_eq!(
        code,
        StatusCode::OK,
        "a resolved bid replays as 200: {replay}"
    );
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(replay["id"], first["id"]);
    assert_eq!(replay["status"], "leading");

    let (code, _, problem) = answer(app.bid("alice", &auction_id, 1_600, &key).await).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(problem["code"], "idempotency_key_reused");
    // On another auction the key is another request: a bid of its own.
    let other = app.create_auction("seller-1", json!({})).await;
    let (code, headers, elsewhere) = answer(
        app.bid("alice", other["id"].as_str().unwrap(), 1_500, &key)
            .await,
    )
    .await;
    assert_eq!(code, StatusCode::CREATED, "{elsewhere}");
    assert!(!headers.contains_key("idempotent-replayed"));
    assert_ne!(elsewhere["id"], first["id"]);

    // Twenty identical requests at once: one bid, every success names it.
    identical_requests_make_one_bid(&app, &auction_id, "bob", 2_000).await;

    let db = app.db().await;
    let auction_uuid: Uuid = auction_id.parse().unwrap();
    for (bidder, count) in [("alice", 1), ("bob", 1)] {
        let rows: i64 = db
            .query_one(
                "SELECT count(*) FROM bid_log WHERE bidder_id = $1 AND auction_id = $2",
                &[&bidder, &auction_uuid],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(rows, count, "one bid_log row per key of {bidder}");
    }
    let bids = assert_consistent(&db, auction_uuid).await;
    assert_eq!(bids.len(), 2);
    assert_eq!(app.auction(&auction_id).await["bid_count"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bid_queued_on_a_locked_auction_row_waits_then_is_shed() {
    const LOCK_TIMEOUT: Duration = Duration::from_millis(400);
    let app = row_lock_app(|config| config.pools.lock_timeout = LOCK_TIMEOUT).await;
    let auction = app.create_auction("seller-1", json!({})).await;
    let auction_id = id_of(&auction);

    // Another session holds the row, as a slow bid transaction would.
    let locker = app.db().await;
    let locker_pid: i32 = locker
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    locker
        .batch_execute(&format!(
            "BEGIN; SELECT id FROM auctions WHERE id = '{auction_id}' FOR UPDATE"
        ))
        .await
        .unwrap();

    let observer = app.db().await;
    let mut shed_keys = Vec::new();
    let mut seen_waiting = None;
    // Each bid waits for at most the lock timeout; a few tries leave room
    // for a busy machine to catch one of them in pg_stat_activity.
    for attempt in 0..5 {
        let key = new_key();
        let started = Instant::now();
        let request = {
            let (http, addr, token) = (
                app.http.clone(),
                app.addr,
                app.token(&format!("b{attempt}"), &[]),
            );
            let (auction_id, key) = (auction_id.to_string(), key.clone());
            tokio::spawn(
                async move { place_bid(&http, addr, &token, &auction_id, 2_000, &key).await },
            )
        };
        while !request.is_finished() {
            let waiting = observer
                .query_opt(
                    // The cluster is shared: only this test's database.
                    "SELECT wait_event_type, wait_event, query, $1 = ANY(pg_blocking_pids(pid)) \
                     FROM pg_stat_activity \
                     WHERE datname = current_database() AND application_name = 'gavel-api' \
                     AND state = 'active' AND wait_event_type = 'Lock'",
                    &[&locker_pid],
                )
                .await
                .unwrap();
            if let Some(row) = waiting {
                seen_waiting.get_or_insert((
                    row.get::<_, String>(0),
                    row.get::<_, String>(1),
                    row.get::<_, String>(2),
                    row.get::<_, bool>(3),
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let response = request.await.unwrap();
        let elapsed = started.elapsed();
        let (code, headers, problem) = answer(response).await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{problem}");
        assert_eq!(problem["code"], "overloaded");
        assert!(
            headers.contains_key("retry-after"),
            "503 carries Retry-After"
        );
        assert!(
            elapsed >= LOCK_TIMEOUT,
            "the bid waited for the lock ({elapsed:?})"
        );
        assert!(
            elapsed < LOCK_TIMEOUT + Duration::from_millis(1_500),
            "shed about when the lock timeout ran out, not later ({elapsed:?})"
        );
        shed_keys.push((format!("b{attempt}"), key));
        if seen_waiting.is_some() {
            break;
        }
    }
    let (wait_type, wait_event, query, blocked_by_locker) =
        seen_waiting.expect("a bid was seen waiting on a lock in pg_stat_activity");
    assert_eq!(wait_type, "Lock");
    assert!(
        ["tuple", "transactionid"].contains(&wait_event.as_str()),
        "waits on the row: {wait_event}"
    );
    assert!(
        query.contains("FOR UPDATE"),
        "the waiting statement: {query}"
    );
    assert!(blocked_by_locker, "blocked by the session holding the row");

    // Nothing of the shed bids was kept: retrying their keys after the
    // lock is gone places them as new bids.
    locker.batch_execute("ROLLBACK").await.unwrap();
    let db = app.db().await;
    let logged: i64 = db
        .query_one("SELECT count(*) FROM bid_log", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(logged, 0, "a shed bid leaves no row");
    for (i, (bidder, key)) in shed_keys.iter().enumerate() {
        let response = app
            .bid(bidder, &auction_id.to_string(), 2_000 + 100 * i as i64, key)
            .await;
        let (code, headers, bid) = answer(response).await;
        assert_eq!(code, StatusCode::CREATED, "{bid}");
        assert!(!headers.contains_key("idempotent-replayed"));
    }
    assert_consistent(&db, auction_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_bids_queue_on_the_row_and_the_log_replays_to_the_auction_row() {
    let app = row_lock_app(|_| {}).await;
    let auction = app
        .create_auction("seller-1", json!({"reserve_price": 3_000}))
        .await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();

    let requests: Vec<_> = (0..40)
        .map(|i| {
            let (http, addr, token) = (
                app.http.clone(),
                app.addr,
                app.token(&format!("bidder-{i}"), &[]),
            );
            let auction_id = auction_id.clone();
            tokio::spawn(async move {
                let response = place_bid(
                    &http,
                    addr,
                    &token,
                    &auction_id,
                    1_000 + 100 * i,
                    &new_key(),
                )
                .await;
                answer(response).await
            })
        })
        .collect();
    let mut answered = Vec::new();
    let mut shed = 0;
    for request in requests {
        let (code, _, body) = request.await.unwrap();
        match code {
            StatusCode::CREATED => answered.push(body),
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(body["code"], "overloaded", "{body}");
                shed += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(answered.len() + shed, 40);
    assert!(
        answered.len() >= 10,
        "most bids get through the queue ({} of 40)",
        answered.len()
    );

    // Replay the log in resolution order through the rules, from the
    // auction's terms as the library reads them.
    let db = app.db().await;
    let auction_uuid: Uuid = auction_id.parse().unwrap();
    let pool = gavel::db::build_pool(
        &app.database_url,
        "row-lock-audit",
        &PoolSettings {
            size: 1,
            wait_timeout: Duration::from_secs(5),
            limits: SessionLimits {
                connect_timeout: Duration::from_secs(5),
                statement_timeout: Duration::from_secs(5),
                lock_timeout: Duration::from_secs(5),
            },
            application_name: "gavel-test-audit",
            custom_plans: false,
        },
    )
    .unwrap();
    let stored = gavel::db::auctions::get(&pool.get().await.unwrap(), auction_uuid)
        .await
        .unwrap()
        .expect("the auction");
    let log = audit_bids(&db, auction_uuid).await;
    assert_eq!(log.len(), answered.len(), "one bid_log row per 201");
    let mut state = AuctionState::opening(stored.original_ends_at);
    for (n, bid) in log.iter().enumerate() {
        assert_eq!(
            bid.resolution_no,
            Some(n as i64 + 1),
            "resolved in order, none pending"
        );
        let applied = rules::apply_bid(&stored.terms, &mut state, &bid.input());
        assert_eq!(
            applied.price_after, bid.price_after,
            "price after {}",
            bid.id
        );
        // Each 201 answered with the outcome the replay gives.
        let body = answered
            .iter()
            .find(|b| id_of(b) == bid.id)
            .expect("every logged bid was answered 201");
        assert_eq!(body["auction_price"].as_i64(), bid.price_after);
        let (status, reason) = match applied.outcome {
            rules::Outcome::Leading => ("leading", None),
            rules::Outcome::Outbid => ("outbid", None),
            rules::Outcome::Rejected(reason) => ("rejected", Some(reason.as_str())),
        };
        assert_eq!(body["status"], status, "answer to {}", bid.id);
        assert_eq!(body["reason"].as_str(), reason, "answer to {}", bid.id);
    }
    assert_eq!(state.leader, stored.state.leader, "leader");
    assert_eq!(state.price, stored.state.price, "price");
    assert_eq!(state.bid_count, stored.state.bid_count, "bid_count");
    assert_eq!(stored.resolved_count, log.len() as i64);
    assert!(state.leader.is_some(), "someone leads");
    assert_consistent(&db, auction_uuid).await;
    let view = app.auction(&auction_id).await;
    assert_eq!(view["current_price"].as_i64(), state.price);
    assert_eq!(view["bid_count"].as_i64(), Some(state.bid_count));
    assert_eq!(
        view["reserve_price_met"],
        json!(rules::reserve_met(&stored.terms, &state))
    );
}

#[tokio::test]
async fn the_binary_warns_at_start_and_its_resolver_still_settles_the_auction() {
    let database_url = fresh_database().await;
    let process = ServeProcess::start_with(&database_url, &[("GAVEL_BID_PATH", "row_lock")]).await;
    let app = process.client(&database_url);
    let auction = app
        .create_auction(
            "seller-1",
            json!({
                "ends_at": (Utc::now() + chrono::Duration::seconds(2)).to_rfc3339(),
                "soft_close_s": 3,
            }),
        )
        .await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();

    let (code, _, alice) = answer(app.bid("alice", &auction_id, 1_500, &new_key()).await).await;
    assert_eq!(code, StatusCode::CREATED, "{alice}");
    assert_eq!(alice["status"], "leading");
    let (code, _, bob) = answer(app.bid("bob", &auction_id, 1_200, &new_key()).await).await;
    assert_eq!(code, StatusCode::CREATED, "{bob}");
    assert_eq!(bob["status"], "outbid");
    // Soft close is the rules' doing: each bid inside the window moved the end.
    let view = app.auction(&auction_id).await;
    assert_eq!(
        time_of(&view["ends_at"]),
        time_of(&bob["received_at"]) + chrono::Duration::seconds(3)
    );

    // No bid is ever pending, yet the resolver settles the auction at its end.
    let settled = app.wait_settled(&auction_id, Duration::from_secs(20)).await;
    assert_eq!(settled["current_price"], 1_250);
    let seen_by_seller = app.auction_as(&auction_id, "seller-1", &[]).await;
    assert_eq!(seen_by_seller["winner_id"], "alice");
    let db = app.db().await;
    let bids = assert_consistent(&db, auction_id.parse().unwrap()).await;
    let statuses: Vec<&str> = bids.iter().map(|b| b.status.as_str()).collect();
    assert_eq!(statuses, ["won", "lost"]);

    let logs = process.logs.lock().unwrap().clone();
    let warning = logs
        .iter()
        .find(|e| {
            e["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("GAVEL_BID_PATH=row_lock"))
        })
        .expect("a start-up warning names the row-lock path");
    assert_eq!(warning["level"], "WARN");
    assert!(
        warning["fields"]["message"]
            .as_str()
            .unwrap()
            .contains("not for production"),
        "{warning}"
    );
}
