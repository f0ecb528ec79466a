//! The audit after every run, read from the database: every bid answered
//! 2xx is in the bid log exactly once as sent, nothing refused, unsent or
//! repeated is there, every bid has its outcome once the auctions settle,
//! and Gavel's pure rules replayed over each auction's log give its state.
//! It also measures every bid's resolver lag, which no client can see.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use deadpool_postgres::Runtime;
use serde::{Deserialize, Serialize};
use tokio_postgres::NoTls;
use uuid::Uuid;

use crate::generator::{Fate, RunAuction, SentBid};
use crate::record::Quantiles;
use gavel::db::{auctions, bids};
use gavel::rules::{self, AuctionState, AuctionTerms, BidInput, Leader, Outcome};

/// How long the audit waits for the resolver to finish and ended auctions
/// to settle after a run.
pub const SETTLE_PATIENCE: Duration = Duration::from_secs(120);

/// Auctions ending within this long after a run are waited for to settle.
pub const SETTLE_HORIZON: Duration = Duration::from_secs(30);

/// At most this many problems of one kind are listed.
const LISTED: usize = 5;

/// What the audit found.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AuditReport {
    /// Whether every check passed.
    pub passed: bool,
    /// Bids the generator sent.
    pub bids_sent: u64,
    /// Of those, answered 2xx.
    pub bids_acknowledged: u64,
    /// Rows in `bid_log` for the run's auctions.
    pub bids_in_log: u64,
    /// Bids whose fate the client could not know (timeouts, 5xx) that
    /// turned out to be in the log.
    pub unknown_fate_in_log: u64,
    /// One line per check: what it checked and what it found.
    pub checks: Vec<Check>,
    /// Resolver lag of every bid: `resolved_at - received_at`.
    pub resolver_lag_ms: Quantiles,
    /// How long settling took after the last auction's end.
    pub settle_wait_s: f64,
}

/// One check.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it held.
    pub passed: bool,
    /// Figures, or the first problems found.
    pub detail: String,
}

struct LogRow {
    auction_id: Uuid,
    id: Uuid,
    bidder_id: String,
    amount: i64,
    key: String,
    received_at: DateTime<Utc>,
    status: String,
    reason: Option<String>,
    price_after: Option<i64>,
    resolution_no: Option<i64>,
    resolved_at: Option<DateTime<Utc>>,
    /// The auction's version the bid's resolution batch wrote: one per batch.
    resolved_version: Option<i64>,
}

/// Waits until the run's bids are resolved and its ended auctions
/// settled, then audits.
pub async fn audit(
    database_url: &str,
    auctions: &[RunAuction],
    sent: &[SentBid],
    settle_timeout: Duration,
) -> anyhow::Result<AuditReport> {
    let mut config = deadpool_postgres::Config::new();
    config.url = Some(database_url.to_owned());
    config.application_name = Some("gavel-loadtest-audit".into());
    let pool = config
        .create_pool(Some(Runtime::Tokio1), NoTls)
        .context("the audit's database URL")?;
    let client = pool
        .get()
        .await
        .context("connecting to the database for the audit")?;
    let ids: Vec<Uuid> = auctions.iter().map(|a| a.id).collect();

    let settle_wait_s = wait_for_settlement(&client, &ids, settle_timeout).await?;
    let log = read_log(&client, &ids).await?;
    let mut report = AuditReport {
        bids_sent: sent.len() as u64,
        bids_acknowledged: sent
            .iter()
            .filter(|b| matches!(b.fate, Fate::Acked(_)))
            .count() as u64,
        bids_in_log: log.len() as u64,
        settle_wait_s,
        ..AuditReport::default()
    };
    check_acknowledged(&mut report, auctions, sent, &log);
    let records = read_auctions(&client, auctions).await?;
    let closed: HashSet<Uuid> = records
        .iter()
        .filter(|r| r.state.closed)
        .map(|r| r.id)
        .collect();
    check_outcomes(&mut report, &log, &closed);
    check_unresolved(&mut report, &log, &read_unresolved(&client, &ids).await?);
    for (auction, record) in auctions.iter().zip(&records) {
        let bids: Vec<&LogRow> = log.iter().filter(|r| r.auction_id == auction.id).collect();
        report.checks.push(replay(&auction.label, record, &bids));
    }
    report.resolver_lag_ms = resolver_lag(&log);
    report.passed = report.checks.iter().all(|c| c.passed);
    Ok(report)
}

/// Whether the schema records outcomes per resolver batch, each bid's
/// status derived by the `bids` view (another build under test may
/// predate it and keep statuses in `bid_log`).
const OUTCOMES_PER_BATCH: &str = "SELECT to_regclass('bid_outcomes') IS NOT NULL";

/// Where a bid's status is read on the schema under test: the `bids` view,
/// or `bid_log` on a schema before it.
async fn bids_relation(client: &tokio_postgres::Client) -> anyhow::Result<&'static str> {
    let per_batch: bool = client.query_one(OUTCOMES_PER_BATCH, &[]).await?.get(0);
    Ok(if per_batch { "bids" } else { "bid_log" })
}

/// The run's auctions' bids, each auction's in resolution order.
async fn read_log(client: &tokio_postgres::Client, ids: &[Uuid]) -> anyhow::Result<Vec<LogRow>> {
    let relation = bids_relation(client).await?;
    let rows = client
        .query(
            &format!(
                "SELECT auction_id, id, bidder_id, amount, idempotency_key, received_at, status, \
                        reason, price_after, resolution_no, resolved_at, resolved_version \
                 FROM {relation} WHERE auction_id = ANY($1) ORDER BY auction_id, resolution_no, seq"
            ),
            &[&ids],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| LogRow {
            auction_id: r.get(0),
            id: r.get(1),
            bidder_id: r.get(2),
            amount: r.get(3),
            key: r.get(4),
            received_at: r.get(5),
            status: r.get(6),
            reason: r.get(7),
            price_after: r.get(8),
            resolution_no: r.get(9),
            resolved_at: r.get(10),
            resolved_version: r.get(11),
        })
        .collect())
}

/// Each of the run's auctions as Gavel stores it, in order.
async fn read_auctions(
    client: &deadpool_postgres::Client,
    auctions: &[RunAuction],
) -> anyhow::Result<Vec<auctions::AuctionRecord>> {
    let mut records = Vec::with_capacity(auctions.len());
    for auction in auctions {
        let record = auctions::get(client, auction.id)
            .await?
            .with_context(|| format!("the auction {} is gone", auction.id))?;
        records.push(record);
    }
    Ok(records)
}

/// The bids of the run's auctions that the resolver still finds: those
/// its progress through each auction has not passed (see
/// `gavel::db::bids::Progress`), or, on a schema that keeps statuses in
/// `bid_log` (another build under test), those still `pending` there.
async fn read_unresolved(
    client: &tokio_postgres::Client,
    ids: &[Uuid],
) -> anyhow::Result<HashSet<Uuid>> {
    Ok(client
        .query(&unresolved_sql(client).await?, &[&ids])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// The statement selecting the `id` of every bid still to resolve among
/// the auctions `$1` (see [`read_unresolved`]).
async fn unresolved_sql(client: &tokio_postgres::Client) -> anyhow::Result<String> {
    Ok(match bids_relation(client).await? {
        "bids" => format!(
            "SELECT p.id FROM auctions a CROSS JOIN LATERAL {} p WHERE a.id = ANY($1)",
            bids::unresolved("id")
        ),
        _ => "SELECT id FROM bid_log WHERE auction_id = ANY($1) AND status = 'pending'".into(),
    })
}

/// Audits what a run sent, waiting at most [`SETTLE_PATIENCE`].
pub async fn audit_run(
    database_url: &str,
    output: &crate::generator::RunOutput,
) -> anyhow::Result<AuditReport> {
    eprintln!("auditing the database ...");
    audit(
        database_url,
        &output.auctions,
        &output.sent,
        SETTLE_PATIENCE,
    )
    .await
}

/// Seconds waited until nothing is pending and every auction that ends
/// within [`SETTLE_HORIZON`] has settled. An auction that ends later (a
/// rate-finding run that stopped early) is audited as it stands.
async fn wait_for_settlement(
    client: &tokio_postgres::Client,
    ids: &[Uuid],
    timeout: Duration,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut last_said = Instant::now();
    let sql = format!(
        "SELECT (SELECT count(*) FROM auctions \
                 WHERE id = ANY($1) AND status <> 'closed' \
                   AND ends_at < now() + make_interval(secs => $2)), \
                (SELECT count(*) FROM ({}) p), \
                (SELECT max(ends_at) FROM auctions WHERE id = ANY($1) AND status <> 'closed')",
        unresolved_sql(client).await?
    );
    loop {
        let row = client
            .query_one(&sql, &[&ids, &SETTLE_HORIZON.as_secs_f64()])
            .await?;
        let (open, pending): (i64, i64) = (row.get(0), row.get(1));
        if open == 0 && pending == 0 {
            return Ok(started.elapsed().as_secs_f64());
        }
        anyhow::ensure!(
            started.elapsed() < timeout,
            "the auctions did not settle within {timeout:?}: {open} not closed, {pending} bids pending"
        );
        if last_said.elapsed() >= Duration::from_secs(5) {
            let ends: Option<DateTime<Utc>> = row.get(2);
            eprintln!(
                "  waiting for settlement: {open} auctions to close (last end {}), {pending} bids pending",
                ends.map_or("-".into(), |e| e.format("%H:%M:%S").to_string())
            );
            last_said = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn listing<T: std::fmt::Display>(problems: &[T]) -> String {
    let mut text = problems
        .iter()
        .take(LISTED)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    if problems.len() > LISTED {
        text.push_str(&format!("; and {} more", problems.len() - LISTED));
    }
    text
}

fn check(report: &mut AuditReport, name: &str, problems: Vec<String>, fine: String) {
    report.checks.push(Check {
        name: name.to_owned(),
        passed: problems.is_empty(),
        detail: if problems.is_empty() {
            fine
        } else {
            format!("{} problems: {}", problems.len(), listing(&problems))
        },
    });
}

/// The run's rows of `bid_log` by auction, bidder and Idempotency-Key (a
/// key's scope).
type RowsByKey<'a> = HashMap<(Uuid, &'a str, &'a str), Vec<&'a LogRow>>;

/// Every bid sent against the log: acknowledged ones there once each,
/// refused and unsent ones absent, none there twice or never sent.
fn check_acknowledged(
    report: &mut AuditReport,
    auctions: &[RunAuction],
    sent: &[SentBid],
    log: &[LogRow],
) {
    let mut by_key: RowsByKey = HashMap::new();
    for row in log {
        by_key
            .entry((row.auction_id, row.bidder_id.as_str(), row.key.as_str()))
            .or_default()
            .push(row);
    }
    let found = FatesInLog::of(auctions, sent, &by_key);
    report.unknown_fate_in_log = found.unknown_in_log;
    check(
        report,
        "every bid answered 2xx is in bid_log exactly once, as sent",
        found.lost,
        format!(
            "{} acknowledged bids found once each",
            report.bids_acknowledged
        ),
    );
    let (twice, phantom) = twice_or_never_sent(auctions, sent, &by_key);
    check(
        report,
        "no bid is in bid_log twice (one row per auction, bidder and Idempotency-Key)",
        twice,
        format!("{} rows, {} distinct keys", log.len(), by_key.len()),
    );
    let mut refused_in_log = found.refused_in_log;
    refused_in_log.extend(phantom);
    check(
        report,
        "no refused or unsent bid is in bid_log",
        refused_in_log,
        format!(
            "{} bids refused by the API or never sent are absent; {} bids of unknown fate (timeouts, 5xx) were in the log",
            sent.iter()
                .filter(|b| matches!(b.fate, Fate::Refused(_) | Fate::NotSent))
                .count(),
            found.unknown_in_log
        ),
    );
}

/// What the log holds of each bid sent, against what its client knows.
struct FatesInLog {
    /// Acknowledged bids not in the log once as sent, and bids of unknown
    /// fate in it otherwise than sent.
    lost: Vec<String>,
    /// Refused or unsent bids that are in the log.
    refused_in_log: Vec<String>,
    /// Bids of unknown fate in the log once, as sent.
    unknown_in_log: u64,
}

impl FatesInLog {
    fn of(auctions: &[RunAuction], sent: &[SentBid], by_key: &RowsByKey) -> Self {
        let mut found = FatesInLog {
            lost: Vec::new(),
            refused_in_log: Vec::new(),
            unknown_in_log: 0,
        };
        for bid in sent {
            let key = (
                auctions[bid.auction].id,
                bid.bidder.as_str(),
                bid.key.as_str(),
            );
            let rows = by_key.get(&key).map_or(&[][..], Vec::as_slice);
            let as_sent = |r: &&LogRow| r.amount == bid.amount;
            match &bid.fate {
                Fate::Acked(id) => {
                    if !(rows.len() == 1 && rows[0].id == *id && as_sent(&rows[0])) {
                        found.lost.push(format!(
                            "bid {id} (key {}) answered 2xx has {} matching rows",
                            bid.key,
                            rows.iter().filter(|r| r.id == *id && as_sent(r)).count()
                        ));
                    }
                }
                Fate::Refused(code) => {
                    if !rows.is_empty() {
                        found.refused_in_log.push(format!(
                            "key {} was refused {code} but is in the log",
                            bid.key
                        ));
                    }
                }
                Fate::NotSent => {
                    if !rows.is_empty() {
                        found
                            .refused_in_log
                            .push(format!("key {} was never sent but is in the log", bid.key));
                    }
                }
                Fate::Unknown => match rows {
                    [] => {}
                    [row] if as_sent(row) => found.unknown_in_log += 1,
                    // More than one row is caught by the duplicate check.
                    [row] => found.lost.push(format!(
                        "bid {} (key {}) is in the log with another amount than sent",
                        row.id, bid.key
                    )),
                    _ => {}
                },
            }
        }
        found
    }
}

/// Keys with more than one row in the log, and rows the generator never sent.
fn twice_or_never_sent(
    auctions: &[RunAuction],
    sent: &[SentBid],
    by_key: &RowsByKey,
) -> (Vec<String>, Vec<String>) {
    let sent_keys: HashSet<(Uuid, &str, &str)> = sent
        .iter()
        .map(|b| (auctions[b.auction].id, b.bidder.as_str(), b.key.as_str()))
        .collect();
    let mut twice = Vec::new();
    let mut phantom = Vec::new();
    for (key, rows) in by_key {
        if rows.len() > 1 {
            twice.push(format!(
                "{} rows for auction {} bidder {} key {}",
                rows.len(),
                key.0,
                key.1,
                key.2
            ));
        }
        if !sent_keys.contains(key) {
            phantom.push(format!(
                "bid {} (auction {}, bidder {}, key {}) was never sent",
                rows[0].id, key.0, key.1, key.2
            ));
        }
    }
    (twice, phantom)
}

fn check_outcomes(report: &mut AuditReport, log: &[LogRow], closed: &HashSet<Uuid>) {
    let problems: Vec<String> = log
        .iter()
        .filter(|r| {
            let fine = if closed.contains(&r.auction_id) {
                matches!(r.status.as_str(), "won" | "lost" | "rejected")
            } else {
                matches!(r.status.as_str(), "leading" | "outbid" | "rejected")
            };
            !fine || r.resolution_no.is_none()
        })
        .map(|r| format!("bid {} is {}", r.id, r.status))
        .collect();
    let mut by_status: HashMap<&str, u64> = HashMap::new();
    for r in log {
        *by_status.entry(r.status.as_str()).or_default() += 1;
    }
    let mut counts: Vec<_> = by_status.into_iter().collect();
    counts.sort();
    check(
        report,
        "every bid has a final outcome once its auction settled",
        problems,
        counts
            .iter()
            .map(|(s, n)| format!("{n} {s}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
}

/// The resolver still finds exactly the bids still pending (none is behind
/// its auction's progress, where it would never be resolved), and no two
/// bids of an auction share a place in its resolution order.
fn check_unresolved(report: &mut AuditReport, log: &[LogRow], found: &HashSet<Uuid>) {
    let mut problems: Vec<String> = log
        .iter()
        .filter(|r| (r.status == "pending") != found.contains(&r.id))
        .map(|r| {
            if r.status == "pending" {
                format!("pending bid {} is behind its auction's progress", r.id)
            } else {
                format!("{} bid {} is still to resolve", r.status, r.id)
            }
        })
        .collect();
    let logged: HashSet<Uuid> = log.iter().map(|r| r.id).collect();
    problems.extend(
        found
            .difference(&logged)
            .map(|id| format!("bid {id} still to resolve is not in the run's log")),
    );
    let mut places = HashSet::new();
    problems.extend(
        log.iter()
            .filter_map(|r| r.resolution_no.map(|no| (r, no)))
            .filter(|(r, no)| !places.insert((r.auction_id, *no)))
            .map(|(r, no)| format!("bid {} repeats resolution number {no}", r.id)),
    );
    check(
        report,
        "the resolver finds exactly the pending bids; resolution numbers are unique",
        problems,
        format!(
            "{} still to resolve, {} resolution numbers distinct",
            found.len(),
            places.len()
        ),
    );
}

/// Replays the rules over one auction's bids in resolution order and
/// compares every outcome and the final state.
fn replay(label: &str, record: &auctions::AuctionRecord, bids: &[&LogRow]) -> Check {
    let terms = &record.terms;
    let mut state = AuctionState::opening(record.original_ends_at);
    let mut problems = Vec::new();
    let accepted = replay_bids(terms, &mut state, bids, &mut problems);
    // An auction still running (it ends after the run) is compared unsettled.
    let winner = if record.state.closed {
        rules::settle(terms, &mut state)
    } else {
        None
    };
    compare_auction_row(record, &state, winner.as_ref(), bids.len(), &mut problems);
    compare_accepted(&state, winner.as_ref(), &accepted, &mut problems);
    Check {
        name: format!(
            "auction {label}: the rules replayed over bid_log give its {} state",
            if state.closed { "final" } else { "current" }
        ),
        passed: problems.is_empty(),
        detail: if problems.is_empty() {
            let batches: HashSet<i64> = bids.iter().filter_map(|b| b.resolved_version).collect();
            format!(
                "{} bids replayed, resolved in {} batches; price {}, {} accepted, winner {}",
                bids.len(),
                batches.len(),
                state.price.map_or("-".into(), |p| p.to_string()),
                state.bid_count,
                winner.map_or("none".into(), |w| w.bidder_id)
            )
        } else {
            format!("{} problems: {}", problems.len(), listing(&problems))
        },
    }
}

/// Applies the rules to `bids` in order, noting where the log disagrees;
/// returns the bids the rules accepted. Stops at a gap in the resolution
/// numbers (what follows it cannot be compared).
fn replay_bids<'a>(
    terms: &AuctionTerms,
    state: &mut AuctionState,
    bids: &[&'a LogRow],
    problems: &mut Vec<String>,
) -> Vec<&'a LogRow> {
    let mut accepted = Vec::new();
    for (i, bid) in bids.iter().enumerate() {
        let expected_no = i as i64 + 1;
        if bid.resolution_no != Some(expected_no) {
            problems.push(format!(
                "resolution_no {:?} where {expected_no} was due (bid {})",
                bid.resolution_no, bid.id
            ));
            break;
        }
        let applied = rules::apply_bid(
            terms,
            state,
            &BidInput {
                id: bid.id,
                bidder_id: bid.bidder_id.clone(),
                amount: bid.amount,
                received_at: bid.received_at,
            },
        );
        match applied.outcome {
            Outcome::Rejected(reason) => {
                if bid.status != "rejected" || bid.reason.as_deref() != Some(reason.as_str()) {
                    problems.push(format!(
                        "bid #{expected_no} {}: the rules reject it ({reason}), the log says {} {:?}",
                        bid.id, bid.status, bid.reason
                    ));
                }
            }
            Outcome::Leading | Outcome::Outbid => {
                if bid.status == "rejected" {
                    problems.push(format!(
                        "bid #{expected_no} {}: the rules accept it, the log rejects it ({:?})",
                        bid.id, bid.reason
                    ));
                }
                accepted.push(*bid);
            }
        }
        if bid.price_after != applied.price_after {
            problems.push(format!(
                "bid #{expected_no} {}: price after {:?} by the rules, {:?} in the log",
                bid.id, applied.price_after, bid.price_after
            ));
        }
    }
    accepted
}

/// The auction row against the replayed state: leader, price, bid count,
/// end, whether closed, winner and how many bids were resolved.
fn compare_auction_row(
    record: &auctions::AuctionRecord,
    state: &AuctionState,
    winner: Option<&Leader>,
    bids: usize,
    problems: &mut Vec<String>,
) {
    let stored = &record.state;
    if stored.leader != state.leader
        || stored.price != state.price
        || stored.bid_count != state.bid_count
        || stored.ends_at != state.ends_at
        || stored.closed != state.closed
    {
        problems.push(format!(
            "final state differs: rules {:?}, auction row {:?}",
            state, stored
        ));
    }
    if record.winner_id != winner.map(|w| w.bidder_id.clone()) {
        problems.push(format!(
            "winner: rules {:?}, auction row {:?}",
            winner.map(|w| &w.bidder_id),
            record.winner_id
        ));
    }
    if record.resolved_count != bids as i64 {
        problems.push(format!(
            "resolved_count {} but {} bids in the log",
            record.resolved_count, bids
        ));
    }
}

/// Every accepted bid's status against the one the replay gives it.
fn compare_accepted(
    state: &AuctionState,
    winner: Option<&Leader>,
    accepted: &[&LogRow],
    problems: &mut Vec<String>,
) {
    for bid in accepted {
        let due = match (winner, &state.leader) {
            _ if !state.closed => {
                if state.leader.as_ref().is_some_and(|l| l.bid_id == bid.id) {
                    "leading"
                } else {
                    "outbid"
                }
            }
            (Some(w), _) if w.bid_id == bid.id => "won",
            _ => "lost",
        };
        if bid.status != due {
            problems.push(format!(
                "bid {} is {}, the rules say {due}",
                bid.id, bid.status
            ));
        }
    }
}

fn resolver_lag(log: &[LogRow]) -> Quantiles {
    let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)
        .expect("valid histogram bounds");
    for r in log {
        if let Some(resolved) = r.resolved_at {
            let us = (resolved - r.received_at)
                .num_microseconds()
                .unwrap_or(i64::MAX);
            h.saturating_record(us.clamp(1, 3_600_000_000) as u64);
        }
    }
    Quantiles::of(&h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(auction_id: Uuid, status: &str, resolution_no: Option<i64>) -> LogRow {
        LogRow {
            auction_id,
            id: Uuid::now_v7(),
            bidder_id: "bidder".into(),
            amount: 1_000,
            key: Uuid::new_v4().to_string(),
            received_at: Utc::now(),
            status: status.into(),
            reason: None,
            price_after: None,
            resolution_no,
            resolved_at: None,
            resolved_version: resolution_no,
        }
    }

    #[test]
    fn a_key_is_one_row_per_auction() {
        let auctions: Vec<RunAuction> = (0..2)
            .map(|i| RunAuction {
                id: Uuid::now_v7(),
                label: format!("warm-{i}"),
                ends_at: Utc::now(),
                max_end_at: Utc::now(),
            })
            .collect();
        let sent: Vec<SentBid> = (0..2)
            .map(|auction| SentBid {
                key: "k".into(),
                bidder: "bidder".into(),
                auction,
                amount: 1_000,
                offset_ms: 0,
                fate: Fate::Unknown,
            })
            .collect();
        let log: Vec<LogRow> = [0, 1, 1]
            .iter()
            .map(|&a| LogRow {
                key: "k".into(),
                ..row(auctions[a].id, "leading", Some(1))
            })
            .collect();
        let mut by_key: RowsByKey = HashMap::new();
        for row in &log {
            let key = (row.auction_id, row.bidder_id.as_str(), row.key.as_str());
            by_key.entry(key).or_default().push(row);
        }
        let (twice, phantom) = twice_or_never_sent(&auctions, &sent, &by_key);
        assert!(phantom.is_empty(), "{phantom:?}");
        assert_eq!(twice.len(), 1, "only the second auction's key: {twice:?}");
        assert!(twice[0].contains(&auctions[1].id.to_string()));
    }

    #[test]
    fn the_unresolved_check_flags_strays_gaps_and_repeated_resolution_numbers() {
        let auction = Uuid::now_v7();
        let mut log = vec![
            row(auction, "leading", Some(1)),
            row(auction, "pending", None),
            row(Uuid::now_v7(), "outbid", Some(1)),
        ];
        let mut fine = AuditReport::default();
        check_unresolved(&mut fine, &log, &HashSet::from([log[1].id]));
        assert!(fine.checks[0].passed, "{:?}", fine.checks[0]);

        let stray = Uuid::now_v7();
        let mut bad = AuditReport::default();
        log.push(row(auction, "outbid", Some(1)));
        check_unresolved(&mut bad, &log, &HashSet::from([log[0].id, stray]));
        let detail = &bad.checks[0].detail;
        assert!(!bad.checks[0].passed);
        assert!(detail.contains(&format!("leading bid {} is still to resolve", log[0].id)));
        let gap = format!("pending bid {} is behind its auction's progress", log[1].id);
        assert!(detail.contains(&gap));
        assert!(detail.contains(&format!(
            "bid {stray} still to resolve is not in the run's log"
        )));
        assert!(detail.contains("repeats resolution number 1"), "{detail}");
    }
}
