//! Read routing against a real streaming replica: reads without a token are
//! served by the replica, a client's consistency token sends it to the
//! primary until the replica has replayed its write, and a lost replica
//! only moves reads to the primary.

use std::time::{Duration, Instant};

use reqwest::{Response, StatusCode};
use serde_json::{json, Value};

use pg_cluster::PgCluster;

use crate::helpers::*;

/// How often the test servers check their replicas.
const CHECK_INTERVAL: Duration = Duration::from_millis(200);

/// A server on `primary` reading from `replicas`, with lag bounds wide
/// enough that a replica paused for the length of a test still serves reads
/// without a token.
async fn app_with_replicas(primary: &PgCluster, replicas: &[PgCluster]) -> TestApp {
    app_with_replicas_and(primary, replicas, |_| {}).await
}

async fn app_with_replicas_and(
    primary: &PgCluster,
    replicas: &[PgCluster],
    tweak: impl FnOnce(&mut gavel::config::Config),
) -> TestApp {
    let replica_urls = replicas.iter().map(|r| r.url("gavel")).collect();
    TestApp::spawn_on(&primary.url("gavel"), |config| {
        config.reads.replica_urls = replica_urls;
        config.reads.check_interval = CHECK_INTERVAL;
        config.reads.max_lag = Duration::from_secs(60);
        config.reads.max_lag_bytes = 1 << 40;
        tweak(config);
    })
    .await
}

/// `GET path` as `sub`, with a consistency token when given.
async fn read(app: &TestApp, path: &str, sub: &str, token: Option<&str>) -> Response {
    let mut request = app.http.get(app.url(path)).bearer_auth(app.token(sub, &[]));
    if let Some(token) = token {
        request = request.header("Gavel-Consistency-Token", token);
    }
    request.send().await.expect("GET request")
}

/// Places a bid and returns its id and consistency token.
async fn bid_with_token(
    app: &TestApp,
    bidder: &str,
    auction_id: &str,
    amount: i64,
) -> (String, String) {
    let response = app.bid(bidder, auction_id, amount, &new_key()).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let token = header(&response, "gavel-consistency-token");
    assert!(
        !token.is_empty(),
        "a bid response carries a consistency token"
    );
    let bid: Value = response.json().await.unwrap();
    (bid["id"].as_str().unwrap().to_owned(), token)
}

#[tokio::test]
async fn a_token_reads_its_own_write_while_the_replica_is_paused() {
    let (primary, mut replicas) = start_primary_and_replicas(1).await;
    let app = app_with_replicas(&primary, &replicas).await;
    let replica = replicas.pop().unwrap();
    let replica_db = connect(&replica.url("gavel")).await;
    let auction = app.create_auction("seller", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let (first, first_token) = bid_with_token(&app, "alice", &auction_id, 1_000).await;
    let path = |id: &str| format!("/api/bids/{id}");

    // Once the replica has replayed the first bid, the token read uses it.
    eventually(
        Duration::from_secs(10),
        "the replica to serve the first bid",
        || async {
            let response = read(&app, &path(&first), "alice", Some(&first_token)).await;
            (response.status() == StatusCode::OK
                && header(&response, "gavel-read-from") == "replica")
                .then_some(())
        },
    )
    .await;

    replica_db
        .execute("SELECT pg_wal_replay_pause()", &[])
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "replay to pause", || async {
        let state: String = replica_db
            .query_one("SELECT pg_get_wal_replay_pause_state()", &[])
            .await
            .unwrap()
            .get(0);
        (state == "paused").then_some(())
    })
    .await;
    let (second, second_token) = bid_with_token(&app, "bob", &auction_id, 2_000).await;

    // Without the token the replica answers, and it has not seen the bid.
    let stale = read(&app, &path(&second), "bob", None).await;
    assert_eq!(header(&stale, "gavel-read-from"), "replica");
    assert_eq!(
        stale.status(),
        StatusCode::NOT_FOUND,
        "the paused replica is stale"
    );
    let stale_auction = read(&app, &format!("/api/auctions/{auction_id}"), "bob", None).await;
    assert_eq!(header(&stale_auction, "gavel-read-from"), "replica");

    // With it the primary answers, and the bid is there.
    let fresh = read(&app, &path(&second), "bob", Some(&second_token)).await;
    assert_eq!(header(&fresh, "gavel-read-from"), "primary");
    assert_eq!(fresh.status(), StatusCode::OK);
    assert!(
        !header(&fresh, "gavel-consistency-token").is_empty(),
        "a bid read hands the token back"
    );
    let bid: Value = fresh.json().await.unwrap();
    assert_eq!(bid["id"], second.as_str());
    let history = read(
        &app,
        &format!("/api/auctions/{auction_id}/bids"),
        "bob",
        Some(&second_token),
    )
    .await;
    assert_eq!(header(&history, "gavel-read-from"), "primary");
    let history: Value = history.json().await.unwrap();
    assert!(
        history["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["id"] == second.as_str()),
        "the history read with the token lists the new bid: {history}"
    );
    // An older token is already covered by the paused replica.
    let old = read(&app, &path(&first), "alice", Some(&first_token)).await;
    assert_eq!(header(&old, "gavel-read-from"), "replica");

    replica_db
        .execute("SELECT pg_wal_replay_resume()", &[])
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "token reads to return to the replica",
        || async {
            let response = read(&app, &path(&second), "bob", Some(&second_token)).await;
            (response.status() == StatusCode::OK
                && header(&response, "gavel-read-from") == "replica")
                .then_some(())
        },
    )
    .await;
    app.stop().await;
    drop((replica, primary));
}

#[tokio::test]
async fn reads_survive_a_lost_replica_and_return_to_it() {
    let (primary, mut replicas) = start_primary_and_replicas(1).await;
    // This test follows where every read is routed; the auction cache
    // would answer some before routing, from a view the replica gave.
    let app = app_with_replicas_and(&primary, &replicas, |config| {
        config.reads.cache_ttl = Duration::ZERO;
    })
    .await;
    let mut replica = replicas.pop().unwrap();
    let auction = app.create_auction("seller", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let (bid_id, _) = bid_with_token(&app, "alice", &auction_id, 1_000).await;
    let auction_path = format!("/api/auctions/{auction_id}");
    let read_from = async |path: &str, sub: &str| {
        let response = read(&app, path, sub, None).await;
        let from = header(&response, "gavel-read-from");
        let status = response.status();
        let body = response.text().await.unwrap();
        assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
        from
    };
    eventually(
        Duration::from_secs(10),
        "the replica to serve reads",
        || async { (read_from(&auction_path, "reader").await == "replica").then_some(()) },
    )
    .await;

    let replica = blocking(move || {
        replica.stop().expect("stop the replica");
        replica
    })
    .await;
    // Every read answers, from the primary, from the first one on.
    let outage = Instant::now();
    while outage.elapsed() < CHECK_INTERVAL * 5 {
        assert_eq!(read_from(&auction_path, "reader").await, "primary");
        assert_eq!(
            read_from(&format!("/api/bids/{bid_id}"), "alice").await,
            "primary"
        );
        assert_eq!(
            read_from(&format!("{auction_path}/bids"), "reader").await,
            "primary"
        );
    }

    let mut replica = replica;
    let replica = blocking(move || {
        replica.start_again().expect("start the replica again");
        replica
    })
    .await;
    let back = Instant::now();
    eventually(
        Duration::from_secs(10),
        "reads to return to the replica",
        || async { (read_from(&auction_path, "reader").await == "replica").then_some(()) },
    )
    .await;
    let took = back.elapsed();
    eprintln!("reads returned to the restarted replica after {took:?}");
    // One check interval, with room for a busy machine.
    assert!(
        took < CHECK_INTERVAL + Duration::from_secs(2),
        "reads returned to the replica {took:?} after it was back (check interval {CHECK_INTERVAL:?})"
    );
    app.stop().await;
    drop((replica, primary));
}

#[tokio::test]
async fn reads_are_spread_over_the_replicas_and_skip_a_lost_one() {
    let (primary, mut replicas) = start_primary_and_replicas(2).await;
    let app = app_with_replicas(&primary, &replicas).await;
    let auction = app.create_auction("seller", json!({})).await;
    let path = format!("/api/auctions/{}", auction["id"].as_str().unwrap());
    eventually(
        Duration::from_secs(10),
        "both replicas to serve reads",
        || async {
            let mut served = 0;
            for _ in 0..10 {
                let response = read(&app, &path, "reader", None).await;
                assert_eq!(response.status(), StatusCode::OK);
                served += usize::from(header(&response, "gavel-read-from") == "replica");
            }
            // Every replica holds connections of Gavel's read pool.
            let mut used = 0;
            for replica in &replicas {
                let db = connect(&replica.url("gavel")).await;
                let readers: i64 = db
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'gavel-api'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
                used += usize::from(readers > 0);
            }
            (served == 10 && used == 2).then_some(())
        },
    )
    .await;

    let mut lost = replicas.pop().unwrap();
    let lost = blocking(move || {
        lost.stop().expect("stop a replica");
        lost
    })
    .await;
    // The other replica serves the reads; at most the one read that finds
    // the lost replica gone is answered by the primary instead.
    let mut from_primary = 0;
    for _ in 0..20 {
        let response = read(&app, &path, "reader", None).await;
        assert_eq!(response.status(), StatusCode::OK);
        from_primary += usize::from(header(&response, "gavel-read-from") == "primary");
    }
    assert!(
        from_primary <= 1,
        "{from_primary} of 20 reads went to the primary"
    );
    app.stop().await;
    drop((lost, replicas, primary));
}

/// An idle primary holding WAL that is inserted but not yet flushed (here a
/// table lock, which is logged for standbys and flushed only with the next
/// commit) has nothing the replica lacks: the replica keeps serving reads
/// within the default lag bound.
#[tokio::test]
async fn unflushed_wal_on_an_idle_primary_does_not_count_as_replica_lag() {
    let (primary, replicas) = start_primary_and_replicas(1).await;
    let replica_urls = vec![replicas[0].url("gavel")];
    let app = TestApp::spawn_on(&primary.url("gavel"), |config| {
        config.reads.replica_urls = replica_urls;
        config.reads.check_interval = CHECK_INTERVAL;
    })
    .await;
    let auction = app.create_auction("seller", json!({})).await;
    let path = format!("/api/auctions/{}", auction["id"].as_str().unwrap());
    eventually(
        Duration::from_secs(10),
        "a read from the replica",
        || async {
            let response = read(&app, &path, "reader", None).await;
            (header(&response, "gavel-read-from") == "replica").then_some(())
        },
    )
    .await;

    let admin = connect(&primary.url("gavel")).await;
    admin
        .batch_execute(
            "CREATE TABLE scratch (n int); BEGIN; LOCK TABLE scratch IN ACCESS EXCLUSIVE MODE",
        )
        .await
        .unwrap();
    // Longer than the lag bound (2 s by default).
    tokio::time::sleep(Duration::from_secs(3)).await;
    for _ in 0..5 {
        let response = read(&app, &path, "reader", None).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(header(&response, "gavel-read-from"), "replica");
    }
    admin.batch_execute("COMMIT").await.unwrap();
}
