//! Samples of Gavel's own metrics during a run, read from its admin
//! listener's `/metrics`: lock waiters, blocked backends, pool waiters,
//! pending bids, the process's resident memory and its auction view cache.

use serde::{Deserialize, Serialize};

/// One scrape.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServerSample {
    /// Seconds since the run started.
    pub t: f64,
    /// Backends waiting on a heavyweight lock (`wait_event_type="Lock"`).
    pub lock_waiters: f64,
    /// Backends blocked by another (`gavel_pg_blocked_backends`).
    pub blocked_backends: f64,
    /// The longest current lock wait, in seconds.
    pub lock_wait_max_s: f64,
    /// Requests waiting for an API pool connection.
    pub api_pool_waiting: f64,
    /// Bids waiting for the resolver (sampled by Gavel).
    pub pending_bids: f64,
    /// Gavel's resident memory in bytes, when it exports it.
    pub rss_bytes: Option<f64>,
    /// Auction view reads answered from Gavel's cache so far (a counter).
    #[serde(default)]
    pub view_cache_hits: f64,
    /// Auction view reads that went to the database so far (a counter).
    #[serde(default)]
    pub view_cache_misses: f64,
    /// Gavel's own account of its decisions (counters, but the gauge).
    #[serde(default)]
    pub gavel: Decisions,
}

/// What Gavel decided, from its metrics: counters since it started, and
/// whether it was overloaded at the scrape.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Decisions {
    pub overloaded: f64,
    pub bids_accepted: f64,
    pub bids_refused_at_door: f64,
    pub bids_refused_in_queue: f64,
    pub reads_refused_at_door: f64,
    pub shed_in_flight_limit: f64,
    pub shed_deadline: f64,
    pub http_requests: f64,
}

/// Reads the figures a run reports from a Prometheus text exposition.
pub fn parse(text: &str, t: f64) -> ServerSample {
    let mut sample = ServerSample {
        t,
        ..ServerSample::default()
    };
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels.trim_end_matches('}')),
            None => (series, ""),
        };
        match name {
            "gavel_pg_backends" if labels.contains("wait_event_type=\"Lock\"") => {
                sample.lock_waiters += value;
            }
            "gavel_pg_blocked_backends" => sample.blocked_backends = value,
            "gavel_pg_lock_wait_max_seconds" => sample.lock_wait_max_s = value,
            "gavel_db_pool_waiting_requests" if labels.contains("pool=\"api\"") => {
                sample.api_pool_waiting = value;
            }
            "gavel_resolver_pending_bids" => sample.pending_bids = value,
            "process_resident_memory_bytes" => sample.rss_bytes = Some(value),
            "gavel_auction_cache_total" if labels.contains("result=\"hit\"") => {
                sample.view_cache_hits = value;
            }
            "gavel_auction_cache_total" if labels.contains("result=\"miss\"") => {
                sample.view_cache_misses = value;
            }
            _ => decision(&mut sample.gavel, name, labels, value),
        }
    }
    sample
}

/// Scrapes `url` once.
fn decision(d: &mut Decisions, name: &str, labels: &str, value: f64) {
    let has = |label: &str| labels.contains(label);
    match name {
        "gavel_admission_overloaded" => d.overloaded = value,
        "gavel_bids_accepted_total" => d.bids_accepted = value,
        "gavel_admission_decisions_total" if has("kind=\"bid\"") => {
            if has("decision=\"refused_at_door\"") {
                d.bids_refused_at_door = value;
            } else if has("decision=\"refused_in_queue\"") {
                d.bids_refused_in_queue = value;
            }
        }
        "gavel_admission_decisions_total" if has("decision=\"refused_at_door\"") => {
            d.reads_refused_at_door = value;
        }
        "gavel_http_shed_total" if has("reason=\"in_flight_limit\"") => {
            d.shed_in_flight_limit = value;
        }
        "gavel_http_shed_total" if has("reason=\"deadline\"") => d.shed_deadline = value,
        "gavel_http_requests_total" => d.http_requests += value,
        _ => {}
    }
}

pub async fn scrape(client: &reqwest::Client, url: &str, t: f64) -> anyhow::Result<ServerSample> {
    let text = client
        .get(url)
        .timeout(std::time::Duration::from_secs(2))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(parse(&text, t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gavels_own_decisions_are_read_by_kind() {
        let text = "\
gavel_admission_overloaded 1
gavel_bids_accepted_total 900
gavel_admission_decisions_total{kind=\"bid\",decision=\"admitted\"} 1000
gavel_admission_decisions_total{kind=\"bid\",decision=\"refused_at_door\"} 70
gavel_admission_decisions_total{kind=\"bid\",decision=\"refused_in_queue\"} 5
gavel_admission_decisions_total{kind=\"read\",decision=\"refused_at_door\"} 30
gavel_http_shed_total{reason=\"in_flight_limit\"} 4
gavel_http_shed_total{reason=\"deadline\"} 2
gavel_http_requests_total{method=\"GET\",route=\"/healthz\",status=\"200\"} 10
gavel_http_requests_total{method=\"POST\",route=\"/api/auctions/{id}/bids\",status=\"202\"} 900
";
        let d = parse(text, 1.0).gavel;
        assert_eq!(d.overloaded, 1.0);
        assert_eq!(d.bids_accepted, 900.0);
        assert_eq!(
            (d.bids_refused_at_door, d.bids_refused_in_queue),
            (70.0, 5.0)
        );
        assert_eq!(d.reads_refused_at_door, 30.0);
        assert_eq!((d.shed_in_flight_limit, d.shed_deadline), (4.0, 2.0));
        assert_eq!(d.http_requests, 910.0);
    }

    #[test]
    fn lock_waiters_add_up_over_wait_events() {
        let text = "\
# HELP gavel_pg_backends x
gavel_pg_backends{state=\"active\",wait_event_type=\"Lock\",wait_event=\"tuple\"} 12
gavel_pg_backends{state=\"active\",wait_event_type=\"Lock\",wait_event=\"transactionid\"} 3
gavel_pg_backends{state=\"active\",wait_event_type=\"LWLock\",wait_event=\"BufferContent\"} 2
gavel_pg_blocked_backends 15
gavel_pg_lock_wait_max_seconds 0.49
gavel_db_pool_waiting_requests{pool=\"api\"} 7
gavel_db_pool_waiting_requests{pool=\"resolver\"} 1
gavel_resolver_pending_bids 40
process_resident_memory_bytes 52428800
gavel_auction_cache_total{result=\"hit\"} 90
gavel_auction_cache_total{result=\"miss\"} 10
";
        let s = parse(text, 3.0);
        assert_eq!(s.lock_waiters, 15.0);
        assert_eq!(s.blocked_backends, 15.0);
        assert_eq!(s.lock_wait_max_s, 0.49);
        assert_eq!(s.api_pool_waiting, 7.0);
        assert_eq!(s.pending_bids, 40.0);
        assert_eq!(s.rss_bytes, Some(52_428_800.0));
        assert_eq!((s.view_cache_hits, s.view_cache_misses), (90.0, 10.0));
    }
}
