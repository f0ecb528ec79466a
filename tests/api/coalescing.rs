//! Coalesced appends: concurrent bids share append statements, and the bid
//! path's contract still holds bid by bid: every acknowledged bid is in the
//! log once, a repeated key is one bid, and a statement that cannot run
//! answers all of its bids 503 without writing any of them.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio_postgres::types::PgLsn;
use uuid::Uuid;

use crate::helpers::*;

/// `name value` of an unlabelled series in a Prometheus text scrape (0 when
/// absent: a histogram appears with its first observation).
fn sample(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_bids_share_append_statements_and_each_is_logged_once() {
    // A process of its own, so its metrics count only this test's bids.
    let database_url = fresh_database().await;
    let process = ServeProcess::start_with(
        &database_url,
        &[
            ("GAVEL_API_POOL_SIZE", "2"),
            // Bids stay pending: the snapshot check passes every one of them.
            ("GAVEL_RESOLVER", "off"),
            // Room for a busy test machine: this test is about batching.
            ("GAVEL_POOL_WAIT_TIMEOUT_MS", "5000"),
        ],
    )
    .await;
    let app = process.client(&database_url);
    let auction = app.create_auction("seller", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    // Caches the auction snapshot, so the burst does not read it 200 times.
    let warm = app.bid("warm-up", &auction_id, 1_000, &new_key()).await;
    assert_eq!(warm.status(), StatusCode::ACCEPTED);
    let before = app.metrics_text().await;

    let requests: Vec<_> = (0..200)
        .map(|i| {
            let (http, addr) = (app.http.clone(), app.addr);
            let token = app.token(&format!("bidder-{i}"), &[]);
            let auction_id = auction_id.clone();
            tokio::spawn(async move {
                let response =
                    place_bid(&http, addr, &token, &auction_id, 1_000 + i, &new_key()).await;
                let status = response.status();
                (status, response.json::<Value>().await.unwrap())
            })
        })
        .collect();
    let mut ids = std::collections::HashSet::new();
    for request in requests {
        let (status, body) = request.await.unwrap();
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        ids.insert(id_of(&body));
    }
    assert_eq!(ids.len(), 200, "200 distinct bids");

    let db = app.db().await;
    let logged: Vec<Uuid> = db
        .query(
            "SELECT id FROM bid_log WHERE bidder_id LIKE 'bidder-%'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(logged.len(), 200, "exactly 200 rows");
    assert!(
        logged.iter().all(|id| ids.contains(id)),
        "the acknowledged ones"
    );

    let after = app.metrics_text().await;
    let statements = sample(&after, "gavel_bids_append_batch_size_count")
        - sample(&before, "gavel_bids_append_batch_size_count");
    let written = sample(&after, "gavel_bids_append_batch_size_sum")
        - sample(&before, "gavel_bids_append_batch_size_sum");
    eprintln!("coalescing: 200 concurrent bids written by {statements} append statements");
    assert_eq!(written, 200.0, "every bid went through one statement");
    assert!(
        (1.0..200.0).contains(&statements),
        "some statements wrote several bids: {statements} statements"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_key_sent_twenty_times_at_once_is_one_bid_and_every_answer_names_it() {
    let app = TestApp::spawn_with(|config| {
        // Pending bids: every answer is 202, a replay marked as one.
        config.resolver.enabled = false;
        config.pools.wait_timeout = Duration::from_secs(5);
    })
    .await;
    let auction = app.create_auction("seller", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let warm = app.bid("warm-up", &auction_id, 1_000, &new_key()).await;
    assert_eq!(warm.status(), StatusCode::ACCEPTED);

    let key = new_key();
    let requests: Vec<_> = (0..20)
        .map(|_| {
            let (http, addr, token) = (app.http.clone(), app.addr, app.token("dana", &[]));
            let (auction_id, key) = (auction_id.clone(), key.clone());
            tokio::spawn(async move {
                let response = place_bid(&http, addr, &token, &auction_id, 4_000, &key).await;
                let replayed = header(&response, "idempotent-replayed");
                let status = response.status();
                (status, replayed, response.json::<Value>().await.unwrap())
            })
        })
        .collect();
    let mut ids = std::collections::HashSet::new();
    let mut firsts = 0;
    for request in requests {
        let (status, replayed, body) = request.await.unwrap();
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        match replayed.as_str() {
            "true" => {}
            "" => firsts += 1,
            other => panic!("Idempotent-Replayed: {other}"),
        }
        ids.insert(id_of(&body));
    }
    assert_eq!(ids.len(), 1, "every answer names the same bid");
    assert_eq!(firsts, 1, "one answer is the first, the others replays");
    let db = app.db().await;
    let rows: Vec<Uuid> = db
        .query(
            "SELECT id FROM bid_log WHERE bidder_id = 'dana' AND idempotency_key = $1",
            &[&key],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(rows.len(), 1, "one bid in the log");
    assert!(ids.contains(&rows[0]));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bids_whose_statement_cannot_lock_the_log_are_answered_503_and_never_written() {
    let app = TestApp::spawn().await;
    let config = test_config(&app.database_url);
    // What a bid may take here: waiting for a writer within its budget, then
    // its statement's lock wait.
    let bound =
        config.pools.wait_timeout + config.pools.lock_timeout + Duration::from_millis(1_000);
    let auction = app.create_auction("seller", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let warm = app.bid("warm-up", &auction_id, 1_000, &new_key()).await;
    assert_eq!(warm.status(), StatusCode::ACCEPTED);

    let locker = app.db().await;
    locker
        .batch_execute("BEGIN; LOCK TABLE bid_log IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let keys: Vec<String> = (0..30).map(|_| new_key()).collect();
    let requests: Vec<_> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| {
            let (http, addr) = (app.http.clone(), app.addr);
            let token = app.token(&format!("locked-out-{i}"), &[]);
            let (auction_id, key) = (auction_id.clone(), key.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let response =
                    place_bid(&http, addr, &token, &auction_id, 2_000 + i as i64, &key).await;
                let status = response.status();
                let retry_after = header(&response, "retry-after");
                let body: Value = response.json().await.unwrap();
                (started.elapsed(), status, retry_after, body)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for request in requests {
        answers.push(request.await.unwrap());
    }
    locker.batch_execute("COMMIT").await.unwrap();

    let slowest = answers.iter().map(|(took, ..)| *took).max().unwrap();
    eprintln!("locked log: 30 bids answered, the slowest after {slowest:?}");
    for (took, status, retry_after, body) in &answers {
        assert_eq!(*status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["code"], "overloaded", "{body}");
        // 1 s, or spread over more if admission saw the stall as overload.
        assert!(
            retry_after.parse::<u64>().is_ok_and(|s| s >= 1),
            "Retry-After is a whole number of seconds: {retry_after}"
        );
        assert!(*took < bound, "answered after {took:?}, bound {bound:?}");
    }
    // Nothing of a failed statement was written, not even later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let db = app.db().await;
    let logged: i64 = db
        .query_one(
            "SELECT count(*) FROM bid_log WHERE idempotency_key = ANY($1)",
            &[&keys],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(logged, 0, "no refused bid is in the log, nor its key");

    // The log takes bids again at once.
    let after = app.bid("after", &auction_id, 9_000, &new_key()).await;
    assert_eq!(after.status(), StatusCode::ACCEPTED);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_bid_token_is_at_or_past_the_commit_of_the_bid_it_names() {
    let app = TestApp::spawn_with(|config| {
        config.resolver.enabled = false;
        config.pools.wait_timeout = Duration::from_secs(5);
    })
    .await;
    let db = app.db().await;
    // Reads the WAL itself, to find each bid's commit record.
    db.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        .await
        .expect("pg_walinspect (in Debian's postgresql package)");
    let start: PgLsn = db
        .query_one("SELECT pg_current_wal_insert_lsn()", &[])
        .await
        .unwrap()
        .get(0);
    let auction = app.create_auction("seller", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();

    // Batches of new bids, and replays of one key that find its first use
    // with a look-up after their batch.
    let repeated = new_key();
    let requests: Vec<_> = (0..40)
        .map(|i| {
            let (http, addr) = (app.http.clone(), app.addr);
            let (bidder, key) = match i % 4 {
                0 => ("erin".to_owned(), repeated.clone()),
                _ => (format!("bidder-{i}"), new_key()),
            };
            let token = app.token(&bidder, &[]);
            let auction_id = auction_id.clone();
            tokio::spawn(async move {
                let response = place_bid(&http, addr, &token, &auction_id, 1_000, &key).await;
                let status = response.status();
                let token = header(&response, "gavel-consistency-token");
                (status, token, response.json::<Value>().await.unwrap())
            })
        })
        .collect();
    for request in requests {
        let (status, token, body) = request.await.unwrap();
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let position = gavel::http::consistency::decode(&token)
            .unwrap_or_else(|| panic!("a bid answer carries a consistency token: {token:?}"));
        // With the resolver off the bid's row is never updated, so its
        // xmin is the transaction that appended it.
        let commits: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_get_wal_records_info($1, \
                                       LEAST($2, pg_current_wal_flush_lsn())) r \
                 WHERE r.resource_manager = 'Transaction' AND r.record_type = 'COMMIT' \
                   AND r.xid = (SELECT xmin FROM bid_log WHERE id = $3)",
                &[&start, &position, &id_of(&body)],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            commits, 1,
            "the commit of bid {} ends at or before its token's position {position}",
            body["id"]
        );
    }
    app.stop().await;
}

/// Appends `batch` with one statement: the ids and sequence numbers of
/// the rows inserted, in sequence order.
async fn append(
    client: &deadpool_postgres::Client,
    batch: &[gavel::db::bids::NewBid],
) -> Vec<(Uuid, i64)> {
    let batch: Vec<_> = batch.iter().collect();
    let (inserted, _) = gavel::db::bids::append_batch(client, &batch).await.unwrap();
    inserted.iter().map(|b| (b.id, b.seq)).collect()
}

/// An append inserts its rows in key order (so batches sharing keys never
/// deadlock) but numbers them in the order its bids arrived, which is the
/// order the resolver takes them in; a key already used is skipped.
#[tokio::test]
async fn a_batch_is_numbered_in_arrival_order_whatever_its_keys() {
    let url = fresh_database().await;
    let settings = gavel::db::PoolSettings::new(&test_config(&url), 1, "gavel-test");
    let pool = gavel::db::build_pool(&url, "test-append", &settings).unwrap();
    let client = pool.get().await.unwrap();
    let auction_id = Uuid::now_v7();
    let bid = |bidder: &str, key: &str| gavel::db::bids::NewBid {
        auction_id,
        id: Uuid::now_v7(),
        bidder_id: bidder.into(),
        amount: 1_000,
        key: key.into(),
    };
    let ids = |rows: &[(Uuid, i64)]| rows.iter().map(|(id, _)| *id).collect::<Vec<_>>();
    // Bidders and keys in descending order.
    let first = [bid("zoe", "z"), bid("yan", "y"), bid("ann", "a")];
    let inserted = append(&client, &first).await;
    let expected: Vec<Uuid> = first.iter().map(|b| b.id).collect();
    assert_eq!(ids(&inserted), expected, "numbered in arrival order");
    let db = connect(&url).await;
    let written: Vec<String> = db
        .query("SELECT bidder_id FROM bid_log ORDER BY ctid", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(written, ["ann", "yan", "zoe"], "written in key order");
    // Yan's key is taken: skipped; the others follow the first batch.
    let second = [bid("zoe", "z2"), bid("yan", "y"), bid("ann", "a2")];
    let inserted_again = append(&client, &second).await;
    assert_eq!(ids(&inserted_again), [second[0].id, second[2].id]);
    assert!(inserted_again[0].1 > inserted[2].1);
    let untracked: i64 = db
        .query_one("SELECT count(*) FROM bid_log WHERE xid IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(untracked, 0, "every appended bid names its transaction");
}
