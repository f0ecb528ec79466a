//! Pacing of auction streams: a process sends at most
//! `GAVEL_STREAM_EVENTS_PER_S` auction events a second over all its
//! streams, so keeping watchers current costs a bounded share of the
//! machine however many watch.
//!
//! Most of that budget is shared evenly: after each event a stream waits
//! its share (open streams over [`SHARED`] of the budget, jittered), then
//! sends the latest version. The rest fills a reserve: when a version has
//! stayed the latest for [`QUIET`] (bids paused, the last change before a
//! lull), paused streams holding an older one send it at once while the
//! reserve lasts, instead of leaving it waiting for their pauses. A closed
//! auction's final view is never held (see [`Watch`](super::Watch)).

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify, Semaphore};

use crate::signals::Signals;

/// How long a version stays the latest before streams may send it early.
pub const QUIET: Duration = Duration::from_millis(50);
/// The share of the budget the streams' pauses spend; the rest fills the reserve.
const SHARED: f64 = 0.8;
/// A pause shorter than this is not taken.
const MIN_PAUSE: Duration = Duration::from_millis(1);

/// The process's event budget. Cheap to clone.
#[derive(Clone)]
pub(super) struct Pace {
    inner: Arc<Budget>,
}

struct Budget {
    streams: Arc<Semaphore>,
    max_streams: usize,
    per_s: f64,
    reserve: Mutex<Reserve>,
    /// Tells whether the process is taking bids.
    signals: Signals,
}

/// Events that may go out beyond the pauses: refilled at the rest of the
/// budget, up to a second of the whole budget.
struct Reserve {
    tokens: f64,
    at: Instant,
}

impl Pace {
    /// A budget of `per_s` events a second over at most `max_streams`
    /// streams, whose reserve waits while `signals` tell of bids committed.
    pub fn new(max_streams: usize, per_s: usize, signals: Signals) -> Self {
        let per_s = per_s.max(1) as f64;
        Pace {
            inner: Arc::new(Budget {
                streams: Arc::new(Semaphore::new(max_streams)),
                max_streams,
                per_s,
                reserve: Mutex::new(Reserve {
                    tokens: per_s,
                    at: Instant::now(),
                }),
                signals,
            }),
        }
    }

    /// The stream slots (`GAVEL_MAX_STREAMS`).
    pub fn streams(&self) -> &Arc<Semaphore> {
        &self.inner.streams
    }

    /// Publishes the current mean pause (`gavel_stream_pause_seconds`).
    pub fn record(&self) {
        let pause = self.interval();
        let pause = if pause < MIN_PAUSE {
            Duration::ZERO
        } else {
            pause
        };
        metrics::gauge!("gavel_stream_pause_seconds").set(pause.as_secs_f64());
    }

    /// One stream's share of the budget: the mean time between its events.
    fn interval(&self) -> Duration {
        let budget = &self.inner;
        let open = budget.max_streams - budget.streams.available_permits();
        Duration::from_secs_f64(open as f64 / (budget.per_s * SHARED))
    }

    /// Takes one event from the reserve, if it holds one and no bid was
    /// committed within the last [`QUIET`].
    fn take_reserve(&self) -> bool {
        let budget = &self.inner;
        if budget.signals.bids_committed_within(QUIET) {
            return false;
        }
        let mut reserve = budget.reserve.lock().expect("reserve");
        let now = Instant::now();
        let refill = now.duration_since(reserve.at).as_secs_f64() * budget.per_s * (1.0 - SHARED);
        reserve.tokens = (reserve.tokens + refill).min(budget.per_s);
        reserve.at = now;
        if reserve.tokens < 1.0 {
            return false;
        }
        reserve.tokens -= 1.0;
        true
    }
}

/// One stream's pacing: its jitter and its feed's quiet versions.
pub(super) struct Pacer {
    pace: Pace,
    /// State of the jitter (splitmix64).
    jitter: u64,
    quiet: watch::Receiver<i64>,
}

impl Pacer {
    pub fn new(pace: Pace, quiet: watch::Receiver<i64>, seed: u64) -> Self {
        Pacer {
            pace,
            jitter: seed,
            quiet,
        }
    }

    /// The pause after an event: between half and one and a half times the
    /// stream's share at random, so that streams woken together drift
    /// apart; `None` when under [`MIN_PAUSE`].
    pub fn pause(&mut self) -> Option<Duration> {
        let pause = self.pace.interval().mul_f64(0.5 + self.random());
        (pause >= MIN_PAUSE).then_some(pause)
    }

    /// Resolves once a version above `sent` has gone quiet and the reserve
    /// lets this stream send it before its pause ends.
    pub async fn quiet_above(&mut self, sent: i64) {
        loop {
            if *self.quiet.borrow_and_update() > sent && self.pace.take_reserve() {
                return;
            }
            if self.quiet.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Uniform in `0..1`.
    fn random(&mut self) -> f64 {
        self.jitter = self.jitter.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.jitter;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) as f64 / u64::MAX as f64
    }
}

/// Marks a feed's latest version quiet each time [`QUIET`] passes after a
/// publication (`published`) without another; `mark` does it and returns
/// false once the feed is gone, which ends the task (the feed notifies
/// `published` when dropped).
pub(super) async fn mark_quiet<F: Send + Sync + 'static>(
    feed: Weak<F>,
    published: Arc<Notify>,
    mark: fn(&F),
) {
    loop {
        published.notified().await;
        loop {
            tokio::select! {
                () = published.notified() => {}
                () = tokio::time::sleep(QUIET) => break,
            }
        }
        let Some(feed) = feed.upgrade() else {
            return;
        };
        mark(&feed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_open(pace: &Pace, streams: usize) -> Vec<tokio::sync::OwnedSemaphorePermit> {
        (0..streams)
            .map(|_| pace.streams().clone().try_acquire_owned().unwrap())
            .collect()
    }

    #[test]
    fn each_open_stream_pauses_for_its_share_of_the_budget() {
        let pace = Pace::new(100, 1_000, Signals::new());
        let _open = with_open(&pace, 40);
        // 40 streams sharing 800 events a second: one each 50 ms.
        assert_eq!(pace.interval(), Duration::from_millis(50));
        let mut pacer = Pacer::new(pace, watch::channel(0).1, 7);
        for _ in 0..1_000 {
            let pause = pacer.pause().unwrap();
            assert!(pause >= Duration::from_millis(25) && pause <= Duration::from_millis(75));
        }
    }

    #[test]
    fn a_few_streams_are_not_paused() {
        let pace = Pace::new(100, 20_000, Signals::new());
        let _open = with_open(&pace, 10);
        assert_eq!(Pacer::new(pace, watch::channel(0).1, 7).pause(), None);
    }

    #[test]
    fn the_reserve_holds_a_second_of_budget_and_refills_at_the_rest() {
        let pace = Pace::new(10, 100, Signals::new());
        let taken = (0..150).filter(|_| pace.take_reserve()).count();
        assert!((100..=101).contains(&taken), "{taken}");
        // A fifth of 100 a second: at least 2 more after 100 ms.
        std::thread::sleep(Duration::from_millis(100));
        assert!(pace.take_reserve() && pace.take_reserve());
    }

    #[test]
    fn the_reserve_waits_while_the_process_commits_bids() {
        let signals = Signals::new();
        let pace = Pace::new(10, 100, signals.clone());
        signals.bids_committed();
        assert!(!pace.take_reserve(), "spent while bids were committed");
        std::thread::sleep(QUIET + Duration::from_millis(10));
        assert!(pace.take_reserve(), "kept after the bids stopped");
    }
}
