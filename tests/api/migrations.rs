//! Upgrades of a database that already holds bids: the schema as it was
//! before a migration, bids in every state written as Gavel wrote them
//! then, the migration, and Gavel resolving what was left pending and
//! answering retries of the requests that wrote them.

use std::borrow::Cow;

use chrono::{DateTime, Duration as Span, Utc};
use reqwest::StatusCode;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::*;
use gavel::db::events::{self, BidChange};
use gavel::domain::BidStatus;
use gavel::rules::{self, AuctionState, AuctionTerms, Increments, Leader, Outcome};

/// The migration that finds pending bids by their transaction.
const BY_TRANSACTION: i64 = 20261209000001;
/// The migration that keeps idempotency keys in the bid log.
const KEYS_IN_LOG: i64 = 20261209000002;
/// The migration that records outcomes once per resolver batch.
const OUTCOMES_PER_BATCH: i64 = 20261211000001;

/// How the Gavel of an old schema found pending bids.
#[derive(Clone, Copy, PartialEq)]
enum Era {
    /// In a queue table (`pending_bids`), keys in their own table.
    Queue,
    /// By the transaction that wrote them, keys in the bid log; outcomes
    /// written into each bid's row.
    ByTransaction,
}

/// Applies the embedded migrations older than `version`.
async fn migrate_before(url: &str, version: i64) {
    use sqlx::Connection as _;
    let older = gavel::db::MIGRATOR.iter().filter(|m| m.version < version);
    let migrator = sqlx::migrate::Migrator {
        migrations: Cow::Owned(older.cloned().collect()),
        ignore_missing: false,
        locking: true,
        no_tx: false,
    };
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    migrator
        .run(&mut conn)
        .await
        .expect("the older migrations apply");
    conn.close().await.unwrap();
}

/// A database migrated to the schema before `version`: its URL, a pooled
/// connection to seed it through Gavel's queries, and a plain one.
async fn database_before(
    version: i64,
) -> (String, deadpool_postgres::Client, tokio_postgres::Client) {
    let url = empty_database().await;
    migrate_before(&url, version).await;
    let settings = gavel::db::PoolSettings::new(&test_config(&url), 1, "gavel-test");
    let pool = gavel::db::build_pool(&url, "test-seed", &settings).unwrap();
    let seeding = pool.get().await.unwrap();
    let db = connect(&url).await;
    (url, seeding, db)
}

/// One auction of the old schema, and what its resolver had written.
struct OldAuction<'a> {
    db: &'a deadpool_postgres::Client,
    era: Era,
    id: Uuid,
    terms: AuctionTerms,
    state: AuctionState,
    resolved: i64,
}

impl<'a> OldAuction<'a> {
    /// An auction of `era` that started an hour ago and ends `ends_in`
    /// from now.
    async fn create(db: &'a deadpool_postgres::Client, era: Era, ends_in: Span) -> Self {
        let id = Uuid::now_v7();
        let increments = Increments::default_table();
        let row = db
            .query_one(
                "INSERT INTO auctions (id, seller_id, title, currency, starting_price, increments, \
                 starts_at, original_ends_at, ends_at, max_end_at) \
                 VALUES ($1, 'seller-1', 'A lamp', 'EUR', 100, $2, now() - interval '1 hour', \
                         now() + $3 * interval '1 second', now() + $3 * interval '1 second', \
                         now() + $3 * interval '1 second') \
                 RETURNING starts_at, ends_at",
                &[&id, &json!(increments), &(ends_in.num_seconds() as f64)],
            )
            .await
            .unwrap();
        let (starts_at, ends_at): (DateTime<Utc>, DateTime<Utc>) = (row.get(0), row.get(1));
        let terms = AuctionTerms {
            seller_id: "seller-1".into(),
            starting_price: 100,
            reserve_price: None,
            increments,
            starts_at,
            soft_close: Span::zero(),
            max_end_at: ends_at,
        };
        let state = AuctionState::opening(ends_at);
        OldAuction {
            db,
            era,
            id,
            terms,
            state,
            resolved: 0,
        }
    }

    /// A bid and its idempotency key as the old append wrote them (in the
    /// queue era, the queue's trigger queues it), received `at`; returns
    /// its id.
    async fn append(&self, bidder: &str, amount: i64, at: DateTime<Utc>) -> Uuid {
        let id = Uuid::now_v7();
        let sql = match self.era {
            Era::Queue => {
                "WITH key AS (INSERT INTO idempotency_keys (bidder_id, key, auction_id, amount, \
                 bid_id) VALUES ($3, 'k-' || $3, $1, $4, $2) RETURNING bid_id) \
                 INSERT INTO bid_log (auction_id, id, bidder_id, amount, idempotency_key, \
                 received_at) SELECT $1, bid_id, $3, $4, 'k-' || $3, $5 FROM key"
            }
            Era::ByTransaction => {
                "INSERT INTO bid_log (auction_id, id, bidder_id, amount, idempotency_key, \
                 received_at, xid) \
                 VALUES ($1, $2, $3, $4, 'k-' || $3, $5, pg_current_xact_id()::text::int8)"
            }
        };
        self.db
            .execute(sql, &[&self.id, &id, &bidder, &amount, &at])
            .await
            .unwrap();
        id
    }

    /// A bid appended and resolved by the old resolver: its outcome by the
    /// rules, the leader it displaced marked outbid.
    async fn resolve(&mut self, bidder: &str, amount: i64, at: DateTime<Utc>) -> Uuid {
        let id = self.append(bidder, amount, at).await;
        self.resolve_appended(id, bidder, amount, at, true).await;
        id
    }

    /// The old resolver's outcome of the bid `id` (see [`Self::resolve`]);
    /// in the by-transaction era, with `pass` the resolver's progress
    /// passes it, without it the bid is resolved beyond the progress (as
    /// after a bid held back before it).
    async fn resolve_appended(
        &mut self,
        id: Uuid,
        bidder: &str,
        amount: i64,
        at: DateTime<Utc>,
        pass: bool,
    ) {
        let input = rules::BidInput {
            id,
            bidder_id: bidder.into(),
            amount,
            received_at: at,
        };
        let applied = rules::apply_bid(&self.terms, &mut self.state, &input);
        self.resolved += 1;
        let status = match applied.outcome {
            Outcome::Leading => BidStatus::Leading,
            Outcome::Outbid => BidStatus::Outbid,
            Outcome::Rejected(_) => BidStatus::Rejected,
        };
        let reason = match applied.outcome {
            Outcome::Rejected(reason) => Some(reason.as_str()),
            _ => None,
        };
        self.db
            .execute(
                "UPDATE bid_log SET status = $2, reason = $3, price_after = $4, \
                 resolution_no = $5, resolved_version = $5, resolved_at = now() WHERE id = $1",
                &[
                    &id,
                    &status.as_str(),
                    &reason,
                    &applied.price_after,
                    &self.resolved,
                ],
            )
            .await
            .unwrap();
        let passed = match self.era {
            Era::Queue => Some("DELETE FROM pending_bids WHERE id = $1"),
            Era::ByTransaction => pass.then_some(
                "UPDATE auctions a SET resolved_xid = b.xid, resolved_seq = b.seq \
                 FROM bid_log b WHERE b.id = $1 AND a.id = b.auction_id",
            ),
        };
        if let Some(sql) = passed {
            self.db.execute(sql, &[&id]).await.unwrap();
        }
        let mut changes = Vec::new();
        if let Some(displaced) = applied.displaced {
            self.db
                .execute(
                    "UPDATE bid_log SET status = 'outbid' WHERE id = $1",
                    &[&displaced],
                )
                .await
                .unwrap();
            let bidder: String = (self.db)
                .query_one("SELECT bidder_id FROM bid_log WHERE id = $1", &[&displaced])
                .await
                .unwrap()
                .get(0);
            changes.push((displaced, bidder, BidStatus::Outbid));
        }
        changes.push((id, bidder.to_owned(), status));
        let changes: Vec<BidChange> = (changes.iter())
            .map(|(bid_id, bidder_id, status)| BidChange {
                bid_id: *bid_id,
                bidder_id,
                status: *status,
            })
            .collect();
        events::record_bid_changes(self.db, self.id, 0, self.resolved, &changes)
            .await
            .unwrap();
    }

    /// Writes the state the old resolver committed; with `settle`, settles
    /// the auction as it did (the leader won, every other accepted bid lost).
    async fn commit(&mut self, settle: bool) {
        let winner: Option<Leader> = settle
            .then(|| rules::settle(&self.terms, &mut self.state))
            .flatten();
        let version = self.resolved + i64::from(settle);
        if settle {
            let winning_bid = winner.as_ref().map(|w| w.bid_id);
            self.db
                .execute(
                    "WITH changed AS ( \
                       UPDATE bid_log SET status = CASE WHEN id = $3 THEN 'won' ELSE 'lost' END \
                       WHERE auction_id = $1 AND status IN ('leading', 'outbid') \
                       RETURNING id, bidder_id, status) \
                     INSERT INTO events (auction_id, n, kind, bid_ids, bidders, statuses, data, \
                                         version) \
                     SELECT $1, 1, 'auction.settled', coalesce(array_agg(id ORDER BY id), '{}'), \
                            coalesce(array_agg(bidder_id ORDER BY id), '{}'), \
                            coalesce(array_agg(status ORDER BY id), '{}'), '{}', $2 \
                     FROM changed",
                    &[&self.id, &version, &winning_bid],
                )
                .await
                .unwrap();
        }
        let leader = self.state.leader.as_ref();
        self.db
            .execute(
                "UPDATE auctions SET leader_bid_id = $2, leader_bidder_id = $3, leader_max = $4, \
                 current_price = $5, bid_count = $6, resolved_count = $7, version = $11, \
                 status = CASE WHEN $8 THEN 'closed' ELSE 'open' END, \
                 settled_at = CASE WHEN $8 THEN now() END, winner_id = $9, winner_bid_id = $10 \
                 WHERE id = $1",
                &[
                    &self.id,
                    &leader.map(|l| l.bid_id),
                    &leader.map(|l| l.bidder_id.as_str()),
                    &leader.map(|l| l.max_amount),
                    &self.state.price,
                    &self.state.bid_count,
                    &self.resolved,
                    &settle,
                    &winner.as_ref().map(|w| w.bidder_id.as_str()),
                    &winner.as_ref().map(|w| w.bid_id),
                    &version,
                ],
            )
            .await
            .unwrap();
    }
}

/// Checks each bid's status and reason as readers see them.
async fn assert_statuses(db: &tokio_postgres::Client, expected: &[(Uuid, &str, Option<&str>)]) {
    for &(id, status, reason) in expected {
        let found = status_of(db, id).await;
        assert_eq!(
            (found.0.as_str(), found.1.as_deref()),
            (status, reason),
            "bid {id}"
        );
    }
}

/// The status of bid `id`, as readers see it.
async fn status_of(db: &tokio_postgres::Client, id: Uuid) -> (String, Option<String>) {
    let row = db
        .query_one("SELECT status, reason FROM bids WHERE id = $1", &[&id])
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn bids_in_every_state_are_carried_over_and_the_pending_ones_resolved() {
    let (url, seeding, db) = database_before(BY_TRANSACTION).await;
    let minutes_ago = |m: i64| Utc::now() - Span::minutes(m);

    // Open: Ann outbid by Bob, Cat too low; Fay and Gus still pending.
    let mut open = OldAuction::create(&seeding, Era::Queue, Span::hours(1)).await;
    let ann = open.resolve("ann", 1_000, minutes_ago(30)).await;
    let bob = open.resolve("bob", 2_000, minutes_ago(29)).await;
    let cat = open.resolve("cat", 50, minutes_ago(28)).await;
    open.commit(false).await;
    let fay = open.append("fay", 3_000, minutes_ago(2)).await;
    let gus = open.append("gus", 2_500, minutes_ago(1)).await;
    // Settled: Eve won over Dan; Hal's bid reached it after its settlement.
    let mut settled = OldAuction::create(&seeding, Era::Queue, Span::minutes(-10)).await;
    let dan = settled.resolve("dan", 700, minutes_ago(20)).await;
    let eve = settled.resolve("eve", 900, minutes_ago(19)).await;
    settled.commit(true).await;
    let hal = settled.append("hal", 5_000, minutes_ago(1)).await;

    gavel::db::migrate(&url)
        .await
        .expect("the migration applies");
    let queue = db
        .query_one("SELECT to_regclass('pending_bids') IS NULL", &[])
        .await
        .unwrap();
    assert!(queue.get::<_, bool>(0), "the queue table is gone");
    let marked: Vec<(Uuid, Option<i64>)> = db
        .query("SELECT id, xid FROM bid_log ORDER BY seq", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (id, xid) in &marked {
        let pending = [fay, gus, hal].contains(id);
        assert_eq!(xid.is_some(), pending, "bid {id}: {xid:?}");
    }

    let app = TestApp::spawn_on(&url, |_| {}).await;
    for auction in [open.id, settled.id] {
        wait_resolved(&db, auction, std::time::Duration::from_secs(20)).await;
        assert_consistent(&db, auction).await;
    }
    let expected = [
        (ann, "outbid", None),
        (bob, "outbid", None),
        (cat, "rejected", Some("below_minimum")),
        (fay, "leading", None),
        (gus, "outbid", None),
        (dan, "lost", None),
        (eve, "won", None),
        (hal, "rejected", Some("auction_closed")),
    ];
    assert_statuses(&db, &expected).await;

    // The keys carried over: a retry of Fay's request is a replay.
    let replay = app.bid("fay", &open.id.to_string(), 3_000, "k-fay").await;
    assert!(replay.status().is_success(), "{}", replay.status());
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let body: serde_json::Value = replay.json().await.unwrap();
    assert_eq!(id_of(&body), fay);
    // And new bids are found by their transaction.
    let ivy = app
        .bid("ivy", &open.id.to_string(), 4_000, &new_key())
        .await;
    assert_eq!(ivy.status(), StatusCode::ACCEPTED);
    wait_resolved(&db, open.id, std::time::Duration::from_secs(20)).await;
    let bids = assert_consistent(&db, open.id).await;
    assert_eq!(bids.len(), 6);
    app.stop().await;
}

#[tokio::test]
async fn bids_resolved_in_their_rows_keep_their_outcomes_and_the_pending_ones_get_a_batch() {
    let (url, seeding, db) = database_before(OUTCOMES_PER_BATCH).await;
    let minutes_ago = |m: i64| Utc::now() - Span::minutes(m);

    // Open: Ann outbid by Bob, then Jon, resolved beyond the progress while
    // Ida's earlier bid (an earlier transaction) waited; Ida and Fay pending.
    let mut open = OldAuction::create(&seeding, Era::ByTransaction, Span::hours(1)).await;
    let ann = open.resolve("ann", 1_000, minutes_ago(30)).await;
    let bob = open.resolve("bob", 2_000, minutes_ago(29)).await;
    let ida = open.append("ida", 4_000, minutes_ago(3)).await;
    let jon = open.append("jon", 2_500, minutes_ago(2)).await;
    (open.resolve_appended(jon, "jon", 2_500, minutes_ago(2), false)).await;
    open.commit(false).await;
    let fay = open.append("fay", 3_000, minutes_ago(1)).await;
    // Settled: Eve won over Dan; Hal's bid reached it after its settlement.
    let mut settled = OldAuction::create(&seeding, Era::ByTransaction, Span::minutes(-10)).await;
    let dan = settled.resolve("dan", 700, minutes_ago(20)).await;
    let eve = settled.resolve("eve", 900, minutes_ago(19)).await;
    settled.commit(true).await;
    let hal = settled.append("hal", 5_000, minutes_ago(1)).await;
    // Ending: settled by the new resolver, over Kim's and Lea's outcomes in
    // their rows and Mo's in a batch.
    let mut ending = OldAuction::create(&seeding, Era::ByTransaction, Span::seconds(4)).await;
    let kim = ending.resolve("kim", 1_000, minutes_ago(5)).await;
    let lea = ending.resolve("lea", 1_500, minutes_ago(4)).await;
    ending.commit(false).await;
    let mo = ending.append("mo", 1_200, minutes_ago(1)).await;

    gavel::db::migrate(&url)
        .await
        .expect("the migration applies");
    // Before anything runs, readers see what the old schema said.
    let before = [
        (ann, "outbid"),
        (bob, "outbid"),
        (jon, "leading"),
        (ida, "pending"),
        (fay, "pending"),
        (dan, "lost"),
        (eve, "won"),
        (hal, "pending"),
    ];
    for (id, status) in before {
        assert_eq!(status_of(&db, id).await.0, status, "bid {id} before");
    }

    let app = TestApp::spawn_on(&url, |_| {}).await;
    for auction in [open.id, settled.id] {
        wait_resolved(&db, auction, std::time::Duration::from_secs(20)).await;
        assert_consistent(&db, auction).await;
    }
    let settlement = eventually(std::time::Duration::from_secs(20), "the settlement", || {
        let db = &db;
        async move {
            let row = db
                .query_opt(
                    "SELECT bid_ids, statuses FROM events \
                     WHERE auction_id = $1 AND kind = 'auction.settled'",
                    &[&ending.id],
                )
                .await
                .unwrap()?;
            Some((row.get::<_, Vec<Uuid>>(0), row.get::<_, Vec<String>>(1)))
        }
    })
    .await;
    assert_consistent(&db, ending.id).await;
    let mut expected_settlement = vec![(kim, "lost"), (lea, "won"), (mo, "lost")];
    expected_settlement.sort();
    let found: Vec<(Uuid, &str)> = (settlement.0.iter().copied())
        .zip(settlement.1.iter().map(String::as_str))
        .collect();
    assert_eq!(found, expected_settlement, "every live bid, old and new");
    let expected = [
        (kim, "lost", None),
        (lea, "won", None),
        (mo, "lost", None),
        (ann, "outbid", None),
        (bob, "outbid", None),
        (jon, "outbid", None),
        (ida, "leading", None),
        (fay, "outbid", None),
        (dan, "lost", None),
        (eve, "won", None),
        (hal, "rejected", Some("auction_closed")),
    ];
    assert_statuses(&db, &expected).await;
    // The bids resolved since were not written again: their batches hold
    // their outcomes.
    let rows: Vec<(Uuid, String)> = db
        .query(
            "SELECT b.id, b.status FROM bid_log b \
             WHERE b.id = ANY($1) AND EXISTS (SELECT 1 FROM bid_outcomes o \
                   WHERE o.auction_id = b.auction_id AND b.seq = ANY(o.seqs))",
            &[&vec![ida, fay, hal]],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(
        rows.iter().all(|(_, status)| status == "pending"),
        "{rows:?}"
    );
    // A retry of Ida's request replays her bid with its status now.
    let replay = app.bid("ida", &open.id.to_string(), 4_000, "k-ida").await;
    assert!(replay.status().is_success(), "{}", replay.status());
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let body: serde_json::Value = replay.json().await.unwrap();
    assert_eq!(
        (id_of(&body), body["status"].as_str()),
        (ida, Some("leading"))
    );
    app.stop().await;
}

/// A pending bid and its key as the append wrote them before keys moved
/// into the bid log; returns its id.
async fn append_with_key_row(
    db: &tokio_postgres::Client,
    auction_id: Uuid,
    bidder: &str,
    amount: i64,
    key: &str,
) -> Uuid {
    let id = Uuid::now_v7();
    db.execute(
        "WITH key AS (INSERT INTO idempotency_keys (bidder_id, key, auction_id, amount, bid_id) \
         VALUES ($3, $5, $1, $4, $2) RETURNING bid_id) \
         INSERT INTO bid_log (auction_id, id, bidder_id, amount, idempotency_key, xid) \
         SELECT $1, bid_id, $3, $4, $5, pg_current_xact_id()::text::int8 FROM key",
        &[&auction_id, &id, &bidder, &amount, &key],
    )
    .await
    .unwrap();
    id
}

#[tokio::test]
async fn keys_move_into_the_log_and_old_requests_still_replay() {
    let (url, seeding, db) = database_before(KEYS_IN_LOG).await;
    let auction = OldAuction::create(&seeding, Era::Queue, Span::hours(1))
        .await
        .id;
    let bid = |bidder: &'static str, amount: i64, key: &'static str| {
        append_with_key_row(&db, auction, bidder, amount, key)
    };
    let ann = bid("ann", 1_000, "k-ann").await;
    let bob = bid("bob", 2_000, "k-bob").await;
    // Dan's key was purged after its retention; Cat's was purged, then
    // used again on the same auction, as the old scope allowed.
    let dan = bid("dan", 1_200, "k-dan").await;
    let cat_before = bid("cat", 1_500, "k-cat").await;
    db.execute(
        "DELETE FROM idempotency_keys WHERE key IN ('k-dan', 'k-cat')",
        &[],
    )
    .await
    .unwrap();
    let cat = bid("cat", 3_000, "k-cat").await;

    gavel::db::migrate(&url)
        .await
        .expect("the migration applies");
    let gone = db
        .query_one("SELECT to_regclass('idempotency_keys') IS NULL", &[])
        .await
        .unwrap();
    assert!(gone.get::<_, bool>(0), "the key table is gone");
    let retired: String = db
        .query_one(
            "SELECT idempotency_key FROM bid_log WHERE id = $1",
            &[&cat_before],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        retired.starts_with("k-cat ") && gavel::domain::IdempotencyKey::parse(&retired).is_err(),
        "the older use of a reused key is retired: {retired:?}"
    );

    let app = TestApp::spawn_on(&url, |_| {}).await;
    wait_resolved(&db, auction, std::time::Duration::from_secs(20)).await;
    assert_consistent(&db, auction).await;
    let on = auction.to_string();
    // Retries of the old requests replay their bids, Dan's purged key too.
    for (bidder, amount, key, id) in [
        ("ann", 1_000, "k-ann", ann),
        ("bob", 2_000, "k-bob", bob),
        ("dan", 1_200, "k-dan", dan),
        ("cat", 3_000, "k-cat", cat),
    ] {
        let replay = app.bid(bidder, &on, amount, key).await;
        assert!(replay.status().is_success(), "{key}: {}", replay.status());
        assert_eq!(replay.headers()["idempotent-replayed"], "true", "{key}");
        let body: serde_json::Value = replay.json().await.unwrap();
        assert_eq!(id_of(&body), id, "{key}");
    }
    // An old key with another amount is refused.
    let reused = app.bid("bob", &on, 2_100, "k-bob").await;
    assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem: serde_json::Value = reused.json().await.unwrap();
    assert_eq!(problem["code"], "idempotency_key_reused");
    // New bids are written, once each, and resolved.
    let key = new_key();
    for _ in 0..2 {
        let eve = app.bid("eve", &on, 5_000, &key).await;
        assert!(eve.status().is_success(), "{}", eve.status());
    }
    wait_resolved(&db, auction, std::time::Duration::from_secs(20)).await;
    let bids = assert_consistent(&db, auction).await;
    assert_eq!(bids.len(), 6);
    let leader = bids.iter().find(|b| b.status == "leading").unwrap();
    assert_eq!(leader.bidder_id, "eve");
    app.stop().await;
}
