//! Several `gavel serve` processes on one database, and a crash mid-flight.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_on_one_database_apply_every_bid_once() {
    // One in-process app only to create the auction and mint tokens.
    let app = TestApp::spawn().await;
    let auction = app.create_auction("seller-1", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let servers = [
        ServeProcess::start(&app.database_url).await,
        ServeProcess::start(&app.database_url).await,
    ];
    let addrs = [servers[0].addr, servers[1].addr];

    let mut tasks = Vec::new();
    for b in 0..60 {
        let (http, token, auction_id) = (
            app.http.clone(),
            app.token(&format!("p-bidder-{b}"), &[]),
            auction_id.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            for i in 0..5_i64 {
                let addr = addrs[(b + i as usize) % 2];
                let amount = 1_000 + (b as i64 * 131) % 4_000 + i * 400;
                let response = place_bid_retrying(&http, addr, &token, &auction_id, amount).await;
                let status = response.status();
                let body: Value = response.json().await.unwrap();
                if status.is_success() {
                    accepted.push(id_of(&body));
                } else {
                    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
                }
            }
            accepted
        }));
    }
    let mut accepted = Vec::new();
    for task in tasks {
        accepted.extend(task.await.unwrap());
    }
    let db = app.db().await;
    let auction_uuid: Uuid = auction_id.parse().unwrap();
    wait_resolved(&db, auction_uuid, Duration::from_secs(60)).await;
    let bids = assert_consistent(&db, auction_uuid).await;
    let logged: HashSet<Uuid> = bids.iter().map(|b| b.id).collect();
    assert_eq!(logged.len(), accepted.len());
    assert!(accepted.iter().all(|id| logged.contains(id)));
    // Each committed version applied a distinct, contiguous slice of bids.
    let versions: Vec<(i64, i64, i64)> = db
        .query(
            "SELECT resolved_version, min(resolution_no), max(resolution_no) FROM bids \
             WHERE auction_id = $1 GROUP BY resolved_version ORDER BY resolved_version",
            &[&auction_uuid],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    for pair in versions.windows(2) {
        assert!(
            pair[0].0 < pair[1].0 && pair[0].2 + 1 == pair[1].1,
            "versions apply disjoint slices: {pair:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_server_loses_no_acknowledged_bid() {
    let app = TestApp::spawn_with(|c| c.resolver.enabled = false).await;
    let auction = app.create_auction("seller-1", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let mut server = ServeProcess::start(&app.database_url).await;
    let addr = server.addr;

    // Far more bids than get answered before the kill, which comes once a
    // few hundred were acknowledged.
    const BIDS_PER_BIDDER: i64 = 200;
    let answered = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for b in 0..40 {
        let (http, token, auction_id, answered) = (
            app.http.clone(),
            app.token(&format!("k-bidder-{b}"), &[]),
            auction_id.clone(),
            answered.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for i in 0..BIDS_PER_BIDDER {
                let amount = 1_000 + b * 10 + i * 1_000;
                match http
                    .post(format!("http://{addr}/api/auctions/{auction_id}/bids"))
                    .bearer_auth(&token)
                    .header("Idempotency-Key", new_key())
                    .json(&json!({ "amount": amount }))
                    .send()
                    .await
                {
                    Ok(response) if response.status().is_success() => {
                        if let Ok(body) = response.json::<Value>().await {
                            acknowledged.push(id_of(&body));
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break, // the server is gone
                }
            }
            acknowledged
        }));
    }
    eventually(
        Duration::from_secs(30),
        "bids to be acknowledged",
        || async { (answered.load(Ordering::Relaxed) >= 300).then_some(()) },
    )
    .await;
    server.kill().await;
    let mut acknowledged = Vec::new();
    for task in tasks {
        acknowledged.extend(task.await.unwrap());
    }
    assert!(
        !acknowledged.is_empty(),
        "some bids were acknowledged before the kill"
    );
    assert!(
        acknowledged.len() < 40 * BIDS_PER_BIDDER as usize,
        "the kill happened while bids were still in flight"
    );

    let restarted = ServeProcess::start(&app.database_url).await;
    let db = app.db().await;
    let auction_uuid: Uuid = auction_id.parse().unwrap();
    wait_resolved(&db, auction_uuid, Duration::from_secs(60)).await;
    let bids = assert_consistent(&db, auction_uuid).await;
    let logged: HashSet<Uuid> = bids.iter().map(|b| b.id).collect();
    for id in &acknowledged {
        assert!(
            logged.contains(id),
            "acknowledged bid {id} survived the crash"
        );
    }
    drop(restarted);
}

#[tokio::test]
async fn an_api_only_process_wakes_another_processes_resolver_over_notify() {
    // The resolver process polls only once a minute: a quick outcome proves
    // it was woken by LISTEN/NOTIFY, and the 201 proves the API process heard
    // the resolution the same way.
    let resolver = TestApp::spawn_with(|c| c.resolver.poll = Duration::from_secs(60)).await;
    let api_only = TestApp::spawn_on(&resolver.database_url, |c| c.resolver.enabled = false).await;
    let auction = api_only.create_auction("seller-1", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap();
    // Let the resolver finish its start-up scan before the bids arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (bidder, amount) in [("alice", 1_000), ("bob", 1_500)] {
        let started = std::time::Instant::now();
        // `bid_resolved` waits with `Prefer: wait` and asserts the 201.
        let bid = api_only.bid_resolved(bidder, auction_id, amount).await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "woken by NOTIFY, not by polling"
        );
        assert_eq!(bid["status"], "leading");
    }
    let db = api_only.db().await;
    assert_consistent(&db, id_of(&auction)).await;
}
