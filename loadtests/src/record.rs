//! What a run measured: per-second counts and HDR latency histograms for
//! bids and reads, and the totals behind the summary.
//!
//! A request is filed under the second it was *meant* to be sent in, and
//! its latency runs from that intended instant to its final answer
//! (retries included): a stalled server shows as latency in the seconds it
//! stalled, never as fewer requests (no coordinated omission). Completed
//! requests are also counted by the second they finished in, which is the
//! throughput the server delivered.
//!
//! Each attempt is also timed on its own, from when it was due (the first
//! at the request's intended instant, a retry when its wait ended), by how
//! it was answered: what the server took to accept or refuse, apart from
//! the waits its `Retry-After` asked for.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency a histogram tracks, in microseconds (longer is clamped).
const MAX_LATENCY_US: u64 = 300_000_000;

/// Bids or reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// `POST /api/auctions/{id}/bids`.
    Bid,
    /// `GET /api/auctions/{id}`.
    Read,
}

/// How a request ended, after its retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// 2xx, or 304 for a conditional read.
    Ok,
    /// A 4xx: the server refused it on purpose (`code` from the problem body).
    Refused(String),
    /// A 5xx (`code` from the problem body, or the status).
    ServerError(String),
    /// No answer within the client timeout.
    Timeout,
    /// The connection failed.
    Transport,
}

impl Ending {
    /// Whether this counts against the service (5xx, timeouts, transport).
    pub fn is_error(&self) -> bool {
        matches!(
            self,
            Ending::ServerError(_) | Ending::Timeout | Ending::Transport
        )
    }

    fn label(&self) -> String {
        match self {
            Ending::Ok => "ok".into(),
            Ending::Refused(code) => format!("4xx {code}"),
            Ending::ServerError(code) => format!("5xx {code}"),
            Ending::Timeout => "timeout".into(),
            Ending::Transport => "transport error".into(),
        }
    }
}

/// Why a request that could have been retried was not ([`crate::retry`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Withheld {
    /// The clients' retry budget was spent.
    Budget,
    /// The server's `Retry-After` was longer than the clients wait.
    RetryAfterOverCap,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

fn coarse_histogram() -> Histogram<u32> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 2).expect("valid histogram bounds")
}

/// How one request ended.
#[derive(Debug, Clone)]
pub struct Ended<'a> {
    /// Bid or read.
    pub kind: Kind,
    /// The second of the run it was meant to be sent in.
    pub sent_s: usize,
    /// The second of the run it ended in.
    pub done_s: usize,
    /// From its intended send time to its final answer.
    pub latency: Duration,
    /// Attempts made (1 when it was not retried).
    pub attempts: u32,
    /// How it ended.
    pub ending: &'a Ending,
    /// Whether the answer was an idempotent replay.
    pub replayed: bool,
    /// A retry the client did not make, and why (it ended with its last answer).
    pub withheld: Option<Withheld>,
}

/// One stream's figures for one second.
#[derive(Clone)]
struct StreamSecond {
    offered: u64,
    ok: u64,
    refused: u64,
    errors: u64,
    completed_ok: u64,
    retries: u64,
    ok_latency: Histogram<u32>,
}

impl StreamSecond {
    fn new() -> Self {
        StreamSecond {
            offered: 0,
            ok: 0,
            refused: 0,
            errors: 0,
            completed_ok: 0,
            retries: 0,
            ok_latency: coarse_histogram(),
        }
    }
}

/// How one attempt was answered, for its own latency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answered {
    /// 2xx, or 304 for a conditional read.
    Ok,
    /// `503`: refused for overload.
    Unavailable,
    /// Anything else: another status, a timeout, a failed connection.
    Otherwise,
}

/// One stream's totals.
struct StreamTotals {
    endings: BTreeMap<String, u64>,
    ok_latency: Histogram<u64>,
    all_latency: Histogram<u64>,
    /// Attempts answered 2xx, and 503, each from when it was due.
    ok_attempts: Histogram<u64>,
    unavailable_attempts: Histogram<u64>,
    retries: u64,
    replays: u64,
    denied_by_budget: u64,
    over_max_wait: u64,
}

impl StreamTotals {
    fn new() -> Self {
        StreamTotals {
            endings: BTreeMap::new(),
            ok_latency: histogram(),
            all_latency: histogram(),
            ok_attempts: histogram(),
            unavailable_attempts: histogram(),
            retries: 0,
            replays: 0,
            denied_by_budget: 0,
            over_max_wait: 0,
        }
    }
}

/// Everything a run measured so far.
pub struct Recorder {
    seconds: Vec<[StreamSecond; 2]>,
    totals: [StreamTotals; 2],
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

fn slot(kind: Kind) -> usize {
    match kind {
        Kind::Bid => 0,
        Kind::Read => 1,
    }
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, MAX_LATENCY_US)
}

impl Recorder {
    /// An empty record.
    pub fn new() -> Self {
        Recorder {
            seconds: Vec::new(),
            totals: [StreamTotals::new(), StreamTotals::new()],
        }
    }

    fn second(&mut self, second: usize) -> &mut [StreamSecond; 2] {
        if self.seconds.len() <= second {
            self.seconds
                .resize_with(second + 1, || [StreamSecond::new(), StreamSecond::new()]);
        }
        &mut self.seconds[second]
    }

    /// A request was meant to be sent in second `second` of the run.
    pub fn offered(&mut self, kind: Kind, second: usize) {
        self.second(second)[slot(kind)].offered += 1;
    }

    /// A request ended (see [`Ended`]).
    pub fn ended(&mut self, e: Ended<'_>) {
        let us = micros(e.latency);
        let retries = u64::from(e.attempts.saturating_sub(1));
        {
            let s = &mut self.second(e.sent_s)[slot(e.kind)];
            s.retries += retries;
            match e.ending {
                Ending::Ok => {
                    s.ok += 1;
                    s.ok_latency.saturating_record(us.min(u64::from(u32::MAX)));
                }
                Ending::Refused(_) => s.refused += 1,
                _ => s.errors += 1,
            }
        }
        if *e.ending == Ending::Ok {
            self.second(e.done_s)[slot(e.kind)].completed_ok += 1;
        }
        let t = &mut self.totals[slot(e.kind)];
        *t.endings.entry(e.ending.label()).or_default() += 1;
        t.all_latency.saturating_record(us);
        if *e.ending == Ending::Ok {
            t.ok_latency.saturating_record(us);
        }
        t.retries += retries;
        t.replays += u64::from(e.replayed);
        match e.withheld {
            Some(Withheld::Budget) => t.denied_by_budget += 1,
            Some(Withheld::RetryAfterOverCap) => t.over_max_wait += 1,
            None => {}
        }
    }

    /// An attempt of a `kind` request was answered so, `latency` after it
    /// was due.
    pub fn attempt(&mut self, kind: Kind, answered: Answered, latency: Duration) {
        let t = &mut self.totals[slot(kind)];
        match answered {
            Answered::Ok => t.ok_attempts.saturating_record(micros(latency)),
            Answered::Unavailable => t.unavailable_attempts.saturating_record(micros(latency)),
            Answered::Otherwise => {}
        }
    }

    /// Seconds recorded so far.
    pub fn len(&self) -> usize {
        self.seconds.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.seconds.is_empty()
    }

    /// The figures of second `second` for `kind`.
    pub fn point(&self, kind: Kind, second: usize) -> Point {
        let Some(s) = self.seconds.get(second).map(|s| &s[slot(kind)]) else {
            return Point::default();
        };
        let quantile = |q: f64| {
            (!s.ok_latency.is_empty()).then(|| s.ok_latency.value_at_quantile(q) as f64 / 1000.0)
        };
        Point {
            t: second,
            offered: s.offered,
            ok: s.ok,
            refused: s.refused,
            errors: s.errors,
            completed_ok: s.completed_ok,
            retries: s.retries,
            p50_ms: quantile(0.5),
            p99_ms: quantile(0.99),
        }
    }

    /// Every second's figures for `kind`.
    pub fn series(&self, kind: Kind) -> Vec<Point> {
        (0..self.seconds.len())
            .map(|s| self.point(kind, s))
            .collect()
    }

    /// Latency and outcome figures of seconds `from..to` for `kind` (a
    /// step of a rate-finding run).
    pub fn window(&self, kind: Kind, from: usize, to: usize) -> Window {
        let mut latency = coarse_histogram();
        let mut window = Window::default();
        for s in self.seconds.iter().take(to).skip(from) {
            let s = &s[slot(kind)];
            window.offered += s.offered;
            window.ended += s.ok + s.refused + s.errors;
            window.ok += s.ok;
            window.errors += s.errors;
            latency.add(&s.ok_latency).expect("same bounds");
        }
        if !latency.is_empty() {
            window.p99_ms = Some(latency.value_at_quantile(0.99) as f64 / 1000.0);
        }
        window
    }

    /// The totals of `kind`.
    pub fn summary(&self, kind: Kind) -> StreamSummary {
        let t = &self.totals[slot(kind)];
        let count: u64 = t.endings.values().sum();
        let ok = t.endings.get("ok").copied().unwrap_or(0);
        let errors: u64 = t
            .endings
            .iter()
            .filter(|(label, _)| {
                label.starts_with("5xx") || *label == "timeout" || *label == "transport error"
            })
            .map(|(_, n)| n)
            .sum();
        StreamSummary {
            requests: count,
            ok,
            errors,
            endings: t.endings.clone(),
            retries: t.retries,
            retries_denied_by_budget: t.denied_by_budget,
            retries_over_max_wait: t.over_max_wait,
            idempotent_replays: t.replays,
            ok_latency_ms: Quantiles::of(&t.ok_latency),
            all_latency_ms: Quantiles::of(&t.all_latency),
            ok_attempts_ms: Quantiles::of(&t.ok_attempts),
            unavailable_attempts_ms: Quantiles::of(&t.unavailable_attempts),
        }
    }
}

/// One second of one stream.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Point {
    /// Seconds since the run started.
    pub t: usize,
    /// Requests meant to be sent in this second.
    pub offered: u64,
    /// Of those, answered 2xx (or 304).
    pub ok: u64,
    /// Of those, refused with a 4xx.
    pub refused: u64,
    /// Of those, ending in a 5xx, a timeout or a transport error.
    pub errors: u64,
    /// Requests answered 2xx in this second (whenever they were sent).
    pub completed_ok: u64,
    /// Retries made by the requests of this second.
    pub retries: u64,
    /// Median latency of the 2xx answers, in ms.
    pub p50_ms: Option<f64>,
    /// 99th percentile latency of the 2xx answers, in ms.
    pub p99_ms: Option<f64>,
}

/// Figures over a span of seconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Window {
    /// Requests offered.
    pub offered: u64,
    /// Of those, ended (answered, refused, failed) so far.
    pub ended: u64,
    /// Answered 2xx.
    pub ok: u64,
    /// 5xx, timeouts, transport errors.
    pub errors: u64,
    /// p99 of 2xx latency, in ms.
    pub p99_ms: Option<f64>,
}

/// Latency quantiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Quantiles {
    /// Answers counted.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Longest.
    pub max: f64,
}

impl Quantiles {
    /// Whether no answer was counted.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The quantiles of `h`, whose values are microseconds.
    pub fn of(h: &Histogram<u64>) -> Quantiles {
        if h.is_empty() {
            return Quantiles::default();
        }
        let ms = |v: u64| v as f64 / 1000.0;
        Quantiles {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// The totals of one stream.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StreamSummary {
    /// Requests offered and ended.
    pub requests: u64,
    /// Ended 2xx (or 304).
    pub ok: u64,
    /// Ended in a 5xx, a timeout or a transport error.
    pub errors: u64,
    /// Count by ending (`ok`, `4xx bid_too_low`, `5xx overloaded`, `timeout`, ...).
    pub endings: BTreeMap<String, u64>,
    /// Retries made (attempts beyond the first): each was allowed by the
    /// clients' retry budget.
    pub retries: u64,
    /// Retries the retry budget denied: each such request ended with its
    /// last answer.
    #[serde(default)]
    pub retries_denied_by_budget: u64,
    /// Retries not made because the server's `Retry-After` was longer than
    /// `client.max_retry_wait_ms`: each such request ended with that answer.
    #[serde(default)]
    pub retries_over_max_wait: u64,
    /// Answers marked `Idempotent-Replayed: true`.
    pub idempotent_replays: u64,
    /// Latency of the 2xx answers.
    pub ok_latency_ms: Quantiles,
    /// Latency of every answer, errors and timeouts included.
    pub all_latency_ms: Quantiles,
    /// Each attempt answered 2xx (or 304), from when it was due.
    #[serde(default, skip_serializing_if = "Quantiles::is_empty")]
    pub ok_attempts_ms: Quantiles,
    /// Each attempt answered `503`, from when it was due.
    #[serde(default, skip_serializing_if = "Quantiles::is_empty")]
    pub unavailable_attempts_ms: Quantiles,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(
        sent_s: usize,
        done_s: usize,
        latency: Duration,
        attempts: u32,
        ending: &Ending,
        replayed: bool,
    ) -> Ended<'_> {
        Ended {
            kind: Kind::Bid,
            sent_s,
            done_s,
            latency,
            attempts,
            ending,
            replayed,
            withheld: None,
        }
    }

    #[test]
    fn latency_is_filed_under_the_intended_second_and_throughput_under_the_done_second() {
        let mut r = Recorder::new();
        for _ in 0..100 {
            r.offered(Kind::Bid, 0);
        }
        for i in 0..99 {
            r.ended(ended(
                0,
                0,
                Duration::from_millis(2 + i % 3),
                1,
                &Ending::Ok,
                false,
            ));
        }
        // A stall: the last request of second 0 answers 3 s late.
        r.ended(ended(0, 3, Duration::from_secs(3), 2, &Ending::Ok, true));
        let p0 = r.point(Kind::Bid, 0);
        assert_eq!(
            (p0.offered, p0.ok, p0.completed_ok, p0.retries),
            (100, 100, 99, 1)
        );
        assert!(p0.p50_ms.unwrap() < 5.0);
        assert!(p0.p99_ms.unwrap() < 5.0, "99 of 100 were fast");
        assert_eq!(r.point(Kind::Bid, 3).completed_ok, 1);
        assert_eq!(r.point(Kind::Bid, 3).offered, 0);
        let s = r.summary(Kind::Bid);
        assert_eq!(
            (s.requests, s.ok, s.errors, s.retries, s.idempotent_replays),
            (100, 100, 0, 1, 1)
        );
        assert!(
            (s.ok_latency_ms.max - 3000.0).abs() < 5.0,
            "{}",
            s.ok_latency_ms.max
        );
    }

    #[test]
    fn each_attempt_is_timed_apart_by_its_answer() {
        let mut r = Recorder::new();
        // A bid refused twice in 5 ms, then accepted in 20 ms after its waits.
        r.attempt(Kind::Bid, Answered::Unavailable, Duration::from_millis(5));
        r.attempt(Kind::Bid, Answered::Unavailable, Duration::from_millis(5));
        r.attempt(Kind::Bid, Answered::Ok, Duration::from_millis(20));
        r.attempt(Kind::Bid, Answered::Otherwise, Duration::from_secs(2));
        r.ended(ended(
            0,
            3,
            Duration::from_millis(3_030),
            3,
            &Ending::Ok,
            false,
        ));
        let bids = r.summary(Kind::Bid);
        assert_eq!(bids.ok_latency_ms.count, 1);
        assert!(
            bids.ok_latency_ms.p99 >= 3_000.0,
            "the bid's latency keeps its waits"
        );
        assert_eq!(bids.ok_attempts_ms.count, 1);
        assert!((19.9..20.1).contains(&bids.ok_attempts_ms.p99));
        assert_eq!(bids.unavailable_attempts_ms.count, 2);
        assert!((4.9..5.1).contains(&bids.unavailable_attempts_ms.p50));
        assert_eq!(r.summary(Kind::Read).ok_attempts_ms.count, 0);
    }

    #[test]
    fn errors_are_5xx_timeouts_and_transport_failures_not_refusals() {
        let mut r = Recorder::new();
        let endings = [
            Ending::Refused("bid_too_low".into()),
            Ending::ServerError("overloaded".into()),
            Ending::Timeout,
            Ending::Transport,
        ];
        for e in &endings {
            r.offered(Kind::Bid, 1);
            r.ended(ended(1, 1, Duration::from_millis(10), 1, e, false));
        }
        let s = r.summary(Kind::Bid);
        assert_eq!((s.requests, s.ok, s.errors), (4, 0, 3));
        assert_eq!(s.endings["4xx bid_too_low"], 1);
        assert_eq!(s.endings["5xx overloaded"], 1);
        let w = r.window(Kind::Bid, 0, 2);
        assert_eq!(
            (w.offered, w.ended, w.ok, w.errors, w.p99_ms),
            (4, 4, 0, 3, None)
        );
    }

    #[test]
    fn retries_not_made_are_counted_by_why_beside_the_retries_made() {
        let mut r = Recorder::new();
        let overloaded = Ending::ServerError("overloaded".into());
        let rate_limited = Ending::Refused("rate_limited".into());
        let ms = Duration::from_millis;
        r.ended(ended(0, 1, ms(1_200), 3, &Ending::Ok, true));
        for (ending, withheld) in [
            (&overloaded, Withheld::Budget),
            (&overloaded, Withheld::Budget),
            (&overloaded, Withheld::RetryAfterOverCap),
            (&rate_limited, Withheld::RetryAfterOverCap),
        ] {
            r.ended(Ended {
                withheld: Some(withheld),
                ..ended(0, 0, ms(10), 1, ending, false)
            });
        }
        let s = r.summary(Kind::Bid);
        assert_eq!((s.requests, s.ok, s.errors, s.retries), (5, 1, 3, 2));
        assert_eq!(
            (s.retries_denied_by_budget, s.retries_over_max_wait),
            (2, 2)
        );
        // A request ended by a withheld retry ends like one out of attempts.
        assert_eq!(s.endings["5xx overloaded"], 3);
        assert_eq!(s.endings["4xx rate_limited"], 1);
        assert_eq!(r.summary(Kind::Read).retries_denied_by_budget, 0);
    }
}
