//! Webhook delivery against a real HTTP receiver started by the test:
//! signatures (checked here and by the `standardwebhooks` package of
//! PyPI), retries with backoff, `kill -9` of the delivering process, two
//! processes sharing the work, failure after the retry period and replay.

use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use gavel::domain::WebhookSecret;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::helpers::*;
use crate::marketplace::{ending_in, expected_settlement, read_all, settlement_of};

/// The signing secret of these tests.
const WHSEC: &str = "whsec_dGhpcnR5LXR3by1ieXRlcy1vZi13ZWJob29rLXNlY3JldCE=";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    timestamp: String,
    signature: String,
    content_type: String,
    body: String,
    at: Instant,
    at_wall: chrono::DateTime<chrono::Utc>,
}

impl Received {
    fn event(&self) -> Value {
        serde_json::from_str(&self.body).expect("a JSON body")
    }
}

/// A webhook receiver on a port of its own: records every request, then
/// answers with the next scripted status (`fallback` once none is left),
/// after holding the request for `hold` if set.
#[derive(Clone)]
struct Receiver {
    url: String,
    state: Arc<ReceiverState>,
}

#[derive(Default)]
struct ReceiverState {
    received: Mutex<Vec<Received>>,
    script: Mutex<VecDeque<u16>>,
    fallback: Mutex<u16>,
    hold: Mutex<Option<Duration>>,
}

impl Receiver {
    async fn start(script: &[u16]) -> Receiver {
        let state = Arc::new(ReceiverState::default());
        *state.fallback.lock().unwrap() = 200;
        state.script.lock().unwrap().extend(script);
        let app = axum::Router::new()
            .route("/hooks/gavel", axum::routing::post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks/gavel", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { url, state }
    }

    fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    fn answer(&self, status: u16) {
        *self.state.fallback.lock().unwrap() = status;
    }

    fn hold(&self, hold: Option<Duration>) {
        *self.state.hold.lock().unwrap() = hold;
    }

    /// Waits until `check` holds for what was received.
    async fn until(
        &self,
        limit: Duration,
        what: &str,
        check: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        eventually(limit, what, || async {
            let received = self.received();
            check(&received).then_some(received)
        })
        .await
    }

    /// The requests carrying the event of `auction_id`.
    fn of(&self, auction_id: &str) -> Vec<Received> {
        (self.received().into_iter())
            .filter(|r| r.event()["data"]["auction_id"] == auction_id)
            .collect()
    }
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    state.received.lock().unwrap().push(Received {
        id: header("webhook-id"),
        timestamp: header("webhook-timestamp"),
        signature: header("webhook-signature"),
        content_type: header("content-type"),
        body,
        at: Instant::now(),
        at_wall: chrono::Utc::now(),
    });
    let answer = state.script.lock().unwrap().pop_front();
    let answer = answer.unwrap_or(*state.fallback.lock().unwrap());
    let hold = *state.hold.lock().unwrap();
    if let Some(hold) = hold {
        tokio::time::sleep(hold).await;
    }
    StatusCode::from_u16(answer).unwrap()
}

/// Checks a delivery's signature by the specification, independently of
/// Gavel's code: HMAC-SHA256 keyed with the decoded secret over
/// `id.timestamp.body`, and a timestamp of the attempt.
fn assert_signed(delivery: &Received) {
    let key = STANDARD
        .decode(WHSEC.strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{}.{}.{}", delivery.id, delivery.timestamp, delivery.body).as_bytes());
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    assert_eq!(delivery.signature, expected, "{delivery:?}");
    let sent: i64 = delivery.timestamp.parse().unwrap();
    assert!((chrono::Utc::now().timestamp() - sent).abs() < 60);
    assert_eq!(delivery.content_type, "application/json");
    assert_eq!(
        delivery.event()["id"],
        delivery.id.as_str(),
        "webhook-id is the event id"
    );
}

/// An in-process Gavel delivering to `receiver`, settling 0.5 s after the end.
async fn app_delivering_to(receiver: &Receiver, retry_base: Duration) -> TestApp {
    let url = receiver.url.parse().unwrap();
    TestApp::spawn_with(|c| {
        c.resolver.settle_grace = Duration::from_millis(500);
        c.webhooks.urls = vec![url];
        c.webhooks.secret = Some(WebhookSecret::parse(WHSEC).unwrap());
        c.webhooks.retry_base = retry_base;
    })
    .await
}

/// A `gavel serve` process that only delivers webhooks to `receiver`.
async fn dispatcher_process(database_url: &str, receiver: &Receiver) -> ServeProcess {
    ServeProcess::start_with(
        database_url,
        &[
            ("GAVEL_RESOLVER", "off"),
            ("GAVEL_WEBHOOK_URLS", &receiver.url),
            ("GAVEL_WEBHOOK_SECRET", WHSEC),
        ],
    )
    .await
}

/// An in-process Gavel that resolves and settles but delivers nothing.
async fn settling_app() -> TestApp {
    TestApp::spawn_with(|c| c.resolver.settle_grace = Duration::from_millis(500)).await
}

/// Every delivery row's status, by event id.
async fn statuses(app: &TestApp) -> HashMap<String, String> {
    let db = app.db().await;
    let rows = db
        .query("SELECT event_id, status FROM webhook_deliveries", &[])
        .await
        .unwrap();
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

const LONG: Duration = Duration::from_secs(30);

/// Attempts to `receiver` whose delivery ended `outcome`, by the metrics.
fn attempts(scrape: &Scrape, receiver: &Receiver, outcome: &str) -> f64 {
    let labels = [("url", receiver.url.as_str()), ("outcome", outcome)];
    scrape.sum("gavel_webhook_deliveries_total", &labels)
}

/// Waits until the delivery of event `id` is recorded as `status`.
async fn await_status(app: &TestApp, id: &str, status: &str) {
    eventually(LONG, &format!("delivery {id} {status}"), || async {
        (statuses(app).await.get(id).map(String::as_str) == Some(status)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_settled_auction_is_delivered_signed_as_the_feed_shows_it() {
    let receiver = Receiver::start(&[]).await;
    let app = app_delivering_to(&receiver, Duration::from_secs(4)).await;
    let auction = ending_in(&app, 2, json!({})).await;
    app.bid_resolved("alice", &auction, 1_500).await;
    app.bid_resolved("bob", &auction, 2_500).await;
    let received = receiver
        .until(LONG, "the delivery", |r| !r.is_empty())
        .await;
    assert_eq!(received.len(), 1);
    let delivery = &received[0];
    assert_signed(delivery);
    let event = delivery.event();
    assert_eq!(
        settlement_of(&event),
        expected_settlement(&app, &auction).await
    );
    let (feed, _) = read_all(&app, 100).await;
    assert_eq!(feed, [event], "the feed lists the event delivered");
    verify_with_standardwebhooks(delivery);
    await_status(&app, &delivery.id, "delivered").await;
    let scrape = Scrape::take(&app).await;
    assert_eq!(attempts(&scrape, &receiver, "delivered"), 1.0);
    assert!(scrape.sum("gavel_events_written_total", &[("type", "auction.settled")]) >= 1.0);
    assert!(scrape.has("gavel_webhook_oldest_undelivered_seconds"));
}

/// The Python interpreter with the `standardwebhooks` package: from
/// GAVEL_TEST_PYTHON (set by .ci/run), else the virtualenv .ci/run makes.
fn python_with_standardwebhooks() -> String {
    let venv = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/target/webhooks-venv/bin/python"
    );
    let python = std::env::var("GAVEL_TEST_PYTHON").unwrap_or_else(|_| venv.to_owned());
    let found = Command::new(&python)
        .args(["-c", "import standardwebhooks"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "this test needs Python with the standardwebhooks package (PyPI): run .ci/run, or \
         python3 -m venv target/webhooks-venv && target/webhooks-venv/bin/pip install \
         standardwebhooks (or set GAVEL_TEST_PYTHON to such a python); tried {python}"
    );
    python
}

/// Verifies a delivery with the `standardwebhooks` package, and checks
/// that it refuses the same delivery with its body changed.
fn verify_with_standardwebhooks(delivery: &Received) {
    let python = python_with_standardwebhooks();
    let script = "import sys\n\
        from standardwebhooks.webhooks import Webhook\n\
        secret, msg_id, ts, sig = sys.argv[1:5]\n\
        body = sys.stdin.buffer.read()\n\
        Webhook(secret).verify(body, {'webhook-id': msg_id, 'webhook-timestamp': ts, 'webhook-signature': sig})\n\
        print('verified')\n";
    let run = |body: &str| {
        let mut child = Command::new(&python)
            .args([
                "-c",
                script,
                WHSEC,
                &delivery.id,
                &delivery.timestamp,
                &delivery.signature,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = run(&delivery.body);
    assert!(
        out.status.success(),
        "standardwebhooks refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "verified");
    let tampered = run(&delivery.body.replace("closed", "open"));
    assert!(!tampered.status.success(), "a changed body must not verify");
}

#[tokio::test]
async fn a_refused_delivery_is_retried_with_growing_waits_and_the_same_id() {
    let receiver = Receiver::start(&[500, 500, 500]).await;
    let app = app_delivering_to(&receiver, Duration::from_millis(200)).await;
    let auction = ending_in(&app, 2, json!({})).await;
    let received = receiver
        .until(LONG, "four attempts", |r| r.len() >= 4)
        .await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let received_after = receiver.received();
    assert_eq!(
        received_after.len(),
        4,
        "delivered on the fourth attempt, then no more"
    );
    assert!(
        received.iter().all(|r| r.id == received[0].id),
        "one webhook-id"
    );
    assert_eq!(received[0].event()["data"]["auction_id"], auction.as_str());
    received.iter().for_each(assert_signed);
    let gaps: Vec<Duration> = received.windows(2).map(|w| w[1].at - w[0].at).collect();
    // Waits of 200, 400 and 800 ms, each within ±25 %.
    let floors = [150, 300, 600].map(Duration::from_millis);
    for (gap, floor) in gaps.iter().zip(floors) {
        assert!(*gap >= floor && *gap < floor * 4, "gaps {gaps:?}");
    }
    assert!(gaps[2] > gaps[0] * 2, "the waits grow: {gaps:?}");
    await_status(&app, &received[0].id, "delivered").await;
    let scrape = Scrape::take(&app).await;
    assert_eq!(attempts(&scrape, &receiver, "retried"), 3.0);
    assert_eq!(attempts(&scrape, &receiver, "delivered"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_delivering_process_loses_no_event() {
    // The first attempt is refused: the event is committed and not
    // delivered when the only dispatcher is killed.
    let receiver = Receiver::start(&[500]).await;
    let app = settling_app().await;
    let mut first = dispatcher_process(&app.database_url, &receiver).await;
    let refused = ending_in(&app, 2, json!({})).await;
    receiver
        .until(LONG, "the first attempt", |r| !r.is_empty())
        .await;
    first.kill().await;
    // Another auction settles while no dispatcher runs.
    let while_down = ending_in(&app, 1, json!({})).await;
    app.wait_settled(&while_down, LONG).await;
    let mut second = dispatcher_process(&app.database_url, &receiver).await;
    receiver
        .until(LONG, "both delivered", |_| {
            receiver.of(&refused).len() == 2 && receiver.of(&while_down).len() == 1
        })
        .await;
    let attempts = receiver.of(&refused);
    assert_eq!(
        attempts[0].id, attempts[1].id,
        "the retry after the restart keeps the id"
    );

    // Killed during a delivery: the receiver holds the request.
    receiver.hold(Some(Duration::from_secs(60)));
    let in_flight = ending_in(&app, 1, json!({})).await;
    receiver
        .until(LONG, "the held attempt", |_| {
            receiver.of(&in_flight).len() == 1
        })
        .await;
    second.kill().await;
    receiver.hold(None);
    let _third = dispatcher_process(&app.database_url, &receiver).await;
    receiver
        .until(Duration::from_secs(45), "the redelivery", |_| {
            receiver.of(&in_flight).len() == 2
        })
        .await;
    let attempts = receiver.of(&in_flight);
    assert_eq!(attempts[0].id, attempts[1].id);
    attempts.iter().for_each(assert_signed);
    eventually(LONG, "every delivery recorded", || async {
        let statuses = statuses(&app).await;
        (statuses.len() == 3 && statuses.values().all(|s| s == "delivered")).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_deliver_each_event_once() {
    let receiver = Receiver::start(&[]).await;
    let app = settling_app().await;
    let _processes = [
        dispatcher_process(&app.database_url, &receiver).await,
        dispatcher_process(&app.database_url, &receiver).await,
    ];
    let mut auctions = Vec::new();
    for _ in 0..24 {
        auctions.push(ending_in(&app, 3, json!({})).await);
    }
    receiver
        .until(LONG, "every event", |r| r.len() >= auctions.len())
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let received = receiver.received();
    let mut ids: Vec<&str> = received.iter().map(|r| r.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), received.len(), "no event delivered twice");
    for auction in &auctions {
        assert_eq!(receiver.of(auction).len(), 1, "{auction}");
    }
}

#[tokio::test]
async fn a_delivery_refused_for_a_day_fails_and_is_replayed_on_demand() {
    let receiver = Receiver::start(&[]).await;
    receiver.answer(503);
    let app = app_delivering_to(&receiver, Duration::from_millis(10)).await;
    ending_in(&app, 1, json!({})).await;
    receiver
        .until(LONG, "a few attempts", |r| r.len() >= 3)
        .await;
    // As if the first attempt had been a day ago.
    let db = app.db().await;
    db.execute(
        "UPDATE webhook_deliveries SET created_at = now() - interval '25 hours'",
        &[],
    )
    .await
    .unwrap();
    let id = receiver.received()[0].id.clone();
    await_status(&app, &id, "failed").await;
    let tried = receiver.received().len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        receiver.received().len(),
        tried,
        "a failed delivery is not attempted"
    );
    let scrape = Scrape::take(&app).await;
    assert_eq!(attempts(&scrape, &receiver, "failed"), 1.0);

    receiver.answer(200);
    let out = Command::new(env!("CARGO_BIN_EXE_gavel"))
        .args(["webhooks", "replay", "--url", &receiver.url])
        .env("GAVEL_DATABASE_URL", &app.database_url)
        .env("GAVEL_JWT_SECRET", SECRET)
        .env("GAVEL_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1 failed deliveries queued again"
    );
    await_status(&app, &id, "delivered").await;
    let last = receiver.received().pop().unwrap();
    assert_eq!(last.id, id, "replayed with the same webhook-id");
    assert_signed(&last);
}

/// Figures for BENCHMARKS.md, not a check: run alone, on a quiet machine,
/// `cargo test --release --test api webhook_figures -- --ignored
/// --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run by hand on a quiet machine"]
async fn webhook_figures() {
    let receiver = Receiver::start(&[]).await;
    let app = app_delivering_to(&receiver, Duration::from_secs(4)).await;
    // Settlement to delivery: auctions settling one by one.
    let mut auctions = Vec::new();
    for i in 0..200 {
        auctions.push(ending_in(&app, 3 + i / 20, json!({})).await);
    }
    let received = receiver
        .until(Duration::from_secs(60), "every settlement", |r| {
            r.len() >= 200
        })
        .await;
    let mut latencies: Vec<f64> = received
        .iter()
        .map(|r| {
            let settled = time_of(&r.event()["data"]["settled_at"]);
            (r.at_wall - settled).num_microseconds().unwrap() as f64 / 1000.0
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    println!(
        "settlement to delivery, ms: p50 {:.1}, p99 {:.1}, max {:.1} ({} events)",
        pct(0.5),
        pct(0.99),
        pct(1.0),
        latencies.len()
    );
    // Throughput: 5,000 events committed at once.
    let db = app.db().await;
    db.execute(
        "INSERT INTO events (auction_id, n, kind, bid_ids, bidders, statuses, data) \
         SELECT gen_random_uuid(), 1, 'auction.settled', '{}', '{}', '{}', \
                jsonb_build_object('auction_id', gen_random_uuid(), 'status', 'closed') \
         FROM generate_series(1, 5000)",
        &[],
    )
    .await
    .unwrap();
    let started = Instant::now();
    receiver
        .until(Duration::from_secs(120), "5,000 more", |r| r.len() >= 5_200)
        .await;
    let took = started.elapsed();
    println!(
        "5,000 events to one receiver in {took:?}: {:.0} events/s",
        5_000.0 / took.as_secs_f64()
    );
}
