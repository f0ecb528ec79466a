//! The close rules end to end: late bids, soft close, settlement (winner,
//! won/lost, masking) and an unmet reserve. Auctions here end a second or two
//! after creation; settlement is awaited by polling, not by fixed sleeps.

use std::time::Duration;

use chrono::{DateTime, SubsecRound as _, Utc};
use gavel::auth::Role;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;

/// A time `ms` milliseconds from now, at millisecond precision (what the
/// database stores exactly).
fn in_ms(ms: i64) -> DateTime<Utc> {
    (Utc::now() + chrono::Duration::milliseconds(ms)).trunc_subsecs(3)
}

/// Sleeps until the local clock (the same machine as the database's) is past `at`.
async fn sleep_past(at: DateTime<Utc>) {
    let left = (at - Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(left).await;
}

async fn assert_refused_closed(app: &TestApp, bidder: &str, auction_id: &str, amount: i64) {
    let response = app.bid(bidder, auction_id, amount, &new_key()).await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "auction_closed", "{problem}");
}

#[tokio::test]
async fn a_late_bid_is_rejected_and_refused_outright_once_settled() {
    // A settle grace long enough that a bid just after the end is reliably
    // accepted into the log before the close is settled.
    let app = TestApp::spawn_with(|c| c.resolver.settle_grace = Duration::from_millis(1_500)).await;
    let ends_at = in_ms(1_500);
    let auction = app
        .create_auction("seller-1", json!({"ends_at": ends_at.to_rfc3339()}))
        .await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let early = app.bid_resolved("alice", &auction_id, 1_500).await;
    assert_eq!(early["status"], "leading");

    // Received after ends_at, before settlement: in the log, then rejected.
    sleep_past(ends_at + chrono::Duration::milliseconds(200)).await;
    let late_key = new_key();
    let late = app
        .http
        .post(app.url(&format!("/api/auctions/{auction_id}/bids")))
        .bearer_auth(app.token("bob", &[]))
        .header("Idempotency-Key", &late_key)
        .header("Prefer", "wait=5")
        .json(&json!({"amount": 5_000}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        late.status(),
        StatusCode::CREATED,
        "a bid before settlement is accepted into the log"
    );
    let late: Value = late.json().await.unwrap();
    assert_eq!(late["status"], "rejected", "{late}");
    assert_eq!(late["reason"], "auction_closed");
    assert!(time_of(&late["received_at"]) > ends_at);
    let view = app.auction(&auction_id).await;
    assert_eq!(
        view["status"], "open",
        "not closed before the close is settled"
    );
    assert_eq!(view["current_price"], 1_000, "the late bid moved nothing");

    let view = app.wait_settled(&auction_id, Duration::from_secs(10)).await;
    assert!(
        Utc::now() > ends_at + chrono::Duration::milliseconds(1_500),
        "settled only after the grace"
    );
    assert_eq!(view["current_price"], 1_000);
    assert_eq!(view["bid_count"], 1);
    assert_eq!(
        app.auction_as(&auction_id, "alice", &[]).await["winner_id"],
        "alice"
    );

    // Settled: refused synchronously, from anyone, whatever the amount.
    assert_refused_closed(&app, "carol", &auction_id, 9_000).await;
    assert_refused_closed(&app, "alice", &auction_id, 2_000).await;
    // A retry of the request accepted before settlement still replays.
    let retry = place_bid(
        &app.http,
        app.addr,
        &app.token("bob", &[]),
        &auction_id,
        5_000,
        &late_key,
    )
    .await;
    assert_eq!(retry.status(), StatusCode::OK);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.json::<Value>().await.unwrap()["id"], late["id"]);

    assert_eq!(
        app.bid_as(early["id"].as_str().unwrap(), "alice", &[])
            .await["status"],
        "won"
    );
    let late_now = app.bid_as(late["id"].as_str().unwrap(), "bob", &[]).await;
    assert_eq!(
        (late_now["status"].as_str(), late_now["reason"].as_str()),
        (Some("rejected"), Some("auction_closed"))
    );
    let db = app.db().await;
    let bids = assert_consistent(&db, id_of(&auction)).await;
    assert_eq!(bids.len(), 2, "refused requests never reached the log");
}

#[tokio::test]
async fn soft_close_extends_the_end_up_to_max_end_at() {
    let app = TestApp::spawn_with(|c| c.resolver.settle_grace = Duration::from_millis(1_000)).await;
    let ends_at = in_ms(1_500);
    let max_end_at = ends_at + chrono::Duration::seconds(3);
    let auction = app
        .create_auction(
            "seller-1",
            json!({
                "ends_at": ends_at.to_rfc3339(),
                "soft_close_s": 2,
                "max_end_at": max_end_at.to_rfc3339(),
            }),
        )
        .await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    assert_eq!(auction["soft_close_s"], 2);
    assert_eq!(time_of(&auction["ends_at"]), ends_at);
    assert_eq!(time_of(&auction["max_end_at"]), max_end_at);

    // Alternate bidders every ~half second, each outbidding the other,
    // until a bid arrives after the (extended) end.
    let window = chrono::Duration::seconds(2);
    let mut end = ends_at;
    let mut extensions = 0;
    let mut leader = None;
    for round in 0.. {
        assert!(round < 30, "the auction never stopped extending");
        let bidder = if round % 2 == 0 { "alice" } else { "bob" };
        let (status, bid) = app
            .bid_waiting(bidder, &auction_id, 2_000 + round * 1_000)
            .await;
        if status == StatusCode::UNPROCESSABLE_ENTITY {
            // After the final end, refused before it was appended (the
            // auction's view already showed it closed): nothing moved.
            assert_eq!(bid["code"], "auction_closed", "{bid}");
            assert_eq!(time_of(&app.auction(&auction_id).await["ends_at"]), end);
            break;
        }
        assert_eq!(status, StatusCode::CREATED, "{bid}");
        let received = time_of(&bid["received_at"]);
        let view_end = time_of(&app.auction(&auction_id).await["ends_at"]);
        assert!(
            view_end <= max_end_at,
            "ends_at {view_end} is past max_end_at {max_end_at}"
        );
        if received > end {
            // After the final end: rejected, and nothing moves.
            assert_eq!(bid["status"], "rejected", "{bid}");
            assert_eq!(bid["reason"], "auction_closed");
            assert_eq!(view_end, end);
            break;
        }
        assert_eq!(bid["status"], "leading", "{bid}");
        assert!(
            received > end - window,
            "every bid of this test lands in the window"
        );
        let expected = end.max((received + window).min(max_end_at));
        assert_eq!(
            view_end, expected,
            "ends_at after a bid received at {received}"
        );
        if view_end > end {
            extensions += 1;
        }
        end = view_end;
        leader = Some((bidder, bid["id"].as_str().unwrap().to_owned()));
        tokio::time::sleep(Duration::from_millis(450)).await;
    }
    assert!(
        extensions >= 3,
        "several bids extended the end ({extensions})"
    );
    assert_eq!(end, max_end_at, "the extensions reached the cap");

    let view = app.wait_settled(&auction_id, Duration::from_secs(10)).await;
    assert!(Utc::now() > max_end_at, "settled after max_end_at");
    assert_eq!(time_of(&view["ends_at"]), max_end_at);
    let (winner, winning_bid) = leader.expect("someone led");
    assert_eq!(
        app.auction_as(&auction_id, "seller-1", &[]).await["winner_id"],
        winner
    );
    assert_eq!(app.bid_as(&winning_bid, winner, &[]).await["status"], "won");
    assert_refused_closed(&app, "carol", &auction_id, 1_000_000).await;
    let db = app.db().await;
    assert_consistent(&db, id_of(&auction)).await;
}

#[tokio::test]
async fn settlement_names_the_leader_as_winner_and_finalises_every_bid() {
    let app = TestApp::spawn().await;
    let ends_at = in_ms(2_000);
    let auction = app
        .create_auction("seller-1", json!({"ends_at": ends_at.to_rfc3339()}))
        .await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();

    // Default increments: 50 from 500, 100 from 2500.
    let script = [
        ("alice", 1_500, "leading", 1_000),
        ("bob", 2_000, "leading", 1_550),
        ("carol", 1_800, "outbid", 1_850),
        ("dave", 3_000, "leading", 2_050),
        ("bob", 4_000, "leading", 3_100),
    ];
    let mut placed = Vec::new();
    for (bidder, amount, status, price) in script {
        let bid = app.bid_resolved(bidder, &auction_id, amount).await;
        assert_eq!(bid["status"], status, "{bidder} {amount}: {bid}");
        assert_eq!(bid["auction_price"], price, "{bidder} {amount}: {bid}");
        placed.push((bidder, bid["id"].as_str().unwrap().to_owned()));
    }
    assert!(Utc::now() < ends_at, "every bid was placed before the end");
    let before = app.auction(&auction_id).await;
    assert_eq!(before["status"], "open");
    assert!(before["winner_id"].is_null());

    let view = app.wait_settled(&auction_id, Duration::from_secs(10)).await;
    assert!(Utc::now() > ends_at);
    assert_eq!(view["current_price"], 3_100);
    assert_eq!(view["bid_count"], 5);
    assert!(view["reserve_price_met"].is_null(), "no reserve");
    assert_eq!(view["winner_id"], "b***", "masked for other users");

    // Unmasked for the winner, the seller and admins; masked for the rest.
    for (sub, roles, expected) in [
        ("bob", &[][..], "bob"),
        ("seller-1", &[Role::Seller][..], "bob"),
        ("root", &[Role::Admin][..], "bob"),
        ("alice", &[][..], "b***"),
        ("dave", &[Role::Bidder][..], "b***"),
        ("other-seller", &[Role::Seller][..], "b***"),
    ] {
        let seen = app.auction_as(&auction_id, sub, roles).await;
        assert_eq!(seen["winner_id"], expected, "winner_id as {sub}");
        assert_eq!(seen["status"], "closed");
    }

    // The winning bid is won; every other accepted bid (bob's first too) lost.
    let winning = &placed[4].1;
    for (bidder, bid_id) in &placed {
        let own = app.bid_as(bid_id, bidder, &[]).await;
        let expected = if bid_id == winning { "won" } else { "lost" };
        assert_eq!(own["status"], expected, "bid {bid_id} of {bidder}");
        let admin = app.bid_as(bid_id, "root", &[Role::Admin]).await;
        assert_eq!(admin["status"], expected);
    }
    let history: Value = app
        .get_as(&format!("/api/auctions/{auction_id}/bids"), "carol", &[])
        .await
        .json()
        .await
        .unwrap();
    let statuses: Vec<&str> = history["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["won", "lost", "lost", "lost", "lost"]);

    let db = app.db().await;
    let bids = assert_consistent(&db, id_of(&auction)).await;
    assert_eq!(bids.len(), 5);
}

#[tokio::test]
async fn an_unmet_reserve_settles_without_a_winner() {
    let app = TestApp::spawn().await;
    let ends_at = in_ms(1_500);
    let auction = app
        .create_auction(
            "seller-1",
            json!({"ends_at": ends_at.to_rfc3339(), "reserve_price": 10_000}),
        )
        .await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    assert_eq!(auction["reserve_price_met"], false);

    let alice = app.bid_resolved("alice", &auction_id, 2_000).await;
    let bob = app.bid_resolved("bob", &auction_id, 5_000).await;
    assert_eq!(bob["status"], "leading");
    assert_eq!(
        bob["auction_price"], 2_050,
        "below the reserve, the price follows the increments"
    );
    assert_eq!(app.auction(&auction_id).await["reserve_price_met"], false);

    let view = app.wait_settled(&auction_id, Duration::from_secs(10)).await;
    assert_eq!(view["reserve_price_met"], false);
    assert!(view["winner_id"].is_null(), "{view}");
    for (sub, roles) in [
        ("seller-1", &[Role::Seller][..]),
        ("root", &[Role::Admin][..]),
        ("bob", &[][..]),
    ] {
        let seen = app.auction_as(&auction_id, sub, roles).await;
        assert!(seen["winner_id"].is_null(), "no winner, as {sub}: {seen}");
        assert_eq!(seen["reserve_price_met"], false);
    }
    for (bidder, bid) in [("alice", &alice), ("bob", &bob)] {
        assert_eq!(
            app.bid_as(bid["id"].as_str().unwrap(), bidder, &[]).await["status"],
            "lost",
            "{bidder}'s bid"
        );
    }
    let db = app.db().await;
    let bids = assert_consistent(&db, id_of(&auction)).await;
    assert!(bids.iter().all(|b| b.status == "lost"), "{bids:?}");
    let stored: Option<String> = db
        .query_one(
            "SELECT winner_id FROM auctions WHERE id = $1",
            &[&id_of(&auction)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, None);
}

#[tokio::test]
async fn a_bid_committing_after_settlement_is_rejected_and_keeps_the_winner() {
    let app = TestApp::spawn().await;
    let ends_at = Utc::now() + chrono::Duration::milliseconds(1500);
    let auction = app
        .create_auction("seller-1", json!({"ends_at": ends_at.to_rfc3339()}))
        .await;
    let auction_id = auction["id"].as_str().unwrap();
    let winning = app.bid("alice", auction_id, 2_000, &new_key()).await;
    assert_eq!(winning.status(), StatusCode::ACCEPTED);
    let settled = app.wait_settled(auction_id, Duration::from_secs(15)).await;
    assert_eq!(settled["winner_id"], "a***e");

    // A bid whose insert commits only now (it passed a stale check, or came
    // through another process): the resolver must reject it and leave the
    // settlement alone.
    let db = app.db().await;
    let auction_uuid = id_of(&auction);
    let straggler = uuid::Uuid::now_v7();
    db.execute(
        "INSERT INTO bid_log (auction_id, id, bidder_id, amount, idempotency_key, xid) \
         VALUES ($1, $2, 'bob', 9000, 'late-key', pg_current_xact_id()::text::int8)",
        &[&auction_uuid, &straggler],
    )
    .await
    .unwrap();
    wait_resolved(&db, auction_uuid, Duration::from_secs(10)).await;
    let row = db
        .query_one(
            "SELECT status, reason FROM bids WHERE id = $1",
            &[&straggler],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "rejected");
    assert_eq!(
        row.get::<_, Option<String>>(1).as_deref(),
        Some("auction_closed")
    );
    let after = app.auction_as(auction_id, "seller-1", &[]).await;
    assert_eq!(after["status"], "closed");
    assert_eq!(
        after["winner_id"], "alice",
        "the winner survives a late rejection"
    );
    assert_consistent(&db, auction_uuid).await;
}
