//! The watchers: game clients holding one live stream each
//! (`GET /api/auctions/{id}/events`) with their own token, from before
//! second 0 until their auction's `end` event, resuming with
//! `Last-Event-ID` when the stream drops. One task per stream; it reads
//! only the `id:` and `event:` lines (and the short `data:` of `end`),
//! never the views, and files each version's receipt time
//! ([`crate::receipts`]) and the versions it skipped. After `end` a
//! watcher leaves its connection open, idle, as an HTTP client's pool
//! would (a browser's among them); they are all closed once every watcher
//! has finished, so that tearing down ten thousand connections does not
//! share the machine with the final view still being delivered.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::header::HeaderValue;
use hyper::{StatusCode, Uri};
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::event_stream::EventStream;
use crate::priority::LoweredRuntime;
use crate::receipts::Receipts;

/// A stream silent this long (Gavel comments every 15 s) counts as dropped.
const SILENCE: Duration = Duration::from_secs(40);
/// Seconds of the run the per-second counts cover beyond the bidding phase.
const SECONDS_AFTER: usize = 120;

/// What the watchers share: where they connect, their tokens, and what
/// they count.
pub(super) struct Watching {
    /// Each watched auction: its index in the run and its stream's path.
    pub watched: Vec<(usize, Uri)>,
    /// Each watcher's `Authorization` header.
    pub bearer: Vec<HeaderValue>,
    /// When the watchers connect: the first at `first_connect`, the rest
    /// spread evenly over `ramp`.
    pub first_connect: Instant,
    pub ramp: Duration,
    /// How long after the bidding phase a watcher waits for `end`.
    pub end_wait: Duration,
    /// Tells the watchers still waiting for `end` to stop.
    pub stop: CancellationToken,
    /// Every version's receipts.
    pub receipts: Receipts,
    /// Counts across the watchers.
    pub tally: Tally,
    /// Streams open now.
    pub open: AtomicUsize,
    /// Versions received in each second of the run, and streams open at
    /// its end (sampled by the monitor).
    pub events_by_second: Vec<AtomicU64>,
    pub open_by_second: Vec<AtomicU32>,
    /// How each watcher ended.
    pub endings: Mutex<Vec<WatcherEnd>>,
    /// The connections of streams that ended, left open until the
    /// watchers have finished.
    pub idle: Mutex<Vec<EventStream>>,
}

/// Counts across the watchers.
#[derive(Debug, Default)]
pub struct Tally {
    connects: AtomicU64,
    reconnects: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    received: AtomicU64,
    initial: AtomicU64,
    skipped: AtomicU64,
    repeated: AtomicU64,
}

/// The watchers' counts at the end of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchCounts {
    /// Streams opened (`200`), the first of each watcher included.
    pub connects: u64,
    /// Of those, opened again after a stream dropped.
    pub reconnects: u64,
    /// Attempts answered `503` (no stream slot left).
    pub refused: u64,
    /// Attempts that failed otherwise (no answer, another status).
    pub failed: u64,
    /// `event: auction` received, each watcher's first view left out.
    pub received: u64,
    /// Each watcher's first view (the state it connected to).
    pub initial: u64,
    /// Versions never received: gaps between consecutive `id:`s.
    pub skipped: u64,
    /// Events whose version was not above the last one received.
    pub repeated: u64,
}

impl Tally {
    fn counts(&self) -> WatchCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Acquire);
        WatchCounts {
            connects: get(&self.connects),
            reconnects: get(&self.reconnects),
            refused: get(&self.refused),
            failed: get(&self.failed),
            received: get(&self.received),
            initial: get(&self.initial),
            skipped: get(&self.skipped),
            repeated: get(&self.repeated),
        }
    }
}

/// How one watcher ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatcherEnd {
    /// The run's index of its auction.
    pub auction: usize,
    /// The last version it received.
    pub last: Option<i64>,
    /// The final version its `end` event named (none: it never came).
    pub end: Option<i64>,
}

/// What the watchers measured over a run.
pub struct WatchOutput {
    /// Watchers held.
    pub count: usize,
    /// The run's indexes of the auctions watched.
    pub auctions: Vec<usize>,
    /// Every version's receipts, in µs since the run's clock origin.
    pub receipts: Receipts,
    /// Counts across the watchers.
    pub counts: WatchCounts,
    /// How each watcher ended.
    pub endings: Vec<WatcherEnd>,
    /// Versions received in each second of the run.
    pub events_by_second: Vec<u64>,
    /// Streams open at the end of each second.
    pub open_by_second: Vec<u32>,
}

impl Watching {
    /// Per-second counters for a run of `duration_s`.
    pub(super) fn seconds(duration_s: f64) -> (Vec<AtomicU64>, Vec<AtomicU32>) {
        let n = duration_s.ceil() as usize + SECONDS_AFTER;
        (
            (0..n).map(|_| AtomicU64::new(0)).collect(),
            (0..n).map(|_| AtomicU32::new(0)).collect(),
        )
    }

    /// Files the streams open now as those open at the end of `second`.
    pub(super) fn sample_open(&self, second: usize) {
        if let Some(sample) = self.open_by_second.get(second) {
            sample.store(self.open.load(Ordering::Acquire) as u32, Ordering::Release);
        }
    }

    /// What the watchers measured, once every one of them has finished.
    pub(super) fn output(self) -> WatchOutput {
        let load =
            |v: &[AtomicU64]| -> Vec<u64> { v.iter().map(|c| c.load(Ordering::Acquire)).collect() };
        WatchOutput {
            count: self.bearer.len(),
            auctions: self.watched.iter().map(|(i, _)| *i).collect(),
            counts: self.tally.counts(),
            endings: self.endings.into_inner().expect("watcher endings"),
            events_by_second: load(&self.events_by_second),
            open_by_second: (self.open_by_second.iter())
                .map(|c| c.load(Ordering::Acquire))
                .collect(),
            receipts: self.receipts,
        }
    }
}

/// Starts every watcher on the `load` runtime; each connects at its turn
/// of the ramp.
pub(super) fn start(load: &LoweredRuntime, shared: &Arc<Shared>) -> Vec<JoinHandle<()>> {
    let Some(watching) = &shared.watching else {
        return Vec::new();
    };
    let count = watching.bearer.len();
    (0..count)
        .map(|i| {
            let at = watching.first_connect + watching.ramp.mul_f64(i as f64 / count as f64);
            load.spawn(watch(shared.clone(), i, at))
        })
        .collect()
}

/// Lets the watchers receive their auctions' `end`, for at most the
/// scenario's `end_wait_s` after the bidding phase, then stops the rest.
pub(super) async fn finish(shared: &Shared, watchers: Vec<JoinHandle<()>>, duration_s: f64) {
    let Some(watching) = &shared.watching else {
        return;
    };
    let deadline = shared.t0 + Duration::from_secs_f64(duration_s) + watching.end_wait;
    let mut pending = watchers.into_iter();
    for mut handle in pending.by_ref() {
        if tokio::time::timeout_at(deadline.into(), &mut handle)
            .await
            .is_err()
        {
            eprintln!("  some watchers had no `end` event by the deadline: stopping them");
            watching.stop.cancel();
            let _ = handle.await;
            break;
        }
    }
    watching.stop.cancel();
    for handle in pending {
        let _ = handle.await;
    }
    watching.idle.lock().expect("idle connections").clear();
}

/// What one watcher knows of its stream.
#[derive(Debug, Default)]
struct Stream {
    /// The last version received.
    last: Option<i64>,
    /// The final version, once `end` came.
    end: Option<i64>,
}

/// One watcher: its stream, resumed until `end` or until it is stopped.
async fn watch(shared: Arc<Shared>, i: usize, connect_at: Instant) {
    let watching = shared.watching.as_ref().expect("watchers are set up");
    tokio::time::sleep_until(connect_at.into()).await;
    let (auction, _) = watching.watched[i % watching.watched.len()];
    let mut stream = Stream::default();
    let mut opened = false;
    while stream.end.is_none() && !watching.stop.is_cancelled() {
        let pause = tokio::select! {
            () = watching.stop.cancelled() => break,
            pause = follow(&shared, i, &mut stream, &mut opened) => pause,
        };
        if let Some(pause) = pause {
            tokio::select! {
                () = watching.stop.cancelled() => break,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }
    watching
        .endings
        .lock()
        .expect("watcher endings")
        .push(WatcherEnd {
            auction,
            last: stream.last,
            end: stream.end,
        });
}

/// Opens watcher `i`'s stream (resuming after `stream.last`) and reads it
/// until it ends; returns how long to wait before trying again (none
/// once `end` came).
async fn follow(
    shared: &Shared,
    i: usize,
    stream: &mut Stream,
    opened: &mut bool,
) -> Option<Duration> {
    let watching = shared.watching.as_ref().expect("watchers are set up");
    let tally = &watching.tally;
    let (auction, path) = &watching.watched[i % watching.watched.len()];
    let last = stream.last.map(|v| v.to_string());
    let path = path.to_string();
    let mut headers = vec![
        (
            "authorization",
            watching.bearer[i].to_str().unwrap_or_default(),
        ),
        ("accept", "text/event-stream"),
    ];
    headers.extend(last.as_deref().map(|last| ("last-event-id", last)));
    let attempt = EventStream::open(&shared.client, &path, &headers, shared.timeout).await;
    let Ok(mut events) = attempt else {
        tally.failed.fetch_add(1, Ordering::Relaxed);
        return Some(jitter(Duration::from_millis(500)));
    };
    if events.status != StatusCode::OK {
        let busy = events.status == StatusCode::SERVICE_UNAVAILABLE;
        let counter = if busy { &tally.refused } else { &tally.failed };
        counter.fetch_add(1, Ordering::Relaxed);
        let wait = events
            .retry_after
            .map_or(Duration::from_secs(1), Duration::from_secs);
        return Some(jitter(wait));
    }
    tally.connects.fetch_add(1, Ordering::Relaxed);
    if std::mem::replace(opened, true) {
        tally.reconnects.fetch_add(1, Ordering::Relaxed);
    }
    watching.open.fetch_add(1, Ordering::AcqRel);
    read_events(shared, *auction, &mut events, stream).await;
    watching.open.fetch_sub(1, Ordering::AcqRel);
    if stream.end.is_some() {
        watching.idle.lock().expect("idle connections").push(events);
        return None;
    }
    Some(jitter(Duration::from_millis(200)))
}

/// A random wait between `base` and twice it, so that dropped watchers do
/// not all come back at once.
fn jitter(base: Duration) -> Duration {
    base.mul_f64(1.0 + rand::thread_rng().gen::<f64>())
}

/// Reads the stream until it closes, stays silent too long, or ends.
async fn read_events(
    shared: &Shared,
    auction: usize,
    events: &mut EventStream,
    stream: &mut Stream,
) {
    let mut parser = Parser::default();
    let mut data = Vec::with_capacity(4096);
    while stream.end.is_none() {
        data.clear();
        match tokio::time::timeout(SILENCE, events.read(&mut data)).await {
            Ok(Ok(true)) => {}
            // Closed: what came last still counts.
            Ok(Ok(false)) if !data.is_empty() => {}
            _ => return,
        }
        parser.feed(&data, |event| match event {
            Event::Version(version) => received(shared, auction, version, stream),
            Event::End(version) => stream.end = Some(version),
        });
    }
}

/// Files the receipt of `version`, and the versions skipped before it.
fn received(shared: &Shared, auction: usize, version: i64, stream: &mut Stream) {
    let watching = shared.watching.as_ref().expect("watchers are set up");
    let tally = &watching.tally;
    let now = Instant::now();
    let Some(last) = stream.last else {
        tally.initial.fetch_add(1, Ordering::Relaxed);
        stream.last = Some(version);
        return;
    };
    if version <= last {
        tally.repeated.fetch_add(1, Ordering::Relaxed);
        return;
    }
    stream.last = Some(version);
    tally.received.fetch_add(1, Ordering::Relaxed);
    tally
        .skipped
        .fetch_add((version - last - 1) as u64, Ordering::Relaxed);
    let at_us = now.saturating_duration_since(shared.origin).as_micros() as u64;
    watching.receipts.record(auction, version, at_us);
    let second = now.saturating_duration_since(shared.t0).as_secs() as usize;
    if let Some(count) = watching.events_by_second.get(second) {
        count.fetch_add(1, Ordering::Relaxed);
    }
}

/// An event of an auction's stream, as a watcher needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    /// `event: auction` with `id:` this version.
    Version(i64),
    /// `event: end` with `data:` the final version.
    End(i64),
}

/// The fields of an event-stream that a watcher reads, line by line: the
/// event name, its `id:`, and a numeric `data:` (a view's JSON is skipped).
#[derive(Debug, Default)]
struct Parser {
    /// The start of a line cut by a frame boundary (only its first bytes:
    /// the lines read are short).
    partial: Vec<u8>,
    /// The line being cut is longer than kept.
    truncated: bool,
    name: Option<Name>,
    id: Option<i64>,
    number: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Name {
    Auction,
    End,
    Other,
}

/// Bytes of a line kept across frames: enough for `id:`, `event:` and a
/// version in `data:`.
const KEPT: usize = 48;

impl Parser {
    /// Reads `chunk`, calling `on_event` for each event it completes.
    fn feed(&mut self, mut chunk: &[u8], mut on_event: impl FnMut(Event)) {
        while let Some(newline) = chunk.iter().position(|&b| b == b'\n') {
            let (line, rest) = (&chunk[..newline], &chunk[newline + 1..]);
            if self.partial.is_empty() && !self.truncated {
                self.line(line, &mut on_event);
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                let room = KEPT.saturating_sub(whole.len());
                whole.extend_from_slice(&line[..line.len().min(room)]);
                self.truncated = false;
                self.line(&whole, &mut on_event);
            }
            chunk = rest;
        }
        let room = KEPT.saturating_sub(self.partial.len());
        self.partial
            .extend_from_slice(&chunk[..chunk.len().min(room)]);
        self.truncated |= chunk.len() > room;
    }

    fn line(&mut self, line: &[u8], on_event: &mut impl FnMut(Event)) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            let event = match (self.name.take(), self.id.take(), self.number.take()) {
                (Some(Name::Auction), Some(id), _) => Some(Event::Version(id)),
                (Some(Name::End), _, Some(version)) => Some(Event::End(version)),
                _ => None,
            };
            event.into_iter().for_each(on_event);
        } else if let Some(value) = field(line, b"id") {
            self.id = number(value);
        } else if let Some(value) = field(line, b"event") {
            self.name = Some(match value {
                b"auction" => Name::Auction,
                b"end" => Name::End,
                _ => Name::Other,
            });
        } else if let Some(value) = field(line, b"data") {
            self.number = number(value);
        }
    }
}

/// The value of `line` when it is the field `name` (`name: value`).
fn field<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let value = line.strip_prefix(name)?.strip_prefix(b":")?;
    Some(value.strip_prefix(b" ").unwrap_or(value))
}

fn number(value: &[u8]) -> Option<i64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&[u8]]) -> Vec<Event> {
        let mut parser = Parser::default();
        let mut out = Vec::new();
        for chunk in chunks {
            parser.feed(chunk, |e| out.push(e));
        }
        out
    }

    #[test]
    fn versions_and_the_end_are_read_across_frame_boundaries() {
        let view = format!("{{\"price\":1200,\"pad\":\"{}\"}}", "x".repeat(500));
        let stream = format!(
            ": keep-alive\n\nevent: auction\nid: 41\ndata: {view}\n\n\
             event: auction\r\nid: 43\r\ndata: {view}\r\n\r\n\
             event: auction\nid: 44\ndata: 12\n\nevent: end\ndata: 44\n\n"
        );
        let whole = events(&[stream.as_bytes()]);
        assert_eq!(
            whole,
            [
                Event::Version(41),
                Event::Version(43),
                Event::Version(44),
                Event::End(44)
            ]
        );
        for size in [1, 2, 7, 64, 333] {
            let chunks: Vec<&[u8]> = stream.as_bytes().chunks(size).collect();
            assert_eq!(events(&chunks), whole, "frames of {size} bytes");
        }
    }
}
