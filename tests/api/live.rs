//! Live updates: the auction event stream (`GET /api/auctions/{id}/events`)
//! read as a client reads Server-Sent Events, against the real server.

use std::time::Duration;

use chrono::{SubsecRound as _, Utc};
use gavel::auth::Role;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;

/// One Server-Sent Events frame.
#[derive(Debug)]
struct Frame {
    event: Option<String>,
    id: Option<String>,
    data: String,
    comment: bool,
}

/// A client's view of an event stream.
struct Stream {
    response: reqwest::Response,
    buffer: String,
}

impl Stream {
    /// The next frame, `None` once the server closed the stream. Panics
    /// after `limit` without one.
    async fn next(&mut self, limit: Duration) -> Option<Frame> {
        tokio::time::timeout(limit, self.next_frame())
            .await
            .unwrap_or_else(|_| panic!("no frame within {limit:?}"))
    }

    async fn next_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let raw: String = self.buffer.drain(..end + 2).collect();
                return Some(parse(&raw));
            }
            let chunk = self.response.chunk().await.expect("stream read")?;
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// The next frame that is not a keep-alive comment.
    async fn next_event(&mut self, limit: Duration) -> Option<Frame> {
        loop {
            let frame = self.next(limit).await?;
            if !frame.comment {
                return Some(frame);
            }
        }
    }
}

fn parse(raw: &str) -> Frame {
    let mut frame = Frame {
        event: None,
        id: None,
        data: String::new(),
        comment: false,
    };
    for line in raw.lines() {
        if line.starts_with(':') {
            frame.comment = true;
        } else if let Some(v) = line.strip_prefix("event: ") {
            frame.event = Some(v.to_owned());
        } else if let Some(v) = line.strip_prefix("id: ") {
            frame.id = Some(v.to_owned());
        } else if let Some(v) = line.strip_prefix("data: ") {
            frame.data.push_str(v);
        }
    }
    frame
}

async fn open(
    app: &TestApp,
    auction_id: &str,
    token: &str,
    last: Option<&str>,
) -> reqwest::Response {
    open_path(
        app,
        &format!("/api/auctions/{auction_id}/events"),
        token,
        last,
    )
    .await
}

async fn open_path(
    app: &TestApp,
    path: &str,
    token: &str,
    last: Option<&str>,
) -> reqwest::Response {
    let mut request = app.http.get(app.url(path)).bearer_auth(token);
    if let Some(last) = last {
        request = request.header("Last-Event-ID", last);
    }
    request.send().await.unwrap()
}

async fn stream(app: &TestApp, auction_id: &str, token: &str, last: Option<&str>) -> Stream {
    let path = format!("/api/auctions/{auction_id}/events");
    stream_at(app, &path, token, last).await
}

async fn stream_at(app: &TestApp, path: &str, token: &str, last: Option<&str>) -> Stream {
    let response = open_path(app, path, token, last).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["x-frame-options"], "DENY");
    Stream {
        response,
        buffer: String::new(),
    }
}

/// The auction view an event carries, without its `server_time` (checked
/// to be the server's clock, three fractional digits).
fn view_of(frame: &Frame) -> (i64, Value) {
    assert_eq!(frame.event.as_deref(), Some("auction"), "{frame:?}");
    let mut view: Value = serde_json::from_str(&frame.data).unwrap();
    let time = view
        .as_object_mut()
        .unwrap()
        .remove("server_time")
        .expect("server_time");
    let time = chrono::DateTime::parse_from_rfc3339(time.as_str().unwrap()).unwrap();
    assert!((Utc::now() - time.to_utc()).num_seconds().abs() < 5);
    let version: i64 = frame.id.as_deref().unwrap().parse().unwrap();
    assert_eq!(view["version"], version, "the event id is the version");
    (version, view)
}

const WAIT: Duration = Duration::from_secs(5);

/// A server that settles half a second after the end, and an auction of
/// it that ends in four seconds.
async fn ending_in_four_seconds() -> (TestApp, String) {
    let app = TestApp::spawn_with(|c| c.resolver.settle_grace = Duration::from_millis(500)).await;
    let ends_at = (Utc::now() + chrono::Duration::seconds(4)).trunc_subsecs(3);
    let auction = app
        .create_auction("seller-1", json!({"ends_at": ends_at.to_rfc3339()}))
        .await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    (app, auction_id)
}

#[tokio::test]
async fn an_auction_stream_sends_the_view_then_every_new_version_then_end() {
    let (app, auction_id) = ending_in_four_seconds().await;
    let mut watcher = stream(&app, &auction_id, &app.token("watcher", &[]), None).await;
    let mut seller = stream(
        &app,
        &auction_id,
        &app.token("seller-1", &[Role::Seller]),
        None,
    )
    .await;

    let (first, view) = view_of(&watcher.next_event(WAIT).await.unwrap());
    assert_eq!(
        view,
        app.auction_as(&auction_id, "watcher", &[]).await,
        "the first event is the current view, as GET shows it"
    );
    view_of(&seller.next_event(WAIT).await.unwrap());

    app.bid_resolved("alice", &auction_id, 1_500).await;
    let (second, view) = view_of(&watcher.next_event(WAIT).await.unwrap());
    assert!(second > first, "versions increase");
    assert_eq!(view["current_price"], 1_000);
    assert_eq!(
        view["leading_bidder"],
        gavel::domain::mask_user("alice"),
        "masked for a watcher"
    );
    let (_, seen_by_seller) = view_of(&seller.next_event(WAIT).await.unwrap());
    assert_eq!(
        seen_by_seller["leading_bidder"], "alice",
        "unmasked for the seller"
    );

    app.bid_resolved("bob", &auction_id, 2_000).await;
    let (third, view) = view_of(&watcher.next_event(WAIT).await.unwrap());
    assert!(third > second);
    assert_eq!(view["leading_bidder"], gavel::domain::mask_user("bob"));

    // A reconnect at the latest version waits for the next one.
    let mut resumed = stream(
        &app,
        &auction_id,
        &app.token("watcher", &[]),
        Some(&third.to_string()),
    )
    .await;
    // A reconnect one version behind starts with the current view.
    let mut behind = stream(
        &app,
        &auction_id,
        &app.token("watcher", &[]),
        Some(&second.to_string()),
    )
    .await;
    let (caught_up, _) = view_of(&behind.next_event(WAIT).await.unwrap());
    assert_eq!(caught_up, third);

    // Settlement: the final view, `end` with the final version, then close.
    let limit = Duration::from_secs(10);
    let (last, view) = loop {
        let (version, view) = view_of(&watcher.next_event(limit).await.unwrap());
        if view["status"] == "closed" {
            break (version, view);
        }
    };
    assert_eq!(view["winner_id"], gavel::domain::mask_user("bob"));
    let end = watcher.next_event(WAIT).await.unwrap();
    assert_eq!(end.event.as_deref(), Some("end"));
    assert_eq!(end.data, last.to_string());
    assert!(
        watcher.next(WAIT).await.is_none(),
        "the server closes the stream"
    );
    let (next, _) = view_of(&resumed.next_event(limit).await.unwrap());
    assert!(
        next > third,
        "the resumed stream skipped the version it had"
    );

    // Connecting to a closed auction: the three steps at once.
    let mut late = stream(&app, &auction_id, &app.token("bob", &[]), None).await;
    let (version, view) = view_of(&late.next_event(WAIT).await.unwrap());
    assert_eq!(
        (version, view["winner_id"].as_str()),
        (last, Some("bob")),
        "the winner sees itself"
    );
    assert_eq!(
        late.next_event(WAIT).await.unwrap().event.as_deref(),
        Some("end")
    );
    assert!(late.next(WAIT).await.is_none());
    // ... unless the client already has the final version.
    let mut done = stream(
        &app,
        &auction_id,
        &app.token("bob", &[]),
        Some(&last.to_string()),
    )
    .await;
    assert_eq!(
        done.next_event(WAIT).await.unwrap().event.as_deref(),
        Some("end")
    );
    assert!(done.next(WAIT).await.is_none());
}

#[tokio::test]
async fn a_stream_is_refused_before_it_starts_and_ends_at_token_expiry() {
    let app = TestApp::spawn_with(|c| c.limits.max_streams = 1).await;
    let auction = app.create_auction("seller-1", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let token = app.token("watcher", &[]);
    let code = |response: reqwest::Response| async move {
        let status = response.status();
        let problem: Value = response.json().await.unwrap();
        (status, problem["code"].as_str().unwrap().to_owned())
    };
    let anonymous = app
        .http
        .get(app.url(&format!("/api/auctions/{auction_id}/events")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        code(anonymous).await,
        (StatusCode::UNAUTHORIZED, "unauthorized".into())
    );
    let malformed = open(&app, "not-an-id", &token, None).await;
    assert_eq!(
        code(malformed).await,
        (StatusCode::BAD_REQUEST, "invalid_request".into())
    );
    let unknown = open(&app, &uuid::Uuid::now_v7().to_string(), &token, None).await;
    assert_eq!(
        code(unknown).await,
        (StatusCode::NOT_FOUND, "not_found".into())
    );
    let bad_cursor = open(&app, &auction_id, &token, Some("yesterday")).await;
    assert_eq!(
        code(bad_cursor).await,
        (StatusCode::BAD_REQUEST, "invalid_request".into())
    );

    // One stream open: the next is refused with Retry-After, until it closes.
    let short = app.keys.mint("watcher", &[], 2);
    let mut first = stream(&app, &auction_id, &short, None).await;
    let refused = open(&app, &auction_id, &token, None).await;
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(
        code(refused).await,
        (StatusCode::SERVICE_UNAVAILABLE, "overloaded".into())
    );

    // The two-second token ends its stream, which frees the place.
    let started = std::time::Instant::now();
    first.next_event(WAIT).await.unwrap();
    assert!(
        first.next(WAIT).await.is_none(),
        "the stream ends at token expiry"
    );
    let lasted = started.elapsed();
    assert!(
        lasted < Duration::from_secs(4),
        "ended {lasted:?} after opening"
    );
    drop(first);
    eventually(WAIT, "the place to be free again", || async {
        let response = open(&app, &auction_id, &token, None).await;
        (response.status() == StatusCode::OK).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_watcher_on_one_process_sees_changes_resolved_by_another() {
    // Two servers on one database share nothing but PostgreSQL: A runs no
    // resolver, B resolves, and A hears of it over LISTEN/NOTIFY only.
    let a = TestApp::spawn_with(|c| c.resolver.enabled = false).await;
    let b = TestApp::spawn_on(&a.database_url, |_| {}).await;
    let auction = b.create_auction("seller-1", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let mut watcher = stream(&a, &auction_id, &a.token("watcher", &[]), None).await;
    let (first, _) = view_of(&watcher.next_event(WAIT).await.unwrap());
    for (i, bidder) in ["alice", "bob", "carol"].into_iter().enumerate() {
        b.bid_resolved(bidder, &auction_id, 1_500 + 500 * i as i64)
            .await;
        let resolved = std::time::Instant::now();
        let (version, view) = view_of(&watcher.next_event(WAIT).await.unwrap());
        let took = resolved.elapsed();
        assert!(version > first);
        assert_eq!(view["leading_bidder"], gavel::domain::mask_user(bidder));
        assert!(
            took < Duration::from_secs(1),
            "seen on A {took:?} after B resolved it"
        );
    }
}

#[tokio::test]
async fn a_watcher_that_stops_reading_holds_up_no_one() {
    let app = TestApp::spawn().await;
    let auction = app.create_auction("seller-1", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let mut stalled = stream(&app, &auction_id, &app.token("stalled", &[]), None).await;
    let (first, _) = view_of(&stalled.next_event(WAIT).await.unwrap());
    let mut reader = stream(&app, &auction_id, &app.token("reader", &[]), None).await;
    view_of(&reader.next_event(WAIT).await.unwrap());
    // The stalled watcher reads nothing while 30 versions go by; the other
    // sees each one as it is resolved.
    let mut latest = first;
    for i in 0..30_i64 {
        app.bid_resolved(&format!("bidder-{i}"), &auction_id, 1_100 + 100 * i)
            .await;
        let (version, _) = view_of(&reader.next_event(WAIT).await.unwrap());
        assert!(version > latest);
        latest = version;
    }
    // Then it receives increasing versions up to the latest, never more
    // than there were.
    let mut seen = first;
    let mut events = 0;
    while seen < latest {
        let (version, _) = view_of(&stalled.next_event(WAIT).await.unwrap());
        assert!(version > seen, "versions strictly increase");
        seen = version;
        events += 1;
    }
    assert_eq!(seen, latest, "it ends on the latest version");
    assert!(events <= 30);
}

/// The last change before a lull goes out from the budget's reserve at
/// once instead of waiting for the stream's pause.
#[tokio::test]
async fn the_last_change_before_a_lull_is_not_held_for_the_pause() {
    // One stream with 1 event a second: a pause of 0.625 s to 1.875 s
    // after each event, and a reserve of one event.
    let app = TestApp::spawn_with(|c| c.limits.stream_events_per_s = 1).await;
    let auction = app.create_auction("seller-1", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let mut watcher = stream(&app, &auction_id, &app.token("watcher", &[]), None).await;
    let (first, _) = view_of(&watcher.next_event(WAIT).await.unwrap());
    let paused = std::time::Instant::now();
    app.bid_resolved("alice", &auction_id, 1_500).await;
    let (version, view) = view_of(&watcher.next_event(WAIT).await.unwrap());
    let took = paused.elapsed();
    assert!(version > first);
    assert_eq!(view["leading_bidder"], gavel::domain::mask_user("alice"));
    assert!(
        took < Duration::from_millis(600),
        "sent {took:?} after the first event: it waited for the pause"
    );
}

/// With its event budget shared by many streams, a stream waits its share
/// after each event: versions resolved meanwhile are skipped for the latest,
/// and the final view cuts the wait short.
#[tokio::test]
async fn a_paced_stream_skips_to_the_latest_and_the_final_view_is_not_held() {
    // 20 streams sharing 1 event a second: at least 10 s between two
    // events of one stream, unless the auction closes.
    let app = TestApp::spawn_with(|c| {
        c.resolver.settle_grace = Duration::from_millis(500);
        c.limits.stream_events_per_s = 1;
    })
    .await;
    let ends_at = (Utc::now() + chrono::Duration::seconds(3)).trunc_subsecs(3);
    let auction = app
        .create_auction("seller-1", json!({"ends_at": ends_at.to_rfc3339()}))
        .await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let mut others = Vec::new();
    for i in 0..19 {
        others.push(stream(&app, &auction_id, &app.token(&format!("w-{i}"), &[]), None).await);
    }
    let opened = std::time::Instant::now();
    let mut watcher = stream(&app, &auction_id, &app.token("watcher", &[]), None).await;
    let (first, _) = view_of(&watcher.next_event(WAIT).await.unwrap());
    for (i, amount) in [1_100, 1_300, 1_600].into_iter().enumerate() {
        app.bid_resolved(&format!("bidder-{i}"), &auction_id, amount)
            .await;
    }
    let (version, view) = view_of(&watcher.next_event(Duration::from_secs(15)).await.unwrap());
    let waited = opened.elapsed();
    assert_eq!(view["status"], "closed", "the next event is the final view");
    assert!(
        version > first + 3,
        "the three resolutions and the settlement were skipped into one event"
    );
    assert!(
        waited < Duration::from_secs(9),
        "the final view came at settlement ({waited:?}), not after the pause"
    );
    assert_eq!(
        view,
        app.auction_as(&auction_id, "watcher", &[]).await,
        "the final view is the auction as GET shows it"
    );
    assert_eq!(
        watcher.next_event(WAIT).await.unwrap().event.as_deref(),
        Some("end")
    );
    drop(others);
}

// The bidder's stream, GET /api/me/events.

/// A bid change event: its cursor, the bid's id and its new status.
fn change_of(frame: &Frame) -> (String, String, String) {
    assert_eq!(frame.event.as_deref(), Some("bid"), "{frame:?}");
    let bid: Value = serde_json::from_str(&frame.data).unwrap();
    (
        frame.id.clone().expect("a cursor"),
        bid["id"].as_str().unwrap().to_owned(),
        bid["status"].as_str().unwrap().to_owned(),
    )
}

/// The next `count` changes of a bidder's stream, as (bid id, status).
async fn changes(stream: &mut Stream, count: usize) -> (Vec<(String, String)>, String) {
    let mut seen = Vec::new();
    let mut cursor = String::new();
    for _ in 0..count {
        let (at, bid, status) = change_of(&stream.next_event(WAIT).await.unwrap());
        seen.push((bid, status));
        cursor = at;
    }
    (seen, cursor)
}

fn pair(bid: &Value, status: &str) -> (String, String) {
    (bid["id"].as_str().unwrap().to_owned(), status.to_owned())
}

#[tokio::test]
async fn a_bidder_hears_of_its_bids_resolved_and_outbid() {
    let app = TestApp::spawn().await;
    let auction = app.create_auction("seller-1", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let mut alice = stream_at(&app, "/api/me/events", &app.token("alice", &[]), None).await;
    let first = app.bid_resolved("alice", &auction_id, 1_500).await;
    let (seen, _) = changes(&mut alice, 1).await;
    assert_eq!(seen, [pair(&first, "leading")]);
    app.bid_resolved("bob", &auction_id, 3_000).await;
    let (seen, _) = changes(&mut alice, 1).await;
    assert_eq!(seen, [pair(&first, "outbid")], "alice hears she was outbid");
}

#[tokio::test]
async fn a_bidder_that_reconnects_gets_every_change_it_missed_once_in_order() {
    let (app, auction_id) = ending_in_four_seconds().await;
    let token = app.token("alice", &[]);
    let mut alice = stream_at(&app, "/api/me/events", &token, None).await;
    let first = app.bid_resolved("alice", &auction_id, 1_500).await;
    let (_, cursor) = changes(&mut alice, 1).await;
    drop(alice);

    // Away: outbid, bids again, outbid again, and the auction settles.
    app.bid_resolved("bob", &auction_id, 2_000).await;
    let second = app.bid_resolved("alice", &auction_id, 2_500).await;
    app.bid_resolved("carol", &auction_id, 4_000).await;
    app.wait_settled(&auction_id, Duration::from_secs(10)).await;

    let mut alice = stream_at(&app, "/api/me/events", &token, Some(&cursor)).await;
    let (seen, cursor) = changes(&mut alice, 5).await;
    let per_bid = |bid: &Value| -> Vec<String> {
        let id = bid["id"].as_str().unwrap();
        seen.iter()
            .filter(|(b, _)| b == id)
            .map(|(_, s)| s.clone())
            .collect()
    };
    assert_eq!(per_bid(&first), ["outbid", "lost"], "{seen:?}");
    assert_eq!(per_bid(&second), ["leading", "outbid", "lost"], "{seen:?}");
    // Nothing more, once: only keep-alives follow.
    let quiet = tokio::time::timeout(Duration::from_millis(500), alice.next_event(WAIT)).await;
    assert!(quiet.is_err(), "no change is sent twice: {quiet:?}");

    // The last cursor resumes with nothing to replay; a new bid is live.
    let mut again = stream_at(&app, "/api/me/events", &token, Some(&cursor)).await;
    let other = app.create_auction("seller-1", json!({})).await;
    let third = app
        .bid_resolved("alice", other["id"].as_str().unwrap(), 1_500)
        .await;
    let (seen, _) = changes(&mut again, 1).await;
    assert_eq!(seen, [pair(&third, "leading")]);
}

#[tokio::test]
async fn a_bidder_stream_resumes_across_a_killed_process() {
    // Changes are resolved by an in-process server while the process the
    // bidder watched is killed and started again.
    let app = TestApp::spawn().await;
    let auction = app.create_auction("seller-1", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let mut server = ServeProcess::start(&app.database_url).await;
    let remote = server.client(&app.database_url);
    let token = remote.token("alice", &[]);
    let mut alice = stream_at(&remote, "/api/me/events", &token, None).await;
    let first = app.bid_resolved("alice", &auction_id, 1_500).await;
    let (_, cursor) = changes(&mut alice, 1).await;
    server.kill().await;
    drop(alice);

    app.bid_resolved("bob", &auction_id, 2_000).await;
    let second = app.bid_resolved("alice", &auction_id, 2_500).await;
    let restarted = ServeProcess::start(&app.database_url).await;
    let remote = restarted.client(&app.database_url);
    let mut alice = stream_at(&remote, "/api/me/events", &token, Some(&cursor)).await;
    let (seen, _) = changes(&mut alice, 2).await;
    assert_eq!(seen, [pair(&first, "outbid"), pair(&second, "leading")]);
}

#[tokio::test]
async fn a_bidder_stream_refuses_a_cursor_it_does_not_know() {
    let app = TestApp::spawn().await;
    let token = app.token("alice", &[]);
    for cursor in ["yesterday", "djEuMS4yLjM"] {
        let response = open_path(&app, "/api/me/events", &token, Some(cursor)).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{cursor}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "invalid_request");
    }
    // Well formed, but naming a change that is not in the log.
    let unknown = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        format!("v1.1.{}.0.0", uuid::Uuid::now_v7()),
    );
    let response = open_path(&app, "/api/me/events", &token, Some(&unknown)).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn server_time_is_the_time_an_event_is_sent() {
    let app = TestApp::spawn().await;
    let auction = app.create_auction("seller-1", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let token = app.token("watcher", &[]);
    let time_of_first = |frame: Frame| {
        let view: Value = serde_json::from_str(&frame.data).unwrap();
        chrono::DateTime::parse_from_rfc3339(view["server_time"].as_str().unwrap()).unwrap()
    };
    let mut early = stream(&app, &auction_id, &token, None).await;
    let first = time_of_first(early.next_event(WAIT).await.unwrap());
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // The same version, sent again to a later watcher: a later time.
    let mut late = stream(&app, &auction_id, &token, None).await;
    let second = time_of_first(late.next_event(WAIT).await.unwrap());
    assert!(
        (second - first).num_milliseconds() >= 1_400,
        "{first} then {second}"
    );
}
