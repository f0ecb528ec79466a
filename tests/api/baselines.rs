//! The load tests' stronger baselines, `GAVEL_BID_PATH=row_lock_fn` (the
//! row-lock transaction as one PL/pgSQL call) and `optimistic`
//! (compare-and-set from every request): for the same bids they give the
//! outcomes, idempotency and final auction the log path gives; under
//! concurrency every bid gets exactly one answer, the log replays to the
//! auction row and the event log agrees; an optimistic bid that keeps
//! losing its compare-and-set is shed with `Retry-After` and leaves nothing.

use std::time::Duration;

use chrono::Utc;
use gavel::bidding::BidPath;
use reqwest::{Response, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::*;

const BASELINES: [BidPath; 2] = [BidPath::RowLockFn, BidPath::Optimistic];

/// A server writing bids along `path`.
async fn app_on(path: BidPath) -> TestApp {
    TestApp::spawn_with(|config| config.bids.path = path).await
}

/// A bid as the bidder learns its outcome: (status, reason, price after),
/// the price only for a bid the rules accepted. A refusal before the bid
/// reached the log (the log path's synchronous checks) is the rejection
/// the rules would give.
type Outcome = (String, Option<String>, Option<i64>);

async fn outcome(response: Response) -> (Outcome, Value) {
    let code = response.status();
    let body: Value = response.json().await.unwrap();
    let refused = |reason: &str| ("rejected".to_owned(), Some(reason.to_owned()), None);
    let outcome = match (code, body["code"].as_str()) {
        (StatusCode::UNPROCESSABLE_ENTITY, Some("bid_too_low")) => refused("below_minimum"),
        (StatusCode::FORBIDDEN, Some("seller_cannot_bid")) => refused("seller_cannot_bid"),
        (StatusCode::CREATED, _) => {
            let status = body["status"].as_str().unwrap().to_owned();
            let price = (status != "rejected").then(|| body["auction_price"].as_i64().unwrap());
            (status, body["reason"].as_str().map(str::to_owned), price)
        }
        _ => panic!("unexpected answer {code}: {body}"),
    };
    (outcome, body)
}

/// `POST` a bid with `Prefer: wait=5`.
async fn bid_waiting(
    app: &TestApp,
    bidder: &str,
    auction_id: &str,
    amount: i64,
    key: &str,
) -> Response {
    app.http
        .post(app.url(&format!("/api/auctions/{auction_id}/bids")))
        .bearer_auth(app.token(bidder, &[]))
        .header("Idempotency-Key", key)
        .header("Prefer", "wait=5")
        .json(&json!({ "amount": amount }))
        .send()
        .await
        .unwrap()
}

/// What one run of the shared sequence showed: each bid's outcome, the
/// answers to a replay and to a reused key, the final auction as its
/// seller sees it, and how far its end lies past the last accepted bid.
#[derive(Debug, PartialEq)]
struct Run {
    outcomes: Vec<Outcome>,
    replay: (StatusCode, Option<String>, bool),
    reused: (StatusCode, Value),
    view: Vec<Value>,
    end_after_last_bid: chrono::Duration,
}

/// Starting price 1000, the default increments (50 from 500, 100 from
/// 2500), a reserve of 2000 and a ten-minute soft close.
async fn run_sequence(app: &TestApp) -> Run {
    let auction = app
        .create_auction(
            "seller-1",
            json!({
                "reserve_price": 2_000,
                "soft_close_s": 600,
                "ends_at": (Utc::now() + chrono::Duration::minutes(5)).to_rfc3339(),
            }),
        )
        .await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let sequence: [(&str, i64); 11] = [
        ("alice", 1_500),    // leads at the starting price
        ("bob", 1_200),      // proxy: alice stays ahead at 1250
        ("carol", 1_250),    // below 1250 + 50
        ("seller-1", 2_000), // the seller
        ("dave", 1_500),     // a tie: the earlier maximum leads at 1500
        ("erin", 3_000),     // takes the lead; the reserve lifts the price to 2000
        ("erin", 4_000),     // raises her own maximum
        ("erin", 3_500),     // not above her own maximum
        ("alice", 1_600),    // below 2000 + 50
        ("frank", 2_500),    // erin stays ahead at 2600
        ("gina", 4_000),     // a tie with erin's maximum
    ];
    let mut outcomes = Vec::new();
    let mut last_accepted = None;
    let mut frank = None;
    for (bidder, amount) in sequence {
        let key = new_key();
        let (outcome, body) =
            outcome(bid_waiting(app, bidder, &auction_id, amount, &key).await).await;
        if outcome.0 != "rejected" {
            last_accepted = Some(time_of(&body["received_at"]));
        }
        if bidder == "frank" {
            frank = Some((key, body["id"].clone()));
        }
        outcomes.push(outcome);
    }
    let (key, id) = frank.unwrap();
    let response = app.bid("frank", &auction_id, 2_500, &key).await;
    let replayed = header(&response, "idempotent-replayed") == "true";
    let (code, body): (StatusCode, Value) = (response.status(), response.json().await.unwrap());
    assert_eq!(body["id"], id, "a replay names the first request's bid");
    let replay = (code, body["status"].as_str().map(str::to_owned), replayed);
    let response = app.bid("frank", &auction_id, 2_600, &key).await;
    let reused = (
        response.status(),
        response.json::<Value>().await.unwrap()["code"].clone(),
    );
    // Reads may be served from a cache a moment old: wait for every bid.
    let accepted = outcomes.iter().filter(|o| o.0 != "rejected").count();
    let seen = eventually(
        Duration::from_secs(5),
        "the view to show every bid",
        || async {
            let seen = app.auction_as(&auction_id, "seller-1", &[]).await;
            (seen["bid_count"] == accepted).then_some(seen)
        },
    )
    .await;
    let fields = [
        "current_price",
        "leading_bidder",
        "bid_count",
        "next_min_bid",
        "reserve_price_met",
        "status",
    ];
    assert_consistent(&app.db().await, auction_id.parse().unwrap()).await;
    Run {
        outcomes,
        replay,
        reused,
        view: fields.iter().map(|f| seen[*f].clone()).collect(),
        end_after_last_bid: time_of(&seen["ends_at"]) - last_accepted.unwrap(),
    }
}

/// The same bids along `path` and along the log path give the same run.
async fn matches_the_log_path(path: BidPath) {
    let (log, baseline) = tokio::join!(TestApp::spawn(), app_on(path));
    let (expected, got) = tokio::join!(run_sequence(&log), run_sequence(&baseline));
    assert_eq!(got, expected, "{path:?} against the log path");
    // And the rules' own figures, so that both cannot be wrong together.
    let accepted = |status: &str, price: i64| (status.to_owned(), None, Some(price));
    let rejected = |reason: &str| ("rejected".to_owned(), Some(reason.to_owned()), None);
    assert_eq!(
        got.outcomes,
        [
            accepted("leading", 1_000),
            accepted("outbid", 1_250),
            rejected("below_minimum"),
            rejected("seller_cannot_bid"),
            accepted("outbid", 1_500),
            accepted("leading", 2_000),
            accepted("leading", 2_000),
            rejected("not_above_own_max"),
            rejected("below_minimum"),
            accepted("outbid", 2_600),
            accepted("outbid", 4_000),
        ]
    );
    assert_eq!(
        got.replay,
        (StatusCode::OK, Some("outbid".to_owned()), true)
    );
    assert_eq!(
        got.reused,
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            json!("idempotency_key_reused")
        )
    );
    assert_eq!(
        got.view,
        [
            json!(4_000),
            json!("erin"),
            json!(7),
            json!(4_100),
            json!(true),
            json!("open")
        ]
    );
    assert_eq!(
        got.end_after_last_bid,
        chrono::Duration::seconds(600),
        "soft close"
    );
}

#[tokio::test]
async fn row_lock_fn_gives_the_log_paths_outcomes_for_the_same_bids() {
    matches_the_log_path(BidPath::RowLockFn).await;
}

#[tokio::test]
async fn optimistic_gives_the_log_paths_outcomes_for_the_same_bids() {
    matches_the_log_path(BidPath::Optimistic).await;
}

/// Sends `count` bids on one auction at once along `path`; returns the
/// app, the auction, the bodies answered `201` and how many were shed.
async fn concurrent_bids(path: BidPath, count: i64) -> (TestApp, Uuid, Vec<Value>, usize) {
    let app = app_on(path).await;
    let auction = app
        .create_auction("seller-1", json!({"reserve_price": 3_000}))
        .await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let requests: Vec<_> = (0..count)
        .map(|i| {
            let (http, addr) = (app.http.clone(), app.addr);
            let token = app.token(&format!("bidder-{}", i % 7), &[]);
            let auction_id = auction_id.clone();
            // Rising maxima with a few too low to count.
            let amount = if i % 5 == 4 { 1_001 } else { 1_000 + 75 * i };
            tokio::spawn(async move {
                let response =
                    place_bid(&http, addr, &token, &auction_id, amount, &new_key()).await;
                let retry_after = response.headers().contains_key("retry-after");
                (
                    response.status(),
                    retry_after,
                    response.json::<Value>().await.unwrap(),
                )
            })
        })
        .collect();
    let (mut answered, mut shed) = (Vec::new(), 0);
    for request in requests {
        match request.await.unwrap() {
            (StatusCode::CREATED, _, body) => answered.push(body),
            (StatusCode::SERVICE_UNAVAILABLE, retry_after, body) => {
                assert_eq!(body["code"], "overloaded", "{body}");
                assert!(retry_after, "a 503 carries Retry-After");
                shed += 1;
            }
            (other, _, body) => panic!("unexpected {other}: {body}"),
        }
    }
    (app, auction_id.parse().unwrap(), answered, shed)
}

/// Every bid answered `201` is in the log once, with the outcome it was
/// answered with (its first event) and its price, and the log replays to
/// the auction row.
async fn assert_answers_are_the_log(
    db: &tokio_postgres::Client,
    auction_id: Uuid,
    answered: &[Value],
) {
    let logged = assert_consistent(db, auction_id).await;
    assert_eq!(logged.len(), answered.len(), "one bid_log row per 201");
    let first = event_statuses(db, auction_id, EventOrder::First).await;
    for body in answered {
        let bid = logged
            .iter()
            .find(|b| b.id == id_of(body))
            .expect("every 201 is logged");
        assert_eq!(body["auction_price"].as_i64(), bid.price_after, "{body}");
        assert_eq!(body["reason"].as_str(), bid.reason.as_deref(), "{body}");
        assert_eq!(
            body["status"].as_str(),
            first.get(&bid.id).map(String::as_str),
            "{body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_optimistic_bids_each_get_one_answer_and_the_log_replays() {
    let (app, auction_id, answered, shed) = concurrent_bids(BidPath::Optimistic, 60).await;
    assert_eq!(answered.len() + shed, 60);
    assert!(!answered.is_empty(), "bids get through");
    assert_answers_are_the_log(&app.db().await, auction_id, &answered).await;
    let conflicts = Scrape::take(&app)
        .await
        .sum("gavel_optimistic_conflicts_total", &[]);
    assert!(
        conflicts > 0.0,
        "sixty bids at once on one auction conflict"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_bids_queue_on_the_functions_lock_and_the_log_replays() {
    let (app, auction_id, answered, shed) = concurrent_bids(BidPath::RowLockFn, 40).await;
    assert_eq!(answered.len() + shed, 40);
    assert!(
        answered.len() >= 10,
        "most bids get through the queue ({} of 40)",
        answered.len()
    );
    assert_answers_are_the_log(&app.db().await, auction_id, &answered).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_optimistic_bid_that_never_wins_its_compare_and_set_is_shed_and_leaves_nothing() {
    let app = app_on(BidPath::Optimistic).await;
    let auction = app.create_auction("seller-1", json!({})).await;
    let auction_id = id_of(&auction);
    let db = app.db().await;
    // Every write of the auction row is skipped, as if another writer had
    // always moved its version first: each compare-and-set matches nothing.
    db.batch_execute(
        "CREATE FUNCTION always_moved() RETURNS trigger LANGUAGE plpgsql \
           AS $$ BEGIN RETURN NULL; END $$; \
         CREATE TRIGGER always_moved BEFORE UPDATE ON auctions \
           FOR EACH ROW EXECUTE FUNCTION always_moved()",
    )
    .await
    .unwrap();
    let conflicts = |scrape: &Scrape| scrape.sum("gavel_optimistic_conflicts_total", &[]);
    let before = conflicts(&Scrape::take(&app).await);
    let key = new_key();
    let response = app.bid("alice", &auction_id.to_string(), 1_500, &key).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        response.headers().contains_key("retry-after"),
        "503 carries Retry-After"
    );
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "overloaded");
    let after = conflicts(&Scrape::take(&app).await);
    // (The counter is the process's: other tests may add to it meanwhile.)
    assert!(after - before >= 5.0, "five attempts, each a conflict");
    let keys: i64 = db
        .query_one(
            "SELECT count(*) FROM bid_log WHERE idempotency_key = $1",
            &[&key],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(keys, 0, "a shed bid leaves no bid, so no key, behind");

    // Once writes go through, the client's retry with the same key is a
    // new bid, placed once.
    db.batch_execute("DROP TRIGGER always_moved ON auctions")
        .await
        .unwrap();
    let response = app.bid("alice", &auction_id.to_string(), 1_500, &key).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let answered = [response.json().await.unwrap()];
    assert_answers_are_the_log(&db, auction_id, &answered).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_requests_at_once_make_one_bid_on_each_baseline() {
    for path in BASELINES {
        let app = app_on(path).await;
        let auction = app.create_auction("seller-1", json!({})).await;
        let auction_id = auction["id"].as_str().unwrap().to_owned();
        identical_requests_make_one_bid(&app, &auction_id, "bob", 2_000).await;
        let db = app.db().await;
        let logged = assert_consistent(&db, auction_id.parse().unwrap()).await;
        assert_eq!(logged.len(), 1, "{path:?}: one bid in the log");
    }
}

#[tokio::test]
async fn each_baseline_binary_warns_at_start_and_its_resolver_settles() {
    for path in BASELINES {
        let database_url = fresh_database().await;
        let process =
            ServeProcess::start_with(&database_url, &[("GAVEL_BID_PATH", path.name())]).await;
        let app = process.client(&database_url);
        let ends_at = Utc::now() + chrono::Duration::seconds(2);
        let auction = app
            .create_auction(
                "seller-1",
                json!({"ends_at": ends_at.to_rfc3339(), "soft_close_s": 3}),
            )
            .await;
        let auction_id = auction["id"].as_str().unwrap().to_owned();
        let alice = app.bid_resolved("alice", &auction_id, 1_500).await;
        assert_eq!(alice["status"], "leading");
        let bob = app.bid_resolved("bob", &auction_id, 1_200).await;
        assert_eq!(bob["status"], "outbid");
        let settled = app.wait_settled(&auction_id, Duration::from_secs(20)).await;
        assert_eq!(settled["current_price"], 1_250);
        let bids = assert_consistent(&app.db().await, auction_id.parse().unwrap()).await;
        let statuses: Vec<&str> = bids.iter().map(|b| b.status.as_str()).collect();
        assert_eq!(statuses, ["won", "lost"], "{path:?}");
        let logs = process.logs.lock().unwrap().clone();
        let prefix = format!("GAVEL_BID_PATH={}:", path.name());
        let warning = logs
            .iter()
            .find(|e| {
                e["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(&prefix))
            })
            .unwrap_or_else(|| panic!("a start-up warning names {prefix}"));
        assert_eq!(warning["level"], "WARN");
        assert!(warning["fields"]["message"]
            .as_str()
            .unwrap()
            .contains("not for production"));
    }
}

/// A key written by a writer that takes none of the baselines' locks (the
/// log path of another process on the same database) while a baseline
/// places a bid with it: the key's unique index stops the baseline's
/// insert once that writer commits, and the request replays its bid.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_taken_meanwhile_by_another_writer_replays_on_each_baseline() {
    for path in [BidPath::RowLock, BidPath::RowLockFn, BidPath::Optimistic] {
        let app = TestApp::spawn_with(|config| {
            config.bids.path = path;
            config.pools.statement_timeout = Duration::from_secs(10);
            config.pools.lock_timeout = Duration::from_secs(10);
        })
        .await;
        let auction = app.create_auction("seller-1", json!({})).await;
        let auction_id = id_of(&auction);
        let key = new_key();
        // The log path's append of the same key, held open.
        let mut held = app.db().await;
        let append = held.transaction().await.unwrap();
        let logged = Uuid::now_v7();
        append
            .execute(
                "INSERT INTO bid_log (auction_id, id, bidder_id, amount, idempotency_key, xid) \
                 VALUES ($1, $2, 'alice', 1500, $3, pg_current_xact_id()::text::int8)",
                &[&auction_id, &logged, &key],
            )
            .await
            .unwrap();
        let request = {
            let (http, addr) = (app.http.clone(), app.addr);
            let (token, key) = (app.token("alice", &[]), key.clone());
            tokio::spawn(async move {
                place_bid(&http, addr, &token, &auction_id.to_string(), 1_500, &key).await
            })
        };
        let db = app.db().await;
        eventually(
            Duration::from_secs(5),
            "the bid to wait on the key",
            || async {
                let waiting: i64 = db
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'transactionid'",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                (waiting > 0).then_some(())
            },
        )
        .await;
        append.commit().await.unwrap();

        let response = request.await.unwrap();
        let (code, replayed) = (response.status(), header(&response, "idempotent-replayed"));
        let body: Value = response.json().await.unwrap();
        assert!(code.is_success(), "{path:?}: {code} {body}");
        assert_eq!(replayed, "true", "{path:?}");
        assert_eq!(id_of(&body), logged, "{path:?}");
        wait_resolved(&db, auction_id, Duration::from_secs(10)).await;
        let bids = assert_consistent(&db, auction_id).await;
        assert_eq!(bids.len(), 1, "{path:?}: one bid for the key");
        app.stop().await;
    }
}
