//! The read side: auction views (ETag, masking, hidden reserve,
//! next_min_bid, scheduled status), the paginated public bid history, and
//! auction creation's 201.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{SubsecRound as _, Utc};
use gavel::auth::Role;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;

async fn get_auction_with(
    app: &TestApp,
    auction_id: &str,
    if_none_match: Option<&str>,
) -> reqwest::Response {
    let mut request = app
        .http
        .get(app.url(&format!("/api/auctions/{auction_id}")))
        .bearer_auth(app.token("reader", &[]));
    if let Some(tag) = if_none_match {
        request = request.header("If-None-Match", tag);
    }
    request.send().await.unwrap()
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("missing {name}"))
        .to_str()
        .unwrap()
        .to_owned()
}

/// `Gavel-Server-Time`: UTC, exactly three fractional digits, and the
/// server's clock (this test runs on the same machine).
fn assert_server_time(value: &str) {
    assert_eq!(value.len(), "2026-11-25T11:59:41.250Z".len(), "{value}");
    assert!(
        value.ends_with('Z') && value.as_bytes()[19] == b'.',
        "{value}"
    );
    let at = chrono::DateTime::parse_from_rfc3339(value).expect("RFC 3339");
    let skew = (Utc::now() - at.to_utc()).num_milliseconds().abs();
    assert!(skew < 5_000, "{value} is {skew} ms from this clock");
}

#[tokio::test]
async fn auction_etag_is_the_version_and_if_none_match_gives_304() {
    let app = TestApp::spawn().await;
    let auction = app.create_auction("seller-1", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();

    let first = get_auction_with(&app, &auction_id, None).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(header(&first, "cache-control"), "no-cache");
    assert_server_time(&header(&first, "gavel-server-time"));
    let tag = header(&first, "etag");
    let view: Value = first.json().await.unwrap();
    let version = view["version"].as_i64().unwrap();
    assert_eq!(
        tag,
        format!("\"{version}\""),
        "a strong ETag of the version"
    );

    let cached = get_auction_with(&app, &auction_id, Some(&tag)).await;
    assert_eq!(cached.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(header(&cached, "etag"), tag);
    assert_server_time(&header(&cached, "gavel-server-time"));
    assert_eq!(
        header(&cached, "x-frame-options"),
        "DENY",
        "security headers on a 304 too"
    );
    assert!(
        cached.bytes().await.unwrap().is_empty(),
        "a 304 has no body"
    );
    let listed = get_auction_with(&app, &auction_id, Some(&format!("\"999999\", {tag}"))).await;
    assert_eq!(
        listed.status(),
        StatusCode::NOT_MODIFIED,
        "a list naming the current tag"
    );
    let other = get_auction_with(&app, &auction_id, Some("\"999999\"")).await;
    assert_eq!(other.status(), StatusCode::OK, "another tag gets the body");

    // A resolved bid changes the version, so the old tag no longer matches.
    app.bid_resolved("alice", &auction_id, 1_500).await;
    let changed = get_auction_with(&app, &auction_id, Some(&tag)).await;
    assert_eq!(changed.status(), StatusCode::OK);
    let new_tag = header(&changed, "etag");
    let view: Value = changed.json().await.unwrap();
    let new_version = view["version"].as_i64().unwrap();
    assert!(
        new_version > version,
        "the version moved ({version} -> {new_version})"
    );
    assert_eq!(new_tag, format!("\"{new_version}\""));
    assert_eq!(view["current_price"], 1_000);
    assert_eq!(
        get_auction_with(&app, &auction_id, Some(&new_tag))
            .await
            .status(),
        StatusCode::NOT_MODIFIED
    );
}

#[tokio::test]
async fn auction_view_masks_the_leader_hides_the_reserve_and_shows_next_min_bid() {
    let app = TestApp::spawn().await;
    let reserve = 777_777;
    let auction = app
        .create_auction(
            "seller-1",
            json!({
                "starting_price": 1_000,
                "reserve_price": reserve,
                "increments": [{"from": 0, "step": 7}, {"from": 1_000, "step": 25}],
            }),
        )
        .await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();

    let fresh = app.auction(&auction_id).await;
    assert_eq!(fresh["status"], "open");
    assert!(fresh["current_price"].is_null());
    assert!(fresh["leading_bidder"].is_null());
    assert_eq!(fresh["bid_count"], 0);
    assert_eq!(
        fresh["next_min_bid"], 1_000,
        "the starting price before any bid"
    );
    assert_eq!(fresh["reserve_price_met"], false);

    let alice = app.bid_resolved("alice", &auction_id, 1_500).await;
    assert_eq!(alice["status"], "leading");
    let view = app.auction(&auction_id).await;
    assert_eq!(view["current_price"], 1_000);
    assert_eq!(view["next_min_bid"], 1_025, "price + step(price)");
    let bob = app.bid_resolved("bob", &auction_id, 1_200).await;
    assert_eq!(bob["status"], "outbid");
    let view = app.auction(&auction_id).await;
    assert_eq!(view["current_price"], 1_225);
    assert_eq!(view["next_min_bid"], 1_250);
    assert_eq!(view["bid_count"], 2);

    // The leader is masked for everyone but the seller and admins (the
    // leader included); the reserve amount is never in a view.
    for (sub, roles, expected) in [
        ("bob", &[][..], "a***e"),
        ("alice", &[][..], "a***e"),
        ("carol", &[Role::Bidder][..], "a***e"),
        ("other-seller", &[Role::Seller][..], "a***e"),
        ("seller-1", &[Role::Seller][..], "alice"),
        ("root", &[Role::Admin][..], "alice"),
    ] {
        let response = app
            .get_as(&format!("/api/auctions/{auction_id}"), sub, roles)
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        let text = response.text().await.unwrap();
        let seen: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(seen["leading_bidder"], expected, "leading_bidder as {sub}");
        assert_eq!(seen["reserve_price_met"], false);
        assert!(
            seen.get("reserve_price").is_none(),
            "no reserve_price field as {sub}: {text}"
        );
        assert!(
            !text.contains(&reserve.to_string()),
            "the reserve amount leaks to {sub}: {text}"
        );
    }
    for (bidder, bid) in [("alice", &alice), ("bob", &bob)] {
        let own = app
            .get_as(
                &format!("/api/bids/{}", bid["id"].as_str().unwrap()),
                bidder,
                &[],
            )
            .await;
        assert!(
            !own.text().await.unwrap().contains(&reserve.to_string()),
            "the reserve leaks in a bid view"
        );
    }
    let history = app
        .get_as(&format!("/api/auctions/{auction_id}/bids"), "bob", &[])
        .await;
    assert!(
        !history.text().await.unwrap().contains(&reserve.to_string()),
        "the reserve leaks in the history"
    );
}

/// An auction starting `starts_in` from now and ending an hour after that.
async fn create_scheduled(app: &TestApp, starts_in: chrono::Duration) -> Value {
    let starts_at = Utc::now() + starts_in;
    app.create_auction(
        "seller-1",
        json!({
            "starts_at": starts_at.to_rfc3339(),
            "ends_at": (starts_at + chrono::Duration::hours(1)).to_rfc3339(),
        }),
    )
    .await
}

#[tokio::test]
async fn a_scheduled_auction_rejects_bids_as_not_started() {
    let app = TestApp::spawn().await;
    let auction = create_scheduled(&app, chrono::Duration::hours(1)).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    assert_eq!(auction["status"], "scheduled");
    assert_eq!(app.auction(&auction_id).await["status"], "scheduled");

    let bid = app.bid_resolved("alice", &auction_id, 5_000).await;
    assert_eq!(bid["status"], "rejected", "{bid}");
    assert_eq!(bid["reason"], "auction_not_started");
    assert!(bid["auction_price"].is_null());
    let view = app.auction(&auction_id).await;
    assert_eq!(view["status"], "scheduled");
    assert_eq!(view["bid_count"], 0);
    assert!(view["current_price"].is_null());
    assert!(view["leading_bidder"].is_null());
    assert_eq!(view["next_min_bid"], 1_000);
    let db = app.db().await;
    assert_consistent(&db, id_of(&auction)).await;
}

#[tokio::test]
async fn the_etag_changes_when_a_scheduled_auction_opens() {
    let app = TestApp::spawn().await;
    let auction = create_scheduled(&app, chrono::Duration::seconds(2)).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let scheduled = get_auction_with(&app, &auction_id, None).await;
    let tag = header(&scheduled, "etag");
    assert_eq!(
        scheduled.json::<Value>().await.unwrap()["status"],
        "scheduled"
    );
    let unchanged = get_auction_with(&app, &auction_id, Some(&tag)).await;
    assert_eq!(unchanged.status(), StatusCode::NOT_MODIFIED);

    // Once it has started, the old tag no longer matches.
    let opened = eventually(
        Duration::from_secs(10),
        "the view to change at the start",
        || async {
            let response = get_auction_with(&app, &auction_id, Some(&tag)).await;
            (response.status() == StatusCode::OK).then_some(response)
        },
    )
    .await;
    assert!(
        Utc::now() >= time_of(&auction["starts_at"]),
        "changed only at the start"
    );
    assert_ne!(header(&opened, "etag"), tag);
    assert_eq!(opened.json::<Value>().await.unwrap()["status"], "open");
}

/// Walks the history with `limit` until `next_cursor` is null; returns the
/// items in order and the number of pages.
async fn walk_history(
    app: &TestApp,
    auction_id: &str,
    limit: Option<usize>,
) -> (Vec<Value>, usize) {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    for page in 1.. {
        assert!(page <= 100, "pagination never ended");
        let mut query = Vec::new();
        if let Some(limit) = limit {
            query.push(("limit", limit.to_string()));
        }
        if let Some(cursor) = &cursor {
            query.push(("cursor", cursor.clone()));
        }
        let response = app
            .http
            .get(app.url(&format!("/api/auctions/{auction_id}/bids")))
            .bearer_auth(app.token("viewer", &[]))
            .query(&query)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        let page_items = body["items"].as_array().expect("items").clone();
        if let Some(limit) = limit {
            assert!(
                page_items.len() <= limit,
                "page {page} has at most {limit} items"
            );
        }
        items.extend(page_items);
        match &body["next_cursor"] {
            Value::Null => return (items, page),
            Value::String(next) => cursor = Some(next.clone()),
            other => panic!("next_cursor is a string or null, not {other}"),
        }
    }
    unreachable!()
}

#[tokio::test]
async fn bid_history_is_newest_first_paginated_and_masked() {
    let app = TestApp::spawn().await;
    let auction = app
        .create_auction(
            "seller-1",
            json!({"increments": [{"from": 0, "step": 10}, {"from": 2_000, "step": 100}]}),
        )
        .await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();

    // (bidder, secret maximum, outcome, price after).
    let script = [
        ("alice", 9_000, "leading", 1_000),
        ("bob", 1_200, "outbid", 1_210),
        ("carol", 1_500, "outbid", 1_510),
        ("bob", 2_500, "outbid", 2_600),
        ("dave", 3_000, "outbid", 3_100),
        ("alice", 5_000, "rejected", 3_100),
        ("frank", 10_000, "leading", 9_100),
    ];
    let mut placed = Vec::new();
    for (bidder, amount, status, price) in script {
        let bid = app.bid_resolved(bidder, &auction_id, amount).await;
        assert_eq!(bid["status"], status, "{bidder} {amount}: {bid}");
        assert_eq!(bid["auction_price"], price, "{bidder} {amount}: {bid}");
        placed.push((
            bid["id"].as_str().unwrap().to_owned(),
            bidder,
            amount,
            price,
        ));
    }
    let newest_first: Vec<_> = placed.iter().rev().cloned().collect();
    let final_status = [
        "outbid", "outbid", "outbid", "outbid", "outbid", "rejected", "leading",
    ];

    for limit in [Some(2), Some(3), Some(7), Some(200), None] {
        let (items, pages) = walk_history(&app, &auction_id, limit).await;
        let ids: Vec<&str> = items.iter().map(|i| i["id"].as_str().unwrap()).collect();
        assert_eq!(
            ids.iter().collect::<HashSet<_>>().len(),
            ids.len(),
            "no duplicates (limit {limit:?})"
        );
        assert_eq!(
            ids,
            newest_first
                .iter()
                .map(|(id, ..)| id.as_str())
                .collect::<Vec<_>>(),
            "every bid once, newest first (limit {limit:?})"
        );
        if limit == Some(2) {
            assert_eq!(pages, 4);
        }
        let times: Vec<_> = items.iter().map(|i| time_of(&i["received_at"])).collect();
        assert!(
            times.windows(2).all(|w| w[0] >= w[1]),
            "received_at never increases"
        );
        for (item, (_, bidder, amount, price)) in items.iter().zip(&newest_first) {
            let keys: HashSet<&str> = item
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            assert_eq!(
                keys,
                HashSet::from(["id", "amount_shown", "bidder", "received_at", "status"]),
                "{item}"
            );
            let mask = gavel::domain::mask_user(bidder);
            assert_eq!(item["bidder"], mask.as_str(), "{item}");
            assert_eq!(
                item["amount_shown"], *price,
                "the price the bid produced: {item}"
            );
            if amount > price {
                assert_ne!(
                    item["amount_shown"], *amount,
                    "a secret maximum is shown: {item}"
                );
            }
        }
        let statuses: Vec<&str> = items
            .iter()
            .rev()
            .map(|i| i["status"].as_str().unwrap())
            .collect();
        assert_eq!(statuses, final_status);
    }
    // No item ever shows a maximum above the price it produced.
    let (items, _) = walk_history(&app, &auction_id, None).await;
    let shown: HashSet<i64> = items
        .iter()
        .map(|i| i["amount_shown"].as_i64().unwrap())
        .collect();
    for secret in [9_000, 2_500, 3_000, 5_000, 10_000] {
        assert!(
            !shown.contains(&secret),
            "secret maximum {secret} shown: {shown:?}"
        );
    }

    // Bad paging parameters.
    for query in [
        "limit=0",
        "limit=201",
        "limit=-1",
        "limit=1.5",
        "limit=",
        "cursor=garbage",
        "cursor=c2VxOng",
        "cursor=",
    ] {
        let response = app
            .get_as(
                &format!("/api/auctions/{auction_id}/bids?{query}"),
                "viewer",
                &[],
            )
            .await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        assert_eq!(
            response.json::<Value>().await.unwrap()["code"],
            "invalid_request",
            "{query}"
        );
    }
    for query in ["limit=1", "limit=200"] {
        let response = app
            .get_as(
                &format!("/api/auctions/{auction_id}/bids?{query}"),
                "viewer",
                &[],
            )
            .await;
        assert_eq!(response.status(), StatusCode::OK, "{query}");
    }
}

#[tokio::test]
async fn creating_an_auction_returns_201_with_location_and_the_view() {
    let app = TestApp::spawn().await;
    let now = Utc::now().trunc_subsecs(0);
    let ends_at = now + chrono::Duration::hours(2);
    let body = json!({
        "title": "Sword of Dawn (legendary)",
        "currency": "GLD",
        "starting_price": 1_000,
        "reserve_price": 50_000,
        "ends_at": ends_at.to_rfc3339(),
    });
    let response = app
        .http
        .post(app.url("/api/auctions"))
        .bearer_auth(app.token("seller-1", &[Role::Seller]))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let location = header(&response, "location");
    let created: Value = response.json().await.unwrap();
    let auction_id = created["id"].as_str().unwrap();
    assert_eq!(location, format!("/api/auctions/{auction_id}"));
    let version = auction_id.parse::<uuid::Uuid>().unwrap().get_version_num();
    assert!(version == 7 || version == 4, "a UUID id");
    assert_eq!(created["title"], "Sword of Dawn (legendary)");
    assert_eq!(
        created["seller_id"], "seller-1",
        "the seller is the token's sub"
    );
    assert_eq!(created["currency"], "GLD");
    assert_eq!(created["starting_price"], 1_000);
    assert_eq!(created["reserve_price_met"], false);
    assert!(created.get("reserve_price").is_none());
    assert_eq!(created["status"], "open");
    assert!(created["current_price"].is_null());
    assert!(created["leading_bidder"].is_null());
    assert!(created["winner_id"].is_null());
    assert_eq!(created["bid_count"], 0);
    assert_eq!(created["next_min_bid"], 1_000);
    assert_eq!(created["soft_close_s"], 0);
    assert_eq!(time_of(&created["ends_at"]), ends_at);
    let starts_at = time_of(&created["starts_at"]);
    assert!(
        (starts_at - Utc::now()).num_seconds().abs() < 60,
        "starts_at defaults to now"
    );
    let default_table: Vec<Value> = [
        (0, 5),
        (100, 25),
        (500, 50),
        (2_500, 100),
        (10_000, 250),
        (25_000, 500),
        (50_000, 1_000),
        (100_000, 2_500),
        (250_000, 5_000),
        (500_000, 10_000),
    ]
    .iter()
    .map(|(from, step)| json!({"from": from, "step": step}))
    .collect();
    assert_eq!(
        created["increments"],
        Value::Array(default_table),
        "the default increment table"
    );

    // The Location serves the same view.
    let fetched = app.get_as(&location, "seller-1", &[Role::Seller]).await;
    assert_eq!(fetched.status(), StatusCode::OK);
    assert_eq!(fetched.json::<Value>().await.unwrap(), created);

    // Soft close without max_end_at: capped an hour after ends_at. Admins may create.
    let soft = app
        .http
        .post(app.url("/api/auctions"))
        .bearer_auth(app.token("root", &[Role::Admin]))
        .json(&json!({
            "title": "Helm", "currency": "EUR", "starting_price": 1,
            "ends_at": ends_at.to_rfc3339(), "soft_close_s": 30,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(soft.status(), StatusCode::CREATED);
    let soft: Value = soft.json().await.unwrap();
    assert_eq!(soft["seller_id"], "root");
    assert_eq!(soft["soft_close_s"], 30);
    assert!(soft["reserve_price_met"].is_null(), "no reserve");
    assert_eq!(
        time_of(&soft["max_end_at"]),
        ends_at + chrono::Duration::hours(1)
    );
}

#[tokio::test]
async fn reads_need_a_token() {
    let app = TestApp::spawn().await;
    let auction = app.create_auction("seller-1", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let bid = app.bid_resolved("alice", &auction_id, 1_500).await;
    for path in [
        format!("/api/auctions/{auction_id}"),
        format!("/api/auctions/{auction_id}/bids"),
        format!("/api/bids/{}", bid["id"].as_str().unwrap()),
    ] {
        let response = app.http.get(app.url(&path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "unauthorized");
        assert!(
            problem.get("id").is_none() && problem.get("items").is_none(),
            "no data without a token"
        );
        let authorised = app.get_as(&path, "alice", &[]).await;
        assert_eq!(authorised.status(), StatusCode::OK, "{path} with a token");
    }
}

#[tokio::test]
async fn polls_are_answered_from_memory_until_the_auction_changes() {
    // The resolver runs in this test; the process under test only serves the
    // API, so it hears resolutions the way one of many API processes does
    // (NOTIFY), and its metrics count only these reads.
    let resolver = TestApp::spawn_with(|c| c.resolver.poll = Duration::from_secs(60)).await;
    let database_url = resolver.database_url.clone();
    let process = ServeProcess::start_with(
        &database_url,
        &[("GAVEL_RESOLVER", "off"), ("GAVEL_READ_CACHE_MS", "10000")],
    )
    .await;
    let app = process.client(&database_url);
    let auction = app.create_auction("seller-1", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let before = Scrape::take(&app).await;
    let first = get_auction_with(&app, &auction_id, None).await;
    let tag = header(&first, "etag");
    for _ in 0..4 {
        let polled = get_auction_with(&app, &auction_id, Some(&tag)).await;
        assert_eq!(polled.status(), StatusCode::NOT_MODIFIED);
    }
    let after = Scrape::take(&app).await;
    let delta =
        |name: &str, labels: &[(&str, &str)]| after.sum(name, labels) - before.sum(name, labels);
    assert_eq!(
        delta("gavel_auction_cache_total", &[("result", "miss")]),
        1.0
    );
    assert_eq!(
        delta("gavel_auction_cache_total", &[("result", "hit")]),
        4.0
    );
    assert_eq!(
        delta("gavel_db_reads_total", &[]),
        1.0,
        "five polls, one database read"
    );

    // A resolution in the other process reaches this one over NOTIFY and
    // evicts the view: the next poll sees it at once.
    let bid = app.bid_resolved("alice", &auction_id, 1_200).await;
    assert_eq!(bid["status"], "leading");
    let changed = get_auction_with(&app, &auction_id, Some(&tag)).await;
    assert_eq!(changed.status(), StatusCode::OK, "the old tag is stale");
    let tag = header(&changed, "etag");
    let view: Value = changed.json().await.unwrap();
    assert_eq!(view["bid_count"], 1);

    // A change nobody announced waits for the cache, but never longer than
    // the replica lag bound (2 s), however long the cache's own time is.
    let db = app.db().await;
    let id: uuid::Uuid = auction_id.parse().unwrap();
    db.execute(
        "UPDATE auctions SET title = 'Sword of Dusk', version = version + 1 WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();
    let changed_at = std::time::Instant::now();
    let polled = get_auction_with(&app, &auction_id, Some(&tag)).await;
    assert_eq!(
        polled.status(),
        StatusCode::NOT_MODIFIED,
        "served from memory"
    );
    let renamed = eventually(Duration::from_secs(10), "the renamed view", || async {
        let response = get_auction_with(&app, &auction_id, Some(&tag)).await;
        (response.status() == StatusCode::OK).then_some(response)
    })
    .await;
    let waited = changed_at.elapsed();
    assert!(
        waited <= Duration::from_millis(2_500),
        "seen within the lag bound, not the 10 s cache time ({waited:?})"
    );
    assert_eq!(
        renamed.json::<Value>().await.unwrap()["title"],
        "Sword of Dusk"
    );
    drop(process);
    resolver.stop().await;
}

#[tokio::test]
async fn with_the_cache_off_every_poll_reads_the_database() {
    let database_url = fresh_database().await;
    let process = ServeProcess::start_with(&database_url, &[("GAVEL_READ_CACHE_MS", "0")]).await;
    let app = process.client(&database_url);
    let auction = app.create_auction("seller-1", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let before = Scrape::take(&app).await;
    for _ in 0..3 {
        assert_eq!(
            get_auction_with(&app, &auction_id, None).await.status(),
            StatusCode::OK
        );
    }
    let after = Scrape::take(&app).await;
    let reads = after.sum("gavel_db_reads_total", &[]) - before.sum("gavel_db_reads_total", &[]);
    assert_eq!(reads, 3.0);
    assert_eq!(after.sum("gavel_auction_cache_total", &[]), 0.0);
}
