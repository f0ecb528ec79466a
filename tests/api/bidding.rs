//! The bid path under concurrency: ordering, gaps, the hot row, idempotency.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gavel::auth::Role;
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_bidders_each_get_one_outcome_and_state_matches_the_rules() {
    let app = TestApp::spawn().await;
    let auction = app
        .create_auction("seller-1", json!({"reserve_price": 20_000}))
        .await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let db = app.db().await;

    // A reader watches current_price throughout: it must never go down.
    let prices = Arc::new(Mutex::new(Vec::new()));
    let stop_reader = tokio_util::sync::CancellationToken::new();
    let reader = {
        let (http, url, token) = (
            app.http.clone(),
            app.url(&format!("/api/auctions/{auction_id}")),
            app.token("watcher", &[]),
        );
        let (prices, stop) = (prices.clone(), stop_reader.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let response = http.get(&url).bearer_auth(&token).send().await.unwrap();
                // A shed read (503 on a busy machine) observes nothing.
                if response.status() == StatusCode::OK {
                    let view: Value = response.json().await.unwrap();
                    // No price yet (null) reads as 0: below any real price.
                    let price = view["current_price"].as_i64().unwrap_or(0);
                    prices.lock().unwrap().push(price);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let accepted = Arc::new(Mutex::new(Vec::new()));
    let mut bidders = Vec::new();
    for b in 0..200 {
        let (http, addr, accepted) = (app.http.clone(), app.addr, accepted.clone());
        let token = app.token(&format!("bidder-{b}"), &[Role::Bidder]);
        let auction_id = auction_id.clone();
        bidders.push(tokio::spawn(async move {
            // Round i's amounts all lie above round i-1's, so bids keep
            // landing above the price while the bidders race each other.
            let offset = (b as i64 * 7_919) % 5_000;
            for i in 0..5 {
                let amount = 1_000 + i * 5_000 + offset;
                let response = place_bid_retrying(&http, addr, &token, &auction_id, amount).await;
                let status = response.status();
                let body: Value = response.json().await.unwrap();
                match status {
                    StatusCode::ACCEPTED | StatusCode::CREATED => {
                        accepted.lock().unwrap().push(id_of(&body));
                    }
                    StatusCode::UNPROCESSABLE_ENTITY => {
                        assert_eq!(body["code"], "bid_too_low", "{body}")
                    }
                    other => panic!("unexpected {other}: {body}"),
                }
            }
        }));
    }
    for bidder in bidders {
        bidder.await.unwrap();
    }
    let auction_uuid: Uuid = auction_id.parse().unwrap();
    wait_resolved(&db, auction_uuid, Duration::from_secs(60)).await;
    stop_reader.cancel();
    reader.await.unwrap();

    let accepted = accepted.lock().unwrap().clone();
    // How many land above the price depends on timing; the invariants below
    // must hold either way, but the test must not be vacuous.
    assert!(
        accepted.len() >= 50,
        "many bids are accepted ({})",
        accepted.len()
    );
    let bids = assert_consistent(&db, auction_uuid).await;
    // Every 2xx bid is in the log exactly once, with one outcome.
    let logged: std::collections::HashSet<Uuid> = bids.iter().map(|b| b.id).collect();
    assert_eq!(logged.len(), bids.len());
    for id in &accepted {
        assert!(logged.contains(id), "accepted bid {id} is in the log");
    }
    assert_eq!(bids.len(), accepted.len(), "no bid without a 2xx");
    assert_eq!(
        bids.iter().filter(|b| b.status == "leading").count(),
        1,
        "exactly one leading bid"
    );
    let observed = prices.lock().unwrap().clone();
    assert!(observed.len() > 5, "the reader sampled the price");
    assert!(
        observed.windows(2).all(|w| w[0] <= w[1]),
        "current_price never decreased: {observed:?}"
    );
    let view = app.auction(&auction_id).await;
    assert_eq!(
        view["bid_count"].as_i64().unwrap(),
        bids.iter().filter(|b| b.status != "rejected").count() as i64
    );
}

/// Inserts a pending bid in `tx` as the log path's append does (with the
/// transaction that writes it) and returns its id.
async fn insert_pending(
    tx: &tokio_postgres::Transaction<'_>,
    auction_id: Uuid,
    amount: i64,
) -> Uuid {
    let id = Uuid::now_v7();
    tx.execute(
        "INSERT INTO bid_log (auction_id, id, bidder_id, amount, idempotency_key, xid) \
         VALUES ($1, $2::uuid, 'held-' || $3::int8, $3, 'k-' || $2::uuid::text, pg_current_xact_id()::text::int8)",
        &[&auction_id, &id, &amount],
    )
    .await
    .unwrap();
    id
}

#[tokio::test]
async fn bids_of_transactions_held_open_across_resolver_rounds_are_resolved_in_either_order() {
    let app = TestApp::spawn().await;
    for order in [[0, 1], [1, 0]] {
        let auction = app.create_auction("seller-1", json!({})).await;
        let auction_id = id_of(&auction);
        let db = app.db().await;
        // Two inserts held open: the first gets the lower transaction id.
        let (mut first, mut second) = (app.db().await, app.db().await);
        let held = [
            first.transaction().await.unwrap(),
            second.transaction().await.unwrap(),
        ];
        let ids = [
            insert_pending(&held[0], auction_id, 5_000).await,
            insert_pending(&held[1], auction_id, 6_000).await,
        ];
        let mut xids = Vec::new();
        for tx in &held {
            let row = tx
                .query_one("SELECT pg_current_xact_id()::text::int8", &[])
                .await;
            xids.push(row.unwrap().get::<_, i64>(0));
        }
        // Later bids are resolved past both while they are still open.
        let mut expected = 0;
        let mut held = held.map(Some);
        for (round, index) in order.into_iter().enumerate() {
            let amount = 1_000 + 100 * round as i64;
            let response = app
                .bid("later", &auction_id.to_string(), amount, &new_key())
                .await;
            assert_eq!(response.status(), StatusCode::ACCEPTED);
            wait_resolved(&db, auction_id, Duration::from_secs(10)).await;
            expected += 1;
            let sql = "SELECT open_xids FROM auctions WHERE id = $1";
            let open: Vec<i64> = db.query_one(sql, &[&auction_id]).await.unwrap().get(0);
            let still_held = (0..2).filter(|&i| held[i].is_some()).map(|i| xids[i]);
            assert!(
                still_held.into_iter().all(|x| open.contains(&x)),
                "{open:?} {xids:?}"
            );
            held[index].take().unwrap().commit().await.unwrap();
            wait_resolved(&db, auction_id, Duration::from_secs(10)).await;
            expected += 1;
            let bids = assert_consistent(&db, auction_id).await;
            assert_eq!(bids.len(), expected, "order {order:?}, round {round}");
            let committed = bids.iter().find(|b| b.id == ids[index]);
            assert!(
                committed.is_some_and(|b| b.resolution_no.is_some()),
                "order {order:?}"
            );
        }
        assert_eq!(unresolved_bids(&db).await, 0, "order {order:?}");
    }
}

#[tokio::test]
async fn a_bid_committing_after_a_later_sequenced_bid_is_still_resolved() {
    let app = TestApp::spawn().await;
    let auction = app.create_auction("seller-1", json!({})).await;
    let auction_id = id_of(&auction);

    // Hold an insert's transaction open: it takes a sequence number now and
    // commits only after a later bid has been resolved.
    let mut held = app.db().await;
    let tx = held.transaction().await.unwrap();
    let early_id = Uuid::now_v7();
    tx.execute(
        "INSERT INTO bid_log (auction_id, id, bidder_id, amount, idempotency_key, xid) \
         VALUES ($1, $2, 'early', 5000, 'k-early', pg_current_xact_id()::text::int8)",
        &[&auction_id, &early_id],
    )
    .await
    .unwrap();

    let response = app
        .bid("late", &auction_id.to_string(), 1000, &new_key())
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let late: Value = response.json().await.unwrap();
    let db = app.db().await;
    wait_resolved(&db, auction_id, Duration::from_secs(10)).await;
    let seqs: Vec<i64> = db
        .query(
            "SELECT seq FROM bid_log WHERE auction_id = $1 ORDER BY seq",
            &[&auction_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(seqs.len(), 1, "only the later bid is visible so far");

    tx.commit().await.unwrap();
    wait_resolved(&db, auction_id, Duration::from_secs(10)).await;
    let bids = assert_consistent(&db, auction_id).await;
    assert_eq!(bids.len(), 2);
    let early = bids
        .iter()
        .find(|b| b.id == early_id)
        .expect("early bid resolved");
    assert!(
        early.resolution_no
            > bids
                .iter()
                .find(|b| b.id == id_of(&late))
                .unwrap()
                .resolution_no
    );
    assert_eq!(
        early.status, "leading",
        "the early bid (5000) outbids the late one (1000)"
    );
}

#[tokio::test]
async fn bids_are_accepted_while_the_auction_row_is_locked() {
    let app = TestApp::spawn().await;
    let auction = app.create_auction("seller-1", json!({})).await;
    let auction_id = id_of(&auction);
    // Warm-up bid, so the lock below is taken on a row the resolver uses.
    assert_eq!(
        app.bid("warm", &auction_id.to_string(), 1000, &new_key())
            .await
            .status(),
        StatusCode::ACCEPTED
    );

    let mut locker = app.db().await;
    let tx = locker.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM auctions WHERE id = $1 FOR UPDATE",
        &[&auction_id],
    )
    .await
    .unwrap();

    for i in 0..5 {
        let started = Instant::now();
        let response = app
            .bid(
                &format!("b{i}"),
                &auction_id.to_string(),
                5_000 + i * 1_000,
                &new_key(),
            )
            .await;
        let elapsed = started.elapsed();
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        assert!(
            elapsed < Duration::from_secs(1),
            "bid took {elapsed:?} while the row was locked"
        );
    }
    tx.rollback().await.unwrap();
    let db = app.db().await;
    wait_resolved(&db, auction_id, Duration::from_secs(20)).await;
    assert_consistent(&db, auction_id).await;
}

#[tokio::test]
async fn idempotency_key_replays_refuses_reuse_and_never_creates_two_bids() {
    let app = TestApp::spawn().await;
    let auction = app.create_auction("seller-1", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();

    let key = new_key();
    let first = app.bid("alice", &auction_id, 1500, &key).await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();

    let replay = app.bid("alice", &auction_id, 1500, &key).await;
    assert!(replay.status().is_success());
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let replay: Value = replay.json().await.unwrap();
    assert_eq!(replay["id"], first["id"]);

    // Another bidder may use the same key: keys are scoped by bidder.
    let other = app.bid("bob", &auction_id, 2500, &key).await;
    assert_eq!(other.status(), StatusCode::ACCEPTED);

    let reused = app.bid("alice", &auction_id, 1600, &key).await;
    assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        reused.json::<Value>().await.unwrap()["code"],
        "idempotency_key_reused"
    );

    let missing = app
        .http
        .post(app.url(&format!("/api/auctions/{auction_id}/bids")))
        .bearer_auth(app.token("alice", &[]))
        .json(&json!({"amount": 1500}))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        missing.json::<Value>().await.unwrap()["code"],
        "idempotency_key_missing"
    );

    // 50 identical requests at once: one bid, and every answer names it.
    let key = new_key();
    let mut requests = Vec::new();
    for _ in 0..50 {
        let (http, addr, token, auction_id, key) = (
            app.http.clone(),
            app.addr,
            app.token("carol", &[]),
            auction_id.clone(),
            key.clone(),
        );
        requests.push(tokio::spawn(async move {
            let response = place_bid(&http, addr, &token, &auction_id, 9_000, &key).await;
            (response.status(), response.json::<Value>().await.unwrap())
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for request in requests {
        let (status, body) = request.await.unwrap();
        match status {
            s if s.is_success() => {
                ids.insert(body["id"].as_str().unwrap().to_owned());
            }
            StatusCode::CONFLICT => assert_eq!(body["code"], "idempotency_key_in_flight"),
            // Shedding load on a busy machine is allowed; a client would retry.
            StatusCode::SERVICE_UNAVAILABLE => assert_eq!(body["code"], "overloaded"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(ids.len(), 1, "all successful answers name the same bid");
    let db = app.db().await;
    let count: i64 = db
        .query_one(
            "SELECT count(*) FROM bid_log WHERE bidder_id = 'carol' AND idempotency_key = $1",
            &[&key],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1);
    wait_resolved(&db, auction_id.parse().unwrap(), Duration::from_secs(10)).await;
    assert_consistent(&db, auction_id.parse().unwrap()).await;
}

/// Retries of accepted bids after the price moved past them, arriving at
/// once with fresh bids that are too low: the pre-check refuses them all,
/// their keys are looked up together, and each retry still replays its
/// bid while each fresh bid is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_after_the_price_moved_on_replay_while_fresh_low_bids_are_refused() {
    const BIDDERS: usize = 40;
    let app = TestApp::spawn().await;
    let auction = app.create_auction("seller-1", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let mut accepted = Vec::new();
    for i in 0..BIDDERS {
        let key = new_key();
        let response = app
            .bid(
                &format!("early-{i}"),
                &auction_id,
                1_000 + i as i64 * 10,
                &key,
            )
            .await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let bid: Value = response.json().await.unwrap();
        accepted.push((i, key, bid["id"].as_str().unwrap().to_owned()));
    }
    let raise = app.bid("late", &auction_id, 1_000_000, &new_key()).await;
    assert_eq!(raise.status(), StatusCode::ACCEPTED);
    let db = app.db().await;
    wait_resolved(&db, id_of(&auction), Duration::from_secs(10)).await;
    // Past the snapshot's lifetime, one low bid re-reads it; the requests
    // that race that re-read would be checked against the old price.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let warm = app.bid("warm", &auction_id, 1_100, &new_key()).await;
    assert_eq!(warm.status(), StatusCode::UNPROCESSABLE_ENTITY);

    let retries = accepted.iter().map(|(i, key, _)| {
        let (http, addr, token, auction_id, key) = (
            app.http.clone(),
            app.addr,
            app.token(&format!("early-{i}"), &[]),
            auction_id.clone(),
            key.clone(),
        );
        let amount = 1_000 + *i as i64 * 10;
        async move { place_bid_retrying_key(&http, addr, &token, &auction_id, amount, &key).await }
    });
    let fresh = (0..BIDDERS).map(|i| {
        let (http, addr, token, auction_id) = (
            app.http.clone(),
            app.addr,
            app.token(&format!("fresh-{i}"), &[]),
            auction_id.clone(),
        );
        async move { place_bid_retrying(&http, addr, &token, &auction_id, 1_100).await }
    });
    let (retries, fresh) = tokio::join!(
        futures::future::join_all(retries),
        futures::future::join_all(fresh)
    );
    for ((i, _, id), response) in accepted.iter().zip(retries) {
        assert!(
            response.status().is_success(),
            "retry {i}: {}",
            response.status()
        );
        assert_eq!(response.headers()["idempotent-replayed"], "true");
        let bid: Value = response.json().await.unwrap();
        assert_eq!(bid["id"], id.as_str(), "retry {i} names its bid");
        let status = bid["status"].as_str().unwrap();
        assert!(
            ["outbid", "rejected"].contains(&status),
            "retry {i} shows its resolved outcome: {bid}"
        );
    }
    for response in fresh {
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "bid_too_low", "{body}");
    }
    let bids = assert_consistent(&db, id_of(&auction)).await;
    assert_eq!(
        bids.len(),
        BIDDERS + 1,
        "no retry or refused bid was written"
    );
    app.stop().await;
}

#[tokio::test]
async fn prefer_wait_returns_the_resolved_outcome() {
    let app = TestApp::spawn().await;
    let auction = app.create_auction("seller-1", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap();
    let response = app
        .http
        .post(app.url(&format!("/api/auctions/{auction_id}/bids")))
        .bearer_auth(app.token("alice", &[]))
        .header("Idempotency-Key", new_key())
        .header("Prefer", "wait=5")
        .json(&json!({"amount": 1200}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()["preference-applied"], "wait=5");
    assert!(response.headers().contains_key("gavel-consistency-token"));
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let bid: Value = response.json().await.unwrap();
    assert_eq!(bid["status"], "leading");
    assert_eq!(bid["auction_price"], 1000);
    assert_eq!(
        location,
        format!("/api/bids/{}", bid["id"].as_str().unwrap())
    );

    let own = app
        .http
        .get(app.url(&location))
        .bearer_auth(app.token("alice", &[]))
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), StatusCode::OK);
    assert_eq!(own.json::<Value>().await.unwrap()["status"], "leading");
    let other = app
        .http
        .get(app.url(&location))
        .bearer_auth(app.token("mallory", &[]))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::NOT_FOUND);
    let admin = app
        .http
        .get(app.url(&location))
        .bearer_auth(app.token("root", &[Role::Admin]))
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_bidder_over_the_rate_limit_gets_429_with_retry_after() {
    let app = TestApp::spawn_with(|c| {
        c.bids.rate_limit = 1;
        c.bids.rate_burst = 2;
    })
    .await;
    let auction = app.create_auction("seller-1", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap();
    for amount in [1000, 2000] {
        assert_eq!(
            app.bid("eager", auction_id, amount, &new_key())
                .await
                .status(),
            StatusCode::ACCEPTED
        );
    }
    let limited = app.bid("eager", auction_id, 3000, &new_key()).await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after));
    assert_eq!(
        limited.json::<Value>().await.unwrap()["code"],
        "rate_limited"
    );
    // Other bidders are not affected.
    assert_eq!(
        app.bid("patient", auction_id, 4000, &new_key())
            .await
            .status(),
        StatusCode::ACCEPTED
    );
}

#[tokio::test]
async fn a_key_is_kept_as_long_as_its_bid() {
    let app = TestApp::spawn().await;
    let auction = app.create_auction("seller-1", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap();
    let key = new_key();
    let first = app.bid("alice", auction_id, 1000, &key).await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first: Value = first.json().await.unwrap();
    let db = app.db().await;
    wait_resolved(&db, id_of(&auction), Duration::from_secs(10)).await;
    // A bid received long past the contract's 24 h, resolved since.
    db.execute(
        "UPDATE bid_log SET received_at = now() - interval '30 days' WHERE id = $1",
        &[&id_of(&first)],
    )
    .await
    .unwrap();

    let replay = app.bid("alice", auction_id, 1000, &key).await;
    assert!(replay.status().is_success(), "{}", replay.status());
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.json::<Value>().await.unwrap()["id"], first["id"]);
    let reused = app.bid("alice", auction_id, 2000, &key).await;
    assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn the_same_key_on_two_auctions_makes_a_bid_on_each() {
    let app = TestApp::spawn().await;
    let (one, two) = (
        app.create_auction("seller-1", json!({})).await,
        app.create_auction("seller-2", json!({})).await,
    );
    let (one_id, two_id) = (one["id"].as_str().unwrap(), two["id"].as_str().unwrap());
    let key = new_key();
    let on_one = app.bid("alice", one_id, 1500, &key).await;
    assert_eq!(on_one.status(), StatusCode::ACCEPTED);
    let on_one: Value = on_one.json().await.unwrap();
    // The contract allows a refusal or a separate request: Gavel takes it
    // as a separate request, whatever its amount.
    let on_two = app.bid("alice", two_id, 2500, &key).await;
    assert_eq!(on_two.status(), StatusCode::ACCEPTED);
    assert!(on_two.headers().get("idempotent-replayed").is_none());
    let on_two: Value = on_two.json().await.unwrap();
    assert_ne!(on_two["id"], on_one["id"]);
    assert_eq!(on_two["auction_id"], two["id"]);

    // Each key replays its own auction's bid and refuses another amount there.
    for (auction_id, amount, first) in [(one_id, 1500, &on_one), (two_id, 2500, &on_two)] {
        let replay = app.bid("alice", auction_id, amount, &key).await;
        assert!(replay.status().is_success(), "{}", replay.status());
        assert_eq!(replay.headers()["idempotent-replayed"], "true");
        assert_eq!(replay.json::<Value>().await.unwrap()["id"], first["id"]);
        let reused = app.bid("alice", auction_id, amount + 100, &key).await;
        assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            reused.json::<Value>().await.unwrap()["code"],
            "idempotency_key_reused"
        );
    }
    // Both are resolved on their own auctions, each the leader there.
    let db = app.db().await;
    for (auction, first) in [(&one, &on_one), (&two, &on_two)] {
        wait_resolved(&db, id_of(auction), Duration::from_secs(10)).await;
        let bids = assert_consistent(&db, id_of(auction)).await;
        assert_eq!(bids.len(), 1);
        assert_eq!(bids[0].id, id_of(first));
        assert_eq!(bids[0].status, "leading");
    }
}

#[tokio::test]
async fn a_table_with_shrinking_steps_never_refuses_a_bid_the_resolver_accepts() {
    let app = TestApp::spawn().await;
    // At 100 the next minimum is 200; once the reserve lifts the price to
    // 150 it is only 151.
    let auction = app
        .create_auction(
            "seller-1",
            json!({"starting_price": 100, "reserve_price": 150,
                   "increments": [{"from": 0, "step": 100}, {"from": 150, "step": 1}]}),
        )
        .await;
    let auction_id = auction["id"].as_str().unwrap();
    let first = app.bid_resolved("alice", auction_id, 100).await;
    assert_eq!(first["status"], "leading");
    let raised = app.bid_resolved("alice", auction_id, 300).await;
    assert_eq!(raised["auction_price"], 150);
    let response = app.bid("bob", auction_id, 160, &new_key()).await;
    assert_eq!(
        response.status(),
        StatusCode::ACCEPTED,
        "160 is above the real minimum of 151"
    );
    let db = app.db().await;
    wait_resolved(&db, id_of(&auction), Duration::from_secs(10)).await;
    let bids = assert_consistent(&db, id_of(&auction)).await;
    let bob = bids.iter().find(|b| b.bidder_id == "bob").unwrap();
    assert_eq!(
        (bob.status.as_str(), bob.price_after),
        ("outbid", Some(161))
    );
}

#[tokio::test]
async fn a_resolver_whose_batches_time_out_takes_smaller_ones_and_recovers() {
    let app = TestApp::spawn_with(|c| c.resolver.enabled = false).await;
    let auction = app.create_auction("seller-1", json!({})).await;
    let auction_id = id_of(&auction);
    for (bidder, amount) in [("alice", 1_000), ("bob", 1_500)] {
        let response = app
            .bid(bidder, &auction_id.to_string(), amount, &new_key())
            .await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
    let mut config = test_config(&app.database_url);
    config.pools.statement_timeout = Duration::from_millis(200);
    config.pools.lock_timeout = Duration::from_secs(5);
    let resolver = resolver_on(&config);
    let full = resolver.batch_size();

    // Its statements wait on a lock until the statement timeout cancels them.
    let locker = app.db().await;
    locker
        .batch_execute("BEGIN; LOCK TABLE bid_log IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let error = resolver.drain(auction_id).await.unwrap_err();
    assert!(
        format!("{error:#}").contains("statement timeout"),
        "{error:#}"
    );
    assert_eq!(resolver.batch_size(), full / 2);
    locker.batch_execute("COMMIT").await.unwrap();

    assert_eq!(resolver.drain(auction_id).await.unwrap(), 2);
    assert!(
        resolver.batch_size() > full / 2,
        "grows back after a success"
    );
    let db = app.db().await;
    assert_consistent(&db, auction_id).await;
}

#[tokio::test]
async fn the_resolver_plans_each_statement_once_and_settles_by_probes() {
    let app = TestApp::spawn_with(|c| c.resolver.enabled = false).await;
    let mut config = test_config(&app.database_url);
    config.resolver.settle_grace = Duration::from_millis(100);
    let ends_at = chrono::Utc::now() + chrono::Duration::milliseconds(2_500);
    let auction = app
        .create_auction("seller-1", json!({"ends_at": ends_at.to_rfc3339()}))
        .await;
    let auction_id = id_of(&auction);
    // One connection, set up as the service's resolver pool is.
    let (pool, resolver) = resolver_pool_on(&config, Plans::Custom);
    // One bid per batch, each outbidding the last.
    for (i, bidder) in ["ann", "bob", "cat", "dan", "eve", "fay", "gus"]
        .into_iter()
        .enumerate()
    {
        let amount = 1_000 + 500 * i as i64;
        let response = app
            .bid(bidder, &auction_id.to_string(), amount, &new_key())
            .await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        assert_eq!(resolver.drain(auction_id).await.unwrap(), 1);
    }
    let wait = (ends_at + chrono::Duration::milliseconds(300) - chrono::Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(wait).await;
    let settled = resolver.resolve_auction(auction_id).await.unwrap();
    assert!(
        matches!(
            settled,
            gavel::resolver::Step::Applied { settled: true, .. }
        ),
        "{settled:?}"
    );

    // What the resolver's own session planned, statement by statement.
    let client = pool.get().await.unwrap();
    let plans: Vec<(String, i64, i64)> = client
        .query(
            "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    let statement_with = |fragment: &str| {
        let found: Vec<_> = plans
            .iter()
            .filter(|(statement, ..)| statement.contains(fragment))
            .collect();
        assert_eq!(found.len(), 1, "one statement has {fragment:?}: {plans:#?}");
        found[0].clone()
    };
    for fragment in [
        "pg_try_advisory_xact_lock",
        "FROM auctions WHERE id = ANY($1::uuid[])",
        "ORDER BY b.xid, b.seq LIMIT $2",
        "UPDATE auctions SET leader_bid_id",
        "pg_notify",
        "INSERT INTO bid_outcomes",
        "VALUES ($1, $2, 'bids', $3, $4, $5, $6)",
    ] {
        let (_, generic, custom) = statement_with(fragment);
        assert_eq!(custom, 0, "{fragment:?} was planned for its parameters");
        assert!(
            generic >= 5,
            "{fragment:?} ran on its generic plan {generic} times"
        );
    }
    // Settlement's plan, made as the resolver makes it on a young table:
    // each accepted bid looked up by key, never a scan of the log.
    let (settle, ..) = statement_with("'auction.settled'");
    let plan = generic_plan_in_a_resolver_transaction(&client, &settle, 5).await;
    assert!(
        !plan.contains("Seq Scan") && !plan.contains("Hash"),
        "{plan}"
    );
    assert!(plan.contains("bid_log_history"), "{plan}");
    drop(client);
    let bids = assert_consistent(&app.db().await, auction_id).await;
    let won: Vec<&str> = (bids.iter())
        .filter(|b| b.status == "won")
        .map(|b| b.bidder_id.as_str())
        .collect();
    assert_eq!(won, ["gus"]);
    assert!(bids
        .iter()
        .filter(|b| b.bidder_id != "gus")
        .all(|b| b.status == "lost"));
}

/// The plan `statement` (with `params` parameters) gets in a resolver
/// transaction on `client`: generic, with the planner settings the
/// resolver's writes run under.
async fn generic_plan_in_a_resolver_transaction(
    client: &tokio_postgres::Client,
    statement: &str,
    params: usize,
) -> String {
    client
        .batch_execute(&format!(
            "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan; \
             SELECT set_config('enable_seqscan', 'off', true), \
                    set_config('enable_hashjoin', 'off', true), \
                    set_config('enable_mergejoin', 'off', true); \
             PREPARE probe AS {statement}"
        ))
        .await
        .unwrap();
    let nulls = vec!["NULL"; params].join(", ");
    let rows = client
        .simple_query(&format!("EXPLAIN EXECUTE probe({nulls})"))
        .await
        .unwrap();
    client
        .batch_execute("DEALLOCATE probe; ROLLBACK")
        .await
        .unwrap();
    rows.iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn quiet_auctions_are_resolved_together_in_one_transaction() {
    let app = TestApp::spawn_with(|c| c.resolver.enabled = false).await;
    let mut config = test_config(&app.database_url);
    config.resolver.settle_grace = Duration::from_millis(200);
    let resolver = resolver_on(&config);
    let db = app.db().await;
    let bid = |bidder: &'static str, auction: Uuid, amount: i64| {
        let app = &app;
        async move {
            let response = app
                .bid(bidder, &auction.to_string(), amount, &new_key())
                .await;
            assert_eq!(response.status(), StatusCode::ACCEPTED);
        }
    };
    // `led` has a leader from an earlier transaction, whom its next bid outbids.
    let led = id_of(&app.create_auction("seller-1", json!({})).await);
    bid("ann", led, 1_000).await;
    assert_eq!(resolver.drain(led).await.unwrap(), 1);
    bid("bob", led, 2_000).await;
    // `fresh` gets its first bids, one outbidding the other in the batch.
    let fresh = id_of(&app.create_auction("seller-1", json!({})).await);
    bid("cat", fresh, 1_000).await;
    bid("dan", fresh, 1_500).await;
    // `ending` has ended by the time it is resolved: it settles.
    let ends_at = chrono::Utc::now() + chrono::Duration::milliseconds(1_500);
    let ending = id_of(
        &app.create_auction("seller-1", json!({"ends_at": ends_at.to_rfc3339()}))
            .await,
    );
    bid("eve", ending, 1_000).await;
    // `held` is another resolver's right now.
    let held = id_of(&app.create_auction("seller-1", json!({})).await);
    bid("fay", held, 1_000).await;
    let mut other = app.db().await;
    let other_tx = other.transaction().await.unwrap();
    other_tx
        .execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1::text, 0))",
            &[&held.to_string()],
        )
        .await
        .unwrap();
    // `idle` has nothing to do.
    let idle = id_of(&app.create_auction("seller-1", json!({})).await);
    let wait = (ends_at + chrono::Duration::milliseconds(400) - chrono::Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(wait).await;

    let steps = resolver
        .resolve_auctions(&[led, fresh, ending, held, idle])
        .await
        .unwrap();
    let step_of = |auction: Uuid| {
        steps
            .iter()
            .find(|(id, _)| *id == auction)
            .map(|(_, step)| *step)
            .unwrap()
    };
    use gavel::resolver::Step;
    assert_eq!(steps.len(), 5, "{steps:?}");
    let applied = |bids, settled| Step::Applied {
        bids,
        settled,
        more: false,
    };
    assert_eq!(step_of(led), applied(1, false));
    assert_eq!(step_of(fresh), applied(2, false));
    assert_eq!(step_of(ending), applied(1, true));
    assert_eq!(step_of(held), Step::Busy);
    assert_eq!(step_of(idle), Step::Idle);

    // One transaction: every outcome written at the same `now()`, each
    // with its own auction's new version.
    let written: Vec<(Uuid, String, chrono::DateTime<chrono::Utc>, i64)> = db
        .query(
            "SELECT b.auction_id, b.bidder_id, b.resolved_at, a.version FROM bids b \
             JOIN auctions a ON a.id = b.auction_id AND a.version = b.resolved_version \
             WHERE b.bidder_id <> 'ann' AND b.status <> 'pending' ORDER BY b.bidder_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect();
    let bidders: Vec<&str> = written.iter().map(|w| w.1.as_str()).collect();
    assert_eq!(bidders, ["bob", "cat", "dan", "eve"], "{written:?}");
    assert!(
        written.iter().all(|w| w.2 == written[0].2),
        "outcomes of one transaction: {written:?}"
    );
    let led_bids = assert_consistent(&db, led).await;
    let status_of = |bids: &[AuditBid], bidder: &str| {
        bids.iter()
            .find(|b| b.bidder_id == bidder)
            .map(|b| b.status.clone())
            .unwrap()
    };
    assert_eq!(status_of(&led_bids, "ann"), "outbid", "marked in the group");
    assert_eq!(status_of(&led_bids, "bob"), "leading");
    let fresh_bids = assert_consistent(&db, fresh).await;
    assert_eq!(status_of(&fresh_bids, "cat"), "outbid");
    assert_eq!(status_of(&fresh_bids, "dan"), "leading");
    let ending_bids = assert_consistent(&db, ending).await;
    assert_eq!(status_of(&ending_bids, "eve"), "won");
    assert_eq!(
        unresolved_bids(&db).await,
        1,
        "only the held auction's bid is left"
    );

    other_tx.commit().await.unwrap();
    assert_eq!(resolver.drain(held).await.unwrap(), 1);
    assert_consistent(&db, held).await;
    assert_eq!(unresolved_bids(&db).await, 0);
}

/// A resolver driven by the test itself, on one connection with `config`'s
/// session limits.
fn resolver_on(config: &gavel::config::Config) -> gavel::resolver::Resolver {
    resolver_pool_on(config, Plans::Auto).1
}

/// How a test resolver's session plans its statements.
enum Plans {
    /// As PostgreSQL decides by default.
    Auto,
    /// For their parameters, as the service's resolver pool does.
    Custom,
}

/// A resolver driven by the test itself and its one-connection pool.
fn resolver_pool_on(
    config: &gavel::config::Config,
    plans: Plans,
) -> (gavel::db::Pool, gavel::resolver::Resolver) {
    let settings = gavel::db::PoolSettings::new(config, 1, "gavel-test");
    let settings = match plans {
        Plans::Auto => settings,
        Plans::Custom => settings.with_custom_plans(),
    };
    let pool = gavel::db::build_pool(&config.database_url, "test-resolver", &settings).unwrap();
    let resolver = gavel::resolver::Resolver::new(
        pool.clone(),
        gavel::signals::Signals::new(),
        &config.resolver,
    );
    (pool, resolver)
}

/// Bids the resolver still finds (see `gavel::db::bids::Progress`), as `db`
/// sees them.
async fn unresolved_bids(db: &tokio_postgres::Client) -> i64 {
    let sql = format!(
        "SELECT count(*) FROM auctions a CROSS JOIN LATERAL {} p",
        gavel::db::bids::unresolved("id")
    );
    db.query_one(&sql, &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn outcomes_are_recorded_per_batch_without_writing_any_bid_again() {
    let app = TestApp::spawn().await;
    let auction = app.create_auction("seller-1", json!({})).await;
    let auction_id = id_of(&auction);
    let db = app.db().await;
    for (bidder, amount) in [("ann", 1_000), ("bob", 1_500), ("cat", 1_200)] {
        let response = app
            .bid(bidder, &auction_id.to_string(), amount, &new_key())
            .await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
    wait_resolved(&db, auction_id, Duration::from_secs(10)).await;

    assert_eq!(
        unresolved_bids(&db).await,
        0,
        "the auction's progress passed every resolved bid"
    );
    // Every bid's row is still the version its append wrote (its `xmin` is
    // the transaction recorded in it): no outcome, outbid mark or
    // settlement updated it.
    let rewritten: i64 = db
        .query_one(
            "SELECT count(*) FROM bid_log \
             WHERE auction_id = $1 AND xmin::text::int8 <> xid % 4294967296",
            &[&auction_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rewritten, 0);
    // The batches' rows hold every outcome, once.
    let recorded: i64 = db
        .query_one(
            "SELECT sum(cardinality(seqs)) FROM bid_outcomes WHERE auction_id = $1",
            &[&auction_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, 3);
    let statuses: Vec<(String, String)> = db
        .query(
            "SELECT bidder_id, status FROM bids WHERE auction_id = $1 ORDER BY bidder_id",
            &[&auction_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let expected = [("ann", "outbid"), ("bob", "leading"), ("cat", "outbid")];
    assert_eq!(
        statuses,
        expected.map(|(b, s)| (b.to_owned(), s.to_owned()))
    );
}

#[tokio::test]
async fn a_pending_bid_needs_the_transaction_that_wrote_it_and_is_then_resolved() {
    let app = TestApp::spawn().await;
    let auction = app.create_auction("seller-1", json!({})).await;
    let auction_id = id_of(&auction);
    let db = app.db().await;

    // A writer that does not record its transaction (an older Gavel, a
    // script): its pending bid would never be found, so it is refused.
    let refused = db
        .execute(
            "INSERT INTO bid_log (auction_id, id, bidder_id, amount, idempotency_key) \
             VALUES ($1, $2, 'script', 2000, 'k-script')",
            &[&auction_id, &Uuid::now_v7()],
        )
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("bid_log_pending_has_xid")
            || format!("{refused:?}").contains("bid_log_pending_has_xid"),
        "{refused:?}"
    );
    // A bid inserted already resolved (the row-lock baseline) needs none,
    // and the resolver never takes it up.
    db.execute(
        "INSERT INTO bid_log (auction_id, id, bidder_id, amount, idempotency_key, status, \
         resolution_no, resolved_version, resolved_at) \
         VALUES ($1, $2, 'resolved', 1000, 'k-resolved', 'rejected', 0, 0, now())",
        &[&auction_id, &Uuid::now_v7()],
    )
    .await
    .unwrap();
    // With its transaction, a script's bid is resolved like any other.
    let pending_id = Uuid::now_v7();
    db.execute(
        "INSERT INTO bid_log (auction_id, id, bidder_id, amount, idempotency_key, xid) \
         VALUES ($1, $2, 'script', 2000, 'k-script', pg_current_xact_id()::text::int8)",
        &[&auction_id, &pending_id],
    )
    .await
    .unwrap();
    wait_resolved(&db, auction_id, Duration::from_secs(10)).await;
    let status: String = db
        .query_one("SELECT status FROM bids WHERE id = $1", &[&pending_id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "leading");
    assert_eq!(unresolved_bids(&db).await, 0);
}
