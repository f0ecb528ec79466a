//! The marketplace's admin feed, `GET /api/events`: one `auction.settled`
//! per settled auction with its result, paging in log order, and no event
//! skipped when an earlier transaction commits after a later one.

use std::time::Duration;

use chrono::{SubsecRound as _, Utc};
use gavel::auth::Role;
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::*;

/// `GET /api/events` as an admin: the status and the body.
pub async fn feed(app: &TestApp, query: &str, wait: Option<u64>) -> (StatusCode, Value) {
    let mut request = app
        .http
        .get(app.url(&format!("/api/events{query}")))
        .bearer_auth(app.token("ops", &[Role::Admin]));
    if let Some(wait) = wait {
        request = request.header("Prefer", format!("wait={wait}"));
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

/// Every event of the feed from the start, page by page (`limit` each),
/// until a page comes back empty; returns them and the last cursor.
pub async fn read_all(app: &TestApp, limit: usize) -> (Vec<Value>, String) {
    let (mut events, mut query) = (Vec::new(), format!("?limit={limit}"));
    loop {
        let (status, page) = feed(app, &query, None).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let cursor = page["next_cursor"]
            .as_str()
            .expect("a string cursor")
            .to_owned();
        let items = page["items"].as_array().unwrap().clone();
        assert!(items.len() <= limit);
        if items.is_empty() {
            return (events, cursor);
        }
        events.extend(items);
        query = format!("?limit={limit}&after={cursor}");
    }
}

/// An auction of `app` ending in `seconds`, with `overrides`.
pub async fn ending_in(app: &TestApp, seconds: i64, overrides: Value) -> String {
    let ends_at = (Utc::now() + chrono::Duration::seconds(seconds)).trunc_subsecs(3);
    let mut body = json!({"ends_at": ends_at.to_rfc3339()});
    for (k, v) in overrides.as_object().unwrap() {
        body[k] = v.clone();
    }
    let auction = app.create_auction("seller-1", body).await;
    auction["id"].as_str().unwrap().to_owned()
}

/// What an `auction.settled` event must say of a settled auction, from
/// the stored state.
pub async fn expected_settlement(app: &TestApp, auction_id: &str) -> Value {
    let db = app.db().await;
    let id: Uuid = auction_id.parse().unwrap();
    let row = db
        .query_one(
            "SELECT winner_id, current_price, currency, reserve_price, leader_max, bid_count, \
               (SELECT id FROM bids WHERE auction_id = $1 AND status = 'won') \
             FROM auctions WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let winner: Option<String> = row.get(0);
    let reserve: Option<i64> = row.get(3);
    let leader_max: Option<i64> = row.get(4);
    let winning_bid: Option<Uuid> = row.get(6);
    json!({
        "auction_id": auction_id,
        "status": "closed",
        "winner_id": winner,
        "winner_bid_id": winning_bid,
        "price": winner.as_ref().and(row.get::<_, Option<i64>>(1)),
        "currency": row.get::<_, String>(2),
        "reserve_met": reserve.map(|r| leader_max.is_some_and(|m| m >= r)),
        "bid_count": row.get::<_, i64>(5),
    })
}

/// The event's data without `settled_at` (checked to be a recent time).
pub fn settlement_of(event: &Value) -> Value {
    assert_eq!(event["type"], "auction.settled", "{event}");
    let mut data = event["data"].clone();
    let at = time_of(&data.as_object_mut().unwrap().remove("settled_at").unwrap());
    assert!((Utc::now() - at).num_seconds().abs() < 60, "{event}");
    time_of(&event["timestamp"]);
    assert!(event["id"].as_str().unwrap().starts_with("evt_"));
    data
}

#[tokio::test]
async fn every_settled_auction_gives_one_settled_event_with_its_result() {
    let app = TestApp::spawn_with(|c| c.resolver.settle_grace = Duration::from_millis(500)).await;
    let won = ending_in(&app, 3, json!({})).await;
    let unsold = ending_in(&app, 3, json!({})).await;
    let reserve_unmet = ending_in(&app, 3, json!({"reserve_price": 9_000})).await;
    let reserve_met = ending_in(&app, 3, json!({"reserve_price": 1_500})).await;
    let still_open = ending_in(&app, 3_600, json!({})).await;
    app.bid_resolved("alice", &won, 1_500).await;
    app.bid_resolved("bob", &won, 2_500).await;
    app.bid_resolved("alice", &reserve_unmet, 3_000).await;
    app.bid_resolved("carol", &reserve_met, 1_200).await;
    app.bid_resolved("dave", &reserve_met, 4_000).await;
    app.bid_resolved("erin", &still_open, 4_000).await;
    for id in [&won, &unsold, &reserve_unmet, &reserve_met] {
        app.wait_settled(id, Duration::from_secs(15)).await;
    }
    // Pages of one: the cursor carries a reader through all of them.
    let (events, _) = read_all(&app, 1).await;
    assert_eq!(events.len(), 4, "{events:#?}");
    for id in [&won, &unsold, &reserve_unmet, &reserve_met] {
        let mine: Vec<&Value> = events
            .iter()
            .filter(|e| e["data"]["auction_id"] == **id)
            .collect();
        assert_eq!(mine.len(), 1, "one event for {id}");
        assert_eq!(settlement_of(mine[0]), expected_settlement(&app, id).await);
    }
    let data = |id: &str| {
        events
            .iter()
            .find(|e| e["data"]["auction_id"] == id)
            .unwrap()["data"]
            .clone()
    };
    assert_eq!(data(&won)["winner_id"], "bob");
    assert_eq!(data(&won)["reserve_met"], Value::Null);
    assert!(data(&won)["price"].as_i64().unwrap() > 1_500);
    assert_eq!(
        (
            data(&unsold)["winner_id"].clone(),
            data(&unsold)["price"].clone()
        ),
        (Value::Null, Value::Null)
    );
    assert_eq!(data(&reserve_unmet)["reserve_met"], false);
    assert_eq!(data(&reserve_unmet)["winner_bid_id"], Value::Null);
    assert_eq!(data(&reserve_met)["reserve_met"], true);
    assert_eq!(data(&reserve_met)["winner_id"], "dave");
    // Ids are unique, and the same on every read.
    let ids: std::collections::HashSet<&str> =
        events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 4);
    let (again, _) = read_all(&app, 1_000).await;
    assert_eq!(
        again, events,
        "a second reader sees the same events in the same order"
    );
}

#[tokio::test]
async fn the_feed_is_for_admins_and_checks_its_parameters() {
    let app = TestApp::spawn().await;
    let response = app.get_as("/api/events", "alice", &[Role::Seller]).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(response.json::<Value>().await.unwrap()["code"], "forbidden");
    let anonymous = app.http.get(app.url("/api/events")).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let unknown = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        format!("m1.5.{}.1", Uuid::now_v7()),
    );
    for query in [
        "?limit=0".to_owned(),
        "?limit=1001".to_owned(),
        "?limit=many".to_owned(),
        "?after=yesterday".to_owned(),
        format!("?after={unknown}"),
    ] {
        let (status, problem) = feed(&app, &query, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(problem["code"], "invalid_request", "{query}");
    }
    // An empty feed still hands out a cursor, which is accepted back.
    let (status, page) = feed(&app, "", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["items"], json!([]));
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    let (status, page) = feed(&app, &format!("?after={cursor}&limit=1000"), None).await;
    assert_eq!((status, page["items"].clone()), (StatusCode::OK, json!([])));
    assert!(page["next_cursor"].is_string());
}

#[tokio::test]
async fn a_waiting_page_returns_when_an_auction_settles() {
    let app = TestApp::spawn_with(|c| c.resolver.settle_grace = Duration::from_millis(500)).await;
    let (_, cursor) = read_all(&app, 100).await;
    let auction = ending_in(&app, 2, json!({})).await;
    let started = std::time::Instant::now();
    let (status, page) = feed(&app, &format!("?after={cursor}"), Some(30)).await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::OK);
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{page}");
    assert_eq!(items[0]["data"]["auction_id"], auction.as_str());
    assert!(
        took < Duration::from_secs(10),
        "answered {took:?} after asking"
    );
    // Nothing more: a short wait comes back empty after about its length.
    let next = page["next_cursor"].as_str().unwrap();
    let started = std::time::Instant::now();
    let (_, page) = feed(&app, &format!("?after={next}"), Some(1)).await;
    assert_eq!(page["items"], json!([]));
    assert!(started.elapsed() >= Duration::from_millis(900));
}

/// Inserts an `auction.settled` row for a made-up auction in `db`'s open
/// transaction (or outside one), as the resolver's settlement does.
async fn insert_event(db: &impl tokio_postgres::GenericClient, auction_id: Uuid) {
    let data = json!({"auction_id": auction_id, "status": "closed", "winner_id": null,
        "winner_bid_id": null, "price": null, "currency": "GLD", "reserve_met": null,
        "bid_count": 0, "settled_at": Utc::now().to_rfc3339()});
    db.execute(
        "INSERT INTO events (auction_id, n, kind, bid_ids, bidders, statuses, data) \
         VALUES ($1, 1, 'auction.settled', '{}', '{}', '{}', $2)",
        &[&auction_id, &data],
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_reader_paging_the_feed_gets_an_event_that_commits_after_a_later_one() {
    let app = TestApp::spawn().await;
    let (_, start) = read_all(&app, 100).await;
    // The earlier transaction takes its id first and stays open...
    let mut held = app.db().await;
    let earlier_tx = held.transaction().await.unwrap();
    let (earlier, later) = (Uuid::now_v7(), Uuid::now_v7());
    insert_event(&earlier_tx, earlier).await;
    // ... while a later one commits its event.
    insert_event(&app.db().await, later).await;
    // A reader pages on meanwhile, and one waits.
    let (status, page) = feed(&app, &format!("?after={start}"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        page["items"],
        json!([]),
        "nothing is served past an open transaction"
    );
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    let waiting = {
        let query = format!("?after={cursor}");
        let app_url = app.url(&format!("/api/events{query}"));
        let (http, token) = (app.http.clone(), app.token("ops", &[Role::Admin]));
        tokio::spawn(async move {
            let response = http
                .get(app_url)
                .bearer_auth(token)
                .header("Prefer", "wait=20")
                .send()
                .await
                .unwrap();
            response.json::<Value>().await.unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    earlier_tx.commit().await.unwrap();
    let page = waiting.await.unwrap();
    let mut seen: Vec<String> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["data"]["auction_id"].as_str().unwrap().to_owned())
        .collect();
    let mut after = page["next_cursor"].as_str().unwrap().to_owned();
    // Paging on from the cursor finds whatever the waiting page did not.
    while seen.len() < 2 {
        let (_, page) = feed(&app, &format!("?after={after}"), Some(2)).await;
        let items = page["items"].as_array().unwrap();
        assert!(!items.is_empty(), "{seen:?}: an event was skipped");
        seen.extend(
            items
                .iter()
                .map(|e| e["data"]["auction_id"].as_str().unwrap().to_owned()),
        );
        after = page["next_cursor"].as_str().unwrap().to_owned();
    }
    assert_eq!(
        seen,
        [earlier.to_string(), later.to_string()],
        "both, in log order"
    );
    let (_, page) = feed(&app, &format!("?after={after}"), None).await;
    assert_eq!(page["items"], json!([]), "and nothing twice");
}
