//! Admission control for bids: keeps the wait of every admitted bid short
//! when more bids arrive than the database can commit, and refuses the
//! excess at once, so overload costs the refused requests almost nothing
//! and the admitted ones still succeed.
//!
//! It watches how long the oldest bid of each append batch took from
//! entering the queue to its commit (CoDel's signal, adapted to batches,
//! which empty the queue at every take): when every batch committed during
//! two [`INTERVAL`]s in a row had a bid older than [`TARGET`], the writers
//! are not keeping up, and the process is overloaded (one such interval is
//! what the catch-up after a short stall looks like). Then a new bid may wait in the queue at most
//! [`OVERLOAD_WAIT`] instead of the pool wait, and a bid arriving to a
//! queue longer than what the writers commit in that time is refused at the
//! door, before its request is authenticated or read further. The overload
//! lasts until an interval passes with no refusal at the door and no
//! standing queue: demand fits again. Reads are refused at the door while
//! bids are overloaded: bids come first. Refusals carry a `Retry-After`
//! that grows while the overload lasts and is spread at random, so refused
//! clients do not all come back at once. A stall, when the writers take
//! nothing, is not overload: the pool wait and the silence watch handle it.
//! At any time a bid that could not be taken within its wait at the
//! current commit rate is refused at the door: it would only time out.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::ApiError;

/// The oldest bid's time to commit tolerated as standing (CoDel's target).
pub const TARGET: Duration = Duration::from_millis(50);
/// How long the delay must stay above the target to mean overload.
pub const INTERVAL: Duration = Duration::from_millis(100);
/// The most a bid admitted during overload waits in the append queue.
pub const OVERLOAD_WAIT: Duration = Duration::from_millis(50);
/// The longest `Retry-After` base, in seconds (the answer is 1-2 times it).
const MAX_RETRY_AFTER_BASE_S: u64 = 8;

/// The admission state of one process's bid path.
pub struct Admission {
    state: Mutex<State>,
    /// Bids waiting in the append queue, kept by the appender.
    waiting: Arc<AtomicUsize>,
    /// State for the `Retry-After` jitter.
    jitter: AtomicU64,
}

#[derive(Debug)]
struct State {
    window_start: Instant,
    /// The shortest time to commit of a batch's oldest bid in this window.
    window_min: Option<Duration>,
    /// Bids committed (or failed) in this window.
    window_taken: u64,
    /// Bids refused at the door in this window.
    window_refused: u64,
    /// Windows in a row whose batches all had a bid older than the target
    /// (windows without a batch leave it as it is).
    standing_windows: u32,
    /// Bids taken per second, over the last windows (moving average).
    rate: f64,
    overloaded_since: Option<Instant>,
}

/// What the door says to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    /// Admitted: a bid may wait in the queue until this long from now.
    Open(Duration),
    /// Refused: come back after this many seconds.
    Refused { retry_after_s: u64 },
}

impl Admission {
    /// A controller that starts not overloaded.
    pub fn new() -> Self {
        register_metrics();
        Admission {
            state: Mutex::new(State {
                window_start: Instant::now(),
                window_min: None,
                window_taken: 0,
                window_refused: 0,
                standing_windows: 0,
                rate: 0.0,
                overloaded_since: None,
            }),
            waiting: Arc::default(),
            jitter: AtomicU64::new(seed()),
        }
    }

    /// The count of bids waiting in the append queue, for the appender to
    /// keep: an overload lasts while bids wait and nothing is written.
    pub fn waiting(&self) -> Arc<AtomicUsize> {
        self.waiting.clone()
    }

    fn roll(&self, state: &mut State, now: Instant) {
        state.roll(now, self.waiting.load(Ordering::Relaxed) > 0);
    }

    /// Notes the queue waits of a batch's bids as a writer takes them.
    pub fn taken(&self, waits: impl Iterator<Item = Duration>) {
        let histogram = metrics::histogram!("gavel_admission_queue_wait_seconds");
        for wait in waits {
            histogram.record(wait.as_secs_f64());
        }
    }

    /// Notes a batch of `bids` written (or failed), whose oldest bid took
    /// `oldest` from entering the queue to the end of the batch.
    pub fn written(&self, bids: usize, oldest: Duration) {
        let now = Instant::now();
        let mut state = self.state.lock().expect("admission state");
        state.window_min = Some(state.window_min.map_or(oldest, |min| min.min(oldest)));
        state.window_taken += bids as u64;
        self.roll(&mut state, now);
    }

    /// Whether a bid arriving now, to a queue of `queued` waiting bids out
    /// of the `capacity` it holds, may enter, and how long it may wait
    /// there (`normal` when not overloaded). A full queue is a refusal at
    /// the door: before the request costs its authentication and parsing.
    pub fn bid(&self, (queued, capacity): (usize, usize), normal: Duration) -> Door {
        let now = Instant::now();
        let mut state = self.state.lock().expect("admission state");
        self.roll(&mut state, now);
        let wait = match state.overloaded_since {
            Some(_) => normal.min(OVERLOAD_WAIT),
            None => normal,
        };
        // What the writers commit while an admitted bid may wait; unknown
        // (everything fits) until they have committed something.
        let room = (state.rate * wait.as_secs_f64()).ceil() as usize;
        let full = queued >= capacity
            || match state.overloaded_since {
                Some(_) => queued >= room.max(1),
                None => state.rate > 0.0 && queued >= room.max(1),
            };
        if !full {
            return Door::Open(wait);
        }
        state.window_refused += 1;
        let since = state.overloaded_since;
        drop(state);
        count("bid", "refused_at_door");
        Door::Refused {
            retry_after_s: self.retry_after(since.map_or(Duration::ZERO, |s| now - s)),
        }
    }

    /// Whether a read may be served now: not while bids are overloaded.
    pub fn read(&self) -> Door {
        let since = {
            let mut state = self.state.lock().expect("admission state");
            self.roll(&mut state, Instant::now());
            state.overloaded_since
        };
        match since {
            None => Door::Open(Duration::ZERO),
            Some(since) => {
                count("read", "refused_at_door");
                Door::Refused {
                    retry_after_s: self.retry_after(since.elapsed()),
                }
            }
        }
    }

    /// The answer to a bid that ran out of its queue wait: `503
    /// overloaded`, with the overload's `Retry-After` while there is one.
    pub fn queue_refusal(&self) -> ApiError {
        count("bid", "refused_in_queue");
        let since = self.state.lock().expect("admission state").overloaded_since;
        match since {
            Some(since) => ApiError::Shed {
                retry_after_s: self.retry_after(since.elapsed()),
            },
            None => ApiError::Overloaded,
        }
    }

    /// `Retry-After` after `overloaded_for`: a base of 1 s doubling every
    /// 2 s of overload up to [`MAX_RETRY_AFTER_BASE_S`], spread at random
    /// over 1-2 times the base.
    fn retry_after(&self, overloaded_for: Duration) -> u64 {
        let doublings = (overloaded_for.as_secs() / 2).min(3) as u32;
        let base = (1u64 << doublings).min(MAX_RETRY_AFTER_BASE_S);
        base + self.random() % (base + 1)
    }

    /// A splitmix64 step: cheap, lock-free randomness for the jitter.
    fn random(&self) -> u64 {
        let mut z = self
            .jitter
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl Default for Admission {
    fn default() -> Self {
        Admission::new()
    }
}

impl State {
    /// Closes the window when an interval has passed. Overload starts when
    /// two windows in a row had every batch written with a bid older than
    /// the target; it goes on while that holds, while the door refused
    /// bids, or while bids wait and none was written.
    fn roll(&mut self, now: Instant, bids_waiting: bool) {
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed < INTERVAL {
            return;
        }
        let standing = self.window_min.map(|min| min > TARGET);
        match standing {
            Some(true) => self.standing_windows += 1,
            Some(false) => self.standing_windows = 0,
            None => {}
        }
        let over = match self.overloaded_since {
            None => self.standing_windows >= 2,
            Some(_) => standing.unwrap_or(bids_waiting) || self.window_refused > 0,
        };
        let window_rate = self.window_taken as f64 / elapsed.as_secs_f64();
        self.rate = if self.rate == 0.0 {
            window_rate
        } else {
            0.5 * self.rate + 0.5 * window_rate
        };
        match (over, self.overloaded_since) {
            (true, None) => {
                self.overloaded_since = Some(now);
                tracing::warn!(
                    committed_per_s = self.rate as u64,
                    "bids wait longer than the admission target: refusing the excess"
                );
            }
            (false, Some(since)) => {
                self.overloaded_since = None;
                tracing::info!(
                    lasted_ms = now.saturating_duration_since(since).as_millis() as u64,
                    "bid overload ended"
                );
            }
            _ => {}
        }
        metrics::gauge!("gavel_admission_overloaded")
            .set(f64::from(u8::from(self.overloaded_since.is_some())));
        self.window_start = now;
        self.window_min = None;
        self.window_taken = 0;
        self.window_refused = 0;
    }
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Counts one admission decision.
pub fn count(kind: &'static str, decision: &'static str) {
    metrics::counter!("gavel_admission_decisions_total", "kind" => kind, "decision" => decision)
        .increment(1);
}

fn register_metrics() {
    for kind in ["bid", "read"] {
        for decision in ["admitted", "refused_at_door", "refused_in_queue"] {
            metrics::counter!("gavel_admission_decisions_total", "kind" => kind, "decision" => decision)
                .increment(0);
        }
    }
    metrics::gauge!("gavel_admission_overloaded").set(0.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    const NORMAL: Duration = Duration::from_secs(1);

    /// A queue that holds more than any test fills.
    const ROOMY: usize = 1_000_000;

    fn overloaded(admission: &Admission) -> bool {
        admission.state.lock().unwrap().overloaded_since.is_some()
    }

    fn age(admission: &Admission, by: Duration) {
        let mut state = admission.state.lock().unwrap();
        state.window_start -= by;
        if let Some(since) = &mut state.overloaded_since {
            *since -= by;
        }
    }

    /// A window in which the writers wrote `count` bids in batches whose
    /// oldest bids took at least `min`.
    fn window(admission: &Admission, count: usize, min: Duration) {
        admission.written(count, min);
        age(admission, INTERVAL);
    }

    #[test]
    fn a_queue_that_drains_within_the_target_is_never_overloaded() {
        let admission = Admission::new();
        for _ in 0..5 {
            admission.written(10, Duration::from_millis(90));
            admission.written(10, Duration::from_millis(2));
            age(&admission, INTERVAL);
        }
        admission.written(1, Duration::from_millis(1));
        assert!(!overloaded(&admission));
        assert_eq!(admission.bid((5, ROOMY), NORMAL), Door::Open(NORMAL));
        assert_eq!(admission.read(), Door::Open(Duration::ZERO));
    }

    #[test]
    fn a_standing_queue_shortens_the_wait_and_refuses_beyond_what_fits() {
        let admission = Admission::new();
        // 200 bids in 0.1 s, every batch's oldest over the target: 2,000 a second.
        window(&admission, 200, Duration::from_millis(60));
        window(&admission, 200, Duration::from_millis(60));
        admission.written(1, Duration::from_millis(55));
        assert!(overloaded(&admission));
        // 50 ms of 2,000 bids a second: 100 fit.
        assert_eq!(
            admission.bid((10, ROOMY), NORMAL),
            Door::Open(OVERLOAD_WAIT)
        );
        let Door::Refused { retry_after_s } = admission.bid((500, ROOMY), NORMAL) else {
            panic!("a long queue refuses");
        };
        assert!((1..=2).contains(&retry_after_s), "{retry_after_s}");
        assert!(matches!(admission.read(), Door::Refused { .. }));
    }

    #[test]
    fn the_overload_lasts_while_the_door_refuses_and_ends_when_demand_fits() {
        let admission = Admission::new();
        window(&admission, 200, Duration::from_millis(60));
        window(&admission, 200, Duration::from_millis(60));
        admission.written(1, Duration::from_millis(55));
        assert!(overloaded(&admission));
        // Short waits, but the door refused bids: still overloaded.
        assert!(matches!(
            admission.bid((500, ROOMY), NORMAL),
            Door::Refused { .. }
        ));
        window(&admission, 200, Duration::from_millis(1));
        admission.written(1, Duration::from_millis(1));
        assert!(overloaded(&admission));
        // A window with short waits and no refusal ends it.
        window(&admission, 100, Duration::from_millis(1));
        admission.written(1, Duration::from_millis(1));
        assert!(!overloaded(&admission));
        assert_eq!(admission.bid((5, ROOMY), NORMAL), Door::Open(NORMAL));
    }

    #[test]
    fn the_overload_lasts_while_bids_wait_and_nothing_is_written() {
        let admission = Admission::new();
        window(&admission, 200, Duration::from_millis(60));
        window(&admission, 200, Duration::from_millis(60));
        admission.written(1, Duration::from_millis(55));
        assert!(overloaded(&admission));
        admission.waiting().store(3, Ordering::Relaxed);
        age(&admission, INTERVAL);
        assert!(matches!(admission.read(), Door::Refused { .. }));
        admission.waiting().store(0, Ordering::Relaxed);
        age(&admission, INTERVAL);
        assert_eq!(admission.read(), Door::Open(Duration::ZERO));
    }

    #[test]
    fn reads_alone_end_an_overload_once_bids_stop() {
        let admission = Admission::new();
        window(&admission, 200, Duration::from_millis(60));
        window(&admission, 200, Duration::from_millis(60));
        admission.written(1, Duration::from_millis(55));
        assert!(matches!(admission.read(), Door::Refused { .. }));
        age(&admission, INTERVAL);
        assert_eq!(admission.read(), Door::Open(Duration::ZERO));
    }

    #[test]
    fn a_stall_is_not_overload_but_a_bid_that_could_not_be_taken_in_time_is_refused() {
        let admission = Admission::new();
        // Nothing known yet: everything fits.
        assert_eq!(admission.bid((10_000, ROOMY), NORMAL), Door::Open(NORMAL));
        window(&admission, 100, Duration::from_millis(5));
        // 1,000 a second: 1,000 fit in a second's wait.
        assert_eq!(admission.bid((900, ROOMY), NORMAL), Door::Open(NORMAL));
        assert!(matches!(
            admission.bid((1_000, ROOMY), NORMAL),
            Door::Refused { .. }
        ));
        // One slow window (the catch-up after a stall) is not overload,
        // and neither is a while in which the writers write nothing.
        window(&admission, 100, Duration::from_millis(300));
        age(&admission, INTERVAL * 3);
        assert!(matches!(admission.bid((50, ROOMY), NORMAL), Door::Open(_)));
        assert!(!overloaded(&admission));
    }

    #[test]
    fn a_full_queue_is_refused_at_the_door_overloaded_or_not() {
        let admission = Admission::new();
        assert!(matches!(
            admission.bid((256, 256), NORMAL),
            Door::Refused {
                retry_after_s: 1..=2
            }
        ));
        assert!(!overloaded(&admission));
        assert_eq!(admission.bid((255, 256), NORMAL), Door::Open(NORMAL));
    }

    #[test]
    fn retry_after_grows_while_the_overload_lasts_and_is_spread() {
        let admission = Admission::new();
        let spread: std::collections::BTreeSet<u64> = (0..200)
            .map(|_| admission.retry_after(Duration::ZERO))
            .collect();
        assert_eq!(spread, [1, 2].into_iter().collect());
        let later: Vec<u64> = (0..200)
            .map(|_| admission.retry_after(Duration::from_secs(5)))
            .collect();
        assert!(later.iter().all(|s| (4..=8).contains(s)), "{later:?}");
        let longest = (0..200)
            .map(|_| admission.retry_after(Duration::from_secs(600)))
            .max()
            .unwrap();
        assert!(longest <= 2 * MAX_RETRY_AFTER_BASE_S);
    }
}
