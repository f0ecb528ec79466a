//! How fresh the clients' screens were: after a run, each version of each
//! auction is given its commit time, and every receipt the run filed
//! ([`crate::receipts`]) is measured against it.
//!
//! The commit time of a version is PostgreSQL's commit timestamp
//! (`track_commit_timestamp = on`, as `gavel-loadtest bench` runs its
//! primary) of the transaction that wrote the event row naming that
//! version (`events.version`). PostgreSQL takes it as the commit record
//! is written, just before the WAL flush that makes the change visible,
//! so a delay counts the flush too. The database and the generator share
//! this machine's clock.
//!
//! - Watchers: commit -> receipt of every version received (each watcher's
//!   first view, the state it connected to, left out).
//! - Readers: the staleness of every answer: 0 when the version shown was
//!   the latest committed as the answer came, else how long before a newer
//!   one had committed.

use std::collections::{BTreeMap, HashMap};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::generator::{RunAuction, RunOutput, WatchCounts, WatchOutput};
use crate::receipts::Seen;
use crate::record::Quantiles;

/// What the watchers received, measured against the commits.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WatchReport {
    /// Watchers held.
    pub watchers: usize,
    /// The auctions watched (labels).
    pub auctions: Vec<String>,
    /// Most streams open at once, as the watchers counted them.
    pub open_max: u32,
    /// Connects, versions received and skipped.
    pub counts: WatchCounts,
    /// Commit -> receipt of every version received that has a commit time.
    pub commit_to_receipt_ms: Quantiles,
    /// The same split in two: the receipts of versions that went to more
    /// than half of their auction's watchers (one version written to every
    /// stream at once: the first change after a lull, the settlement), and
    /// the others.
    #[serde(default)]
    pub fanned_out: Option<FanOut>,
    /// Versions received whose commit time is unknown.
    pub without_commit_time: u64,
    /// Watchers whose last version was the auction's final one, named by
    /// the `end` event and equal to the auction's version in the database.
    pub ended_on_final: usize,
    /// Watchers that got `end` but whose last version was not the final one.
    pub ended_elsewhere: usize,
    /// Watchers that never got `end`.
    pub never_ended: usize,
    /// Why the delays could not be measured, if so.
    #[serde(default)]
    pub note: Option<String>,
}

/// Receipts of versions sent to most watchers at once, and the others.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FanOut {
    /// Versions received by more than half of their auction's watchers.
    pub versions: u64,
    /// Commit -> receipt of their receipts.
    pub to_most_ms: Quantiles,
    /// Commit -> receipt of every other receipt.
    pub others_ms: Quantiles,
}

/// How stale the readers' answers were.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReadFreshness {
    /// Answers that showed a version (`200` or `304`).
    pub answers: u64,
    /// Of those, showing a version a newer one had already replaced.
    pub stale: u64,
    /// Staleness of every answer (0 when it showed the latest version).
    pub staleness_ms: Quantiles,
    /// Why it could not be measured, if so.
    #[serde(default)]
    pub note: Option<String>,
}

/// Each auction's versions with their commit times, in µs since the run's
/// clock origin, and its version in the database after the run.
#[derive(Debug, Default)]
struct Commits {
    versions: Vec<BTreeMap<i64, i64>>,
    finals: Vec<Option<i64>>,
    /// Why there are no commit times, if so.
    missing: Option<String>,
}

impl Commits {
    fn at(&self, auction: usize, version: i64) -> Option<i64> {
        self.versions.get(auction)?.get(&version).copied()
    }

    /// When the first version after `version` committed.
    fn replaced_at(&self, auction: usize, version: i64) -> Option<i64> {
        let later = self.versions.get(auction)?.range(version + 1..).next();
        later.map(|(_, &at)| at)
    }
}

/// Measures the run's watchers and readers against the commits recorded
/// in the database at `database_url` (after the audit: every auction
/// settled).
pub async fn measure(
    database_url: &str,
    output: &RunOutput,
) -> anyhow::Result<(Option<WatchReport>, Option<ReadFreshness>)> {
    if output.watchers.is_none() && output.seen.is_empty() {
        return Ok((None, None));
    }
    let commits = commits(database_url, &output.auctions, output.origin_at).await?;
    let watchers = (output.watchers.as_ref()).map(|w| watch_report(w, &output.auctions, &commits));
    let readers = (!output.seen.is_empty()).then(|| read_freshness(&output.seen, &commits));
    Ok((watchers, readers))
}

async fn commits(
    database_url: &str,
    auctions: &[RunAuction],
    origin: DateTime<Utc>,
) -> anyhow::Result<Commits> {
    let (db, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls)
        .await
        .context("connecting to the database to read commit times")?;
    tokio::spawn(connection);
    let ids: Vec<Uuid> = auctions.iter().map(|a| a.id).collect();
    let index: HashMap<Uuid, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let mut commits = Commits {
        versions: vec![BTreeMap::new(); ids.len()],
        finals: vec![None; ids.len()],
        missing: None,
    };
    for row in db
        .query(
            "SELECT id, version FROM auctions WHERE id = ANY($1)",
            &[&ids],
        )
        .await?
    {
        commits.finals[index[&row.get::<_, Uuid>(0)]] = Some(row.get(1));
    }
    let tracked: String = db
        .query_one("SELECT current_setting('track_commit_timestamp')", &[])
        .await?
        .get(0);
    if tracked != "on" {
        commits.missing =
            Some("no commit times: the database runs with track_commit_timestamp off".into());
        return Ok(commits);
    }
    // xid8 to xid: the low 32 bits, which is what a transaction id is.
    let rows = db
        .query(
            "SELECT DISTINCT auction_id, version, pg_xact_commit_timestamp( \
                      ((xid::text::numeric % 4294967296)::text)::xid) \
             FROM events WHERE auction_id = ANY($1) AND version IS NOT NULL",
            &[&ids],
        )
        .await?;
    for row in rows {
        let Some(at) = row.get::<_, Option<DateTime<Utc>>>(2) else {
            continue;
        };
        let us = (at - origin).num_microseconds().unwrap_or(i64::MAX);
        commits.versions[index[&row.get::<_, Uuid>(0)]].insert(row.get(1), us);
    }
    Ok(commits)
}

/// A histogram of delays in µs, up to an hour.
fn delays() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

fn watch_report(w: &WatchOutput, auctions: &[RunAuction], commits: &Commits) -> WatchReport {
    let mut received: HashMap<(usize, i64), u64> = HashMap::new();
    w.receipts.each(|auction, version, _, n| {
        *received.entry((auction, version)).or_default() += n;
    });
    let watchers_each = (w.count / w.auctions.len().max(1)) as u64;
    let to_most = |auction, version| received[&(auction, version)] * 2 > watchers_each;
    let (mut histogram, mut most, mut others) = (delays(), delays(), delays());
    let mut without = 0;
    w.receipts.each(
        |auction, version, at_us, n| match commits.at(auction, version) {
            Some(committed) => {
                let delay = (at_us as i64 - committed).clamp(1, 3_600_000_000) as u64;
                histogram.saturating_record_n(delay, n);
                let part = if to_most(auction, version) {
                    &mut most
                } else {
                    &mut others
                };
                part.saturating_record_n(delay, n);
            }
            None => without += n,
        },
    );
    let fanned_out = FanOut {
        versions: (received.iter())
            .filter(|(&(a, v), _)| to_most(a, v))
            .count() as u64,
        to_most_ms: Quantiles::of(&most),
        others_ms: Quantiles::of(&others),
    };
    let mut report = WatchReport {
        watchers: w.count,
        auctions: (w.auctions.iter())
            .map(|&i| auctions[i].label.clone())
            .collect(),
        open_max: w.open_by_second.iter().copied().max().unwrap_or(0),
        counts: w.counts.clone(),
        commit_to_receipt_ms: Quantiles::of(&histogram),
        fanned_out: Some(fanned_out),
        without_commit_time: without,
        note: commits.missing.clone(),
        ..WatchReport::default()
    };
    for end in &w.endings {
        let last_is_end = end.end.is_some() && end.last == end.end;
        match end.end {
            None => report.never_ended += 1,
            Some(_) if last_is_end && end.end == commits.finals[end.auction] => {
                report.ended_on_final += 1
            }
            Some(_) => report.ended_elsewhere += 1,
        }
    }
    report
}

fn read_freshness(seen: &[Seen], commits: &Commits) -> ReadFreshness {
    let mut histogram = delays();
    let mut stale = 0;
    for s in seen {
        let replaced = commits.replaced_at(s.auction as usize, s.version);
        let behind = replaced.map_or(0, |at| s.at_us as i64 - at);
        if behind > 0 {
            stale += 1;
            histogram.saturating_record(behind.min(3_600_000_000) as u64);
        } else {
            histogram.saturating_record(0);
        }
    }
    ReadFreshness {
        answers: seen.len() as u64,
        stale,
        staleness_ms: Quantiles::of(&histogram),
        note: commits.missing.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::receipts::Receipts;

    #[test]
    fn an_answer_is_stale_from_the_commit_of_the_version_that_replaced_it() {
        let commits = Commits {
            versions: vec![BTreeMap::from([(4, 1_000), (5, 2_000), (7, 9_000)])],
            finals: vec![Some(7)],
            missing: None,
        };
        let seen = |version, at_us| Seen {
            auction: 0,
            version,
            at_us,
        };
        let fresh = read_freshness(&[seen(5, 2_500), seen(7, 10_000)], &commits);
        assert_eq!((fresh.answers, fresh.stale), (2, 0));
        let stale = read_freshness(&[seen(4, 3_000), seen(5, 10_000)], &commits);
        assert_eq!(stale.stale, 2);
        // 3,000 - 2,000 and 10,000 - 9,000 µs.
        assert!((stale.staleness_ms.max - 1.0).abs() < 0.01, "{stale:?}");
    }

    #[test]
    fn receipts_of_a_version_sent_to_most_watchers_are_told_apart() {
        let commits = Commits {
            versions: vec![BTreeMap::from([(2, 1_000), (3, 2_000)])],
            finals: vec![Some(3)],
            missing: None,
        };
        let receipts = Receipts::new(1);
        // Version 2 reaches one watcher of four after 1 ms; version 3
        // reaches all four after 10 to 40 ms.
        receipts.record(0, 2, 2_000);
        for i in 1..=4 {
            receipts.record(0, 3, 2_000 + i * 10_000);
        }
        let output = WatchOutput {
            count: 4,
            auctions: vec![0],
            receipts,
            counts: WatchCounts::default(),
            endings: Vec::new(),
            events_by_second: Vec::new(),
            open_by_second: Vec::new(),
        };
        let auction = RunAuction {
            id: Uuid::nil(),
            label: "hot".into(),
            ends_at: Utc::now(),
            max_end_at: Utc::now(),
        };
        let report = watch_report(&output, &[auction], &commits);
        let fan_out = report.fanned_out.unwrap();
        assert_eq!(fan_out.versions, 1);
        assert_eq!((fan_out.to_most_ms.count, fan_out.others_ms.count), (4, 1));
        assert!((fan_out.others_ms.max - 1.0).abs() < 0.1, "{fan_out:?}");
        assert!(fan_out.to_most_ms.p50 >= 10.0, "{fan_out:?}");
    }
}
